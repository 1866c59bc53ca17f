"""Benchmark shadow_attention against dense-mask baselines, on CPU (and CUDA when available).

For one shape it times, forward and forward+backward:

- ``shadowkv``: ``shadowkv.ops.shadow_attention`` with the eviction log (default kernels);
- ``wmma``: the same op on the WMMA kernels (``SHADOWKV_ATTENTION_KERNEL=wmma``), CUDA builds
  whose default is a CuTe family;
- ``cute``: the same op on the CuTe kernels (``SHADOWKV_ATTENTION_KERNEL=cute``, forward and
  backward; CUDA builds with the CUTLASS headers only);
- ``wgmma``: the sm_90a wgmma kernels (``SHADOWKV_ATTENTION_KERNEL=wgmma``, forward and
  backward); only where they run (an sm_90 GPU, a build with 9.0a and the CUTLASS headers);
- ``wgmma_ws``: the warp-specialised forward (a producer warpgroup, two consumer warpgroups
  taking turns on the tensor cores) with wgmma's backward;
- ``wgmma_wsb``: wgmma_ws's forward with a warp-specialised backward (in the dQ and the dK/dV
  kernel a producer warpgroup streams the partner tiles to two consumer warpgroups of 64 rows);
- ``wgmma_wsf``: wgmma_ws's forward with a one-pass warp-specialised backward at head dim 128
  (its dK/dV kernel computes dQ too, by atomics; wgmma_wsb's backward at head dim 64);
- ``wgmma_fused``: wgmma's forward with the one-pass backward (dQ by atomics from the dK/dV
  kernel: five products per visible pair instead of seven);
- ``sdpa``: ``F.scaled_dot_product_attention`` with the equivalent boolean mask [B, Hq, L, L];
- ``causal``: ``F.scaled_dot_product_attention(is_causal=True)``, no mask (the flash backend on
  CUDA): dense causal attention at full speed, the bar a 25% log has to beat;
- ``flex``: compiled FlexAttention with the equivalent block mask (skipped with a note when it
  cannot run, e.g. no compiler for the CPU backend);

under two masks: ``dense`` (nothing evicted: plain causal attention) and a StreamingLLM log
that keeps ``sinks`` + a window so that ``budget`` of the L keys are cached at any time. Queries
are all L positions (``q_offset = 0``), as in a learner's training forward.

Before it is timed, each implementation's output and gradients on input set 0 are compared
with ``shadowkv.reference.shadow_attention_ref`` in float64 (``causal`` with the dense mask's)
under the tolerances of tests/test_shadow_attention_cuda.py (see ``TOLERANCES``). A row that
differs is still timed but marked ``WRONG`` (the errors in a note) and left out of the last
line, the acceptance line.

Defaults are per device (options given on the command line win):

    CPU:  B=1, Hq=8,  Hkv=2, L=4096, D=64,  float32,  median of 5  (``dense / 25%`` >= 2x)
    CUDA: B=2, Hq=16, Hkv=8, L=8192, D=128, bfloat16, median of 20, inputs rotated over 3 sets
          so the L2 cache does not serve repeated reads (fwd+bwd >= 1.5x flex at 25%, and
          faster than ``causal``)

    python bench/bench_shadow_attention.py --device cpu       # the CPU acceptance shape
    python bench/bench_shadow_attention.py --device cuda      # the GPU acceptance shape
    python bench/bench_shadow_attention.py -L 1024 --repeats 3 --no-flex
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shadowkv import _C, ops
from shadowkv.reference import INT32_MAX, shadow_attention_ref, shadow_visible, streaming_evicted_at
from . import at_least, kv_budget

# Impls that are the shadowkv op under a named kernel family (ops.attention_kernel).
FAMILY_IMPLS = ("wmma", "cute", "wgmma", "wgmma_ws", "wgmma_wsb", "wgmma_wsf", "wgmma_fused")
# Families that have not run on a GPU yet, timed after everything else (see run_device) so that
# a hang costs only them (the others ran on an H200 on 2026-11-27).
UNTRIED_IMPLS: tuple[str, ...] = ("wgmma_wsb", "wgmma_wsf")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# (out, gradients): the max abs error against the float64 reference may be at most
# ``tol * max(1, max|ref|)``. The 16-bit ones are tests/test_shadow_attention_cuda.py's (stored
# in 8 or 11 mantissa bits; the tensor-core kernels also round P and dS before their second
# MMA); float32 is 10x the tests' (the benchmark's rows are longer than theirs).
TOLERANCES = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-4, 1e-3),
              torch.float64: (1e-8, 1e-7)}
# Float64 reference scores per query chunk (B * Hq * chunk * L of them), to bound its memory.
REFERENCE_SCORES = 1 << 25


# Per-device defaults of the shape options left unset (see the module docstring).
DEFAULTS = {
    "cpu": dict(seq_len=4096, head_dim=64, q_heads=8, kv_heads=2, batch=1, repeats=5, sets=1),
    "cuda": dict(seq_len=8192, head_dim=128, q_heads=16, kv_heads=8, batch=2, repeats=20, sets=3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-L", "--seq-len", type=at_least(1), help="keys = queries (CPU 4096, CUDA 8192)")
    p.add_argument("-D", "--head-dim", type=at_least(1), help="CPU 64, CUDA 128")
    p.add_argument("--q-heads", type=at_least(1), help="CPU 8, CUDA 16")
    p.add_argument("--kv-heads", type=at_least(1), help="CPU 2, CUDA 8")
    p.add_argument("-B", "--batch", type=at_least(1), help="CPU 1, CUDA 2")
    p.add_argument("--budget", type=kv_budget, default=0.25,
                   help="kept keys: a token count (64) or a fraction of L (0.25), more than --sinks and at most L "
                        "(default 0.25)")
    p.add_argument("--sinks", type=at_least(0), default=4)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, then CUDA if available")
    p.add_argument("--repeats", type=at_least(1),
                   help="timed runs; the median is reported (CPU 5, CUDA 20; at least 20 on CUDA)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed runs first (default 1; at least 1 on CUDA)")
    p.add_argument("--sets", type=at_least(1), help="input sets the timed calls rotate over (CPU 1, CUDA 3)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baselines")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    args = p.parse_args(argv)
    if args.dtype == "float64" and args.device == "cuda":  # the CUDA kernels refuse it mid-run
        p.error("argument --dtype: float64 runs on the CPU kernels only; use --device cpu or another dtype")
    # L is a per-device default: check the budget against that of every device that will run.
    for device in devices_of(args):
        try:
            kept_keys(args.budget, args.seq_len or DEFAULTS[device]["seq_len"], args.sinks)
        except ValueError as e:
            p.error(f"argument --budget: {e}")
    return args


def devices_of(args: argparse.Namespace) -> list[str]:
    """The devices a run covers: ``--device``, or with ``auto`` the CPU, then CUDA if available."""
    if args.device != "auto":
        return [args.device]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def kept_keys(budget: int | float, seq_len: int, sinks: int) -> int:
    """Keys the StreamingLLM log keeps of ``seq_len``: ``budget`` tokens, or that fraction of them
    (rounded); a ValueError unless ``sinks`` < kept <= ``seq_len`` (a window of at least one key,
    a mask that is not wider than the sequence)."""
    kept = round(budget * seq_len) if isinstance(budget, float) else budget
    if not sinks < kept <= seq_len:
        raise ValueError(f"keeps {kept} of the L={seq_len} keys, need --sinks={sinks} < kept <= L")
    return kept


def with_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    return argparse.Namespace(**{**DEFAULTS[device.type], **{k: v for k, v in vars(args).items() if v is not None}})


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_impls(evicted_at: torch.Tensor, args, device: torch.device):
    """name -> attention(q, k, v) for this log, or name -> reason it is skipped."""
    seq_len, group = args.seq_len, args.q_heads // args.kv_heads
    impls: dict[str, Callable | str] = {"shadowkv": lambda q, k, v: ops.shadow_attention(q, k, v, evicted_at)}
    if device.type == "cuda" and _C.built_with_cute():
        impls["wmma"] = impls["shadowkv"]  # timed under ops.attention_kernel("wmma")
        impls["cute"] = impls["shadowkv"]  # timed under ops.attention_kernel("cute")
    if device.type == "cuda" and _C.wgmma_runs_here():
        impls["wgmma"] = impls["shadowkv"]  # timed under ops.attention_kernel("wgmma")
        # the untried families last (run_device), those that could hang (mbarrier rings) last of all
        impls["wgmma_fused"] = impls["shadowkv"]  # timed under ops.attention_kernel("wgmma_fused")
        impls["wgmma_ws"] = impls["shadowkv"]  # timed under ops.attention_kernel("wgmma_ws")
        impls["wgmma_wsb"] = impls["shadowkv"]  # timed under ops.attention_kernel("wgmma_wsb")
        impls["wgmma_wsf"] = impls["shadowkv"]  # timed under ops.attention_kernel("wgmma_wsf")
    if not args.no_sdpa:
        mask = shadow_visible(evicted_at, seq_len).repeat_interleave(group, dim=1)
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=group > 1)
        impls["causal"] = lambda q, k, v: causal_sdpa(q, k, v, group)
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx < evicted_at[b, h // group, kv_idx])

            block_mask = create_block_mask(mask_mod, args.batch, args.q_heads, seq_len, seq_len,
                                           device=device)
            # fullgraph: a failed compile raises (a skipped row) instead of falling back to eager
            # FlexAttention (many times slower) for this and every later call.
            flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
            impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1)
        except Exception as e:  # noqa: BLE001  (any failure only skips this baseline)
            impls["flex"] = _reason(e)
    return impls


def causal_sdpa(q, k, v, group: int):
    """Dense causal SDPA, on the flash backend where there is one (CUDA)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)


