"""Cost of ``evict_compact`` as a fraction of one ``paged_decode_attention`` step, same shape.

Builds one layer's full cache (``B`` sequences of ``--ctx`` tokens in pages of random pool
order, every KV head holding positions ``0 .. ctx - 1``, an empty eviction log), then times:

- ``decode``: one ``paged_decode_attention`` call on that pre-eviction cache (one query token
  per sequence, as in the decode benchmark);
- on CUDA, both again with ``check=False`` (the values are checked on the device, no copy to
  the host and no synchronisation; the ``, check=False`` rows compare the two unchecked ops);
- ``evict_compact`` in two scenarios, each with two keep masks, ``streaming`` (``--sinks`` first
  tokens + the most recent window, as StreamingLLM) and ``random`` (a different random set of
  the same size per KV head), and both compactions (``stable=True``: survivors keep their
  order; ``fill``: ``stable=False``, the survivors past the new length fill the holes, what
  ``PagedKVCache`` and the sampler use):

  - ``keep``: one eviction down to ``--keep`` of the tokens (a prompt compressed once);
  - ``steady``: ``--chunk`` tokens evicted (default a page + 1), a rollout's steady state: the
    sampler evicts once a sequence exceeds its budget by a page, so every ``--chunk`` decode
    steps.

evict_compact rewrites the cache and the log in place, so before every call (outside the timed
region) the cache, block tables, lengths and log are copied back from a pristine copy; on CUDA a
scratch buffer of 4x the L2 cache's size is then written, so that the call does not find the
restored metadata in L2.
Printed per row: both times, ``evict / decode`` (the issue's acceptance: < 5%), the same
amortized over the decode steps between two evictions (``keep``: ``--every``, the Sparse-RL
schedule compresses every 128 steps; ``steady``: ``--chunk``), and the least traffic that
compaction needs: the K, V and position of every kept slot that changes place, read and
written, plus the keep mask read and one int32 log entry written per evicted key.

Times are per call, median of ``--reps`` after ``--warmup`` calls: CUDA events on GPU (they
include the host-side validation each op does per call, see ``shadowkv/ops.py``),
``time.perf_counter`` on CPU, where the restored cache is warm in the last-level cache (as is
the decode's, read on every call).

Defaults (GPU acceptance shape, and one that finishes in well under a minute on 2 CPU cores):

    CUDA: B=64, ctx 8192, 32 query / 8 KV heads, head dim 128, page 16, bfloat16, 30 reps
    CPU:  B=4,  ctx 2048,  8 query / 2 KV heads, head dim 64,  page 16, float32,  10 reps

    python bench/bench_evict.py                     # CUDA if available, else CPU
    python bench/bench_evict.py --device cpu
    python bench/bench_evict.py --device cuda --keep 0.5 --every 64 --chunk 33
"""

from __future__ import annotations

import argparse

import torch

from .decode import add_shape_args, header, l2_flusher, markdown_table, median_ms, random_pages, resolve_args
from shadowkv import ops
from shadowkv.reference import PagedState, streaming_keep
from . import at_least, fraction


def full_cache(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               gen: torch.Generator) -> PagedState:
    """Every sequence full: slot ``s`` of every KV head holds position ``s``."""
    k_pages, v_pages, tables, seq_lens = random_pages(args, device, dtype, 1, gen)
    tables = tables[0]
    max_pages = tables.shape[1]
    pos_pages = torch.empty(k_pages.shape[:3], dtype=torch.int32, device=device)
    slot = torch.arange(max_pages * args.page_size, dtype=torch.int32, device=device)
    pos_pages[tables.long()] = slot.view(1, max_pages, args.page_size, 1)
    return PagedState(k_pages, v_pages, pos_pages, tables, seq_lens)


def random_keep(batch: int, kv_heads: int, ctx: int, kept: int, device: torch.device,
                gen: torch.Generator) -> torch.Tensor:
    """``[B, Hkv, ctx]`` bool with ``kept`` True at random slots, drawn per (sequence, KV head)."""
    chosen = torch.rand(batch, kv_heads, ctx, generator=gen, device=device).topk(kept, dim=-1).indices
    return torch.zeros(batch, kv_heads, ctx, dtype=torch.bool, device=device).scatter_(-1, chosen, True)


