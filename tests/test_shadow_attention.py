"""shadow_attention (CPU): forward, gradients, torch.library registration and argument checks.

Every result is compared with the float64 reference in ``shadowkv.reference`` run on the very
same (already rounded) inputs. Tolerances, as max absolute error:

- float64: 1e-10 forward, 1e-9 gradients (only summation order differs).
- float32: 1e-5 forward (out and lse), 1e-4 gradients (the acceptance bar).
- bfloat16 / float16: out and gradients are stored in 8 / 11 mantissa bits, so the bound is
  relative to the size of the reference, ``tol * max(1, max|ref|)``: bf16 2e-2 out, 5e-2 grads;
  fp16 5e-3 out, 1e-2 grads. lse is float32, computed from the rounded inputs: 1e-4 (relative
  in the same way).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shadowkv import _C, ops
from shadowkv.reference import (
    INT32_MAX,
    random_evicted_at,
    shadow_attention_ref,
    shadow_visible,
    streaming_evicted_at,
)

FWD = torch.ops.shadowkv.shadow_attention_fwd
BWD = torch.ops.shadowkv.shadow_attention_bwd


@dataclass(frozen=True)
class Tol:
    out: float
    lse: float
    grad: float
    relative: bool  # scale by max(1, max|reference|)


TOLERANCES = {
    torch.float64: Tol(out=1e-10, lse=1e-10, grad=1e-9, relative=False),
    torch.float32: Tol(out=1e-5, lse=1e-5, grad=1e-4, relative=False),
    torch.bfloat16: Tol(out=2e-2, lse=1e-4, grad=5e-2, relative=True),
    torch.float16: Tol(out=5e-3, lse=1e-4, grad=1e-2, relative=True),
}


# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One attention problem; tensors are drawn from ``seed`` so that a case is cheap to print."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    q_offset: int
    evicted_at: torch.Tensor  # [B, Hkv, Lk] int32
    scale: float | None = None
    seed: int = 0

    def tensors(self, dtype: torch.dtype, requires_grad: bool = False):
        """q, k, v in ``dtype`` plus float64 upstream gradients for out and lse."""
        gen = torch.Generator().manual_seed(self.seed)
        b, hq, hkv, lq, lk, d = (self.batch, self.q_heads, self.kv_heads, self.q_len,
                                 self.kv_len, self.head_dim)
        q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
        k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
        v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
        grad_out = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
        grad_lse = torch.randn(b, hq, lq, generator=gen, dtype=torch.float64)
        for t in (q, k, v):
            t.requires_grad_(requires_grad)
        return q, k, v, grad_out, grad_lse


def make_evicted_at(kind, batch, kv_heads, kv_len, horizon, sinks, gen, *, window=1,
                    evict_every=1, keep=0.25, late=False):
    """An eviction log of one of the test scenarios, ``[batch, kv_heads, kv_len]`` int32."""
    shape = (batch, kv_heads, kv_len)
    key = torch.arange(kv_len)
    if kind == "none":
        return torch.full(shape, INT32_MAX, dtype=torch.int32)
    if kind == "streaming":
        log = streaming_evicted_at(max(kv_len, horizon), sinks, window, evict_every)[:kv_len]
        return log.expand(shape).contiguous()
    if kind == "random":
        return random_evicted_at(shape, horizon, keep=keep, sinks=sinks, generator=gen)
    if kind == "sinks_only":
        # Everything but the sinks evicted: right after its own query (late) or before any query.
        step = key + 1 if late else torch.zeros_like(key)
        return torch.where(key < sinks, INT32_MAX, step).to(torch.int32).expand(shape).contiguous()
    if kind == "arbitrary":
        # Not a plausible log (keys evicted before they were written): many empty rows.
        return torch.randint(0, horizon + 2, shape, generator=gen, dtype=torch.int32)
    if kind == "ragged":
        # Right-padded sequences of random lengths (>= 1), padding keys logged as evicted at 0
        # (README), the real keys with a random log.
        log = random_evicted_at(shape, horizon, keep=keep, sinks=sinks, generator=gen)
        lengths = torch.randint(1, kv_len + 1, (batch, 1, 1), generator=gen)
        return log.masked_fill(key >= lengths, 0)
    raise ValueError(kind)


@st.composite
def cases(draw, max_len: int = 300):
    """Random problems: mostly small (L <= 96), one in five up to ``max_len`` with B = 1."""
    big = draw(st.integers(0, 4)) == 4
    length_cap = max_len if big else 96
    kv_heads = draw(st.sampled_from([1, 2]))
    # Groups of 1, 2, 3, 4, 6 and 8 query heads (3 and 6: not a power of 2).
    q_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if h % kv_heads == 0 and h <= (4 if big else 8)]))
    batch = 1 if big else draw(st.integers(1, 3))
    # Odd head dims (1, 7, 33) reach the kernels' scalar tails of every vector loop.
    head_dim = draw(st.sampled_from([1, 7, 16, 33, 64, 80, 128]))
    layout = draw(st.sampled_from(["prefill", "decode", "free"]))
    if layout == "prefill":
        kv_len = q_len = draw(st.integers(1, length_cap))
        q_offset = 0
    elif layout == "decode":
        kv_len = draw(st.integers(2, length_cap))
        q_len = draw(st.integers(1, min(kv_len - 1, 16)))
        q_offset = kv_len - q_len
    else:
        kv_len = draw(st.integers(1, length_cap))
        q_len = draw(st.integers(1, length_cap))
        q_offset = draw(st.integers(0, kv_len + 8))
    horizon = q_offset + q_len
    kind = draw(st.sampled_from(["none", "streaming", "random", "sinks_only", "arbitrary", "ragged"]))
    sinks = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed + 1)
    evicted_at = make_evicted_at(
        kind, batch, kv_heads, kv_len, horizon, sinks, gen,
        window=draw(st.integers(1, max(1, kv_len))),
        evict_every=draw(st.integers(1, 8)),
        keep=draw(st.sampled_from([0.0, 0.25, 0.5, 0.9])),
        late=draw(st.booleans()),
    )
    scale_factor = draw(st.sampled_from([None, 0.5, 2.0]))
    empty_rows = not shadow_visible(evicted_at, q_len, q_offset).any(-1).all()
    event(f"layout={layout}, evicted={kind}, big={big}, rows without keys={empty_rows}")
    scale = None if scale_factor is None else scale_factor / math.sqrt(head_dim)
    return Case(batch, q_heads, kv_heads, q_len, kv_len, head_dim, q_offset, evicted_at, scale, seed)


# --------------------------------------------------------------------------------------------
# Comparison against the reference


def _bound(tol: float, ref: torch.Tensor, relative: bool) -> float:
    if not relative:
        return tol
    finite = ref[torch.isfinite(ref)]
    return tol * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)


def _assert_near(name: str, actual: torch.Tensor, ref: torch.Tensor, tol: float, relative: bool):
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    actual = actual.detach().double()
    assert not actual.isnan().any(), f"{name}: NaN in result"
    # -inf (lse of rows without keys) must match exactly; compare the rest numerically.
    inf_ref, inf_act = ref.isinf(), actual.isinf()
    assert torch.equal(inf_ref, inf_act), f"{name}: infinities at different places"
    if inf_ref.all():
        return
    err = (actual[~inf_act] - ref[~inf_ref]).abs().max().item()
    bound = _bound(tol, ref, relative)
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def check_case(case: Case, dtype: torch.dtype, with_lse: bool = True):
    """Runs the public op forward and backward and compares everything with the reference."""
    tol = TOLERANCES[dtype]
    q, k, v, grad_out, grad_lse = case.tensors(dtype, requires_grad=True)
    args = (case.evicted_at, case.q_offset, case.scale)
    if with_lse:
        out, lse = ops.shadow_attention_with_lse(q, k, v, *args)
    else:
        out, lse = ops.shadow_attention(q, k, v, *args), None

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, *args)

    assert out.dtype == dtype and out.device == q.device
    _assert_near("out", out, out_ref, tol.out, tol.relative)
    if with_lse:
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _assert_near("lse", lse, lse_ref, tol.lse, tol.relative)

    # Upstream gradients in the op's dtypes; the reference sees exactly the same values.
    g_out = grad_out.to(dtype)
    outputs, grads = [out], [g_out]
    ref_outputs, ref_grads = [out_ref], [g_out.double()]
    if with_lse:
        g_lse = grad_lse.to(lse.dtype)
        outputs.append(lse), grads.append(g_lse)
        ref_outputs.append(lse_ref), ref_grads.append(g_lse.double())
    dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(ref_outputs, (q64, k64, v64), ref_grads)
    for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert got.dtype == dtype
        _assert_near(name, got, ref, tol.grad, tol.relative)


@settings(max_examples=300)
@given(case=cases(), with_lse=st.booleans())
def test_matches_reference_float32(case, with_lse):
    check_case(case, torch.float32, with_lse)


@settings(max_examples=100)
@given(case=cases(max_len=160), with_lse=st.booleans())
def test_matches_reference_float64(case, with_lse):
    check_case(case, torch.float64, with_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@settings(max_examples=60)
@given(case=cases(max_len=160))
def test_matches_reference_half(dtype, case):
    check_case(case, dtype)


def _tile_cases():
    # Lengths around the CPU kernel's 32-query / 64-key tiles, windows that leave whole key
    # tiles masked in the middle of a row (the block-skipping path).
    for length, sinks, window in [(31, 0, 1), (64, 4, 16), (65, 1, 64), (129, 4, 60),
                                  (200, 0, 65), (257, 4, 128)]:
        ev = streaming_evicted_at(length, sinks, window).expand(1, 2, length).contiguous()
        yield pytest.param(Case(1, 4, 2, length, length, 64, 0, ev, seed=length),
                           id=f"L{length}-s{sinks}-w{window}")


@pytest.mark.parametrize("case", list(_tile_cases()))
def test_tile_boundaries_streaming(case):
    check_case(case, torch.float32)


def named_scenario(name: str) -> tuple[int, int, torch.Tensor]:
    """``(q_len, q_offset, evicted_at)`` of one acceptance scenario: B = 2, Hkv = 2, Lk = 150,
    in prefill (Lq = Lk, q_offset 0), decode (Lq = 7, the last 7 positions) or one-token decode
    (Lq = 1, q_offset = Lk - 1) layout."""
    gen = torch.Generator().manual_seed(0)
    lk = 150
    layouts = {"prefill": (lk, 0), "decode": (7, lk - 7), "decode_one": (1, lk - 1)}
    scenarios = {  # layout, make_evicted_at kind, sinks, late
        "decode_random": ("decode", "random", 4, False),
        "nothing_evicted": ("prefill", "none", 0, False),
        # Everything but the sinks evicted before any query, or right after its own query.
        "all_but_sinks": ("prefill", "sinks_only", 4, False),
        "all_but_sinks_late": ("prefill", "sinks_only", 4, True),
        "all_but_sinks_decode_one": ("decode_one", "sinks_only", 4, False),
        "all_but_one_sink_decode_one": ("decode_one", "sinks_only", 1, False),
        # Rows that see no key at all: every row, or the decode rows.
        "no_key_rows": ("prefill", "sinks_only", 0, False),
        "no_key_decode": ("decode", "sinks_only", 0, False),
        "no_key_decode_one": ("decode_one", "sinks_only", 0, False),
    }
    if name == "first_rows_without_keys":
        # Keys 0..74 evicted before any query: rows 0..74 see nothing, rows 75.. see 75..i
        # (rows with and without keys in one 32-row tile and in one batch).
        ev = torch.where(torch.arange(lk) < 75, 0, INT32_MAX).to(torch.int32).expand(2, 2, lk).contiguous()
        return lk, 0, ev
    layout, kind, sinks, late = scenarios[name]
    q_len, q_offset = layouts[layout]
    return q_len, q_offset, make_evicted_at(kind, 2, 2, lk, lk, sinks, gen, late=late)


NAMED_SCENARIOS = ["decode_random", "nothing_evicted", "all_but_sinks", "all_but_sinks_late",
                   "all_but_sinks_decode_one", "all_but_one_sink_decode_one", "no_key_rows", "no_key_decode",
                   "no_key_decode_one", "first_rows_without_keys"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMED_SCENARIOS)
def test_named_scenarios(name, dtype):
    """The scenarios of the acceptance list, once each, deterministically (hypothesis draws the
    sinks-only and no-key ones rarely)."""
    q_len, q_offset, ev = named_scenario(name)
    if name.startswith("all_but"):
        assert shadow_visible(ev, q_len, q_offset).any(-1).all(), "every row sees its sinks"
    if "no_key" in name or name == "first_rows_without_keys":
        assert not shadow_visible(ev, q_len, q_offset).any(-1).all(), "some row sees no key"
    check_case(Case(2, 8, 2, q_len, 150, 80, q_offset, ev, seed=len(name)), dtype)


def test_no_visible_key_gives_zeros_and_no_nan():
    lk = 12
    ev = torch.zeros(1, 1, lk, dtype=torch.int32)  # every key evicted before any query
    q = torch.randn(1, 2, lk, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, lk, 16, requires_grad=True) for _ in range(2))
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("used", ["out", "lse"])
def test_one_output_backward_matches_reference(used, dtype):
    """A loss of one output alone: ``out`` (ops.shadow_attention; the backward kernel gets
    ``grad_lse=None``) or ``lse`` (autograd gives no ``grad_out``; the wrapper passes zeros).
    GQA group 3, odd head dim, many rows without keys."""
    gen = torch.Generator().manual_seed(3)
    ev = make_evicted_at("arbitrary", 2, 2, 40, 40, 0, gen)
    case = Case(2, 6, 2, 40, 40, 33, 0, ev, seed=3)
    q, k, v, grad_out, grad_lse = case.tensors(dtype, requires_grad=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev)
    if used == "out":
        got, ref, grad = ops.shadow_attention(q, k, v, ev), out_ref, grad_out.to(dtype)
    else:
        got, ref, grad = ops.shadow_attention_with_lse(q, k, v, ev)[1], lse_ref, grad_lse.to(dtype)
    tol = TOLERANCES[dtype]
    grads = torch.autograd.grad(got, (q, k, v), grad)
    # lse does not depend on v: its reference gradient is 0 (materialized).
    refs = torch.autograd.grad(ref, (q64, k64, v64), grad.double(), allow_unused=True, materialize_grads=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        _assert_near(name, g, r, tol.grad, tol.relative)


# --------------------------------------------------------------------------------------------
# Strides


def _strided(shape, layout, gen):
    """A non-contiguous float32 view of ``shape`` [B, H, L, D] in one of several layouts."""
    b, h, n, d = shape
    if layout == "bshd":  # the layout of a model's projections before the head transpose
        return torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
    if layout == "row_slice":
        return torch.randn(b, h, 2 * n, d, generator=gen)[:, :, ::2]
    if layout == "head_slice":
        return torch.randn(b, 2 * h, n, d, generator=gen)[:, 1::2]
    if layout == "dim_strided":  # last dimension not contiguous either
        return torch.randn(b, h, d, n, generator=gen).transpose(2, 3)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["bshd", "row_slice", "head_slice", "dim_strided"])
def test_non_contiguous_inputs(layout):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 20, 50, 64
    gen = torch.Generator().manual_seed(11)
    q = _strided((b, hq, lq, d), layout, gen)
    k, v = (_strided((b, hkv, lk, d), layout, gen) for _ in range(2))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    # A stride-0 log (one log broadcast over batch and heads) is the natural way to pass one.
    ev = streaming_evicted_at(lk, 2, 10).expand(b, hkv, lk)
    q_offset = lk - lq
    grad_out = torch.randn(b, hq, lq, d, generator=gen)

    def run(q, k, v, ev):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))

    strided = run(q, k, v, ev)
    dense = run(q.contiguous(), k.contiguous(), v.contiguous(), ev.contiguous())
    for name, got, exp in zip(("out", "lse", "dq", "dk", "dv"), strided, dense):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------
# Right-padded batches: seq_lens / mask_padding


@st.composite
def padded_cases(draw):
    """A right-padded batch: q ``[B, Hq, Lk - q_offset, D]`` against ``Lk`` keys, a random log,
    and lengths in ``[0, Lk]`` (empty, partly padded, full) per sequence."""
    kv_heads = draw(st.sampled_from([1, 2]))
    q_heads = kv_heads * draw(st.sampled_from([1, 3]))
    batch = draw(st.integers(1, 4))
    kv_len = draw(st.integers(1, 150))
    q_offset = draw(st.integers(0, kv_len - 1))
    head_dim = draw(st.sampled_from([7, 16, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed + 1)
    ev = random_evicted_at((batch, kv_heads, kv_len), kv_len, keep=draw(st.sampled_from([0.25, 1.0])),
                           sinks=draw(st.integers(0, 2)), generator=gen)
    lens = torch.tensor(draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch)))
    case = Case(batch, q_heads, kv_heads, kv_len - q_offset, kv_len, head_dim, q_offset, ev, None, seed)
    return case, lens


def check_padded(case: Case, lens: torch.Tensor, dtype: torch.dtype):
    """The padded batch with ``seq_lens`` against each sequence alone (the reference on its first
    ``lens[b]`` keys and query positions): padding K/V slots hold NaN, padding query rows give
    out 0, lse -inf and no gradient whatever their upstream gradients."""
    tol = TOLERANCES[dtype]
    q, k, v, grad_out, grad_lse = case.tensors(dtype)
    keys = torch.arange(case.kv_len)
    pad_key = (keys >= lens[:, None])[:, None, :, None]
    k, v = (t.masked_fill(pad_key, float("nan")).requires_grad_() for t in (k, v))
    q.requires_grad_()
    out, lse = ops.shadow_attention_with_lse(q, k, v, case.evicted_at, case.q_offset, seq_lens=lens)
    dq, dk, dv = torch.autograd.grad((out, lse.masked_fill(lse.isinf(), 0)), (q, k, v),
                                     (grad_out.to(dtype), grad_lse.to(lse.dtype)))
    for b, n in enumerate(lens.tolist()):
        rows = max(0, n - case.q_offset)  # query rows of sequence b
        q64, k64, v64 = (t[b:b + 1, :, :m].detach().double().requires_grad_()
                         for t, m in ((q, rows), (k, n), (v, n)))
        o_ref, l_ref = shadow_attention_ref(q64, k64, v64, case.evicted_at[b:b + 1, :, :n], case.q_offset)
        assert torch.equal(out[b, :, rows:], torch.zeros_like(out[b, :, rows:]))
        assert torch.isneginf(lse[b, :, rows:]).all()
        for name, got in (("dq", dq[b, :, rows:]), ("dk", dk[b, :, n:]), ("dv", dv[b, :, n:])):
            assert torch.equal(got, torch.zeros_like(got)), f"{name} of padding, sequence {b}"
        if rows == 0:
            continue
        _assert_near(f"out[{b}]", out[b:b + 1, :, :rows], o_ref, tol.out, tol.relative)
        _assert_near(f"lse[{b}]", lse[b:b + 1, :, :rows], l_ref, tol.lse, tol.relative)
        g_lse = grad_lse[b:b + 1, :, :rows].to(lse.dtype).double()
        refs = torch.autograd.grad((o_ref, l_ref.masked_fill(l_ref.isinf(), 0)), (q64, k64, v64),
                                   (grad_out[b:b + 1, :, :rows].to(dtype).double(), g_lse))
        for name, got, ref in zip(("dq", "dk", "dv"), (dq[b:b + 1, :, :rows], dk[b:b + 1, :, :n],
                                                       dv[b:b + 1, :, :n]), refs):
            _assert_near(f"{name}[{b}]", got, ref, tol.grad, tol.relative)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@settings(max_examples=40, deadline=None)
@given(data=padded_cases())
def test_seq_lens_matches_each_sequence_alone(data, dtype):
    check_padded(*data, dtype)


def test_mask_padding_keeps_what_real_queries_see():
    gen = torch.Generator().manual_seed(3)
    ev = random_evicted_at((3, 2, 40), 40, keep=0.3, sinks=1, generator=gen)
    lens = torch.tensor([40, 17, 0])
    masked = ops.mask_padding(ev, lens)
    assert masked.dtype == torch.int32 and masked.is_contiguous()
    seen, seen_masked = shadow_visible(ev, 40, 0), shadow_visible(masked, 40, 0)  # [B, Hkv, Lq, Lk]
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(seen_masked[b, :, :n], seen[b, :, :n])  # real queries: unchanged
        assert not seen_masked[b, :, n:].any() and not seen_masked[b, :, :, n:].any()
    # A rollout's whole log [B, layers, Hkv, T] at once, int64 lengths, and the same as per layer.
    log = torch.stack([ev, ev.flip(1)], 1)
    both = ops.mask_padding(log, lens.long())
    assert torch.equal(both[:, 0], masked) and torch.equal(both[:, 1], ops.mask_padding(ev.flip(1), lens))


@pytest.mark.parametrize("lens, check, error", [
    (torch.tensor([5, -1]), True, "`seq_lens`[1] = -1 must be in [0, 6]"),
    (torch.tensor([7, 2]), True, "`seq_lens`[0] = 7 must be in [0, 6]"),
    (torch.tensor([5]), True, "`seq_lens` must have shape [2]"),
    (torch.tensor([5.0, 1.0]), True, "`seq_lens` must be an int32 or int64 tensor, got float32"),
    (torch.tensor([5, 2], device="meta"), True, "`seq_lens` must be on the device of `evicted_at`"),
], ids=["negative", "past_keys", "shape", "dtype", "device"])
def test_mask_padding_bad_lengths_named(lens, check, error):
    ev = torch.full((2, 1, 6), INT32_MAX, dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=error.replace("[", r"\[").replace("]", r"\]")):
        ops.mask_padding(ev, lens, check)
    if lens.dtype != torch.float32 and lens.device.type == "cpu" and lens.shape == (2,):
        with pytest.raises(ValueError, match="seq_lens"):  # the public op checks too
            ops.shadow_attention(torch.zeros(2, 1, 6, 8), torch.zeros(2, 1, 6, 8), torch.zeros(2, 1, 6, 8), ev,
                                 seq_lens=lens)


def test_mask_padding_unchecked_clamps():
    ev = torch.full((2, 1, 6), INT32_MAX, dtype=torch.int32)
    masked = ops.mask_padding(ev, torch.tensor([-3, 9]), check=False)
    assert torch.equal(masked, torch.tensor([[[0] * 6], [[6] * 6]], dtype=torch.int32))
    with pytest.raises(TypeError, match="`evicted_at` must be int32, got int64"):
        ops.mask_padding(ev.long(), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="`evicted_at` must be a tensor"):
        ops.mask_padding(ev[0, 0], torch.tensor([1]))
    # Meta tensors have no values to check: shapes only, as the fake kernels.
    meta = ops.mask_padding(ev.to("meta"), torch.tensor([1, 1], device="meta"))
    assert meta.shape == ev.shape and meta.device.type == "meta"


def test_gradcheck_seq_lens():
    q, k, v, ev, q_offset = _small("gqa_decode")
    lens = torch.tensor([9, 7])  # the second sequence: one valid query row of three

    def fn(q, k, v):
        out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset, seq_lens=lens)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


# gradcheck and opcheck (float64, small shapes)


def _small(name):
    gen = torch.Generator().manual_seed(5)
    if name == "mha":
        lq = lk = 6
        q_offset, hq, hkv = 0, 2, 2
        ev = random_evicted_at((1, hkv, lk), lk, keep=0.3, sinks=1, generator=gen)
    elif name == "gqa":
        lq = lk = 5
        q_offset, hq, hkv = 0, 4, 2
        ev = streaming_evicted_at(lk, 1, 2).expand(2, hkv, lk).contiguous()
    elif name == "gqa_decode":
        lk, lq = 9, 3
        q_offset, hq, hkv = 6, 4, 1
        ev = random_evicted_at((2, hkv, lk), lk, keep=0.3, sinks=1, generator=gen)
    elif name == "no_key_row":
        lq = lk = 6
        q_offset, hq, hkv = 0, 2, 1
        # Rows 2, 3 and 4 see no key; rows 0, 1 and 5 do.
        ev = torch.tensor([2, 2, 2, 3, 3, INT32_MAX], dtype=torch.int32).expand(2, hkv, lk).contiguous()
    else:
        raise ValueError(name)
    b = ev.shape[0]
    q = torch.randn(b, hq, lq, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, lk, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, lk, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v, ev, q_offset


SMALL = ["mha", "gqa", "gqa_decode", "no_key_row"]


@pytest.mark.parametrize("name", SMALL)
def test_gradcheck_out(name):
    q, k, v, ev, q_offset = _small(name)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.shadow_attention(q, k, v, ev, q_offset), (q, k, v))


@pytest.mark.parametrize("name", SMALL)
def test_gradcheck_with_lse(name):
    q, k, v, ev, q_offset = _small(name)

    def fn(q, k, v):
        out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset, 0.3)
        # -inf - -inf is NaN in finite differences; rows without keys are constant anyway.
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("name", ["mha", "gqa_decode", "no_key_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_fwd(name, dtype):
    q, k, v, ev, q_offset = _small(name)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(FWD.default, (q, k, v, ev, q_offset, None))
    torch.library.opcheck(FWD.default, (q, k, v, ev, q_offset, 0.25))


@pytest.mark.parametrize("name", ["mha", "gqa", "gqa_decode", "no_key_row"])
@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no_glse", "glse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_bwd(name, with_grad_lse, dtype):
    q, k, v, ev, q_offset = _small(name)
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    scale = 0.25
    out, lse = FWD(q, k, v, ev, q_offset, scale)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(BWD.default, (grad_out, q, k, v, ev, out, lse, grad_lse, q_offset, scale))


def test_double_backward_is_an_error_not_zeros():
    """Second derivatives are not implemented: differentiating the gradients raises, where
    torch's fallback gave zeros with a warning. create_graph=True alone still works."""
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ev = streaming_evicted_at(9, 1, 3).expand(1, 2, 9).contiguous()
    dq, = torch.autograd.grad(ops.shadow_attention(q, k, v, ev).sum(), q, create_graph=True)
    q64, k64, v64 = (t.detach().requires_grad_() for t in (q, k, v))
    dq_ref, = torch.autograd.grad(shadow_attention_ref(q64, k64, v64, ev)[0].sum(), q64)
    assert torch.allclose(dq, dq_ref, atol=1e-10)
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()


