"""Paged decode attention bandwidth: ``paged_decode_attention`` vs a device copy and dense SDPA.

One query token per sequence attends to all ``--ctx`` cached tokens of its sequence, stored in a
pool of ``--page-size``-token pages in random pool order (as in a serving pool after churn).
Decode is memory bound, so the figure of merit is the achieved bandwidth, compared with a
device-to-device copy of the same number of bytes timed in the same run:

- bytes counted for decode: the K and V rows of every cached slot, read once per KV head (the
  query heads of a GQA group share them): ``sum(seq_lens) * Hkv * D * 2 * elem``, plus ``q``
  and ``out`` (``2 * B * Hq * D * elem``), plus, with ``--scores``, the float32 ``scores_out``
  written (``B * Hkv * ctx * 4``). Block tables and ``seq_lens`` (4 bytes per page and per
  sequence, < 0.1%) are not counted.
- the copy: ``dst.copy_(src)`` of a buffer of the decode's bytes (without scores); its GB/s
  counts the bytes read plus the bytes written, i.e. the bandwidth the device can sustain.
- baseline: ``F.scaled_dot_product_attention`` with ``enable_gqa`` on the same K/V gathered
  into dense contiguous ``[B, Hkv, ctx, D]`` tensors, one query token; its GB/s counts the
  same bytes as the paged op.

Times are per call, median of ``--reps`` after ``--warmup`` calls. On CUDA they come from CUDA
events and include what the op does on the host per call: by default a small kernel validates
``seq_lens`` and the block tables and the host waits for its verdict; the ``check=False`` row skips
that (values checked on the device, graph-capturable; see ``shadowkv/ops.py``). On CUDA every row of the
paged op is timed for each kernel (``ops.decode_kernel``: the default ``mma_rows`` one first,
then ``mma``, ``pipelined``, ``warp``, the SDPA baseline, and last the kernels not yet run on a
GPU, ``UNTRIED_KERNELS``: the opt-in ``mma_rows_2stage``; each row tagged with its kernel). The
copy is timed first and each row printed as soon as it is timed. Before its rows, each kernel's
output on set 0 (checked and unchecked) must agree with SDPA's within ``AGREE_TOL`` (the last
column); a kernel that raises or differs gets a ``FAILED`` row saying why, and the others go on.
Calls rotate over ``--sets`` distinct caches and queries so that the L2 cache does
not serve repeated reads. On CPU times
come from ``time.perf_counter``; the VM's last-level cache can hold the small CPU shape, so
CPU numbers are cache-warm.

Defaults (GPU acceptance shape, and one that finishes in well under a minute on 2 CPU cores):

    CUDA: B=64, ctx 8192, 32 query / 8 KV heads, head dim 128, page 16, bfloat16, 30 reps
    CPU:  B=4,  ctx 2048,  8 query / 2 KV heads, head dim 64,  page 16, float32,  10 reps

    python bench/bench_decode.py                         # CUDA if available, else CPU
    python bench/bench_decode.py --device cpu
    python bench/bench_decode.py --device cuda --scores  # also time with per-key scores_out
    python bench/bench_decode.py --device cuda -B 16 --ctx 32768 --dtype float16
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shadowkv import ops
from . import at_least

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs difference allowed between the paged op and SDPA (both accumulate in float32; the
# outputs are rounded to the dtype), as in tests/test_paged_decode_attention.py.
AGREE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Kernels not yet run on a GPU: timed after everything else (see main).
UNTRIED_KERNELS = ("mma_rows_2stage",)

# Per-device defaults of the options left unset. CUDA: the acceptance shape; CPU: small enough
# for 2 cores in well under a minute.
DEFAULTS = {
    "cuda": dict(batch=64, ctx=8192, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", reps=30, warmup=5),
    "cpu": dict(batch=4, ctx=2048, heads=8, kv_heads=2, head_dim=64, dtype="float32", reps=10, warmup=2),
}


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The options both paged-cache benchmarks share; ``None`` means the device's default."""
    def d(key: str) -> str:
        return f"default: {DEFAULTS['cuda'][key]} on CUDA, {DEFAULTS['cpu'][key]} on CPU"

    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA if available, else CPU (default: auto)")
    p.add_argument("--dtype", choices=list(DTYPES), help=f"K/V and query dtype ({d('dtype')})")
    p.add_argument("-B", "--batch", type=at_least(1), help=f"sequences ({d('batch')})")
    p.add_argument("--ctx", type=at_least(1), help=f"cached tokens per sequence ({d('ctx')})")
    p.add_argument("--heads", type=at_least(1), help=f"query heads ({d('heads')})")
    p.add_argument("--kv-heads", type=at_least(1), help=f"KV heads ({d('kv_heads')})")
    p.add_argument("--head-dim", type=at_least(1), help=f"head dimension ({d('head_dim')})")
    p.add_argument("--page-size", type=at_least(1), default=16, help="tokens per page (default: 16)")
    p.add_argument("--reps", type=at_least(1), help=f"timed calls, the median is reported ({d('reps')})")
    p.add_argument("--warmup", type=at_least(0), help=f"untimed calls first ({d('warmup')})")


