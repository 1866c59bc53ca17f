"""Eviction policies: the batched form (``select_batch``, what the sampler calls) agrees with
the one-sequence form on ragged, padded batches; every result keeps exactly ``n_keep`` slots
per head and nothing past a sequence's length; a policy written with either form works."""

from __future__ import annotations

import math

import pytest
import torch

from shadowkv.policies import H2O, FullCache, Policy, RandomEvict, SnapKV, StreamingLLM


def _ragged(lens, heads, seed):
    """Padded positions ``[n, H, S]`` (-1 past each length; each head holds a different sorted
    subset of positions, sinks first when held) and distinct scores."""
    g = torch.Generator().manual_seed(seed)
    S = max(lens) + 5
    pos = torch.full((len(lens), heads, S), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        for h in range(heads):
            rest = (torch.randperm(3 * n, generator=g)[: max(0, n - 2)] + 2).sort().values
            pos[i, h, :n] = torch.cat([torch.arange(min(n, 2)), rest])
    scores = torch.rand(len(lens), heads, S, generator=g).masked_fill(pos < 0, 0.0)
    return pos, scores


POLICIES = [StreamingLLM(sinks=2), H2O(), H2O(recent_frac=0.0), SnapKV(window=3, kernel=3), SnapKV(window=1, kernel=1)]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("seed", range(4))
def test_batch_matches_one_sequence_at_a_time(policy, seed):
    lens = [9, 1, 17, 4]
    n_keep = [4, 1, 5, 4]
    pos, scores = _ragged(lens, 3, seed)
    keep = policy.select_batch(pos, scores, lens, n_keep)
    assert keep.shape == pos.shape and keep.dtype == torch.bool
    for i, (n, k) in enumerate(zip(lens, n_keep)):
        assert not keep[i, :, n:].any(), "kept a slot past the length"
        assert (keep[i].sum(-1) == k).all()
        one = policy.select(pos[i, :, :n], scores[i, :, :n], k)
        assert torch.equal(one, keep[i, :, :n])


@pytest.mark.parametrize("policy", POLICIES + [StreamingLLM(sinks=6), RandomEvict(seed=4)], ids=repr)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied_scores"])
def test_choices_follow_positions_not_slots(policy, ties):
    """The cache's slot order is not position order after ``evict_compact(stable=False)``: the
    same positions and scores in shuffled slots (padding stays last) keep the same positions,
    including score ties (broken by position), SnapKV's pooling over neighbouring positions and
    RandomEvict's draws (same generator state)."""
    lens, n_keep = [9, 1, 17, 4], [4, 1, 5, 2]
    pos, scores = _ragged(lens, 3, 11)
    if ties:
        scores = (scores * 3).floor()
    policy.reset(0)
    keep = policy.select_batch(pos, scores, lens, n_keep)
    policy.reset(0)
    g = torch.Generator().manual_seed(12)
    perm = torch.arange(pos.shape[-1]).repeat(len(lens), 3, 1)
    for i, n in enumerate(lens):
        for h in range(3):
            perm[i, h, :n] = torch.randperm(n, generator=g)
    shuffled = policy.select_batch(pos.gather(-1, perm), scores.gather(-1, perm), lens, n_keep)
    assert torch.equal(torch.empty_like(shuffled).scatter_(-1, perm, shuffled), keep)


def _recent_plus_top(pos, scores, recent, n_keep):
    """Independent reference for one head: the ``recent`` latest positions, then the highest
    scores among the rest (scores distinct), as a set of positions."""
    pairs = list(zip(pos.tolist(), scores.tolist()))
    latest = sorted(pairs, key=lambda ps: -ps[0])[:recent]
    rest = sorted((p for p in pairs if p not in latest), key=lambda ps: -ps[1])[: n_keep - len(latest)]
    return {p for p, _ in latest + rest}


@pytest.mark.parametrize("policy, recent", [(H2O(), lambda k: (k + 1) // 2), (H2O(recent_frac=0.0), lambda k: 0),
                                            (SnapKV(window=3, kernel=1), lambda k: min(3, k // 2))], ids=str)
def test_score_policies_keep_recent_then_highest_scores(policy, recent):
    lens, n_keep = [9, 1, 17, 4], [4, 1, 7, 3]
    pos, scores = _ragged(lens, 2, 5)
    keep = policy.select_batch(pos, scores, lens, n_keep)
    for i, (n, k) in enumerate(zip(lens, n_keep)):
        for h in range(2):
            want = _recent_plus_top(pos[i, h, :n], scores[i, h, :n], recent(k), k)
            assert set(pos[i, h][keep[i, h]].tolist()) == want


def test_streaming_keeps_sinks_and_most_recent():
    pos = torch.tensor([[[0, 1, 5, 6, 9, 11, -1]]], dtype=torch.int32)
    keep = StreamingLLM(sinks=2).select_batch(pos, None, [6], [4])
    assert pos[keep].tolist() == [0, 1, 9, 11]


def test_design_constructor_forms_imply_a_budget():
    """DESIGN.md §4 spells StreamingLLM(sinks, window) and H2O(heavy, recent); the policies took
    only the split of the sampler's budget. Both forms work: the counts set policy.budget."""
    assert StreamingLLM(4, 12).budget == 16 and StreamingLLM(sinks=4).budget is None
    h2o = H2O(heavy=5, recent=3)
    assert h2o.budget == 8 and H2O().budget is None
    pos, scores = _ragged([20], 1, 3)
    keep = h2o.select_batch(pos, scores, [20], [8])
    assert set(pos[0, 0][keep[0, 0]].tolist()) == _recent_plus_top(pos[0, 0, :20], scores[0, 0, :20], 3, 8)
    for bad in (dict(heavy=4), dict(recent=4), dict(recent_frac=0.3, heavy=4, recent=4)):
        with pytest.raises(TypeError, match="heavy= and recent= together"):
            H2O(**bad)
    with pytest.raises(ValueError, match="H2O: heavy must be an int >= 0"):
        H2O(heavy=-1, recent=4)
    with pytest.raises(ValueError, match="StreamingLLM: sinks . window must be an int >= 1"):
        StreamingLLM(0, 0)


def test_streaming_sinks_past_int32_are_every_position():
    pos = torch.arange(8, dtype=torch.int32)[None, None]
    for sinks in (8, 2**31, 2**32 + 1):  # positions are int32: torch compared a wrapped count
        assert StreamingLLM(sinks=sinks).select_batch(pos, None, [8], [4])[0, 0].tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("policy", [H2O(), SnapKV(window=2, kernel=1)], ids=repr)
@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_non_finite_scores_never_displace_the_recent_window(policy, bad):
    """A +inf score tied with the forced recent slots and won by position, and NaN sorted above
    them: the newest tokens were dropped. Non-finite scores now rank inside the finite range."""
    pos = torch.arange(6, dtype=torch.int32)[None, None]
    scores = torch.tensor([[[bad, bad, 0.5, 0.1, 0.2, 0.3]]])
    keep = policy.select_batch(pos, scores, [6], [4])[0, 0]
    assert int(keep.sum()) == 4 and keep[4:].all()  # the recent two (H2O: half of 4; SnapKV: window 2)
    if bad == math.inf:
        assert keep[:2].all()
    else:
        assert keep[2] and not keep[:2].any()


@pytest.mark.parametrize("policy", [H2O(), SnapKV()], ids=repr)
def test_score_policies_without_scores_say_so(policy):
    pos = torch.arange(6, dtype=torch.int32)[None, None]
    with pytest.raises(TypeError, match="ranks slots by their attention scores"):
        policy.select_batch(pos, None, [6], [4])


def test_random_is_reproducible_and_counts_are_exact():
    pos, _ = _ragged([12, 3, 8], 2, 0)
    a, b = RandomEvict(seed=3), RandomEvict(seed=3)
    a.reset(7), b.reset(7)
    ka = a.select_batch(pos, None, [12, 3, 8], [5, 3, 1])
    assert torch.equal(ka, b.select_batch(pos, None, [12, 3, 8], [5, 3, 1]))
    assert ka.sum(-1).tolist() == [[5, 5], [3, 3], [1, 1]]
    assert not (ka & (pos < 0)).any()


def test_full_cache_keeps_everything():
    pos, _ = _ragged([5, 2], 2, 1)
    assert torch.equal(FullCache().select_batch(pos, None, [5, 2], [5, 2]), pos >= 0)


class _OnlyOne(Policy):
    def select(self, positions, scores, n_keep):  # the oldest n_keep slots
        return torch.arange(positions.shape[-1]).expand(positions.shape) < n_keep


def test_policy_with_only_select_gets_a_batched_form():
    pos, _ = _ragged([6, 3], 2, 2)
    keep = _OnlyOne().select_batch(pos, None, [6, 3], [2, 3])
    assert keep.sum(-1).tolist() == [[2, 2], [3, 3]] and not keep[1, :, 3:].any()


class _OldestStreaming(StreamingLLM):
    def select(self, positions, scores, n_keep):  # overrides only the one-sequence form
        return _OnlyOne().select(positions, scores, n_keep)


def test_subclass_overriding_only_select_is_what_the_batched_form_runs():
    pos = torch.tensor([[[0, 1, 5, 6, 9, 11, -1]]], dtype=torch.int32)
    keep = _OldestStreaming(sinks=2).select_batch(pos, None, [6], [3])
    assert pos[keep].tolist() == [0, 1, 5]  # the override's choice, not StreamingLLM's
    # choosing on its own, it is not taken for deterministic unless it says so
    assert StreamingLLM.deterministic and not _OldestStreaming.deterministic


def test_policy_with_neither_form_raises():
    with pytest.raises(NotImplementedError, match="neither"):
        Policy().select_batch(torch.zeros(1, 1, 2, dtype=torch.int32), None, [2], [1])
    with pytest.raises(NotImplementedError, match="neither"):
        Policy().select(torch.zeros(1, 2, dtype=torch.int32), None, 1)


def test_budget_kinds_follow_the_number_type_not_the_python_class():
    """A NumPy or torch float is a fraction like a Python float (np.float32(1.0) is the whole
    sequence, not one token); ints of any kind are tokens; anything else is a TypeError."""
    import numpy as np

    from shadowkv.policies import budget_tokens

    assert budget_tokens(np.float32(1.0), 100) == 100 and budget_tokens(torch.tensor(0.25), 100) == 25
    assert budget_tokens(np.int64(7), 100) == 7 and budget_tokens(0.5, 9) == 5 and budget_tokens(None, 9) is None
    for bad, err in ((float("nan"), ValueError), (0, ValueError), (True, TypeError), ("8", TypeError)):
        with pytest.raises(err, match="budget"):
            budget_tokens(bad, 10)


def test_snapkv_with_no_slots_keeps_nothing():
    keep = SnapKV().select_batch(torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 2, 0), [0], [0])
    assert keep.shape == (1, 2, 0) and keep.dtype == torch.bool


def test_fractional_budgets_round_up_the_decimal_not_its_binary_product():
    """0.07 * 100 is 7.000000000000001 in floating point; the budget is 7, as the decimal reads."""
    from fractions import Fraction

    import numpy as np

    from shadowkv.policies import budget_tokens

    for frac in (0.07, 0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.9):
        for n in range(1, 2001):
            assert budget_tokens(frac, n) == math.ceil(Fraction(str(frac)) * n), (frac, n)
    assert budget_tokens(0.07, 100) == 7 and budget_tokens(0.07, 101) == 8 and budget_tokens(0.001, 3) == 1
    assert budget_tokens(np.float32(0.07), 100) == 7 and budget_tokens(np.float64(0.07), 200) == 14


@pytest.mark.parametrize("make, err, message", [
    (lambda: H2O(recent_frac=1.5), ValueError, r"H2O: recent_frac must be in \[0, 1\].*1.5"),
    (lambda: H2O(recent_frac=-0.1), ValueError, "H2O: recent_frac"),
    (lambda: H2O(recent_frac=float("nan")), ValueError, "H2O: recent_frac"),
    (lambda: H2O(recent_frac="0.5"), TypeError, "H2O: recent_frac"),
    (lambda: StreamingLLM(sinks=-3), ValueError, "StreamingLLM: sinks must be an int >= 0, got -3"),
    (lambda: StreamingLLM(sinks=2.5), TypeError, "StreamingLLM: sinks must be an int >= 0, got 2.5"),
    (lambda: SnapKV(window=-4), ValueError, "SnapKV: window must be an int >= 1, got -4"),
    (lambda: SnapKV(window=0), ValueError, "SnapKV: window must be an int >= 1, got 0"),
    (lambda: SnapKV(kernel=0), ValueError, "SnapKV: kernel must be an int >= 1"),
    (lambda: SnapKV(kernel=3.0), TypeError, "SnapKV: kernel"),
    (lambda: SnapKV(kernel=4), ValueError, "odd"),
    (lambda: RandomEvict(seed=0.5), TypeError, "RandomEvict: seed must be an int"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_policy_arguments_out_of_range_are_refused(make, err, message):
    """Out of range they would silently choose other tokens (H2O's recent window over the
    budget evicts the newest tokens, a negative one keeps none)."""
    with pytest.raises(err, match=message):
        make()


def test_policy_arguments_at_their_bounds_and_numpy_ints_are_accepted():
    import numpy as np

    H2O(recent_frac=0.0), H2O(recent_frac=1), SnapKV(window=1, kernel=1)
    assert StreamingLLM(sinks=np.int64(3)).sinks == 3 and type(StreamingLLM(sinks=np.int64(3)).sinks) is int
    pos = torch.arange(12, dtype=torch.int32).view(1, 1, 12)
    keep = H2O(recent_frac=1.0).select_batch(pos, torch.rand(1, 1, 12), [12], [4])
    assert pos[keep].tolist() == [8, 9, 10, 11]  # the whole budget recent


def _snapkv_by_position(pos, scores, n_keep, window, kernel):
    """Reference for one head: the newest ``min(window, n_keep // 2)`` positions, then the rest by
    the max of the scores at the present positions within ``kernel // 2`` of theirs, the kept
    window's scores left out (ties to the lower position)."""
    pairs = dict(zip(pos.tolist(), scores.tolist()))
    latest = sorted(pairs, reverse=True)[: min(window, n_keep // 2)]
    r = kernel // 2
    pooled = {p: max((pairs[q] for q in pairs if abs(q - p) <= r and q not in latest), default=-math.inf)
              for p in pairs if p not in latest}
    rest = sorted(pooled, key=lambda p: (-pooled[p], p))[: n_keep - len(latest)]
    return set(latest) | set(rest)


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_snapkv_pools_over_positions_without_the_window(kernel):
    """SnapKV's pooling lends a token's votes to the tokens within kernel // 2 *positions*:
    pooled over adjacent slots, survivors of an earlier eviction far apart lent each other
    theirs; and the kept window's scores pooled into the tokens just before it (SnapKV's code
    and kvpress leave them out)."""
    lens, n_keep = [9, 1, 17, 30], [4, 1, 7, 12]
    pos, scores = _ragged(lens, 2, 5)  # positions with holes, as after evictions
    policy = SnapKV(window=3, kernel=kernel)
    keep = policy.select_batch(pos, scores, lens, n_keep)
    for i, (n, k) in enumerate(zip(lens, n_keep)):
        for h in range(2):
            want = _snapkv_by_position(pos[i, h, :n], scores[i, h, :n], k, 3, kernel)
            assert set(pos[i, h][keep[i, h]].tolist()) == want
    # The reviewer's case: one strong vote at 200 among survivors at 0-3, 40, 41, 200-207.
    pos = torch.tensor([[[0, 1, 2, 3, 40, 41, *range(200, 208)]]], dtype=torch.int32)
    scores = torch.zeros(pos.shape)
    scores[0, 0, 6] = 10.0
    keep = SnapKV(window=4, kernel=7).select_batch(pos, scores, [14], [8])
    assert pos[keep].tolist() == list(range(200, 208))
    # The window's high scores do not spill onto the tokens before it.
    pos = torch.arange(20, dtype=torch.int32)[None, None]
    scores = torch.zeros(1, 1, 20)
    scores[0, 0, 16:] = 5.0
    scores[0, 0, 2] = 1.0
    keep = SnapKV(window=4, kernel=7).select_batch(pos, scores, [20], [8])
    assert pos[keep].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]  # 0-5 tie with 2's vote: the lower ones
