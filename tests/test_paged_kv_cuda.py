"""The paged KV cache ops on CUDA (append_kv, paged_decode_attention, evict_compact) against their
CPU twins and the float64 references.

- append_kv and evict_compact are data movement plus integer bookkeeping: every CUDA result (the
  whole pool, positions, lengths, block tables, freed pages, eviction log, slot scores) must equal
  the CPU op's and the reference's exactly, in every dtype.
- paged_decode_attention is compared with ``paged_decode_attention_ref`` run in float64 on the
  very same (already rounded) inputs. Max abs error, as in the CPU tests: out float32 1e-5;
  bfloat16 2e-2 and float16 5e-3 relative to ``max(1, max|ref|)`` (the output is stored in 8 / 11
  mantissa bits; the kernel accumulates in fp32, split-K partials included); scores_out (float32)
  1e-5. Long contexts (8k-32k slots) run several split-K partitions per sequence.
- Bad inputs raise the same exception as on CPU (same message for value errors), before anything
  is written.

Set SHADOWKV_PAGED_TEST_DEVICE=cpu to dry-run this file against the CPU kernels (checks the tests
themselves on a machine without a GPU).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import given, settings

from shadowkv import ops
from shadowkv.reference import (
    INT32_MAX,
    PagedState,
    append_kv_ref,
    evict_compact_ref,
    paged_decode_attention_ref,
    random_paged_state,
    slot_index,
    streaming_keep,
)

from . import test_append_kv as cpu_append
from . import test_evict_compact as cpu_evict
from . import test_paged_decode_attention as cpu_decode

DEVICE = os.environ.get("SHADOWKV_PAGED_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="checks CUDA-specific behaviour")
# CUDA graph capture needs PyTorch's caching allocator: without it (compute-sanitizer runs set
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation) the capture's
# first cudaMalloc fails, and the aborted capture leaves the CUDA RNG in capture state, which
# breaks every later test of the process that draws random numbers on the GPU.
_uncached = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") not in ("", "0")
graph_capture = pytest.mark.skipif(_uncached, reason="CUDA graph capture needs the caching allocator")
# Uncached, torch's allocator calls cudaMalloc directly and keeps no statistics.
caching_allocator = pytest.mark.skipif(_uncached, reason="reads the caching allocator's statistics")

APPEND = torch.ops.shadowkv.append_kv
DECODE = torch.ops.shadowkv.paged_decode_attention
EVICT = torch.ops.shadowkv.evict_compact

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DECODE_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                 pytest.param(torch.float16, id="fp16")]
OUT_TOL = cpu_decode.OUT_TOL  # {dtype: (tol, relative)}
SCORES_TOL = cpu_decode.SCORES_TOL


def dev(t):
    """A copy on the device under test (a copy also when that is the CPU)."""
    return None if t is None else t.to(DEVICE, copy=True)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on DEVICE that starts one element past an aligned allocation, so
    kernels cannot use vector loads on it."""
    moved = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEVICE)[1:].view(t.shape)
    return moved.copy_(t)


def dev_state(state: PagedState) -> PagedState:
    return PagedState(*(dev(t) for t in state))


def assert_same(name: str, got: torch.Tensor | None, want: torch.Tensor | None):
    if want is None:
        assert got is None, name
        return
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got.cpu(), want.cpu()), f"{name} differs"


# --------------------------------------------------------------------------------------------
# append_kv


def run_append_both(state: PagedState, k, v, positions, num_new, check=True):
    """The op on the device (checked or not) and on CPU from the same inputs; every output must be
    identical, and equal the reference."""
    cpu = state.clone()
    ops.append_kv(*cpu, k, v, positions, num_new)
    expected = append_kv_ref(*state, k, v, positions, num_new)
    d = dev_state(state)
    ops.append_kv(*d, dev(k), dev(v), dev(positions), dev(num_new), check=check)
    for name, got, want, ref in zip(("k_pages", "v_pages", "pos_pages", "seq_lens"),
                                    (d.k_pages, d.v_pages, d.pos_pages, d.seq_lens),
                                    (cpu.k_pages, cpu.v_pages, cpu.pos_pages, cpu.seq_lens), expected):
        assert_same(name, got, want)
        assert_same(name + " (reference)", got, ref)
    assert_same("block_tables", d.block_tables, state.block_tables)


@settings(max_examples=60)
@given(case=cpu_append.cases())
def test_append_random_cases(case):
    run_append_both(*case.inputs())
    run_append_both(*case.inputs(), check=False)


APPEND_CASES = {
    # lens, num_new, T, kv_heads, head_dim, page_size, preallocated
    "decode_step_ps16": ([5, 0, 31], [1, 1, 0], 1, 2, 128, 16, 0),
    "prefill_ps1_ragged": ([0, 3], [40, 17], 40, 2, 64, 1, 1),
    "prefill_long": ([0], [3000], 3000, 4, 128, 16, 0),
    "odd_head_dim": ([7, 2], [9, 3], 9, 3, 17, 4, 2),
    "head_dim_1": ([1, 0], [4, 4], 4, 1, 1, 16, 0),
    "wide_rows": ([2], [5], 5, 1, 1100, 4, 0),
}


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(APPEND_CASES))
def test_append_named_cases(name, dtype, check):
    lens, num_new, t, h, d, ps, pre = APPEND_CASES[name]
    case = cpu_append.Case(lens, num_new, t, h, d, ps, pre, dtype, seed=len(name))
    run_append_both(*case.inputs(), check=check)


@cuda_only
@pytest.mark.parametrize("bad", ["num_new_past_t", "negative_num_new", "num_new_int32_max", "negative_position",
                                 "page_past_pool", "unallocated_page", "len_past_capacity", "poisoned_len"])