def resolve_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Fills the options left at ``None`` with the device's defaults, checks the shape."""
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    for key, value in DEFAULTS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    if name == "cuda" and args.reps < 20:
        raise SystemExit(f"--reps={args.reps}: take the median of at least 20 calls on CUDA")
    return torch.device(name), DTYPES[args.dtype]


def header(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, extra: str = "") -> str:
    """One line: device, torch/CUDA versions, date, the exact shape and timing settings."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        where = f"{models[0] if models else 'CPU'}, {torch.get_num_threads()} threads"
    return (f"{where} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
            f"{datetime.datetime.now().isoformat(timespec='seconds')} | B={args.batch} ctx={args.ctx} "
            f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} page={args.page_size} "
            f"{str(dtype).removeprefix('torch.')}{extra} | median of {args.reps} after {args.warmup} warm-up")


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def median_ms(run: Callable[[int], object], device: torch.device, warmup: int, reps: int,
              prepare: Callable[[int], object] | None = None) -> float:
    """Median milliseconds of ``run(i)`` over ``reps`` calls after ``warmup`` untimed ones.

    ``i`` counts all calls from 0 so that callers can rotate their inputs. ``prepare(i)``, if
    given, runs before call ``i`` outside the timed region (e.g. to restore state that ``run``
    mutates): on CUDA its work is queued before the start event, on the same stream.
    """
    times = []
    for i in range(warmup + reps):
        if prepare is not None:
            prepare(i)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run(i)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def random_pages(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, sets: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sets`` full caches of ``B`` sequences of ``ctx`` tokens in one pool of random K/V
    (``gen`` is a generator on ``device``: the pool never passes through host memory).

    Returns ``k_pages, v_pages [P, page_size, Hkv, D]``, ``block_tables [sets, B, max_pages]``
    int32 (disjoint pages, in random pool order) and ``seq_lens [B]`` int32 (all ``ctx``).
    """
    max_pages = math.ceil(args.ctx / args.page_size)
    num_pages = sets * args.batch * max_pages
    shape = (num_pages, args.page_size, args.kv_heads, args.head_dim)
    k_pages = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    v_pages = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    tables = torch.randperm(num_pages, generator=gen, device=device).view(sets, args.batch, max_pages)
    seq_lens = torch.full((args.batch,), args.ctx, dtype=torch.int32, device=device)
    return k_pages, v_pages, tables.to(torch.int32), seq_lens


def gather_dense(pages: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """The first ``ctx`` slots of each sequence as a contiguous ``[B, Hkv, ctx, D]`` tensor."""
    paged = pages[block_tables.long()]  # [B, max_pages, page_size, Hkv, D]
    return paged.flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()


def num_sets(args: argparse.Namespace, device: torch.device, set_bytes: int) -> int:
    """``--sets``, or on CUDA enough caches that together they are over 3x the L2 size (>= 2)."""
    if args.sets is not None:
        return args.sets
    if device.type == "cpu":
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(3 * l2 / set_bytes))


