"""The RL job end to end on a tiny configuration: run folder, resume, on-policy replay."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from shadowkv import learner
from shadowkv.train import TrainConfig, read_metrics, train
from shadowkv.warmup import ModelConfig, SFTConfig

TIMING = {"tokens_per_s"}


@pytest.fixture(autouse=True)
def _model_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SHADOWKV_CACHE", str(tmp_path_factory.getbasetemp() / "shadowkv-cache"))


def _cfg(method: str, **kw) -> TrainConfig:
    base = dict(task="kv-lookup", prompt_len=40, method=method, policy="streaming", budget=0.25, page_size=4,
                steps=4, prompts_per_step=2, group_size=3, epochs=2, lr=1e-3, eval_prompts=4, ckpt_every=2,
                model=ModelConfig(hidden=32, layers=2, heads=2, kv_heads=1), sft=SFTConfig(steps=5, batch=4))
    base.update(kw)
    return TrainConfig(**base)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_run_folder_and_resume_replays_identically(tmp_path):
    full = tmp_path / "full"
    summary = train(_cfg("smd"), full, progress=False)
    for name in ("config.json", "metrics.jsonl", "curves.png", "summary.json", "LATEST"):
        assert (full / name).exists(), name
    assert (full / (full / "LATEST").read_text().strip() / "config.json").exists()
    assert summary["steps_done"] == 4 and 0.0 <= summary["eval_reward"] <= 1.0

    part = tmp_path / "part"
    train(_cfg("smd"), part, progress=False, max_steps_this_run=3)  # "killed" after step 2
    with open(part / "metrics.jsonl", "a") as f:  # a half-written step the checkpoint never saw
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")
    train(_cfg("smd", lr=123.0), part, resume=True, progress=False)  # config comes from the run folder
    assert _strip(read_metrics(part)) == _strip(read_metrics(full))


def test_resume_with_more_steps_extends_a_finished_run(tmp_path):
    train(_cfg("smd", steps=2), tmp_path / "short", progress=False)
    summary = train(_cfg("smd", steps=2), tmp_path / "short", resume=True, progress=False, overrides={"steps": 3})
    assert summary["steps_done"] == 3 and "eval_reward" in summary
    assert json.loads((tmp_path / "short" / "config.json").read_text())["steps"] == 3
    train(_cfg("smd", steps=3), tmp_path / "long", progress=False)
    assert _strip(read_metrics(tmp_path / "short")) == _strip(read_metrics(tmp_path / "long"))


def test_a_run_folder_is_never_trusted_blindly(tmp_path, capsys):
    """Each case used to go through silently (or with a traceback after the warm-up)."""
    from shadowkv.cli import main
    from shadowkv.train import _RunLock

    with pytest.raises(SystemExit) as e:  # nothing to resume: not a fresh run that wipes the folder
        main(["train", "--out", str(tmp_path / "none"), "--resume", "--quiet"])
    assert e.value.code == 2 and "does not exist, so there is no run to resume" in capsys.readouterr().err

    run = tmp_path / "run"
    train(_cfg("smd", steps=3), run, progress=False, max_steps_this_run=2)  # stopped after step 1
    assert not (run / "summary.json").exists()
    (run / "summary.json").write_text('{"stale": true}')  # a finished earlier run's summary
    train(_cfg("smd", steps=3, seed=1), run, progress=False, max_steps_this_run=2)  # new settings, stopped again
    assert not (run / "summary.json").exists()  # compare would have reused the stale one

    (run / ".tmp-9").mkdir()  # a checkpoint write a kill interrupted, and an older checkpoint
    (run / ".tmp-8").write_text('{"half": ')  # a write_text a kill interrupted
    (run / "ckpt-0").mkdir()
    with _RunLock(run), pytest.raises(ValueError, match="in use by another shadowkv run"):
        train(_cfg("smd"), run, resume=True, progress=False)

    train(_cfg("smd", steps=3, seed=1), run, resume=True, progress=False)  # finishes; cleans up leftovers
    assert not (run / ".tmp-9").exists() and not (run / ".tmp-8").exists() and not (run / "ckpt-0").exists()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[1:]) + "\n")  # step 0 lost
    with pytest.raises(ValueError, match=r"does not hold steps 0\.\.2"):
        train(_cfg("smd"), run, resume=True, progress=False)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    for bad in ('{"reward": 1.0}', "[1]", '{"step": true}'):  # KeyError / TypeError tracebacks before
        (run / "metrics.jsonl").write_text("\n".join([bad, *rows[1:]]) + "\n")
        with pytest.raises(ValueError, match="line 1 is not a metrics row"):
            train(_cfg("smd"), run, resume=True, progress=False)
    latest = (run / "LATEST").read_text()
    (run / "LATEST").write_text("ckpt-99")  # from_pretrained took the missing folder for a Hub repo id
    with pytest.raises(ValueError, match="ckpt-99, which is not a ckpt-\\* folder of this run"):
        train(_cfg("smd"), run, resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ckpt-3").mkdir()  # another run's: loaded, then deleted by the next save
    (run / "LATEST").write_text("../other/ckpt-3")
    with pytest.raises(ValueError, match="which is not a ckpt-\\* folder of this run"):
        train(_cfg("smd"), run, resume=True, progress=False)
    (run / "LATEST").write_text(latest)
    config_text = (run / "config.json").read_text()
    (run / "config.json").write_bytes(b"\xff{")  # not UTF-8: the message named no file
    with pytest.raises(ValueError, match="config.json cannot be read"):
        train(_cfg("smd"), run, resume=True, progress=False)
    (run / "config.json").unlink()
    (run / "config.json").mkdir()  # IsADirectoryError before
    with pytest.raises(ValueError, match="config.json cannot be read"):
        train(_cfg("smd"), run, resume=True, progress=False)
    (run / "config.json").rmdir()
    (run / "config.json").write_text(config_text)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    with pytest.raises(ValueError, match="temperature"):
        train(_cfg("smd"), run, resume=True, progress=False)


def test_budget_1_is_not_budget_1_0(tmp_path):
    """--budget 1 (one token) and --budget 1.0 (the whole sequence) are equal as numbers: a
    resume accepted one for the other, and compare reused the other's finished run."""
    import numpy as np

    from shadowkv.compare import _saved_steps
    from shadowkv.train import _resumed_config

    (tmp_path / "config.json").write_text(json.dumps(asdict(_cfg("smd", budget=1.0))))
    assert _resumed_config(tmp_path, {"budget": 1.0})[1] is False
    with pytest.raises(ValueError, match=r"budget=1\.0"):
        _resumed_config(tmp_path, {"budget": 1})
    assert _saved_steps(tmp_path / "config.json", _cfg("smd", budget=1.0)) == 4
    assert _saved_steps(tmp_path / "config.json", _cfg("smd", budget=1)) is None
    assert _resumed_config(tmp_path, {"budget": np.float32(1.0)})[1] is False  # a fraction, as budget_tokens reads it
    assert _saved_steps(tmp_path / "config.json", _cfg("smd", budget=1.0, lr=1)) is None  # lr 1e-3 saved
    with pytest.raises(ValueError, match=r"budget \(--budget\): must be a token count"):
        _cfg("smd", budget=None).check()  # budget_tokens' "no eviction": a hand-edited null ran dense