def test_bwd_op_matches_reference():
    q, k, v, ev, q_offset = _small("gqa_decode")
    scale = 0.25
    out, lse = FWD(q.detach(), k.detach(), v.detach(), ev, q_offset, scale)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = BWD(grad_out, q.detach(), k.detach(), v.detach(), ev, out, lse, grad_lse, q_offset, scale)
    out_ref, lse_ref = shadow_attention_ref(q, k, v, ev, q_offset, scale)
    ref = torch.autograd.grad((out_ref, lse_ref), (q, k, v), (grad_out, grad_lse))
    for got, exp in zip((dq, dk, dv), ref):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Argument checks


def _valid_args():
    ev = streaming_evicted_at(10, 1, 4).expand(2, 2, 10).contiguous()
    return dict(q=torch.randn(2, 4, 10, 16), k=torch.randn(2, 2, 10, 16), v=torch.randn(2, 2, 10, 16),
                evicted_at=ev, q_offset=0, scale=None)


BAD_INPUTS = {
    # name of the case: (argument the message must name, changes to the valid arguments)
    "q_int_dtype": ("q", lambda a: {"q": a["q"].int(), "k": a["k"].int(), "v": a["v"].int()}),
    "q_bool_dtype": ("q", lambda a: {"q": a["q"] > 0}),
    "k_dtype_differs": ("k", lambda a: {"k": a["k"].double()}),
    "v_dtype_differs": ("v", lambda a: {"v": a["v"].half()}),
    "evicted_at_int64": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"].long()}),
    "evicted_at_float": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"].float()}),
    "q_rank_3": ("q", lambda a: {"q": a["q"][0]}),
    "k_rank_5": ("k", lambda a: {"k": a["k"][None]}),
    "v_rank_3": ("v", lambda a: {"v": a["v"][0]}),
    "evicted_at_rank_2": ("evicted_at", lambda a: {"evicted_at": a["evicted_at"][0]}),
    "k_head_dim": ("k", lambda a: {"k": torch.randn(2, 2, 10, 32)}),
    "k_batch": ("k", lambda a: {"k": a["k"][:1], "v": a["v"][:1], "evicted_at": a["evicted_at"][:1]}),
    "v_len": ("v", lambda a: {"v": torch.randn(2, 2, 11, 16)}),
    "v_heads": ("v", lambda a: {"v": torch.randn(2, 1, 10, 16)}),
    "v_head_dim": ("v", lambda a: {"v": torch.randn(2, 2, 10, 8)}),
    "evicted_at_len": ("evicted_at", lambda a: {"evicted_at": torch.zeros(2, 2, 11, dtype=torch.int32)}),
    "evicted_at_heads": ("evicted_at", lambda a: {"evicted_at": torch.zeros(2, 1, 10, dtype=torch.int32)}),
    "evicted_at_batch": ("evicted_at", lambda a: {"evicted_at": torch.zeros(1, 2, 10, dtype=torch.int32)}),
    "heads_not_divisible": ("q|k", lambda a: {"q": torch.randn(2, 3, 10, 16)}),
    # "meta" stands in for a second device on CPU-only machines (it reaches the fake kernel).
    **{f"{name}_on_{dev}": (name, lambda a, name=name, dev=dev: {name: a[name].to(dev)})
       for name in ("k", "v", "evicted_at")
       for dev in ("meta", *(["cuda"] if torch.cuda.is_available() else []))},
    "q_offset_negative": ("q_offset", lambda a: {"q_offset": -1}),
    "scale_zero": ("scale", lambda a: {"scale": 0.0}),
    "scale_negative": ("scale", lambda a: {"scale": -0.5}),
    "scale_nan": ("scale", lambda a: {"scale": math.nan}),
    "scale_inf": ("scale", lambda a: {"scale": math.inf}),
    "scale_above_float32": ("scale", lambda a: {"scale": 1e39}),  # finite in double, inf in the kernels
    "scale_times_log2e_above_float32": ("scale", lambda a: {"scale": 3e38}),  # scale * log2(e) would be inf
    "q_offset_overflows_int64": ("q_offset", lambda a: {"q_offset": 2**63 - 5}),  # q_offset + Lq wraps
}

