"""The benchmark scripts (and ``shadowkv bench``) run end to end on tiny CPU shapes.

They are what a rare GPU session runs (bench/gpu_session.sh); a script that broke since the
last one would waste that session's device time. Here each runs once on CPU at a shape that
takes seconds, and must print its table. Timings are not checked: benchmarks, not tests.
"""

from __future__ import annotations

import os
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
    "profile_attention.py": (["--device", "cpu", "-L", "96", "-D", "16", "--q-heads", "4", "--kv-heads", "2",
                              "-B", "1"], "profile_attention: auto, mask 25%"),
}


def _run(script: str, args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


@pytest.mark.parametrize("script", list(SMALL))
def test_bench_script_runs_on_cpu(script):
    args, expected = SMALL[script]
    out = _run(script, args)
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


def test_eval_policies_runs_on_a_local_model(tmp_path):
    tiny_model(tmp_path / "m", "llama")  # saved with save_pretrained; the script loads it
    out = _run("eval_policies.py", ["--init", str(tmp_path / "m"), "--prompts", "4", "--runs", "snapkv:0.25"])
    assert "| full |" in out and "| snapkv | 0.25 |" in out


def test_shadowkv_bench_runs_the_packaged_benchmark():
    """``shadowkv bench NAME ARGS`` is the script's benchmark, from the installed package."""
    args, expected = SMALL["bench_rollout.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "shadowkv", "bench", "rollout", *args], capture_output=True,
                         text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expected in res.stdout
    usage = subprocess.run([sys.executable, "-m", "shadowkv", "bench", "evict", "--help"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: shadowkv bench evict")


def test_gpu_session_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_session.sh")], check=True)


@pytest.mark.parametrize("name, args", [
    ("attention", ["--sets", "0"]), ("decode", ["--page-size", "0"]), ("decode", ["-B", "0"]),
    ("evict", ["--every", "0"]), ("rollout", ["--head-dim", "0"]), ("rollout", ["--device", "tpu"]),
    ("replay", ["--head-dim", "48"]), ("replay", ["--new", "0"]),
])
def test_bad_benchmark_arguments_are_usage_errors(name, args, capsys):
    """Each was a traceback from deep inside the run (a division by zero, an empty median)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"shadowkv.benchmarks.{name}").main(args)
    assert e.value.code == 2 and "argument" in capsys.readouterr().err