def test_an_unwritable_run_folder_is_a_message(tmp_path):
    """The lock file's open() failing (a read-only folder; here .lock is a folder) was a traceback."""
    from shadowkv.train import _RunLock

    (tmp_path / ".lock").mkdir()
    with pytest.raises(ValueError, match="cannot create its lock file .lock"):
        with _RunLock(tmp_path):
            pass


def test_atomic_writes_leave_no_temporary_on_failure(tmp_path, monkeypatch):
    """A failed write (ENOSPC) left its .tmp-* beside the file."""
    import os

    from shadowkv import atomic

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(tmp_path / "LATEST", "ckpt-1")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="No space"):  # a checkpoint file's write-back error
        atomic.write_dir(tmp_path / "ckpt-1", lambda folder: (folder / "model.safetensors").write_text("w"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    atomic.write_text(tmp_path / "LATEST", "ckpt-1")
    assert (tmp_path / "LATEST").read_text() == "ckpt-1" and len(list(tmp_path.iterdir())) == 1


def test_plot_is_written_atomically(tmp_path, monkeypatch):
    """curves.png was saved in place: a kill while matplotlib wrote it left a truncated PNG."""
    import os

    from shadowkv.train import plot_curves

    rows = [{"step": s, "reward": 0.5, "kv_ratio": 0.3, "mismatch_abs": 1e-9} for s in range(3)]
    plot_curves({"smd": rows}, tmp_path / "curves.png", "t")
    before = (tmp_path / "curves.png").read_bytes()
    assert before.startswith(b"\x89PNG")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        plot_curves({"smd": rows[:2]}, tmp_path / "curves.png", "t")
    assert (tmp_path / "curves.png").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_resume_refuses_settings_that_change_the_run(tmp_path, capsys):
    from shadowkv.cli import main

    train(_cfg("smd", steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="task='kv-lookup'.*only --steps, --device and --micro-batch"):
        train(_cfg("smd"), tmp_path, resume=True, progress=False, overrides={"task": "copy", "steps": 1})
    with pytest.raises(ValueError, match="sft_steps=5"):
        train(_cfg("smd"), tmp_path, resume=True, progress=False, overrides={"sft_steps": 9})
    with pytest.raises(ValueError, match="can only extend"):
        train(_cfg("smd"), tmp_path, resume=True, progress=False, overrides={"steps": 0})
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path), "--resume", "--task", "chain", "--quiet"])
    assert e.value.code == 2 and "task='kv-lookup'" in capsys.readouterr().err


def test_device_auto_runs_where_it_can_and_may_change_on_resume(tmp_path):
    """--device auto takes the GPU when there is one (else the CPU); a resume may move a run to
    another device (the run's settings are otherwise fixed)."""
    from shadowkv.train import cuda_runs_here

    train(_cfg("smd", steps=2), tmp_path / "a", progress=False)
    summary = train(_cfg("smd"), tmp_path / "a", resume=True, progress=False,
                    overrides={"steps": 3, "device": "auto"})
    assert summary["device"] == ("cuda" if cuda_runs_here() else "cpu") and summary["steps_done"] == 3
    assert json.loads((tmp_path / "a" / "config.json").read_text())["device"] == "auto"
    if not cuda_runs_here():  # the same numbers as a 3-step CPU run
        train(_cfg("smd", steps=3), tmp_path / "b", progress=False)
        assert _strip(read_metrics(tmp_path / "a")) == _strip(read_metrics(tmp_path / "b"))
    # A run saved for a GPU resumes on a machine without one when told where to go.
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    if not cuda_runs_here():
        with pytest.raises(ValueError, match="device .--device. cuda: torch sees no CUDA device"):
            train(_cfg("smd"), tmp_path / "a", resume=True, progress=False, overrides={"steps": 4})
    summary = train(_cfg("smd"), tmp_path / "a", resume=True, progress=False, overrides={"steps": 4, "device": "cpu"})
    assert summary["device"] == "cpu" and summary["steps_done"] == 4


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    from shadowkv.cli import main
    from shadowkv.train import cuda_runs_here

    if cuda_runs_here():
        pytest.skip("this machine can run --device cuda")
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--device", "cuda", "--quiet"])
    assert e.value.code == 2 and "device (--device) cuda:" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ValueError, match="device .--device. must be 'cpu', 'cuda' or 'auto'"):
        _cfg("smd", device="tpu").check()


def test_bfloat16_mixed_precision_trains_from_a_synced_rollout_copy(tmp_path):
    """--dtype bfloat16: rollouts from a bfloat16 copy of the weights, the learner under autocast,
    float32 master weights; the copy follows every update, so the learner stays on-policy up to
    bfloat16 rounding."""
    from shadowkv.train import rollout_model, sync_rollout_model

    summary = train(_cfg("smd", dtype="bfloat16"), tmp_path / "bf16", progress=False)
    # A learner that does not replay the mask (naive) is ~1.3e-2 off here, the replay ~5e-4.
    assert summary["steps_done"] == 4 and summary["mismatch_abs"] < 2e-3
    master = torch.nn.Linear(4, 4)
    copy = rollout_model(_cfg("smd", dtype="bfloat16"), master)
    assert copy is not master and copy.weight.dtype == torch.bfloat16 and not copy.weight.requires_grad
    with torch.no_grad():
        master.weight.add_(1.0)
    sync_rollout_model(copy, master)
    assert torch.equal(copy.weight, master.weight.detach().to(torch.bfloat16))
    assert rollout_model(_cfg("smd"), master) is master
    with pytest.raises(ValueError, match="dtype .--dtype. must be 'float32' or 'bfloat16'"):
        _cfg("smd", dtype="float16").check()


