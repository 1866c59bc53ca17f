"""paged_decode_attention (CPU): against the float64 reference, against shadow_attention on the
gathered keys, layouts, torch.library registration and argument checks.

Tolerances (max abs error; the reference sees the very same, already rounded, inputs):

- out: float64 1e-10, float32 1e-5; bfloat16 2e-2 and float16 5e-3 relative to
  ``max(1, max|ref|)`` (the output is stored in 8 / 11 mantissa bits).
- scores_out (always float32, accumulated in float or double): 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shadowkv import _C, ops

from .test_shadow_attention import available_cpu_isas
from shadowkv.reference import INT32_MAX
from shadowkv.reference import (
    PagedState,
    evict_compact_ref,
    gather_slots,
    paged_decode_attention_ref,
    random_paged_state,
    shadow_attention_ref,
    streaming_keep,
)

DECODE = torch.ops.shadowkv.paged_decode_attention
DECODE_SCORES = torch.ops.shadowkv.paged_decode_attention_scores

OUT_TOL = {torch.float64: (1e-10, False), torch.float32: (1e-5, False), torch.bfloat16: (2e-2, True),
           torch.float16: (5e-3, True)}
SCORES_TOL = 1e-5


@dataclass
class Case:
    lens: list[int]
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    scale: float | None
    scores_extra: int | None  # None: no scores_out; else S = max(lens) + scores_extra
    seed: int

    def inputs(self) -> tuple[torch.Tensor, PagedState, torch.Tensor | None]:
        gen = torch.Generator().manual_seed(self.seed)
        state = random_paged_state(self.lens, self.kv_heads, self.head_dim, self.page_size,
                                   preallocated=1, spare_pages=2, dtype=self.dtype, generator=gen)
        q = torch.randn(len(self.lens), self.q_heads, self.head_dim, generator=gen).to(self.dtype)
        scores = None
        if self.scores_extra is not None:
            # NaN everywhere: every entry must be overwritten, zeros past each length included.
            s = max(self.lens, default=0) + self.scores_extra
            scores = torch.full((len(self.lens), self.kv_heads, s), math.nan)
        return q, state, scores


@st.composite
def cases(draw, dtypes=(torch.float32,)):
    big = draw(st.integers(0, 9)) == 9
    batch = 1 if big else draw(st.integers(1, 3))
    cap = 300 if big else 100
    lens = [draw(st.one_of(st.just(0), st.integers(1, cap))) for _ in range(batch)]
    kv_heads = draw(st.sampled_from([1, 2]))
    # Groups of 1, 2, 3, 4, 6 and 8 query heads (3 and 6: not a power of 2).
    q_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if h % kv_heads == 0]))
    # Odd head dims (1, 7, 33) reach the kernels' scalar tails of every vector loop.
    head_dim = draw(st.sampled_from([1, 7, 16, 33, 80, 128]))
    factor = draw(st.sampled_from([None, 0.5, 2.0]))
    case = Case(lens, q_heads, kv_heads, head_dim, page_size=draw(st.sampled_from([1, 4, 16])),
                dtype=draw(st.sampled_from(dtypes)),
                scale=None if factor is None else factor / math.sqrt(head_dim),
                scores_extra=draw(st.one_of(st.none(), st.integers(0, 3))), seed=draw(st.integers(0, 2**31 - 1)))
    event(f"group={q_heads // kv_heads}, empty sequence={0 in lens}, scores={case.scores_extra is not None}")
    return case


def check_against_reference(q, state: PagedState, scale, scores, tables=None, lens=None):
    tables = state.block_tables if tables is None else tables
    lens = state.seq_lens if lens is None else lens
    out = ops.paged_decode_attention(q, state.k_pages, state.v_pages, tables, lens, scale, scores)
    s_len = None if scores is None else scores.shape[-1]
    out_ref, scores_ref = paged_decode_attention_ref(q, state.k_pages, state.v_pages, state.block_tables,
                                                     state.seq_lens, scale, s_len)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    tol, relative = OUT_TOL[q.dtype]
    bound = tol * max(1.0, out_ref.abs().max().item()) if relative and out_ref.numel() else tol
    assert not out.isnan().any()
    if out.numel():
        err = (out.double() - out_ref).abs().max().item()
        assert err <= bound, f"out: max abs err {err:.3e} > {bound:.3e}"
    empty = state.seq_lens == 0
    assert (out[empty] == 0).all(), "a sequence without cached slots must give zeros"
    if scores is not None:
        assert not scores.isnan().any(), "scores_out not fully overwritten"
        if scores.numel():
            err = (scores.double() - scores_ref).abs().max().item()
            assert err <= SCORES_TOL, f"scores_out: max abs err {err:.3e}"
        group = q.shape[1] // state.k_pages.shape[2]
        totals = scores.double().sum(-1)  # each query head's probabilities sum to 1
        torch.testing.assert_close(totals[~empty], torch.full_like(totals[~empty], group), rtol=0, atol=1e-4)


@settings(max_examples=150)
@given(case=cases())
def test_matches_reference_float32(case):
    q, state, scores = case.inputs()
    check_against_reference(q, state, case.scale, scores)


@settings(max_examples=60)
@given(case=cases(dtypes=(torch.float64, torch.bfloat16, torch.float16)))
def test_matches_reference_other_dtypes(case):
    q, state, scores = case.inputs()
    check_against_reference(q, state, case.scale, scores)


@pytest.mark.parametrize("isa", available_cpu_isas())
@settings(max_examples=40, deadline=None)
@given(case=cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_every_cpu_isa_matches_reference(isa, case):
    """The baseline and (where the CPU has it) AVX2 variants of the decode loops (csrc/cpu/isa.h)."""
    q, state, scores = case.inputs()
    with ops.cpu_isa(isa):
        check_against_reference(q, state, case.scale, scores)


@pytest.mark.parametrize("isa", available_cpu_isas())
@pytest.mark.parametrize("q_heads, kv_heads, head_dim",
                         [(1, 1, 1), (3, 1, 7), (6, 2, 33), (6, 1, 1), (3, 3, 33), (6, 2, 7)])
def test_odd_head_dims_and_groups_float64(q_heads, kv_heads, head_dim, isa):
    """Odd head dims (the scalar tails of every vector loop) and GQA groups that are not powers
    of 2 (3, 6), in float64 against the reference, with scores_out, over several pages and an
    empty sequence. Hypothesis draws them too, but not every run."""
    case = Case([70, 0, 9], q_heads, kv_heads, head_dim, 16, torch.float64, None, 1, seed=head_dim + q_heads)
    q, state, scores = case.inputs()
    with ops.cpu_isa(isa):
        check_against_reference(q, state, case.scale, scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sinks", [1, 4])
def test_all_evicted_but_sinks(sinks, dtype):
    """Decode after everything but the sinks was evicted (evict_compact with a sinks-only keep
    mask): the cache holds the sinks only, and the output equals the reference and
    shadow_attention's one decode row (q_offset = Lk - 1) over the full keys with the log."""
    lengths, kv_heads, q_heads, head_dim, page_size = [37, 20, 3], 2, 6, 33, 4
    batch, total = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(sinks)
    k_all, v_all = (torch.randn(batch, kv_heads, total, head_dim, generator=gen, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, q_heads, head_dim, generator=gen, dtype=dtype)
    state = random_paged_state(lengths, kv_heads, head_dim, page_size, dtype=dtype, generator=gen)
    for b, n in enumerate(lengths):  # positions 0..n-1 in order, the keys of the full sequence
        pages, rows = state.block_tables[b].long()[torch.arange(n) // page_size], torch.arange(n) % page_size
        state.k_pages[pages, rows] = k_all[b, :, :n].transpose(0, 1)
        state.v_pages[pages, rows] = v_all[b, :, :n].transpose(0, 1)
        state.pos_pages[pages, rows] = torch.arange(n, dtype=torch.int32)[:, None]
    log = torch.full((batch, kv_heads, total), INT32_MAX, dtype=torch.int32)
    keep = streaming_keep(state.seq_lens, kv_heads, total, sinks, 0)
    steps = torch.tensor([n - 1 for n in lengths], dtype=torch.int32)  # evicted before the last query
    expected = evict_compact_ref(*state, keep, steps, log)
    ops.evict_compact(*state, keep, steps, log)
    assert torch.equal(log, expected.evicted_at) and torch.equal(state.seq_lens, expected.seq_lens)
    assert state.seq_lens.tolist() == [min(sinks, n) for n in lengths]

    scores = torch.full((batch, kv_heads, sinks), math.nan)
    check_against_reference(q, state, None, scores)
    out = ops.paged_decode_attention(q, *state[:2], *state[3:])
    for b, n in enumerate(lengths):
        replay, _ = shadow_attention_ref(q[b : b + 1, :, None], k_all[b : b + 1, :, :n], v_all[b : b + 1, :, :n],
                                         log[b : b + 1, :, :n], q_offset=n - 1)
        torch.testing.assert_close(out[b].double(), replay[0, :, 0], rtol=0, atol=OUT_TOL[dtype][0])


@pytest.mark.parametrize("group", [1, 4])
def test_matches_shadow_attention_on_gathered_keys(group):
    """The last query of a dense causal sequence, paged, is shadow_attention's last row."""
    length, kv_heads, head_dim = 37, 2, 64
    gen = torch.Generator().manual_seed(group)
    state = random_paged_state([length, length], kv_heads, head_dim, 4, generator=gen)
    q = torch.randn(2, kv_heads * group, head_dim, generator=gen)
    out = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens)
    k = torch.stack([gather_slots(state.k_pages, state.block_tables, b, length) for b in range(2)]).transpose(1, 2)
    v = torch.stack([gather_slots(state.v_pages, state.block_tables, b, length) for b in range(2)]).transpose(1, 2)
    never = torch.full((2, kv_heads, length), INT32_MAX, dtype=torch.int32)
    dense = ops.shadow_attention(q[:, :, None], k, v, never, q_offset=length - 1)[:, :, 0]
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)


