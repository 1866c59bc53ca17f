"""Python face of the native ops: thin wrappers, fake (meta) kernels and autograd.

Every op lives in ``torch.ops.shadowkv`` (registered by ``shadowkv._C``); argument checks
happen in C++ so C++ and Python callers get the same errors.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)

NEVER_EVICTED = 2**31 - 1  # evicted_at value of a key that was never evicted (INT32_MAX)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("shadowkv::shadow_attention_fwd")
def _shadow_attention_fwd_fake(q, k, v, evicted_at, q_offset=0, scale=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("shadowkv::shadow_attention_bwd")
def _shadow_attention_bwd_fake(grad_out, q, k, v, evicted_at, out, lse, grad_lse, q_offset, scale):
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


def shadow_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_at: torch.Tensor,
    q_offset: int = 0,
    scale: float | None = None,
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

    Returns:
        ``out [B, Hq, Lq, D]`` (dtype of ``q``) and ``lse [B, Hq, Lq]`` (float32, float64
        for float64 inputs). Rows that see no key give ``out = 0`` and ``lse = -inf``.
        Differentiable w.r.t. ``q``, ``k``, ``v`` (through both outputs).
    """
    return torch.ops.shadowkv.shadow_attention_fwd(q, k, v, evicted_at, q_offset, scale)


def shadow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_at: torch.Tensor,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Shadow-masked attention ``[B, Hq, Lq, D]``; see :func:`shadow_attention_with_lse`."""
    return shadow_attention_with_lse(q, k, v, evicted_at, q_offset, scale)[0]