def test_bfloat16_rollout_copy_keeps_float32_buffers_and_value_head_works_in_float32(tmp_path):
    """The copy's .to(bfloat16) also rounded RoPE's inv_freq, so the sampler rotated keys by
    other angles than the learner (whose RoPE runs in float32 under autocast); and the PPO value
    head under autocast gave bfloat16 values, and GAE bfloat16 advantages."""
    from shadowkv.train import rollout_model

    from .models import tiny_model

    model = tiny_model(tmp_path / "llama", "llama")
    copy = rollout_model(_cfg("smd", dtype="bfloat16"), model)
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and all(torch.equal(b, buffers[name]) and b.dtype == buffers[name].dtype
                           for name, b in copy.named_buffers())
    head = learner.ValueHead(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(torch.randn(2, 5, 8))
    assert values.dtype == torch.float32


def test_device_cuda_needs_a_build_for_the_gpu_and_known_kernel_names(monkeypatch):
    """A build without the GPU's arch passed the check (and `auto` chose the GPU), and a bad
    kernel variable too: both failed at the first op, after the warm-up."""
    from shadowkv import _C, info, train as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setattr(_C, "built_with_cuda", lambda: True)
    monkeypatch.setattr(info, "built_archs", lambda: ["90a"])
    assert not train_mod.cuda_runs_here() and train_mod.device_of(_cfg("smd", device="auto")).type == "cpu"
    with pytest.raises(ValueError, match=r"device .--device. cuda: the GPU is sm_89, but this build has kernels "
                                         r"for \['90a'\] only \(rebuild with SHADOWKV_CUDA_ARCHS=8.9\)"):
        _cfg("smd", device="cuda").check()
    monkeypatch.setattr(info, "built_archs", lambda: ["90a", "80"])
    assert train_mod.cuda_runs_here()
    monkeypatch.setenv("SHADOWKV_DECODE_KERNEL", "mma_row")
    for device in ("cuda", "auto"):
        with pytest.raises(ValueError, match="SHADOWKV_DECODE_KERNEL=mma_row: must be one of auto, warp, "):
            _cfg("smd", device=device).check()
    _cfg("smd", device="cpu").check()  # the CPU kernels do not read it


def test_configs_written_before_value_len_resume_as_one_token_values():
    old = {k: v for k, v in asdict(_cfg("smd")).items() if k != "value_len"}
    assert TrainConfig.from_dict(old).value_len == 1
    # An --init saved as typed (before it was saved resolved) reads as the folder it named from here.
    assert TrainConfig.from_dict({**old, "init": "models/m"}).init == str(Path("models/m").resolve())
    # Other tasks have no values: they take the default, which check() (run on every resume) requires.
    old_copy = {**old, "task": "copy"}
    TrainConfig.from_dict(old_copy).check()


def test_bad_value_len_is_a_clear_error(tmp_path, capsys):
    from shadowkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--value-len", "0", "--quiet"])
    assert e.value.code == 2 and "--value-len must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "temperature (--temperature) must be > 0"),  # the learner divides logits by it
    (["--temperature", "nan"], "temperature (--temperature) must be a finite number"),
    (["--page-size", "0"], "page_size (--page-size) must be an int >= 1"),
    (["--epochs", "0"], "epochs (--epochs) must be an int >= 1"),
    (["--group-size", "0"], "group_size (--group-size) must be an int >= 1"),
    (["--group-size", "1"], "group_size (--group-size) must be at least 2 with --algo grpo"),
    (["--evict-every", "0"], "evict_every (--evict-every) must be an int >= 1 (or unset)"),
    (["--prefill-chunk", "0"], "prefill_chunk (--prefill-chunk) must be an int >= 1 (or unset)"),
    (["--lr", "-1"], "lr (--lr) must be > 0"),
    (["--gamma", "2"], "gamma (--gamma) must be in [0, 1]"),
    (["--is-reject-low", "2"], "is_reject_high (--is-reject-high) must be >= is_reject_low"),
    (["--sft-steps", "0"], "sft_steps (--sft-steps) must be an int >= 1"),
    (["--prompt-len", "0"], "prompt_len (--prompt-len) must be an int in [8, 4032]"),
    # copy's answer is as long as its prompt: 3000 + 2997 tokens passed the 4032 bound.
    (["--task", "copy", "--prompt-len", "3000"], "prompt plus answer must fit the model's 4096 positions"),
    (["--init", "/nonexistent/model"], "init (--init) must be a local model folder"),
    (["--eval-prompts", "0"], "eval_prompts (--eval-prompts) must be an int >= 1"),
    (["--seed", str(2**64)], "seed (--seed) must be an int in [-2**63, 2**64)"),  # it wiped a run folder first
])
def test_bad_settings_fail_before_the_warm_up(tmp_path, capsys, flags, message):
    """Each names its flag, exits 2 and leaves no run folder behind (nothing was trained)."""
    from shadowkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), *flags, "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(tmp_path / "cmp"), *flags, "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("methods", ["smd,smd", "smd,bogus", ""])
def test_compare_methods_must_be_distinct_known_names(tmp_path, capsys, methods):
    from shadowkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(tmp_path), "--methods", methods, "--quiet"])
    assert e.value.code == 2 and "methods (--methods) must be distinct names" in capsys.readouterr().err


def test_demo_checks_its_arguments_and_accepts_a_whole_budget(capsys):
    from shadowkv.cli import main

    assert main(["demo", "--budget", "1.0", "--length", "64"]) == 0  # nothing evicted: dense == shadow
    assert "nothing evicted" in capsys.readouterr().out
    for flags, message in ((["--length", "0"], "--length"), (["--budget", "0"], "--budget")):
        with pytest.raises(SystemExit) as e:
            main(["demo", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_smd_learner_is_on_policy_and_naive_is_not(tmp_path):
    smd = train(_cfg("smd", steps=2), tmp_path / "smd", progress=False)
    naive = train(_cfg("naive", steps=2), tmp_path / "naive", progress=False)
    rows_smd, rows_naive = read_metrics(tmp_path / "smd"), read_metrics(tmp_path / "naive")
    print("first-epoch mismatch smd", [r["mismatch_abs"] for r in rows_smd],
          "naive", [r["mismatch_abs"] for r in rows_naive])
    assert max(r["mismatch_abs"] for r in rows_smd) <= 1e-4
    assert min(r["mismatch_abs"] for r in rows_naive) > 1e-3
    assert smd["kv_ratio"] < 1.0 and naive["kv_ratio"] < 1.0


@pytest.mark.parametrize("method", ["dense", "is"])
def test_other_methods_run(tmp_path, method):
    s = train(_cfg(method, steps=2), tmp_path / method, progress=False)
    rows = read_metrics(tmp_path / method)
    assert len(rows) == 2 and all(0.0 <= r["reward"] <= 1.0 for r in rows)
    if method == "dense":
        assert s["kv_ratio"] > 1.0  # FullCache: whole pages + positions + log
        assert max(r["mismatch_abs"] for r in rows) <= 1e-4


def test_evict_every_and_prefill_chunk_reach_the_sampler(tmp_path, monkeypatch):
    """DESIGN §6's Sparse-RL baseline evicts on a fixed schedule (after the prompt, then every
    N decode steps): --evict-every reaches the sampler; so does --prefill-chunk, and both are
    saved with the run."""
    import shadowkv.train as T

    seen, original = [], T.make_sampler

    def make_sampler(cfg, model, dense):
        sampler = original(cfg, model, dense)
        seen.append((dense, sampler.evict_every, sampler.prefill_chunk))
        return sampler

    monkeypatch.setattr(T, "make_sampler", make_sampler)
    train(_cfg("is", steps=1, evict_every=3, prefill_chunk=8), tmp_path / "run", progress=False)
    assert (False, 3, 8) in seen
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["evict_every"] == 3 and saved["prefill_chunk"] == 8


def test_ppo_with_value_head_runs_and_resumes(tmp_path):
    full = tmp_path / "full"
    train(_cfg("smd", algo="ppo", steps=3), full, progress=False)
    rows = read_metrics(full)
    assert len(rows) == 3 and all("value_loss" in r for r in rows)
    part = tmp_path / "part"
    train(_cfg("smd", algo="ppo", steps=3), part, progress=False, max_steps_this_run=2)
    train(_cfg("smd", algo="ppo", steps=3), part, resume=True, progress=False)
    assert _strip(read_metrics(part)) == _strip(rows)  # value head and optimiser restored


def test_gae_matches_a_hand_computation():
    mask = torch.tensor([[False, True, True, False]])
    values = torch.tensor([[0.0, 0.5, 0.25, 9.0]])
    adv, ret = learner.gae(torch.tensor([1.0]), values, mask, gamma=1.0, lam=0.5)
    # last action: delta = 1 - 0.25; first: delta = 0.25 - 0.5, plus 0.5 * 0.75
    assert torch.allclose(adv, torch.tensor([[0.0, -0.25 + 0.375, 0.75, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.625, 1.0, 0.0]]))


def test_grpo_advantages_are_group_normalised():
    adv = learner.grpo_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0]), atol=1e-4)