@settings(max_examples=40)
@given(case=cases(), layout=st.sampled_from(["q_heads_last", "pages_dim_strided", "table_view"]))
def test_strided_inputs(case, layout):
    q, state, scores = case.inputs()
    tables, lens = state.block_tables, state.seq_lens
    if layout == "q_heads_last":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "pages_dim_strided":  # read-only pages need no unit last stride (copied)
        state = state._replace(k_pages=state.k_pages.transpose(2, 3).contiguous().transpose(2, 3))
    else:
        tables = torch.cat([tables, torch.full_like(tables, 999)], 1)[:, : tables.shape[1]]
        lens = torch.stack([lens, torch.full_like(lens, -7)], 1)[:, 0]
    check_against_reference(q, state, case.scale, scores, tables, lens)


def test_empty_batch_and_all_empty():
    state = random_paged_state([], 2, 16, 4, spare_pages=1)
    assert ops.paged_decode_attention(torch.randn(0, 4, 16), *state[:2], *state[3:]).shape == (0, 4, 16)
    state = random_paged_state([0, 0], 2, 16, 4)
    scores = torch.full((2, 2, 3), 5.0)
    out = ops.paged_decode_attention(torch.randn(2, 4, 16), *state[:2], *state[3:], scores_out=scores)
    assert (out == 0).all() and (scores == 0).all()


