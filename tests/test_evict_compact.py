"""evict_compact (CPU): against the reference, a StreamingLLM round trip through all three paged
ops, torch.library registration and argument checks.

Eviction is pure data movement plus integer bookkeeping, so every result must equal
``evict_compact_ref`` exactly, in every dtype: the whole pool, the positions, the lengths, the
block tables, the freed pages, the eviction log and the compacted slot scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shadowkv import ops
from shadowkv.reference import INT32_MAX, streaming_evicted_at
from shadowkv.reference import (
    PagedState,
    evict_compact_ref,
    gather_slots,
    random_paged_state,
    streaming_keep,
)

EVICT = torch.ops.shadowkv.evict_compact
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
POLICIES = ["random", "streaming", "keep_all", "sinks_only", "nothing"]


def make_keep(policy: str, lens: list[int], kv_heads: int, slots: int, gen: torch.Generator, *,
              sinks: int = 2, window: int = 4, budget: int = 0) -> torch.Tensor:
    """A valid ``[B, Hkv, slots]`` keep mask: the same count per KV head, False past each length."""
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    if policy == "streaming":
        return streaming_keep(seq_lens, kv_heads, slots, sinks, window)
    if policy == "keep_all":  # budget >= length
        return streaming_keep(seq_lens, kv_heads, slots, 0, slots)
    if policy == "sinks_only":  # everything evicted but the sinks
        return streaming_keep(seq_lens, kv_heads, slots, sinks, 0)
    if policy == "nothing":
        return torch.zeros(len(lens), kv_heads, slots, dtype=torch.bool)
    keep = torch.zeros(len(lens), kv_heads, slots, dtype=torch.bool)
    for b, n in enumerate(lens):  # different slots per head, same count
        kept = min(budget, n)
        for h in range(kv_heads):
            keep[b, h, torch.randperm(n, generator=gen)[:kept]] = True
    return keep


def random_log(state: PagedState, log_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, Hkv, log_len]`` eviction log: positions no longer in the cache were evicted at random
    earlier steps, positions still cached were never evicted."""
    batch, kv_heads = state.block_tables.shape[0], state.k_pages.shape[2]
    log = torch.randint(0, 500, (batch, kv_heads, log_len), generator=gen, dtype=torch.int32)
    for b in range(batch):
        cached = gather_slots(state.pos_pages, state.block_tables, b, int(state.seq_lens[b])).long()
        for h in range(kv_heads):
            log[b, h, cached[:, h]] = INT32_MAX
    return log


@dataclass
class Case:
    lens: list[int]
    kv_heads: int
    head_dim: int
    page_size: int
    preallocated: int
    dtype: torch.dtype
    policy: str
    budget: int
    extra_slots: int        # S = max(lens) + extra_slots
    with_scores: bool
    log_in_layers: bool     # evicted_at as log[:, layer] of a [B, layers, Hkv, T] tensor
    seed: int
    stable: bool = True     # the op's `stable`: survivors in order, or the ones past n fill the holes

    def inputs(self):
        gen = torch.Generator().manual_seed(self.seed)
        state = random_paged_state(self.lens, self.kv_heads, self.head_dim, self.page_size,
                                   preallocated=self.preallocated, spare_pages=2, dtype=self.dtype, generator=gen)
        slots = max(self.lens, default=0) + self.extra_slots
        keep = make_keep(self.policy, self.lens, self.kv_heads, slots, gen, budget=self.budget)
        steps = torch.randint(0, 1000, (len(self.lens),), generator=gen, dtype=torch.int32)
        log_len = 2 * max(self.lens, default=0) + 1 + self.extra_slots  # random_paged_state's horizon + slack
        log = random_log(state, log_len, gen)
        if self.log_in_layers:
            full = torch.randint(0, 9, (len(self.lens), 3, self.kv_heads, log_len), generator=gen, dtype=torch.int32)
            full[:, 1] = log
            log = full[:, 1]
        scores = torch.rand(len(self.lens), self.kv_heads, slots, generator=gen) if self.with_scores else None
        return state, keep, steps, log, scores


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    lens = [draw(st.one_of(st.just(0), st.integers(1, 60))) for _ in range(batch)]
    case = Case(lens, kv_heads=draw(st.sampled_from([1, 2])), head_dim=draw(st.sampled_from([1, 7, 16, 33, 80])),
                page_size=draw(st.sampled_from([1, 4, 16])), preallocated=draw(st.integers(0, 2)),
                dtype=draw(st.sampled_from(DTYPES)), policy=draw(st.sampled_from(POLICIES)),
                budget=draw(st.integers(0, 40)), extra_slots=draw(st.integers(0, 3)),
                with_scores=draw(st.booleans()), log_in_layers=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)), stable=draw(st.booleans()))
    event(f"policy={case.policy}, page_size={case.page_size}, stable={case.stable}")
    return case


