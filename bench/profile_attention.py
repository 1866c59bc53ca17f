"""One shadow_attention forward + backward at the GPU benchmark's shape, for a profiler.

``shadowkv bench attention`` times many launches of every implementation; a profiler such as
Nsight Compute wants each kernel once, under one kernel family, e.g.

    ncu -k regex:"fwd|dq_kernel|dkdv_kernel" -c 3 --section SpeedOfLight --section WarpStateStats \\
        python bench/profile_attention.py --family wgmma

Inputs as in the benchmark (B=2, Hq=16, Hkv=8, L=8192, D=128, bf16; ``--mask 25%``: 4 sinks
and a window, a quarter of the keys cached). The first forward is the one to profile: a warm-up
would only add launches to skip.
"""

from __future__ import annotations

import argparse

import torch

from shadowkv import ops
from shadowkv.reference import INT32_MAX, streaming_evicted_at


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=ops.ATTENTION_KERNELS, default="auto")
    p.add_argument("--mask", choices=["dense", "25%"], default="25%")
    p.add_argument("-L", "--seq-len", type=int, default=8192)
    p.add_argument("-D", "--head-dim", type=int, default=128)
    p.add_argument("-B", "--batch", type=int, default=2)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    dev, L = torch.device(args.device), args.seq_len
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, args.q_heads, L, args.head_dim, generator=gen).to(dev, torch.bfloat16)
    k, v = (torch.randn(args.batch, args.kv_heads, L, args.head_dim, generator=gen).to(dev, torch.bfloat16)
            for _ in range(2))
    log = (torch.full((L,), INT32_MAX, dtype=torch.int32) if args.mask == "dense"
           else streaming_evicted_at(L, 4, L // 4 - 4))
    ev = log.to(dev).expand(args.batch, args.kv_heads, L).contiguous()
    for t in (q, k, v):
        t.requires_grad_()
    with ops.attention_kernel(args.family):
        out = ops.shadow_attention(q, k, v, ev)
        out.backward(torch.randn_like(out))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    print(f"profile_attention: {args.family}, mask {args.mask}, out {tuple(out.shape)} {out.dtype}: done")


if __name__ == "__main__":
    main()