def test_large_logits_are_stable():
    state = random_paged_state([50], 1, 16, 4, generator=torch.Generator().manual_seed(9))
    q = 1e3 * torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(10))
    check_against_reference(q, state, None, torch.zeros(1, 1, 50))


# --------------------------------------------------------------------------------------------
# torch.library


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_opcheck(dtype, with_scores):
    case = Case([5, 0, 9], 4, 2, 16, 4, dtype, None, 2 if with_scores else None, seed=1)
    q, state, scores = case.inputs()
    if scores is not None:
        scores.zero_()
    cache = (q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens)
    op, extra = (DECODE_SCORES, (scores,)) if with_scores else (DECODE, ())
    for scale in (None, 0.3):
        torch.library.opcheck(op.default, (*cache, scale, *extra))
    torch.library.opcheck(op.default, (*cache, None, *extra, False))


def test_unchecked_call_on_cpu_still_checks():
    """``check=False`` only changes the CUDA kernel; the CPU one checks the values regardless."""
    case = Case([5, 9], 4, 2, 16, 4, torch.float32, None, None, seed=3)
    q, state, _ = case.inputs()
    checked = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens)
    unchecked = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens,
                                           check=False)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
    tables = state.block_tables.clone()
    tables[0, 0] = state.k_pages.shape[0]  # a page id past the pool
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_decode_attention(q, state.k_pages, state.v_pages, tables, state.seq_lens, check=False)