def run_and_compare(state: PagedState, keep, steps, log, scores, stable=True):
    expected = evict_compact_ref(*state, keep, steps, log, scores, stable=stable)
    pages_before = sorted(state.block_tables[state.block_tables >= 0].tolist())
    freed = ops.evict_compact(*state, keep, steps, log, scores, stable=stable)
    got = (*state, log, scores, freed)
    for name, a, b in zip(expected._fields, got, expected):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the reference"
    # Freed pages + pages still held = the pages held before, each once.
    kept_pages = state.block_tables[state.block_tables >= 0].tolist()
    freed_pages = freed[freed >= 0].tolist()
    assert sorted(kept_pages + freed_pages) == pages_before
    return freed


@settings(max_examples=400)
@given(case=cases())
def test_matches_reference(case):
    state, keep, steps, log, scores = case.inputs()
    if case.log_in_layers:
        full = log._base
        others = full[:, [0, 2]].clone()
        run_and_compare(state, keep, steps, log, scores, case.stable)
        assert torch.equal(full[:, [0, 2]], others), "other layers of the log were written"
    else:
        run_and_compare(state, keep, steps, log, scores, case.stable)


def test_named_scenarios():
    """The acceptance scenarios once each, deterministically: budget >= length, everything evicted
    but the sinks, everything evicted, an empty sequence, ragged lengths, a page of one slot."""
    for policy in POLICIES:
        for page_size, stable in ((1, True), (4, True), (16, True), (1, False), (16, False)):
            case = Case([37, 0, 16], 2, 80, page_size, 1, torch.float32, policy, budget=9, extra_slots=2,
                        with_scores=True, log_in_layers=True, seed=page_size)
            state, keep, steps, log, scores = case.inputs()
            try:
                run_and_compare(state, keep, steps, log, scores, stable)
            except AssertionError as e:
                raise AssertionError(f"policy {policy}, page_size {page_size}, stable {stable}: {e}") from e
            if policy == "nothing":
                assert (state.seq_lens == 0).all() and (state.block_tables == -1).all()
            if policy == "sinks_only":  # make_keep's 2 sinks survive, every other slot is logged
                assert state.seq_lens.tolist() == [2, 0, 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [1, 7, 33])
@pytest.mark.parametrize("stable", [True, False], ids=["stable", "fill"])
def test_odd_head_dims(head_dim, dtype, stable):
    """Odd head dims (a move loop's scalar tail), deterministically, with random and sinks-only
    keep masks (hypothesis draws them too, not every run)."""
    for policy in ("random", "sinks_only"):
        case = Case([37, 0, 16], 2, head_dim, 4, 1, dtype, policy, budget=9, extra_slots=2, with_scores=True,
                    log_in_layers=False, seed=head_dim)
        run_and_compare(*case.inputs(), stable=stable)


