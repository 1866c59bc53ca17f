"""Float64 PyTorch references for the shadowkv ops, and eviction-log builders for tests/benches.

These functions are the ground truth the C++/CUDA kernels are tested against. They favour
clarity over speed: every intermediate is materialized and computed in float64.

The eviction log (DESIGN.md section 1): ``evicted_at[..., j]`` (int32) is the first absolute
query position that can no longer see key ``j``; ``INT32_MAX`` means key ``j`` was never
evicted. Query at absolute position ``p`` sees key ``j`` iff ``j <= p < evicted_at[..., j]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

INT32_MAX = 2**31 - 1
"""``evicted_at`` value of a key that was never evicted."""

__all__ = [
    "INT32_MAX",
    "random_evicted_at",
    "shadow_attention_ref",
    "shadow_visible",
    "streaming_evicted_at",
    "EvictResult",
    "PagedState",
    "append_kv_ref",
    "evict_compact_ref",
    "gather_slots",
    "paged_decode_attention_ref",
    "random_paged_state",
    "slot_index",
    "streaming_keep",
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
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``, and ``1.0`` for ``D == 0`` (as
            the kernels: every logit is an empty dot product, 0, whatever the scale).

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, Lq, D]`` float64 and ``lse`` ``[B, Hq, Lq]`` float64,
        the natural log of ``sum_j exp(scale * q_i . k_j)`` over visible keys. A row that sees
        no key has ``out = 0`` and ``lse = -inf``, and passes zero (never NaN) gradient back.
        Empty shapes are valid: ``Hq == Hkv == 0`` (no heads) gives empty results, and
        ``D == 0`` gives an empty ``out`` and ``lse = log(number of visible keys)``.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if num_kv_heads == 0 and num_q_heads != 0:
        raise ValueError(f"the head count of `q` ({num_q_heads}) must be a multiple of the head count "
                         f"of `k` ({num_kv_heads})")
    # No heads at all: any group size repeats nothing.
    group = num_q_heads // num_kv_heads if num_kv_heads else 1

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


# ---------------------------------------------------------------------------
# Paged KV cache ops.
#
# PyTorch references for the paged KV cache ops, and a random cache builder for tests/benches.
#
# The references are functional: they never modify their inputs and return new tensors. They
# favour clarity over speed (Python loops over sequences and heads); attention is computed in
# float64, and data movement (append, compaction) is exact in the dtype of the pages.
#
# Layout of one layer's cache (DESIGN.md section 3):
#
# - ``k_pages, v_pages``: ``[P, page_size, Hkv, D]``, the page pool.
# - ``pos_pages``: ``[P, page_size, Hkv]`` int32, original position of the token in each slot,
#   per KV head.
# - ``block_tables``: ``[B, max_pages]`` int32, the page ids of each sequence in order, -1 = none.
#   Logical slot ``s`` of sequence ``b`` is row ``s % page_size`` of page
#   ``block_tables[b, s // page_size]``.
# - ``seq_lens``: ``[B]`` int32, slots in use per sequence (same for every KV head).


class PagedState(NamedTuple):
    """The five tensors of one layer's cache."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    pos_pages: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor

    def clone(self) -> PagedState:
        return PagedState(*(t.clone() for t in self))