def make_inputs(args, device, dtype) -> list[tuple[torch.Tensor, ...]]:
    """``args.sets`` random ``(q [B, Hq, L, D], k, v [B, Hkv, L, D], grad_out [B, Hq, L, D])``."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, hq, hkv, seq_len, d = args.batch, args.q_heads, args.kv_heads, args.seq_len, args.head_dim
    sets = []
    for _ in range(args.sets):
        q = torch.randn(b, hq, seq_len, d, generator=gen, device=device, dtype=dtype)
        k = torch.randn(b, hkv, seq_len, d, generator=gen, device=device, dtype=dtype)
        v = torch.randn(b, hkv, seq_len, d, generator=gen, device=device, dtype=dtype)
        sets.append((q, k, v, torch.randn_like(q)))
    return sets


def reference(inputs: tuple[torch.Tensor, ...], evicted_at: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 ``(out, dq, dk, dv)`` of ``shadow_attention_ref`` on ``inputs = (q, k, v, grad_out)``
    under ``evicted_at [B, Hkv, L]``, on their device, by query chunks (out and dq are per row,
    dk and dv sums over rows): the float64 scores of all rows at once need 8 bytes per
    ``B * Hq * L * L``."""
    q, k, v, grad_out = inputs
    b, hq, seq_len, _ = q.shape
    chunk = max(1, REFERENCE_SCORES // (b * hq * seq_len))
    k64, v64 = (t.detach().double().requires_grad_() for t in (k, v))
    outs, dqs, dk, dv = [], [], torch.zeros_like(k64), torch.zeros_like(v64)
    for c0 in range(0, seq_len, chunk):
        q64 = q[:, :, c0:c0 + chunk].detach().double().requires_grad_()
        out, _ = shadow_attention_ref(q64, k64, v64, evicted_at, c0)
        dq, dk_c, dv_c = torch.autograd.grad(out, (q64, k64, v64), grad_out[:, :, c0:c0 + chunk].double())
        outs.append(out.detach())
        dqs.append(dq)
        dk += dk_c
        dv += dv_c
    return torch.cat(outs, dim=2), torch.cat(dqs, dim=2), dk, dv


def mismatch(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> str | None:
    """``None`` if ``max|got - ref| <= tol * max(1, max|ref|)`` (NaN fails), else what differs."""
    err = (got.double() - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    return None if err <= bound else f"{name} max err {err:.2e} > {bound:.2e}"


def check_outputs(attn, inputs: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> tuple[str, str | None]:
    """``attn``'s output, and gradients if it has a backward, on ``inputs = (q, k, v, grad_out)``
    against ``ref = (out, dq, dk, dv)``: (``ok``, ``ok fwd`` without a backward, or ``WRONG``;
    the errors, or ``None``)."""
    q, k, v, grad_out = inputs
    out_tol, grad_tol = TOLERANCES[q.dtype]
    with torch.no_grad():
        bad = [mismatch("out", attn(q, k, v), ref[0], out_tol)]
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    try:
        grads = torch.autograd.grad(attn(*leaves), leaves, grad_out)
    except Exception:  # noqa: BLE001  (no backward: time_impl says why in its fwd+bwd note)
        grads = None
    if grads is not None:
        bad += [mismatch(name, g, r, grad_tol) for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:])]
    errors = "; ".join(b for b in bad if b)
    return ("WRONG" if errors else "ok" if grads is not None else "ok fwd"), errors or None


def time_impl(attn, sets: list[tuple[torch.Tensor, ...]], args, device) -> tuple[float, float | str]:
    """Forward seconds of ``attn`` and forward+backward seconds (or why not), calls rotating over
    ``sets`` (see ``make_inputs``)."""
    calls = iter(range(1 << 62))

    def fwd():
        q, k, v, _ = sets[next(calls) % len(sets)]
        with torch.no_grad():
            attn(q, k, v)

    grads = [tuple(t.clone().requires_grad_() for t in qkv[:3]) + (qkv[3],) for qkv in sets]

    def fwd_bwd():
        qg, kg, vg, grad_out = grads[next(calls) % len(grads)]
        torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), grad_out)

    fwd_s = median_seconds(fwd, device, args.warmup, args.repeats)
    try:
        return fwd_s, median_seconds(fwd_bwd, device, args.warmup, args.repeats)
    except Exception as e:  # noqa: BLE001  (a baseline without backward still has a forward)
        return fwd_s, _reason(e)


