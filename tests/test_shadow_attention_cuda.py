"""shadow_attention on CUDA: forward and gradients against the float64 reference.

Every result is compared with ``shadowkv.reference.shadow_attention_ref`` run in float64 on the
very same (already rounded) inputs. Tolerances are on the max abs error, relative to the size of
the reference, ``tol * max(1, max|ref|)``:

- float32 (SIMT kernels, fp32 end to end): out and lse 1e-5, gradients 1e-4.
- bfloat16: out 2e-2, gradients 5e-2 (stored in 8 mantissa bits; the tensor-core kernels also
  round P and dS to bfloat16 before their second MMA, as FlashAttention-2 does).
- float16: out 5e-3, gradients 1e-2 (11 mantissa bits).
- lse (float32, from fp32-accumulated scores of the rounded inputs): 1e-3 for both 16-bit types.

The cases cover every kernel family: bfloat16/float16 with D in {64, 128} and 16-byte aligned
rows run on tensor cores (by default the sm_90a wgmma kernels on an H100/H200 and the CuTe
mma.sync ones elsewhere, in builds with the CUTLASS headers, else WMMA; each family is also
run by name: the ``wmma``, ``cute`` and ``wgmma`` tests); every other D, float32 and unaligned
rows run the SIMT kernels.

Set SHADOWKV_ATTENTION_TEST_DEVICE=cpu to dry-run this file against the CPU kernels (checks the
tests themselves on a machine without a GPU, before a GPU session spends its minutes on them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from shadowkv import _C, ops
from shadowkv.reference import (
    INT32_MAX,
    random_evicted_at,
    shadow_attention_ref,
    shadow_visible,
    streaming_evicted_at,
)

from .test_shadow_attention import HIDDEN_SLOT_SCENARIOS, hidden_slot_scenario

DEVICE = os.environ.get("SHADOWKV_ATTENTION_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="checks CUDA-specific behaviour")

FWD = torch.ops.shadowkv.shadow_attention_fwd
BWD = torch.ops.shadowkv.shadow_attention_bwd


@dataclass(frozen=True)
class Tol:
    out: float
    lse: float
    grad: float


TOLERANCES = {
    torch.float32: Tol(out=1e-5, lse=1e-5, grad=1e-4),
    torch.bfloat16: Tol(out=2e-2, lse=1e-3, grad=5e-2),
    torch.float16: Tol(out=5e-3, lse=1e-3, grad=1e-2),
}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


# --------------------------------------------------------------------------------------------
# Cases


def make_evicted_at(kind: str, batch: int, kv_heads: int, kv_len: int, horizon: int, seed: int) -> torch.Tensor:
    """``[batch, kv_heads, kv_len]`` int32 eviction log of one scenario (CPU)."""
    shape = (batch, kv_heads, kv_len)
    gen = torch.Generator().manual_seed(seed)
    key = torch.arange(kv_len)
    if kind == "none":
        return torch.full(shape, INT32_MAX, dtype=torch.int32)
    if kind == "random":  # ragged: independent per (batch, head), some keys kept forever
        return random_evicted_at(shape, horizon, keep=0.25, sinks=2, generator=gen)
    if kind == "sparse":  # a small budget: most keys evicted soon after they are written
        span = torch.randint(1, 48, shape, generator=gen)
        ev = torch.where(key < 4, INT32_MAX, key + span)
        return ev.to(torch.int32)
    if kind == "streaming":  # sinks + sliding window: whole key tiles masked mid-row
        return streaming_evicted_at(max(kv_len, horizon), 4, 64)[:kv_len].expand(shape).contiguous()
    if kind == "no_key_rows":  # first half of the keys is never visible: early rows see nothing
        return torch.where(key < kv_len // 2, key, INT32_MAX).to(torch.int32).expand(shape).contiguous()
    if kind == "arbitrary":  # not a plausible log (evicted before written): many empty rows
        return torch.randint(0, horizon + 2, shape, generator=gen, dtype=torch.int32)
    raise ValueError(kind)


@dataclass(frozen=True)
class Case:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    q_offset: int
    evict: str
    scale_factor: float | None = None  # scale = factor / sqrt(D); None = the op's default
    seed: int = 0

    @property
    def scale(self) -> float | None:
        return None if self.scale_factor is None else self.scale_factor / math.sqrt(self.head_dim)

    def evicted_at(self) -> torch.Tensor:
        ev = make_evicted_at(self.evict, self.batch, self.kv_heads, self.kv_len, self.q_offset + self.q_len, self.seed)
        return ev.to(DEVICE)

    def tensors(self, dtype: torch.dtype):
        """q, k, v (dtype, CUDA, requiring grad) and float32 upstream gradients for out and lse."""
        gen = torch.Generator().manual_seed(self.seed)
        b, hq, hkv, lq, lk, d = self.batch, self.q_heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim
        q = torch.randn(b, hq, lq, d, generator=gen)
        k = torch.randn(b, hkv, lk, d, generator=gen)
        v = torch.randn(b, hkv, lk, d, generator=gen)
        grad_out = torch.randn(b, hq, lq, d, generator=gen)
        grad_lse = torch.randn(b, hq, lq, generator=gen)
        q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
        return q, k, v, grad_out.to(DEVICE), grad_lse.to(DEVICE)


CASES = {
    "tiny": Case(1, 1, 1, 1, 1, 64, 0, "none"),
    "mha_random_d64": Case(2, 2, 2, 128, 128, 64, 0, "random", seed=1),
    "gqa2_streaming_d128": Case(1, 4, 2, 300, 300, 128, 0, "streaming", seed=2),
    "gqa4_random_d80": Case(2, 4, 1, 200, 200, 80, 0, "random", seed=3),
    "gqa8_decode_d128": Case(1, 8, 1, 5, 700, 128, 695, "random", seed=4),
    "gqa4_chunk_d64": Case(1, 8, 2, 256, 1024, 64, 768, "streaming", seed=5),
    "mha_chunk_unaligned_d128": Case(1, 2, 2, 77, 333, 128, 256, "sparse", seed=6),
    "long_sparse_d128": Case(1, 2, 1, 1024, 1024, 128, 0, "sparse", seed=7),
    "long_random_d64": Case(1, 4, 2, 1024, 1024, 64, 0, "random", seed=8),
    "no_key_rows_d32": Case(2, 2, 1, 100, 100, 32, 0, "no_key_rows", seed=9),
    "no_key_rows_d128": Case(1, 4, 2, 130, 130, 128, 0, "no_key_rows", seed=10),
    "arbitrary_d64": Case(1, 4, 2, 130, 130, 64, 0, "arbitrary", seed=11),
    "queries_past_keys_d128": Case(1, 2, 2, 64, 100, 128, 150, "random", seed=12),
    "scaled_d64": Case(1, 2, 1, 96, 96, 64, 0, "none", scale_factor=2.0, seed=13),
    "d256": Case(1, 2, 1, 70, 70, 256, 0, "random", seed=14),
    "d1": Case(1, 2, 2, 40, 40, 1, 0, "random", seed=15),
}


# --------------------------------------------------------------------------------------------
# Comparison against the reference


def assert_near(name: str, actual: torch.Tensor, ref: torch.Tensor, tol: float):
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    actual = actual.detach().double()
    ref = ref.detach().double()
    assert not actual.isnan().any(), f"{name}: NaN in result"
    # -inf (lse of rows without keys) must match exactly; compare the rest numerically.
    inf_ref, inf_act = ref.isinf(), actual.isinf()
    assert torch.equal(inf_ref, inf_act), f"{name}: infinities at different places"
    if inf_ref.all():
        return
    finite = ref[~inf_ref]
    err = (actual[~inf_act] - finite).abs().max().item()
    bound = tol * max(1.0, finite.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def check_case(case: Case, dtype: torch.dtype):
    """Forward (out, lse) and gradients through both outputs of the public op vs the reference."""
    check_inputs(*case.tensors(dtype), case.evicted_at(), case.q_offset, case.scale, dtype)


def check_inputs(q, k, v, grad_out, grad_lse, ev, q_offset, scale, dtype):
    """``check_case`` on given inputs: q, k, v (``dtype`` on DEVICE, requiring grad), float32
    upstream gradients, the eviction log."""
    tol = TOLERANCES[dtype]
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset, scale)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev, q_offset, scale)
    assert out.dtype == dtype and out.device == q.device
    assert lse.dtype == torch.float32
    assert_near("out", out, out_ref, tol.out)
    assert_near("lse", lse, lse_ref, tol.lse)

    g_out = grad_out.to(dtype)
    dq, dk, dv = torch.autograd.grad([out, lse], [q, k, v], [g_out, grad_lse])
    dq_ref, dk_ref, dv_ref = torch.autograd.grad([out_ref, lse_ref], [q64, k64, v64], [g_out.double(), grad_lse.double()])
    for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert got.dtype == dtype
        assert_near(name, got, ref, tol.grad)


@cuda_only
def test_build_has_cuda_kernels():
    assert _C.built_with_cuda(), "a CUDA device is present but shadowkv was built without its CUDA kernels"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    case = CASES[name]
    if case.evict == "no_key_rows":
        ev = case.evicted_at()
        assert not shadow_visible(ev, case.q_len, case.q_offset).any(-1).all(), "case should have empty rows"
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_only_gradients(dtype):
    """Gradients through ``out`` alone (grad_lse is None in the backward op)."""
    case = CASES["gqa2_streaming_d128"]
    tol = TOLERANCES[dtype]
    q, k, v, grad_out, _ = case.tensors(dtype)
    ev = case.evicted_at()
    out = ops.shadow_attention(q, k, v, ev, case.q_offset, case.scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, _ = shadow_attention_ref(q64, k64, v64, ev, case.q_offset, case.scale)
    g_out = grad_out.to(dtype)
    got = torch.autograd.grad(out, (q, k, v), g_out)
    ref = torch.autograd.grad(out_ref, (q64, k64, v64), g_out.double())
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_near(name, g, r, tol.grad)


# Every family by name where built (edge cases of each; the "wgmma*" families are the sm_90a kernels
# on an H100/H200, "cute" elsewhere), or the default when the CuTe kernels are not built ("auto"
# is then "wmma").
KERNEL_ENV = ops.ATTENTION_KERNEL_ENV
# The one-pass backwards: dQ by float atomics, so its last bits vary from run to run (wgmma_wsf's at
# head dim 128).
ATOMIC_DQ = {"wgmma_wsf", "wgmma_fused"}
KERNELS = (["wmma", "cute", "wgmma", "wgmma_ws", "wgmma_wsb", "wgmma_wsf", "wgmma_fused"] if _C.built_with_cute()
           else ["auto"])


def needle_inputs(q_len, kv_len, q_offset, kv_heads, q_heads, head_dim, windows, run, dtype, seed):
    """Inputs for ``test_attention_sees_every_needle`` and the most needles a query row sees:
    head ``h`` keeps 4 sinks and a window of ``windows[h]`` keys (StreamingLLM's log); keys 0,
    3 and 4 (the sinks' edge) and the first and last key of every ``run``-key run hold a
    "needle", a key every query
    (all equal to ``u``) scores 12 above the others (random keys scaled by 0.1 score ~0), with
    a one-hot value on the needle's own dimension (index mod D)."""
    gen = torch.Generator().manual_seed(seed)
    k = 0.1 * torch.randn(1, kv_heads, kv_len, head_dim, generator=gen)
    v = 0.1 * torch.randn(1, kv_heads, kv_len, head_dim, generator=gen)
    u = torch.randn(head_dim, generator=gen)
    needles = sorted({0, 3, 4} | {c + e for c in range(0, kv_len, run) for e in (0, run - 1) if c + e < kv_len})
    for i, j in enumerate(needles):
        k[:, :, j] = u * (12.0 * math.sqrt(head_dim) / u.dot(u))  # the default scale 1/sqrt(D): a score of 12
        v[:, :, j] = 0.0
        v[:, :, j, i % head_dim] = 1.0
    ev = torch.stack([streaming_evicted_at(q_offset + q_len, 4, w)[:kv_len] for w in windows])[None].to(DEVICE)
    is_needle = torch.zeros(kv_len, dtype=torch.bool)
    is_needle[needles] = True
    most = int((shadow_visible(ev.cpu(), q_len, q_offset) & is_needle).sum(-1).max())
    q = u.expand(1, q_heads, q_len, head_dim)
    grad_out, grad_lse = torch.randn(1, q_heads, q_len, head_dim, generator=gen), torch.randn(1, q_heads, q_len,
                                                                                                generator=gen)
    q, k, v = (t.to(DEVICE, dtype).contiguous().requires_grad_() for t in (q, k, v))
    return (q, k, v, grad_out.to(DEVICE), grad_lse.to(DEVICE), ev), most


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("q_len, kv_len, q_offset, kv_heads, q_heads, head_dim, windows, run", [
    pytest.param(700, 700, 0, 2, 4, 128, (64, 40), 48, id="prefill_gqa2_d128_run48"),
    pytest.param(200, 900, 700, 2, 6, 64, (100, 77), 37, id="chunk_gqa3_d64_run37"),
])
def test_attention_sees_every_needle(q_len, kv_len, q_offset, kv_heads, q_heads, head_dim, windows, run, dtype,
                                     kernel, monkeypatch):
    """Random keys spread attention so evenly that a kernel dropping (or adding) one key tile of
    a row, or seeing a window one key too long or short, can stay within the half-precision
    bound (2e-2 / 5e-3 of max(1, |ref|)). With ``needle_inputs`` a row holds nearly all its
    attention on at most 8 needles, one per output dimension: a visible needle dropped, or an
    evicted one seen, moves the output by >= 1/9 (5x the bf16 bound) and the lse by >= 0.1.
    Runs of 48 and 37 keys put needles on every side of 64- and 128-key tiles and on the
    windows' edges, which differ between the KV heads."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    inputs, most = needle_inputs(q_len, kv_len, q_offset, kv_heads, q_heads, head_dim, windows, run, dtype, seed=q_len)
    assert 1 <= most <= 8  # the case is as sharp as the docstring says
    check_inputs(*inputs, q_offset, None, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])  # wgmma_wsf's one-pass backward runs at 128 only
def test_no_visible_key_gives_zeros_and_no_nan(head_dim, dtype, kernel, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, kernel)
    lk = 100
    ev = torch.zeros(1, 1, lk, dtype=torch.int32, device=DEVICE)  # every key evicted before any query
    q = torch.randn(1, 2, lk, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 1, lk, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    (out.float().sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def check_with_nan_keys(q, k, v, ev, q_offset, g_out, nan_keys, dtype, **kw):
    """The op on DEVICE with NaN in the K/V elements ``nan_keys`` (a bool mask of k's shape, on
    DEVICE) against the float64 reference on the clean inputs (CPU tensors ``q, k, v, ev``,
    ``dtype``; ``g_out`` the upstream gradient of out): out, lse and the gradients match.
    ``kw`` goes to the op. Returns (out, lse, (dq, dk, dv)) on DEVICE."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev, q_offset)
    refs = torch.autograd.grad(out_ref, (q64, k64, v64), g_out.double())
    k, v = (t.to(DEVICE).masked_fill(nan_keys, float("nan")).requires_grad_() for t in (k, v))
    q = q.to(DEVICE).requires_grad_()
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev.to(DEVICE), q_offset, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g_out.to(DEVICE))
    tol = TOLERANCES[dtype]
    assert_near("out", out.cpu(), out_ref, tol.out)
    assert_near("lse", lse.cpu(), lse_ref, tol.lse)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert_near(name, got.cpu(), ref, tol.grad)
    return out, lse, grads


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scenario", HIDDEN_SLOT_SCENARIOS)
def test_nan_in_slots_no_query_sees_stays_out_of_forward_and_backward(scenario, head_dim, dtype, kernel,
                                                                      monkeypatch):
    """Slots that no query of the call sees may hold anything (padding, a slot a server reused):
    every kernel keeps NaN there out of the outputs and every gradient, and gives those slots
    dK = dV = 0 (scenarios: tests/test_shadow_attention.py, hidden_slot_scenario)."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(7)
    q, k, v, ev, q_offset, dirty = hidden_slot_scenario(scenario, dtype, gen, head_dim)
    g_out = torch.randn(q.shape, generator=gen).to(dtype)
    nan_rows = dirty[..., None].expand(k.shape).to(DEVICE)
    _, _, grads = check_with_nan_keys(q, k, v, ev, q_offset, g_out, nan_rows, dtype)
    for name, got in (("dk", grads[1]), ("dv", grads[2])):
        assert torch.equal(got[nan_rows], torch.zeros_like(got[nan_rows])), f"{name} of a hidden slot is not 0"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_seq_lens_padding_is_skipped_exactly(head_dim, dtype, kernel, monkeypatch):
    """A right-padded batch (``seq_lens``: empty, one token, either side of the 64/128-row tiles,
    full) with NaN in the padding's K/V: the real rows match the reference, padding rows give
    zeros, -inf and no gradient, padding keys dK = dV = 0."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(21)
    lens = torch.tensor([0, 1, 63, 64, 65, 129, 200, 257])
    B, Hq, Hkv, L = len(lens), 4, 2, 257
    ev = ops.mask_padding(streaming_evicted_at(L, 4, 96).expand(B, Hkv, L).contiguous(), lens)
    q, k, v = (torch.randn(B, h, L, head_dim, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    g_out = torch.randn(B, Hq, L, head_dim, generator=gen).to(dtype)
    pad = (torch.arange(L) >= lens[:, None])[:, None, :, None]  # [B, 1, L, 1]
    out, lse, grads = check_with_nan_keys(q, k, v, ev, 0, g_out, pad.expand(k.shape).to(DEVICE), dtype,
                                          seq_lens=lens.to(DEVICE))
    rows = pad.expand(B, Hq, L, head_dim).to(DEVICE)
    assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isneginf(lse[rows[..., 0]]).all()
    for name, got, where in (("dq", grads[0], rows), ("dk", grads[1], pad.expand(k.shape).to(DEVICE)),
                             ("dv", grads[2], pad.expand(v.shape).to(DEVICE))):
        assert torch.equal(got[where], torch.zeros_like(got[where])), f"{name} of padding is not 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(0, 2, 1, 8, 8), (1, 2, 1, 0, 8), (1, 2, 1, 8, 0), (1, 2, 1, 0, 0)], ids=["B0", "Lq0", "Lk0", "L0"]
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_shapes(shape, dtype, kernel, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, kernel)
    b, hq, hkv, lq, lk = shape
    d = 64
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    ev = torch.full((b, hkv, lk), INT32_MAX, dtype=torch.int32, device=DEVICE)
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev)
    assert out.shape == q.shape and lse.shape == (b, hq, lq)
    assert torch.equal(out, torch.zeros_like(out))  # Lk == 0: nothing to attend to
    assert torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t, g in ((q, dq), (k, dk), (v, dv)):
        assert g.shape == t.shape
        assert torch.equal(g, torch.zeros_like(g))


def _layout(shape, layout, dtype):
    """A non-contiguous CUDA view of ``shape`` [B, H, L, D] (last dimension contiguous unless noted)."""
    b, h, n, d = shape

    def randn(*size):
        return torch.randn(*size, device=DEVICE, dtype=dtype)

    if layout == "bshd":  # a model's projections before the head transpose
        return randn(b, n, h, d).transpose(1, 2)
    if layout == "row_slice":
        return randn(b, h, 2 * n, d)[:, :, ::2]
    if layout == "unaligned":  # data pointer one element off a 16-byte boundary: SIMT fallback
        return randn(b * h * n * d + 1)[1:].view(b, h, n, d)
    if layout == "dim_strided":  # last dimension not contiguous either
        return randn(b, h, d, n).transpose(2, 3)
    raise ValueError(layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "row_slice", "unaligned", "dim_strided"])
def test_non_contiguous_inputs(layout, dtype):
    check_layout(layout, dtype)


def check_layout(layout: str, dtype: torch.dtype):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 70, 150, 64
    q = _layout((b, hq, lq, d), layout, dtype)
    k, v = (_layout((b, hkv, lk, d), layout, dtype) for _ in range(2))
    # A stride-0 log (one log broadcast over batch and heads) is the natural way to pass one.
    ev = streaming_evicted_at(lk, 2, 40).to(DEVICE).expand(b, hkv, lk)
    q_offset = lk - lq
    tol = TOLERANCES[dtype]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.shadow_attention_with_lse(q, k, v, ev, q_offset)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev, q_offset)
    assert_near("out", out, out_ref, tol.out)
    assert_near("lse", lse, lse_ref, tol.lse)
    g = torch.randn(out.shape, device=DEVICE)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref = torch.autograd.grad(out_ref, (q64, k64, v64), g.to(dtype).double())
    for name, gg, rr in zip(("dq", "dk", "dv"), got, ref):
        assert_near(name, gg, rr, tol.grad)