def test_append_unchecked_bad_values_poison_the_sequence(bad):
    """check=False: a sequence with bad values is not written and its length becomes -1 (which a
    checked call then rejects and an unchecked decode turns into NaN); the others are appended
    exactly. Nothing is written out of bounds (memcheck runs this)."""
    case = cpu_append.Case([5, 9, 2], [2, 2, 1], 2, 2, 64, 4, 0, torch.float32, seed=51)
    state, k, v, positions, num_new = case.inputs()
    expected = append_kv_ref(*state, k, v, positions, num_new)
    d = dev_state(state)
    positions, num_new = positions.clone(), num_new.clone()
    if bad == "num_new_past_t":
        num_new[1] = 3
    elif bad == "negative_num_new":
        num_new[1] = -1
    elif bad == "num_new_int32_max":
        num_new[1] = 2**31 - 1
    elif bad == "negative_position":
        positions[1, 1] = -5
    elif bad == "page_past_pool":
        d.block_tables[1, 2] = d.k_pages.shape[0]  # the page slots 9..10 go to
    elif bad == "unallocated_page":
        d.block_tables[1, 2] = -1
    elif bad == "len_past_capacity":
        d.seq_lens[1] = d.block_tables.shape[1] * 4 - 1  # + 2 new slots > capacity
    else:
        d.seq_lens[1] = -1  # a sequence an earlier unchecked call poisoned stays poisoned
    before = d.k_pages.clone()
    ops.append_kv(*d, dev(k), dev(v), dev(positions), dev(num_new), check=False)
    assert d.seq_lens.cpu().tolist() == [int(expected[3][0]), -1, int(expected[3][2])]
    written = (d.k_pages != before).flatten(1).any(1).cpu()  # pages that changed
    for b in (0, 2):  # the good sequences' new slots hold their new keys
        for t in range(int(num_new[b])):
            slot = int(state.seq_lens[b]) + t
            page = int(state.block_tables[b, slot // 4])
            assert torch.equal(d.k_pages[page, slot % 4].cpu(), expected[0][page, slot % 4])
    pages_of_1 = {int(p) for p in state.block_tables[1] if p >= 0}
    assert not any(written[p] for p in pages_of_1), "a bad sequence must not be written"
    with pytest.raises(ValueError, match="seq_lens"):  # checked calls reject the poisoned length
        ops.paged_decode_attention(dev(torch.randn(3, 2, 64)), d.k_pages, d.v_pages, d.block_tables, d.seq_lens)
    out = ops.paged_decode_attention(dev(torch.randn(3, 2, 64)), d.k_pages, d.v_pages, d.block_tables, d.seq_lens,
                                     check=False)
    assert out[1].isnan().all() and not out[0].isnan().any()


@cuda_only
@graph_capture
def test_unchecked_decode_step_of_append_and_decode_is_graph_capturable():
    """check=False on both ops: one decode step (append the new token, attend) captured in a
    CUDA graph and replayed step after step follows the eager checked ops."""
    lens, hq, hkv, d, ps = [30, 7], 8, 2, 128, 16
    state = random_paged_state([x + 8 for x in lens], hkv, d, ps, dtype=torch.bfloat16,
                               generator=torch.Generator().manual_seed(61))
    state = state._replace(seq_lens=torch.tensor(lens, dtype=torch.int32))
    graph_state, eager_state = dev_state(state), dev_state(state)
    gen = torch.Generator().manual_seed(62)
    steps = [(torch.randn(2, hq, d, generator=gen), torch.randn(2, hkv, 1, d, generator=gen),
              torch.randn(2, hkv, 1, d, generator=gen)) for _ in range(4)]
    q_in, k_in, v_in = (dev(t.to(torch.bfloat16)) for t in steps[0])
    pos_in = dev(torch.zeros(2, 1, dtype=torch.int32))
    ones = dev(torch.ones(2, dtype=torch.int32))

    def step(s: PagedState, q, k, v, pos, check):
        ops.append_kv(*s, k, v, pos, ones, check=check)
        return ops.paged_decode_attention(q, s.k_pages, s.v_pages, s.block_tables, s.seq_lens, check=check)

    warm = dev_state(state)  # warm-up on a copy: capture must not be the first launch
    step(warm, q_in, k_in, v_in, pos_in, False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(graph_state, q_in, k_in, v_in, pos_in, False)
    # Capturing ran nothing: the state is still the initial one.
    assert torch.equal(graph_state.seq_lens.cpu(), state.seq_lens)
    for i, (q, k, v) in enumerate(steps):
        q, k, v = (dev(t.to(torch.bfloat16)) for t in (q, k, v))
        pos = eager_state.seq_lens[:, None].clone()  # int32 already: .to() would alias seq_lens
        q_in.copy_(q), k_in.copy_(k), v_in.copy_(v), pos_in.copy_(pos)
        graph.replay()
        want = step(eager_state, q, k, v, pos, True)
        torch.cuda.synchronize()
        for name in ("k_pages", "v_pages", "pos_pages", "seq_lens"):
            assert_same(f"{name} after step {i}", getattr(graph_state, name), getattr(eager_state, name))
        tol, _ = OUT_TOL[torch.bfloat16]
        assert (out.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("layout", ["bthd", "token_slice", "table_view", "unaligned_pages"])
def test_append_strided_inputs(layout):
    case = cpu_append.Case([3, 20], [6, 2], 6, 2, 64, 4, 1, torch.bfloat16, seed=11)
    state, k, v, positions, num_new = case.inputs()
    expected = append_kv_ref(*state, k, v, positions, num_new)
    d = dev_state(state)
    k, v, positions, num_new = dev(k), dev(v), dev(positions), dev(num_new)
    tables, lens = d.block_tables, d.seq_lens
    if layout == "bthd":
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    elif layout == "token_slice":
        k, v = (torch.stack([t, torch.zeros_like(t)], dim=3).flatten(2, 3)[:, :, ::2] for t in (k, v))
    elif layout == "table_view":
        big_tables = torch.full((4, tables.shape[1] + 1), 12345, dtype=torch.int32, device=DEVICE)
        big_lens = torch.full((4,), 777, dtype=torch.int32, device=DEVICE)
        big_tables[::2, :-1] = tables
        big_lens[::2] = lens
        tables, lens = big_tables[::2, :-1], big_lens[::2]
    else:  # pages one element off 16-byte alignment: copied in 2-byte words
        d = d._replace(k_pages=misaligned(d.k_pages), v_pages=misaligned(d.v_pages))
    ops.append_kv(d.k_pages, d.v_pages, d.pos_pages, tables, lens, k, v, positions, num_new)
    assert_same("k_pages", d.k_pages, expected[0])
    assert_same("v_pages", d.v_pages, expected[1])
    assert_same("pos_pages", d.pos_pages, expected[2])
    assert_same("seq_lens", lens, expected[3])
    if layout == "table_view":
        assert (big_lens[1::2] == 777).all() and (big_tables[:, -1] == 12345).all()


def test_append_empty_batch_and_no_tokens():
    state = dev_state(random_paged_state([], 2, 16, 4, spare_pages=3))
    ops.append_kv(*state, *(dev(torch.zeros(0, 2, 5, 16)),) * 2, dev(torch.zeros(0, 5, dtype=torch.int32)),
                  dev(torch.zeros(0, dtype=torch.int32)))
    state = dev_state(random_paged_state([3, 0], 2, 16, 4))
    before = state.clone()
    ops.append_kv(*state, *(dev(torch.zeros(2, 2, 0, 16)),) * 2, dev(torch.zeros(2, 0, dtype=torch.int32)),
                  dev(torch.zeros(2, dtype=torch.int32)))
    for got, want in zip(state, before):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# paged_decode_attention


def check_decode(q, state: PagedState, scale, scores, *, q_dev=None, tables=None, lens=None, k_pages=None,
                 out_tol=None, check=True):
    """Runs the op on the device (optionally with other device views of q, the tables, lengths or
    pages, or unchecked) and compares it with the float64 reference on the CPU inputs."""
    d = dev_state(state)
    scores_d = dev(scores)
    out = ops.paged_decode_attention(dev(q) if q_dev is None else q_dev, d.k_pages if k_pages is None else k_pages,
                                     d.v_pages,
                                     d.block_tables if tables is None else tables,
                                     d.seq_lens if lens is None else lens, scale, scores_d, check)
    s_len = None if scores is None else scores.shape[-1]
    out_ref, scores_ref = paged_decode_attention_ref(q, state.k_pages, state.v_pages, state.block_tables,
                                                     state.seq_lens, scale, s_len)
    assert out.device.type == DEVICE and out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    out = out.cpu()
    assert not out.isnan().any()
    tol, relative = OUT_TOL[q.dtype] if out_tol is None else (out_tol, False)
    if out.numel():
        bound = tol * max(1.0, out_ref.abs().max().item()) if relative else tol
        err = (out.double() - out_ref).abs().max().item()
        assert err <= bound, f"out: max abs err {err:.3e} > {bound:.3e}"
    empty = state.seq_lens == 0
    assert (out[empty] == 0).all(), "a sequence without cached slots must give zeros"
    if scores is not None:
        scores_d = scores_d.cpu()
        assert not scores_d.isnan().any(), "scores_out not fully overwritten"
        if scores_d.numel():
            err = (scores_d.double() - scores_ref).abs().max().item()
            assert err <= SCORES_TOL, f"scores_out: max abs err {err:.3e}"
        group = q.shape[1] // state.k_pages.shape[2]
        totals = scores_d.double().sum(-1)
        torch.testing.assert_close(totals[~empty], torch.full_like(totals[~empty], group), rtol=0, atol=1e-4)
    return out


# The CUDA decode kernels the tests run (SHADOWKV_DECODE_KERNEL), with their test ids.
DECODE_KERNEL_PARAMS = [pytest.param("warp", id="warp_decode"), pytest.param("pipelined", id="pipelined"),
                        pytest.param("mma", id="mma_decode"), pytest.param("mma_rows", id="mma_decode_rows"),
                        pytest.param("mma_rows_2stage", id="mma_decode_rows_2stage")]


@pytest.fixture(params=DECODE_KERNEL_PARAMS)
def decode_kernel(request, monkeypatch):
    """The decode tests run each kernel (SHADOWKV_DECODE_KERNEL): the warp one, the pipelined one
    and the tensor-core one with its two ways of copying rows, the whole-row one also with a
    two-stage ring (all but warp apply to bfloat16/float16 with head dim 64/128 and aligned
    rows, the rest runs the warp kernel either way). The default ("auto") is the tensor-core one
    with whole-row copies (mma_rows) where it applies; tests without this fixture run it. The
    tensor-core ids start with "mma_decode": `-k mma` would also select the wgmma attention
    tests."""
    monkeypatch.setenv(ops.DECODE_KERNEL_ENV, request.param)
    return request.param


DECODE_CASES = {
    # lens, q_heads, kv_heads, head_dim, page_size, scale factor (None: 1/sqrt(D)), scores_extra
    "mha_d64_ps16": ([37, 0, 300], 4, 4, 64, 16, None, 3),
    "gqa4_d128_ps1": ([129, 5], 8, 2, 128, 1, None, None),
    "gqa8_d128_ps16": ([700], 8, 1, 128, 16, 0.5, 0),
    "gqa16_d64_two_head_tiles": ([513, 40], 16, 1, 64, 16, None, 2),
    "gqa6_d80_generic": ([100, 1], 12, 2, 80, 4, 2.0, 1),
    "gqa2_d256_generic": ([90, 1000], 4, 2, 256, 16, None, 0),
    "mha_d96_ps4": ([64, 65, 63], 2, 2, 96, 4, None, None),
    "d16": ([257], 4, 1, 16, 1, None, 5),
    "d1": ([33, 2], 2, 2, 1, 16, None, 0),
    "one_slot": ([1], 4, 2, 128, 16, None, 0),
    "all_empty": ([0, 0], 4, 2, 64, 16, None, 2),
    "partition_boundaries": ([128, 256, 511, 512, 513, 1024, 1025], 2, 1, 128, 16, None, 0),
    # A grid big enough for 512-slot partitions (the kernel halves them, down to 128, on small grids).
    "many_sequences": ([3000, 2900, 3100, 2500, 3333, 4000, 1, 0], 16, 8, 128, 16, None, 0),
    # Pages that straddle the staged kernels' 32/64-slot chunks and partitions; groups of 3 and 8.
    "gqa8_d128_ps3": ([250, 1000, 31], 16, 2, 128, 3, None, 1),
    "gqa3_d64_ps5": ([77, 1, 545], 3, 1, 64, 5, None, 0),
}


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("name", list(DECODE_CASES))
@pytest.mark.usefixtures("decode_kernel")
def test_decode_matches_reference(name, dtype, check):
    lens, hq, hkv, d, ps, factor, extra = DECODE_CASES[name]
    scale = None if factor is None else factor / math.sqrt(d)
    check_decode_case(cpu_decode.Case(lens, hq, hkv, d, ps, dtype, scale, extra, seed=len(name)), check=check)


def check_decode_case(case, check=True):
    q, state, scores = case.inputs()
    return check_decode(q, state, case.scale, scores, check=check)


@pytest.mark.parametrize("lens, q_heads, kv_heads, head_dim, dtype, with_scores", [
    pytest.param([8192], 8, 2, 128, torch.bfloat16, True, id="8k_bf16_gqa4_d128_scores"),
    pytest.param([16384, 3], 4, 4, 64, torch.float16, False, id="16k_fp16_mha_d64_ragged"),
    pytest.param([32768], 8, 1, 128, torch.float32, True, id="32k_fp32_gqa8_d128_scores"),
    pytest.param([20000, 9000], 4, 2, 80, torch.bfloat16, True, id="20k_bf16_d80_generic_scores"),
])
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.usefixtures("decode_kernel")
def test_decode_long_contexts_split_k(lens, q_heads, kv_heads, head_dim, dtype, with_scores, check):
    case = cpu_decode.Case(lens, q_heads, kv_heads, head_dim, 16, dtype, None, 0 if with_scores else None, seed=5)
    check_decode_case(case, check=check)


def needle_case(lens, q_heads, kv_heads, head_dim, page_size, run, dtype):
    """(q, state, smallest change) for ``test_decode_sees_every_needle``: every sequence's first
    and last slot, and the first and last slot of every ``run``-slot run, hold a "needle": a key
    the query scores 12 above the others (random keys scaled by 0.1 score ~0), so the needles
    hold all but ~1e-3 of the attention, and a value along one dimension (needle index mod D),
    sized so that each used dimension of the output is ~1. A needle dropped (or read twice)
    moves its dimension by the returned change, ``1 / needles sharing a dimension`` at least.
    Every query head is the same vector ``u``."""
    gen = torch.Generator().manual_seed(sum(lens) + head_dim)
    state = random_paged_state(lens, kv_heads, head_dim, page_size, preallocated=1, spare_pages=2, generator=gen)
    k, v = state.k_pages * 0.1, state.v_pages * 0.1
    u = torch.randn(head_dim, generator=gen)
    needle_key = u * (12.0 * math.sqrt(head_dim) / u.dot(u))  # scale 1/sqrt(D): a score of 12
    change = 1.0
    for b, n in enumerate(lens):
        slots = sorted({0, n - 1} | {c + e for c in range(0, n, run) for e in (0, run - 1) if c + e < n}
                       if n else set())
        sharing = math.ceil(len(slots) / head_dim)
        pages, rows = slot_index(state.block_tables, b, n, page_size)
        for i, slot in enumerate(slots):
            k[pages[slot], rows[slot]] = needle_key
            v[pages[slot], rows[slot]] = 0.0
            shared = len(range(i % head_dim, len(slots), head_dim))  # needles on this dimension
            v[pages[slot], rows[slot], :, i % head_dim] = len(slots) / shared
        change = min(change, 1.0 / max(sharing, 1))
    state = state._replace(k_pages=k.to(dtype), v_pages=v.to(dtype))
    q = u.expand(len(lens), q_heads, head_dim).contiguous().to(dtype)
    return q, state, change


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens, q_heads, kv_heads, head_dim, page_size, run", [
    pytest.param([4100, 1030, 17, 0], 8, 2, 128, 16, 16, id="gqa4_d128_ps16_every_page"),
    pytest.param([2500, 513, 1], 3, 1, 64, 3, 127, id="gqa3_d64_ps3_every_127"),
])
@pytest.mark.usefixtures("decode_kernel")
def test_decode_sees_every_needle(lens, q_heads, kv_heads, head_dim, page_size, run, dtype):
    """The half-precision output bound (2e-2 / 5e-3 of max(1, |ref|)) is loose against random
    keys, where attention is so evenly spread that a kernel dropping a whole 512-slot split-K
    partition, the sink or the last page stays inside it (only scores_out would show it). With
    ``needle_case``'s needles on the first and last slot of every page (or of every 127 slots,
    which cut 3-slot pages and 128-512-slot partitions anywhere), a needle dropped or read twice
    moves its output dimension several times the bound."""
    q, state, change = needle_case(lens, q_heads, kv_heads, head_dim, page_size, run, dtype)
    assert change >= 5 * OUT_TOL[dtype][0]  # the case is as sharp as the docstring says
    check_decode(q, state, None, None)


@pytest.mark.parametrize("kernel", DECODE_KERNEL_PARAMS)
@settings(max_examples=60)
@given(case=cpu_decode.cases(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_decode_random_cases(case, kernel):
    with ops.decode_kernel(kernel):  # (hypothesis runs the examples inside one fixture call)
        check_decode_case(case)


@pytest.mark.parametrize("layout", ["q_heads_last", "pages_dim_strided", "table_view", "unaligned_pages",
                                    "unaligned_q", "shared_pages"])
@pytest.mark.usefixtures("decode_kernel")
def test_decode_layouts(layout):
    case = cpu_decode.Case([200, 77], 8, 2, 128, 16, torch.bfloat16, None, 1, seed=21)
    q, state, scores = case.inputs()
    d = dev_state(state)
    if layout == "q_heads_last":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        check_decode(q, state, None, scores)
    elif layout == "pages_dim_strided":  # read-only pages need no unit last stride (copied)
        check_decode(q, state, None, scores, k_pages=d.k_pages.transpose(2, 3).contiguous().transpose(2, 3))
    elif layout == "table_view":
        tables = torch.cat([d.block_tables, torch.full_like(d.block_tables, 999)], 1)[:, : d.block_tables.shape[1]]
        lens = torch.stack([d.seq_lens, torch.full_like(d.seq_lens, -7)], 1)[:, 0]
        check_decode(q, state, None, scores, tables=tables, lens=lens)
    elif layout == "unaligned_pages":  # rows not aligned for vector loads: the generic kernel
        check_decode(q, state, None, scores, k_pages=misaligned(d.k_pages))
    elif layout == "unaligned_q":  # aligned pages (vector loads) but q one element off
        check_decode(q, state, None, scores, q_dev=misaligned(q))
    else:  # two sequences read the same pages (a shared prefix)
        tables = state.block_tables.clone()
        tables[1] = tables[0]
        state = state._replace(block_tables=tables, seq_lens=torch.tensor([200, 200], dtype=torch.int32))
        q = q[:1].expand(2, -1, -1).contiguous()
        out = check_decode(q, state, None, None)
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_decode_matches_cpu_float32():
    """float32: the CUDA and CPU kernels agree closely (both accumulate in fp32)."""
    case = cpu_decode.Case([3000, 10, 0], 8, 2, 128, 16, torch.float32, None, 0, seed=31)
    q, state, scores = case.inputs()
    out_d = check_decode(q, state, None, scores.clone())
    scores_cpu = scores.clone()
    out_c = ops.paged_decode_attention(q, *state[:2], *state[3:], None, scores_cpu)
    torch.testing.assert_close(out_d, out_c, rtol=0, atol=2e-6)


@pytest.mark.usefixtures("decode_kernel")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_decode_large_logits_are_stable(dtype, tol):
    """Logits of size ~1e3 over several partitions: no overflow, and the error stays that of
    the logits themselves (float32: ~1e-7 relative, so 2e-4 on the output here)."""
    state = random_paged_state([600], 1, 64, 16, dtype=dtype, generator=torch.Generator().manual_seed(9))
    q = (1e3 * torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(10))).to(dtype)
    check_decode(q, state, None, torch.zeros(1, 1, 600), out_tol=tol * max(1.0, state.v_pages.abs().max().item()))


def test_decode_empty_batch_and_no_query_heads():
    state = random_paged_state([], 2, 16, 4, spare_pages=1)
    d = dev_state(state)
    assert ops.paged_decode_attention(dev(torch.randn(0, 4, 16)), *d[:2], *d[3:]).shape == (0, 4, 16)
    state = random_paged_state([5, 0], 2, 16, 4)
    d = dev_state(state)
    scores = dev(torch.full((2, 2, 6), math.nan))
    out = ops.paged_decode_attention(dev(torch.randn(2, 0, 16)), *d[:2], *d[3:], scores_out=scores)
    assert out.shape == (2, 0, 16) and (scores == 0).all()


@cuda_only
@pytest.mark.usefixtures("decode_kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", ["page_id_past_pool", "negative_page_id", "late_page_of_a_long_sequence",
                                 "len_past_capacity", "negative_len", "len_int32_min", "len_past_scores"])
def test_decode_unchecked_bad_values_give_nan(bad, dtype):
    """check=False: bad values cannot be refused before the launch, so the sequence that holds
    them gets NaN (out and scores) and nothing is read out of bounds (memcheck runs this); the
    other sequences are exact."""
    lens = [40, 2000, 50] if bad == "late_page_of_a_long_sequence" else [40, 33, 50]
    case = cpu_decode.Case(lens, 4, 2, 64, 8, dtype, None, 0, seed=41)
    q, state, scores = case.inputs()
    d = dev_state(state)
    tables, lens = d.block_tables.clone(), d.seq_lens.clone()
    if bad == "late_page_of_a_long_sequence":  # one bad page in the 4th of several partitions
        tables[1, 1700 // 8] = d.k_pages.shape[0] + 7
    elif bad == "len_int32_min":
        lens[1] = -(2**31)
    elif bad == "page_id_past_pool":
        tables[1, 2] = d.k_pages.shape[0] + 1000
    elif bad == "negative_page_id":
        tables[1, 4] = -1  # inside the sequence (33 slots = 5 pages of 8)
    elif bad == "len_past_capacity":
        lens[1] = tables.shape[1] * 8 + 1
    elif bad == "negative_len":
        lens[1] = -3
    else:
        lens[1] = scores.shape[-1] + 1
        lens[1] = min(int(lens[1]), tables.shape[1] * 8)
        assert int(lens[1]) > scores.shape[-1]
    scores_d = dev(scores)
    out = ops.paged_decode_attention(dev(q), d.k_pages, d.v_pages, tables, lens, None, scores_d, False).cpu()
    scores_d = scores_d.cpu()
    assert out[1].isnan().all() and scores_d[1].isnan().all()
    out_ref, scores_ref = paged_decode_attention_ref(q, state.k_pages, state.v_pages, state.block_tables,
                                                     state.seq_lens, None, scores.shape[-1])
    atol = 1e-5 if dtype == torch.float32 else OUT_TOL[dtype][0] * max(1.0, out_ref.abs().max().item())
    for b in (0, 2):
        torch.testing.assert_close(out[b].double(), out_ref[b], rtol=0, atol=atol)
        torch.testing.assert_close(scores_d[b].double(), scores_ref[b], rtol=0, atol=max(1e-5, SCORES_TOL))
    with pytest.raises(ValueError):  # the checked call refuses the same values
        ops.paged_decode_attention(dev(q), d.k_pages, d.v_pages, tables, lens, None, dev(scores))


@cuda_only
@graph_capture
@pytest.mark.parametrize("op", ["append_kv", "paged_decode_attention", "evict_compact"])
def test_checked_call_while_capturing_is_refused_before_anything_is_queued(op):
    """check=True copies values to the host: under capture CUDA answered "operation not permitted
    when stream is capturing" from inside the op and invalidated the caller's capture. Now a
    ValueError says what to do, nothing is captured, the capture ends cleanly, and the same call
    eagerly works."""
    lens, hkv, d, ps = [9, 4], 2, 64, 4
    state = dev_state(random_paged_state(lens, hkv, d, ps, preallocated=1, dtype=torch.bfloat16, horizon=16,
                                         generator=torch.Generator().manual_seed(71)))
    gen = torch.Generator().manual_seed(72)
    q = dev(torch.randn(2, 2 * hkv, d, generator=gen).to(torch.bfloat16))
    k, v = (dev(torch.randn(2, hkv, 1, d, generator=gen).to(torch.bfloat16)) for _ in range(2))
    pos, ones = dev(torch.tensor([[9], [4]], dtype=torch.int32)), dev(torch.ones(2, dtype=torch.int32))
    keep = torch.zeros(2, hkv, max(lens), dtype=torch.bool)
    keep[0, :, :5], keep[1, :, :4] = True, True
    keep, steps = dev(keep), dev(torch.tensor(lens, dtype=torch.int32))
    log = dev(torch.full((2, hkv, 16), ops.NEVER_EVICTED, dtype=torch.int32))
    call = {"append_kv": lambda: ops.append_kv(*state, k, v, pos, ones, check=True),
            "paged_decode_attention": lambda: ops.paged_decode_attention(
                q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens, check=True),
            "evict_compact": lambda: ops.evict_compact(*state, keep, steps, log, check=True)}[op]
    before = [t.clone() for t in (*state, log)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=f"shadowkv::{op}: check=True .* captured into a CUDA graph; pass check=False"):
        with torch.cuda.graph(graph):
            call()
    torch.cuda.synchronize()
    for a, b in zip(before, (*state, log)):
        assert torch.equal(a, b)
    call()  # the stream is usable: eagerly the checked call runs
    torch.cuda.synchronize()


@cuda_only
@graph_capture
@pytest.mark.usefixtures("decode_kernel")
def test_decode_unchecked_is_graph_capturable():
    """check=False makes no host copy or synchronisation: the call can be captured in a CUDA
    graph, and replays follow new queries and lengths written into the captured buffers."""
    case = cpu_decode.Case([300, 17], 8, 2, 128, 16, torch.bfloat16, None, None, seed=43)
    q, state, _ = case.inputs()
    d = dev_state(state)
    q_d, lens = dev(q), d.seq_lens.clone()
    ops.paged_decode_attention(q_d, d.k_pages, d.v_pages, d.block_tables, lens, check=False)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_decode_attention(q_d, d.k_pages, d.v_pages, d.block_tables, lens, check=False)
    for step in range(3):
        q2 = torch.randn(q.shape, generator=torch.Generator().manual_seed(step)).to(q.dtype)
        lens2 = state.seq_lens - step  # shorter sequences: the same pages, fewer slots
        q_d.copy_(dev(q2))
        lens.copy_(dev(lens2))
        if step == 1:  # a replay with a bad page id first: NaN there, and the flag must not stick
            saved = d.block_tables[0, 0].item()
            d.block_tables[0, 0] = d.k_pages.shape[0] + 3
            graph.replay()
            torch.cuda.synchronize()
            assert out[0].isnan().all() and not out[1].isnan().any()
            d.block_tables[0, 0] = saved
        graph.replay()
        torch.cuda.synchronize()
        # The same unchecked call eagerly: the same partitioning, so the same bits.
        eager = ops.paged_decode_attention(dev(q2), d.k_pages, d.v_pages, d.block_tables, dev(lens2), check=False)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        out_ref, _ = paged_decode_attention_ref(q2, state.k_pages, state.v_pages, state.block_tables, lens2)
        tol, _ = OUT_TOL[q.dtype]
        assert (out.cpu().double() - out_ref).abs().max().item() <= tol * max(1.0, out_ref.abs().max().item())


@cuda_only
def test_unknown_decode_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv(ops.DECODE_KERNEL_ENV, "fastest")
    q, state, _ = cpu_decode.Case([5], 2, 1, 64, 4, torch.bfloat16, None, None, seed=3).inputs()
    d = dev_state(state)
    with pytest.raises(ValueError, match="SHADOWKV_DECODE_KERNEL must be one of auto, warp, pipelined, mma, "
                                         "mma_rows, mma_rows_2stage"):
        ops.paged_decode_attention(dev(q), d.k_pages, d.v_pages, d.block_tables, d.seq_lens)


@cuda_only
@caching_allocator
def test_decode_workspace_comes_from_torch_caching_allocator():
    """The CUDA ops take their scratch memory from PyTorch's caching allocator (installed when
    the extension loads; shadowkv/workspace.h), so it reuses what torch has cached and counts in
    its statistics. Decode with scores_out keeps every key's logit per query head in a
    ``[B, Hq, S]`` float32 workspace, 8x the scores_out tensor here (Hq = 8, Hkv = 1): its bytes
    show in torch's requested-bytes counter (under cudaMallocAsync only ``out``'s 1 KiB would)."""
    length = 20000
    q, state, scores = cpu_decode.Case([length], 8, 1, 64, 16, torch.bfloat16, None, 0, seed=5).inputs()
    d = dev_state(state)
    q, scores = dev(q), dev(scores)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["requested_bytes.all.allocated"]
    ops.paged_decode_attention(q, d.k_pages, d.v_pages, d.block_tables, d.seq_lens, scores_out=scores)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["requested_bytes.all.allocated"] - before >= 8 * length * 4


@cuda_only
def test_decode_rejects_float64_and_wide_heads():
    case = cpu_decode.Case([5], 2, 1, 16, 4, torch.float64, None, None, seed=1)
    q, state, _ = case.inputs()
    d = dev_state(state)
    with pytest.raises(TypeError, match="float64"):
        ops.paged_decode_attention(dev(q), *d[:2], *d[3:])
    state = random_paged_state([5], 1, 300, 4)
    d = dev_state(state)
    with pytest.raises(ValueError, match="k_pages"):
        ops.paged_decode_attention(dev(torch.randn(1, 2, 300)), *d[:2], *d[3:])


# --------------------------------------------------------------------------------------------
# evict_compact


def run_evict_both(state: PagedState, keep, steps, log, scores, check=True, stable=True):
    """The op on the device and on CPU from the same inputs: every output identical, and equal to
    the reference. `log` may be a view (e.g. one layer of a larger log); its base is compared.
    `check` goes to the device call (valid inputs: the same results either way), `stable` to both."""
    expected = evict_compact_ref(*state, keep, steps, log, scores, stable=stable)
    base = log._base if log._base is not None else log
    cpu_state, cpu_base = state.clone(), base.clone()
    cpu_log = cpu_base.as_strided(log.shape, log.stride(), log.storage_offset())
    cpu_scores = None if scores is None else scores.clone()
    cpu_freed = ops.evict_compact(*cpu_state, keep, steps, cpu_log, cpu_scores, stable=stable)

    d = dev_state(state)
    d_base = dev(base)
    d_log = d_base.as_strided(log.shape, log.stride(), log.storage_offset())
    d_scores = dev(scores)
    freed = ops.evict_compact(*d, dev(keep), dev(steps), d_log, d_scores, check=check, stable=stable)

    got = (*d, d_log, d_scores, freed)
    for name, g, c, ref in zip(expected._fields, got, (*cpu_state, cpu_log, cpu_scores, cpu_freed), expected):
        assert_same(name, g, c)
        assert_same(name + " (reference)", g, ref)
    assert_same("evicted_at (whole buffer)", d_base, cpu_base)
    return freed


@settings(max_examples=120)
@given(case=cpu_evict.cases())
def test_evict_random_cases(case):
    run_evict_both(*case.inputs(), stable=case.stable)
    run_evict_both(*case.inputs(), check=False, stable=case.stable)


MANY_LENS = [(97 * i) % 700 + 1 for i in range(48)]  # 1 .. 700 slots, 16k in all
EVICT_CASES = {
    # lens, kv_heads, head_dim, page_size, preallocated, policy, budget, extra_slots
    "long_streaming_bf16_d128": ([5000, 37], 2, 128, 16, 1, "streaming", 0, 3, torch.bfloat16),
    "long_random_fp16_d64_ps1": ([3000], 2, 64, 1, 0, "random", 1500, 0, torch.float16),
    # ~1500 holes below the new length: fill_kernel's rounds of 1024 pairs
    "long_random_bf16_d128_two_fill_rounds": ([6000], 2, 128, 16, 0, "random", 3000, 0, torch.bfloat16),
    "d256_fp32_random": ([700, 0, 65], 2, 256, 16, 2, "random", 300, 1, torch.float32),
    "d4100_fp32_direct_rows": ([40], 1, 4100, 4, 0, "random", 13, 0, torch.float32),
    "d17_fp16_two_byte_words": ([300, 2], 3, 17, 4, 1, "random", 100, 2, torch.float16),
    "fp64_d80": ([260], 2, 80, 16, 0, "sinks_only", 0, 0, torch.float64),
    "nothing_kept": ([70, 3], 2, 64, 16, 1, "nothing", 0, 1, torch.bfloat16),
    "keep_all_releases_spare_pages": ([50], 2, 64, 4, 2, "keep_all", 0, 0, torch.bfloat16),
    # Many sequences x heads at once: the compaction's last block per sequence (a ticket) lists
    # the freed pages and writes the length while other sequences' blocks still run.
    "many_sequences_random_bf16_d64": (MANY_LENS, 8, 64, 16, 1, "random", 300, 0, torch.bfloat16),
    "many_sequences_streaming_fp16_d128": (MANY_LENS, 4, 128, 16, 1, "streaming", 0, 0, torch.float16),
}


@pytest.mark.parametrize("stable", [True, False], ids=["stable", "fill"])
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
@pytest.mark.parametrize("name", list(EVICT_CASES))
def test_evict_named_cases(name, with_scores, check, stable):
    lens, h, d, ps, pre, policy, budget, extra, dtype = EVICT_CASES[name]
    case = cpu_evict.Case(lens, h, d, ps, pre, dtype, policy, budget, extra, with_scores, log_in_layers=True,
                          seed=len(name))
    run_evict_both(*case.inputs(), check=check, stable=stable)


def _evict_bad_sequence_1(a, bad):
    """Changes of the valid evict args (cpu_evict._valid_args) that make sequence 1 invalid."""
    b1_slot = 2  # sequence 1 keeps slots 0 and 1 of its 3 in both heads: slot 2 is evicted
    page, row = int(a["block_tables"][1, b1_slot // 4]), b1_slot % 4
    changes = {
        "keep_past_length": ("keep", (1, 0, 5), True),
        "keep_counts_differ": ("keep", (1, 1, 0), False),
        "steps_negative": ("steps", 1, -1),
        "steps_never": ("steps", 1, INT32_MAX),
        "position_outside_log": ("pos_pages", (page, row, 0), 20),
        "negative_position": ("pos_pages", (page, row, 1), -3),
        "already_evicted": ("evicted_at", (1, 0, int(a["pos_pages"][page, row, 0])), 5),
        "table_entry_missing": ("block_tables", (1, 0), -1),
        "table_entry_outside_pool": ("block_tables", (1, 0), 99),
        "table_tail_garbage": ("block_tables", (1, 2), -3),
        "len_past_keep": ("seq_lens", 1, 9),
        "len_past_capacity": ("seq_lens", 1, 13),
        "poisoned_len": ("seq_lens", 1, -1),
    }
    name, index, value = changes[bad]
    return cpu_evict._set(name, index, value)(a)


@cuda_only
@pytest.mark.parametrize("stable", [True, False], ids=["stable", "fill"])
@pytest.mark.parametrize("bad", ["keep_past_length", "keep_counts_differ", "steps_negative", "steps_never",
                                 "position_outside_log", "negative_position", "already_evicted",
                                 "table_entry_missing", "table_entry_outside_pool", "table_tail_garbage",
                                 "len_past_keep", "len_past_capacity", "poisoned_len"])
def test_evict_unchecked_bad_values_leave_the_sequence_alone(bad, stable):
    """check=False: a sequence with bad values is not written (pages, positions, table, log),
    its length becomes -1 and its freed row -1; the other sequence is evicted exactly as the CPU
    op evicts it. Nothing is read or written out of bounds (memcheck runs this)."""
    good = cpu_evict._valid_args()
    cpu_args = {k: v.clone() for k, v in good.items()}
    expected_freed = ops.evict_compact(**cpu_args, stable=stable)
    args = dict(good)
    args.update(_evict_bad_sequence_1(args, bad))
    d = {k: dev(v) for k, v in args.items()}
    freed = ops.evict_compact(**d, check=False, stable=stable)
    assert d["seq_lens"].cpu().tolist() == [int(cpu_args["seq_lens"][0]), -1]
    assert freed[1].eq(-1).all()
    assert_same("freed[0]", freed[0], expected_freed[0])
    assert_same("block_tables[1]", d["block_tables"][1], args["block_tables"][1])
    assert_same("block_tables[0]", d["block_tables"][0], cpu_args["block_tables"][0])
    for name in ("evicted_at", "slot_scores"):
        assert_same(f"{name}[1]", d[name][1], args[name][1])
        assert_same(f"{name}[0]", d[name][0], cpu_args[name][0])
    pages_1 = {int(p) for p in good["block_tables"][1] if p >= 0}
    pages_0 = {int(p) for p in good["block_tables"][0] if p >= 0} - pages_1
    for name in ("k_pages", "v_pages", "pos_pages"):
        for p in pages_1:
            assert_same(f"{name} page {p} (sequence 1)", d[name][p], args[name][p])
        for p in pages_0:
            assert_same(f"{name} page {p} (sequence 0)", d[name][p], cpu_args[name][p])
    with pytest.raises(ValueError, match="seq_lens"):  # checked calls reject the poisoned length
        ops.evict_compact(**{k: v.clone() for k, v in d.items()})


@cuda_only
@graph_capture
def test_evict_unchecked_is_graph_capturable():
    """check=False: evict_compact captured in a CUDA graph and replayed (on the restored cache,
    with new keep masks copied into the captured input) matches the eager checked op."""
    case = cpu_evict.Case([300, 77, 140], 2, 128, 16, 1, torch.bfloat16, "random", 60, 0, True,
                          log_in_layers=False, seed=71)
    state, keep, steps, log, scores = case.inputs()
    other_keep = cpu_evict.Case([300, 77, 140], 2, 128, 16, 1, torch.bfloat16, "streaming", 60, 0, True,
                                log_in_layers=False, seed=72).inputs()[1]
    static = dict(dev_state(state)._asdict(), keep=dev(keep), steps=dev(steps), evicted_at=dev(log),
                  slot_scores=dev(scores))
    pristine = {k: v.clone() for k, v in static.items()}

    def restore():
        for k, v in static.items():
            if k != "keep":
                v.copy_(pristine[k])

    ops.evict_compact(**{k: v.clone() for k, v in static.items()}, check=False)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        freed = ops.evict_compact(**static, check=False)
    for k, v in static.items():  # capturing ran nothing
        assert_same(f"{k} after capture", v, pristine[k])
    for mask in (keep, other_keep):
        restore()
        static["keep"].copy_(dev(mask))
        graph.replay()
        eager = {k: v.clone() for k, v in pristine.items()}
        eager["keep"] = dev(mask)
        want = ops.evict_compact(**eager)
        torch.cuda.synchronize()
        assert_same("freed", freed, want)
        for k in static:
            assert_same(k, static[k], eager[k])


def test_evict_unaligned_pages():
    case = cpu_evict.Case([90, 30], 2, 64, 16, 1, torch.bfloat16, "random", 20, 0, True, False, seed=3)
    state, keep, steps, log, scores = case.inputs()
    expected = evict_compact_ref(*state, keep, steps, log, scores)
    d = dev_state(state)
    d = d._replace(k_pages=misaligned(d.k_pages), v_pages=misaligned(d.v_pages))
    d_log, d_scores = dev(log), dev(scores)
    freed = ops.evict_compact(*d, dev(keep), dev(steps), d_log, d_scores)
    for name, g, ref in zip(expected._fields, (*d, d_log, d_scores, freed), expected):
        assert_same(name, g, ref)


@pytest.mark.parametrize("page_size, every", [(1, 1), (4, 3), (16, 4)])
def test_round_trip_matches_cpu(page_size, every):
    """Prefill, then one token at a time: evict with a StreamingLLM mask every `every` steps
    (scores from decode attention compacted along), append the token into pages from a free list
    that evict_compact refills, attend with scores_out. The same calls on CPU and on the device
    keep identical caches, logs and freed pages, and close outputs."""
    sinks, window, kv_heads, head_dim, q_heads = 2, 6, 2, 64, 8
    lengths = [40, 25]
    batch, total = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(page_size * 10 + every)
    k_all = torch.randn(batch, kv_heads, total, head_dim, generator=gen).bfloat16()
    v_all = torch.randn(batch, kv_heads, total, head_dim, generator=gen).bfloat16()
    q_all = torch.randn(batch, q_heads, total, head_dim, generator=gen).bfloat16()
    max_live = sinks + window + every
    max_pages = math.ceil(max_live / page_size) + 1
    num_pages = batch * max_pages

    def new_cache(device):
        return dict(
            state=PagedState(torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device),
                             torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device),
                             torch.full((num_pages, page_size, kv_heads), -1, dtype=torch.int32, device=device),
                             torch.full((batch, max_pages), -1, dtype=torch.int32, device=device),
                             torch.zeros(batch, dtype=torch.int32, device=device)),
            free=list(range(num_pages)),
            log=torch.full((batch, kv_heads, total), INT32_MAX, dtype=torch.int32, device=device),
            scores=torch.zeros(batch, kv_heads, max_live + 1, device=device))

    caches = {"cpu": new_cache("cpu"), DEVICE: new_cache(DEVICE)}

    def append(cache, lo, hi):
        st, device = cache["state"], cache["state"].k_pages.device
        num_new = [max(0, min(hi, n) - lo) for n in lengths]
        lens = st.seq_lens.tolist()
        for b in range(batch):
            for col in range(math.ceil((lens[b] + num_new[b]) / page_size)):
                if int(st.block_tables[b, col]) < 0:
                    st.block_tables[b, col] = cache["free"].pop()
        positions = torch.arange(lo, hi, dtype=torch.int32).expand(batch, -1).contiguous()
        ops.append_kv(*st, k_all[:, :, lo:hi].to(device), v_all[:, :, lo:hi].to(device), positions.to(device),
                      torch.tensor(num_new, dtype=torch.int32, device=device))

    for cache in caches.values():
        append(cache, 0, window)
    for t in range(window, total):
        outs = {}
        for name, cache in caches.items():
            st = cache["state"]
            device = st.k_pages.device
            if t % every == 0:
                slots = cache["scores"].shape[-1]
                keep = streaming_keep(st.seq_lens.cpu(), kv_heads, slots, sinks, window)
                freed = ops.evict_compact(*st, keep.to(device), torch.full((batch,), t, dtype=torch.int32,
                                                                          device=device), cache["log"], cache["scores"])
                cache["free"].extend(freed[freed >= 0].tolist())
                cache["freed"] = freed.cpu()
            append(cache, t, t + 1)
            outs[name] = ops.paged_decode_attention(q_all[:, :, t].to(device), *st[:2], *st[3:], None,
                                                    cache["scores"]).cpu()
        a, b = caches["cpu"], caches[DEVICE]
        for field, x, y in zip(PagedState._fields, a["state"], b["state"]):
            assert_same(f"{field} at step {t}", y, x)
        assert_same(f"evicted_at at step {t}", b["log"], a["log"])
        assert a["free"] == b["free"], t
        if "freed" in a:
            assert_same(f"freed at step {t}", b["freed"], a["freed"])
        torch.testing.assert_close(outs[DEVICE].float(), outs["cpu"].float(), rtol=0, atol=2e-2)
        torch.testing.assert_close(b["scores"].cpu(), a["scores"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# torch.library


def test_opcheck_append():
    case = cpu_append.Case([3, 0, 6], [2, 5, 0], 5, 2, 16, 4, 1, torch.bfloat16, seed=3)
    state, k, v, positions, num_new = case.inputs()
    torch.library.opcheck(APPEND.default, (*dev_state(state), dev(k), dev(v), dev(positions), dev(num_new)))


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_opcheck_decode(with_scores):
    case = cpu_decode.Case([5, 0, 9], 4, 2, 16, 4, torch.float32, None, 2 if with_scores else None, seed=1)
    q, state, scores = case.inputs()
    if scores is not None:
        scores.zero_()
    d = dev_state(state)
    op, extra = (torch.ops.shadowkv.paged_decode_attention_scores, (dev(scores),)) if with_scores else (DECODE, ())
    for scale in (None, 0.3):
        torch.library.opcheck(op.default, (dev(q), d.k_pages, d.v_pages, d.block_tables, d.seq_lens, scale, *extra))


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_opcheck_evict(with_scores):
    case = cpu_evict.Case([9, 0, 5], 2, 16, 4, 1, torch.float32, "random", 3, 1, with_scores, False, seed=7)
    state, keep, steps, log, scores = case.inputs()
    torch.library.opcheck(EVICT.default, (*dev_state(state), dev(keep), dev(steps), dev(log), dev(scores)))
    state, keep, steps, log, scores = case.inputs()
    torch.library.opcheck(EVICT.default, (*dev_state(state), dev(keep), dev(steps), dev(log), dev(scores), True,
                                          False))  # fill


# --------------------------------------------------------------------------------------------
# Argument checks: the CPU tests' bad inputs, built from device tensors.

_DEVICE_WORDS = re.compile(r"\b(cpu|cuda|meta)\b")


def check_bad_input(fn, valid_args, arg, change):
    """`fn(**args)` with `change` applied raises on the device as on CPU: same exception type,
    naming `arg`, the same message unless it names a device, and nothing written."""
    cpu_args = valid_args()
    cpu_args.update(change(cpu_args))
    with pytest.raises((ValueError, TypeError)) as cpu_err:
        fn(**cpu_args)

    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in valid_args().items()}
    changed = change(args)
    # Tensors a change creates from scratch are on the CPU: move them, unless on purpose elsewhere.
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
                 for k, v in changed.items()})
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises((ValueError, TypeError)) as err:
        fn(**args)
    assert err.type is cpu_err.type, (str(err.value), str(cpu_err.value))
    assert re.search(rf"(?<![A-Za-z0-9_])({arg})(?![A-Za-z0-9_])", str(err.value)), str(err.value)
    if not _DEVICE_WORDS.search(str(err.value)) and not _DEVICE_WORDS.search(str(cpu_err.value)):
        assert str(err.value) == str(cpu_err.value)
    for name, t in before.items():
        torch.testing.assert_close(args[name], t, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name} was modified by a rejected call")


@pytest.mark.parametrize("case", list(cpu_append.BAD_INPUTS))
def test_append_bad_inputs(case):
    check_bad_input(ops.append_kv, cpu_append._valid_args, *cpu_append.BAD_INPUTS[case])


@pytest.mark.parametrize("case", list(cpu_decode.BAD_INPUTS))
def test_decode_bad_inputs(case):
    check_bad_input(ops.paged_decode_attention, cpu_decode._valid_args, *cpu_decode.BAD_INPUTS[case])


@pytest.mark.parametrize("case", list(cpu_evict.BAD_INPUTS))
def test_evict_bad_inputs(case):
    check_bad_input(ops.evict_compact, cpu_evict._valid_args, *cpu_evict.BAD_INPUTS[case])


def test_shared_pages_evict_rules():
    """Eviction inside a page shared with another sequence is rejected; a private page is fine."""
    gen = torch.Generator().manual_seed(5)
    state = random_paged_state([8, 8], 1, 16, 4, generator=gen)
    tables = state.block_tables.clone()
    tables[1, 0] = tables[0, 0]
    state = state._replace(block_tables=tables)
    keep = torch.ones(2, 1, 8, dtype=torch.bool)
    keep[1, 0, 6] = False
    steps = torch.tensor([8, 8], dtype=torch.int32)
    run_evict_both(state, keep, steps, cpu_evict.random_log(state, 17, gen), None)
    keep[1, 0, 1] = False
    d = dev_state(state)
    with pytest.raises(ValueError, match="block_tables"):
        ops.evict_compact(*d, dev(keep), dev(steps), dev(cpu_evict.random_log(state, 17, gen)))

