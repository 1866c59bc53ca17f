"""Python face of the native ops: thin wrappers, fake (meta) kernels and autograd.

Every op lives in ``torch.ops.shadowkv`` (registered by ``shadowkv._C``); argument checks
happen in C++ so C++ and Python callers get the same errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (registers the ops)

from .reference import INT32_MAX as NEVER_EVICTED  # evicted_at of a key never evicted


@contextlib.contextmanager
def _scoped_choice(what: str, var: str, names: tuple[str, ...], name: str) -> Iterator[None]:
    """Sets the kernel setting ``var`` (read by the C++ ops at every call) to ``name``, one of
    ``names`` (else a ValueError naming ``what``), while the block runs: for the whole process,
    through the extension's override (``_C.set_kernel_choice``), which takes precedence over the
    environment variable of that name and leaves the environment alone. Setting the environment
    itself while another thread's op read it (the ops run without the GIL) was undefined
    behaviour in POSIX. As with any process-wide setting, blocks restore the previous choice
    correctly when they nest; two threads' overlapping blocks may leave one's choice in force
    (``_C.kernel_choice`` shows it). Child processes do not inherit the choice."""
    if name not in names:
        raise ValueError(f"{what}: `name` must be one of {', '.join(names)}, got {name!r}")
    old = _C.set_kernel_choice(var, name)
    try:
        yield
    finally:
        _C.set_kernel_choice(var, old)


ATTENTION_KERNEL_ENV = "SHADOWKV_ATTENTION_KERNEL"
ATTENTION_KERNELS = ("auto", "cute", "wgmma", "wgmma_ws", "wgmma_wsb", "wgmma_wsf", "wgmma_fused", "wmma",
                     "simt")


def attention_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects the CUDA kernel family of ``shadow_attention`` (forward and backward) in the block.

    ``"auto"`` (the default: in builds with the CuTe kernels ``"wgmma"``, with ``"wgmma_ws"``'s
    forward at head dim 128, where it was the fastest forward on an H200; else ``"wmma"``), ``"cute"``
    (the CuTe kernels where they apply: bfloat16/float16, head dim 64/128, 16-byte aligned rows;
    else SIMT; a ValueError at the first call in a build without them, see
    ``_C.built_with_cute()``), ``"wgmma"`` (forward and backward on Hopper warpgroup MMAs on an
    sm_90 GPU with a build for 9.0a, else as ``"cute"``), ``"wgmma_ws"`` (a warp-specialised forward: a producer warpgroup loads K/V, two consumer
    warpgroups take turns on the tensor cores; wgmma's backward), ``"wgmma_wsb"`` (wgmma_ws's
    forward and a warp-specialised backward: in the dQ and the dK/dV kernel a producer warpgroup
    loads the partner tiles, two consumer warpgroups of 64 rows share them; opt-in, not yet run
    on a GPU), ``"wgmma_wsf"`` (wgmma_ws's forward and, at head dim 128, a one-pass
    warp-specialised backward: its dK/dV kernel computes dQ too, by atomics; wgmma_wsb's at head
    dim 64; opt-in, not yet run on a GPU),
    ``"wgmma_fused"`` (wgmma's forward and a one-pass backward: the dK/dV kernel also computes dQ
    and adds it to an fp32 workspace with atomics, so dQ's last bits vary from run to run; opt-in:
    it passed the GPU tests on an H200 but was slower than ``"wgmma"``'s two passes),
    ``"wmma"`` (WMMA tensor-core kernels where they apply, else SIMT), ``"simt"``. The
    two-warpgroup families ``"wgmma2"``, ``"wgmma2o"`` and ``"wgmma2_fused"`` were retired after
    losing on an H200 (bench/RESULTS.md): naming one is a ValueError. It sets the setting
    SHADOWKV_ATTENTION_KERNEL (over the environment variable of that name), which the CUDA ops
    read at every call, so it applies to the whole process while the block runs, including
    backward passes run inside it (autograd runs a CUDA backward on a thread of its own). CPU
    ops ignore it.
    """
    return _scoped_choice("attention_kernel", ATTENTION_KERNEL_ENV, ATTENTION_KERNELS, name)


CPU_ISA_ENV = "SHADOWKV_CPU_ISA"
CPU_ISAS = ("auto", "baseline", "avx2", "avx512")