@pytest.mark.parametrize("stable", [True, False], ids=["stable", "fill"])
def test_what_moves(stable):
    """One head, 8 slots of page 4 holding positions 10..17, keep 0, 2, 4, 5, 7 (n = 5): stable
    moves 2, 4, 5, 7 down in order (4 rows); fill moves only the kept slots past n, 5 and 7,
    into the holes below it, 1 and 3, and leaves 0, 2, 4 where they were."""
    gen = torch.Generator().manual_seed(0)
    state = random_paged_state([8], 1, 16, 4, dtype=torch.float32, generator=gen)
    pages = state.block_tables[0, :2].long()
    state.pos_pages[pages] = torch.arange(10, 18, dtype=torch.int32).view(2, 4, 1)
    keep = torch.tensor([[[1, 0, 1, 0, 1, 1, 0, 1]]], dtype=torch.bool)
    before = state.k_pages[pages].flatten(0, 1)[:, 0].clone()
    log = torch.full((1, 1, 18), INT32_MAX, dtype=torch.int32)
    ops.evict_compact(*state, keep, torch.tensor([30], dtype=torch.int32), log, stable=stable)
    order = [0, 2, 4, 5, 7] if stable else [0, 5, 2, 7, 4]
    assert state.pos_pages[pages].flatten()[:5].tolist() == [10 + i for i in order]
    assert torch.equal(state.k_pages[pages].flatten(0, 1)[:5, 0], before[order])
    assert log[0, 0, [11, 13, 16]].tolist() == [30, 30, 30] and int(state.seq_lens[0]) == 5


@pytest.mark.parametrize("stable", [True, False], ids=["stable", "fill"])
@pytest.mark.parametrize("layout", ["last_dim_stride_2", "heads_outermost"])
def test_keep_layouts(stable, layout):
    """``keep`` may be any strided view: with a last-dimension stride of 2 the CPU kernel reads
    flag by flag, with contiguous rows (heads outermost here) it scans each row's bytes at once."""
    case = Case([37, 5, 16, 0], 2, 16, 4, 1, torch.float32, "random", budget=9, extra_slots=2, with_scores=True,
                log_in_layers=False, seed=11)
    state, keep, steps, log, scores = case.inputs()
    if layout == "last_dim_stride_2":
        keep = torch.stack([keep, ~keep], -1)[..., 0]
    else:
        keep = keep.transpose(0, 1).contiguous().transpose(0, 1)
    assert not keep.is_contiguous()
    run_and_compare(state, keep, steps, log, scores, stable)


def test_shared_read_only_page_is_allowed():
    """A page shared by two sequences may stay shared when neither writes it; a sequence that
    evicts must own every page from its first evicted slot on."""
    gen = torch.Generator().manual_seed(5)
    state = random_paged_state([8, 8], 1, 16, 4, generator=gen)
    tables = state.block_tables.clone()
    tables[1, 0] = tables[0, 0]
    state = state._replace(block_tables=tables)
    keep = torch.ones(2, 1, 8, dtype=torch.bool)
    keep[1, 0, 6] = False  # sequence 1 evicts in its private page 1 only
    log = random_log(state, 17, gen)
    run_and_compare(state, keep, torch.tensor([8, 8], dtype=torch.int32), log, None)

    state = random_paged_state([8, 8], 1, 16, 4, generator=gen)
    tables = state.block_tables.clone()
    tables[1, 0] = tables[0, 0]
    keep[1, 0, 1] = False  # now it would compact inside the shared page
    with pytest.raises(ValueError, match="block_tables"):
        ops.evict_compact(*state._replace(block_tables=tables), keep, torch.tensor([8, 8], dtype=torch.int32),
                          random_log(state, 17, gen))


# --------------------------------------------------------------------------------------------
# Round trip: append, decode, StreamingLLM eviction, page reuse