def _reason(e: BaseException) -> str:
    """One line: ``e``'s root cause (what a compile under fullgraph met, not dynamo's wrapper)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def run_device(device: torch.device, args) -> None:
    args = with_defaults(args, device)
    if args.q_heads % args.kv_heads:
        raise SystemExit(f"--q-heads={args.q_heads} must be a multiple of --kv-heads={args.kv_heads}")
    if device.type == "cuda" and (args.repeats < 20 or args.warmup < 1):
        raise SystemExit(f"--repeats={args.repeats} --warmup={args.warmup}: on CUDA take the median of at least "
                         "20 calls after at least 1 warm-up")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    seq_len = args.seq_len
    try:  # parse_args checked it; a Namespace built otherwise may not be
        kept = kept_keys(args.budget, seq_len, args.sinks)
    except ValueError as e:
        raise SystemExit(f"--budget={args.budget} {e}") from None
    window = kept - args.sinks
    logs = {
        "dense": torch.full((seq_len,), INT32_MAX, dtype=torch.int32),
        f"{kept / seq_len:.0%}": streaming_evicted_at(seq_len, args.sinks, window),
    }
    threads = f", {torch.get_num_threads()} threads, {_C.cpu_isa()} kernels" if device.type == "cpu" else ""
    print(f"\n== {device.type}{threads}: B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} "
          f"L={seq_len} D={args.head_dim} {str(dtype).removeprefix('torch.')}; "
          f"kept = {args.sinks} sinks + {window} window = {kept} keys; "
          f"median of {args.repeats} after {args.warmup} warm-up, {args.sets} input set(s); "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
                                          if device.type == "cuda" else ""))
    print(f"{'mask':>6} {'impl':>11} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10} {'check':>7}")

    results: dict[tuple[str, str], tuple[float, float | str]] = {}
    wrong: set[tuple[str, str]] = set()  # (mask, impl) whose outputs differ from the reference
    notes = []
    # impl -> (fwd, fwd+bwd, check, errors) reused under every mask
    timed_once: dict[str, tuple[float, float | str, str, str | None]] = {}
    inputs = make_inputs(args, device, dtype)
    evicted_at = {name: log.to(device).expand(args.batch, args.kv_heads, seq_len).contiguous()
                  for name, log in logs.items()}
    refs: dict[str, tuple[torch.Tensor, ...]] = {}  # mask -> reference on inputs[0], when first needed
    impls_of = {mask_name: make_impls(evicted_at[mask_name], args, device) for mask_name in logs}
    # The newest kernels go after everything else: should a change to them bring an illegal
    # address, it poisons the CUDA context only after every other measurement is printed.
    order = [(m, i) for late in (False, True) for m in logs for i in impls_of[m] if (i in UNTRIED_IMPLS) == late]
    for mask_name, impl_name in order:
        attn = impls_of[mask_name][impl_name]
        if isinstance(attn, str):
            notes.append(f"{impl_name} ({mask_name}) skipped: {attn}")
            continue
        try:
            if impl_name in timed_once:
                fwd, fwd_bwd, check, errors = timed_once[impl_name]
            else:
                ref_mask = "dense" if impl_name == "causal" else mask_name  # causal ignores the log
                if ref_mask not in refs:
                    refs[ref_mask] = reference(inputs[0], evicted_at[ref_mask])
                family = (ops.attention_kernel(impl_name) if impl_name in FAMILY_IMPLS
                          else contextlib.nullcontext())
                with family:
                    check, errors = check_outputs(attn, inputs[0], refs[ref_mask])
                    fwd, fwd_bwd = time_impl(attn, inputs, args, device)
                if impl_name == "causal":  # ignores the log: the same work under every mask
                    timed_once[impl_name] = fwd, fwd_bwd, check, errors
        except Exception as e:  # noqa: BLE001  (a failing baseline must not hide the others)
            if impl_name == "shadowkv":
                raise
            notes.append(f"{impl_name} ({mask_name}) skipped: {_reason(e)}")
            continue
        if isinstance(fwd_bwd, str):
            if impl_name == "shadowkv":
                raise RuntimeError(f"shadowkv backward failed: {fwd_bwd}")
            notes.append(f"{impl_name} ({mask_name}) fwd+bwd skipped: {fwd_bwd}")
        if errors:
            wrong.add((mask_name, impl_name))
            notes.append(f"{impl_name} ({mask_name}) WRONG, left out of the acceptance line: {errors}")
        results[mask_name, impl_name] = fwd, fwd_bwd
        ours_fwd, ours_fwd_bwd = results[mask_name, "shadowkv"]
        # Ratios: this implementation's time over shadowkv's under the same mask.
        if isinstance(fwd_bwd, str):
            fwd_bwd_ms, fwd_bwd_x = f"{'n/a':>11}", f"{'n/a':>10}"
        else:
            fwd_bwd_ms, fwd_bwd_x = f"{fwd_bwd * 1e3:11.2f}", f"{fwd_bwd / ours_fwd_bwd:10.2f}"
        print(f"{mask_name:>6} {impl_name:>11} {fwd * 1e3:10.2f} {fwd_bwd_ms} "
              f"{fwd / ours_fwd:7.2f} {fwd_bwd_x} {check:>7}", flush=True)
    print("(x = time / shadowkv time under the same mask; > 1 means shadowkv is faster; check: against the float64 "
          "reference on input set 0, ok fwd = no backward to check)")
    for note in notes:
        print("note:", note)
    budget_name = list(logs)[1]
    dense, budget = results["dense", "shadowkv"], results[budget_name, "shadowkv"]
    print(f"shadowkv dense / {budget_name} ({device.type}): fwd {dense[0] / budget[0]:.2f}x, "
          f"fwd+bwd {dense[1] / budget[1]:.2f}x"
          + (" (WRONG outputs, see the notes)" if {("dense", "shadowkv"), (budget_name, "shadowkv")} & wrong else ""))
    print(acceptance_line(results, budget_name, wrong))


def acceptance_line(results: dict[tuple[str, str], tuple[float, float | str]], mask_name: str,
                    wrong: set[tuple[str, str]] = frozenset()) -> str:
    """The issue's two attention targets under ``mask_name`` for the fastest shadowkv kernel choice
    (the default or a named family) by fwd+bwd time: >= 1.5x FlexAttention and faster than dense
    causal SDPA. ``results[mask, impl] = (fwd s, fwd+bwd s or a reason it was skipped)``; the
    ``(mask, impl)`` in ``wrong`` failed the output check and count as not run."""
    def fwd_bwd(impl: str) -> float | None:
        t = results.get((mask_name, impl), (None, "not run"))[1]
        return None if isinstance(t, str) or (mask_name, impl) in wrong else t

    ours = {impl: fwd_bwd(impl) for (m, impl) in results
            if m == mask_name and (impl == "shadowkv" or impl in FAMILY_IMPLS) and fwd_bwd(impl) is not None}
    if not ours:
        return f"fastest shadowkv choice at {mask_name}: none ran fwd+bwd with outputs that pass the check"
    best = min(ours, key=ours.get)
    parts = [f"fastest shadowkv choice at {mask_name}: {best} {ours[best] * 1e3:.2f} ms fwd+bwd"]
    for base, need in (("flex", ">= 1.5x"), ("causal", "> 1x")):
        t = fwd_bwd(base)
        parts.append(f"{base} {'n/a' if t is None else f'{t / ours[best]:.2f}x'} (need {need})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    for name in devices_of(args):
        if name == "cuda" and args.dtype == "float64":  # --device auto: the CPU's rows only
            print("cuda: skipped (float64 runs on the CPU kernels only)")
            continue
        run_device(torch.device(name), args)


if __name__ == "__main__":
    main()
