"""The ``shadowkv`` command: ``info`` and ``train`` (more subcommands land with the learner)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import info_lines

    print("\n".join(info_lines()))
    return 0


def _cmd_train(args) -> int:
    # Until the RL learner exists this runs the shadow-mask replay demo on the CPU; the
    # command line stays the same when the learner lands.
    from . import demo

    res = demo.run(length=args.length, budget=args.budget, seed=args.seed)
    print("shadowkv train (demo: shadow-mask replay of a StreamingLLM decode, CPU)")
    for key, val in res.items():
        print(f"  {key:34s} {val:.3g}" if isinstance(val, float) else f"  {key:34s} {val}")
    ok = res["shadow_vs_sampler_max_abs_diff"] <= 1e-4 < res["dense_vs_sampler_max_abs_diff"]
    print("replay invariant:", "OK (shadow replay == sampler, dense replay differs)" if ok else "FAILED")
    if args.json:
        print(json.dumps(res))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowkv", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, torch, built CUDA archs, GPU coverage").set_defaults(fn=_cmd_info)
    t = sub.add_parser("train", help="main job (for now: the shadow-mask replay demo on CPU)")
    t.add_argument("--budget", type=float, default=0.25, help="fraction of the KV cache kept")
    t.add_argument("--length", type=int, default=1024, help="tokens decoded")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    t.set_defaults(fn=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