@pytest.mark.parametrize("page_size, every", [(1, 1), (4, 1), (4, 3), (16, 4)])
def test_streaming_round_trip(page_size, every):
    """Two sequences (the second finishes early) go through a prefill, then one token at a time:
    evict with a StreamingLLM mask every `every` steps, append the token (taking pages from a
    free list that evict_compact refills), attend. At every step the cache holds exactly the
    expected survivors, freed pages are exactly those past the new length, decode attention
    equals shadow_attention over the full sequence with the log so far, and the final log is
    streaming_evicted_at's."""
    sinks, window, kv_heads, head_dim, q_heads = 2, 6, 2, 16, 4
    lengths = [40, 25]
    batch, total = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(page_size * 10 + every)
    k_all = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    v_all = torch.randn(batch, kv_heads, total, head_dim, generator=gen)
    q_all = torch.randn(batch, q_heads, total, head_dim, generator=gen)

    max_live = sinks + window + every
    max_pages = math.ceil(max_live / page_size) + 1
    num_pages = batch * max_pages  # tight: pages must be recycled
    cache = PagedState(torch.zeros(num_pages, page_size, kv_heads, head_dim),
                       torch.zeros(num_pages, page_size, kv_heads, head_dim),
                       torch.full((num_pages, page_size, kv_heads), -1, dtype=torch.int32),
                       torch.full((batch, max_pages), -1, dtype=torch.int32),
                       torch.zeros(batch, dtype=torch.int32))
    free = list(range(num_pages))
    log_all = torch.full((batch, 2, kv_heads, total), INT32_MAX, dtype=torch.int32)
    log = log_all[:, 1]  # this layer's slice

    def reserve(num_new):
        for b in range(batch):
            need = math.ceil((int(cache.seq_lens[b]) + num_new[b]) / page_size)
            for col in range(need):
                if cache.block_tables[b, col] < 0:
                    cache.block_tables[b, col] = free.pop()

    def append(lo, hi):
        num_new = [max(0, min(hi, n) - lo) for n in lengths]
        reserve(num_new)
        positions = torch.arange(lo, hi, dtype=torch.int32).expand(batch, -1).contiguous()
        ops.append_kv(*cache, k_all[:, :, lo:hi], v_all[:, :, lo:hi], positions,
                      torch.tensor(num_new, dtype=torch.int32))

    prefill = window  # all of the prompt fits in the window: nothing to evict before decoding
    append(0, prefill)
    for t in range(prefill, total):
        active = [t < n for n in lengths]
        if t % every == 0:
            slots = int(cache.seq_lens.max())
            keep = torch.zeros(batch, kv_heads, slots, dtype=torch.bool)
            for b in range(batch):
                n = int(cache.seq_lens[b])
                pos = gather_slots(cache.pos_pages, cache.block_tables, b, n).T  # [Hkv, n]
                keep[b, :, :n] = (pos < sinks) | (pos > t - window) if active[b] else True
            tables_before = cache.block_tables.clone()
            freed = ops.evict_compact(*cache, keep, torch.full((batch,), t, dtype=torch.int32), log)
            for b in range(batch):
                first_free = math.ceil(int(cache.seq_lens[b]) / page_size)
                released = tables_before[b, first_free:]
                released = released[released >= 0]
                assert freed[b, : len(released)].tolist() == released.tolist()
                assert (freed[b, len(released):] == -1).all()
                assert (cache.block_tables[b, first_free:] == -1).all()
                free.extend(released.tolist())
        append(t, t + 1)

        # The cache holds exactly the keys the log says are still visible at step t, in order.
        visible = (torch.arange(total) <= t) & (log[:, :, :] > t)  # [B, Hkv, total]
        for b in range(batch):
            n = int(cache.seq_lens[b])
            pos = gather_slots(cache.pos_pages, cache.block_tables, b, n).long()  # [n, Hkv]
            for h in range(kv_heads):
                expected = visible[b, h, : min(t + 1, lengths[b])].nonzero().flatten()
                assert pos[:, h].tolist() == expected.tolist(), (t, b, h)
                assert torch.equal(gather_slots(cache.k_pages, cache.block_tables, b, n)[:, h],
                                   k_all[b, h, expected])
                assert torch.equal(gather_slots(cache.v_pages, cache.block_tables, b, n)[:, h],
                                   v_all[b, h, expected])
        # No page leaked or handed out twice.
        held = cache.block_tables[cache.block_tables >= 0].tolist()
        assert sorted(held + free) == list(range(num_pages))

        # Decode attention on the compacted cache == the learner's shadow attention replay.
        out = ops.paged_decode_attention(q_all[:, :, t], *cache[:2], *cache[3:])
        for b in range(batch):
            if not active[b]:
                continue
            replay = ops.shadow_attention(q_all[b : b + 1, :, t : t + 1], k_all[b : b + 1, :, : t + 1],
                                          v_all[b : b + 1, :, : t + 1], log[b : b + 1, :, : t + 1], q_offset=t)
            torch.testing.assert_close(out[b], replay[0, :, 0], rtol=0, atol=1e-5)

    for b, n in enumerate(lengths):
        expected_log = streaming_evicted_at(n, sinks, window, every)
        assert torch.equal(log[b, :, :n], expected_log.expand(kv_heads, n)), b
        assert (log[b, :, n:] == INT32_MAX).all()
    assert (log_all[:, 0] == INT32_MAX).all(), "another layer's log was written"


