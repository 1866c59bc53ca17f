"""``shadowkv compare``: the four methods on the same seeds, one table and one figure."""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from .atomic import write_text
from .learner import METHODS
from .train import TrainConfig, plot_curves, read_metrics, same_budget, train


def _mean_std(xs: list[float]) -> str:
    """Mean ± sample standard deviation: the seeds are a sample of the runs one could get (the
    population one understates the spread of 2-3 seeds), 0 for a single seed."""
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def compare(base: TrainConfig, out: Path, seeds: int = 3, methods=("dense", "naive", "is", "smd"),
            progress: bool = True) -> str:
    """Trains every method for every seed ``base.seed .. base.seed + seeds - 1`` under
    ``out/<method>-s<seed>`` (finished runs with the same settings are reused, interrupted ones
    resumed, shorter ones extended to ``base.steps`` as ``train --resume --steps`` does),
    writes ``compare.json`` and ``compare.png``, returns the table as text. A run stopped by
    Ctrl-C stops the comparison (``KeyboardInterrupt``)."""
    out = Path(out)
    if base.init is not None:  # as train() saves it, so that a finished run's settings compare equal
        base = replace(base, init=str(Path(base.init).resolve()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"methods (--methods) must be distinct names from {', '.join(METHODS)}, got "
                         f"{','.join(methods)!r}")
    for method in methods:  # every run's settings are good before the first one trains
        cfg = copy.deepcopy(base)
        cfg.method = method
        cfg.check()
    if seeds < 1:
        raise ValueError(f"seeds (--seeds) must be >= 1, got {seeds}")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(base.seed, base.seed + seeds):
        for method in methods:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.seed = method, seed
            run = out / f"{method}-s{seed}"
            done = run / "summary.json"
            saved_steps = _saved_steps(run / "config.json", cfg)
            summary = _read_summary(done) if saved_steps == cfg.steps else None
            if summary is None:  # resume an interrupted or shorter run; other settings start over
                resume = saved_steps is not None and saved_steps <= cfg.steps
                summary = train(cfg, run, resume=resume, progress=progress,
                                overrides={k: getattr(cfg, k) for k in (*_FREE_ON_RESUME, "steps")} if resume else None)
                if summary["stopped"]:  # Ctrl-C stopped the run: so is the comparison
                    raise KeyboardInterrupt
            summary["rows"] = read_metrics(run)
            if summary["rows"]:  # a run stopped before its first step has nothing to report
                results[method].append(summary)
    results = {m: runs for m, runs in results.items() if runs}
    lines = [
        f"task={base.task} policy={base.policy} budget={base.budget} steps={base.steps} "
        f"seeds={base.seed}..{base.seed + seeds - 1}",
        f"{'method':8s} {'final train reward':>20s} {'eval reward (greedy)':>22s} {'KV peak/dense':>14s} "
        f"{'mean|Δlogp| s/l':>16s}",
    ]
    for method, runs in results.items():
        lines.append(
            f"{method:8s} {_mean_std([r['final_train_reward'] for r in runs]):>20s} "
            f"{_mean_std([r['eval_reward'] for r in runs if 'eval_reward' in r]):>22s} "
            f"{max(r['kv_ratio'] for r in runs):>14.3f} {statistics.fmean(r['mismatch_abs'] for r in runs):>16.2e}"
        )
    table = "\n".join(lines)
    write_text(out / "compare.json", json.dumps(
        {m: [{k: v for k, v in r.items() if k != "rows"} for r in runs] for m, runs in results.items()}, indent=2))
    write_text(out / "compare.txt", table + "\n")
    plot_curves({m: _mean_rows(runs) for m, runs in results.items()}, out / "compare.png", lines[0] + " (mean over seeds)")
    return table


# Settings that do not change what a run computes up to float rounding (how the learner splits
# its batch), or that only change which random draws it makes (where it runs: sampling is
# reproducible per seed and device type): a folder that differs only in them is the same run,
# reused or resumed with them.
_FREE_ON_RESUME = ("device", "micro_batch")


def _read_summary(done: Path) -> dict | None:
    """A finished run's ``summary.json``, or None when there is none or it cannot be read (the
    run is then resumed: it has no step left to run, and evaluates again)."""
    try:
        summary = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _saved_steps(saved: Path, cfg: TrainConfig) -> int | None:
    """The ``steps`` of the run whose ``config.json`` is ``saved``, if it holds ``cfg``'s other
    settings, read as a resume reads it (fields added since it was written take their defaults)
    and up to ``_FREE_ON_RESUME``; else None (no run, a damaged config, other settings)."""
    if not saved.exists():
        return None
    try:
        old = TrainConfig.from_dict(json.loads(saved.read_text()))
    except (ValueError, TypeError, AttributeError, OSError):  # a damaged config.json: that run starts over
        return None

    def settings(c: TrainConfig) -> dict:  # through JSON, as saved (a tuple reads back as a list)
        d = json.loads(json.dumps(asdict(c)))
        return {k: v for k, v in d.items() if k not in (*_FREE_ON_RESUME, "steps")}

    # --budget 1 (one token) and 1.0 (all of them) are equal numbers, not the same run.
    same = settings(old) == settings(cfg) and same_budget(old.budget, cfg.budget)
    return old.steps if same and isinstance(old.steps, int) and not isinstance(old.steps, bool) else None


def _mean_rows(runs: list[dict]) -> list[dict]:
    """Per-step mean over seeds of the plotted metrics (steps every seed reached)."""
    n = min(len(r["rows"]) for r in runs)
    keys = ("reward", "kv_ratio", "mismatch_abs")
    return [{"step": runs[0]["rows"][i]["step"], **{k: statistics.fmean(r["rows"][i][k] for r in runs) for k in keys}}
            for i in range(n)]
