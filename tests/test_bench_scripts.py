"""The benchmark scripts (and ``shadowkv bench``) run end to end on tiny CPU shapes.

They are what a rare GPU session runs (bench/gpu_session.sh); a script that broke since the
last one would waste that session's device time. Here each runs once on CPU at a shape that
takes seconds, and must print its table. Timings are not checked: benchmarks, not tests.

The scripts run in this process, as ``__main__`` from their own files (``runpy``): a
subprocess each spent more time importing torch and transformers than running (about 60 of
the module's ~120 s on a 2-core VM). Two subprocesses remain: ``python -m shadowkv`` (the
installed entry point) and the FlexAttention compile (whose compile state stays out of this
process).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from .models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# script -> (tiny CPU arguments, a line its table must contain)
SMALL = {
    "bench_shadow_attention.py": (["--device", "cpu", "-L", "96", "-D", "16", "--q-heads", "4", "--kv-heads", "2",
                                   "--repeats", "1", "--no-flex", "--budget", "0.5"],
                                  "fastest shadowkv choice at 50%: shadowkv"),
    "bench_decode.py": (["--device", "cpu", "-B", "2", "--ctx", "100", "--heads", "4", "--kv-heads", "2",
                         "--head-dim", "16", "--page-size", "8", "--reps", "2", "--warmup", "1", "--scores"],
                        "| paged_decode_attention + scores_out |"),
    "bench_evict.py": (["--device", "cpu", "-B", "2", "--ctx", "100", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "16", "--page-size", "8", "--reps", "2", "--warmup", "1"],
                       "| steady | random, fill |"),
    "bench_rollout.py": (["-B", "2", "--prompt", "8", "--new", "24", "--head-dim", "16", "--page-size", "4",
                          "--max-fit-batch", "4"], "equal memory: the largest batch (<= 4)"),
    "bench_replay.py": (["--device", "cpu", "--dtype", "float32", "--head-dim", "64", "--new", "8"], "| snapkv |"),
    "bench_learner.py": (["--device", "cpu", "-B", "3", "--max-len", "48", "--prompt", "8", "--hidden", "32",
                          "--layers", "1", "--repeats", "1"], "| packed (learner) |"),
    "bench_prefill.py": (["--device", "cpu", "-B", "4", "--max-len", "40", "--hidden", "32", "--layers", "1",
                          "--repeats", "1", "--prefill-tokens", "1000"], "| packed (sampler) | 1 | 120 (77%) |"),
    "profile_attention.py": (["--device", "cpu", "-L", "96", "-D", "16", "--q-heads", "4", "--kv-heads", "2",
                              "-B", "1"], "profile_attention: auto, mask 25%"),
}


def _run(script: str, args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def _run_here(script: str, args: list[str], monkeypatch, capsys) -> str:
    """``python bench/SCRIPT ARGS`` in this process: the file runs as ``__main__``."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / script), *args])
    runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("script", list(SMALL))
def test_bench_script_runs_on_cpu(script, monkeypatch, capsys):
    args, expected = SMALL[script]
    out = _run_here(script, args, monkeypatch, capsys)
    assert expected in out, out


def test_attention_acceptance_line_takes_the_fastest_family():
    """bench attention's last line: the fastest kernel choice's fwd+bwd against flex and causal SDPA
    under the budget mask (a family that failed, or another mask's rows, do not count)."""
    from shadowkv.benchmarks.attention import acceptance_line

    results = {("25%", "shadowkv"): (1.0, 4e-3), ("25%", "wgmma_ws"): (1.0, 3e-3),
               ("25%", "wgmma_wsf"): (1.0, "RuntimeError: failed"), ("dense", "wgmma"): (1.0, 1e-3),
               ("25%", "flex"): (1.0, 6e-3), ("25%", "sdpa"): (1.0, 1e-4)}
    assert acceptance_line(results, "25%") == ("fastest shadowkv choice at 25%: wgmma_ws 3.00 ms fwd+bwd; "
                                               "flex 2.00x (need >= 1.5x); causal n/a (need > 1x)")


def test_attention_marks_a_wrong_family_and_leaves_it_out(monkeypatch, capsys):
    """A family whose outputs differ from the float64 reference is timed but marked WRONG, with its
    errors in a note, and the acceptance line ignores it even though it is the fastest."""
    from shadowkv.benchmarks import attention

    make_impls = attention.make_impls

    def with_a_wrong_family(evicted_at, args, device):
        impls = make_impls(evicted_at, args, device)
        # Fast, differentiable in q, k and v, and not attention.
        impls["wmma"] = lambda q, k, v: q + (k + v).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return impls

    monkeypatch.setattr(attention, "make_impls", with_a_wrong_family)
    attention.main(["--device", "cpu", "-L", "64", "-D", "16", "--q-heads", "4", "--kv-heads", "2",
                    "--repeats", "1", "--no-flex", "--budget", "0.5"])
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split()[-1]
            for line in out.splitlines() if line.startswith((" dense", "   50%"))}
    assert rows[("50%", "wmma")] == "WRONG" and rows[("dense", "wmma")] == "WRONG", out
    assert all(check == "ok" for (_, impl), check in rows.items() if impl != "wmma"), out
    assert "note: wmma (50%) WRONG, left out of the acceptance line: out max err" in out
    assert "fastest shadowkv choice at 50%: shadowkv " in out