ENTRY_POINTS = {
    "ops.shadow_attention": lambda a: ops.shadow_attention(**a),
    "ops.shadow_attention_with_lse": lambda a: ops.shadow_attention_with_lse(**a),
    "torch.ops.shadow_attention_fwd": lambda a: FWD(
        a["q"], a["k"], a["v"], a["evicted_at"], a["q_offset"], a["scale"]),
    "ops.shadow_attention(seq_lens=)": lambda a: ops.shadow_attention(**a, seq_lens=torch.tensor([10, 7])),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_argument(case, entry):
    arg, change = BAD_INPUTS[case]
    args = _valid_args()
    args.update(change(args))
    # The name as a whole word: "k" must not be satisfied by the k in "kv_len" or "mask".
    pattern = rf"(?<![A-Za-z0-9_])({arg})(?![A-Za-z0-9_])"
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        ENTRY_POINTS[entry](args)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_seq_lens_keeps_the_ops_errors(case):
    """With ``seq_lens`` a bad q, k, v, log, offset or scale raises exactly what it raises
    without (the op's checks run before the log is masked)."""
    arg, change = BAD_INPUTS[case]
    args = _valid_args()
    args.update(change(args))
    errors = []
    for kw in ({}, {"seq_lens": torch.tensor([10, 7])}):
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            ops.shadow_attention(**args, **kw)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("q_offset", [True, 2**63, -(2**63) - 1])
@pytest.mark.parametrize("seq_lens", [None, torch.tensor([10, 7])])
def test_q_offset_outside_int64_or_bool_is_named(q_offset, seq_lens):
    """torch's schema said "expected int, found int" past int64, and took True as 1."""
    args = {**_valid_args(), "q_offset": q_offset}
    with pytest.raises((ValueError, TypeError), match="`q_offset`"):
        ops.shadow_attention(**args, seq_lens=seq_lens)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:FutureWarning")  # torch's make_dual
def test_forward_mode_ad_is_refused():
    """torch returned a None tangent (read as zero) for the custom op's output."""
    import torch.autograd.forward_ad as fwAD

    args = _valid_args()
    with fwAD.dual_level():
        args["k"] = fwAD.make_dual(args["k"], torch.randn_like(args["k"]))
        with pytest.raises(NotImplementedError, match="no forward-mode AD"):
            ops.shadow_attention(**args)
        args["k"] = fwAD.unpack_dual(args["k"]).primal
        ops.shadow_attention(**args)  # no dual input inside the level: fine


def test_valid_args_run():
    """The base of the bad-input cases is itself accepted (so each case tests one change)."""
    for call in ENTRY_POINTS.values():
        call(_valid_args())


# --------------------------------------------------------------------------------------------
# The reference itself (independent of the extension)


def _naive_row_loop(q, k, v, evicted_at, q_offset, scale):
    b_, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b_, hq, lq, d, dtype=torch.float64)
    lse = torch.full((b_, hq, lq), -math.inf, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(lq):
                p = q_offset + i
                keys = [j for j in range(lk) if j <= p < int(evicted_at[b, hk, j])]
                if keys:
                    s = torch.stack([scale * q[b, h, i].double() @ k[b, hk, j].double() for j in keys])
                    w = torch.softmax(s, 0)
                    out[b, h, i] = (w[:, None] * v[b, hk, keys].double()).sum(0)
                    lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_naive_loop_and_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    hkv, group = (1, 2)[seed % 2], (1, 2, 4)[seed % 3]
    lk = 17
    lq, q_offset = (lk, 0) if seed < 3 else (5, 3 + seed)
    q = torch.randn(2, hkv * group, lq, 8, generator=gen)
    k, v = torch.randn(2, 2, hkv, lk, 8, generator=gen)
    ev = torch.randint(0, q_offset + lq + 2, (2, hkv, lk), generator=gen, dtype=torch.int32)
    out, lse = shadow_attention_ref(q, k, v, ev, q_offset, 0.4)
    out_n, lse_n = _naive_row_loop(q, k, v, ev, q_offset, 0.4)
    torch.testing.assert_close(out, out_n, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_n, rtol=0, atol=1e-12)

    mask = shadow_visible(ev, lq, q_offset).repeat_interleave(group, 1)
    rows = mask.any(-1)
    sdpa = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1),
        attn_mask=mask, scale=0.4)
    torch.testing.assert_close(out[rows], sdpa[rows], rtol=0, atol=1e-12)

    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    o, l = shadow_attention_ref(qq, kk, vv, ev, q_offset, 0.4)
    (o.sum() + l.masked_fill(l.isinf(), 0).sum()).backward()
    assert all(t.grad.isfinite().all() for t in (qq, kk, vv))
    assert (qq.grad[~rows] == 0).all()


