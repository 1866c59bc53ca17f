"""A CPU demo of the shadow-mask contract (``shadowkv demo``).

A toy sampler decodes one attention layer (a few heads) token by token with a StreamingLLM cache
(sinks + recent window) and logs each eviction in ``evicted_at``. The learner then
replays the whole sequence in one ``shadow_attention`` call: with the log it reproduces
every step of the sampler; with a dense causal mask it does not.
"""

from __future__ import annotations

import math
import time

import torch

from .ops import NEVER_EVICTED, shadow_attention


def streaming_decode(q, k, v, sinks: int, budget: int):
    """Token-by-token attention over a cache of at most ``budget`` keys.

    Args:
        q, k, v: ``[1, H, L, D]`` float32, one query/key/value per position.
    Returns:
        ``out [1, H, L, D]`` as the sampler saw it, and ``evicted_at [1, H, L]`` int32.
    """
    _, H, L, D = q.shape
    evicted_at = torch.full((1, H, L), NEVER_EVICTED, dtype=torch.int32)
    out = torch.empty_like(q)
    alive = torch.zeros(L, dtype=torch.bool)
    oldest = sinks  # StreamingLLM evicts in arrival order, sinks excepted
    for t in range(L):
        alive[t] = True
        if t + 1 - (oldest - sinks) > budget and oldest < t:  # over budget: evict before step t
            alive[oldest] = False
            evicted_at[..., oldest] = t
            oldest += 1
        s = (q[..., t : t + 1, :] @ k[..., : t + 1, :].transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~alive[: t + 1], -math.inf)
        out[..., t : t + 1, :] = torch.softmax(s, -1) @ v[..., : t + 1, :]
    return out, evicted_at


def run(length: int = 1024, heads: int = 4, head_dim: int = 64, budget: float = 0.25, seed: int = 0) -> dict:
    """Runs the demo; returns the numbers it prints."""
    if length < 1:
        raise ValueError(f"length (--length) must be >= 1, got {length}")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget (--budget) must be a fraction in (0, 1], got {budget}")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
    kept = max(8, int(budget * length))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps are far too small to split across threads
    try:
        t0 = time.perf_counter()
        sampled, evicted_at = streaming_decode(q, k, v, sinks=4, budget=kept)
        t1 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    shadow = shadow_attention(q, k, v, evicted_at)
    t2 = time.perf_counter()
    dense = shadow_attention(q, k, v, torch.full_like(evicted_at, NEVER_EVICTED))
    return {
        "tokens": length,
        "kv_kept_fraction": min(kept, length) / length,
        "evicted_keys_per_head": int((evicted_at[0, 0] != NEVER_EVICTED).sum()),
        "shadow_vs_sampler_max_abs_diff": (shadow - sampled).abs().max().item(),
        "dense_vs_sampler_max_abs_diff": (dense - sampled).abs().max().item(),
        "sampler_seconds": t1 - t0,
        "replay_seconds": t2 - t1,
    }