def min_traffic_bytes(keep: torch.Tensor, head_dim: int, elem: int, stable: bool) -> int:
    """Bytes a compaction under ``keep`` must move at least (see the module docstring)."""
    slot = torch.arange(keep.shape[-1], device=keep.device)
    if stable:  # every kept slot whose rank differs from its slot
        moved = int((keep & (keep.cumsum(-1) - 1 != slot)).sum())
    else:  # the kept slots at or past the new length
        moved = int((keep & (slot >= keep.sum(-1, keepdim=True))).sum())
    evicted = int((~keep).sum())
    per_slot = 2 * head_dim * elem + 4  # K row + V row of one head + its position
    return 2 * moved * per_slot + keep.numel() + 4 * evicted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_shape_args(p)
    p.add_argument("--keep", type=fraction, default=0.25, help="fraction of the tokens kept, in (0, 1] (default: 0.25)")
    p.add_argument("--sinks", type=at_least(0), default=4, help="leading tokens the streaming mask keeps (default: 4)")
    p.add_argument("--every", type=at_least(1), default=128,
                   help="decode steps per eviction for the keep scenario's amortized column (default: 128)")
    p.add_argument("--chunk", type=at_least(1), default=None,
                   help="tokens the steady scenario evicts (default: page size + 1)")
    p.add_argument("--scenario", choices=("keep", "steady", "both"), default="both",
                   help="time only this scenario (default: both; a profiler run wants one)")
    p.add_argument("--compaction", choices=("stable", "fill", "both"), default="both",
                   help="time only this compaction (default: both)")
    args = p.parse_args(argv)
    device, dtype = resolve_args(args)
    B, ctx, hkv = args.batch, args.ctx, args.kv_heads
    chunk = args.page_size + 1 if args.chunk is None else args.chunk
    scenarios = {"keep": (round(args.keep * ctx), args.every), "steady": (ctx - chunk, chunk)}
    if args.scenario != "both":
        scenarios = {args.scenario: scenarios[args.scenario]}
    stables = {"stable": (True,), "fill": (False,), "both": (True, False)}[args.compaction]
    for name, (kept, _) in scenarios.items():
        if not args.sinks < kept <= ctx:
            # ctx is a per-device default, so this waits for resolve_args; still before any work
            p.error(f"{name}: keeps {kept} of {ctx} tokens (--keep={args.keep}, --chunk={chunk}): need "
                    f"--sinks={args.sinks} < kept <= ctx")

    gen = torch.Generator(device).manual_seed(0)
    pristine = full_cache(args, device, dtype, gen)
    log_pristine = torch.full((B, hkv, ctx), ops.NEVER_EVICTED, dtype=torch.int32, device=device)
    steps = torch.full((B,), ctx, dtype=torch.int32, device=device)  # the next query's position
    q = torch.randn(B, args.heads, args.head_dim, generator=gen, dtype=dtype, device=device)

    # On CUDA both ops also run with check=False (checks on the device, no host round trip),
    # each compared with the decode step of the same kind; on CPU the flag changes nothing.
    checks = (True, False) if device.type == "cuda" else (True,)
    decode_ms = {check: median_ms(lambda i: ops.paged_decode_attention(q, *pristine[:2], *pristine[3:], check=check),
                                  device, args.warmup, args.reps) for check in checks}

    work, log = pristine.clone(), log_pristine.clone()
    flush_l2 = l2_flusher(device)

    def restore(i: int) -> None:
        for dst, src in zip((*work, log), (*pristine, log_pristine)):
            dst.copy_(src)
        # The copies leave what they wrote last (the positions and the log, 32 MiB at the CUDA
        # shape) in the L2 cache (50-60 MB on an H100/H200), where a real eviction does not find it.
        flush_l2()

    rows = []
    for scenario, (kept, every) in scenarios.items():
        masks = {
            "streaming": streaming_keep(pristine.seq_lens.cpu(), hkv, ctx, args.sinks, kept - args.sinks).to(device),
            "random": random_keep(B, hkv, ctx, kept, device, gen),
        }
        for (name, keep), stable, check in ((m, st, c) for m in masks.items() for st in stables for c in checks):
            evict_ms = median_ms(lambda i: ops.evict_compact(*work, keep, steps, log, check=check, stable=stable),
                                 device, args.warmup, args.reps, prepare=restore)
            # The timed calls must have done the whole job, or the times mean nothing.
            if not ((work.seq_lens == kept).all() and int((log == ctx).sum()) == B * hkv * (ctx - kept)):
                raise RuntimeError(f"evict_compact ({scenario}, {name}) did not leave {kept} tokens per sequence "
                                   "and head")
            traffic = min_traffic_bytes(keep, args.head_dim, dtype.itemsize, stable)
            dec = decode_ms[check]
            label = f"{name}, {'stable' if stable else 'fill'}" + ("" if check else ", check=False")
            rows.append([scenario, label, f"{kept}/{ctx}", f"{evict_ms:.3f}", f"{dec:.3f}",
                         f"{100 * evict_ms / dec:.1f}%", f"{every}", f"{100 * evict_ms / (every * dec):.2f}%",
                         f"{traffic / 2**20:.1f}", f"{traffic / evict_ms / 1e6:.1f}"])

    print(header(args, device, dtype, f" | keep {args.keep:g}, steady chunk {chunk} ({args.sinks} sinks for "
                 "streaming)") + "\n")
    print(markdown_table(["scenario", "keep mask, compaction", "kept", "evict ms", "decode ms", "evict / decode",
                          "decodes per eviction", "evict / those decodes", "min traffic MiB", "evict GB/s"], rows))


if __name__ == "__main__":
    main()