def outputs_and_grads(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """out, lse, dq, dk, dv of ``case`` (its tensors, log, gradients) under the kernel family the
    environment names."""
    q, k, v, grad_out, grad_lse = case.tensors(dtype)
    out, lse = ops.shadow_attention_with_lse(q, k, v, case.evicted_at(), case.q_offset)
    return (out, lse, *torch.autograd.grad([out, lse], [q, k, v], [grad_out.to(dtype), grad_lse]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, kernel, monkeypatch):
    """Two runs agree bit for bit: every output element is written once, by one thread, except
    dQ in the one-pass backwards (ATOMIC_DQ), which add it up in an fp32 workspace with float
    atomics in whatever order the key blocks finish: there dQ agrees to its rounding (a
    different order of the same fp32 sum), and everything else still bit for bit."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    # wgmma_wsf: at head dim 128, where its dQ comes from atomics (at 64 it runs wgmma_wsb's kernels).
    case = CASES["gqa2_streaming_d128" if kernel == "wgmma_wsf" else "gqa4_chunk_d64"]
    runs = [outputs_and_grads(case, dtype) for _ in range(2)]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        if name == "dq" and kernel in ATOMIC_DQ:
            # One rounding of the output dtype apart at most (the fp32 sums differ in their
            # last bits, which can carry across a rounding boundary of the stored dtype).
            torch.testing.assert_close(a, b, msg=name)
        else:
            assert torch.equal(a, b), f"{name} differs between two runs"


@cuda_only
def test_float64_is_rejected():
    q = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)
    ev = torch.full((1, 1, 4), INT32_MAX, dtype=torch.int32, device=DEVICE)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="float64"):
        FWD(q, q, q, ev)


# --------------------------------------------------------------------------------------------
# opcheck (schema, fake tensor, autograd registration) on CUDA tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mha_random_d64", "gqa8_decode_d128", "no_key_rows_d32"])
def test_opcheck_fwd(name, dtype):
    base = CASES[name]
    # Short rows keep the repeated runs of opcheck cheap.
    case = Case(base.batch, base.q_heads, base.kv_heads, min(base.q_len, 40), min(base.kv_len, 80),
                base.head_dim, min(base.q_offset, 40), base.evict, seed=base.seed)
    q, k, v, _, _ = case.tensors(dtype)
    ev = case.evicted_at()
    torch.library.opcheck(FWD.default, (q, k, v, ev, case.q_offset, case.scale))
    torch.library.opcheck(FWD.default, (q, k, v, ev, case.q_offset, 0.25))


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no_glse", "glse"])
def test_opcheck_bwd(with_grad_lse):
    case = Case(1, 4, 2, 40, 80, 64, 40, "random", seed=21)
    q, k, v, _, _ = case.tensors(torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    ev = case.evicted_at()
    out, lse = FWD(q, k, v, ev, case.q_offset, 0.25)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(BWD.default, (grad_out, q, k, v, ev, out, lse, grad_lse, case.q_offset, 0.25))


# --------------------------------------------------------------------------------------------
# Long context


@pytest.mark.slow
def test_long_context_32k_bf16():
    check_long_context_32k_bf16()


def check_long_context_32k_bf16():
    """32k tokens under a sparse budget (sinks + window + heavy hitters), bf16 on tensor cores.

    The float64 reference would need B*Hq*L*L doubles at once, so it runs on query chunks:
    out, lse and dq are per row, and dk, dv are sums over rows, hence over chunks.
    """
    length, chunk = 32768, 1024
    b, hq, hkv, d = 1, 4, 1, 128
    dtype, tol = torch.bfloat16, TOLERANCES[torch.bfloat16]
    gen = torch.Generator().manual_seed(32)
    window = streaming_evicted_at(length, 4, 1024).expand(b, hkv, length)
    # 2% heavy hitters kept forever, only in the first half: in the second half whole key tiles
    # fall out of the window and must be skipped.
    key = torch.arange(length)
    heavy = (torch.rand(b, hkv, length, generator=gen) < 0.02) & (key < length // 2)
    ev = torch.where(heavy, INT32_MAX, window).to(torch.int32).contiguous().to(DEVICE)
    q = torch.randn(b, hq, length, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(b, hkv, length, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(b, hkv, length, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(b, hq, length, d, generator=gen).to(DEVICE, dtype)

    out, lse = ops.shadow_attention_with_lse(q, k, v, ev)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)

    k64, v64 = (t.detach().double().requires_grad_() for t in (k, v))
    dk_ref = torch.zeros_like(k64)
    dv_ref = torch.zeros_like(v64)
    for c0 in range(0, length, chunk):
        q64 = q[:, :, c0:c0 + chunk].detach().double().requires_grad_()
        out_ref, lse_ref = shadow_attention_ref(q64, k64, v64, ev, c0)
        assert_near(f"out[{c0}:]", out[:, :, c0:c0 + chunk], out_ref, tol.out)
        assert_near(f"lse[{c0}:]", lse[:, :, c0:c0 + chunk], lse_ref, tol.lse)
        dq_ref, dk_c, dv_c = torch.autograd.grad(out_ref, (q64, k64, v64), grad_out[:, :, c0:c0 + chunk].double())
        assert_near(f"dq[{c0}:]", dq[:, :, c0:c0 + chunk], dq_ref, tol.grad)
        dk_ref += dk_c
        dv_ref += dv_c
        del out_ref, lse_ref, dq_ref, dk_c, dv_c
    assert_near("dk", dk, dk_ref, tol.grad)
    assert_near("dv", dv, dv_ref, tol.grad)


# --------------------------------------------------------------------------------------------
# Each tensor-core family by name, forward and backward (test_matches_reference runs the default
# one; see csrc/cuda/shadow_attention_kernels.h): WMMA when the CuTe kernels are built (else it
# is the default), the CuTe mma.sync kernels, and the sm_90a wgmma ones.

needs_cute = pytest.mark.skipif(not _C.built_with_cute(), reason="built without the CuTe kernel (no CUTLASS headers)")
CUTE_CASES = [name for name, case in CASES.items() if case.head_dim in (64, 128)]


# The sm_90a wgmma kernels (SHADOWKV_ATTENTION_KERNEL=wgmma; wgmma_ws: a warp-specialised
# forward; wgmma_wsb: and a warp-specialised backward; wgmma_wsf: and a one-pass
# warp-specialised backward; wgmma_fused: a one-pass backward with dQ by atomics; forward and
# backward) are skipped
# where they do not run (not an sm_90 GPU, or no 9.0a in the build): "wgmma" then means "cute",
# which the cute cases cover.
needs_wgmma = pytest.mark.skipif(not _C.wgmma_runs_here(),
                                 reason="the wgmma kernels need an sm_90 GPU and a build with 9.0a and CuTe")
needs_wmma_by_name = pytest.mark.skipif(not _C.built_with_cute(), reason="WMMA is the default in this build")
FAMILIES = [pytest.param("wmma", marks=needs_wmma_by_name), pytest.param("cute", marks=needs_cute),
            pytest.param("wgmma", marks=needs_wgmma), pytest.param("wgmma_ws", marks=needs_wgmma),
            pytest.param("wgmma_wsb", marks=needs_wgmma), pytest.param("wgmma_wsf", marks=needs_wgmma),
            pytest.param("wgmma_fused", marks=needs_wgmma)]


@needs_wgmma
@pytest.mark.parametrize("case_name, family", [("gqa2_streaming_d128", "wgmma_ws"), ("gqa4_chunk_d64", "wgmma")])
def test_auto_is_the_fastest_measured_family(case_name, family, monkeypatch):
    """Where the wgmma kernels run, "auto" is wgmma with wgmma_ws's forward at head dim 128 (the
    fastest forward measured on an H200, bench/RESULTS.md 2026-11-27) and plain wgmma at 64: the
    same bits as the named family, forward and backward."""
    def run(kernel):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        return outputs_and_grads(CASES[case_name], torch.bfloat16)

    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run("auto"), run(family)):
        assert torch.equal(a, b), f"{name}: auto differs from {family}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("name", CUTE_CASES)
def test_family_matches_reference(name, dtype, family, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, family)
    check_case(CASES[name], dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["bshd", "row_slice", "unaligned", "dim_strided"])
def test_family_layouts(layout, family, monkeypatch):
    """Aligned layouts run the named family, the others fall back to SIMT: both must be right."""
    monkeypatch.setenv(KERNEL_ENV, family)
    check_layout(layout, torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_family_long_context_32k_bf16(family, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, family)
    check_long_context_32k_bf16()


@pytest.mark.parametrize("kernel", ["auto", "wmma", "simt"])
def test_every_kernel_choice_matches_reference(kernel, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, kernel)
    check_case(CASES["gqa2_streaming_d128"], torch.bfloat16)


@cuda_only  # the CPU op has one kernel and reads no choice
def test_unknown_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    q = torch.randn(1, 1, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    ev = torch.full((1, 1, 8), INT32_MAX, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError,
                       match="SHADOWKV_ATTENTION_KERNEL must be one of auto, cute, wgmma, wgmma_ws, wgmma_wsb, "
                             "wgmma_wsf, wgmma_fused, wmma, simt"):
        ops.shadow_attention(q, q, q, ev)