def cpu_isa(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects the instruction set of the CPU kernels' hot loops in the block (csrc/cpu/isa.h).

    ``"auto"`` (the default: the AVX-512 copies where the CPU has AVX-512 F/VL/DQ/BW, else the
    AVX2+FMA copies where it has those, else the portable baseline), ``"baseline"``, ``"avx2"``,
    ``"avx512"`` (a ValueError at the first call on a CPU or build without them). Sets the
    setting SHADOWKV_CPU_ISA, which the CPU ops read at every call, for the whole process while
    the block runs (over the environment variable of that name); ``_C.cpu_isa()`` says what runs.
    """
    return _scoped_choice("cpu_isa", CPU_ISA_ENV, CPU_ISAS, name)


DECODE_KERNEL_ENV = "SHADOWKV_DECODE_KERNEL"
DECODE_KERNELS = ("auto", "warp", "pipelined", "mma", "mma_rows", "mma_rows_2stage")


def decode_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects the CUDA kernel of ``paged_decode_attention``'s partitions in the block.

    ``"warp"``: warps load the K/V rows they use straight from the pages (any dtype and head
    dim); ``"pipelined"``: each block streams its partition's rows through shared memory with
    asynchronous copies, several chunks in flight (bfloat16/float16, head dim 64/128, 16-byte
    aligned page rows; elsewhere as ``"warp"``); ``"mma"``: the same staging, with both
    products on the tensor cores (same conditions, and sm_80+); ``"mma_rows"`` and ``"auto"``
    (the default): mma with each warp instruction copying whole K/V rows instead of 32 bytes of
    each of 16 rows. On an H200 at B=64, 8k context, bf16, unchecked (bench/RESULTS.md,
    2026-11-27): mma_rows 0.66 ms (77% of copy bandwidth), mma 0.83 ms, pipelined 1.07 ms, warp
    3.97 ms. ``"mma_rows_2stage"``: mma_rows with a two-stage ring instead of three (less shared
    memory, more resident blocks; opt-in until a GPU has timed it). Sets the setting
    SHADOWKV_DECODE_KERNEL, which the CUDA op reads at every call, for the whole process while
    the block runs (over the environment variable of that name). CPU ops ignore it.
    """
    return _scoped_choice("decode_kernel", DECODE_KERNEL_ENV, DECODE_KERNELS, name)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _DtypeOf(NamedTuple):
    """A ``_check_fake_args`` dtype spec: the dtype of the argument ``name`` (the C++
    check_same_dtype, and its message)."""

    name: str
    dtype: torch.dtype


def _check_fake_args(ref, ref_name, specs):
    """The rank/dtype/device/shape checks of the C++ ops, for fake and meta tensors (torch.compile
    traces, or a meta tensor mixed with real ones, never reach the C++ checks); all tensors on
    the device of ``ref``, the argument named ``ref_name``.

    ``specs``: ``(name, tensor or None, layout, dtypes, shape)`` where ``layout`` is like
    ``"[B, T]"``, ``dtypes`` a tuple of accepted dtypes (or a ``_DtypeOf``) and ``shape`` a tuple
    of expected sizes (``None`` entries: any size). ``None`` tensors (absent optionals) are
    skipped.
    """
    for name, t, layout, dtypes, shape in specs:
        if t is None:
            continue
        if t.dim() != len(shape):
            raise ValueError(f"shadowkv: `{name}` must be a {len(shape)}-D tensor {layout}, got shape {list(t.shape)}")
        if isinstance(dtypes, _DtypeOf):
            if t.dtype != dtypes.dtype:
                raise TypeError(f"shadowkv: `{name}` must have the dtype of `{dtypes.name}` "
                                f"({_dtype_str(dtypes.dtype)}), got {_dtype_str(t.dtype)}")
        elif t.dtype not in dtypes:
            names = [_dtype_str(d) for d in dtypes]
            want = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            raise TypeError(f"shadowkv: `{name}` must be {want}, got {_dtype_str(t.dtype)}")
        if t.device != ref.device:
            raise ValueError(f"shadowkv: `{name}` must be on the device of `{ref_name}` ({ref.device}), got {t.device}")
        want = [got if w is None else w for got, w in zip(t.shape, shape)]
        if list(t.shape) != want:
            raise ValueError(f"shadowkv: `{name}` must have shape {want}, got {list(t.shape)}")


def _dtype_str(dtype: torch.dtype) -> str:
    """``int32`` for ``torch.int32``: the C++ checks' names (bindings' dtype_str)."""
    return str(dtype).removeprefix("torch.")


_INT32_MAX = 2**31 - 1
# The largest softmax scale the kernels take: scale * log2(e) finite in float32 (dtypes.h).
MAX_SOFTMAX_SCALE = torch.finfo(torch.float32).max / 1.4426950408889634


def _check_fake_scale_and_device_dtype(q, scale):
    """The attention ops' shared checks: an explicit ``scale`` (None: 1/sqrt(D), always valid),
    and ``q`` not float64 on CUDA."""
    if scale is not None and not 0.0 < scale <= MAX_SOFTMAX_SCALE:
        raise ValueError(f"shadowkv: `scale` must be positive and finite, at most FLT_MAX / log2(e) "
                         f"({MAX_SOFTMAX_SCALE:g}: the kernels compute in float32), got {scale:g}")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        raise TypeError("shadowkv: `q` float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA")


def _check_meta_args(q, k, v, evicted_at, q_offset=0, scale=None):
    """The C++ shadow_attention checks, for fake and meta tensors."""
    B, Hq, _, D = q.shape if q.dim() == 4 else (None,) * 4
    Hkv, Lk = (k.shape[1], k.shape[2]) if k.dim() == 4 else (None, None)
    _check_fake_args(q, "q", [
        ("q", q, "[B, Hq, Lq, D]", _FLOAT_DTYPES, (None,) * 4),
        ("k", k, "[B, Hkv, Lk, D]", _DtypeOf("q", q.dtype), (B, None, None, D)),
        ("v", v, "[B, Hkv, Lk, D]", _DtypeOf("q", q.dtype), (B, Hkv, Lk, D)),
        ("evicted_at", evicted_at, "[B, Hkv, Lk]", (torch.int32,), (B, Hkv, Lk)),
    ])
    if (Hq % Hkv != 0) if Hkv else Hq != 0:
        raise ValueError(f"shadowkv: the head count of `q` ({Hq}) must be a multiple of the head count of `k` ({Hkv})")
    _check_q_offset(q_offset, q.shape[2])
    _check_fake_scale_and_device_dtype(q, scale)


def _refuse_forward_ad(*tensors) -> None:
    """torch drops a custom op's forward-mode tangent without a word (the output's tangent is
    None, read as zero); the op has reverse mode only, so dual inputs are refused. Outside
    ``forward_ad.dual_level()`` (level -1) this is one attribute read."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return
    if any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError("shadowkv: shadow_attention has no forward-mode AD (jvp, make_dual); its tangent "
                                  "would be dropped silently. Use reverse mode: .backward() or torch.autograd.grad (torch.func's "
                                  "grad and vjp transforms do not support this op)")


def _check_q_offset(q_offset, q_len) -> None:
    """``0 <= q_offset <= INT32_MAX - Lq``; a bool is refused (True was taken as 1), and a value
    past int64 is named here rather than by torch's schema ("expected int, found int")."""
    if isinstance(q_offset, bool):
        raise TypeError("shadowkv: `q_offset` must be an int, got a bool")
    if q_offset < 0:
        raise ValueError(f"shadowkv: `q_offset` must be >= 0, got {q_offset}")
    if q_offset > _INT32_MAX - q_len:
        raise ValueError(f"shadowkv: `q_offset` ({q_offset}) + Lq ({q_len}) exceeds the int32 positions of "
                         f"`evicted_at`")


@torch.library.register_fake("shadowkv::shadow_attention_fwd")
def _shadow_attention_fwd_fake(q, k, v, evicted_at, q_offset=0, scale=None):
    _check_meta_args(q, k, v, evicted_at, q_offset, scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("shadowkv::shadow_attention_bwd")
def _shadow_attention_bwd_fake(grad_out, q, k, v, evicted_at, out, lse, grad_lse, q_offset, scale):
    _check_meta_args(q, k, v, evicted_at, q_offset, scale)
    lse_shape = tuple(q.shape[:3])
    _check_fake_args(q, "q", [
        ("grad_out", grad_out, "[B, Hq, Lq, D]", _DtypeOf("q", q.dtype), tuple(q.shape)),
        ("out", out, "[B, Hq, Lq, D]", _DtypeOf("q", q.dtype), tuple(q.shape)),
        ("lse", lse, "[B, Hq, Lq]", (_lse_dtype(q),), lse_shape),
        ("grad_lse", grad_lse, "[B, Hq, Lq]", (_lse_dtype(q),), lse_shape),
    ])
    fmt = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=fmt),
        torch.empty_like(k, memory_format=fmt),
        torch.empty_like(v, memory_format=fmt),
    )


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, evicted_at, q_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, evicted_at, out, lse)
    ctx.q_offset = q_offset
    ctx.scale = scale


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, evicted_at, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.shadowkv.shadow_attention_bwd(
        grad_out, q, k, v, evicted_at, out, lse, grad_lse, ctx.q_offset, ctx.scale
    )
    return dq, dk, dv, None, None, None


