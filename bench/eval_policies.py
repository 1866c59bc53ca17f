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

from shadowkv.policies import make_policy
from shadowkv.sampler import Sampler
from shadowkv.tasks import EOS
from shadowkv.train import TrainConfig, rewards_of, task_of
from shadowkv.warmup import pretrained_policy

RUNS = "snapkv:0.25,snapkv:0.125,snapkv:0.0625,h2o:0.25,random:0.25,random:0.5,streaming:0.25,streaming:0.5"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=RUNS, help=f"policy:budget pairs (default {RUNS})")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--init", help="a local Hugging Face causal LM folder instead of the default warm-up model "
                                  "(evaluated on the default task settings)")
    args = p.parse_args()

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
    for run in ["full:-", *args.runs.split(",")]:
        name, budget = run.split(":")
        sampler = Sampler(model, make_policy(name), None if budget == "-" else float(budget),
                          page_size=cfg.page_size, max_batch=args.prompts)
        r = sampler.generate(prompts, task.max_answer_len, temperature=0.0, seed=0, eos_token_id=EOS)
        reward = rewards_of(task, r, answers).mean().item()
        print(f"| {name} | {budget} | {reward:.3f} | {r.kv_peak_bytes / r.dense_kv_bytes:.3f} |", flush=True)


if __name__ == "__main__":
    main()
