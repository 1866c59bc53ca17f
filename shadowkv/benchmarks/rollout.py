"""Rollout memory and speed: compressed sampler vs FullCache, at equal batch and at equal memory.

Builds a tiny Llama locally (random weights: speed and memory do not depend on them), then
generates ``--new`` tokens per sequence with FullCache and with each eviction policy at
``--budget``, and prints peak KV bytes (whole pages + positions + eviction log) and tokens/s,
each as a ratio to FullCache measured in the same run.

A second table answers what compression buys a rollout worker whose KV memory is what
FullCache needs at ``-B``: for each policy, the largest batch whose measured KV peak fits in
that many bytes (estimated from the per-sequence peak at ``-B``, then run and shrunk until the
measured peak fits; at most ``--max-fit-batch``), with its tokens/s against FullCache at ``-B``.

Tokens/s are the median of ``--repeats`` timed rollouts after an 8-token warm-up (CUDA events on
CUDA, ``time.perf_counter`` on CPU); the equal-memory table's last probe, at the batch that
fits, is one of them. The default is 3, not the other benchmarks' 20 or more: each repeat is a
whole rollout (seconds at the GPU shape), and the GPU session's time slice must hold them all.
Rows print as they are measured.

    python bench/bench_rollout.py                       # CPU, B=4, 32-token prompts, 512 new
    python bench/bench_rollout.py --device cuda -B 64 --new 2048 --head-dim 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shadowkv import Sampler
from shadowkv.policies import H2O, FullCache, RandomEvict, SnapKV, StreamingLLM
from . import at_least, kv_budget


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-B", "--batch", type=at_least(1), default=4)
    p.add_argument("--prompt", type=at_least(1), default=32)
    p.add_argument("--new", type=at_least(1), default=512)
    p.add_argument("--budget", type=kv_budget, default=0.25,
                   help="KV kept per sequence: tokens (64) or a fraction of its length (default 0.25)")
    p.add_argument("--head-dim", type=at_least(1), default=64)
    p.add_argument("--layers", type=at_least(1), default=2)
    p.add_argument("--page-size", type=at_least(1), default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-fit-batch", type=at_least(0), default=None,
                   help="largest batch tried in the equal-memory table (default 8 x -B; 0 skips the table)")
    p.add_argument("--repeats", type=at_least(1), default=3,
                   help="timed rollouts per row, the median is reported (default 3: each is a whole rollout)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    max_fit = 8 * args.batch if args.max_fit_batch is None else args.max_fit_batch

    torch.manual_seed(0)
    heads = 4
    cfg = LlamaConfig(vocab_size=256, hidden_size=heads * args.head_dim, intermediate_size=2 * heads * args.head_dim,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=2,
                      head_dim=args.head_dim, max_position_embeddings=args.prompt + args.new + 16)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    runs = [("full", FullCache(), None), ("streaming", StreamingLLM(), args.budget), ("h2o", H2O(), args.budget),
            ("snapkv", SnapKV(), args.budget), ("random", RandomEvict(), args.budget)]

    def rollout(policy, budget, batch: int, repeats: int) -> tuple[int, int, list[float]]:
        """(peak KV bytes, dense KV bytes, generated tokens/s of each of `repeats` >= 1 timed
        rollouts of `batch`)."""
        prompts = torch.randint(5, 256, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        sampler = Sampler(model, policy, budget, page_size=args.page_size, max_batch=batch)
        sampler.generate(prompts, 8, seed=0)  # warm-up
        tps = []
        for _ in range(repeats):
            if args.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                r = sampler.generate(prompts, args.new, seed=0)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t = time.perf_counter()
                r = sampler.generate(prompts, args.new, seed=0)
                seconds = time.perf_counter() - t
            tps.append(int(r.action_mask.sum()) / seconds)
        return r.kv_peak_bytes, r.dense_kv_bytes, tps

    print(f"B={args.batch} prompt={args.prompt} new={args.new} budget={args.budget} D={args.head_dim} "
          f"layers={args.layers} page={args.page_size} {args.device} {args.dtype}; tokens/s: median of "
          f"{args.repeats} rollouts")
    print(f"{'policy':10s} {'peak KV MiB':>12s} {'vs full':>8s} {'vs dense tokens':>16s} {'tokens/s':>10s} {'vs full':>8s}")
    peaks = []
    for name, policy, budget in runs:
        peak, dense, tps = rollout(policy, budget, args.batch, args.repeats)
        peaks.append(peak)
        tps = statistics.median(tps)
        if name == "full":
            base_bytes, base_tps = peak, tps
        print(f"{name:10s} {peak / 2**20:12.2f} {peak / base_bytes:8.3f} {peak / dense:16.3f} {tps:10.1f} "
              f"{tps / base_tps:8.2f}", flush=True)
    if max_fit <= 0:
        return

    print(f"\nequal memory: the largest batch (<= {max_fit}) whose KV peak fits in FullCache's at B={args.batch} "
          f"({base_bytes / 2**20:.2f} MiB)")
    print(f"{'policy':10s} {'batch':>6s} {'peak KV MiB':>12s} {'vs full':>8s} {'tokens/s':>10s} {'vs full@B':>10s}")
    for (name, policy, budget), peak_at_b in zip(runs[1:], peaks[1:]):
        batch = min(max_fit, max(1, base_bytes * args.batch // peak_at_b))
        while True:  # the estimate assumes peak ~ batch; shrink until the measured peak fits
            peak, _, tps = rollout(policy, budget, batch, 1)
            if peak <= base_bytes or batch == 1:
                break
            batch = max(1, batch * base_bytes // peak)
        if args.repeats > 1:  # the probe that fits is the first repeat
            tps += rollout(policy, budget, batch, args.repeats - 1)[2]
        tps = statistics.median(tps)
        print(f"{name:10s} {batch:6d} {peak / 2**20:12.2f} {peak / base_bytes:8.3f} {tps:10.1f} {tps / base_tps:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