def test_decode_kernel_choice_is_checked_and_scoped():
    """``ops.decode_kernel`` names a CUDA kernel: unknown names are a ValueError, the choice is
    undone after the block, and CPU calls ignore it."""
    with pytest.raises(ValueError, match="decode_kernel: `name` must be one of auto, warp, pipelined, mma, "
                                         "mma_rows, mma_rows_2stage"):
        with ops.decode_kernel("fastest"):
            pass
    q, state, _ = Case([5, 9], 4, 2, 64, 4, torch.bfloat16, None, None, seed=3).inputs()
    assert _C.set_kernel_choice(ops.DECODE_KERNEL_ENV, None) is None  # no override left by another test
    before = _C.kernel_choice(ops.DECODE_KERNEL_ENV)
    default = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens)
    with ops.decode_kernel("pipelined"):
        assert _C.kernel_choice(ops.DECODE_KERNEL_ENV) == "pipelined"
        chosen = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens)
    assert _C.kernel_choice(ops.DECODE_KERNEL_ENV) == before
    assert _C.set_kernel_choice(ops.DECODE_KERNEL_ENV, None) is None  # restored to no override, not to a copy
    torch.testing.assert_close(chosen, default, rtol=0, atol=0)


def test_compiles():
    case = Case([5, 9], 4, 2, 16, 4, torch.float32, None, 0, seed=2)
    q, state, scores = case.inputs()
    fn = torch.compile(ops.paged_decode_attention, backend="aot_eager", fullgraph=True)
    out = fn(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens, None, scores)
    eager_scores = torch.zeros_like(scores)
    eager = ops.paged_decode_attention(q, state.k_pages, state.v_pages, state.block_tables, state.seq_lens,
                                       None, eager_scores)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Argument checks


def _valid_args():
    """Two sequences (6 and 0 slots, pages of 4), 4 query heads over 2 KV heads, scores_out."""
    case = Case([6, 0], 4, 2, 16, 4, torch.float32, None, 1, seed=0)
    q, state, scores = case.inputs()
    return dict(q=q, k_pages=state.k_pages, v_pages=state.v_pages, block_tables=state.block_tables,
                seq_lens=state.seq_lens, scale=None, scores_out=scores)


def _set(name, index, value):
    def change(a):
        t = a[name].clone()
        t[index] = value
        return {name: t}
    return change


