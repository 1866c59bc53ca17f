"""Sampler prefill of prompts of different lengths: packed end to end vs right-padded, or
chunked with the sequences at a position batched vs one sequence a call.

It times ``Sampler.generate(prompts, 1)`` (the prefill, its per-layer eviction, one sampled
token) for one batch of distinct prompts, with ``pack_prompts`` on (the default: a call whose
prompts differ in length runs them end to end in fewer rows, positions restarting per prompt)
and off (every prompt right-padded to its call's longest, the baseline measured in the same
run). With ``--chunk N`` the sampler prefills in chunks of N tokens instead (``prefill_chunk``),
the chunks that start at the same position in one call, against one sequence a call
(``prefill_tokens=1``: the sampler's calls before, now in position order) as the baseline. The table gives each
way's model calls and the token slots they ran (rows x width), with the share of them that are
prompt tokens. The model is a random Llama built here (never downloaded); prompt lengths are
spread evenly from ``--max-len`` down to ``--min-frac`` of it, in a shuffled order.

    shadowkv bench prefill                                   # CPU, float32
    shadowkv bench prefill --chunk 256
    shadowkv bench prefill --device cuda --dtype bfloat16 --max-len 4096 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse

import torch

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
                   help="the sampler's prefill_tokens (default: its own, num_layers x the longest prompt, or "
                        "with --chunk num_layers sequences' survivors and chunk)")
    p.add_argument("--chunk", type=at_least(1), default=None,
                   help="prefill in chunks of this many tokens (prefill_chunk): batched vs one sequence a call")
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

    if args.chunk is None:
        ways = (("packed (sampler)", dict(pack_prompts=True, prefill_tokens=args.prefill_tokens)),
                ("right-padded (baseline)", dict(pack_prompts=False, prefill_tokens=args.prefill_tokens)))
    else:
        ways = (("chunks batched (sampler)", dict(prefill_chunk=args.chunk, prefill_tokens=args.prefill_tokens)),
                ("one sequence a call (baseline)", dict(prefill_chunk=args.chunk, prefill_tokens=1)))
    table = {}
    for name, kwargs in ways:
        s = Sampler(model, policy, budget=args.budget, max_batch=args.batch, **kwargs)
        shapes, real = [], s._forward_last  # the model calls of the prefill, as they ran
        s._forward_last = lambda ids, *a, real=real, shapes=shapes: shapes.append(ids.shape) or real(ids, *a)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = random_llama.timed(lambda: s.generate(prompts, 1, seed=0), args.repeats, device)
        calls = shapes[: len(shapes) // (args.repeats + 1)]  # one generate's
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        table[name] = (len(calls), sum(n * w for n, w in calls), seconds, peak)

    real = sum(lens) / (args.batch * args.max_len)
    how = "packed vs right-padded" if args.chunk is None else f"chunks of {args.chunk}"
    print(f"{device} {args.dtype}: Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads; {args.batch} prompts of {min(lens)}-{max(lens)} tokens ({real:.0%} of a padded batch is real), "
          f"{args.policy} at {args.budget:.0%}; {how}; generate(prompts, 1), median of {args.repeats}")
    cols = ["prefill", "calls", "slots (real)", "s", "vs baseline"] + (["peak GiB"] if device == "cuda" else [])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    base = table[ways[1][0]][2]
    for name, (calls, slots, seconds, peak) in table.items():
        mem = "" if peak is None else f" {peak:.2f} |"
        print(f"| {name} | {calls} | {slots} ({sum(lens) / slots:.0%}) | {seconds:.3f} | {base / seconds:.2f}x |{mem}")


if __name__ == "__main__":
    main()
