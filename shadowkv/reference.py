"""Float64 PyTorch references for the shadowkv ops, and eviction-log builders for tests/benches.

These functions are the ground truth the C++/CUDA kernels are tested against. They favour
clarity over speed: every intermediate is materialized and computed in float64.

The eviction log (DESIGN.md section 1): ``evicted_at[..., j]`` (int32) is the first absolute
query position that can no longer see key ``j``; ``INT32_MAX`` means key ``j`` was never
evicted. Query at absolute position ``p`` sees key ``j`` iff ``j <= p < evicted_at[..., j]``.
"""

from __future__ import annotations

import math

import torch

INT32_MAX = 2**31 - 1
"""``evicted_at`` value of a key that was never evicted."""

__all__ = [
    "INT32_MAX",
    "random_evicted_at",
    "shadow_attention_ref",
    "shadow_visible",
    "streaming_evicted_at",
]


def shadow_visible(evicted_at: torch.Tensor, q_len: int, q_offset: int = 0) -> torch.Tensor:
    """Which keys each query row sees under an eviction log.

    Args:
        evicted_at: ``[B, Hkv, Lk]`` integer tensor (int32 in the ops), any device.
        q_len: number of query rows ``Lq``; row ``i`` sits at absolute position ``q_offset + i``.
        q_offset: absolute position of query row 0 (>= 0).

    Returns:
        ``[B, Hkv, Lq, Lk]`` bool tensor on ``evicted_at.device``; ``[b, h, i, j]`` is True iff
        ``j <= q_offset + i < evicted_at[b, h, j]``.
    """
    kv_len = evicted_at.shape[-1]
    device = evicted_at.device
    # int64 positions: q_offset + i may exceed the int32 range of the log itself.
    pos = torch.arange(q_len, device=device, dtype=torch.int64).add_(q_offset)[:, None]
    key = torch.arange(kv_len, device=device, dtype=torch.int64)[None, :]
    causal = key <= pos  # [Lq, Lk]
    alive = pos < evicted_at.to(torch.int64)[..., None, :]  # [B, Hkv, Lq, Lk]
    return causal & alive


def shadow_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_at: torch.Tensor,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shadow-masked attention in float64, differentiable w.r.t. ``q``, ``k`` and ``v``.

    Args:
        q: ``[B, Hq, Lq, D]`` floating tensor, any dtype/device.
        k, v: ``[B, Hkv, Lk, D]``, same device as ``q``; ``Hq % Hkv == 0`` and query head ``h``
            reads KV head ``h // (Hq // Hkv)``.
        evicted_at: ``[B, Hkv, Lk]`` integer eviction log (see module docstring).
        q_offset: absolute position of query row 0.
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, Lq, D]`` float64 and ``lse`` ``[B, Hq, Lq]`` float64,
        the natural log of ``sum_j exp(scale * q_i . k_j)`` over visible keys. A row that sees
        no key has ``out = 0`` and ``lse = -inf``, and passes zero (never NaN) gradient back.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    group = num_q_heads // num_kv_heads

    q64, k64, v64 = q.double(), k.double(), v.double()
    # GQA: give every query head its own copy of its KV head (and of that head's mask).
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    visible = shadow_visible(evicted_at, q_len, q_offset).repeat_interleave(group, dim=1)

    scores = scale * (q64 @ k64.transpose(-1, -2))  # [B, Hq, Lq, Lk]
    scores = scores.masked_fill(~visible, -math.inf)
    # A row of all -inf makes softmax/logsumexp produce NaN values or gradients, so such rows
    # are computed on zeros instead and overwritten afterwards (masked_fill blocks their grad).
    has_key = visible.any(dim=-1, keepdim=True)  # [B, Hq, Lq, 1]
    scores = scores.masked_fill(~has_key, 0.0)

    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(~has_key, 0.0)
    out = probs @ v64
    lse = lse.masked_fill(~has_key, -math.inf).squeeze(-1)
    return out, lse


def streaming_evicted_at(length: int, sinks: int, window: int, evict_every: int = 1) -> torch.Tensor:
    """The eviction log a StreamingLLM sampler writes over ``length`` tokens.

    The sampler always keeps the first ``sinks`` keys, and keeps the ``window`` most recent
    keys (the current token's own key included). With ``evict_every == 1`` query ``p`` sees the
    sinks plus keys ``p - window < j <= p``, so key ``j >= sinks`` stops being visible at
    position ``j + window``.

    With ``evict_every = e > 1`` the cache is trimmed only before steps ``t`` that are multiples
    of ``e`` (the cache grows to at most ``sinks + window + e - 1`` keys in between), so key
    ``j`` is evicted at the first such ``t >= j + window``, i.e. ``ceil((j + window) / e) * e``.

    An eviction step ``>= length`` never happened within the sequence and is logged as
    ``INT32_MAX`` (either value gives the same mask for positions ``< length``).

    Args:
        length: number of tokens (keys and query positions ``0 .. length - 1``).
        sinks: number of leading keys that are never evicted (>= 0).
        window: number of most recent keys kept (>= 1: a query always sees its own key).
        evict_every: steps between two trims of the cache (>= 1).

    Returns:
        ``[length]`` int32 CPU tensor; ``.expand(B, Hkv, length)`` it for a batch.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query sees its own key), got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if evict_every < 1:
        raise ValueError(f"evict_every must be >= 1, got {evict_every}")
    key = torch.arange(length, dtype=torch.int64)
    step = torch.div(key + window + evict_every - 1, evict_every, rounding_mode="floor") * evict_every
    never = (key < sinks) | (step >= length)
    return torch.where(never, INT32_MAX, step).to(torch.int32)


def random_evicted_at(
    shape: tuple[int, ...] | torch.Size,
    horizon: int,
    keep: float = 0.25,
    sinks: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random but sampler-plausible eviction log, independent per (batch, KV head).

    Each key ``j`` (last dimension) is kept forever (``INT32_MAX``) when ``j < sinks`` or with
    probability ``keep``; otherwise it is evicted at a step drawn uniformly from
    ``j + 1 .. horizon`` (a key is written at step ``j`` and seen by its own query first;
    ``horizon`` = one past the last query position means "evicted after the rollout ended").

    Args:
        shape: shape of the log, typically ``(B, Hkv, Lk)``.
        horizon: one past the last absolute query position, e.g. ``q_offset + Lq``.
        keep: probability that a non-sink key is never evicted.
        sinks: number of leading keys never evicted.
        generator: optional CPU ``torch.Generator`` for reproducibility.

    Returns:
        int32 CPU tensor of ``shape``.
    """
    kv_len = shape[-1]
    key = torch.arange(kv_len, dtype=torch.int64)
    # Uniform in [j + 1, max(j + 1, horizon)] without a Python loop.
    span = (horizon - key).clamp(min=1).double()
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    step = key + 1 + torch.floor(u * span).to(torch.int64)
    kept = (torch.rand(shape, generator=generator) < keep) | (key < sinks)
    return torch.where(kept, INT32_MAX, step).to(torch.int32)
