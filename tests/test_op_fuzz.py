"""Adversarial property tests of the custom ops on CPU: bad input gives a clear error, never a
crash or a silent wrong answer (DESIGN.md section 2).

Each case starts from a valid call and applies random mutations: values (lengths outside the
table, page ids outside the pool or shared where written, ``num_new``/positions/steps/keep
masks/logged positions out of contract, scales NaN/inf/0/negative/huge), layouts (dtype, rank,
shape, strided views with holes, permuted storage, expand()ed and meta tensors, non-unit last
strides, one argument passed as another), with ``check=True`` and ``check=False`` (the CPU ops
check regardless). Every tensor lives inside a larger buffer of canary values. Properties:

- the op raises ValueError/TypeError (a message naming a shadowkv argument) and leaves every
  buffer untouched, or
- it returns, the input meets the documented contract (a Python oracle), the results equal the
  float64 reference (``shadowkv/reference.py``), read-only inputs and every canary are untouched.

``shadow_attention`` forward and backward must match the reference on odd layouts, extreme
``evicted_at``/``q_offset``/``scale`` values, empty dimensions and NaN/inf in slots no query sees.

Cases are built from an integer seed (reproduce one with ``_paged_case(op, seed)``); a few per
property by default, many more under ``-m slow``.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shadowkv
from shadowkv import ops
from shadowkv.reference import (
    INT32_MAX,
    append_kv_ref,
    evict_compact_ref,
    paged_decode_attention_ref,
    random_paged_state,
    shadow_attention_ref,
    shadow_visible,
)

FAST, SLOW = 30, 1000
SEEDS = st.integers(0, 2**31 - 1)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ODD_DTYPES = [torch.int64, torch.int16, torch.int32, torch.float32, torch.float64, torch.bfloat16, torch.bool,
              torch.uint8]
CANARY = {torch.float32: 12345.0, torch.float64: -777.0, torch.bfloat16: 96.0, torch.float16: 33.0,
          torch.int32: 0x5A5A5A5A, torch.int64: 0x5A5A5A5A5A, torch.int16: 77, torch.uint8: 0xA5, torch.bool: True}
MAX_SCALE = torch.finfo(torch.float32).max / 1.4426950408889634
NAMES = {
    "append": ["k_pages", "v_pages", "pos_pages", "block_tables", "seq_lens", "k", "v", "positions", "num_new"],
    "decode": ["q", "k_pages", "v_pages", "block_tables", "seq_lens", "scores_out"],
    "evict": ["k_pages", "v_pages", "pos_pages", "block_tables", "seq_lens", "keep", "steps", "evicted_at",
              "slot_scores"],
}
WRITTEN = {
    "append": {"k_pages", "v_pages", "pos_pages", "seq_lens"},
    "decode": {"scores_out"},
    "evict": {"k_pages", "v_pages", "pos_pages", "block_tables", "seq_lens", "evicted_at", "slot_scores"},
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits (NaN-safe exact comparison)."""
    if t.dtype.is_floating_point:
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


class _Canaried:
    """A copy of ``t`` as a view inside a larger buffer filled with canary values: contiguous,
    strided with holes between rows ("gaps"), or stored with dims 0 and 1 swapped ("perm")."""

    def __init__(self, t: torch.Tensor, how: str, rng: random.Random):
        shape, n, fill = list(t.shape), t.numel(), CANARY[t.dtype]
        if how == "gaps" and t.dim() and n:
            strides, span = [0] * t.dim(), 1
            for d in reversed(range(t.dim())):  # last dim stays unit stride
                strides[d] = span if d == t.dim() - 1 else span + rng.randint(1, 3)
                span = strides[d] * shape[d]
            self.buf = torch.full((sum((s - 1) * st for s, st in zip(shape, strides)) + 17,), fill, dtype=t.dtype)
            self.view = self.buf.as_strided(shape, strides, 8)
        elif how == "perm" and t.dim() >= 2:
            perm = [1, 0, *range(2, t.dim())]
            self.buf = torch.full((n + 16,), fill, dtype=t.dtype)
            self.view = self.buf[8: 8 + n].view([shape[i] for i in perm]).permute(perm)
        else:
            self.buf = torch.full((n + 16,), fill, dtype=t.dtype)
            self.view = self.buf[8: 8 + n].view(shape)
        self.view.copy_(t)
        covered = torch.zeros(self.buf.numel(), dtype=torch.bool)
        if n:
            idx = torch.arange(self.buf.numel()).as_strided(shape, self.view.stride(), self.view.storage_offset())
            covered[idx.reshape(-1)] = True
        self.outside = ~covered
        self.before = self.buf.clone()

    def untouched(self) -> bool:
        return _same(self.buf, self.before)

    def canaries_intact(self) -> bool:
        return _same(self.buf[self.outside], self.before[self.outside])


