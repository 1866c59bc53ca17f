"""Sampler prefill of prompts of different lengths: packed end to end vs right-padded.

It times ``Sampler.generate(prompts, 1)`` (the prefill, its per-layer eviction, one sampled
token) for one batch of distinct prompts, with ``pack_prompts`` on (the default: a call whose
prompts differ in length runs them end to end in fewer rows, positions restarting per prompt)
and off (every prompt right-padded to its call's longest, the baseline measured in the same
run). The table gives each way's prefill calls and the token slots the model ran (rows x
each call's longest prompt), with the share of them that are prompt tokens. The model is a
random Llama built here (never downloaded); prompt lengths are spread evenly from
``--max-len`` down to ``--min-frac`` of it, in a shuffled order.

    shadowkv bench prefill                                   # CPU, float32
    shadowkv bench prefill --device cuda --dtype bfloat16 --max-len 4096 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse

import torch

from shadowkv.packing import first_fit_decreasing
from shadowkv.policies import make_policy
from shadowkv.sampler import Sampler
from . import at_least, random_llama


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-B", "--batch", type=at_least(1), default=16)
    p.add_argument("--max-len", type=at_least(1), default=1024, help="the longest prompt (default 1024)")
    p.add_argument("--min-frac", type=float, default=0.15, help="the shortest, as a fraction of --max-len")
    p.add_argument("--policy", default="snapkv", help="eviction policy by name (default snapkv)")
    p.add_argument("--budget", type=float, default=0.25, help="kept fraction of each prompt (default 0.25)")
    p.add_argument("--prefill-tokens", type=at_least(1), default=None,
                   help="the sampler's prefill_tokens (default: its own, num_layers x the longest prompt)")
    random_llama.add_options(p)
    args = p.parse_args(argv)
    if not 0 < args.min_frac <= 1 or not 0 < args.budget <= 1:
        p.error("--min-frac and --budget must be in (0, 1]")
    try:
        policy = make_policy(args.policy)
    except ValueError as e:
        p.error(f"argument --policy: {e}")
    model, device = random_llama.build(p, args, args.max_len)
    g = torch.Generator().manual_seed(args.seed)
    lens = random_llama.spread_lengths(args.max_len, max(1, round(args.min_frac * args.max_len)), args.batch, g)
    prompts = [torch.randint(1, args.vocab, (int(n),), generator=g) for n in lens]
    lens = lens.tolist()

    table, rows = {}, {}
    for pack in (True, False):
        s = Sampler(model, policy, budget=args.budget, max_batch=args.batch, prefill_tokens=args.prefill_tokens,
                    pack_prompts=pack)
        groups = [[lens[i] for i in grp] for grp in s._prefill_groups(lens)]
        # token slots the model runs, real or padding: rows x the call's longest prompt
        rows[pack] = sum((first_fit_decreasing(grp, max(grp))[2] if pack else len(grp)) * max(grp) for grp in groups)
        rows[(pack, "calls")] = len(groups)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        table[pack] = random_llama.timed(lambda: s.generate(prompts, 1, seed=0), args.repeats, device)
        if device == "cuda":
            table[(pack, "peak")] = torch.cuda.max_memory_allocated() / 2**30

    real = sum(lens) / (args.batch * args.max_len)
    print(f"{device} {args.dtype}: Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads; {args.batch} prompts of {min(lens)}-{max(lens)} tokens ({real:.0%} of a padded batch is real), "
          f"{args.policy} at {args.budget:.0%}; generate(prompts, 1), median of {args.repeats}")
    cols = ["prefill", "calls", "slots (real)", "s", "vs padded"] + (["peak GiB"] if device == "cuda" else [])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for pack, name in ((True, "packed (sampler)"), (False, "right-padded (baseline)")):
        mem = f" {table[(pack, 'peak')]:.2f} |" if device == "cuda" else ""
        print(f"| {name} | {rows[(pack, 'calls')]} | {rows[pack]} ({sum(lens) / rows[pack]:.0%}) | {table[pack]:.3f} | "
              f"{table[False] / table[pack]:.2f}x |{mem}")


if __name__ == "__main__":
    main()