class EvictResult(NamedTuple):
    """Everything :func:`evict_compact_ref` returns (the op's in-place results plus ``freed``)."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    pos_pages: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    evicted_at: torch.Tensor
    slot_scores: torch.Tensor | None
    freed: torch.Tensor


def slot_index(block_tables: torch.Tensor, b: int, length: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the logical slots ``0 .. length - 1`` of sequence ``b`` live.

    Returns:
        ``(pages, rows)``, two int64 tensors of shape ``[length]``: slot ``s`` is
        ``pool[pages[s], rows[s]]``.
    """
    slots = torch.arange(length)
    pages = block_tables[b].long()[slots // page_size]
    return pages, slots % page_size


def gather_slots(pool: torch.Tensor, block_tables: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """The first ``length`` logical slots of sequence ``b`` of a page pool, in slot order.

    Args:
        pool: ``[P, page_size, ...]`` (``k_pages``, ``v_pages`` or ``pos_pages``).

    Returns:
        ``[length, ...]`` (a copy), e.g. ``[length, Hkv, D]`` for ``k_pages``.
    """
    pages, rows = slot_index(block_tables, b, length, pool.shape[1])
    return pool[pages, rows]


def append_kv_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    num_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Appends the first ``num_new[b]`` tokens of each sequence after its cached slots.

    Args:
        k_pages, v_pages, pos_pages, block_tables, seq_lens: the cache (see module docstring);
            the block tables must already hold pages for the new slots.
        k, v: ``[B, Hkv, T, D]``, dtype of the pages.
        positions: ``[B, T]`` int32, the absolute position of each new token.
        num_new: ``[B]`` int32, ``0 <= num_new[b] <= T``.

    Returns:
        New ``(k_pages, v_pages, pos_pages, seq_lens)``; token ``t`` of sequence ``b`` sits in
        slot ``seq_lens[b] + t`` (every KV head), and ``seq_lens[b]`` grew by ``num_new[b]``.
    """
    k_pages, v_pages, pos_pages, seq_lens = (t.clone() for t in (k_pages, v_pages, pos_pages, seq_lens))
    page_size = k_pages.shape[1]
    for b in range(block_tables.shape[0]):
        start, n = int(seq_lens[b]), int(num_new[b])
        pages, rows = slot_index(block_tables, b, start + n, page_size)
        pages, rows = pages[start:], rows[start:]
        k_pages[pages, rows] = k[b, :, :n].transpose(0, 1)  # [n, Hkv, D]
        v_pages[pages, rows] = v[b, :, :n].transpose(0, 1)
        pos_pages[pages, rows] = positions[b, :n, None].to(pos_pages.dtype)  # same for every head
        seq_lens[b] = start + n
    return k_pages, v_pages, pos_pages, seq_lens


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    scores_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence against all its cached slots, in float64.

    Args:
        q: ``[B, Hq, D]``; query head ``hq`` reads KV head ``hq // (Hq // Hkv)`` (GQA).
        k_pages, v_pages, block_tables, seq_lens: the cache. Every cached slot is visible.
        scale: softmax scale, ``None`` means ``1 / sqrt(D)``.
        scores_len: last dimension ``S`` of the returned scores, default ``max(seq_lens)``.

    Returns:
        ``(out, scores)``: ``out`` ``[B, Hq, D]`` float64 (zeros for an empty sequence) and
        ``scores`` ``[B, Hkv, S]`` float64, the softmax probability of each slot summed over
        the query heads of its GQA group (0 past ``seq_lens[b]``).
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if scores_len is None:
        scores_len = int(seq_lens.max()) if batch else 0
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    scores = torch.zeros(batch, num_kv_heads, scores_len, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k = gather_slots(k_pages, block_tables, b, n).double().transpose(0, 1)  # [Hkv, n, D]
        v = gather_slots(v_pages, block_tables, b, n).double().transpose(0, 1)
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [Hq, n, D]
        logits = scale * torch.einsum("hd,hnd->hn", q[b].double(), k)
        probs = torch.softmax(logits, dim=-1)  # [Hq, n]
        out[b] = torch.einsum("hn,hnd->hd", probs, v)
        scores[b, :, :n] = probs.view(num_kv_heads, group, n).sum(1)
    return out, scores


def evict_compact_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pos_pages: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    steps: torch.Tensor,
    evicted_at: torch.Tensor,
    slot_scores: torch.Tensor | None = None,
    stable: bool = True,
) -> EvictResult:
    """Drops the slots with ``keep == False`` and logs them in the shadow mask.

    Args:
        k_pages, v_pages, pos_pages, block_tables, seq_lens: the cache.
        keep: ``[B, Hkv, S]`` bool, ``S >= max(seq_lens)``; False past ``seq_lens[b]``, and
            the same count of True per KV head of a sequence.
        steps: ``[B]`` int, the position of the next query of each sequence.
        evicted_at: ``[B, Hkv, T]`` int32 eviction log.
        slot_scores: optional ``[B, Hkv, S]`` float32 per-slot scores.
        stable: True: the kept slots keep their order; False: the kept slots at or past ``n``
            fill the evicted slots below ``n`` (both in slot order), the others stay.

    Returns:
        An :class:`EvictResult` of new tensors. For each ``(b, h)`` the kept slots move to slots
        ``0 .. n - 1`` as ``stable`` says (slots from ``n`` on keep their old contents), every evicted slot
        sets ``evicted_at[b, h, pos] = steps[b]``, ``seq_lens[b] = n``, ``slot_scores`` is
        compacted the same way with zeros from ``n`` on, and each block-table entry at index
        ``>= ceil(n / page_size)`` that holds a page becomes -1 and is listed, in table order,
        in ``freed [B, max_pages]`` int32 (-1 padded).
    """
    k_pages, v_pages, pos_pages, block_tables, seq_lens, evicted_at = (
        t.clone() for t in (k_pages, v_pages, pos_pages, block_tables, seq_lens, evicted_at))
    if slot_scores is not None:
        slot_scores = slot_scores.clone()
    batch, max_pages = block_tables.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    freed = torch.full((batch, max_pages), -1, dtype=torch.int32)
    for b in range(batch):
        length = int(seq_lens[b])
        pages, rows = slot_index(block_tables, b, length, page_size)
        new_len = length
        for h in range(num_kv_heads):
            kept = keep[b, h, :length]
            pos = pos_pages[pages, rows, h].long()
            evicted_at[b, h, pos[~kept]] = int(steps[b])
            new_len = int(kept.sum())
            if stable:
                src = kept.nonzero()[:, 0]
                dst = torch.arange(new_len)
            else:
                src = kept[new_len:].nonzero()[:, 0] + new_len
                dst = (~kept[:new_len]).nonzero()[:, 0]
            for pool in (k_pages, v_pages, pos_pages):
                pool[pages[dst], rows[dst], h] = pool[pages[src], rows[src], h]
            if slot_scores is not None:
                slot_scores[b, h, dst] = slot_scores[b, h, src]
                slot_scores[b, h, new_len:] = 0.0
        seq_lens[b] = new_len
        table = block_tables[b]
        released = table[math.ceil(new_len / page_size):]
        released_ids = released[released >= 0]
        freed[b, : released_ids.numel()] = released_ids
        released.fill_(-1)  # a view into table
    return EvictResult(k_pages, v_pages, pos_pages, block_tables, seq_lens, evicted_at, slot_scores, freed)


def streaming_keep(seq_lens: torch.Tensor, num_kv_heads: int, slots: int, sinks: int, window: int) -> torch.Tensor:
    """A StreamingLLM keep mask: the first ``sinks`` and the last ``window`` slots of each sequence.

    Args:
        seq_lens: ``[B]`` slots in use per sequence.
        num_kv_heads: ``Hkv``.
        slots: last dimension ``S >= max(seq_lens)``.
        sinks, window: counts of leading and trailing slots kept (>= 0).

    Returns:
        ``[B, Hkv, S]`` bool on ``seq_lens``' device, False past ``seq_lens[b]``.
    """
    s = torch.arange(slots, device=seq_lens.device)[None, :]
    n = seq_lens.long()[:, None]
    keep = (s < n) & ((s < sinks) | (s >= n - window))
    return keep[:, None, :].expand(-1, num_kv_heads, -1).contiguous()


def random_paged_state(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    *,
    max_pages: int | None = None,
    spare_pages: int = 0,
    preallocated: int = 0,
    dtype: torch.dtype = torch.float32,
    horizon: int | None = None,
    generator: torch.Generator | None = None,
) -> PagedState:
    """A random but consistent cache: every sequence owns distinct pages drawn at random from
    the pool, slots hold random K/V (unused slots random too, so stray reads show), and each
    KV head holds its own increasing positions in ``[0, horizon)`` (as after evictions).

    Args:
        seq_lens: the length of each sequence (``B = len(seq_lens)``).
        max_pages: block-table columns (default: just enough for the longest sequence plus
            ``preallocated``).
        spare_pages: pages in the pool that no sequence holds.
        preallocated: extra pages each sequence holds past its last used page (when the
            table has room), as a cache that reserves ahead does.
        horizon: positions are drawn from ``[0, horizon)``, default ``2 * max(seq_lens) + 1``.

    Returns:
        A :class:`PagedState` on the CPU.
    """
    gen = generator
    batch = len(seq_lens)
    used = [math.ceil(n / page_size) for n in seq_lens]
    if max_pages is None:
        max_pages = max(used, default=0) + preallocated
    held = [min(u + preallocated, max_pages) for u in used]
    if any(u > max_pages for u in used):
        raise ValueError(f"max_pages={max_pages} cannot hold sequences of lengths {seq_lens}")
    num_pages = sum(held) + spare_pages
    if horizon is None:
        horizon = 2 * max(seq_lens, default=0) + 1
    k_pages = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    pos_pages = torch.randint(-5, horizon + 5, (num_pages, page_size, num_kv_heads), generator=gen,
                              dtype=torch.int32)
    block_tables = torch.full((batch, max_pages), -1, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    first = 0
    for b, (n, h) in enumerate(zip(seq_lens, held)):
        block_tables[b, :h] = order[first: first + h]
        first += h
        pages, rows = slot_index(block_tables, b, n, page_size)
        for head in range(num_kv_heads):
            pos = torch.randperm(horizon, generator=gen)[:n].sort().values
            pos_pages[pages, rows, head] = pos.to(torch.int32)
    return PagedState(k_pages, v_pages, pos_pages, block_tables, torch.tensor(seq_lens, dtype=torch.int32))
