"""What the learner and prefill benchmarks share: a random Llama built here (never downloaded)
with its command-line options, lengths spread over a range, and wall-clock timing."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from . import at_least


def add_options(p: argparse.ArgumentParser) -> None:
    """The model's, the device's and the timing's options: --device, --dtype, --hidden,
    --layers, --heads, --kv-heads, --vocab, --repeats, --seed."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float32")
    p.add_argument("--hidden", type=at_least(8), default=256)
    p.add_argument("--layers", type=at_least(1), default=4)
    p.add_argument("--heads", type=at_least(1), default=4)
    p.add_argument("--kv-heads", type=at_least(1), default=2)
    p.add_argument("--vocab", type=at_least(2), default=512)
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed runs, median (default 3)")
    p.add_argument("--seed", type=int, default=0)


def build(p: argparse.ArgumentParser, args, max_len: int):
    """(model, device): the random Llama of ``add_options``' settings, for sequences of up to
    ``max_len`` tokens, seeded by ``--seed``; a usage error for settings that cannot work."""
    if args.heads % args.kv_heads:
        p.error(f"argument --heads: must be a multiple of --kv-heads ({args.kv_heads}), got {args.heads}")
    # The head dim is --hidden / --heads, and rotary embeddings rotate its two halves: an odd one
    # fails only in the attention kernels, with a shape message that names neither option.
    if args.hidden % args.heads or args.hidden // args.heads % 2:
        p.error(f"argument --hidden: must be --heads ({args.heads}) x an even head dim, got {args.hidden}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: torch sees no CUDA device")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max_len + 1)
    return AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=getattr(torch, args.dtype)), device


def spread_lengths(longest: int, shortest: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n]`` int64 lengths evenly spread from ``longest`` down to ``shortest``, shuffled."""
    return torch.linspace(longest, shortest, n).round().long()[torch.randperm(n, generator=gen)]


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``repeats`` calls after one untimed call."""
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