def _paged_case(op: str, seed: int):
    """A call of ``op`` ("append", "decode", "evict") built from ``seed``: a valid one, then 0-2
    value mutations and 0-2 layout mutations. Returns ``(args, kwargs, layouts, wrong_layout,
    what)``: ``args`` maps argument names to tensors (optional ones may be absent), ``layouts``
    the canary layout per argument, ``wrong_layout`` whether a mutation broke (None: may have broken) a documented
    dtype/rank/shape/device/aliasing/stride rule (the call must fail)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rng.choice(DTYPES)
    B, H, D, ps = rng.choice([0, 1, 1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 5, 16]), rng.choice([1, 2, 4, 16])
    lens = [rng.randint(0, 20) for _ in range(B)]
    max_pages = None if rng.random() < 0.7 else max([math.ceil(n / ps) for n in lens] + [0]) + rng.randint(0, 3)
    state = random_paged_state(lens, H, D, ps, preallocated=rng.randint(0, 2), spare_pages=rng.randint(0, 2),
                               max_pages=max_pages, dtype=dtype, generator=gen)
    a = dict(state._asdict())
    P, M = state.k_pages.shape[0], state.block_tables.shape[1]
    kw = {"check": rng.random() < 0.5}
    S = (max(lens) if B else 0) + rng.randint(0, 3)
    if op == "append":
        T = rng.choice([0, 1, 2, 5])
        num_new = [rng.randint(0, max(0, min(T, M * ps - n))) for n in lens]
        a.update(k=torch.randn(B, H, T, D, generator=gen).to(dtype), v=torch.randn(B, H, T, D, generator=gen).to(dtype),
                 positions=(state.seq_lens[:, None] + torch.arange(T)).to(torch.int32),
                 num_new=torch.tensor(num_new, dtype=torch.int32).reshape(B))
    elif op == "decode":
        del a["pos_pages"]
        a["q"] = torch.randn(B, H * rng.choice([1, 2, 3]), D, generator=gen).to(dtype)
        kw["scale"] = rng.choice([None, None, 0.3, 2.0, math.nan, math.inf, 0.0, -1.0, 1e-300, MAX_SCALE, 1e39])
        if rng.random() < 0.5:
            a["scores_out"] = torch.full((B, H, S), -3.0)
    else:
        keep = torch.zeros(B, H, S, dtype=torch.bool)
        for b, n in enumerate(lens):
            kept = rng.randint(0, n)
            for h in range(H):
                keep[b, h, torch.randperm(n, generator=gen)[:kept]] = True
        T = max(int(state.pos_pages.max()) + 1 if state.pos_pages.numel() else 0, 0) + rng.randint(0, 3)
        a.update(keep=keep, steps=torch.randint(0, 100, (B,), generator=gen, dtype=torch.int32),
                 evicted_at=torch.full((B, H, T), INT32_MAX, dtype=torch.int32))
        if rng.random() < 0.4:
            a["slot_scores"] = torch.randn(B, H, S, generator=gen)
        kw["stable"] = rng.random() < 0.5
    what = [f"B={B} P={P} page_size={ps} Hkv={H} D={D} max_pages={M} {dtype} {kw}"]

    for _ in range(rng.choice([0, 0, 1, 1, 2])):  # values
        kind = rng.choice(["seq_lens", "table", "shared", "op"])
        if not B:
            break
        b = rng.randrange(B)
        if kind == "seq_lens":
            a["seq_lens"][b] = rng.choice([-1, -2**31, M * ps, M * ps + 1, INT32_MAX, rng.randint(0, M * ps)])
        elif kind == "table" and M:
            a["block_tables"][b, rng.randrange(M)] = rng.choice([-1, -2, P, P + 3, INT32_MAX, -2**31,
                                                                  rng.randint(0, max(P - 1, 0))])
        elif kind == "shared" and M:
            a["block_tables"][b, rng.randrange(M)] = a["block_tables"][rng.randrange(B), rng.randrange(M)]
        elif op == "append" and rng.random() < 0.5:
            a["num_new"][b] = rng.choice([-1, a["k"].shape[2] + 1, INT32_MAX, -2**31])
        elif op == "append" and a["k"].shape[2]:
            a["positions"][b, rng.randrange(a["k"].shape[2])] = rng.choice([-1, -2**31, INT32_MAX])
        elif op == "evict":
            T, r = a["evicted_at"].shape[2], rng.random()
            if r < 0.3 and S:
                a["keep"][b, rng.randrange(H), rng.randrange(S)] ^= True
            elif r < 0.5:
                a["steps"][b] = rng.choice([-1, INT32_MAX, INT32_MAX - 1, -2**31])
            elif r < 0.7 and T:
                a["evicted_at"][b, rng.randrange(H), rng.randrange(T)] = rng.choice([0, 5, -1, INT32_MAX - 1])
            elif a["pos_pages"].numel():
                a["pos_pages"][tuple(rng.randrange(s) for s in a["pos_pages"].shape)] = rng.choice(
                    [-1, -2**31, INT32_MAX, 0, 1, T])
        what.append(kind)

    layouts, wrong, unsure = {}, False, False  # unsure: either way (only the safety properties are checked)
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):  # layouts
        name = rng.choice(sorted(a))
        t, kind = a[name], rng.choice(["dtype", "rank", "shape", "gaps", "perm", "expand", "alias", "meta", "last"])
        if kind == "dtype":
            a[name] = t.to(rng.choice(ODD_DTYPES))
            wrong |= a[name].dtype != t.dtype
        elif kind == "rank":
            a[name] = t.unsqueeze(0) if rng.random() < 0.5 or t.dim() == 0 else t.reshape(-1) if t.dim() > 1 else t[0] if t.numel() == 1 else t[:, None]
            wrong = True
        elif kind == "shape" and t.dim() and t.shape[0] and not (op == "evict" and name == "evicted_at"):
            a[name] = torch.cat([t, t], 0)  # (evicted_at's length T is free)
            wrong = True
        elif kind in ("gaps", "perm"):
            layouts[name] = kind
        elif kind == "expand" and t.dim() and t.shape[0] > 1:
            a[name] = t[:1].expand_as(t)
            wrong |= name in WRITTEN[op]
        elif kind == "alias":
            other = rng.choice(sorted(a))
            if other != name:  # wrong if one is written, or a dtype/rank differs (sizes: oracle)
                u = a[name] = a[other]
                if (u.dim(), u.dtype) != (t.dim(), t.dtype) or {name, other} & WRITTEN[op]:
                    wrong = True
                elif u.shape != t.shape:  # right or wrong depending on which sizes are free
                    unsure = True
        elif kind == "meta":
            a[name] = t.to("meta")
            wrong = True
        elif kind == "last" and t.dim() > 1 and t.shape[-1] > 1:
            a[name] = t.transpose(-1, 0).contiguous().transpose(-1, 0)
            wrong |= name in ("k_pages", "v_pages") and op != "decode" and t.numel() > 0
        what.append(f"{kind} {name}")
    return a, kw, layouts, True if wrong else None if unsure else False, what


def _call(op: str, a: dict, kw: dict):
    if op == "append":
        return ops.append_kv(*(a[n] for n in NAMES[op]), check=kw["check"])
    if op == "decode":
        return ops.paged_decode_attention(*(a[n] for n in NAMES[op][:5]), scale=kw["scale"],
                                          scores_out=a.get("scores_out"), check=kw["check"])
    return ops.evict_compact(*(a[n] for n in NAMES[op][:8]), slot_scores=a.get("slot_scores"), check=kw["check"],
                             stable=kw["stable"])


def _contract_violation(op: str, a: dict, kw: dict) -> str | None:
    """The documented value contract of the op (ops.py docstrings, paged_kv.h), for arguments
    of valid layouts: the first rule the values break, or None."""
    P, ps, H, _ = a["k_pages"].shape
    bt, lens = a["block_tables"], [int(x) for x in a["seq_lens"]]
    B, M = bt.shape
    cap = min(M * ps, INT32_MAX)
    if any(not 0 <= n <= cap for n in lens):
        return "seq_lens outside [0, max_pages * page_size]"
    used = [-(-n // ps) for n in lens]
    if op == "decode":
        s = kw["scale"]
        if s is not None and not 0 < s <= MAX_SCALE:
            return "scale"
        if "scores_out" in a and any(n > a["scores_out"].shape[2] for n in lens):
            return "scores_out shorter than a sequence"
        if any(not 0 <= int(x) < P for b in range(B) for x in bt[b, : used[b]]):
            return "page id outside the pool"
        return None
    if op == "append":
        nn, T = [int(x) for x in a["num_new"]], a["k"].shape[2]
        if any(not 0 <= n <= T for n in nn):
            return "num_new"
        if any(int(x) < 0 for b in range(B) for x in a["positions"][b, : nn[b]]):
            return "negative position"
        if any(n + k > cap for n, k in zip(lens, nn)):
            return "no room"
        used = [-(-(n + k) // ps) for n, k in zip(lens, nn)]
        begin, end = [n // ps if k else 0 for n, k in zip(lens, nn)], [u if k else 0 for u, k in zip(used, nn)]
    else:
        keep, S = a["keep"], a["keep"].shape[2]
        begin, end = [], [M] * B
        for b, n in enumerate(lens):
            if n > S:
                return "keep shorter than a sequence"
            if not 0 <= int(a["steps"][b]) < INT32_MAX:
                return "steps"
            if keep[b, :, n:].any():
                return "keep True past seq_lens"
            counts = keep[b, :, :n].sum(-1)
            if not (counts == counts[0]).all():
                return "heads keep different counts"
            dropped = [(~keep[b, h, :n]).nonzero() for h in range(H)]
            first = min([int(d[0]) if d.numel() else n for d in dropped])
            begin.append(first // ps if int(counts[0]) < n else used[b])
    refs: dict[int, int] = {}
    for b in range(B):
        for i in range(max(used[b], end[b])):
            x = int(bt[b, i])
            if i < used[b] and not 0 <= x < P:
                return "page id outside the pool"
            if not 0 <= x < P and x != -1:
                return "table entry neither -1 nor a page id"
            if 0 <= x < P:
                refs[x] = refs.get(x, 0) + 1
    if any(int(bt[b, i]) >= 0 and refs[int(bt[b, i])] > 1 for b in range(B) for i in range(begin[b], end[b])):
        return "a written page appears twice"
    if op == "evict":
        T = a["evicted_at"].shape[2]
        for b, n in enumerate(lens):
            for h in range(H):
                seen = set()
                for s in (~a["keep"][b, h, :n]).nonzero()[:, 0].tolist():
                    pos = int(a["pos_pages"][int(bt[b, s // ps]), s % ps, h])
                    if not 0 <= pos < T or int(a["evicted_at"][b, h, pos]) != INT32_MAX or pos in seen:
                        return "evicted position outside the log, already evicted, or twice"
                    seen.add(pos)
    return None


def _check_against_reference(op: str, a: dict, plain: dict, kw: dict, result) -> None:
    if op == "append":
        want = append_kv_ref(*(plain[n] for n in NAMES[op]))
        for name, w in zip(["k_pages", "v_pages", "pos_pages", "seq_lens"], want):
            assert _same(a[name].contiguous(), w), f"{name} differs from append_kv_ref"
    elif op == "decode":
        out, scores = paged_decode_attention_ref(*(plain[n] for n in NAMES[op][:5]), scale=kw["scale"],
                                                 scores_len=plain["scores_out"].shape[2] if "scores_out" in a else None)
        if kw["scale"] is not None and kw["scale"] > 1e30:
            return  # a valid scale, but the logits overflow float32 (NaN rows): numerics, not this file's topic
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[a["q"].dtype]
        torch.testing.assert_close(result.double(), out, atol=tol, rtol=tol)
        if "scores_out" in a:
            torch.testing.assert_close(a["scores_out"].double(), scores, atol=1e-4, rtol=1e-4)
    else:
        want = evict_compact_ref(*(plain[n] for n in NAMES[op][:8]), slot_scores=plain.get("slot_scores"),
                                 stable=kw["stable"])
        for name in ["k_pages", "v_pages", "pos_pages", "block_tables", "seq_lens", "evicted_at", "slot_scores"]:
            if name in a:
                assert _same(a[name].contiguous(), getattr(want, name)), f"{name} differs from evict_compact_ref"
        assert _same(result, want.freed), "freed differs from evict_compact_ref"


def _run_paged(op: str, seed: int) -> None:
    a, kw, layouts, wrong_layout, what = _paged_case(op, seed)
    rng = random.Random(~seed)
    boxes = {}
    for name, t in list(a.items()):
        shared = any(u is t for n, u in a.items() if n != name)
        if t.device.type == "meta" or shared or (t.numel() > 1 and 0 in t.stride()):
            continue  # kept as built: aliasing and expand()ed views are the point
        if not t.is_contiguous() and name not in layouts and t.numel() > 1:
            continue  # a non-unit last stride
        boxes[name] = _Canaried(t, layouts.get(name, "plain"), rng)
        a[name] = boxes[name].view
    plain = {n: t if t.device.type == "meta" else t.clone() for n, t in a.items()}
    try:
        result = _call(op, a, kw)
    except (ValueError, TypeError) as e:
        assert "shadowkv" in str(e), f"{what}: unclear error {e!r}"
        for name, box in boxes.items():
            assert box.untouched(), f"{what}: `{name}` was written by a call that failed ({e})"
        if wrong_layout is False:
            assert _contract_violation(op, plain, kw) is not None, f"{what}: valid input rejected: {e}"
        return
    for name, box in boxes.items():
        if name in WRITTEN[op]:
            assert box.canaries_intact(), f"{what}: a write outside `{name}`"
        else:
            assert box.untouched(), f"{what}: read-only `{name}` was written"
    assert wrong_layout is not True, f"{what}: a wrong layout was accepted"
    try:
        violation = _contract_violation(op, plain, kw)
    except IndexError:  # sizes that don't fit together (wrong_layout None)
        violation = "sizes"
    assert violation is None, f"{what}: accepted input that breaks the contract ({violation})"
    _check_against_reference(op, a, plain, kw, result)


@pytest.mark.parametrize("op", ["append", "decode", "evict"])
@settings(max_examples=FAST)
@given(seed=SEEDS)
def test_paged_ops_fail_cleanly_or_match_reference(op, seed):
    _run_paged(op, seed)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["append", "decode", "evict"])
@settings(max_examples=SLOW)
@given(seed=SEEDS)
def test_paged_ops_fail_cleanly_or_match_reference_slow(op, seed):
    _run_paged(op, seed)


@pytest.mark.parametrize("op", ["append", "decode", "evict"])
@settings(max_examples=FAST)
@given(seed=SEEDS)
def test_meta_tensors_agree_with_cpu(op, seed):
    """The fake (meta) kernels accept whatever the CPU op accepts, with the same result shape,
    and reject only with ValueError/TypeError."""
    a, kw, _, _, what = _paged_case(op, seed)
    try:
        want = _call(op, {n: t.clone() for n, t in a.items()}, kw)
    except (ValueError, TypeError):
        want = Exception
    try:
        got = _call(op, {n: t.to("meta") for n, t in a.items()}, kw)
    except (ValueError, TypeError) as e:
        assert want is Exception, f"{what}: the fake kernel refused a call the CPU op accepts: {e}"
        return
    if want is not Exception and want is not None:
        assert (got.shape, got.dtype) == (want.shape, want.dtype), what


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The values of t in another memory layout (read-only arguments)."""
    if t.numel() == 0 or how == "plain":
        return t
    if how == "transpose" and t.dim() >= 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "gaps":
        big = torch.full([2 * s + 1 for s in t.shape], math.nan if t.is_floating_point() else 7, dtype=t.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in t.shape)]
        view.copy_(t)
        return view
    if how == "last":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "expand" and t.shape[0] > 1:
        return t[:1].expand_as(t)
    return t


