"""The ``shadowkv`` command: ``train`` (the main job), ``compare``, ``info``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path


def _cmd_info(args) -> int:
    from .info import info_lines

    print("\n".join(info_lines()))
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    res = demo.run(length=args.length, budget=args.budget, seed=args.seed)
    print("shadowkv demo: shadow-mask replay of a StreamingLLM decode (CPU)")
    for key, val in res.items():
        print(f"  {key:34s} {val:.3g}" if isinstance(val, float) else f"  {key:34s} {val}")
    # With nothing evicted (a budget of the whole length) the dense replay is the sampler too.
    evicted = res["evicted_keys_per_head"] > 0
    ok = res["shadow_vs_sampler_max_abs_diff"] <= 1e-4 and (res["dense_vs_sampler_max_abs_diff"] > 1e-4) == evicted
    what = "dense replay differs" if evicted else "nothing evicted, dense replay == sampler too"
    print("replay invariant:", f"OK (shadow replay == sampler, {what})" if ok else "FAILED")
    return 0 if ok else 1


def _budget(text: str) -> int | float:
    """``64`` -> 64 tokens; ``0.25`` -> a quarter of the current length."""
    value = int(text) if text.isdigit() else float(text)
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"budget must be tokens >= 1 or a fraction in (0, 1], got {text}")
    return value


def _given(args) -> dict:
    """The training settings given on the command line, by TrainConfig field name
    (``sft_steps`` for the warm-up's steps)."""
    from .train import TrainConfig

    names = [f.name for f in fields(TrainConfig) if f.name not in ("model", "sft")] + ["sft_steps"]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "init" in given:  # as train() saves it: the same folder spelled another way is the same setting
        given["init"] = str(Path(given["init"]).resolve())
    return given


def _train_config(args):
    from .train import TrainConfig

    cfg = TrainConfig()
    for name, val in _given(args).items():
        if name == "sft_steps":
            cfg.sft.steps = val
        else:
            setattr(cfg, name, val)
    return cfg


def _cmd_train(args) -> int:
    from .train import train

    cfg = _train_config(args)
    out = Path(args.out or f"runs/{cfg.task}-{cfg.method}-{cfg.policy}-{cfg.budget}-s{cfg.seed}")
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet, overrides=_given(args))
    print(json.dumps(summary, indent=2))
    print(f"run folder: {out}  (config.json, metrics.jsonl, curves.png, checkpoints)")
    if summary["stopped"]:  # Ctrl-C: checkpointed but unfinished, so exit as main() does for an interrupt
        raise KeyboardInterrupt
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare

    cfg = _train_config(args)
    out = Path(args.out or f"runs/compare-{cfg.task}-{cfg.policy}-{cfg.budget}")
    table = compare(cfg, out, seeds=args.seeds, methods=args.methods.split(","), progress=not args.quiet)
    print(table)
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    from .tasks import TASKS

    p.add_argument("--task", choices=list(TASKS), help=f"default {d.task}")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, help=f"approximate prompt tokens (default {d.prompt_len})")
    p.add_argument("--value-len", dest="value_len", type=int,
                   help=f"kv-lookup: tokens per value; all but the first are decoded after the eviction (default {d.value_len})")
    p.add_argument("--policy", choices=["streaming", "h2o", "snapkv", "random"], help=f"default {d.policy}")
    p.add_argument("--budget", type=_budget, help=f"KV kept: tokens (64) or a fraction (default {d.budget})")
    p.add_argument("--page-size", dest="page_size", type=int, help=f"KV cache page size in tokens (default {d.page_size})")
    p.add_argument("--evict-every", dest="evict_every", type=int,
                   help="evict after the prompt, then every N decode steps (default: whenever a page over budget)")
    p.add_argument("--prefill-chunk", dest="prefill_chunk", type=int,
                   help="prefill prompts N tokens at a time, evicting at every chunk boundary (default: whole)")
    p.add_argument("--micro-batch", dest="micro_batch", type=int,
                   help="sequences per learner forward/backward, gradients accumulated (default: a step's all)")
    p.add_argument("--steps", type=int, help=f"RL steps (default {d.steps})")
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int,
                   help=f"distinct prompts per RL step (default {d.prompts_per_step})")
    p.add_argument("--group-size", dest="group_size", type=int,
                   help=f"rollouts per prompt, the GRPO group (default {d.group_size})")
    p.add_argument("--epochs", type=int, help=f"optimisation epochs per batch (default {d.epochs})")
    p.add_argument("--algo", choices=["grpo", "ppo"], help="grpo (default) or ppo (value head + GAE)")
    p.add_argument("--gamma", type=float, help="PPO discount (default 1.0)")
    p.add_argument("--gae-lambda", dest="gae_lambda", type=float, help="PPO GAE lambda (default 0.95)")
    p.add_argument("--vf-coef", dest="vf_coef", type=float, help="PPO value-loss weight (default 0.5)")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--clip", type=float, help=f"PPO ratio clip epsilon (default {d.clip})")
    p.add_argument("--kl-ref", dest="kl_ref", type=float,
                   help=f"coefficient of the KL to the initial policy, k3 estimator (default {d.kl_ref})")
    p.add_argument("--smd-beta", dest="smd_beta", type=float,
                   help=f"smd: weight of the dense-teacher distillation KL (default {d.smd_beta})")
    p.add_argument("--smd-direction", dest="smd_direction", choices=["forward", "reverse"],
                   help=f"smd: KL(teacher || student) (forward) or KL(student || teacher) (default {d.smd_direction})")
    p.add_argument("--is-cap", dest="is_cap", type=float,
                   help=f"is: truncate the dense/sampler ratio at this weight (default {d.is_cap})")
    p.add_argument("--is-reject-low", dest="is_reject_low", type=float,
                   help=f"is: tokens with a ratio below this leave the loss (default {d.is_reject_low})")
    p.add_argument("--is-reject-high", dest="is_reject_high", type=float,
                   help=f"is: tokens with a ratio above this leave the loss (default {d.is_reject_high})")
    p.add_argument("--is-veto", dest="is_veto", type=float,
                   help=f"is: a sequence with any ratio below this gets no gradient; 0: no veto (default {d.is_veto})")
    p.add_argument("--temperature", type=float, help=f"sampling temperature, > 0 (default {d.temperature})")
    p.add_argument("--seed", type=int, help=f"seeds prompts, sampling and updates (default {d.seed})")
    p.add_argument("--eval-prompts", dest="eval_prompts", type=int, help=f"greedy evaluation prompts (default {d.eval_prompts})")
    p.add_argument("--ckpt-every", dest="ckpt_every", type=int, help=f"checkpoint every N steps (default {d.ckpt_every})")
    p.add_argument("--init", help="local Hugging Face causal LM folder (from_pretrained) instead of the tiny default")
    p.add_argument("--sft-steps", dest="sft_steps", type=int, help="SFT warm-up steps of the default model")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help=f"where rollouts and the learner run; auto: cuda when available (default {d.device})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 mixed precision (float32 master weights; default float32)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowkv", description="KV-cache compression that stays on-policy in RL.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="RL post-training with compressed rollouts (the main job)")
    _add_train_args(t)
    t.add_argument("--method", choices=["dense", "naive", "is", "smd"], help="default smd")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint with its saved settings (--steps N "
                        "extends it to N steps; --device and --micro-batch may change too)")
    t.set_defaults(fn=_cmd_train)
    c = sub.add_parser("compare", help="dense, naive, is and smd on the same seeds; one table")
    _add_train_args(c)
    c.add_argument("--seeds", type=int, default=3, help="runs per method, seeds --seed .. --seed + N - 1 (default 3)")
    c.add_argument("--methods", default="dense,naive,is,smd", help="comma-separated (default dense,naive,is,smd)")
    c.set_defaults(fn=_cmd_compare)
    sub.add_parser("info", help="version, torch, built CUDA archs, GPU coverage").set_defaults(fn=_cmd_info)
    d = sub.add_parser("demo", help="the shadow-mask replay invariant on one attention layer (seconds)")
    d.add_argument("--budget", type=float, default=0.25, help="KV kept, a fraction of --length, at least 8 tokens (default 0.25)")
    d.add_argument("--length", type=int, default=1024, help="tokens decoded (default 1024)")
    d.add_argument("--seed", type=int, default=0, help="default 0")
    d.set_defaults(fn=_cmd_demo)
    from .benchmarks import BENCHMARKS

    b = sub.add_parser("bench", help="a benchmark's table of ratios (NAME --help for its options)",
                       description="Runs shadowkv.benchmarks.NAME with ARGS.")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    b.set_defaults(fn=_cmd_bench)
    return p


def _cmd_bench(args) -> int:
    import importlib

    sys.argv[0] = f"shadowkv bench {args.name}"  # the benchmark's usage line names the command
    importlib.import_module(f"shadowkv.benchmarks.{args.name}").main(args.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, NotImplementedError) as e:  # bad settings, unsupported models: a message, not a traceback
        parser.exit(2, f"shadowkv {args.cmd}: error: {e}\n")
    except KeyboardInterrupt:  # the runs are checkpointed: the same command (train: --resume) goes on
        parser.exit(130, f"shadowkv {args.cmd}: interrupted; run the same command again to continue"
                         f"{' (with --resume)' if args.cmd == 'train' else ''}\n")


if __name__ == "__main__":
    sys.exit(main())