def test_reference_empty_heads_and_head_dim():
    """No heads gives empty results; D = 0 an empty out and lse = log(visible keys) (every logit
    is 0, so the default scale, 1.0 there as in the kernels, does not matter); Hkv = 0 under
    Hq > 0 is refused like the op does."""
    ev = streaming_evicted_at(5, 1, 2).expand(2, 1, 5).contiguous()
    out, lse = shadow_attention_ref(torch.randn(2, 0, 5, 8), torch.randn(2, 0, 5, 8), torch.randn(2, 0, 5, 8),
                                    ev[:, :0])
    assert out.shape == (2, 0, 5, 8) and lse.shape == (2, 0, 5)
    for scale in (None, 0.5):
        out, lse = shadow_attention_ref(torch.randn(2, 3, 5, 0), torch.randn(2, 1, 5, 0), torch.randn(2, 1, 5, 0),
                                        ev, scale=scale)
        assert out.shape == (2, 3, 5, 0)
        count = shadow_visible(ev, 5).sum(-1).expand(2, 3, 5).double()
        torch.testing.assert_close(lse, count.log(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of the head count of `k`"):
        shadow_attention_ref(torch.randn(2, 2, 5, 8), torch.randn(2, 0, 5, 8), torch.randn(2, 0, 5, 8), ev[:, :0])


def test_streaming_log_keeps_sinks_plus_window():
    length, sinks, window, every = 40, 3, 6, 4
    visible = shadow_visible(streaming_evicted_at(length, sinks, window, every)[None, None], length)[0, 0]
    for p in range(length):
        recent = set(range(p + 1)) - set(range(sinks))
        last_trim = p - p % every  # the newest step t <= p at which the cache was trimmed
        kept = {j for j in recent if j > last_trim - window}
        expected = set(range(min(sinks, p + 1))) | kept
        assert set(visible[p].nonzero().flatten().tolist()) == expected, p
        assert visible[p].sum() <= sinks + window + every - 1


def available_cpu_isas() -> list[str]:
    with ops.cpu_isa("auto"):  # whatever the environment says, collection must not fail here
        best = _C.cpu_isa()  # auto picks the widest the CPU has; an AVX-512 CPU has AVX2 too
    return {"baseline": ["baseline"], "avx2": ["baseline", "avx2"], "avx512": ["baseline", "avx2", "avx512"]}[best]


# The CPU kernels' instruction-set variants (csrc/cpu/isa.h): the AVX-512 and AVX2+FMA copies of
# the tile loops where this CPU has them, and the portable baseline, all against the reference.
CPU_ISAS = available_cpu_isas()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@settings(max_examples=25, deadline=None)
@given(case=cases(max_len=160))
def test_every_cpu_isa_matches_reference(isa, dtype, case):
    with ops.cpu_isa(isa):
        assert _C.cpu_isa() == isa
        check_case(case, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim",
                         [(1, 1, 1), (3, 1, 7), (6, 2, 33), (6, 1, 1), (3, 3, 33), (6, 2, 7)])
def test_odd_head_dims_and_groups_float64(q_heads, kv_heads, head_dim, isa):
    """Odd head dims (the scalar tails of every vector loop) and GQA groups that are not powers
    of 2 (3, 6), in float64 against the reference, in prefill (70 rows: over a 32-query and a
    64-key tile) and decode (3 rows after 67) layout. Hypothesis draws them too, but not every run."""
    gen = torch.Generator().manual_seed(head_dim * 10 + q_heads)
    lk = 70
    for q_len, q_offset in ((lk, 0), (3, lk - 3)):
        ev = random_evicted_at((2, kv_heads, lk), q_offset + q_len, keep=0.3, sinks=2, generator=gen)
        case = Case(2, q_heads, kv_heads, q_len, lk, head_dim, q_offset, ev, seed=q_len)
        with ops.cpu_isa(isa):
            check_case(case, torch.float64)


EMPTY_SHAPES = {  # (B, Hq, Hkv, Lq, Lk, D)
    "batch_0": (0, 4, 2, 5, 7, 16),
    "q_len_0": (2, 4, 2, 0, 7, 16),
    "kv_len_0": (2, 6, 2, 5, 0, 16),  # every row without keys: out 0, lse -inf
    "heads_0": (2, 0, 0, 5, 7, 16),
    "head_dim_0": (2, 6, 2, 5, 7, 0),  # empty out, lse = log(visible keys)
    "all_0": (0, 0, 0, 0, 0, 0),
}


@pytest.mark.parametrize("scale", [None, 0.5], ids=["default_scale", "scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES))
def test_empty_shapes(shape, dtype, scale):
    """Zero-size dimensions are valid: outputs of the right shapes and values (the reference's),
    and a backward that runs and gives gradients of the inputs' shapes."""
    b, hq, hkv, lq, lk, d = EMPTY_SHAPES[shape]
    gen = torch.Generator().manual_seed(4)
    ev = random_evicted_at((b, hkv, lk), lq, keep=0.5, sinks=1, generator=gen)
    for with_lse in (True, False):
        check_case(Case(b, hq, hkv, lq, lk, d, 0, ev, scale, seed=4), dtype, with_lse)
    if shape == "head_dim_0":
        # Every logit is an empty dot product, 0, whatever the scale: a uniform softmax.
        q, k, v, _, _ = Case(b, hq, hkv, lq, lk, d, 0, ev, scale).tensors(dtype)
        lse = ops.shadow_attention_with_lse(q, k, v, ev, 0, scale)[1]
        count = shadow_visible(ev, lq).sum(-1).repeat_interleave(hq // hkv, 1).double()
        torch.testing.assert_close(lse.double(), count.log(), rtol=0, atol=1e-6)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count while the block runs: the CPU backward picks its fused pass
    or its two passes from the (batch, kv head) items per thread (shadow_attention_bwd.cpp)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Thread counts that make the CPU backward fused (1 thread: any number of items) or split in two
# passes (more threads than the 2 items of one sequence with 2 kv heads).
FUSED_THREADS, TWO_PASS_THREADS = 1, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_split_does_not_change_the_bits(dtype):
    """The CPU backward runs fused (one work item per (batch, kv head)) or in two passes (fewer
    items than threads: one sequence, 4 threads); every gradient element sums its terms in the
    same order either way, so a batch computed whole equals each sequence computed alone, bit for
    bit, and both match the reference."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, D = 64, 4, 2, 75, 16
    q = torch.randn(B, Hq, L, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen).to(dtype) for _ in range(2))
    g = torch.randn(B, Hq, L, D, generator=gen).to(dtype)
    ev = random_evicted_at((B, Hkv, L), L, keep=0.3, sinks=2, generator=gen)

    def grads(q, k, v, ev, g):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(ops.shadow_attention(q, k, v, ev), (q, k, v), g)

    with torch_threads(FUSED_THREADS):  # 128 (batch, kv head) items on 1 thread: fused
        whole = grads(q, k, v, ev, g)
    for b in (0, 21, B - 1):
        with torch_threads(TWO_PASS_THREADS):  # 2 items on 4 threads: two passes
            alone = grads(q[b : b + 1], k[b : b + 1], v[b : b + 1], ev[b : b + 1], g[b : b + 1])
        for name, w, a in zip(("dq", "dk", "dv"), whole, alone):
            assert torch.equal(w[b : b + 1], a), f"{name} of sequence {b} differs"
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(shadow_attention_ref(q64, k64, v64, ev)[0], (q64, k64, v64), g.double())
    tol = TOLERANCES[dtype]
    for name, got, r in zip(("dq", "dk", "dv"), whole, ref):
        _assert_near(name, got, r, tol.grad, tol.relative)


def hidden_slot_scenario(name: str, dtype: torch.dtype, gen: torch.Generator, head_dim: int = 64):
    """Inputs whose K/V slots in `dirty` ([B, Hkv, Lk] bool) no query of the call sees.

    "evicted_before_queries": keys 128..159 are evicted at 160..191 (window 32), before the last
    64 queries (positions 192..255, the call's only ones) start, in a key tile those queries
    still partly see. "ragged_padding" / "ragged_padding_one_sequence": right-padded sequences
    of random lengths, padding keys logged as evicted at 0 (README); the test runs the first with
    the CPU backward's fused pass and the second with its two passes (torch_threads).
    Returns CPU tensors q, k, v, evicted_at, q_offset, dirty.
    """
    if name == "evicted_before_queries":
        length = 256
        q, k, v = (torch.randn(1, 2, length, head_dim, generator=gen).to(dtype) for _ in range(3))
        ev = streaming_evicted_at(length, 0, 32).expand(1, 2, length).contiguous()
        dirty = torch.zeros(1, 2, length, dtype=torch.bool)
        dirty[:, :, 128:160] = True
        return q[:, :, 192:].contiguous(), k, v, ev, 192, dirty
    batch = 1 if name == "ragged_padding_one_sequence" else 16
    Hq, Hkv, L, D = 4, 2, 150, head_dim
    q = torch.randn(batch, Hq, L, D, generator=gen).to(dtype)
    k, v = (torch.randn(batch, Hkv, L, D, generator=gen).to(dtype) for _ in range(2))
    ev = random_evicted_at((batch, Hkv, L), L, keep=0.4, sinks=2, generator=gen)
    lengths = torch.randint(L // 3, L, (batch,), generator=gen)
    dirty = (torch.arange(L) >= lengths[:, None])[:, None, :].expand(batch, Hkv, L).contiguous()
    return q, k, v, ev.masked_fill(dirty, 0), 0, dirty


HIDDEN_SLOT_SCENARIOS = ["evicted_before_queries", "ragged_padding", "ragged_padding_one_sequence"]


@pytest.mark.parametrize("scenario", HIDDEN_SLOT_SCENARIOS)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_nan_in_slots_no_query_sees_stays_out_of_forward_and_backward(scenario, isa, dtype):
    """Slots that no query of the call sees may hold anything (padding, a slot a server reused):
    NaN there reaches neither the outputs nor any gradient, and their dK/dV are exactly 0, as
    for finite values (as on CUDA: tests/test_shadow_attention_cuda.py)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, ev, q_offset, dirty = hidden_slot_scenario(scenario, dtype, gen)
    g_out = torch.randn(q.shape, generator=gen).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev, q_offset)
    refs = torch.autograd.grad(out_ref, (q64, k64, v64), g_out.double())
    nan_rows = dirty[..., None].expand(k.shape)
    k, v = (t.masked_fill(nan_rows, float("nan")).requires_grad_() for t in (k, v))
    q = q.clone().requires_grad_()
    threads = TWO_PASS_THREADS if scenario == "ragged_padding_one_sequence" else FUSED_THREADS
    with ops.cpu_isa(isa), torch_threads(threads):
        out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset)
        grads = torch.autograd.grad(out, (q, k, v), g_out)
    tol = TOLERANCES[dtype]
    _assert_near("out", out, out_ref, tol.out, tol.relative)
    _assert_near("lse", lse, lse_ref, tol.lse, tol.relative)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        _assert_near(name, got, ref, tol.grad, tol.relative)
    for name, got in (("dk", grads[1]), ("dv", grads[2])):
        assert torch.equal(got[nan_rows], torch.zeros_like(got[nan_rows])), f"{name} of a hidden slot is not 0"


@pytest.mark.skipif("avx512" not in CPU_ISAS, reason="this CPU has no AVX-512")
def test_avx512_gives_the_avx2_bits():
    """Both fuse multiply-adds and sum every output over k in the same order (tile_gemm.h), so
    the wider blocking must not change a bit, forward or backward."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 300, 64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, 64, generator=gen, requires_grad=True) for _ in range(2))
    ev = torch.full((2, 2, 300), ops.NEVER_EVICTED, dtype=torch.int32)
    ev[..., 10:100] = 150
    got = {}
    for isa in ("avx2", "avx512"):
        with ops.cpu_isa(isa):
            out = ops.shadow_attention(q, k, v, ev)
            got[isa] = (out, *torch.autograd.grad(out.sum(), (q, k, v)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got["avx2"], got["avx512"]):
        assert torch.equal(a, b), name


def test_cpu_isa_choice(monkeypatch):
    monkeypatch.delenv(ops.CPU_ISA_ENV, raising=False)
    with ops.cpu_isa("auto"):
        assert _C.cpu_isa() == CPU_ISAS[-1]  # the widest the CPU has
    for isa in CPU_ISAS:
        with ops.cpu_isa(isa):
            assert _C.cpu_isa() == isa and ops.CPU_ISA_ENV not in os.environ  # the environment is left alone
    q = torch.randn(1, 2, 5, 8)
    ev = torch.full((1, 2, 5), ops.NEVER_EVICTED, dtype=torch.int32)
    with pytest.raises(ValueError, match="`name` must be one of auto, baseline, avx2, avx512"):
        with ops.cpu_isa("sse9"):
            pass
    if "avx2" not in CPU_ISAS:
        with ops.cpu_isa("avx2"), pytest.raises(ValueError, match="no AVX2"):
            ops.shadow_attention(q, q, q, ev)
    if "avx512" not in CPU_ISAS:
        with ops.cpu_isa("avx512"), pytest.raises(ValueError, match="no AVX-512"):
            ops.shadow_attention(q, q, q, ev)
    monkeypatch.setenv(ops.CPU_ISA_ENV, "sse9")  # set behind the context manager's back
    with pytest.raises(ValueError, match="SHADOWKV_CPU_ISA must be one of auto, baseline, avx2, avx512; got 'sse9'"):
        ops.shadow_attention(q, q, q, ev)


def test_attention_kernel_sets_and_restores_the_choice(monkeypatch):
    """The CUDA ops read SHADOWKV_ATTENTION_KERNEL per call; the context manager scopes it, through
    the extension's override rather than the environment (a setenv while another thread's op
    reads the environment is undefined behaviour): the override beats the variable, and the
    variable decides again after the block."""
    monkeypatch.setenv(ops.ATTENTION_KERNEL_ENV, "wmma")
    assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "wmma"
    with ops.attention_kernel("simt"):
        assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "simt"
        with ops.attention_kernel("cute"):
            assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "cute"
        assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "simt"
        assert os.environ[ops.ATTENTION_KERNEL_ENV] == "wmma"  # never touched
    assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "wmma"
    monkeypatch.delenv(ops.ATTENTION_KERNEL_ENV)
    assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == ""
    with pytest.raises(RuntimeError, match="inside"):  # an exception in the block restores too
        with ops.attention_kernel("simt"):
            raise RuntimeError("inside")
    assert _C.kernel_choice(ops.ATTENTION_KERNEL_ENV) == "" and ops.ATTENTION_KERNEL_ENV not in os.environ
    with pytest.raises(ValueError, match="unknown kernel setting 'SHADOWKV_ATTENTION'"):
        _C.set_kernel_choice("SHADOWKV_ATTENTION", "simt")
    with pytest.raises(ValueError, match="must not contain NUL"):  # C++ would read it cut short
        _C.set_kernel_choice(ops.ATTENTION_KERNEL_ENV, "simt\0junk")
    with pytest.raises(ValueError,
                       match="auto, cute, wgmma, wgmma_ws, wgmma_wsb, wgmma_wsf, wgmma_fused, wmma, simt"):
        with ops.attention_kernel("fastest"):
            pass
    # CPU ops ignore it.
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    ev = torch.full((1, 2, 5), ops.NEVER_EVICTED, dtype=torch.int32)
    plain = ops.shadow_attention(q, q, q, ev)
    with ops.attention_kernel("cute"):
        assert torch.equal(ops.shadow_attention(q, q, q, ev), plain)


def test_fake_kernels_refuse_what_the_kernels_refuse():
    """Meta tensors (what torch.compile traces with) get the kernels' errors for the backward's
    own arguments and for q_offset and scale, instead of a result."""
    q = torch.empty(1, 2, 3, 4, device="meta")
    k = torch.empty(1, 2, 5, 4, device="meta")
    ev = torch.empty(1, 2, 5, dtype=torch.int32, device="meta")
    lse = torch.empty(1, 2, 3, device="meta")
    bwd = torch.ops.shadowkv.shadow_attention_bwd
    bad = {
        "`lse` must have shape": dict(lse=torch.empty(1, 2, 2, device="meta")),
        "`lse` must be float32": dict(lse=lse.double()),
        "`grad_out` must have shape": dict(grad_out=torch.empty(1, 2, 3, 5, device="meta")),
        "`grad_lse` must be a 3-D tensor": dict(grad_lse=torch.empty(1, 2, device="meta")),
        "`out` must have the dtype of `q`": dict(out=q.half()),
        "`q_offset` must be >= 0": dict(q_offset=-1),
        "exceeds the int32 positions": dict(q_offset=2**31 - 3),
        "`scale` must be positive": dict(scale=0.0),
    }
    for message, change in bad.items():
        args = dict(grad_out=q, q=q, k=k, v=k, evicted_at=ev, out=q, lse=lse, grad_lse=None, q_offset=0, scale=None)
        args.update(change)
        with pytest.raises((ValueError, TypeError), match=message):
            bwd(*args.values())
    for message, change in list(bad.items())[-3:]:
        args = dict(q=q, k=k, v=k, evicted_at=ev, q_offset=0, scale=None)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            torch.ops.shadowkv.shadow_attention_fwd(*args.values())
    with pytest.raises(ValueError, match="at most FLT_MAX / log2"):
        torch.ops.shadowkv.shadow_attention_fwd(q, k, k, ev, 0, 3e38)
    bwd(q, q, k, k, ev, q, lse, None, 0, None)  # valid: shapes only