def test_attention_flex_is_compiled_whole_or_skipped():
    """FlexAttention compiles with fullgraph=True, so a compile that fails is a note with its root
    cause (on CPU: no backward) rather than a silent fall-back to eager for every later call."""
    out = _run("bench_shadow_attention.py", ["--device", "cpu", "-L", "64", "-D", "16", "--q-heads", "4",
                                             "--kv-heads", "2", "--repeats", "1", "--no-sdpa", "--budget", "0.5"])
    flex = [line.split() for line in out.splitlines() if line.split()[:2] in (["dense", "flex"], ["50%", "flex"])]
    if not flex:  # no compiler for inductor's CPU backend
        assert "note: flex (dense) skipped" in out, out
        return
    # mask, impl, fwd ms, fwd+bwd ms, fwd x, fwd+bwd x, check ("ok fwd": no backward on CPU)
    assert [(row[3], row[5:]) for row in flex] == [("n/a", ["n/a", "ok", "fwd"])] * 2, out
    assert "flex (dense) fwd+bwd skipped: ObservedNotImplementedError" in out, out


def test_attention_needs_20_repeats_on_cuda():
    """Checked before anything touches the device, so CPU-only machines can test it."""
    import torch

    from shadowkv.benchmarks import attention

    for argv in (["--repeats", "19"], ["--warmup", "0"]):
        with pytest.raises(SystemExit, match="at least 20 calls after at least 1 warm-up"):
            attention.run_device(torch.device("cuda"), attention.parse_args(argv))


