"""Packing whole sequences into rows (shadowkv.packing): the first-fit placement, and the
sampler's packed prefill layout, whose shadow mask must let each prompt see only itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowkv.ops import NEVER_EVICTED, shadow_attention
from shadowkv.packing import PackedPrompts, first_fit_decreasing
from shadowkv.reference import shadow_attention_ref


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=12), st.integers(0, 6))
def test_first_fit_places_every_sequence_whole_and_apart(lengths, extra):
    cap = max(lengths) + extra
    row_of, slot_of, rows = first_fit_decreasing(lengths, cap)
    taken = set()
    for n, r, s in zip(lengths, row_of, slot_of):
        assert 0 <= r < rows and 0 <= s and s + n <= cap
        slots = {(r, s + j) for j in range(n)}
        assert not slots & taken
        taken |= slots
    assert rows <= len(lengths) and rows * cap >= sum(lengths)
    assert len({r for r in row_of}) == rows  # no empty row


def test_first_fit_refuses_a_sequence_longer_than_a_row():
    assert first_fit_decreasing([], 4) == ([], [], 1)
    with pytest.raises(ValueError, match="5 tokens does not fit a row of 4"):
        first_fit_decreasing([3, 5], 4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=7), st.sampled_from([(2, 1, 8), (4, 2, 5), (3, 3, 16)]),
       st.integers(0, 2**31 - 1))
def test_packed_prompts_attend_to_themselves_only(lens, geometry, seed):
    """Attention over the packed rows, with PackedPrompts.log, equals each prompt's causal
    attention alone (float64 reference: another prompt's key or a padding slot would show);
    the cache's chunks give each prompt's keys back."""
    Hq, Hkv, D = geometry
    g = torch.Generator().manual_seed(seed)
    p = PackedPrompts(lens, torch.device("cpu"))
    W = p.width
    q, k, v = (torch.randn(len(lens), H, W, D, generator=g, dtype=torch.float64) for H in (Hq, Hkv, Hkv))

    def packed(x):  # [b, H, W, D] right-padded -> [rows, H, W, D] packed
        return p.place(x.transpose(1, 2), 0.0).transpose(1, 2).contiguous()

    out = shadow_attention(packed(q), packed(k), packed(v), p.log(Hkv))
    assert out.shape == (p.rows, Hq, W, D)
    for i, n in enumerate(lens):
        ref, _ = shadow_attention_ref(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n],
                                      torch.full((1, Hkv, n), NEVER_EVICTED, dtype=torch.int32))
        r, first = p.slot(i)
        torch.testing.assert_close(out[r : r + 1, :, first : first + n], ref, atol=1e-12, rtol=1e-12)
    # The cache's chunks: every prompt once, each chunk right-padded to its longest and no
    # larger than the packed rows (short prompts filling a long one's row must not be padded
    # to it: that copy would dwarf the rows).
    seen = []
    for members, gather, positions in p.chunks:
        w = gather.shape[1]
        assert w == max(lens[i] for i in members) and len(members) * w <= p.rows * W
        assert torch.equal(positions, torch.arange(w, dtype=torch.int32).expand(len(members), w))
        got = p.unpack(packed(k), gather)
        for c, i in enumerate(members):
            assert torch.equal(got[c, :, : lens[i]], k[i, :, : lens[i]])
        seen += members
    assert sorted(seen) == list(range(len(lens)))
    ids = torch.arange(len(lens) * W).view(len(lens), W)
    placed = p.place(ids, -1)
    assert placed.shape == (p.rows, W) and (placed >= 0).sum() == sum(lens)
    for i, n in enumerate(lens):  # each prompt's last token is where the sampler reads its logits
        assert placed[p.last_row[i], p.last_col[i]] == ids[i, n - 1]
        assert p.positions[p.last_row[i], p.last_col[i]] == n - 1