torch.library.register_autograd(
    "shadowkv::shadow_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


def _bwd_backward(ctx, *grads):
    raise RuntimeError("shadowkv: shadow_attention has no double backward (its gradients are not differentiable); "
                       "create_graph=True works as long as nothing differentiates them again")


# Without a registration torch's fallback would give second derivatives of 0 with a warning.
torch.library.register_autograd(
    "shadowkv::shadow_attention_bwd", _bwd_backward, setup_context=lambda ctx, inputs, output: None
)


_INT_DTYPES = (torch.int32, torch.int64)


def mask_padding(evicted_at: torch.Tensor, seq_lens: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The shadow mask of right-padded sequences: every key of sequence ``b`` evicted at position
    ``seq_lens[b]`` at the latest, i.e. ``min(evicted_at[b], seq_lens[b])``.

    Queries before ``seq_lens[b]`` see exactly what they saw: causally, only keys before them,
    all of them the sequence's own. No query sees a padding key, and padding queries (positions
    ``>= seq_lens[b]``) see no key, so :func:`shadow_attention` gives them ``out = 0``,
    ``lse = -inf`` and no gradient, and its kernels skip their tiles whole (the per-tile
    min/max of the log) instead of attending over the padding. This is the ``seq_lens``
    variant of DESIGN.md §2: the kernels need no other argument.

    Args:
        evicted_at: ``[B, ..., L]`` int32 (``[B, Hkv, Lk]`` for one call, or a rollout's
            ``[B, layers, Hkv, T]`` to mask every layer at once).
        seq_lens: ``[B]`` int32/int64 tokens of each sequence, on the device of ``evicted_at``
            or the CPU.
        check: raise ``ValueError`` unless every ``seq_lens[b]`` is in ``[0, L]``. On CUDA this
            reads ``seq_lens`` back (one sync). Without the check (or on meta tensors, or while
            torch.compile traces), values are clamped to ``[0, L]`` (a negative length masks
            the whole sequence).

    Returns:
        A new contiguous int32 tensor, the shape of ``evicted_at``.
    """
    for name, t in (("evicted_at", evicted_at), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"shadowkv: `{name}` must be a tensor, got {type(t).__name__}")
    if evicted_at.dim() < 2:
        raise ValueError(f"shadowkv: `evicted_at` must be a tensor [B, ..., L] of at least 2 dimensions, got shape "
                         f"{list(evicted_at.shape)}")
    if evicted_at.dtype != torch.int32:
        raise TypeError(f"shadowkv: `evicted_at` must be int32, got {_dtype_str(evicted_at.dtype)}")
    if seq_lens.dtype not in _INT_DTYPES:
        raise TypeError(f"shadowkv: `seq_lens` must be an int32 or int64 tensor, got {_dtype_str(seq_lens.dtype)}")
    B, L = evicted_at.shape[0], evicted_at.shape[-1]
    if list(seq_lens.shape) != [B]:
        raise ValueError(f"shadowkv: `seq_lens` must have shape [{B}] (the batch of `evicted_at`), "
                         f"got {list(seq_lens.shape)}")
    if seq_lens.device not in (evicted_at.device, torch.device("cpu")):
        raise ValueError(f"shadowkv: `seq_lens` must be on the device of `evicted_at` ({evicted_at.device}) or the "
                         f"CPU, got {seq_lens.device}")
    # Value checks need data: not on meta tensors, nor in a torch.compile trace (as the fake
    # kernels); the clamp below still bounds every value.
    if check and B > 0 and seq_lens.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(seq_lens))
        if lo < 0 or hi > L:
            b = int(((seq_lens < 0) | (seq_lens > L)).nonzero()[0, 0])
            raise ValueError(f"shadowkv: `seq_lens`[{b}] = {int(seq_lens[b])} must be in [0, {L}] (the keys of "
                             f"`evicted_at`)")
    lens = seq_lens.clamp(0, L).to(device=evicted_at.device, dtype=torch.int32)
    return torch.minimum(evicted_at, lens.view(B, *(1,) * (evicted_at.dim() - 1))).contiguous()


def shadow_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_at: torch.Tensor,
    q_offset: int = 0,
    scale: float | None = None,
    *,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shadow-masked attention, also returning the log-sum-exp of each query row.

    Args:
        q: ``[B, Hq, Lq, D]`` float32/float64/bfloat16/float16 (float64 on CPU only).
        k, v: ``[B, Hkv, Lk, D]``, dtype and device of ``q``; ``Hq % Hkv == 0`` (GQA).
        evicted_at: ``[B, Hkv, Lk]`` int32, the shadow mask: key ``j`` is visible to the
            query at absolute position ``p`` iff ``j <= p < evicted_at[b, h, j]``
            (``NEVER_EVICTED`` = INT32_MAX for keys never evicted).
        q_offset: absolute position of query row 0 (``Lk - Lq`` for decode-style queries).
        scale: softmax scale, default ``1/sqrt(D)``.
        seq_lens: optional ``[B]`` int32/int64 (device of ``q`` or CPU), for right-padded
            batches: sequence ``b`` holds the keys and query positions below ``seq_lens[b]``
            (in ``[0, Lk]``; checked, one sync on CUDA, not while torch.compile traces). Query
            rows at or past it are padding (``out = 0``, ``lse = -inf``, no gradient), queries
            past the last key included, and cost next to nothing; no query sees a key past it.
            Same as passing ``mask_padding(evicted_at, seq_lens)``, which can skip the check.

    Returns:
        ``out [B, Hq, Lq, D]`` (dtype of ``q``) and ``lse [B, Hq, Lq]`` (float32, float64
        for float64 inputs). Rows that see no key give ``out = 0`` and ``lse = -inf``.
        Differentiable w.r.t. ``q``, ``k``, ``v`` (through both outputs). K/V slots that no
        query sees (e.g. padding with ``evicted_at = 0``, or past ``seq_lens``) may hold NaN:
        they affect no output or gradient, and their ``dk``, ``dv`` are 0.
        Padding query rows are read: keep them (and their rows of the output's gradient)
        finite, or a NaN there reaches ``dk``, ``dv``.
    """
    _refuse_forward_ad(q, k, v)
    if seq_lens is not None:
        # The op's own checks first, so that a bad q, k, v or log is named as without seq_lens.
        _check_meta_args(q, k, v, evicted_at, q_offset, scale)
        evicted_at = mask_padding(evicted_at, seq_lens)
    elif isinstance(q_offset, int) and isinstance(q, torch.Tensor) and q.dim() == 4:  # the C++ op checks the rest
        _check_q_offset(q_offset, q.shape[2])
    return torch.ops.shadowkv.shadow_attention_fwd(q, k, v, evicted_at, q_offset, scale)


def shadow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_at: torch.Tensor,
    q_offset: int = 0,
    scale: float | None = None,
    *,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shadow-masked attention ``[B, Hq, Lq, D]``; see :func:`shadow_attention_with_lse`."""
    return shadow_attention_with_lse(q, k, v, evicted_at, q_offset, scale, seq_lens=seq_lens)[0]


# --------------------------------------------------------------------------------------------
# Paged KV cache ops (one layer's cache; layout in shadowkv/reference.py and
# csrc/include/shadowkv/paged_kv.h). CPU and CUDA kernels; on CUDA each call copies the
# index tensors it validates to the host (one sync), see paged_kv.h.

def _check_paged_cache_fake(k_pages, v_pages, pos_pages, block_tables, seq_lens, ref, ref_name,
                            page_dtypes=_FLOAT_DTYPES):
    """Checks the cache tensors; returns ``(P, page_size, Hkv, D, B, max_pages)``."""
    any_ = (None,)
    _check_fake_args(ref, ref_name, [
        ("k_pages", k_pages, "[P, page_size, Hkv, D]", page_dtypes, any_ * 4),
        ("block_tables", block_tables, "[B, max_pages]", (torch.int32,), any_ * 2),
    ])
    P, ps, H, D = k_pages.shape
    B, M = block_tables.shape
    shape = list(k_pages.shape)
    for size, what in ((ps, "a page size (dim 1) >= 1"), (H, ">= 1 KV head (dim 2)"), (D, "a head dim (dim 3) >= 1")):
        if size < 1:  # as the kernels' check: a zero here would divide by zero below (GQA ratio)
            raise ValueError(f"shadowkv: `k_pages` must have {what}, got shape {shape}")
    _check_fake_args(ref, ref_name, [
        ("v_pages", v_pages, "[P, page_size, Hkv, D]", _DtypeOf("k_pages", k_pages.dtype), (P, ps, H, D)),
        ("pos_pages", pos_pages, "[P, page_size, Hkv]", (torch.int32,), (P, ps, H)),
        ("seq_lens", seq_lens, "[B]", (torch.int32,), (B,)),
    ])
    return P, ps, H, D, B, M


@torch.library.register_fake("shadowkv::append_kv")
def _append_kv_fake(k_pages, v_pages, pos_pages, block_tables, seq_lens, k, v, positions, num_new, check=True):
    _, _, H, D, B, _ = _check_paged_cache_fake(k_pages, v_pages, pos_pages, block_tables, seq_lens,
                                               k_pages, "k_pages")
    T = k.shape[2] if k.dim() == 4 else None
    _check_fake_args(k_pages, "k_pages", [
        ("k", k, "[B, Hkv, T, D]", _DtypeOf("k_pages", k_pages.dtype), (B, H, T, D)),
        ("v", v, "[B, Hkv, T, D]", _DtypeOf("k_pages", k_pages.dtype), (B, H, T, D)),
        ("positions", positions, "[B, T]", (torch.int32,), (B, T)),
        ("num_new", num_new, "[B]", (torch.int32,), (B,)),
    ])


def _paged_decode_attention_fake(q, k_pages, v_pages, block_tables, seq_lens, scale=None, scores_out=None,
                                 check=True):
    _check_fake_args(q, "q", [("q", q, "[B, Hq, D]", _FLOAT_DTYPES, (None,) * 3)])
    _, _, H, D, B, _ = _check_paged_cache_fake(k_pages, v_pages, None, block_tables, seq_lens, q, "q",
                                               page_dtypes=_DtypeOf("q", q.dtype))
    _check_fake_args(q, "q", [
        ("q", q, "[B, Hq, D]", (q.dtype,), (B, None, D)),
        ("scores_out", scores_out, "[B, Hkv, S]", (torch.float32,), (B, H, None)),
    ])
    if q.shape[1] % H != 0:
        raise ValueError(f"shadowkv: the head count of `q` ({q.shape[1]}) must be a multiple of the KV head "
                         f"count of `k_pages` ({H})")
    _check_fake_scale_and_device_dtype(q, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("shadowkv::paged_decode_attention")
def _paged_decode_attention_plain_fake(q, k_pages, v_pages, block_tables, seq_lens, scale=None, check=True):
    return _paged_decode_attention_fake(q, k_pages, v_pages, block_tables, seq_lens, scale, None, check)


torch.library.register_fake("shadowkv::paged_decode_attention_scores", _paged_decode_attention_fake)


@torch.library.register_fake("shadowkv::evict_compact")
def _evict_compact_fake(k_pages, v_pages, pos_pages, block_tables, seq_lens, keep, steps, evicted_at,
                        slot_scores=None, check=True, stable=True):
    _, _, H, _, B, M = _check_paged_cache_fake(k_pages, v_pages, pos_pages, block_tables, seq_lens,
                                               k_pages, "k_pages")
    S = keep.shape[2] if keep.dim() == 3 else None
    _check_fake_args(k_pages, "k_pages", [
        ("keep", keep, "[B, Hkv, S]", (torch.bool,), (B, H, S)),
        ("steps", steps, "[B]", (torch.int32,), (B,)),
        ("evicted_at", evicted_at, "[B, Hkv, T]", (torch.int32,), (B, H, None)),
        ("slot_scores", slot_scores, "[B, Hkv, S]", (torch.float32,), (B, H, S)),
    ])
    return block_tables.new_empty((B, M))


def append_kv(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    num_new: torch.Tensor,
    check: bool = True,
) -> None:
    """Appends new tokens to each sequence of a paged KV cache, in place.

    Args:
        k_pages, v_pages: ``[P, page_size, Hkv, D]`` float32/float64/bfloat16/float16 page
            pool (written; unit stride in the last dimension).
        pos_pages: ``[P, page_size, Hkv]`` int32, absolute position of each slot (written).
        block_tables: ``[B, max_pages]`` int32, page ids of each sequence in order (-1 = none);
            must already hold pages for every new slot. Sequences must not share a written page.
        seq_lens: ``[B]`` int32, slots in use (written: ``seq_lens[b] += num_new[b]``).
        k, v: ``[B, Hkv, T, D]``, dtype of the pages.
        positions: ``[B, T]`` int32 (>= 0), absolute position of each new token.
        num_new: ``[B]`` int32, ``0 <= num_new[b] <= T``: only the first ``num_new[b]`` tokens of
            sequence ``b`` are appended (ragged batches, prefill of many tokens at once).

    Token ``t`` of sequence ``b`` goes to slot ``seq_lens[b] + t``, i.e. row
    ``(seq_lens[b] + t) % page_size`` of page ``block_tables[b, (seq_lens[b] + t) // page_size]``,
    for every KV head. All tensors on one device (CPU or CUDA). Bad input raises
    ValueError/TypeError naming the argument, before anything is written.

    ``check=False`` (CUDA; the CPU op checks regardless): the values (lengths, ``num_new``,
    positions, written page ids) are not copied to the host, so there is no stream
    synchronisation and a decode step (this, then ``paged_decode_attention(check=False)``) can
    be captured in a CUDA graph. They are checked on the device instead: a sequence with bad
    ones is not written and its ``seq_lens`` entry becomes -1, which later calls reject
    (checked) or turn into NaN (unchecked decode). Not checked then: that no page is written
    twice, by two sequences or through two entries of one table (the writes would race).
    """
    torch.ops.shadowkv.append_kv(k_pages, v_pages, pos_pages, block_tables, seq_lens, k, v, positions, num_new,
                                 check)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    scores_out: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention of one query token per sequence over all its cached slots.

    Args:
        q: ``[B, Hq, D]``, dtype of the pages; ``Hq % Hkv == 0`` and query head ``hq`` reads KV
            head ``hq // (Hq // Hkv)`` (GQA).
        k_pages, v_pages: ``[P, page_size, Hkv, D]`` page pool (read only).
        block_tables: ``[B, max_pages]`` int32, page ids of each sequence (-1 = none).
        seq_lens: ``[B]`` int32; every one of the ``seq_lens[b]`` cached keys is visible (they
            all precede the query).
        scale: softmax scale, default ``1/sqrt(D)``.
        scores_out: optional ``[B, Hkv, S]`` float32 with ``S >= max(seq_lens)``, overwritten
            with the softmax probability of each slot summed over the query heads of its GQA
            group (for H2O-style accumulated scores), 0 for slots ``>= seq_lens[b]``.
        check: ``True`` checks ``seq_lens`` and ``block_tables`` before computing (ValueError
            on bad values); on CUDA that copies them to the host and synchronises the stream.
            ``False`` (CUDA): no copy and no synchronisation, so the call can be captured in a
            CUDA graph; the values are checked on the device instead, and a sequence whose
            length is outside ``[0, max_pages * page_size]`` (or above ``S``), or whose block
            table holds a page id outside ``[0, P)`` where it is read, gets NaN in ``out`` and
            in its ``scores_out`` rows. Nothing is read out of bounds either way. Workspaces
            then grow with ``max_pages * page_size`` (with ``scores_out``: ``S``) rather than
            the longest sequence. The CPU kernel checks regardless.

    Returns:
        ``out [B, Hq, D]`` (dtype of ``q``; float accumulation, double for float64); zeros for
        a sequence with no cached slot. CPU or CUDA (split-K over long contexts).
    """
    if scores_out is None:  # two ops: torch.compile cannot lower one whose only mutable argument is None
        return torch.ops.shadowkv.paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, scale, check)
    return torch.ops.shadowkv.paged_decode_attention_scores(q, k_pages, v_pages, block_tables, seq_lens, scale,
                                                            scores_out, check)


def evict_compact(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    steps: torch.Tensor,
    evicted_at: torch.Tensor,
    slot_scores: torch.Tensor | None = None,
    check: bool = True,
    stable: bool = True,
) -> torch.Tensor:
    """Evicts cache slots in place, logging each evicted key in the shadow mask.

    Args:
        k_pages, v_pages, pos_pages, block_tables, seq_lens: the cache (see
            :func:`append_kv`), all written.
        keep: ``[B, Hkv, S]`` bool, ``S >= max(seq_lens)``: which slots stay. Must be False for
            ``s >= seq_lens[b]``, and every KV head of a sequence must keep the same count.
        steps: ``[B]`` int32 (>= 0), the position of the next query of each sequence (the
            first query that no longer sees an evicted key).
        evicted_at: ``[B, Hkv, T]`` int32 eviction log (written; may be a strided view such as
            ``log[:, layer]`` of a ``[B, layers, Hkv, T]`` tensor). For each evicted slot holding
            position ``pos`` (``pos_pages``), ``evicted_at[b, h, pos] = steps[b]``; ``pos`` must be
            in ``[0, T)`` and not evicted before (still ``NEVER_EVICTED``).
        slot_scores: optional ``[B, Hkv, S]`` float32 per-slot scores, compacted like the slots
            (zeros past the new length).

    For each ``(b, h)`` the kept slots move down inside the sequence's own pages into slots
    ``0 .. n - 1``, ``seq_lens[b]`` becomes the kept count ``n``, and every block-table entry at
    index ``>= ceil(n / page_size)`` that holds a page is released (set to -1). How they move:

    - ``stable=True``: in order (slot ``i`` receives the ``i``-th kept slot). Every kept slot
      after the first evicted one moves: evicting a page of a StreamingLLM window rewrites the
      whole window.
    - ``stable=False`` ("fill"): the kept slots at or past ``n`` move, in order, into the evicted
      slots below ``n``, in order; the others stay put. At most ``min(evicted, kept)`` slots move
      (a page or so per eviction in a rollout's steady state), the same (position, k, v, score)
      set ends up in slots ``0 .. n - 1``, but slot order no longer follows position order
      (``pos_pages`` holds the positions; decode attention does not depend on the order).

    Returns:
        ``freed [B, max_pages]`` int32: the released page ids of each sequence in table order,
        -1 padded. CPU or CUDA. Bad input raises ValueError/TypeError naming
        the argument, before anything is written.

    ``check=False`` (CUDA; the CPU op checks regardless): the checks run on the device and
    nothing is copied to the host, so there is no stream synchronisation and the call can be
    captured in a CUDA graph. A sequence that fails them (the requirements above, a length
    outside ``[0, min(max_pages * page_size, S)]``, a block-table entry outside ``[-1, P)`` or -1
    where a slot is in use) is not written: its ``seq_lens`` entry becomes -1 (which later calls
    reject, or turn into NaN for an unchecked decode) and its ``freed`` row is all -1. Not
    checked then: that no page is written twice, by two sequences or through two entries of one
    table (the in-place compaction would read rows it already overwrote), and that no two
    evicted slots of a head hold the same position (only a corrupted ``pos_pages`` can; both log the same step).
    With ``check=True`` the CUDA op checks everything on the device too and copies one verdict
    to the host (one stream synchronisation); only a bad verdict copies the index tensors to the
    host, to raise the error that the CPU op raises.
    """
    return torch.ops.shadowkv.evict_compact(
        k_pages, v_pages, pos_pages, block_tables, seq_lens, keep, steps, evicted_at, slot_scores, check, stable
    )