def test_decode_marks_a_kernel_that_disagrees(monkeypatch, capsys):
    """A kernel that differs from SDPA gets a FAILED row saying why (after the rows timed before it),
    and a run where no kernel agrees ends with that, not a table of wrong results."""
    from shadowkv.benchmarks import decode

    paged = decode.ops.paged_decode_attention
    monkeypatch.setattr(decode.ops, "paged_decode_attention", lambda *a, **kw: paged(*a, **kw) + 1)
    with pytest.raises(SystemExit, match="no paged_decode_attention kernel agreed with SDPA"):
        decode.main(["--device", "cpu", "-B", "2", "--ctx", "40", "--heads", "4", "--kv-heads", "2",
                     "--head-dim", "16", "--page-size", "8", "--reps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "| device copy (read + write) |" in out and "| SDPA, dense gathered K/V |" in out, out
    assert "| paged_decode_attention [auto] | FAILED: RuntimeError: differs from SDPA by 1.000e+00" in out, out


def test_eval_policies_runs_on_a_local_model(tmp_path, monkeypatch, capsys):
    tiny_model(tmp_path / "m", "llama")  # saved with save_pretrained; the script loads it
    out = _run_here("eval_policies.py", ["--init", str(tmp_path / "m"), "--prompts", "4", "--runs",
                                         "snapkv:0.25,snapkv:64"], monkeypatch, capsys)
    assert "| full |" in out and "| snapkv | 0.25 |" in out and "| snapkv | 64 |" in out  # a token budget too


@pytest.mark.parametrize("args, message", [
    (["--runs", "snapkv"], "argument --runs: 'snapkv' is not policy:budget"),
    (["--runs", "snapkv:0.25,foo:0.25"], "argument --runs: unknown policy 'foo'"),
    (["--runs", "snapkv:nan"], "argument --runs: 'snapkv:nan': budget must be tokens >= 1 or a fraction in (0, 1]"),
    (["--prompts", "0"], "argument --prompts: must be an int >= 1"),
])
def test_eval_policies_bad_arguments_are_usage_errors(args, message, monkeypatch, capsys):
    """Each was a traceback, the unknown policy's only after the FullCache evaluation: now a usage
    error before any model loads."""
    import shadowkv.warmup

    def no_model(*a, **kw):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(shadowkv.warmup, "pretrained_policy", no_model)  # the script imports it when it runs
    with pytest.raises(SystemExit) as e:
        _run_here("eval_policies.py", args, monkeypatch, capsys)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_shadowkv_bench_runs_the_packaged_benchmark(monkeypatch, capsys):
    """``shadowkv bench NAME ARGS`` is the script's benchmark, from the installed package, and
    ``python -m shadowkv`` reaches it (a subprocess: the entry point itself)."""
    from shadowkv import cli

    args, expected = SMALL["bench_decode.py"]  # the quickest (bench_rollout.py's took 7 s)
    monkeypatch.setattr(sys, "argv", ["shadowkv"])  # the command sets argv[0] for the usage line
    assert cli.main(["bench", "decode", *args]) == 0
    assert expected in capsys.readouterr().out
    usage = subprocess.run([sys.executable, "-m", "shadowkv", "bench", "evict", "--help"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: shadowkv bench evict")


def test_gpu_session_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_session.sh")], check=True)


@pytest.mark.parametrize("name, args", [
    ("attention", ["--sets", "0"]), ("decode", ["--page-size", "0"]), ("decode", ["-B", "0"]),
    ("evict", ["--every", "0"]), ("rollout", ["--head-dim", "0"]), ("rollout", ["--device", "tpu"]),
    ("replay", ["--head-dim", "48"]), ("replay", ["--new", "0"]),
    # NaN budgets ("cannot convert float NaN to integer"), and a budget wider than L, whose mask
    # was labelled 312%; rollout's --budget was checked only after the FullCache baseline ran
    ("attention", ["--budget", "nan"]), ("attention", ["-L", "32", "--budget", "100"]),
    ("attention", ["-L", "32", "--budget", "0.1"]), ("evict", ["--keep", "nan"]), ("evict", ["--keep", "2"]),
    ("rollout", ["--budget", "nan"]), ("rollout", ["--budget", "1.5"]), ("rollout", ["--budget", "0"]),
    # an odd head dim (--hidden / --heads) failed late, in the attention kernels' shape checks
    ("learner", ["--hidden", "8", "--heads", "8", "--kv-heads", "8"]), ("prefill", ["--hidden", "24", "--heads", "8"]),
    ("learner", ["--hidden", "30", "--heads", "4"]), ("prefill", ["--heads", "3", "--kv-heads", "2"]),
    ("attention", ["--device", "cuda", "--dtype", "float64"]),  # the CUDA kernels refused it mid-run
])
def test_bad_benchmark_arguments_are_usage_errors(name, args, capsys):
    """Each was a traceback from deep inside the run (a division by zero, an empty median)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"shadowkv.benchmarks.{name}").main(args)
    assert e.value.code == 2 and "argument" in capsys.readouterr().err


def test_prefill_chunk_batches_against_one_sequence_a_call(capsys):
    """``bench prefill --chunk``: prompts of 40, 23 and 6 tokens in chunks of 16, two sequences a
    call (the 2-layer default): 2 + 1 + 1 calls, against 3 + 2 + 1 of one sequence each."""
    from shadowkv.benchmarks import prefill

    prefill.main(["--device", "cpu", "-B", "3", "--max-len", "40", "--hidden", "32", "--layers", "2",
                  "--repeats", "1", "--chunk", "16"])
    out = capsys.readouterr().out
    assert "| chunks batched (sampler) | 4 |" in out
    assert "| one sequence a call (baseline) | 6 | 69 (100%) |" in out


def test_attention_budget_is_tokens_or_a_fraction_of_l():
    """``--budget`` reads as everywhere in shadowkv: an int is tokens, a float a fraction of L."""
    from shadowkv.benchmarks import attention

    assert attention.parse_args(["-L", "64", "--budget", "32"]).budget == 32
    assert attention.kept_keys(32, 64, 4) == 32 and attention.kept_keys(0.25, 64, 4) == 16
    assert attention.kept_keys(1.0, 64, 4) == 64
    with pytest.raises(ValueError, match="keeps 100 of the L=32 keys"):
        attention.kept_keys(100, 32, 4)


def test_rollout_takes_a_token_budget(capsys):
    """``--budget 8``: 8 tokens per sequence (a float() parse made every token budget impossible)."""
    from shadowkv.benchmarks import rollout

    rollout.main(["-B", "1", "--prompt", "8", "--new", "8", "--head-dim", "8", "--layers", "1", "--page-size", "4",
                  "--max-fit-batch", "0", "--repeats", "1", "--budget", "8"])
    out = capsys.readouterr().out
    assert " budget=8 " in out and "\nstreaming " in out, out


def test_replay_prints_na_against_a_floor_of_zero(monkeypatch, capsys):
    """In float32 the sampler and the learner can agree to the bit (``--dtype float32 --head-dim
    128 --new 1`` on CPU): FullCache's error, the floor, is then 0 and the ``x floor`` columns say
    n/a instead of dividing by it (a ZeroDivisionError)."""
    import torch

    from shadowkv.benchmarks import replay

    def errors(model, policy, budget, new, seed):  # [3 prompts x new] errors: 0 for FullCache only
        err = torch.full((3 * new,), 0.0 if budget is None else 1e-3)
        return None, err, err

    monkeypatch.setattr(replay, "build_model", lambda *a: None)
    monkeypatch.setattr(replay, "replay_errors", errors)
    replay.main(["--device", "cpu", "--dtype", "float32", "--head-dim", "128", "--new", "1"])
    out = capsys.readouterr().out
    assert "| full | 0.00e+00 | 0.00e+00 | 0.00e+00 | n/a | n/a | 0.00e+00 | 3 |" in out, out
    assert "| snapkv | 1.00e-03 | 1.00e-03 | 1.00e-03 | n/a | n/a | 1.00e-03 | 3 |" in out, out
    assert replay.times_floor(3e-3, 1e-3) == "3.00"
