"""Eviction policies: they decide *which* slots survive; the kernels move and log them.

A policy sees the sequences of one layer that must shrink: the positions held by each KV
head's live slots and, for score-based policies, an attention score per slot accumulated by
the sampler (from ``paged_decode_attention(scores_out=...)`` during decode and from the
prefill attention). It returns which slots stay, exactly ``n_keep`` per head.

``select_batch`` takes many sequences at once, padded to the cache's slot count, so that the
sampler's eviction is a handful of tensor ops per layer rather than a Python loop over
sequences (on a GPU: a few kernel launches, no round trip per sequence). ``select`` is the
one-sequence form. A policy implements either; the base class derives the other.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from fractions import Fraction

import torch

from .cache import to_device


def budget_tokens(budget: int | float | None, length: int) -> int | None:
    """Live tokens allowed for a sequence of ``length`` tokens: an int is absolute, a float
    in (0, 1] a fraction of the current length, rounded up; ``None`` means no eviction. NumPy
    and torch scalars count by kind (``np.float32(1.0)`` is the whole sequence, not one token).
    A fraction is the decimal it prints as (``0.07`` of 100 tokens is 7, not the 8 that the
    binary ``0.07 * 100 = 7.000000000000001`` would round up to); a torch scalar is read as a
    Python float first."""
    if budget is None:
        return None
    if isinstance(budget, torch.Tensor) and budget.dim() == 0:
        budget = budget.item()
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        if budget < 1:
            raise ValueError(f"budget in tokens must be >= 1, got {budget}")
        return int(budget)
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget as a fraction must be in (0, 1], got {budget}")
        num, den = _decimal_ratio(budget)
        return max(1, -(-num * length // den))
    raise TypeError(f"budget must be an int (tokens), a float in (0, 1] (a fraction) or None, got {budget!r}")


@functools.lru_cache(maxsize=64, typed=True)  # the sampler asks for every length of every layer
def _decimal_ratio(fraction: numbers.Real) -> tuple[int, int]:
    """``fraction`` as the exact ratio of the shortest decimal that prints it (what was typed)."""
    return Fraction(str(fraction)).as_integer_ratio()


def as_int(name: str, value, low: int | None = 1) -> int:
    """``value`` as an int (Python, NumPy or 0-d torch integers; not bools or floats, which
    would be truncated), at least ``low``; the error names ``name``."""
    what = "an int" if low is None else f"an int >= {low}"
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    if low is not None and n < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return n


def _per_row(values: list[int], device: torch.device) -> torch.Tensor:
    """``n`` ints as ``[n, 1, 1]`` int64 on ``device``, to broadcast against ``[n, H, S]``."""
    return to_device(values, device, torch.int64)[:, None, None]


def _position_order(positions: torch.Tensor) -> torch.Tensor:
    """Slot indices ``[n, H, S]`` sorting each head's slots by position, padding (-1) last. The
    cache's slot order need not follow position order (``evict_compact(stable=False)``), so
    everything a policy decides goes by position: its choices do not depend on where the
    survivors of earlier evictions were put."""
    return positions.masked_fill(positions < 0, torch.iinfo(torch.int32).max).argsort(dim=-1, stable=True)


def _to_slots(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of ``gather(-1, perm)``: ``values[..., i]`` goes to slot ``perm[..., i]``
    (``perm`` a permutation of the last dimension, e.g. :func:`_position_order`)."""
    return torch.empty_like(values).scatter_(-1, perm, values)


