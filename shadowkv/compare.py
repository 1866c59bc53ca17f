"""``shadowkv compare``: the four methods on the same seeds, one table and one figure."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from .train import TrainConfig, read_metrics, train


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def compare(base: TrainConfig, out: Path, seeds: int = 3, methods=("dense", "naive", "is", "smd"),
            progress: bool = True) -> str:
    """Trains every method for every seed under ``out/<method>-s<seed>`` (finished runs are
    reused), writes ``compare.json`` and ``compare.png``, returns the table as text."""
    out = Path(out)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):
        for method in methods:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.seed = method, seed
            run = out / f"{method}-s{seed}"
            done = run / "summary.json"
            summary = json.loads(done.read_text()) if done.exists() else train(cfg, run, resume=True, progress=progress)
            summary["rows"] = read_metrics(run)
            if summary["rows"]:  # a run stopped before its first step has nothing to report
                results[method].append(summary)
    results = {m: runs for m, runs in results.items() if runs}
    lines = [
        f"task={base.task} policy={base.policy} budget={base.budget} steps={base.steps} seeds={seeds}",
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
    (out / "compare.json").write_text(json.dumps(
        {m: [{k: v for k, v in r.items() if k != "rows"} for r in runs] for m, runs in results.items()}, indent=2))
    (out / "compare.txt").write_text(table + "\n")
    _plot(results, out / "compare.png", lines[0])
    return table


def _plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for method, runs in results.items():
        steps = [r["step"] for r in runs[0]["rows"]]
        n = min(len(r["rows"]) for r in runs)
        reward = [statistics.fmean(r["rows"][i]["reward"] for r in runs) for i in range(n)]
        mism = [statistics.fmean(max(r["rows"][i]["mismatch_abs"], 1e-9) for r in runs) for i in range(n)]
        ax[0].plot(steps[:n], reward, label=method)
        ax[1].semilogy(steps[:n], mism, label=method)
    ax[0].set(title="reward (mean over seeds)", xlabel="step", ylim=(0, 1))
    ax[1].set(title="sampler/learner mean |Δlogp|", xlabel="step")
    ax[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
