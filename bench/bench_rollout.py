"""Rollout memory and speed: compressed sampler vs FullCache at equal batch.

Builds a tiny Llama locally (random weights: speed and memory do not depend on them), then
generates ``--new`` tokens per sequence with FullCache and with each eviction policy at
``--budget``, and prints peak KV bytes (whole pages + positions + eviction log) and tokens/s,
each as a ratio to FullCache measured in the same run.

    python bench/bench_rollout.py                       # CPU, B=4, 32-token prompts, 512 new
    python bench/bench_rollout.py --device cuda -B 64 --new 2048 --head-dim 128
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shadowkv import Sampler
from shadowkv.policies import H2O, FullCache, RandomEvict, SnapKV, StreamingLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-B", "--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()

    torch.manual_seed(0)
    heads = 4
    cfg = LlamaConfig(vocab_size=256, hidden_size=heads * args.head_dim, intermediate_size=2 * heads * args.head_dim,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=2,
                      head_dim=args.head_dim, max_position_embeddings=args.prompt + args.new + 16)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    prompts = torch.randint(5, 256, (args.batch, args.prompt))
    runs = [("full", FullCache(), None), ("streaming", StreamingLLM(), args.budget), ("h2o", H2O(), args.budget),
            ("snapkv", SnapKV(), args.budget), ("random", RandomEvict(), args.budget)]
    rows = []
    for name, policy, budget in runs:
        sampler = Sampler(model, policy, budget, page_size=args.page_size, max_batch=args.batch)
        sampler.generate(prompts, 8, seed=0)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = sampler.generate(prompts, args.new, seed=0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append((name, r.kv_peak_bytes, r.dense_kv_bytes, int(r.action_mask.sum()) / dt))
    base_bytes, base_tps = rows[0][1], rows[0][3]
    print(f"B={args.batch} prompt={args.prompt} new={args.new} budget={args.budget} D={args.head_dim} "
          f"layers={args.layers} page={args.page_size} {args.device} {args.dtype}")
    print(f"{'policy':10s} {'peak KV MiB':>12s} {'vs full':>8s} {'vs dense tokens':>16s} {'tokens/s':>10s} {'vs full':>8s}")
    for name, peak, dense, tps in rows:
        print(f"{name:10s} {peak / 2**20:12.2f} {peak / base_bytes:8.3f} {peak / dense:16.3f} {tps:10.1f} "
              f"{tps / base_tps:8.2f}")


if __name__ == "__main__":
    main()
