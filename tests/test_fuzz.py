"""Property tests over whole programs of cache operations and sampler runs.

Each property runs a few examples by default and >= 500 under ``-m slow``. Invariants:
live slots never exceed the budget plus one page, pages are never double-freed or leaked,
``evicted_at`` only grows with the eviction step, decode attention equals attention over the
survivors, and replaying the log with ``shadow_attention`` reproduces every decode step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowkv import PagedKVCache, Sampler
from shadowkv.learner import token_logprobs
from shadowkv.ops import NEVER_EVICTED, shadow_attention
from shadowkv.policies import H2O, RandomEvict, SnapKV, StreamingLLM

from .models import VOCAB, tiny_model

FAST, SLOW = 12, 500


def _check_pages(cache: PagedKVCache) -> None:
    for lc in cache.layers:
        held = lc.block_tables[lc.block_tables >= 0].tolist()
        assert len(set(lc.free)) == len(lc.free), "a page is on the free list twice"
        assert len(set(held)) == len(held), "a page is held by two block-table entries"
        assert not set(held) & set(lc.free), "a held page is also free"
        assert sorted(held + lc.free) == list(range(cache.num_pages)), "a page leaked"
        for b in range(cache.max_batch):
            assert lc.pages_held(b) == math.ceil(int(lc.seq_lens[b]) / cache.page_size)
    cache.verify()  # the host bookkeeping matches the device tables


@st.composite
def _programs(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([1, 8, 16]))
    page = draw(st.sampled_from([1, 2, 4, 16]))
    ops = draw(st.lists(st.tuples(st.sampled_from(["append", "decode", "evict"]),
                                  st.integers(0, 2**31 - 1)), min_size=1, max_size=12))
    stable = draw(st.booleans())
    return B, Hkv, group, D, page, ops, stable


def _evicted_order(slots: list, keep: list[bool], stable: bool) -> list:
    """What evict_compact leaves in a head's slots: the kept ones in order (stable), or the kept
    ones past the new length moved, in order, into the evicted slots below it (fill)."""
    kept = [x for x, k in zip(slots, keep) if k]
    if stable:
        return kept
    n = len(kept)
    out = list(slots[:n])
    holes = [i for i in range(n) if not keep[i]]
    sources = [slots[i] for i in range(n, len(slots)) if keep[i]]
    for i, x in zip(holes, sources, strict=True):
        out[i] = x
    return out


def _run_program(program):
    B, Hkv, group, D, page, ops, stable = program
    T = 64
    cache = PagedKVCache(1, Hkv, D, num_pages=B * (T // page + 2), page_size=page, max_batch=B,
                         max_pages_per_seq=T // page + 2, dtype=torch.float64, stable_evict=stable)
    k_all = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    v_all = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    log = torch.full((B, Hkv, T), NEVER_EVICTED, dtype=torch.int32)
    lens = [0] * B  # positions written so far per sequence (the next position)
    live = [[list() for _ in range(Hkv)] for _ in range(B)]  # positions held per head
    decodes = []  # (b, position, q [Hq, D], out [Hq, D])
    last_step = [[-1] * Hkv for _ in range(B)]
    for op, seed in ops:
        g = torch.Generator().manual_seed(seed)
        if op == "append":
            n = torch.randint(0, 9, (B,), generator=g).clamp(max=torch.tensor([T - x for x in lens]))
            Tn = int(n.max()) if n.numel() else 0
            if Tn == 0:
                continue
            pos = torch.stack([torch.arange(lens[b], lens[b] + Tn) for b in range(B)]).clamp(max=T - 1)
            k = torch.stack([k_all[b][:, pos[b]] for b in range(B)])
            v = torch.stack([v_all[b][:, pos[b]] for b in range(B)])
            cache.append(0, k, v, pos.to(torch.int32), n.to(torch.int32))
            for b in range(B):
                for h in range(Hkv):
                    live[b][h] += list(range(lens[b], lens[b] + int(n[b])))
                lens[b] += int(n[b])
        elif op == "decode":
            # As the sampler does: the query's own token is appended first (after any eviction
            # logged at this position), then it attends to everything live.
            if max(lens) >= T:
                continue
            pos = torch.tensor(lens)[:, None]
            k = torch.stack([k_all[b][:, pos[b]] for b in range(B)])
            v = torch.stack([v_all[b][:, pos[b]] for b in range(B)])
            cache.append(0, k, v, pos.to(torch.int32), torch.ones(B, dtype=torch.int32))
            for b in range(B):
                for h in range(Hkv):
                    live[b][h].append(lens[b])
                lens[b] += 1
            q = torch.randn(B, Hkv * group, D, dtype=torch.float64, generator=g)
            out = cache.decode_attention(0, q)
            for b in range(B):
                t = lens[b] - 1
                for hq in range(Hkv * group):
                    idx = torch.tensor(live[b][hq // group])
                    p = torch.softmax(q[b, hq] @ k_all[b, hq // group, idx].T / math.sqrt(D), -1)
                    torch.testing.assert_close(out[b, hq], p @ v_all[b, hq // group, idx])
                decodes.append((b, t, q[b], out[b]))
        else:
            keep_n = [int(torch.randint(0, len(live[b][0]) + 1, (1,), generator=g)) for b in range(B)]
            keep = torch.zeros(B, Hkv, T + page, dtype=torch.bool)
            for b in range(B):
                for h in range(Hkv):  # a random eviction order per head, same count per head
                    chosen = torch.randperm(len(live[b][h]), generator=g)[: keep_n[b]].sort().values
                    keep[b, h, chosen] = True
            steps = torch.tensor(lens, dtype=torch.int32)
            cache.evict(0, keep, steps, log)
            for b in range(B):
                for h in range(Hkv):
                    kept = _evicted_order(live[b][h], keep[b, h, : len(live[b][h])].tolist(), stable)
                    for gone in set(live[b][h]) - set(kept):
                        assert int(log[b, h, gone]) == lens[b] >= last_step[b][h]
                        last_step[b][h] = lens[b]
                    live[b][h] = kept
                    held = cache.gather(0, b)[2][h].tolist()
                    assert held == kept, "the slots hold other positions than evict_compact's contract says"
        _check_pages(cache)
        lc = cache.layers[0]
        for b in range(B):
            assert int(lc.seq_lens[b]) == len(live[b][0])
    # replaying the log reproduces every decode step (prefill-style appends are not replayed:
    # their queries were never computed here)
    for b, t, q, out in decodes:
        rep = shadow_attention(q[None, :, None], k_all[b : b + 1, :, : t + 1], v_all[b : b + 1, :, : t + 1],
                               log[b : b + 1, :, : t + 1], q_offset=t)
        torch.testing.assert_close(rep[0, :, 0], out)


@settings(max_examples=FAST)
@given(_programs())
def test_cache_programs(program):
    _run_program(program)


@pytest.mark.slow
@settings(max_examples=SLOW)
@given(_programs())
def test_cache_programs_slow(program):
    _run_program(program)


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("fuzz"), "llama", hidden=32, heads=4, kv_heads=2, layers=2)


_POLICIES = [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3), RandomEvict(seed=1)]


@st.composite
def _sampler_runs(draw):
    return (draw(st.sampled_from(range(len(_POLICIES)))), draw(st.sampled_from([0.25, 0.5, 6, 13])),
            draw(st.sampled_from([1, 4, 16])), draw(st.sampled_from([None, 3])),
            draw(st.lists(st.integers(1, 20), min_size=1, max_size=3)), draw(st.integers(0, 1000)),
            draw(st.sampled_from([1, 3])), draw(st.sampled_from([None, 1, 40])))


def _run_sampler(model, run):
    pi, budget, page, evict_every, plens, seed, repeats, prefill_tokens = run
    sampler = Sampler(model, _POLICIES[pi], budget, page_size=page, evict_every=evict_every,
                      prefill_tokens=prefill_tokens)
    g = torch.Generator().manual_seed(seed)
    # GRPO-like groups when repeats > 1: each prompt prefilled once and forked to its repeats
    prompts = [p for p in (torch.randint(3, VOCAB, (n,), generator=g) for n in plens) for _ in range(repeats)]
    plens = [p.numel() for p in prompts]
    peak_live = []
    real_evict = sampler._evict

    def watched(rows, lengths, force, layers=None):  # live slots just before each query is computed
        real_evict(rows, lengths, force, layers)
        peak_live.append(max(int(layer.seq_lens[b]) for layer in sampler.cache.layers for b in rows))

    sampler._evict = watched
    r = sampler.generate(prompts, 24, seed=seed)
    bound = (budget if isinstance(budget, int) else math.ceil(budget * (max(plens) + 24))) + page
    slack = 0 if evict_every is None else evict_every
    assert max(peak_live) <= bound + slack
    _check_pages(sampler.cache)
    ev = r.evicted_at[r.evicted_at < NEVER_EVICTED]
    assert (ev >= 1).all()
    shadow = token_logprobs(model, r, "shadow")
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


@settings(max_examples=FAST)
@given(_sampler_runs())
def test_sampler_runs(fuzz_model, run):
    _run_sampler(fuzz_model, run)


@pytest.mark.slow
@settings(max_examples=SLOW)
@given(_sampler_runs())
def test_sampler_runs_slow(fuzz_model, run):
    _run_sampler(fuzz_model, run)