def _run_attention(seed: int) -> None:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rng.choice(DTYPES)
    B, Hkv, group = rng.choice([0, 1, 1, 2, 3]), rng.choice([0, 1, 1, 2, 3]), rng.choice([1, 2, 3, 9])
    Lk, Lq = rng.choice([0, 1, 3, 17, 64, 65, 130]), rng.choice([0, 1, 2, 17, 33, 64, 65, 130])
    D = rng.choice([0, 1, 3, 8, 16, 33])
    q_offset = max(0, rng.choice([0, Lk - Lq, rng.randint(0, 200), INT32_MAX - Lq, INT32_MAX - Lq - 1]))
    scale = rng.choice([None, None, 0.5, 1e-30, 1e-300, 3.0])
    log = rng.choice(["never", "near", "extreme"])
    if log == "never":
        ev = torch.full((B, Hkv, Lk), INT32_MAX, dtype=torch.int32)
    elif log == "near":  # evictions around the queries' positions
        ev = torch.randint(-5, Lq + 40, (B, Hkv, Lk), generator=gen, dtype=torch.int32) + min(q_offset, INT32_MAX - Lq - 40)
        ev = torch.where(torch.rand(B, Hkv, Lk, generator=gen) < 0.5, torch.full_like(ev, INT32_MAX), ev)
    else:
        values = torch.tensor([-2**31, -1, 0, 1, INT32_MAX - 1, INT32_MAX, q_offset, min(q_offset + 1, INT32_MAX)],
                              dtype=torch.int32)
        ev = values[torch.randint(0, len(values), (B, Hkv, Lk), generator=gen)]
    how = [rng.choice(["plain", "plain", "transpose", "gaps", "last", "expand"]) for _ in range(4)]
    q = _layout(torch.randn(B, Hkv * group, Lq, D, generator=gen).to(dtype), how[0])
    k = _layout(torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype), how[1])
    v = _layout(torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype), how[2])
    ev = _layout(ev, how[3])
    unseen = ~shadow_visible(ev, Lq, q_offset).any(2)  # [B, Hkv, Lk]: keys no query sees
    poison = rng.random() < 0.3 and "expand" not in how[1:3]
    kz, vz = k.clone(), v.clone()
    kz[unseen], vz[unseen] = 0, 0
    if poison:  # documented: such slots may hold NaN/inf; they change nothing, and get zero dk, dv
        k[unseen], v[unseen] = math.nan, rng.choice([math.nan, math.inf])
    what = f"B={B} Hq={Hkv * group} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} {dtype} {q_offset=} {scale=} {log=} {how=} {poison=}"

    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = ops.shadow_attention_with_lse(q1, k1, v1, ev, q_offset, scale)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, kz, vz))
    want_out, want_lse = shadow_attention_ref(q2, k2, v2, ev, q_offset, scale)
    tol = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 4e-2, torch.float16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want_out.detach(), atol=tol, rtol=tol, msg=lambda m: f"{what}: out {m}")
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=tol, rtol=tol, msg=lambda m: f"{what}: lse {m}")
    if out.numel() == 0 and lse.numel() == 0:
        return
    g_out = _layout(torch.randn(out.shape, generator=gen).to(dtype), rng.choice(["plain", "gaps"]))
    g_lse = torch.randn(lse.shape, generator=gen).to(lse.dtype)
    finite = lambda x: torch.where(torch.isinf(x), 0, x)  # noqa: E731 (rows that see no key: lse = -inf)
    got = torch.autograd.grad((out * g_out).sum() + (finite(lse) * g_lse).sum(), (q1, k1, v1), allow_unused=True)
    want = torch.autograd.grad((want_out * g_out.double()).sum() + (finite(want_lse) * g_lse.double()).sum(),
                               (q2, k2, v2), allow_unused=True)
    for name, x, y in zip("qkv", got, want):
        if x is not None and y is not None:
            torch.testing.assert_close(x.double(), y, atol=10 * tol, rtol=10 * tol,
                                       msg=lambda m, name=name: f"{what}: d{name} {m}")


