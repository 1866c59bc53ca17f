"""What eviction costs a model before any RL: greedy task reward per policy and budget.

Loads the default warmed-up policy of ``shadowkv train`` (trained once and cached, or
``--init PATH``), samples held-out prompts of the training task, and decodes them greedily with
FullCache and with each ``policy:budget`` pair, printing the mean exact-match reward and the
sampler's KV peak over the dense K/V bytes.

    python bench/eval_policies.py
    python bench/eval_policies.py --runs snapkv:0.25,h2o:0.25 --prompts 256 --init runs/x/ckpt-39
"""

from __future__ import annotations

import argparse

import torch

from shadowkv.benchmarks import at_least, kv_budget
from shadowkv.policies import POLICIES, make_policy
from shadowkv.sampler import Sampler
from shadowkv.tasks import EOS
from shadowkv.train import TrainConfig, rewards_of, task_of
from shadowkv.warmup import pretrained_policy

RUNS = "snapkv:0.25,snapkv:0.125,snapkv:0.0625,h2o:0.25,random:0.25,random:0.5,streaming:0.25,streaming:0.5"


def parse_runs(text: str) -> list[tuple[str, str, int | float]]:
    """An argparse type: ``policy:budget,...`` as ``[(policy, budget as typed, budget)]``, the
    budget in tokens (``64``) or a fraction (``0.25``), as ``kv_budget`` reads it. All pairs are
    checked at parse time, before the model loads and FullCache's evaluation runs."""
    runs = []
    for run in text.split(","):
        name, sep, budget = run.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{run!r} is not policy:budget (e.g. snapkv:0.25 or snapkv:64)")
        if name not in POLICIES:
            raise argparse.ArgumentTypeError(f"unknown policy {name!r} in {run!r}; choose from {sorted(POLICIES)}")
        try:
            runs.append((name, budget, kv_budget(budget)))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{run!r}: {e}") from None
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=parse_runs, default=parse_runs(RUNS),
                   help=f"policy:budget pairs, budgets in tokens (64) or fractions (0.25) (default {RUNS})")
    p.add_argument("--prompts", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--init", help="a local Hugging Face causal LM folder instead of the default warm-up model "
                                  "(evaluated on the default task settings)")
    args = p.parse_args(argv)

    cfg = TrainConfig()
    task = task_of(cfg)
    if args.init:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).eval()
    else:
        model = pretrained_policy(task, cfg.model, cfg.sft)
    prompts, answers = task.sample(args.prompts, torch.Generator().manual_seed(args.seed))
    print(f"{task} · {args.prompts} prompts · page {cfg.page_size} · greedy")
    print("| policy | budget | greedy reward | KV peak / dense |\n| --- | --- | --- | --- |")
    for name, budget, value in [("full", "-", None), *args.runs]:
        sampler = Sampler(model, make_policy(name), value, page_size=cfg.page_size, max_batch=args.prompts)
        r = sampler.generate(prompts, task.max_answer_len, temperature=0.0, seed=0, eos_token_id=EOS)
        reward = rewards_of(task, r, answers).mean().item()
        print(f"| {name} | {budget} | {reward:.3f} | {r.kv_peak_bytes / r.dense_kv_bytes:.3f} |", flush=True)


if __name__ == "__main__":
    main()
