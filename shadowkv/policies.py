"""Eviction policies: they decide *which* slots survive; the kernels move and log them.

A policy sees one sequence of one layer at a time: the positions held by each KV head's
live slots and, for score-based policies, an attention score per slot accumulated by the
sampler (from ``paged_decode_attention(scores_out=...)`` during decode and from the
prefill attention). It returns ``keep [Hkv, n]`` bool with exactly ``n_keep`` True per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def budget_tokens(budget: int | float | None, length: int) -> int | None:
    """Live tokens allowed for a sequence of ``length`` tokens: an int is absolute, a float
    in (0, 1] a fraction of the current length; ``None`` means no eviction."""
    if budget is None:
        return None
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget as a fraction must be in (0, 1], got {budget}")
        return max(1, math.ceil(budget * length))
    if budget < 1:
        raise ValueError(f"budget in tokens must be >= 1, got {budget}")
    return int(budget)


def _keep_top(score: torch.Tensor, forced: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``forced [H, n]`` slots plus the best-scoring others, ``n_keep`` per head."""
    s = score.double().masked_fill(forced, math.inf)
    idx = s.topk(min(n_keep, s.shape[-1]), dim=-1).indices
    return torch.zeros_like(forced).scatter_(-1, idx, True)


def _recent(positions: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most recent positions of each head, as a mask ``[H, n]``."""
    mask = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    if count > 0:
        idx = positions.topk(min(count, positions.shape[-1]), dim=-1).indices
        mask.scatter_(-1, idx, True)
    return mask


class Policy:
    """Base class. ``needs_scores``: the sampler accumulates attention scores per slot."""

    needs_scores = False
    #: reset the accumulated scores after each eviction (score = attention since then).
    reset_scores_after_evict = False
    name = "policy"

    def select(self, positions: torch.Tensor, scores: torch.Tensor | None, n_keep: int) -> torch.Tensor:
        """positions: ``[Hkv, n]`` int32; scores: ``[Hkv, n]`` float32 or None -> keep ``[Hkv, n]`` bool."""
        raise NotImplementedError

    def reset(self, seed: int) -> None:
        """Called by the sampler at the start of each ``generate(seed=...)``, so that
        stochastic policies replay identically for the same seed."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class FullCache(Policy):
    """No eviction (the dense baseline); the sampler never calls ``select``."""

    name = "full"

    def select(self, positions, scores, n_keep):
        return torch.ones(positions.shape, dtype=torch.bool, device=positions.device)


class StreamingLLM(Policy):
    """Attention sinks (the first ``sinks`` positions) plus the most recent tokens."""

    name = "streaming"

    def __init__(self, sinks: int = 4):
        self.sinks = sinks

    def select(self, positions, scores, n_keep):
        sink = positions < self.sinks
        n_sink = int(sink[0].sum())
        keep = _recent(positions.masked_fill(sink, -1), max(0, n_keep - n_sink))
        return keep | (sink & (torch.cumsum(sink.int(), -1) <= n_keep))


class H2O(Policy):
    """Heavy hitters (largest accumulated attention) plus a recent window (``recent_frac``
    of the budget)."""

    needs_scores = True
    name = "h2o"

    def __init__(self, recent_frac: float = 0.5):
        self.recent_frac = recent_frac

    def select(self, positions, scores, n_keep):
        recent = _recent(positions, int(round(self.recent_frac * n_keep)))
        return _keep_top(scores, recent, n_keep)


class SnapKV(Policy):
    """Observation-window voting: the last ``window`` tokens (at most half the budget) are
    kept, the others ranked by
    the attention they received from recent queries (prompt's last ``window`` queries at
    prefill, the decode queries since the last eviction afterwards), max-pooled over
    neighbouring slots with ``kernel`` so kept tokens come with their context."""

    needs_scores = True
    reset_scores_after_evict = True
    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be a positive odd number (centred pooling), got {kernel}")
        self.window, self.kernel = window, kernel

    def select(self, positions, scores, n_keep):
        pooled = F.max_pool1d(scores[None].float(), self.kernel, stride=1, padding=self.kernel // 2)[0]
        # At most half the budget goes to the window, so voting always selects something.
        recent = _recent(positions, min(self.window, n_keep // 2))
        return _keep_top(pooled, recent, n_keep)


class RandomEvict(Policy):
    """Keeps a uniformly random subset (a baseline), reproducible from ``seed``."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def reset(self, seed: int) -> None:
        self._gen.manual_seed(self.seed * 1_000_003 + seed)

    def select(self, positions, scores, n_keep):
        score = torch.rand(positions.shape, generator=self._gen).to(positions.device)
        return _keep_top(score, torch.zeros_like(score, dtype=torch.bool), n_keep)


POLICIES = {cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, RandomEvict)}


def make_policy(name: str, **kwargs) -> Policy:
    """Policy by name: full, streaming, h2o, snapkv, random."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