def _top(key: torch.Tensor, count: torch.Tensor, by_pos: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count`` largest entries of ``key [n, H, S]`` along the last dimension
    (``count`` broadcasts against ``[n, H, 1]``; ties go to the lower position; ``by_pos``:
    :func:`_position_order` of the slots' positions)."""
    order = by_pos.gather(-1, key.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True))
    ranks = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return _to_slots(ranks, order) < count


def _keep_top(score: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor, n_keep: torch.Tensor,
              by_pos: torch.Tensor) -> torch.Tensor:
    """``forced`` slots plus the best-scoring other ``valid`` ones, ``n_keep [n, 1, 1]`` per head."""
    # Non-finite scores rank inside the finite range: +inf must not tie with the forced slots
    # (it would displace a recent one by position) and NaN, which sorts above +inf, must not
    # outrank them; NaN and -inf go last among the valid slots, above the padding.
    big = torch.finfo(torch.float64).max
    key = score.double().nan_to_num(nan=-big, posinf=big, neginf=-big)
    key = key.masked_fill(forced, math.inf).masked_fill(~valid, -math.inf)
    return _top(key, n_keep, by_pos) & valid


def _need_scores(policy, scores) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{type(policy).__name__} ranks slots by their attention scores ({type(policy).__name__}"
                        f".needs_scores): pass scores [n, Hkv, S], got {type(scores).__name__}")


def _recent(positions: torch.Tensor, count: torch.Tensor, by_pos: torch.Tensor) -> torch.Tensor:
    """The ``count`` most recent positions of each head; padding (-1) is never chosen."""
    return _top(positions, count, by_pos) & (positions >= 0)


class Policy:
    """Base class. ``needs_scores``: the sampler accumulates attention scores per slot."""

    needs_scores = False
    #: reset the accumulated scores after each eviction (score = attention since then).
    reset_scores_after_evict = False
    #: equal positions and scores give equal choices (no randomness): the sampler may then
    #: evict a prompt once and copy the survivors to its repeats.
    deterministic = False
    name = "policy"
    #: live tokens per sequence and layer that the constructor's arguments imply (DESIGN.md §4's
    #: ``StreamingLLM(sinks, window)``, ``H2O(heavy=, recent=)``); the sampler takes it when it
    #: is given no budget. None: the sampler's ``budget`` decides.
    budget: int | None = None

    def __init_subclass__(cls, **kwargs):
        # The form a class defines itself wins over an inherited one of the other form: a
        # subclass of a built-in policy that overrides only ``select`` must not be bypassed
        # by the built-in ``select_batch`` (which the sampler calls).
        # Likewise a class that chooses on its own (either form) is deterministic only if it
        # says so, whatever it inherits.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "select" in own and "select_batch" not in own:
            cls.select_batch = Policy.select_batch
        elif "select_batch" in own and "select" not in own:
            cls.select = Policy.select
        if ("select" in own or "select_batch" in own) and "deterministic" not in own:
            cls.deterministic = False

    def select(self, positions: torch.Tensor, scores: torch.Tensor | None, n_keep: int) -> torch.Tensor:
        """One sequence. positions: ``[Hkv, n]`` int32; scores: ``[Hkv, n]`` float32 or None ->
        keep ``[Hkv, n]`` bool. The default calls :meth:`select_batch`."""
        if type(self).select_batch is Policy.select_batch:  # neither form defined anywhere
            raise NotImplementedError(f"{type(self).__name__} implements neither select nor select_batch")
        return self.select_batch(positions[None], None if scores is None else scores[None], [positions.shape[-1]],
                                 [n_keep])[0]

    def select_batch(self, positions: torch.Tensor, scores: torch.Tensor | None, lens: list[int],
                     n_keep: list[int]) -> torch.Tensor:
        """Many sequences. positions: ``[n, Hkv, S]`` int32, -1 past ``lens[i]``; scores:
        ``[n, Hkv, S]`` float32 or None; lens, n_keep: ``n`` ints with ``n_keep[i] <= lens[i]``
        -> keep ``[n, Hkv, S]`` bool, False past ``lens[i]``. The default loops over
        :meth:`select`."""
        if type(self).select is Policy.select:  # neither form defined anywhere
            raise NotImplementedError(f"{type(self).__name__} implements neither select nor select_batch")
        keep = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        for i, (n, k) in enumerate(zip(lens, n_keep)):
            keep[i, :, :n] = self.select(positions[i, :, :n], None if scores is None else scores[i, :, :n], k)
        return keep

    def reset(self, seed: int) -> None:
        """Called by the sampler at the start of each ``generate(seed=...)``, so that
        stochastic policies replay identically for the same seed."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class FullCache(Policy):
    """No eviction (the dense baseline); the sampler never calls it."""

    deterministic = True
    name = "full"

    def select_batch(self, positions, scores, lens, n_keep):
        return positions >= 0


class StreamingLLM(Policy):
    """Attention sinks (the first ``sinks`` positions) plus the most recent tokens."""

    deterministic = True
    name = "streaming"

    def __init__(self, sinks: int = 4, window: int | None = None):
        """``window``: DESIGN.md §4's form, the most recent tokens kept beside the sinks; it sets
        :attr:`budget` to ``sinks + window`` (otherwise the sampler's budget is the sinks plus
        as many recent tokens as fit)."""
        # Positions are int32: a larger count means every position is a sink (compared as given,
        # torch would wrap it to int32).
        self.sinks = min(as_int("StreamingLLM: sinks", sinks, 0), 2**31 - 1)
        if window is not None:
            self.window = as_int("StreamingLLM: window", window, 0)
            self.budget = as_int("StreamingLLM: sinks + window", self.sinks + self.window)

    def select_batch(self, positions, scores, lens, n_keep):
        n_keep, by_pos = _per_row(n_keep, positions.device), _position_order(positions)
        sink = (positions >= 0) & (positions < self.sinks)
        recent = _recent(positions.masked_fill(sink, -1), (n_keep - sink.sum(-1, keepdim=True)).clamp(min=0), by_pos)
        # The first n_keep sinks when the budget is below them: the lowest positions.
        first = _top((-positions).masked_fill(~sink, torch.iinfo(torch.int32).min), n_keep, by_pos)
        return recent | (sink & first)


class H2O(Policy):
    """Heavy hitters (largest accumulated attention) plus a recent window (``recent_frac``
    of the budget)."""

    needs_scores = True
    deterministic = True
    name = "h2o"

    def __init__(self, recent_frac: float = 0.5, *, heavy: int | None = None, recent: int | None = None):
        """``heavy``, ``recent``: DESIGN.md §4's form, token counts (both or neither): the
        budget (:attr:`budget`) is ``heavy + recent``, of which ``recent`` are the newest."""
        if heavy is not None or recent is not None:
            if heavy is None or recent is None or recent_frac != 0.5:
                raise TypeError("H2O: give heavy= and recent= together (token counts), or recent_frac alone")
            heavy, recent = as_int("H2O: heavy", heavy, 0), as_int("H2O: recent", recent, 0)
            self.budget = as_int("H2O: heavy + recent", heavy + recent)
            recent_frac = Fraction(recent, heavy + recent)  # exact: frac * budget rounds to recent
        # Out of [0, 1] the recent window would be more than the budget (the heavy hitters then
        # displace the newest tokens) or negative (it would silently keep none).
        if isinstance(recent_frac, bool) or not isinstance(recent_frac, numbers.Real):
            raise TypeError(f"H2O: recent_frac must be a number in [0, 1], got {recent_frac!r}")
        if not 0.0 <= recent_frac <= 1.0:
            raise ValueError(f"H2O: recent_frac must be in [0, 1] (the budget's share of recent tokens), "
                             f"got {recent_frac!r}")
        self.recent_frac = recent_frac

    def select_batch(self, positions, scores, lens, n_keep):
        _need_scores(self, scores)
        dev, by_pos = positions.device, _position_order(positions)
        # Half up, exactly (round() went half to even: 0.5 of 5 kept 2 recent, 0.5 of 7 kept 4).
        frac = self.recent_frac if isinstance(self.recent_frac, Fraction) else Fraction(str(self.recent_frac))
        recent = _recent(positions, _per_row([math.floor(frac * k + Fraction(1, 2)) for k in n_keep], dev), by_pos)
        return _keep_top(scores, recent, positions >= 0, _per_row(n_keep, dev), by_pos)


class SnapKV(Policy):
    """Observation-window voting: the last ``window`` tokens (at most half the budget) are
    kept, the others ranked by
    the attention they received from recent queries (prompt's last ``window`` queries at
    prefill, afterwards the decode queries since the last eviction point: the prefill, an
    ``evict_every`` boundary, or the sequence's own last eviction),
    max-pooled over the positions within ``kernel // 2`` of each token (the kept window's own
    scores left out, as in SnapKV's code) so kept tokens come with their context. A KV head
    ranks by the attention its group of query heads gave, summed (the original keeps a cache
    per query head). With the sampler's ``prefill_chunk``, each chunk boundary votes with that
    chunk's last ``window`` queries (the prompt's later queries do not exist yet), over the
    survivors and the chunk."""

    needs_scores = True
    reset_scores_after_evict = True
    deterministic = True
    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7):
        # window 0 observed no query at the prefill: every score 0, the oldest tokens kept.
        window, kernel = as_int("SnapKV: window", window, 1), as_int("SnapKV: kernel", kernel)
        if kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be a positive odd number (centred pooling), got {kernel}")
        self.window, self.kernel = window, kernel

    def select_batch(self, positions, scores, lens, n_keep):
        _need_scores(self, scores)
        dev, valid = positions.device, positions >= 0
        if positions.shape[-1] == 0:  # no slots: nothing to choose
            return valid
        # At most half the budget goes to the window, so voting always selects something.
        by_pos = _position_order(positions)
        recent = _recent(positions, _per_row([min(self.window, k // 2) for k in n_keep], dev), by_pos)
        # As SnapKV's own code and kvpress: the window's scores are not pooled into the tokens
        # before it (it is kept anyway; local attention would make its neighbours look voted),
        # and padding never lends its score either.
        pooled = _max_pool_positions(scores.float().masked_fill(~valid | recent, -math.inf), positions, by_pos,
                                     self.kernel // 2)
        return _keep_top(pooled, recent, valid, _per_row(n_keep, dev), by_pos)


def _max_pool_positions(values: torch.Tensor, positions: torch.Tensor, by_pos: torch.Tensor,
                        radius: int) -> torch.Tensor:
    """Each slot's max of ``values [n, H, S]`` over the slots of its head whose positions lie
    within ``radius`` of its own: max pooling along the position axis, where earlier evictions
    left holes (pooling adjacent slots let tokens far apart lend each other their votes).
    ``by_pos``: :func:`_position_order`; padding (position -1) has no neighbours."""
    v = values.gather(-1, by_pos)
    # Positions are distinct per head, so a neighbour within `radius` positions is at most
    # `radius` slots away in position order.
    p = positions.long().masked_fill(positions < 0, 1 << 40).gather(-1, by_pos)
    out = v.clone()
    for d in range(1, min(radius, v.shape[-1] - 1) + 1):
        near = (p[..., d:] - p[..., :-d]) <= radius
        out[..., :-d] = torch.maximum(out[..., :-d], v[..., d:].masked_fill(~near, -math.inf))
        out[..., d:] = torch.maximum(out[..., d:], v[..., :-d].masked_fill(~near, -math.inf))
    return _to_slots(out, by_pos)


class RandomEvict(Policy):
    """Keeps a uniformly random subset (a baseline), reproducible from ``seed``.

    The i-th draw of a head goes to its i-th lowest position, not its i-th slot: the same
    generator state and the same positions choose the same positions whatever the cache's
    slot order (either compaction of ``evict_compact``). The draws still depend on the
    generator's history, i.e. on which sequences were evicted together before."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = as_int("RandomEvict: seed", seed, None)
        self._gen = torch.Generator().manual_seed(self.seed)

    def reset(self, seed: int) -> None:
        self._gen.manual_seed((self.seed * 1_000_003 + seed) % 2**63)

    def select_batch(self, positions, scores, lens, n_keep):
        by_pos = _position_order(positions)
        draws = to_device(torch.rand(positions.shape, generator=self._gen), positions.device)
        score = _to_slots(draws, by_pos)  # slot by_pos[i] gets draw i
        valid = positions >= 0
        return _keep_top(score, torch.zeros_like(valid), valid, _per_row(n_keep, positions.device), by_pos)


POLICIES = {cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, RandomEvict)}


def make_policy(name: str, **kwargs) -> Policy:
    """Policy by name: full, streaming, h2o, snapkv, random."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