# --------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_opcheck(with_scores):
    case = Case([9, 0, 5], 2, 16, 4, 1, torch.float32, "random", budget=3, extra_slots=1, with_scores=with_scores,
                log_in_layers=False, seed=7)
    state, keep, steps, log, scores = case.inputs()
    torch.library.opcheck(EVICT.default, (*state, keep, steps, log, scores))
    state, keep, steps, log, scores = case.inputs()
    torch.library.opcheck(EVICT.default, (*state, keep, steps, log, scores, False))
    state, keep, steps, log, scores = case.inputs()
    torch.library.opcheck(EVICT.default, (*state, keep, steps, log, scores, True, False))  # fill


def test_unchecked_call_on_cpu_still_checks():
    """``check=False`` only changes the CUDA kernel; the CPU one checks the values regardless."""
    args = _valid_args()
    before = {k: v.clone() for k, v in args.items()}
    args["steps"][1] = -1
    with pytest.raises(ValueError, match="steps"):
        ops.evict_compact(**args, check=False)
    args["steps"][1] = before["steps"][1]
    for name, t in before.items():
        assert torch.equal(args[name], t), name
    ops.evict_compact(**args, check=False)
    assert args["seq_lens"].tolist() == [4, 2]


def test_compiles():
    case = Case([9, 4], 2, 16, 4, 1, torch.float32, "streaming", budget=0, extra_slots=0, with_scores=True,
                log_in_layers=False, seed=8)
    state, keep, steps, log, scores = case.inputs()
    expected = evict_compact_ref(*state, keep, steps, log, scores)
    freed = torch.compile(ops.evict_compact, backend="aot_eager", fullgraph=True)(*state, keep, steps, log, scores)
    assert torch.equal(freed, expected.freed) and torch.equal(log, expected.evicted_at)
    assert torch.equal(state.k_pages, expected.k_pages) and torch.equal(state.seq_lens, expected.seq_lens)
    assert torch.equal(scores, expected.slot_scores)


# --------------------------------------------------------------------------------------------
# Argument checks


def _valid_args():
    """Sequences of 6 and 3 slots (pages of 4, one spare page each), 2 KV heads keeping 4 and 2
    slots (the second sequence its first 2), S = 8, a log of 15 positions."""
    case = Case([6, 3], 2, 16, 4, 1, torch.float32, "random", budget=4, extra_slots=2, with_scores=True,
                log_in_layers=False, seed=0)
    state, keep, steps, log, scores = case.inputs()
    keep[1] = False
    keep[1, :, :2] = True
    return dict(state._asdict(), keep=keep, steps=steps, evicted_at=log, slot_scores=scores)


