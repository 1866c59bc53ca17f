"""append_kv (CPU): against the reference, layouts, torch.library registration, argument checks.

Appending is pure data movement, so every result must equal ``append_kv_ref`` exactly, in
every dtype: the whole pool (unused slots and other sequences' pages untouched), positions,
lengths, and the block tables (never written).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shadowkv import ops
from shadowkv.reference import PagedState, append_kv_ref, gather_slots, random_paged_state

APPEND = torch.ops.shadowkv.append_kv
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@dataclass
class Case:
    lens: list[int]      # seq_lens before the append
    num_new: list[int]
    num_tokens: int      # T
    kv_heads: int
    head_dim: int
    page_size: int
    preallocated: int    # pages each sequence holds past its last needed page
    dtype: torch.dtype
    seed: int

    def inputs(self) -> tuple[PagedState, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        final = [n + a for n, a in zip(self.lens, self.num_new)]
        state = random_paged_state(final, self.kv_heads, self.head_dim, self.page_size,
                                   preallocated=self.preallocated, spare_pages=2, dtype=self.dtype,
                                   generator=gen)
        state = state._replace(seq_lens=torch.tensor(self.lens, dtype=torch.int32))
        b, t = len(self.lens), self.num_tokens
        k = torch.randn(b, self.kv_heads, t, self.head_dim, generator=gen).to(self.dtype)
        v = torch.randn(b, self.kv_heads, t, self.head_dim, generator=gen).to(self.dtype)
        positions = (torch.tensor(self.lens)[:, None] + torch.arange(t)).to(torch.int32)
        return state, k, v, positions, torch.tensor(self.num_new, dtype=torch.int32)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    prefill = draw(st.booleans())  # many tokens at once, or a few decode tokens
    num_tokens = draw(st.integers(1, 70)) if prefill else draw(st.integers(0, 2))
    lens = [draw(st.integers(0, 40)) for _ in range(batch)]
    num_new = [draw(st.integers(0, num_tokens)) for _ in range(batch)]
    case = Case(lens, num_new, num_tokens, kv_heads=draw(st.sampled_from([1, 2])),
                head_dim=draw(st.sampled_from([1, 7, 16, 33, 80])), page_size=draw(st.sampled_from([1, 4, 16])),
                preallocated=draw(st.integers(0, 2)), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)))
    event(f"prefill={prefill}, page_size={case.page_size}, ragged={len(set(num_new)) > 1}")
    return case


def run_and_compare(state: PagedState, k, v, positions, num_new):
    expected = append_kv_ref(*state, k, v, positions, num_new)
    tables = state.block_tables.clone()
    ops.append_kv(*state, k, v, positions, num_new)
    for name, got, want in zip(("k_pages", "v_pages", "pos_pages", "seq_lens"),
                               (state.k_pages, state.v_pages, state.pos_pages, state.seq_lens), expected):
        assert torch.equal(got, want), f"{name} differs from the reference"
    assert torch.equal(state.block_tables, tables), "block_tables was written"


@settings(max_examples=300)
@given(case=cases())
def test_matches_reference(case):
    run_and_compare(*case.inputs())


@settings(max_examples=80)
@given(case=cases(), k_layout=st.sampled_from(["bthd", "token_slice"]), table_rows=st.sampled_from([1, 2]))
def test_strided_inputs_and_table_views(case, k_layout, table_rows):
    """Non-contiguous k/v, and block_tables/seq_lens that are row views of larger tensors (a cache
    that appends to a slice of its batch)."""
    state, k, v, positions, num_new = case.inputs()
    if k_layout == "bthd":  # projections before the head transpose
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    else:
        k, v = (torch.stack([t, torch.zeros_like(t)], dim=3).flatten(2, 3)[:, :, ::2] for t in (k, v))
    # Each real row sits every `table_rows` rows of a larger table filled with junk.
    b, m = state.block_tables.shape
    big_tables = torch.full((b * table_rows, m + 1), 12345, dtype=torch.int32)
    big_lens = torch.full((b * table_rows,), 777, dtype=torch.int32)
    big_tables[::table_rows, :m] = state.block_tables
    big_lens[::table_rows] = state.seq_lens
    tables, lens = big_tables[::table_rows, :m], big_lens[::table_rows]
    expected = append_kv_ref(*state, k, v, positions, num_new)
    ops.append_kv(state.k_pages, state.v_pages, state.pos_pages, tables, lens, k, v, positions, num_new)
    assert torch.equal(state.k_pages, expected[0]) and torch.equal(state.v_pages, expected[1])
    assert torch.equal(state.pos_pages, expected[2]) and torch.equal(lens, expected[3])
    if table_rows > 1:
        assert (big_lens[1::table_rows] == 777).all() and (big_tables[:, m] == 12345).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [1, 7, 33])
def test_odd_head_dims(head_dim, dtype):
    """Odd head dims (a copy loop's scalar tail), deterministically: a prefill, a decode step
    and an empty append in one batch, pages of 4 (hypothesis draws them too, not every run)."""
    case = Case([3, 9, 0], [13, 1, 0], 13, kv_heads=2, head_dim=head_dim, page_size=4, preallocated=1,
                dtype=dtype, seed=head_dim)
    run_and_compare(*case.inputs())


def test_prefill_then_decode_equals_one_prefill():
    """The chunking of the appends does not matter: prefill + decode tokens == one prefill."""
    case = Case([0, 0, 0], [23, 9, 0], 23, kv_heads=2, head_dim=16, page_size=4, preallocated=0,
                dtype=torch.float32, seed=1)
    state, k, v, positions, num_new = case.inputs()
    at_once = state.clone()
    ops.append_kv(*at_once, k, v, positions, num_new)
    chunks = [(0, 10), (10, 11), (11, 12), (12, 23)]
    for lo, hi in chunks:
        n = (num_new - lo).clamp(0, hi - lo).to(torch.int32)
        ops.append_kv(*state, k[:, :, lo:hi], v[:, :, lo:hi], positions[:, lo:hi], n)
    assert torch.equal(state.seq_lens, num_new)
    for b, n in enumerate(num_new.tolist()):
        for pool in ("k_pages", "v_pages", "pos_pages"):
            got = gather_slots(getattr(state, pool), state.block_tables, b, n)
            want = gather_slots(getattr(at_once, pool), at_once.block_tables, b, n)
            assert torch.equal(got, want), (b, pool)
        slots = gather_slots(state.k_pages, state.block_tables, b, n)
        assert torch.equal(slots.transpose(0, 1), k[b, :, :n])


def test_empty_batch_and_no_tokens():
    state = random_paged_state([], 2, 16, 4, spare_pages=3)
    ops.append_kv(*state, torch.zeros(0, 2, 5, 16), torch.zeros(0, 2, 5, 16), torch.zeros(0, 5, dtype=torch.int32),
                  torch.zeros(0, dtype=torch.int32))
    state = random_paged_state([3, 0], 2, 16, 4)
    before = state.clone()
    ops.append_kv(*state, torch.zeros(2, 2, 0, 16), torch.zeros(2, 2, 0, 16), torch.zeros(2, 0, dtype=torch.int32),
                  torch.zeros(2, dtype=torch.int32))
    for got, want in zip(state, before):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    case = Case([3, 0, 6], [2, 5, 0], 5, kv_heads=2, head_dim=16, page_size=4, preallocated=1, dtype=dtype, seed=3)
    state, k, v, positions, num_new = case.inputs()
    torch.library.opcheck(APPEND.default, (*state, k, v, positions, num_new))
    torch.library.opcheck(APPEND.default, (*state, k, v, positions, num_new, False))


def test_unchecked_call_on_cpu_still_checks():
    """``check=False`` only changes the CUDA kernel; the CPU one checks the values regardless."""
    case = Case([3, 1], [2, 4], 4, kv_heads=2, head_dim=16, page_size=4, preallocated=0, dtype=torch.float32, seed=5)
    state, k, v, positions, num_new = case.inputs()
    expected = append_kv_ref(*state, k, v, positions, num_new)
    ops.append_kv(*state, k, v, positions, num_new, check=False)
    for got, want in zip((state.k_pages, state.v_pages, state.pos_pages, state.seq_lens), expected):
        assert torch.equal(got, want)
    bad = num_new.clone()
    bad[0] = 5  # more than T = 4
    with pytest.raises(ValueError, match="num_new"):
        ops.append_kv(*state, k, v, positions, bad, check=False)


def test_compiles():
    case = Case([3, 1], [2, 4], 4, kv_heads=2, head_dim=16, page_size=4, preallocated=0, dtype=torch.float32, seed=4)
    state, k, v, positions, num_new = case.inputs()
    expected = append_kv_ref(*state, k, v, positions, num_new)
    torch.compile(ops.append_kv, backend="aot_eager", fullgraph=True)(*state, k, v, positions, num_new)
    assert torch.equal(state.k_pages, expected[0]) and torch.equal(state.seq_lens, expected[3])


# --------------------------------------------------------------------------------------------
# Argument checks


def _valid_args():
    """Two sequences (3 and 5 slots, pages of 4) appending 4 and 2 of T = 4 tokens."""
    case = Case([3, 5], [4, 2], 4, kv_heads=2, head_dim=16, page_size=4, preallocated=1, dtype=torch.float32, seed=0)
    state, k, v, positions, num_new = case.inputs()
    return dict(state._asdict(), k=k, v=v, positions=positions, num_new=num_new)


def _shared_page(a):
    tables = a["block_tables"].clone()
    tables[1, 1] = tables[0, 1]  # both sequences write into the same page
    return {"block_tables": tables}


def _set(name, index, value):
    def change(a):
        t = a[name].clone()
        t[index] = value
        return {name: t}
    return change


BAD_INPUTS = {
    # case: (argument the message must name, changes to the valid arguments)
    "k_pages_int": ("k_pages", lambda a: {"k_pages": a["k_pages"].int()}),
    "v_pages_dtype": ("v_pages", lambda a: {"v_pages": a["v_pages"].double()}),
    "pos_pages_int64": ("pos_pages", lambda a: {"pos_pages": a["pos_pages"].long()}),
    "block_tables_int64": ("block_tables", lambda a: {"block_tables": a["block_tables"].long()}),
    "seq_lens_int64": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"].long()}),
    "k_dtype": ("k", lambda a: {"k": a["k"].half()}),
    "v_dtype": ("v", lambda a: {"v": a["v"].double()}),
    "positions_int64": ("positions", lambda a: {"positions": a["positions"].long()}),
    "num_new_float": ("num_new", lambda a: {"num_new": a["num_new"].float()}),
    "k_pages_rank": ("k_pages", lambda a: {"k_pages": a["k_pages"][0]}),
    "pos_pages_rank": ("pos_pages", lambda a: {"pos_pages": a["pos_pages"][..., None]}),
    "block_tables_rank": ("block_tables", lambda a: {"block_tables": a["block_tables"][0]}),
    "seq_lens_rank": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"][None]}),
    "k_rank": ("k", lambda a: {"k": a["k"][0]}),
    "positions_rank": ("positions", lambda a: {"positions": a["positions"][0]}),
    "num_new_rank": ("num_new", lambda a: {"num_new": a["num_new"][0]}),
    "v_pages_shape": ("v_pages", lambda a: {"v_pages": a["v_pages"][:, :2]}),
    "pos_pages_heads": ("pos_pages", lambda a: {"pos_pages": a["pos_pages"][..., :1]}),
    "seq_lens_len": ("seq_lens", lambda a: {"seq_lens": torch.zeros(3, dtype=torch.int32)}),
    "k_heads": ("k", lambda a: {"k": a["k"][:, :1], "v": a["v"][:, :1]}),
    "k_head_dim": ("k", lambda a: {"k": a["k"][..., :8], "v": a["v"][..., :8]}),
    "k_batch": ("k", lambda a: {"k": a["k"][:1], "v": a["v"][:1]}),
    "v_tokens": ("v", lambda a: {"v": a["v"][:, :, :3]}),
    "positions_tokens": ("positions", lambda a: {"positions": a["positions"][:, :3]}),
    "num_new_len": ("num_new", lambda a: {"num_new": a["num_new"][:1]}),
    "page_size_zero": ("k_pages", lambda a: {k: a[k][:, :0] for k in ("k_pages", "v_pages", "pos_pages")}),
    "k_pages_last_stride": ("k_pages", lambda a: {"k_pages": a["k_pages"].transpose(2, 3).contiguous()
                                                  .transpose(2, 3)}),
    "k_pages_broadcast": ("k_pages", lambda a: {"k_pages": a["k_pages"][:1].expand_as(a["k_pages"])}),
    "v_pages_is_k_pages": ("v_pages|k_pages", lambda a: {"v_pages": a["k_pages"]}),
    "k_other_device": ("k", lambda a: {"k": a["k"].to("meta")}),
    "seq_lens_other_device": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"].to("meta")}),
    "block_tables_other_device": ("block_tables", lambda a: {"block_tables": a["block_tables"].to("meta")}),
    "seq_lens_strided_view_of_block_tables": ("seq_lens|block_tables",
                                              lambda a: {"seq_lens": a["block_tables"][:, 0]}),
    # Written in place and not differentiable: with grad mode on, a tensor that requires grad is refused.
    "k_pages_requires_grad": ("k_pages", lambda a: {"k_pages": a["k_pages"].clone().requires_grad_()}),
    "k_requires_grad": ("k", lambda a: {"k": a["k"].clone().requires_grad_()}),
    # Values (checked before anything is written).
    "num_new_above_T": ("num_new", _set("num_new", 1, 5)),
    "num_new_negative": ("num_new", _set("num_new", 0, -1)),
    "positions_negative": ("positions", _set("positions", (0, 2), -4)),
    "table_entry_missing": ("block_tables", _set("block_tables", (1, 1), -1)),
    "table_entry_outside_pool": ("block_tables", lambda a: _set("block_tables", (0, 1), a["k_pages"].shape[0])(a)),
    "table_too_short": ("block_tables", lambda a: {"block_tables": a["block_tables"][:, :2].contiguous(),
                                                   "num_new": torch.tensor([4, 4], dtype=torch.int32)}),
    "shared_written_page": ("block_tables", _shared_page),
    "seq_lens_negative": ("seq_lens", _set("seq_lens", 0, -1)),
    "seq_lens_beyond_table": ("seq_lens", _set("seq_lens", 1, 13)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_argument(case):
    arg, change = BAD_INPUTS[case]
    args = _valid_args()
    args.update(change(args))
    before = {k: v.clone() for k, v in args.items() if v.device.type == "cpu"}
    pattern = rf"(?<![A-Za-z0-9_])({arg})(?![A-Za-z0-9_])"
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.append_kv(**args)
    for name, t in before.items():  # validated before anything was written
        assert torch.equal(args[name], t), f"{name} was modified by a rejected call"


def test_valid_args_run():
    """The base of the bad-input cases is itself accepted (so each case tests one change)."""
    args = _valid_args()
    ops.append_kv(**args)
    assert args["seq_lens"].tolist() == [7, 7]


def test_shared_read_only_page_is_allowed():
    """Sequences may share pages they only read (a shared prompt prefix); only written pages
    must be private."""
    gen = torch.Generator().manual_seed(2)
    state = random_paged_state([8, 5], 1, 16, 4, preallocated=1, generator=gen)
    tables = state.block_tables.clone()
    tables[1, 0] = tables[0, 0]  # full page 0 shared; sequence 1 appends into its page 1
    state = state._replace(block_tables=tables)
    k = torch.randn(2, 1, 2, 16)
    num_new = torch.tensor([0, 2], dtype=torch.int32)
    expected = append_kv_ref(*state, k, k, torch.zeros(2, 2, dtype=torch.int32), num_new)
    ops.append_kv(*state, k, k, torch.zeros(2, 2, dtype=torch.int32), num_new)
    assert torch.equal(state.k_pages, expected[0])


def test_strided_view_of_the_block_table_as_seq_lens_is_refused():
    """torch's quick overlap test gives up on non-dense views (TooHard); for index tensors the
    op checks exactly. Valid values, so only the alias check can refuse it (it used to go
    through and overwrite the block table)."""
    gen = torch.Generator().manual_seed(0)
    state = random_paged_state([7, 7], 2, 4, 4, preallocated=1, spare_pages=2, generator=gen)
    tables = state.block_tables.clone()
    tables[:, 0] = torch.tensor([3, 5], dtype=torch.int32)  # page ids that are also valid lengths
    state = state._replace(block_tables=tables)
    k = torch.randn(2, 2, 4, 4)
    positions = torch.arange(4, dtype=torch.int32).expand(2, 4).contiguous()
    with pytest.raises(ValueError, match="`seq_lens` is written in place and must not share memory with `block_tables`"):
        ops.append_kv(state.k_pages, state.v_pages, state.pos_pages, tables, tables[:, 0], k, k, positions,
                      torch.tensor([4, 2], dtype=torch.int32))


@pytest.mark.parametrize("where, overlaps", [(0, True), (4, True), (80000, False)])
def test_a_small_strided_view_into_a_large_pool_is_checked_exactly(where, overlaps):
    """seq_lens as a strided view of the buffer that also holds pos_pages (80000 int32: a large
    tensor). Only the small one's bytes are tested against the large one's layout: refused where
    they overlap (it used to be accepted, and the op wrote lengths into positions), accepted
    just past it."""
    buf = torch.zeros(80004, dtype=torch.int32)
    pos_pages = buf[:80000].view(40000, 1, 2)
    seq_lens = buf[where : where + 4 : 2]
    k_pages = torch.zeros(40000, 1, 2, 4)
    tables = torch.tensor([[0], [1]], dtype=torch.int32)
    k = torch.randn(2, 2, 1, 4)
    args = (k_pages, k_pages.clone(), pos_pages, tables, seq_lens, k, k, torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32))
    if overlaps:
        with pytest.raises(ValueError, match="`pos_pages` is written in place and must not share memory with `seq_lens`"):
            ops.append_kv(*args)
        assert not buf.any()
    else:
        ops.append_kv(*args)
        assert seq_lens.tolist() == [1, 1] and not buf[:80000].any()


def test_writes_bump_version_counters_and_grad_free_calls_run():
    """Like torch's in-place ops: autograd notices a saved tensor the op overwrote (no silent
    stale gradient), and under no_grad a tensor that requires grad may be written."""
    args = _valid_args()
    a = args["k_pages"].clone().requires_grad_()
    x = a * 1.0
    loss = (x * x).sum()  # saves x
    with torch.no_grad():
        args["k_pages"] = x
        ops.append_kv(**args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    args = _valid_args()
    versions = {name: args[name]._version for name in ("k_pages", "v_pages", "pos_pages", "seq_lens", "block_tables")}
    ops.append_kv(**args)
    assert all(args[name]._version > versions[name] for name in ("k_pages", "v_pages", "pos_pages", "seq_lens"))
    assert args["block_tables"]._version == versions["block_tables"]  # read only