def l2_flusher(device: torch.device) -> Callable[[], object]:
    """A function that writes a scratch buffer of 4x the L2 cache's size, pushing out what earlier
    kernels left there (CUDA); on CPU it does nothing (CPU times here are cache-warm)."""
    if device.type != "cuda":
        return lambda: None
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(4 * l2, dtype=torch.uint8, device=device).zero_


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_shape_args(p)
    p.add_argument("--scores", action="store_true", help="also time with the per-key scores_out written")
    p.add_argument("--sets", type=at_least(1),
                   help="distinct caches and queries the calls rotate over (default: 2 on CPU; on CUDA "
                        "enough that their K/V exceed 3x the L2 cache, at least 2)")
    args = p.parse_args(argv)
    device, dtype = resolve_args(args)
    elem = dtype.itemsize
    B, ctx, hq, hkv, hd = args.batch, args.ctx, args.heads, args.kv_heads, args.head_dim

    kv_bytes = B * ctx * hkv * hd * 2 * elem
    qo_bytes = 2 * B * hq * hd * elem
    scores_bytes = B * hkv * ctx * 4
    sets = num_sets(args, device, kv_bytes)
    gen = torch.Generator(device).manual_seed(0)
    k_pages, v_pages, tables, seq_lens = random_pages(args, device, dtype, sets, gen)
    q = torch.randn(sets, B, hq, hd, generator=gen, dtype=dtype, device=device)
    scores = torch.empty(B, hkv, ctx, dtype=torch.float32, device=device)
    k_dense = torch.stack([gather_dense(k_pages, tables[i], ctx) for i in range(sets)])
    v_dense = torch.stack([gather_dense(v_pages, tables[i], ctx) for i in range(sets)])
    copy_src = torch.empty(sets, (kv_bytes + qo_bytes) // elem, dtype=dtype, device=device).fill_(1.0)
    copy_dst = torch.empty_like(copy_src)

    def paged(i: int, scores_out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        s = i % sets
        return ops.paged_decode_attention(q[s], k_pages, v_pages, tables[s], seq_lens, scores_out=scores_out,
                                          check=check)

    def sdpa(i: int) -> torch.Tensor:
        s = i % sets
        return F.scaled_dot_product_attention(q[s, :, :, None], k_dense[s], v_dense[s],
                                              enable_gqa=hq > hkv)[:, :, 0]

    # The CUDA kernels of the paged op (SHADOWKV_DECODE_KERNEL); CPU ops ignore the choice. The
    # default (mma_rows where it applies) first: the "time / paged" column and the summary's
    # "(default)" ratio are its first row's. Those not yet run on a GPU come last (after the
    # baselines): an illegal address there poisons the CUDA context only after the rest is printed.
    kernels = ["mma_rows", "mma", "pipelined", "warp", "mma_rows_2stage"] if device.type == "cuda" else ["auto"]
    sdpa_0 = sdpa(0).float()

    def paged_runs(kernel: str) -> list[tuple[str, int, Callable[[int], object]]]:
        tag = "" if kernel == "auto" else f" [{kernel}]"
        runs = [(f"paged_decode_attention{tag}", kv_bytes + qo_bytes, paged)]
        if device.type == "cuda":  # on CPU check=False changes nothing
            runs.append((f"paged_decode_attention, check=False{tag}", kv_bytes + qo_bytes,
                         lambda i: paged(i, check=False)))
        if args.scores:
            runs.append((f"paged_decode_attention + scores_out{tag}", kv_bytes + qo_bytes + scores_bytes,
                         lambda i: paged(i, scores)))
        return runs

    print(header(args, device, dtype, f" | {sets} rotating sets"))
    print(f"decode bytes per call: K/V {kv_bytes / 2**20:.1f} MiB + q/out {qo_bytes / 2**10:.1f} KiB"
          + (f" (+ scores_out {scores_bytes / 2**20:.2f} MiB)" if args.scores else "")
          + f"; paged vs SDPA on set 0: max abs diff at most {AGREE_TOL[dtype]:.0e} or the kernel FAILED\n")
    print(markdown_table(["impl", "ms", "GB/s", "GB/s / copy GB/s", "time / paged", "max abs diff vs SDPA"], []),
          flush=True)
    # The copy reads and writes its buffer: 2x its size moves through memory. Timed first: every
    # row's ratio to its bandwidth is printed as soon as that row is timed.
    copy_bytes = 2 * copy_src[0].numel() * elem
    copy_ms = median_ms(lambda i: copy_dst[i % sets].copy_(copy_src[i % sets]), device, args.warmup, args.reps)
    copy_gbs = copy_bytes / copy_ms / 1e6
    timed = []  # (name, bytes, ms) of the paged rows that agree with SDPA

    def row(name: str, nbytes: int, ms: float, diff: str = "") -> None:
        ratio = f"{ms / timed[0][2]:.2f}" if timed else ""  # the copy comes before any paged row
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.1f} | {nbytes / ms / 1e6 / copy_gbs:.2f} | {ratio} | "
              f"{diff} |", flush=True)

    def time_kernel(kernel: str) -> None:
        """The kernel's rows, if it agrees with SDPA (checked and, on CUDA, unchecked): a benchmark
        of wrong results is worthless. A failure or a mismatch is a note, not the end of the run."""
        try:
            with ops.decode_kernel(kernel):
                diff = max((paged(0, check=check).float() - sdpa_0).abs().max().item()
                           for check in ([True, False] if device.type == "cuda" else [True]))
                if not diff <= AGREE_TOL[dtype]:
                    raise RuntimeError(f"differs from SDPA by {diff:.3e} (> {AGREE_TOL[dtype]:.0e})")
                for name, nbytes, fn in paged_runs(kernel):
                    ms = median_ms(fn, device, args.warmup, args.reps)
                    timed.append((name, nbytes, ms))
                    row(name, nbytes, ms, f"{diff:.2e}")
        except Exception as e:  # noqa: BLE001  (one kernel's failure must not hide the others)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}".replace("|", "/")
            print(f"| paged_decode_attention [{kernel}] | FAILED: {why} | | | | |", flush=True)

    row("device copy (read + write)", copy_bytes, copy_ms)
    for kernel in kernels:
        if kernel not in UNTRIED_KERNELS:
            time_kernel(kernel)
    row("SDPA, dense gathered K/V", kv_bytes + qo_bytes, median_ms(sdpa, device, args.warmup, args.reps))
    for kernel in kernels:
        if kernel in UNTRIED_KERNELS:
            time_kernel(kernel)

    if not timed:
        raise SystemExit("no paged_decode_attention kernel agreed with SDPA")
    no_scores = [(ms, name, nbytes) for name, nbytes, ms in timed if "scores" not in name]
    default, best = no_scores[0], min(no_scores)
    print(f"\npaged decode bandwidth / device copy bandwidth: {default[2] / default[0] / 1e6 / copy_gbs:.2f} "
          f"({default[1]}); best: {best[2] / best[0] / 1e6 / copy_gbs:.2f} ({best[1]})")


if __name__ == "__main__":
    main()