def _set(name, index, value):
    def change(a):
        t = a[name].clone()
        t[index] = value
        return {name: t}
    return change


def _evicted_slot(a, b=0, h=0):
    """(page, row) of the first evicted slot of sequence b, head h, and its position."""
    slot = int((~a["keep"][b, h, : int(a["seq_lens"][b])]).nonzero()[0])
    page = int(a["block_tables"][b, slot // 4])
    return page, slot % 4, int(a["pos_pages"][page, slot % 4, h])


def _already_evicted(a):
    _, _, pos = _evicted_slot(a)
    return _set("evicted_at", (0, 0, pos), 5)(a)


def _position_outside_log(a):
    page, row, _ = _evicted_slot(a)
    return _set("pos_pages", (page, row, 0), 20)(a)


def _negative_position(a):
    page, row, _ = _evicted_slot(a)
    return _set("pos_pages", (page, row, 0), -1)(a)


def _duplicate_position(a):
    evicted = (~a["keep"][0, 0, :6]).nonzero().flatten().tolist()
    (p1, r1), (p2, r2) = ((int(a["block_tables"][0, s // 4]), s % 4) for s in evicted[:2])
    pos = a["pos_pages"].clone()
    pos[p2, r2, 0] = pos[p1, r1, 0]
    return {"pos_pages": pos}


def _evict_a_third_slot(a):
    """keep, pos_pages and evicted_at copies in which sequence 0 evicts one more slot per head
    (3 of 6), and its 3 evicted slots of head 0 as (page, row)."""
    keep = a["keep"].clone()
    for h in range(keep.shape[1]):
        keep[0, h, int(keep[0, h, :6].nonzero()[0])] = False
    slots = (~keep[0, 0, :6]).nonzero().flatten().tolist()
    rows = [(int(a["block_tables"][0, s // 4]), s % 4) for s in slots]
    return keep, a["pos_pages"].clone(), a["evicted_at"].clone(), rows


def _duplicate_then_already_evicted(a):
    """The 2nd evicted slot repeats the 1st one's position, the 3rd was already evicted: the
    duplicate comes first in slot order, so it is the error."""
    keep, pos, log, rows = _evict_a_third_slot(a)
    pos[rows[1] + (0,)] = pos[rows[0] + (0,)]
    log[0, 0, int(pos[rows[2] + (0,)])] = 5
    return {"keep": keep, "pos_pages": pos, "evicted_at": log}


def _already_evicted_then_duplicate(a):
    """The 1st evicted slot was already evicted, the 3rd repeats the 2nd one's position."""
    keep, pos, log, rows = _evict_a_third_slot(a)
    log[0, 0, int(pos[rows[0] + (0,)])] = 5
    pos[rows[2] + (0,)] = pos[rows[1] + (0,)]
    return {"keep": keep, "pos_pages": pos, "evicted_at": log}


BAD_INPUTS = {
    "k_pages_int": ("k_pages", lambda a: {"k_pages": a["k_pages"].int()}),
    "v_pages_dtype": ("v_pages", lambda a: {"v_pages": a["v_pages"].bfloat16()}),
    "pos_pages_int64": ("pos_pages", lambda a: {"pos_pages": a["pos_pages"].long()}),
    "block_tables_int64": ("block_tables", lambda a: {"block_tables": a["block_tables"].long()}),
    "seq_lens_int64": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"].long()}),
    "keep_uint8": ("keep", lambda a: {"keep": a["keep"].to(torch.uint8)}),
    "steps_int64": ("steps", lambda a: {"steps": a["steps"].long()}),
    "evicted_at_int64": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"].long()}),
    "slot_scores_float64": ("slot_scores", lambda a: {"slot_scores": a["slot_scores"].double()}),
    "keep_rank": ("keep", lambda a: {"keep": a["keep"][0]}),
    "steps_rank": ("steps", lambda a: {"steps": a["steps"][None]}),
    "evicted_at_rank": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"][None]}),
    "keep_heads": ("keep", lambda a: {"keep": a["keep"][:, :1]}),
    "keep_batch": ("keep", lambda a: {"keep": a["keep"][:1]}),
    "steps_len": ("steps", lambda a: {"steps": a["steps"][:1]}),
    "evicted_at_heads": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"][:, :1]}),
    "slot_scores_shape": ("slot_scores", lambda a: {"slot_scores": a["slot_scores"][..., :7]}),
    "pos_pages_shape": ("pos_pages", lambda a: {"pos_pages": a["pos_pages"][:-1]}),
    "keep_other_device": ("keep", lambda a: {"keep": a["keep"].to("meta")}),
    "evicted_at_other_device": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"].to("meta")}),
    "k_pages_last_stride": ("k_pages", lambda a: {"k_pages": a["k_pages"].transpose(2, 3).contiguous()
                                                  .transpose(2, 3)}),
    "evicted_at_broadcast": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"][:, :1].expand(2, 2, -1)}),
    "seq_lens_aliases_block_tables": ("seq_lens|block_tables",
                                      lambda a: {"seq_lens": a["block_tables"].view(-1)[:2]}),
    "seq_lens_strided_view_of_block_tables": ("seq_lens|block_tables",
                                              lambda a: {"seq_lens": a["block_tables"][:, 0]}),
    "k_pages_requires_grad": ("k_pages", lambda a: {"k_pages": a["k_pages"].clone().requires_grad_()}),
    # Values (checked before anything is written).
    "keep_too_short": ("keep", lambda a: {"keep": a["keep"][..., :5], "slot_scores": a["slot_scores"][..., :5]}),
    "keep_past_length": ("keep", _set("keep", (1, 0, 5), True)),
    "keep_counts_differ": ("keep", _set("keep", (1, 1, 0), False)),
    "steps_negative": ("steps", _set("steps", 0, -1)),
    "steps_never": ("steps", _set("steps", 1, INT32_MAX)),
    "position_outside_log": ("evicted_at", _position_outside_log),
    "negative_position": ("evicted_at", _negative_position),
    "already_evicted": ("evicted_at", _already_evicted),
    "evicted_twice_in_one_call": ("evicted_at", _duplicate_position),
    "duplicate_then_already_evicted": ("evicted_at", _duplicate_then_already_evicted),
    "already_evicted_then_duplicate": ("evicted_at", _already_evicted_then_duplicate),
    "table_entry_missing": ("block_tables", _set("block_tables", (0, 1), -1)),
    "table_entry_outside_pool": ("block_tables", _set("block_tables", (1, 0), 99)),
    "table_tail_garbage": ("block_tables", _set("block_tables", (1, 2), -3)),
    "shared_written_page": ("block_tables", lambda a: _set("block_tables", (1, 0), int(a["block_tables"][0, 0]))(a)),
    "seq_lens_beyond_table": ("seq_lens", _set("seq_lens", 1, 13)),
    "seq_lens_negative": ("seq_lens", _set("seq_lens", 1, -1)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_argument(case):
    arg, change = BAD_INPUTS[case]
    args = _valid_args()
    args.update(change(args))
    before = {k: v.clone() for k, v in args.items() if v.device.type == "cpu"}
    pattern = rf"(?<![A-Za-z0-9_])({arg})(?![A-Za-z0-9_])"
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.evict_compact(**args)
    for name, t in before.items():  # validated before anything was written
        assert torch.equal(args[name], t), f"{name} was modified by a rejected call"


def test_valid_args_run():
    args = _valid_args()
    freed = ops.evict_compact(**args)
    assert args["seq_lens"].tolist() == [4, 2]
    assert freed.shape == args["block_tables"].shape and freed.dtype == torch.int32