@pytest.mark.parametrize("group_size", [4, 7, 8, 9, 11, 12, 16])
@pytest.mark.parametrize("reward", [1 / 3, 2 / 3, 4 / 5, 0.1])
def test_grpo_advantages_are_zero_for_a_group_of_equal_rewards(group_size, reward):
    """The float32 mean of equal rewards (kv-lookup's thirds) can be a rounding step off: over a
    std of ~1e-8 + eps that gave the whole group an advantage of 0.03-0.11."""
    rewards = torch.tensor([reward] * group_size + [0.0, 1.0] * (group_size // 2) + [0.5] * (group_size % 2))
    adv = learner.grpo_advantages(rewards, group_size)
    assert adv.dtype == torch.float32 and (adv[:group_size] == 0).all()
    assert abs(adv[group_size:].std(unbiased=False).item() - 1) < 1e-3


def test_is_weights_follow_sparse_rl_rules():
    mask = torch.ones(3, 4, dtype=torch.bool)
    sampler = torch.zeros(3, 4)
    dense = torch.log(torch.tensor([[1.0, 1.2, 2.0, 0.4],     # 2.0 and 0.4 rejected
                                    [1.0, 1.0, 1e-5, 1.0],    # vetoed (r < 1e-4)
                                    [1.5, 0.5, 1.0, 1.0]]))   # bounds are inclusive
    w, keep = learner.is_weights(dense, sampler, mask, learner.ISConfig())
    assert keep.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert torch.isclose(w.mean(), torch.tensor(1.0))  # normalised over every valid token
    raw = torch.tensor([[1.0, 1.2, 1.5, 0.4], [1.0, 1.0, 1e-5, 1.0], [1.5, 0.5, 1.0, 1.0]])  # min(r, 1.5)
    assert torch.allclose(w, raw / raw.mean(), atol=1e-5)


def test_is_veto_zero_turns_the_veto_off():
    """--is-veto 0 passes the config check and vetoes nothing (it was log(0) in is_weights)."""
    _cfg("is", is_veto=0.0).check()
    mask = torch.ones(2, 3, dtype=torch.bool)
    dense = torch.log(torch.tensor([[1.0, 1e-30, 1.0], [1.0, 0.0, 1.0]]))  # r tiny, and r = 0 exactly
    _, keep = learner.is_weights(dense, torch.zeros(2, 3), mask, learner.ISConfig(veto=0.0))
    assert keep.tolist() == [[True, False, True]] * 2  # only the rejected tokens leave
    _, keep = learner.is_weights(dense, torch.zeros(2, 3), mask, learner.ISConfig())
    assert not keep.any()  # the default veto drops both sequences


def test_learner_settings_are_checked_when_given():
    with pytest.raises(ValueError, match="smd_direction must be 'forward' or 'reverse', got 'fwd'"):
        learner.LossConfig(smd_direction="fwd")
    for name, bad, sign in (("temperature", 0.0, ">"), ("clip", -1.0, ">"), ("kl_ref", -0.1, ">="),
                            ("smd_beta", float("nan"), ">="), ("vf_coef", float("inf"), ">=")):
        with pytest.raises(ValueError, match=f"LossConfig: {name} must be a finite number {sign} 0"):
            learner.LossConfig(**{name: bad})
    with pytest.raises(ValueError, match=re.escape("rewards must be [N] with N a multiple of group_size (2), got "
                                                   "shape (5,)")):
        learner.grpo_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1, got 0"):
        learner.grpo_advantages(torch.ones(4), 0)


def test_distill_kl_is_zero_for_identical_logits_and_positive_otherwise():
    from types import SimpleNamespace

    logits = torch.randn(2, 5, 7)
    r = SimpleNamespace(action_mask=torch.ones(2, 6, dtype=torch.bool))
    assert learner.distill_kl(logits, logits, r).abs().max() < 1e-6
    for direction in ("forward", "reverse"):
        assert (learner.distill_kl(logits, logits + torch.randn(2, 5, 7), r, direction)[:, 1:] > 0).all()


def test_distill_kl_pairs_the_rows_of_a_packed_and_a_padded_replay(tmp_path):
    """A packed replay lists its rows in slot order, a padded one row-major: distill_kl pairs
    them by (sequence, token), so the same weights and mask give 0, and rows of another
    rollout are refused."""
    from shadowkv import Sampler
    from shadowkv.policies import StreamingLLM

    from .models import VOCAB, tiny_model

    model = tiny_model(tmp_path, "llama")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 30, 14)]
    r = Sampler(model, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(prompts, 10, seed=0)
    packed, padded = (learner.replay_rows(model, r, "dense", pack=p) for p in (True, False))
    assert not torch.equal(packed.b, padded.b)  # other orders
    for direction in ("forward", "reverse"):
        assert learner.distill_kl(packed, padded, r, direction).abs().max() < 1e-5
    other = learner.replay_rows(model, r.rows(slice(0, 2)), "dense")
    with pytest.raises(ValueError, match="different rows"):
        learner.distill_kl(other, padded, r)


def test_distill_kl_is_the_kl_of_the_tempered_policies():
    """At a temperature the sampler draws from softmax(logits / T): the SMD term is that
    policy's KL (it was the raw logits' at every temperature)."""
    from types import SimpleNamespace

    t, s = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    r = SimpleNamespace(action_mask=torch.ones(2, 5, dtype=torch.bool))
    for temperature in (0.5, 1.0, 2.0):
        pt, ps = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
        forward = (pt * (pt.log() - ps.log())).sum(-1)
        reverse = (ps * (ps.log() - pt.log())).sum(-1)
        assert torch.allclose(learner.distill_kl(t, s, r, "forward", temperature), forward)
        assert torch.allclose(learner.distill_kl(t, s, r, "reverse", temperature), reverse)


def test_smd_teacher_has_the_students_weights_in_every_epoch(tmp_path, monkeypatch):
    """DESIGN §6: teacher = same weights, dense mask. It was computed once per step, so from
    the second epoch on it held the weights before the last update."""
    calls, original = [], learner.policy_loss

    def policy_loss(model, rollout, *args, **kwargs):
        teacher = args[5]  # advantages, old_logp, cfg, weights, keep, teacher
        was_training = model.training
        model.eval()
        with torch.no_grad():
            fresh = learner.replay_rows(model, rollout, "dense")
        model.train(was_training)
        calls.append((teacher.logits - fresh.logits).abs().max().item())
        return original(model, rollout, *args, **kwargs)

    monkeypatch.setattr(learner, "policy_loss", policy_loss)
    train(_cfg("smd", steps=1, epochs=3, lr=1e-2), tmp_path / "run", progress=False)
    assert len(calls) == 3 and max(calls) < 1e-5, calls


@pytest.mark.parametrize("method, algo, kl_ref, task", [("smd", "grpo", 0.0, "kv-lookup"), ("is", "ppo", 0.05, "kv-lookup"),
                                                        ("naive", "grpo", 0.0, "kv-lookup"), ("smd", "ppo", 0.05, "copy")])
def test_micro_batches_give_the_whole_batchs_update(tmp_path, monkeypatch, method, algo, kl_ref, task):
    """--micro-batch changes memory, not the step: the loss, stats and weights after a step
    match the whole batch's (6 rollouts in micro-batches of 4 and 2: unequal parts, each
    normalised by the whole batch's token counts), with the IS weights, PPO values and
    reference log-probs also computed by micro-batch."""
    from shadowkv.train import load_checkpoint

    runs, packed = {}, []
    pack = learner._Packing
    monkeypatch.setattr(learner, "_Packing", lambda *a: packed.append(1) or pack(*a))
    # copy: answers of up to 13 tokens at temperature 1.5, so sequences end apart and replays pack.
    extra = dict(task="copy", temperature=1.5, prompt_len=16) if task == "copy" else {}
    for micro in (None, 4):
        out = tmp_path / f"run-{micro}"
        train(_cfg(method, algo=algo, kl_ref=kl_ref, steps=1, epochs=2, lr=1e-2, micro_batch=micro, **extra), out,
              progress=False)
        runs[micro] = (read_metrics(out)[0], load_checkpoint(out)[0])
    assert (len(packed) > 0) == (task == "copy")
    (whole, model), (parts, model_mb) = runs[None], runs[4]
    assert whole.keys() == parts.keys()
    for k in whole.keys() - TIMING - {"step"}:
        assert parts[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
    # Adam divides by the gradients' size: where they are ~0 their rounding shows in the update
    # (the updates here are up to 2e-2, two epochs at lr 1e-2). With transformers 4.56's int
    # logits_to_keep the two runs compute different row counts: lm_head then differs by 3.7e-5.
    for (name, a), b in zip(model.named_parameters(), model_mb.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_micro_batches_cut_the_padding_and_add_up_to_the_batch(tmp_path, monkeypatch, pack):
    """Micro-batches end after their longest sequence; their losses, gradients and log-probs add
    up to the whole batch's (SMD with its teacher, per-token advantages), whether the replays
    run packed or padded."""
    from shadowkv import Sampler
    from shadowkv.policies import StreamingLLM

    from .models import VOCAB, tiny_model

    replay = learner.replay_rows
    monkeypatch.setattr(learner, "replay_rows", lambda *a, **kw: replay(*a, **kw, pack=pack))
    model = tiny_model(tmp_path, "llama")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 30, 14, 25, 5)]
    r = Sampler(model, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(prompts, 10, seed=0)
    B, T = r.tokens.shape
    parts = learner.micro_batches(r, 2)
    assert [(p.rows, p.cols) for p in parts] == [(slice(0, 2), 40), (slice(2, 4), 35), (slice(4, 5), 15)]
    assert T == 40 and learner.micro_batches(r, None) == [learner.MicroBatch(slice(0, 5), 40)]

    cfg = learner.LossConfig(method="smd", smd_beta=0.5)
    adv = torch.randn(B, T, generator=g) * r.action_mask
    old = r.logprobs + 0.1 * torch.randn(B, T, generator=g) * r.action_mask
    with torch.no_grad():
        teacher = learner.replay_rows(model, r, "dense")
    loss, stats = learner.policy_loss(model, r, adv, old, cfg, teacher_logits=teacher)
    want = torch.autograd.grad(loss, list(model.parameters()))
    counts = learner.loss_counts(r)
    total, got, logps, sums = 0.0, [torch.zeros_like(w) for w in want], [], {}
    for p in parts:
        part = r.rows(p.rows, p.cols)
        assert part.tokens.shape == (p.rows.stop - p.rows.start, p.cols)
        with torch.no_grad():
            t = learner.replay_rows(model, part, "dense")
        part_loss, part_stats = learner.policy_loss(model, part, p.take(adv), p.take(old), cfg, teacher_logits=t,
                                                    counts=counts)
        total += part_loss.item()
        got = [a + b for a, b in zip(got, torch.autograd.grad(part_loss, list(model.parameters())))]
        logps.append(part_stats["logp"])
        for k in ("clip_frac", "distill_kl"):
            sums[k] = sums.get(k, 0.0) + part_stats[k]
    assert total == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for k in ("clip_frac", "distill_kl"):
        assert sums[k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(learner.gather_rows(logps, T), stats["logp"], atol=1e-5, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_micro_batch_may_change_on_resume(tmp_path):
    train(_cfg("smd", steps=1), tmp_path / "run", progress=False)
    summary = train(_cfg("smd", steps=1), tmp_path / "run", resume=True, progress=False,
                    overrides={"steps": 2, "micro_batch": 1})
    assert summary["steps_done"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["micro_batch"] == 1


def test_is_vetoed_sequences_get_no_value_loss_either(tmp_path):
    """DESIGN §6: a vetoed sequence gets no gradient at all. Under PPO the value head reads the
    policy's hidden states, so its loss over vetoed tokens (the action mask's) moved the policy
    too."""
    from shadowkv import Sampler
    from shadowkv.policies import StreamingLLM

    from .models import tiny_model

    model = tiny_model(tmp_path / "llama")
    rollout = Sampler(model, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(
        [[1, 2, 3, 4, 5, 6, 7, 8]] * 2, max_new_tokens=6, temperature=1.0, seed=0)
    head = learner.ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight)  # values far from the returns
    mask = rollout.action_mask
    vetoed = torch.zeros_like(mask)  # is_weights' keep mask when every sequence is vetoed
    loss, stats = learner.policy_loss(model, rollout, torch.zeros(2), rollout.logprobs, learner.LossConfig("is"),
                                      torch.ones(mask.shape), vetoed, value_head=head,
                                      returns=torch.ones(mask.shape) * mask)
    loss.backward()
    assert loss.item() == 0.0 and stats["value_loss"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_clip_frac_and_reference_kl_at_extreme_ratios(tmp_path):
    """clip_frac counts the tokens whose clipped branch binds (TRL's and verl's stat; it counted
    every ratio out of range, about twice as many), and the k3 reference KL stays finite with
    the right sign of gradient where ref_logp - logp is far past float32's exp (it was inf, and
    clip_grad_norm_ made the weights NaN)."""
    from shadowkv import Sampler
    from shadowkv.policies import StreamingLLM

    from .models import tiny_model

    model = tiny_model(tmp_path / "llama")
    rollout = Sampler(model, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(
        [[1, 2, 3, 4, 5, 6, 7, 8]] * 2, max_new_tokens=6, temperature=1.0, seed=0)
    mask = rollout.action_mask
    # ratio = e^(logp - old) = e^-shift: e^0.5 (above 1 + clip) at every third token, e^-0.5
    # (below 1 - clip) at the others. The clipped branch binds for (high, A > 0) and (low, A < 0)
    # only: with advantages 1 and 0, at the first sequence's every third token.
    shift = torch.where(torch.arange(mask.shape[1]) % 3 == 0, -0.5, 0.5)
    with torch.no_grad():
        logp = learner.token_logprobs(model, rollout, "shadow")
    old = (logp + shift) * mask
    adv = torch.tensor([1.0, 0.0])
    cfg = learner.LossConfig("smd", clip=0.2, kl_ref=0.1, smd_beta=0.0)
    ref = (logp + 100.0) * mask  # every token 100 nats likelier under the reference
    loss, stats = learner.policy_loss(model, rollout, adv, old, cfg, ref_logp=ref)
    binding = (shift < 0) & mask[0]
    want = binding.sum().item() / mask.sum().item()
    assert 0 < binding.sum() < (mask[0] & (shift > 0)).sum()  # neither the inverse nor every clip passes
    assert stats["clip_frac"] == pytest.approx(want)
    assert math.isfinite(loss.item()) and math.isfinite(stats["kl_ref"])
    # Past the cap the penalty's slope is e^20 in d = ref - logp: raising logp lowers it.
    d = 100.0
    assert stats["kl_ref"] == pytest.approx(math.exp(20) * (1 + d - 20) - d - 1, rel=1e-4)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_policy_loss_treats_old_logprobs_advantages_and_weights_as_constants(tmp_path):
    """old_logp computed with grad on (token_logprobs outside no_grad) made the ratio's gradient
    cancel exactly at the first epoch: the policy gradient was silently 0."""
    from shadowkv import Sampler
    from shadowkv.policies import StreamingLLM

    from .models import tiny_model

    model = tiny_model(tmp_path / "llama")
    rollout = Sampler(model, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(
        [[1, 2, 3, 4, 5, 6, 7, 8]] * 2, max_new_tokens=6, temperature=1.0, seed=0)
    cfg = learner.LossConfig("is")
    adv = torch.tensor([1.0, -0.5])
    grads = []
    for with_grad in (False, True):
        with torch.set_grad_enabled(with_grad):
            old = learner.token_logprobs(model, rollout, "dense")
            weights = torch.ones_like(old) + 0 * old.sum()  # a graph through the weights too
        loss, _ = learner.policy_loss(model, rollout, adv, old, cfg, weights)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    norm = sum(g.square().sum() for g in grads[0]).sqrt()
    assert norm > 1e-3
    assert all(torch.allclose(a, b, atol=1e-6 * norm) for a, b in zip(*grads))


def test_dropout_is_turned_off_for_the_learner(tmp_path):
    """A model with attention dropout trained in training mode: shadowkv's attention refuses
    dropout, so an --init model with attention_dropout > 0 failed at the first learner step (a
    traceback, after the run folder was reset); with the dropout left on, the learner's
    log-probs would not be the sampler's (eval mode) anyway."""
    from shadowkv.cli import main

    from .models import tiny_model

    model = tiny_model(tmp_path / "model", hidden=32, heads=2, kv_heads=1, layers=1, attention_dropout=0.1)
    assert learner.disable_dropout(model) == 1 and learner.disable_dropout(model) == 0
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    run = tmp_path / "run"
    assert main(["train", *_cli_run(str(tmp_path / "model"), run)]) == 0 and (run / "summary.json").exists()


def test_compare_table_and_reuse(tmp_path):
    from shadowkv.compare import compare

    cfg = _cfg("smd", steps=2)
    table = compare(cfg, tmp_path, seeds=1, methods=("naive", "smd"), progress=False)
    assert "naive" in table and "smd" in table and (tmp_path / "compare.png").exists()
    stamp = (tmp_path / "smd-s0" / "summary.json").stat().st_mtime_ns
    assert compare(cfg, tmp_path, seeds=1, methods=("naive", "smd"), progress=False) == table
    assert (tmp_path / "smd-s0" / "summary.json").stat().st_mtime_ns == stamp  # reused, not retrained
    compare(_cfg("smd", steps=3, lr=2e-3), tmp_path, seeds=1, methods=("smd",), progress=False)
    assert len(read_metrics(tmp_path / "smd-s0")) == 3  # other settings: trained again


def test_compare_extends_shorter_runs(tmp_path, monkeypatch):
    """More --steps extended each finished run, as `train --resume --steps` does, instead of
    training it again from step 0 (twice the time for --steps 80 after 40); fewer start over."""
    from shadowkv import compare as C

    C.compare(_cfg("smd", steps=2), tmp_path, seeds=1, methods=("smd",), progress=False)
    rows = read_metrics(tmp_path / "smd-s0")
    calls, original = [], C.train
    monkeypatch.setattr(C, "train", lambda *a, **k: calls.append(k) or original(*a, **k))
    C.compare(_cfg("smd", steps=3), tmp_path, seeds=1, methods=("smd",), progress=False)
    assert calls[-1]["resume"] and calls[-1]["overrides"]["steps"] == 3
    extended = read_metrics(tmp_path / "smd-s0")
    assert len(extended) == 3 and _strip(extended[:2]) == _strip(rows)
    assert json.loads((tmp_path / "smd-s0" / "config.json").read_text())["steps"] == 3
    C.compare(_cfg("smd", steps=2), tmp_path, seeds=1, methods=("smd",), progress=False)
    assert not calls[-1]["resume"] and _strip(read_metrics(tmp_path / "smd-s0")) == _strip(rows)
    (tmp_path / "smd-s0" / "summary.json").write_text("{")  # damaged: a traceback before
    n = len(calls)
    C.compare(_cfg("smd", steps=2), tmp_path, seeds=1, methods=("smd",), progress=False)
    assert len(calls) == n + 1 and calls[-1]["resume"]  # resumed: no step left, evaluated again
    assert "eval_reward" in json.loads((tmp_path / "smd-s0" / "summary.json").read_text())


def test_compare_reuses_and_resumes_runs_that_differ_only_in_micro_batch(tmp_path, monkeypatch):
    """--micro-batch (and --device) do not change what a run computes: compare reuses a finished
    run and resumes an interrupted one, with the new value, instead of training it from scratch;
    and a folder written before micro_batch existed is the same run."""
    from shadowkv import compare as C

    cfg = _cfg("naive", steps=2)
    C.compare(cfg, tmp_path, seeds=1, methods=("naive",), progress=False)
    saved = tmp_path / "naive-s0" / "config.json"
    old = json.loads(saved.read_text())
    del old["micro_batch"]  # as written before the field existed
    saved.write_text(json.dumps(old))
    calls, original = [], C.train
    monkeypatch.setattr(C, "train", lambda *a, **k: calls.append(k) or original(*a, **k))
    C.compare(_cfg("naive", steps=2, micro_batch=2), tmp_path, seeds=1, methods=("naive",), progress=False)
    assert calls == []  # finished: reused
    (tmp_path / "naive-s0" / "summary.json").unlink()  # as if interrupted after its last checkpoint
    C.compare(_cfg("naive", steps=2, micro_batch=2), tmp_path, seeds=1, methods=("naive",), progress=False)
    assert len(calls) == 1 and calls[0]["resume"] and calls[0]["overrides"]["micro_batch"] == 2
    assert json.loads(saved.read_text())["micro_batch"] == 2
    assert len(read_metrics(tmp_path / "naive-s0")) == 2


def _tiny_init(path):
    """A random tiny Llama (tests.models) for CLI runs: --init skips the warm-up."""
    from tests.models import tiny_model

    tiny_model(path, hidden=32, heads=2, kv_heads=1, layers=1)
    return str(path)


def _cli_run(init, out, *flags) -> list[str]:
    return ["--init", init, "--prompt-len", "24", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--epochs", "1", "--eval-prompts", "2", "--quiet", "--out", str(out), *flags]


def _ctrl_c_at(monkeypatch, when) -> list[tuple]:
    """Patches rl_step to press Ctrl-C once during the step ``(method, seed, step)`` ``when``
    returns True for; returns the steps run."""
    import os
    import signal

    import shadowkv.train as T

    calls, original = [], T.rl_step

    def rl_step(cfg, task, model, ref_model, opt, sampler, step, value_head=None):
        calls.append((cfg.method, cfg.seed, step))
        if when(cfg.method, cfg.seed, step):
            os.kill(os.getpid(), signal.SIGINT)
        return original(cfg, task, model, ref_model, opt, sampler, step, value_head)

    monkeypatch.setattr(T, "rl_step", rl_step)
    return calls


def test_ctrl_c_stops_train_with_exit_130_and_resume_finishes(tmp_path, monkeypatch, capsys):
    """It used to exit 0 with no summary.json, as if the run had finished."""
    from shadowkv.cli import main

    init, run = _tiny_init(tmp_path / "model"), tmp_path / "run"
    _ctrl_c_at(monkeypatch, lambda method, seed, step: step == 0)
    with pytest.raises(SystemExit) as e:
        main(["train", *_cli_run(init, run)])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert not (run / "summary.json").exists() and [r["step"] for r in read_metrics(run)] == [0]
    monkeypatch.undo()
    assert main(["train", *_cli_run(init, run, "--resume")]) == 0 and (run / "summary.json").exists()


def test_ctrl_c_on_the_last_step_stops_compare_which_uses_seed(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run's last step used to be ignored (the run was evaluated, so compare
    took it as finished); --seed used to be ignored (seeds 0..N-1)."""
    from shadowkv.cli import main

    init, out = _tiny_init(tmp_path / "model"), tmp_path / "cmp"
    args = ["compare", *_cli_run(init, out, "--seed", "3", "--seeds", "1", "--methods", "naive,smd")]
    calls = _ctrl_c_at(monkeypatch, lambda method, seed, step: (method, seed, step) == ("naive", 3, 1))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 130 and calls == [("naive", 3, 0), ("naive", 3, 1)]
    assert not (out / "naive-s3" / "summary.json").exists()  # stopped: not evaluated
    calls.clear()
    assert main(args) == 0  # resumes: the stopped run only needs its evaluation
    assert calls == [("smd", 3, 0), ("smd", 3, 1)] and "seeds=3..3" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["naive-s3", "smd-s3"]
    assert json.loads((out / "naive-s3" / "summary.json").read_text())["stopped"] is False


def test_a_refused_run_leaves_the_folder_as_it_was(tmp_path, capsys):
    """Every check runs before the folder changes: a finished run's summary.json and checkpoint
    used to be deleted by a fresh run refused later (bad --value-len, or an --init whose
    vocabulary is too small, which failed after the warm-up naming no flag)."""
    from transformers import LlamaConfig

    from shadowkv.cli import main

    run = tmp_path / "run"
    train(_cfg("smd", steps=1), run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path / "small")
    (tmp_path / "empty").mkdir()
    from transformers import GPT2Config

    from tests.models import tiny_model

    GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "short")
    tiny_model(tmp_path / "capped", "gemma2", hidden=32, heads=2, kv_heads=1, layers=1)  # logit soft-capping
    tiny_model(tmp_path / "weightless", hidden=32, heads=2, kv_heads=1, layers=1)
    (tmp_path / "weightless" / "model.safetensors").unlink()
    tiny_model(tmp_path / "garbled", hidden=32, heads=2, kv_heads=1, layers=1)
    (tmp_path / "garbled" / "model.safetensors").write_bytes(b"not a safetensors file")
    for flags, message in ((["--value-len", "0"], "--value-len must be >= 1"),
                           (["--task", "copy", "--value-len", "3"], "only --task kv-lookup has values"),
                           (["--temperature", "1e-300"], "temperature (--temperature) must be at least 1.4e-45"),
                           (["--init", str(tmp_path / "small")], "vocabulary has 16 tokens, but --task kv-lookup"),
                           (["--init", str(tmp_path / "short")], "the model has 64 positions, but --task kv-lookup"),
                           (["--init", str(tmp_path / "capped")], "final logit soft-capping"),
                           (["--init", str(tmp_path / "weightless")], "the model cannot be loaded"),
                           (["--init", str(tmp_path / "garbled")], "the model cannot be loaded"),
                           (["--init", str(tmp_path / "empty")], "init (--init) ")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(run), *flags, "--quiet"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="only --steps, --device and --micro-batch"):
        train(_cfg("smd"), run, resume=True, progress=False, overrides={"task": "copy"})
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert (run / "LATEST").read_text() == "ckpt-0" and (run / "ckpt-0").is_dir()


def test_prompts_per_step_times_group_size_is_one_sampler_batch(capsys):
    from shadowkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--prompts-per-step", "2049", "--group-size", "2", "--quiet"])
    assert e.value.code == 2 and "--prompts-per-step 2049 x --group-size 2 = 4098" in capsys.readouterr().err
    _cfg("smd", prompts_per_step=1024, group_size=4).check()


def test_evaluation_runs_in_batches_the_sampler_takes(tmp_path, monkeypatch):
    """--eval-prompts above the sampler's max_batch used to crash the final evaluation."""
    import shadowkv.train as T
    from shadowkv.sampler import Sampler
    from tests.models import tiny_model

    cfg = _cfg("smd", eval_prompts=5)
    task, model = T.task_of(cfg), tiny_model(tmp_path / "m", hidden=32, heads=2, kv_heads=1, layers=1)
    whole = T.evaluate(cfg, task, model)
    batches, generate = [], Sampler.generate

    def counted(self, prompts, *args, **kwargs):
        batches.append(len(prompts))
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", counted)
    monkeypatch.setattr(T, "MAX_BATCH", 2)
    assert T.evaluate(cfg, task, model) == whole and batches == [2, 2, 1]


def test_train_runs_in_a_thread_without_a_ctrl_c_handler(tmp_path):
    """signal.signal raised ValueError outside the main thread."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(train(_cfg("smd", steps=1), tmp_path, progress=False)))
    thread.start()
    thread.join()
    assert result["steps_done"] == 1 and result["stopped"] is False


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_line(tmp_path):
    run = tmp_path / "run"
    train(_cfg("smd", steps=3), run, progress=False, max_steps_this_run=1)
    with open(run / "metrics.jsonl", "a") as f:  # a kill while step 1's row was written
        f.write('{"step": 1, "reward": 0.0, "kv_pe')
    assert train(_cfg("smd"), run, resume=True, progress=False)["steps_done"] == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:-1], lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON"):
        read_metrics(str(run))  # a str path is fine too


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_run_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """mkstemp/mkdtemp made every run file 0600 and every checkpoint 0700 (and safetensors made
    model.safetensors 0600 inside them)."""
    import os

    from shadowkv.atomic import write_dir, write_text

    old = os.umask(umask)
    try:
        write_text(tmp_path / "f.json", "{}")

        def fill(folder):
            (folder / "x").write_text("x")
            (folder / "private").touch(mode=0o600)  # as safetensors' save_file creates its file
            (folder / "sub").mkdir()
            (folder / "sub" / "y").write_text("y")

        write_dir(tmp_path / "d", fill)
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode
    for name in ("x", "private", "sub/y"):
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == file_mode


def test_gpu_covered_by_arch_kind():
    from shadowkv.info import gpu_covered

    assert gpu_covered(9, 0, ["90a"]) and not gpu_covered(9, 1, ["90a"])  # arch-specific: exact
    assert gpu_covered(10, 3, ["100f"]) and not gpu_covered(10, 0, ["103f"])  # family: same major, newer minor
    assert not gpu_covered(12, 0, ["100f"]) and not gpu_covered(10, 3, ["100a"])
    assert gpu_covered(8, 6, ["80"]) and not gpu_covered(9, 0, ["80"])


def test_info_says_what_is_wrong_and_still_prints_the_rest(monkeypatch):
    """A bad SHADOWKV_CPU_ISA made `info` print only the error; a bad kernel name was not
    flagged; and a build without CUDA kernels on a GPU machine was told to change its arch list."""
    import types

    import shadowkv.info as info

    monkeypatch.setenv("SHADOWKV_CPU_ISA", "bogus")
    monkeypatch.setenv("SHADOWKV_DECODE_KERNEL", "fastest")
    monkeypatch.setenv("SHADOWKV_ATTENTION_KERNEL", "")  # empty is auto
    lines = info.info_lines()
    assert lines[0].startswith("shadowkv ") and any(line.startswith("built archs:") for line in lines)
    assert any(line.startswith("CPU kernels: error:") and "SHADOWKV_CPU_ISA" in line for line in lines)
    assert any(line.startswith("SHADOWKV_DECODE_KERNEL='fastest': not a kernel name") for line in lines)
    assert not any(line.startswith("SHADOWKV_ATTENTION_KERNEL") for line in lines)

    real = info._C
    cpu_only = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("__")})
    cpu_only.built_with_cuda, cpu_only.cuda_archs = (lambda: False), (lambda: "")
    monkeypatch.setattr(info, "_C", cpu_only)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "H100")
    gpu = [line for line in info.info_lines() if line.startswith("GPU 0")]
    assert gpu == ["GPU 0: H100 sm_90 -> NOT covered: this build has no CUDA kernels (rebuild with SHADOWKV_CUDA=ON "
                   "and nvcc on PATH)"]


def test_a_damaged_warm_up_folder_is_replaced(tmp_path, monkeypatch):
    """A cached warm-up folder without config.json (write_dir never leaves one; a hand-deleted
    file does) was kept as "another run's": every run retrained and then failed to load it."""
    from shadowkv import warmup
    from shadowkv.tasks import make_task

    monkeypatch.setenv("SHADOWKV_CACHE", str(tmp_path))
    task, model_cfg, sft_cfg = make_task("copy", length=12), ModelConfig(hidden=16, layers=1, heads=2, kv_heads=1), \
        SFTConfig(steps=2, batch=2)
    first = warmup.pretrained_policy(task, model_cfg, sft_cfg)
    (folder,) = warmup.cache_root().iterdir()
    (folder / "config.json").unlink()
    again = warmup.pretrained_policy(task, model_cfg, sft_cfg)
    assert (folder / "config.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_a_resume_trains_its_checkpoint_without_the_initial_model(tmp_path, monkeypatch):
    """On a machine without the model cache a resume re-ran the whole warm-up, then dropped its
    result for the checkpoint's weights (they are needed only as the KL reference)."""
    import shadowkv.train as T

    run = tmp_path / "run"
    train(_cfg("smd", steps=2), run, progress=False, max_steps_this_run=1)
    monkeypatch.setattr(T, "pretrained_policy", lambda *a, **k: pytest.fail("the warm-up ran on resume"))
    assert train(_cfg("smd", steps=2), run, resume=True, progress=False)["steps_done"] == 2


def test_init_is_saved_as_an_absolute_path(tmp_path, monkeypatch):
    """A relative --init was saved as typed: a resume from another directory could not find it,
    and the same folder spelled another way was refused as a changed setting."""
    from shadowkv.cli import main

    _tiny_init(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", *_cli_run("model", run, "--steps", "1")]) == 0
    assert json.loads((run / "config.json").read_text())["init"] == str(tmp_path / "model")
    monkeypatch.chdir(run)
    assert main(["train", *_cli_run("../model", run, "--steps", "2", "--resume")]) == 0


def test_a_diverged_update_is_an_error_naming_the_learning_rate(tmp_path, capsys):
    from shadowkv.cli import main

    init = _tiny_init(tmp_path / "model")
    for steps in ("3", "1"):  # the last step's update: caught before its checkpoint, not by the evaluation
        run = tmp_path / f"run{steps}"
        with pytest.raises(SystemExit) as e:
            main(["train", *_cli_run(init, run, "--steps", steps, "--lr", "1e30", "--epochs", "2")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "step 0's update diverged" in err and "lower --lr (now 1e+30)" in err, err
        assert not (run / "LATEST").exists()  # no checkpoint of non-finite weights


def test_the_position_limit_applies_to_learned_position_tables_only(tmp_path):
    """GPT-2's n_positions is a table that ends there; a RoPE model's max_position_embeddings is
    not a limit (it runs longer sequences), so only the first is refused."""
    from transformers import GPT2Config, LlamaConfig

    from shadowkv.train import check_init_model, task_of

    GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32).save_pretrained(tmp_path / "llama")
    cfg = _cfg("smd", init=str(tmp_path / "llama"))
    check_init_model(cfg, task_of(cfg))
    cfg = _cfg("smd", init=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="the model has 32 positions"):
        check_init_model(cfg, task_of(cfg))