@settings(max_examples=FAST)
@given(seed=SEEDS)
def test_shadow_attention_odd_inputs_match_reference(seed):
    _run_attention(seed)


@pytest.mark.slow
@settings(max_examples=SLOW)
@given(seed=SEEDS)
def test_shadow_attention_odd_inputs_match_reference_slow(seed):
    _run_attention(seed)


# Negated/conjugated views (a neg view of a real tensor: z.conj().imag) went through torch's
# math-bit fallback, which assumes an in-place op returns its written argument first: for these
# ops it read past the dispatcher stack (an INTERNAL ASSERT, then an abort at exit, or silently
# nothing). Run in a subprocess so that a crash fails this test, not the session.
_MATH_BITS = textwrap.dedent("""
    import torch
    from shadowkv import ops
    from shadowkv.reference import (append_kv_ref, paged_decode_attention_ref, random_paged_state,
                                    streaming_keep, INT32_MAX)

    def neg_view(t):  # a view with the neg bit set whose values equal t's (float32/float64 t)
        z = torch.complex(torch.zeros_like(t), -t).conj().imag
        assert z.is_neg() and z.dtype == t.dtype and torch.equal(z, t)
        return z

    g = torch.Generator().manual_seed(0)
    state = random_paged_state([3, 5], 2, 4, 4, preallocated=1, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 2, 4, dtype=torch.float64)
    pos, num_new = torch.tensor([[3, 4], [5, 6]], dtype=torch.int32), torch.tensor([2, 2], dtype=torch.int32)
    names = ["k_pages", "v_pages", "pos_pages", "block_tables", "seq_lens", "k", "v", "positions", "num_new"]
    written = {"k_pages", "v_pages", "pos_pages", "seq_lens"}
    for i, name in enumerate(names):
        if name in ("pos_pages", "block_tables", "seq_lens", "positions", "num_new"):
            continue  # int32: .to(int32) of a neg view materializes; the float ones carry the bit
        s = state.clone()
        args = [*s, k, v, pos, num_new]
        want = append_kv_ref(*args)
        args[i] = neg_view(args[i])
        try:
            ops.append_kv(*args)
        except ValueError as e:
            assert name in written and f"`{name}`" in str(e), (name, e)
            assert all(torch.equal(a, b) for a, b in zip(s, state)), "written before the error"
            continue
        assert name not in written, f"{name}: a written neg view was accepted"
        for got, w in zip((s.k_pages, s.v_pages, s.pos_pages, s.seq_lens), want):
            assert torch.equal(got, w), name

    q = torch.randn(2, 4, 4, dtype=torch.float64)
    want, want_scores = paged_decode_attention_ref(q, state.k_pages, state.v_pages, state.block_tables,
                                                   state.seq_lens, scores_len=6)
    got = ops.paged_decode_attention(neg_view(q), neg_view(state.k_pages), state.v_pages, state.block_tables,
                                     state.seq_lens)
    torch.testing.assert_close(got, want)
    scores = torch.zeros(2, 2, 6)
    try:
        ops.paged_decode_attention(q, *state[:2], state.block_tables, state.seq_lens, scores_out=neg_view(scores))
        raise AssertionError("a neg-view scores_out was accepted")
    except ValueError as e:
        assert "`scores_out`" in str(e), e
    keep = streaming_keep(state.seq_lens, 2, 6, 1, 1)
    log = torch.full((2, 2, 64), INT32_MAX, dtype=torch.int32)
    for i in (0, 1):
        args = [*state.clone(), keep, torch.tensor([9, 9], dtype=torch.int32), log.clone()]
        args[i] = neg_view(args[i])
        try:
            ops.evict_compact(*args)
            raise AssertionError("a neg-view page pool was accepted")
        except ValueError as e:
            assert "in place" in str(e), e
    print("OK")
""")