BAD_INPUTS = {
    "q_int": ("q", lambda a: {"q": a["q"].int()}),
    "k_pages_dtype": ("k_pages", lambda a: {"k_pages": a["k_pages"].double()}),
    "v_pages_dtype": ("v_pages", lambda a: {"v_pages": a["v_pages"].half()}),
    "block_tables_int64": ("block_tables", lambda a: {"block_tables": a["block_tables"].long()}),
    "seq_lens_float": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"].float()}),
    "scores_out_float64": ("scores_out", lambda a: {"scores_out": a["scores_out"].double()}),
    "q_rank": ("q", lambda a: {"q": a["q"][:, None]}),
    "k_pages_rank": ("k_pages", lambda a: {"k_pages": a["k_pages"][0]}),
    "v_pages_rank": ("v_pages", lambda a: {"v_pages": a["v_pages"][..., None]}),
    "block_tables_rank": ("block_tables", lambda a: {"block_tables": a["block_tables"][None]}),
    "seq_lens_rank": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"][:, None]}),
    "scores_out_rank": ("scores_out", lambda a: {"scores_out": a["scores_out"][0]}),
    "q_batch": ("q", lambda a: {"q": a["q"][:1]}),
    "q_head_dim": ("q", lambda a: {"q": a["q"][..., :8]}),
    "heads_not_divisible": ("q|k_pages", lambda a: {"q": a["q"][:, :3]}),
    "v_pages_shape": ("v_pages", lambda a: {"v_pages": a["v_pages"][:-1]}),
    "seq_lens_len": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"][:1]}),
    "scores_out_heads": ("scores_out", lambda a: {"scores_out": a["scores_out"][:, :1]}),
    "scores_out_too_short": ("scores_out", lambda a: {"scores_out": a["scores_out"][..., :5]}),
    # No slots: the empty tensor's null data pointer read as "no scores", and the length check passed.
    "scores_out_no_slots": ("scores_out", lambda a: {"scores_out": a["scores_out"][..., :0]}),
    "scores_out_broadcast": ("scores_out", lambda a: {"scores_out": a["scores_out"][:, :1].expand(2, 2, 7)}),
    "scores_out_aliases_k_pages": ("scores_out", lambda a: {"scores_out": a["k_pages"].flatten()[:28].view(2, 2, 7)}),
    "k_pages_other_device": ("k_pages", lambda a: {"k_pages": a["k_pages"].to("meta")}),
    "seq_lens_other_device": ("seq_lens", lambda a: {"seq_lens": a["seq_lens"].to("meta")}),
    "scores_out_other_device": ("scores_out", lambda a: {"scores_out": a["scores_out"].to("meta")}),
    "scale_zero": ("scale", lambda a: {"scale": 0.0}),
    "scale_negative": ("scale", lambda a: {"scale": -1.0}),
    "scale_nan": ("scale", lambda a: {"scale": math.nan}),
    "scale_inf": ("scale", lambda a: {"scale": math.inf}),
    "scale_above_float32": ("scale", lambda a: {"scale": 1e39}),  # finite in double, inf in the kernels
    "scale_times_log2e_above_float32": ("scale", lambda a: {"scale": 3e38}),  # scale * log2(e) would be inf
    # Not differentiable: a gradient would silently never reach q.
    "q_requires_grad": ("q", lambda a: {"q": a["q"].clone().requires_grad_()}),
    "table_entry_missing": ("block_tables", _set("block_tables", (0, 1), -1)),
    "table_entry_outside_pool": ("block_tables", _set("block_tables", (0, 0), 1000)),
    "seq_lens_negative": ("seq_lens", _set("seq_lens", 1, -2)),
    "seq_lens_beyond_table": ("seq_lens", _set("seq_lens", 0, 100)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_argument(case):
    arg, change = BAD_INPUTS[case]
    args = _valid_args()
    args.update(change(args))
    pattern = rf"(?<![A-Za-z0-9_])({arg})(?![A-Za-z0-9_])"
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.paged_decode_attention(**args)


@pytest.mark.parametrize("dim, what", [(1, "page size"), (2, "KV head"), (3, "head dim")])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_empty_page_dims_are_rejected_on_every_device(dim, what, device):
    """The fake kernel (meta tensors: what torch.compile traces with) refuses a zero page size,
    KV head count or head dim with the kernels' message, not a ZeroDivisionError."""
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _valid_args().items()}
    shape = list(args["k_pages"].shape)
    shape[dim] = 0
    args.update(k_pages=args["k_pages"].new_zeros(shape), v_pages=args["v_pages"].new_zeros(shape), scores_out=None)
    with pytest.raises(ValueError, match=rf"`k_pages` must have .*{what}.*got shape \[{', '.join(map(str, shape))}\]"):
        ops.paged_decode_attention(**args)


def test_scores_out_without_slots_is_fine_for_empty_sequences():
    args = _valid_args()
    args.update(seq_lens=torch.zeros_like(args["seq_lens"]), scores_out=args["scores_out"][..., :0])
    ops.paged_decode_attention(**args)
    for fresh in (False, True):  # a view of a tensor, or a new empty one (whose data pointer is null)
        scores = torch.empty(2, 2, 0) if fresh else args["scores_out"]
        for check in (True, False):  # the CPU kernel checks the lengths either way
            with pytest.raises(ValueError, match=r"`scores_out` has 0 slots \(last dim\) but `seq_lens`\[0\] = 6"):
                ops.paged_decode_attention(**{**_valid_args(), "scores_out": scores}, check=check)


def test_valid_args_run():
    args = _valid_args()
    ops.paged_decode_attention(**args)
    assert not args["scores_out"].isnan().any()


def test_shared_pages_may_be_read():
    """Read-only: two sequences may share pages (a common prefix)."""
    state = random_paged_state([8, 8], 2, 16, 4, generator=torch.Generator().manual_seed(4))
    tables = state.block_tables.clone()
    tables[1] = tables[0]
    q = torch.randn(1, 2, 16).expand(2, 2, 16)
    out = ops.paged_decode_attention(q, state.k_pages, state.v_pages, tables, state.seq_lens)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