def test_negated_and_conjugated_views():
    root = os.path.dirname(os.path.dirname(os.path.abspath(shadowkv.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _MATH_BITS], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), (res.returncode, res.stdout, res.stderr[-3000:])


@pytest.mark.parametrize("views, overlap", [
    (lambda buf, D: (buf[..., :D], buf[..., D:]), False),  # a fused pool's k/v halves
    (lambda buf, D: (buf[..., D:], buf[..., :D]), False),
    (lambda buf, D: (buf[..., :D], buf[..., D // 2: D // 2 + D]), True),  # v's first half is k's second
    (lambda buf, D: (buf[..., :D], buf[..., D - 1: 2 * D - 1]), True),  # one element per row shared
    (lambda buf, D: (buf[..., 1: D + 1], buf[..., :D]), True),
    (lambda buf, D: (buf[:-1, ..., :D], buf[1:, ..., :D]), True),  # shifted by a page
    (lambda buf, D: (buf[::2, ..., :D], buf[1::2, ..., :D]), False),  # even and odd pages
    (lambda buf, D: (buf[:, :, ::2, :D], buf[:, :, 1::2, :D]), False),  # even and odd heads
], ids=["halves", "halves_swapped", "half_shared", "one_shared", "one_shared_swapped", "page_shift", "even_odd_pages",
        "even_odd_heads"])
def test_large_page_views_of_one_buffer_are_refused_exactly_when_they_overlap(views, overlap):
    """Views over 65536 elements were allowed unchecked (for fused pools), so overlapping
    k_pages/v_pages were accepted and the later write won. Views with the same strides are now
    compared exactly: overlapping ones are refused, disjoint ones (a fused pool) still work."""
    P, ps, H, D = 64, 16, 8, 16  # >= 65536 elements per view
    buf = torch.zeros(P, ps, 2 * H, 2 * D)
    k_pages, v_pages = views(buf, D)
    P, _, H, _ = k_pages.shape
    k, v = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    args = (torch.zeros(P, ps, H, dtype=torch.int32), torch.arange(P, dtype=torch.int32)[None],
            torch.zeros(1, dtype=torch.int32), k, v, torch.arange(3, dtype=torch.int32)[None],
            torch.tensor([3], dtype=torch.int32))
    if overlap:
        with pytest.raises(ValueError, match="share memory"):
            ops.append_kv(k_pages, v_pages, *args)
        assert not buf.any()
    else:
        ops.append_kv(k_pages, v_pages, *args)
        assert torch.equal(k_pages[0, :3].transpose(0, 1), k[0]) and torch.equal(v_pages[0, :3].transpose(0, 1), v[0])


@pytest.mark.parametrize("disjoint", [False, True])
def test_large_views_with_different_strides_are_refused_when_their_ranges_meet(disjoint):
    """Two views of one buffer, both over 65536 elements, with different strides: an exact test
    would enumerate every offset, so they were let through, and a k_pages that v_pages' rows
    overlapped was silently overwritten. They are now refused whenever their byte ranges
    intersect (with a message saying why), and still accepted when the ranges are apart."""
    P, ps, H, D = 64, 16, 8, 16
    N = P * ps * H * D
    buf = torch.zeros((3 if disjoint else 2) * N)
    k_pages = buf[:N].view(P, ps, H, D)
    v_pages = (buf[N:] if disjoint else buf).view(P, ps, H, 2 * D)[..., :D]  # every other row of D
    k, v = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    args = (torch.zeros(P, ps, H, dtype=torch.int32), torch.arange(P, dtype=torch.int32)[None],
            torch.zeros(1, dtype=torch.int32), k, v, torch.arange(3, dtype=torch.int32)[None],
            torch.tensor([3], dtype=torch.int32))
    if not disjoint:
        with pytest.raises(ValueError, match="may share memory with `v_pages`.*different strides"):
            ops.append_kv(k_pages, v_pages, *args)
        assert not buf.any()
        return
    ops.append_kv(k_pages, v_pages, *args)
    assert torch.equal(k_pages[0, :3].transpose(0, 1), k[0]) and torch.equal(v_pages[0, :3].transpose(0, 1), v[0])
