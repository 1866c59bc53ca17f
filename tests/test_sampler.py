"""Sampler + replay: the invariant the project rests on (DESIGN.md §1, §5).

Replaying a rollout with its shadow mask reproduces the sampler's log-probs; a dense
replay does not. Tiny random Llama/Qwen2 models, float32, CPU, fixed seeds.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from shadowkv import CacheFullError, PagedKVCache, Rollout, Sampler, learner
from shadowkv.learner import token_logprobs
from shadowkv.ops import NEVER_EVICTED
from shadowkv.policies import H2O, FullCache, Policy, RandomEvict, SnapKV, StreamingLLM
from shadowkv.reference import shadow_visible

from .models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", heads=4, kv_heads=1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):  # RMS-normalises q and k per head before RoPE (q_norm, k_norm)
    return tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", heads=4, kv_heads=2, head_dim=24)


def _prompts(B, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
            for _ in range(B)]


def test_full_cache_matches_hf_generate_greedy(llama):
    prompts = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    eos = llama.generation_config.eos_token_id
    rollout = Sampler(llama, FullCache()).generate(prompts, max_new_tokens=40, temperature=0.0, eos_token_id=eos)
    ref = llama.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    assert torch.equal(rollout.tokens, ref[:, : rollout.tokens.shape[1]])
    assert not rollout.action_mask[:, :12].any() and rollout.action_mask[:, 12].all()
    assert (rollout.evicted_at == 2**31 - 1).all()


POLICIES = [StreamingLLM(sinks=4), H2O(recent_frac=0.5), SnapKV(window=8, kernel=7), RandomEvict(seed=3)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_shadow_replay_matches_sampler(policy, family, llama, qwen, qwen3):
    model = {"llama": llama, "qwen2": qwen, "qwen3": qwen3}[family]
    sampler = Sampler(model, policy, budget=0.25, page_size=8)
    rollout = sampler.generate(_prompts(2, 20, 40), max_new_tokens=256, temperature=1.0, seed=0)
    m = rollout.action_mask
    assert (rollout.evicted_at < 2**31 - 1).any(), "budget 0.25 must evict"
    shadow = token_logprobs(model, rollout, "shadow")
    dense = token_logprobs(model, rollout, "dense")
    d_shadow = (shadow - rollout.logprobs)[m].abs().max().item()
    d_dense = (dense - rollout.logprobs)[m].abs().max().item()
    print(f"{family} {policy!r}: shadow replay max|dlogp|={d_shadow:.2e}, dense replay max|dlogp|={d_dense:.2e}")
    assert d_shadow <= 1e-4
    assert d_dense >= 1e-3


def test_a_config_with_return_dict_false(llama, monkeypatch):
    """transformers 5.x's causal LMs read their inner model's output as a dict whatever the
    caller's return_dict=True, so such a config (TorchScript export) failed inside the
    sampler's forward; it is set for each call and restored."""
    monkeypatch.setattr(llama.config, "return_dict", False)
    rollout = Sampler(llama, StreamingLLM(sinks=4), budget=0.25, page_size=8).generate(
        _prompts(2, 20, 33), max_new_tokens=48, seed=0)
    shadow = token_logprobs(llama, rollout, "shadow")
    assert (shadow - rollout.logprobs)[rollout.action_mask].abs().max().item() <= 1e-4
    assert llama.config.return_dict is False  # the user's setting is back


def test_release_frees_the_pool_and_generate_runs_again(llama):
    sampler = Sampler(llama, StreamingLLM(sinks=4), budget=0.25, page_size=8)
    first = sampler.generate(_prompts(2, 20, 33), max_new_tokens=24, seed=0)
    assert sampler.cache is not None  # kept for inspection until the next call
    sampler.release()
    assert sampler.cache is None and sampler.evicted_at is None and sampler.slot_scores == []
    again = sampler.generate(_prompts(2, 20, 33), max_new_tokens=24, seed=0)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.evicted_at, again.evicted_at)


def test_replay_computes_logits_only_for_rows_that_predict_generated_tokens(llama, monkeypatch):
    """The learner's replay skips the prompt rows that no sequence's action follows (their
    [B, prompt, V] float32 logits would be most of its memory with a real vocabulary): the
    model computes the last R rows only (logits_to_keep), or, for a model without that
    argument, the rows are sliced; both give the log-probs a whole-sequence replay gives."""
    sampler = Sampler(llama, StreamingLLM(sinks=4), budget=0.5, page_size=8)
    rollout = sampler.generate(_prompts(3, 20, 40, seed=2), max_new_tokens=12, temperature=1.0, seed=0)
    T = rollout.tokens.shape[1]
    first = int(rollout.prompt_lens.min()) - 1
    assert learner.first_action_row(rollout) == first > 0
    kept, kept_hidden = learner.replay_logits(llama, rollout, "shadow", return_hidden=True)
    assert kept.shape == (3, T - 1 - first, VOCAB) and kept_hidden.shape[:2] == (3, T - 1 - first)
    shadow = token_logprobs(llama, rollout, "shadow")
    assert (shadow - rollout.logprobs)[rollout.action_mask].abs().max() <= 1e-4
    assert (shadow[~rollout.action_mask] == 0).all()

    # An int logits_to_keep (older transformers, a model that slices itself), or none at all
    # (the logits sliced after the forward): the same rows, packed and padded.
    for mode in ("last", None):
        monkeypatch.setattr(learner, "_logits_to_keep_mode", lambda model, mode=mode: mode)
        sliced, sliced_hidden = learner.replay_logits(llama, rollout, "shadow", return_hidden=True)
        torch.testing.assert_close(sliced, kept, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sliced_hidden, kept_hidden)
        for pack in (True, False):
            got = learner.gather_logprobs(learner.replay_rows(llama, rollout, "shadow", pack=pack), rollout)
            torch.testing.assert_close(got, shadow, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    # transformers releases with ``slice_logits_to_keep`` (5.x) take a row mask; 4.56-4.57 an int.
    import transformers.modeling_utils as modeling_utils

    masks = hasattr(modeling_utils, "slice_logits_to_keep")
    assert learner._logits_to_keep_mode(llama) == ("mask" if masks else "last")

    # No action at all (every sequence ended at its prompt): one row is still replayed.
    empty = type(rollout)(**{**rollout.__dict__, "action_mask": torch.zeros_like(rollout.action_mask)})
    assert learner.first_action_row(empty) == T - 2
    assert learner.replay_logits(llama, empty, "dense").shape == (3, 1, VOCAB)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_replay_rows_are_the_generated_tokens_only(llama, pack):
    """The learner's losses get logits for the K rows that predict generated tokens, [K, V],
    not [B, T, V]: neither a longer prompt's last rows nor padding (0.6 MB a row at 150k)."""
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (30, 6, 12)]
    r = Sampler(llama, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(prompts, max_new_tokens=10, seed=0)
    rows = learner.replay_rows(llama, r, "shadow", return_hidden=True, pack=pack)
    K = int(r.action_mask.sum())
    assert rows.logits.shape == (K, VOCAB) and rows.hidden.shape == (K, llama.config.hidden_size) and K == 30
    assert r.action_mask[rows.b, rows.t].all() and len(set(zip(rows.b.tolist(), rows.t.tolist()))) == K
    logp = learner.gather_logprobs(rows, r)
    assert (logp - r.logprobs)[r.action_mask].abs().max() <= 1e-4 and not logp[~r.action_mask].any()


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_replay_of_a_ragged_batch(llama, monkeypatch, pack):
    """Sequences of a batch end at different lengths. Unpacked, their right padding sees no key
    in the learner's replay (ops.mask_padding; it used to attend over itself, its log entries
    never evicted). Packed, the model runs one row of the sequences end to end without padding,
    and the log keeps each sequence's attention inside it (block-diagonal) and as it was. Either
    way, shadow and dense, each sequence's log-probs are those of its replay alone."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (40, 8, 12)]
    r = Sampler(llama, StreamingLLM(sinks=2), budget=0.5, page_size=4).generate(prompts, max_new_tokens=20, seed=0)
    lens = r.seq_lens
    assert lens.tolist() == [60, 28, 32] and r.tokens.shape[1] == 60
    logs, widths = [], []
    attend = learner.shadow_attention
    monkeypatch.setattr(learner, "shadow_attention", lambda q, k, v, ev, *a: logs.append(ev) or attend(q, k, v, ev, *a))
    hook = llama.get_input_embeddings().register_forward_pre_hook(lambda m, args: widths.append(args[0].shape))
    try:
        for mask in ("shadow", "dense"):
            logs.clear()
            logp = learner.gather_logprobs(learner.replay_logits(llama, r, mask, pack=pack), r)
            assert len(logs) == llama.config.num_hidden_layers
            padded = learner.mask_padding(r.evicted_at, lens) if mask == "shadow" else None
            packing = learner._Packing(r, learner.inputs_per_sequence(r))
            for layer, ev in enumerate(logs):
                seen = shadow_visible(ev, ev.shape[-1], 0)  # [B or rows, Hkv, queries, keys]
                for b, n in enumerate(lens.tolist()):
                    if not pack:
                        assert seen[b, :, : n - 1].any(-1).all() and not seen[b, :, n:].any()
                        continue
                    slots = packing.flat[packing.b == b]  # sequence b's n - 1 inputs, in order
                    row, s0 = divmod(int(slots[0]), packing.cap)
                    assert torch.equal(slots, torch.arange(row * packing.cap + s0, row * packing.cap + s0 + n - 1))
                    own = seen[row, :, s0:s0 + n - 1]  # its queries: they see its keys only
                    assert not own[..., :s0].any() and not own[..., s0 + n - 1:].any()
                    want = (shadow_visible(padded[b:b + 1, layer, :, : n - 1], n - 1, 0)[0] if padded is not None
                            else torch.ones(n - 1, n - 1, dtype=torch.bool).tril().expand_as(own[..., s0:s0 + n - 1]))
                    assert torch.equal(own[..., s0:s0 + n - 1], want)
                if pack:  # padding slots see nothing and are seen by nothing
                    pad = torch.ones(packing.rows * packing.cap, dtype=torch.bool)
                    pad[packing.flat] = False
                    pad = pad.view(packing.rows, packing.cap)
                    assert not seen.any(-1)[pad[:, None].expand(-1, seen.shape[1], -1)].any()
                    assert not seen.any(-2)[pad[:, None].expand(-1, seen.shape[1], -1)].any()
            for b, n in enumerate(lens.tolist()):
                alone = Rollout(r.tokens[b:b + 1, :n], r.prompt_lens[b:b + 1], r.action_mask[b:b + 1, :n],
                                r.logprobs[b:b + 1, :n], r.evicted_at[b:b + 1, ..., :n], 0, 0)
                torch.testing.assert_close(token_logprobs(llama, alone, mask)[0], logp[b, :n], atol=1e-5, rtol=0)
    finally:
        hook.remove()
    rows = learner._Packing(r, learner.inputs_per_sequence(r)).rows if pack else 3
    assert pack is False or rows == 2  # 27 + 31 inputs share a row of 59
    replays = [w for w in widths if w == (rows, r.tokens.shape[1] - 1)]
    assert len(replays) == 2  # the batch's two replays ran packed or padded
    if pack:  # logits and hidden states of every real row as unpacked; 0 past a sequence's end
        monkeypatch.setattr(learner, "shadow_attention", attend)
        (lp, hp), (lu, hu) = (learner.replay_logits(llama, r, "shadow", return_hidden=True, pack=p) for p in (True, False))
        T, R = r.tokens.shape[1], lp.shape[1]
        real = (torch.arange(T - 1 - R, T - 1)[None] < (lens - 1)[:, None])[..., None]  # input position < n_b
        torch.testing.assert_close(lp * real, lu * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hp * real, hu * real, atol=1e-5, rtol=1e-5)
        assert not (lp * ~real).any() and not (hp * ~real).any()


def test_per_layer_budgets_and_mistral_replay(tmp_path):
    model = tiny_model(tmp_path, "mistral", heads=4, kv_heads=2, layers=2)
    sampler = Sampler(model, H2O(), budget=[0.5, 12], page_size=4)
    rollout = sampler.generate(_prompts(2, 10, 30, seed=4), max_new_tokens=60, seed=0)
    live = [int(layer.seq_lens.max()) for layer in sampler.cache.layers]
    assert live[1] <= 12 + 4 < live[0]  # layer 1 holds its absolute budget (+ a page of slack)
    evicted = (rollout.evicted_at < 2**31 - 1).sum(dim=(0, 2, 3))
    assert evicted[1] > evicted[0] > 0
    shadow = token_logprobs(model, rollout, "shadow")
    assert (shadow - rollout.logprobs)[rollout.action_mask].abs().max() <= 1e-4
    with pytest.raises(ValueError, match="layers"):
        Sampler(model, H2O(), budget=[0.5])


def test_chunked_prefill_and_evict_every_replay(llama):
    sampler = Sampler(llama, StreamingLLM(sinks=2), budget=24, page_size=4, prefill_chunk=16, evict_every=5)
    rollout = sampler.generate(_prompts(3, 30, 60, seed=2), max_new_tokens=50, seed=1)
    # prefill evictions happen at chunk boundaries (multiples of 16) and after the prompt
    steps = rollout.evicted_at[rollout.evicted_at < 2**31 - 1].unique()
    assert (steps % 16 == 0).any()
    for b, n in enumerate(rollout.prompt_lens.tolist()):  # then every 5 decode steps only
        ev = rollout.evicted_at[b]
        assert ((ev[(ev >= n) & (ev < 2**31 - 1)] - n) % 5 == 0).all()
    shadow = token_logprobs(llama, rollout, "shadow")
    assert (shadow - rollout.logprobs)[rollout.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("policy", [FullCache(), StreamingLLM(sinks=2), H2O(recent_frac=0.5), SnapKV(window=4, kernel=3)],
                         ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_prefill_batches_the_sequences_at_a_position(policy, family, llama, qwen3):
    """``prefill_chunk`` runs the chunks that start at the same position in one call (each
    chunk after its own survivors, gathered from the cache; a prompt's last chunk may be
    shorter), ``prefill_tokens`` bounding the sequences a call holds: the rollout is the one
    of one sequence per call, and the replay matches it."""
    model = {"llama": llama, "qwen3": qwen3}[family]
    prompts = _prompts(5, 3, 70, seed=7) + [torch.arange(1, 33)]  # 32: exactly two chunks
    calls, rollouts = {}, {}
    for name, limit in (("one", 1), ("default", None), ("all", 10**6)):
        sampler = Sampler(model, policy, budget=0.3, page_size=4, prefill_chunk=16, prefill_tokens=limit)
        rows_run = calls[name] = []
        real = sampler._forward_last
        sampler._forward_last = lambda ids, *a, real=real, rows_run=rows_run: rows_run.append(ids.shape) or real(ids, *a)
        rollouts[name] = sampler.generate(prompts, max_new_tokens=12, seed=3)
        if name == "default":  # num_layers sequences' survivors and chunk
            assert sampler._chunk_rows([len(p) for p in prompts]) == 2
    plens = [len(p) for p in prompts]
    # the chunks at each position, longest first
    at = [sorted((min(n - c0, 16) for n in plens if n > c0), reverse=True) for c0 in range(0, max(plens), 16)]
    assert calls["one"] == [(1, c) for chunks in at for c in chunks]
    assert [n for n, _ in calls["all"]] == [len(rows) for rows in at]
    assert calls["default"] == [(len(chunks[i : i + 2]), chunks[i]) for chunks in at for i in range(0, len(chunks), 2)]
    ref = rollouts["one"]
    for name in ("default", "all"):
        r = rollouts[name]
        assert torch.equal(r.tokens, ref.tokens) and torch.equal(r.evicted_at, ref.evicted_at)
        assert (r.logprobs - ref.logprobs).abs().max() <= 1e-5
    if not isinstance(policy, FullCache):
        assert (ref.evicted_at[:, :, :, :64] < 2**31 - 1).any(), "chunk boundaries must evict"
    r = rollouts["all"]
    shadow = token_logprobs(model, r, "shadow")
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("page_size, every, budget", [(4, 5, 8), (16, 3, 8), (4, 6, 0.3), (1, 1, 6)])
def test_evict_every_is_a_fixed_schedule_after_the_prefill(llama, page_size, every, budget):
    """``evict_every=N`` (Sparse-RL's "every 128 decode steps"): the prefill's eviction, then one
    before every N-th decode step and none in between (not once a page over the budget), so a
    sequence holds up to its budget + N slots, which the cache is sized for; replay is exact."""
    prompts, max_new = _prompts(3, 12, 20, seed=5), 30
    sampler = Sampler(llama, StreamingLLM(sinks=2), budget=budget, page_size=page_size, evict_every=every)
    live = []  # each row's most slots in a layer while the model ran (the query's own key included)
    real = sampler._forward

    def watched(*args):
        out = real(*args)
        live.append([max(layer.lens[b] for layer in sampler.cache.layers) for b in range(len(prompts))])
        return out

    sampler._forward = watched
    r = sampler.generate(prompts, max_new, seed=2)
    assert r.action_mask.sum(-1).tolist() == [max_new] * 3
    for b, n in enumerate(r.prompt_lens.tolist()):
        queries = range(n, n + max_new - 1)  # the last token is never fed back
        ev = r.evicted_at[b]
        logged = set(ev[ev < 2**31 - 1].tolist())
        assert logged <= {q for q in queries if (q - n) % every == 0}, (b, sorted(logged))
        if isinstance(budget, int):  # a fixed budget is exceeded at every scheduled point
            assert logged == {q for q in queries if (q - n) % every == 0}
            assert max(step[b] for step in live) == budget + every
        assert max(step[b] for step in live) <= sampler._max_live(n + max_new, n)
    shadow = token_logprobs(llama, r, "shadow")
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3)],
                         ids=lambda p: type(p).__name__)
def test_batched_prefill_matches_one_prompt_at_a_time(llama, policy):
    """Whole right-padded prompts per model call (layers evicted as their attention ends) give
    the same rollout as one prompt per call, and never a higher KV peak at the default size."""
    prompts = _prompts(5, 9, 40, seed=6)
    kw = dict(budget=0.25, page_size=4)
    one = Sampler(llama, policy, prefill_tokens=1, **kw)
    assert [len(g) for g in one._prefill_groups([len(p) for p in prompts])] == [1] * 5
    batched = Sampler(llama, policy, **kw)  # default: num_layers x the longest prompt per call
    everything = Sampler(llama, policy, prefill_tokens=10_000, **kw)
    a, b, c = (s.generate(prompts, 30, temperature=0.0) for s in (one, batched, everything))
    for r in (b, c):
        assert torch.equal(r.tokens, a.tokens) and torch.equal(r.evicted_at, a.evicted_at)
        torch.testing.assert_close(r.logprobs, a.logprobs, atol=1e-5, rtol=0)
    assert b.kv_peak_bytes <= a.kv_peak_bytes
    shadow = token_logprobs(llama, c, "shadow")
    assert (shadow - c.logprobs)[c.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3)],
                         ids=lambda p: type(p).__name__)
def test_repeated_prompts_are_prefilled_once(llama, policy):
    """GRPO groups: each distinct prompt runs through the model once and its repeats get a copy
    of its cache; the rollout equals prefilling every repeat itself, at no higher KV peak."""
    prompts = [p for p in _prompts(3, 9, 30, seed=7) for _ in range(4)]
    kw = dict(budget=0.25, page_size=4)
    shared = Sampler(llama, policy, **kw)
    prompts_run = []
    real = shared._forward_last
    shared._forward_last = lambda ids, pos, ctx, *a: prompts_run.append(len(ctx.lengths)) or real(ids, pos, ctx, *a)
    a = shared.generate(prompts, 20, temperature=0.0)
    assert sum(prompts_run) == 3
    b = Sampler(llama, policy, share_prompts=False, **kw).generate(prompts, 20, temperature=0.0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.evicted_at, b.evicted_at)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    one = Sampler(llama, policy, share_prompts=False, prefill_tokens=1, **kw).generate(prompts, 20, temperature=0.0)
    # deterministic policies: the prompt is evicted once and only its survivors are copied
    assert policy.deterministic and a.kv_peak_bytes <= min(b.kv_peak_bytes, one.kv_peak_bytes)


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3), RandomEvict(seed=6)],
                         ids=lambda p: type(p).__name__)
def test_chunked_prefill_runs_a_repeated_prompt_once(llama, policy):
    """With ``prefill_chunk`` and a deterministic policy, a GRPO group's prompt runs its chunks
    once and its repeats get a copy of what survived the last one: the rollout equals every
    repeat's own chunked prefill. A stochastic policy chooses at every boundary per sequence, so
    every sequence runs."""
    prompts = [p for p in _prompts(3, 9, 40, seed=8) for _ in range(3)]
    kw = dict(budget=0.25, page_size=4, prefill_chunk=8)
    shared = Sampler(llama, policy, **kw)
    rows_run = set()
    real = shared._forward_last
    shared._forward_last = lambda ids, pos, ctx, *a: rows_run.update(ctx.rows) or real(ids, pos, ctx, *a)
    a = shared.generate(prompts, 20, seed=4)
    assert rows_run == ({0, 3, 6} if policy.deterministic else set(range(9)))
    b = Sampler(llama, policy, share_prompts=False, **kw).generate(prompts, 20, seed=4)
    if policy.deterministic:  # RandomEvict's draws depend on which sequences it evicts together
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.evicted_at, b.evicted_at)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert a.kv_peak_bytes <= b.kv_peak_bytes
    shadow = token_logprobs(llama, a, "shadow")
    assert (shadow - a.logprobs)[a.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3), RandomEvict(seed=6)],
                         ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_packed_prefill_matches_the_right_padded_one(llama, policy, share):
    """Prompts of different lengths run packed end to end in fewer rows (positions restarting
    per prompt, the log keeping each to its own keys) and give the right-padded prefill's
    rollout: same tokens and evictions, log-probs up to float rounding; and it replays."""
    prompts = [p for p in _prompts(6, 3, 40, seed=12) for _ in range(2)]  # repeats get copies
    kw = dict(budget=0.25, page_size=4, prefill_tokens=10_000, share_prompts=share)  # one call
    packed = Sampler(llama, policy, **kw)
    calls = []
    real = packed._forward_last
    packed._forward_last = lambda ids, pos, ctx, *a: calls.append((ids.shape[0], len(ctx.lengths))) or real(
        ids, pos, ctx, *a)
    a = packed.generate(prompts, 20, temperature=1.0, seed=5)
    assert calls[0][0] < calls[0][1] == (6 if share else 12), calls  # fewer rows than prompts
    b = Sampler(llama, policy, pack_prompts=False, **kw).generate(prompts, 20, temperature=1.0, seed=5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.evicted_at, b.evicted_at)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert a.kv_peak_bytes == b.kv_peak_bytes  # the cache holds the same prompts either way
    shadow = token_logprobs(llama, a, "shadow")
    assert (shadow - a.logprobs)[a.action_mask].abs().max() <= 1e-4


@pytest.mark.parametrize("policy", [H2O(), RandomEvict(seed=1)], ids=lambda p: type(p).__name__)
def test_packed_prefill_stays_within_prefill_tokens(llama, policy, monkeypatch):
    """Short prompts filling a long one's row: the model's rows and every copy the cache gets
    (keys right-padded per chunk of prompts) stay within prefill_tokens; padding all of them to
    the long prompt would have been 17 x 64 slots."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in [64] + [4] * 20]
    prompts += prompts[1:3]  # repeats: copies of whole prompts beside the call's own (stochastic)
    s = Sampler(llama, policy, budget=0.5, page_size=4, prefill_tokens=128)
    slots, rows_run = [], []
    real_append, real_last = PagedKVCache.append, s._forward_last
    monkeypatch.setattr(PagedKVCache, "append", lambda self, layer, k, *a, **kw: slots.append(k.shape[0] * k.shape[2])
                        or real_append(self, layer, k, *a, **kw))
    s._forward_last = lambda ids, *a: rows_run.append(ids.numel()) or real_last(ids, *a)
    r = s.generate(prompts, 6, seed=0)
    assert max(rows_run) <= 128 and max(slots) <= 128, (rows_run, slots)  # decode appends B x 1
    assert rows_run[0] == 128  # the long prompt's row and one of 16 short prompts
    shadow = token_logprobs(llama, r, "shadow")
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


def test_repeats_sample_on_their_own_and_replay(llama):
    prompts = [p for p in _prompts(2, 12, 20, seed=8) for _ in range(3)]
    assert not RandomEvict.deterministic  # each copy holds the whole prompt and evicts on its own
    r = Sampler(llama, RandomEvict(seed=2), budget=0.25, page_size=4).generate(prompts, 40, seed=3)
    gen = [tuple(r.tokens[b][r.action_mask[b]].tolist()) for b in range(6)]
    assert len(set(gen[:3])) > 1 and len(set(gen[3:])) > 1  # temperature 1: the repeats differ
    assert not torch.equal(r.evicted_at[0], r.evicted_at[1])  # and evict their own random slots
    shadow = token_logprobs(llama, r, "shadow")
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


def test_sampled_rollouts_do_not_depend_on_prefill_grouping(llama):
    """Same seed, same draws, however the prompts were grouped or shared (first tokens are
    drawn once, in row order, after the prefill)."""
    base = _prompts(3, 8, 20, seed=9)
    prompts = base * 3  # repeats interleaved, not adjacent
    kw = dict(budget=0.25, page_size=4)
    runs = [Sampler(llama, StreamingLLM(), **kw, **extra).generate(prompts, 16, temperature=1.5, seed=11)
            for extra in ({}, dict(share_prompts=False), dict(share_prompts=False, prefill_tokens=1),
                          dict(prefill_tokens=10_000))]
    for r in runs[1:]:
        assert torch.equal(r.tokens, runs[0].tokens)
        torch.testing.assert_close(r.logprobs, runs[0].logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=2), H2O(), SnapKV(window=4, kernel=3), RandomEvict(seed=6)],
                         ids=lambda p: type(p).__name__)
def test_fill_compaction_evicts_what_the_stable_one_does(llama, policy, monkeypatch):
    """The cache's default compaction (``stable_evict=False``) scatters survivors out of
    position order; the policies decide by position, so a rollout logs the same evictions and
    samples the same tokens as with the order-keeping compaction (log-probs equal up to the
    summation order of decode attention)."""
    prompts = _prompts(3, 10, 30, seed=4)
    kw = dict(budget=0.3, page_size=4, evict_every=3)
    fill = Sampler(llama, policy, **kw).generate(prompts, 24, temperature=1.0, seed=5)
    new_cache = Sampler._new_cache

    def stable_cache(self, *args):
        cache = new_cache(self, *args)
        cache.stable_evict = True
        return cache

    monkeypatch.setattr(Sampler, "_new_cache", stable_cache)
    stable = Sampler(llama, policy, **kw).generate(prompts, 24, temperature=1.0, seed=5)
    assert torch.equal(fill.tokens, stable.tokens)
    assert torch.equal(fill.evicted_at, stable.evicted_at)
    torch.testing.assert_close(fill.logprobs, stable.logprobs, atol=1e-5, rtol=0)


def test_prefill_groups_respect_the_limit_in_whole_pages(llama):
    s = Sampler(llama, StreamingLLM(), budget=8, page_size=4, prefill_tokens=40, pack_prompts=False)
    # 10 tokens take 3 pages (12): three such prompts fit 40, a fourth does not
    assert s._prefill_groups([10, 10, 10, 10, 30, 50, 5]) == [[0, 1, 2], [3], [4], [5], [6]]
    assert s._prefill_groups([5, 20, 5]) == [[0, 1], [2]]
    assert s._prefill_groups([5, 5, 5], rows=[5, 1, 1]) == [[0], [1, 2]]  # repeats count
    # Default: the longest prompt's pages in every layer. Many short prompts of a partly filled
    # page each may not hold more pages than that: 160 tokens = 10 pages of 16, x 2 layers = 20
    # pages, i.e. 10 prompts of 17 tokens (2 pages each) per call, not 18.
    d = Sampler(llama, StreamingLLM(), budget=8, page_size=16, pack_prompts=False)
    assert [len(g) for g in d._prefill_groups([160] + [17] * 18)] == [2, 10, 7]
    # Packed: longest first; a call's packed rows x its longest and its prompts' own pages stay
    # within the limit. 50 goes alone; 30 + 10 would take 2 rows of 32; 3 x 12 = 36 fits, a
    # fourth 10 does not; the last 10 and 5 take 2 rows of 12 and 12 + 8 pages.
    p = Sampler(llama, StreamingLLM(), budget=8, page_size=4, prefill_tokens=40)
    assert p._prefill_groups([10, 10, 10, 10, 30, 50, 5]) == [[5], [4], [0, 1, 2], [3, 6]]
    assert p._prefill_groups([5, 5, 5], rows=[5, 1, 1]) == [[0], [1, 2]]  # repeats count
    assert p._prefill_groups([8, 3, 4, 5]) == [[0, 1, 2, 3]]  # 8 | 5 3 | 4: 3 rows of 8, 8 + 4 + 4 + 8 pages
    # The limit of 20 pages: 160 and five 17s (10 + 5 x 2 pages, in two rows of 160), then ten
    # 17s (ten rows of 17: 2 pages each), then the last three.
    d = Sampler(llama, StreamingLLM(), budget=8, page_size=16)
    assert [len(g) for g in d._prefill_groups([160] + [17] * 18)] == [6, 10, 3]
    with pytest.raises(ValueError, match="prefill_tokens"):
        Sampler(llama, StreamingLLM(), budget=8, prefill_tokens=0)


def test_eos_stops_sequences(llama):
    prompts = _prompts(4, 5, 9, seed=5)
    r = Sampler(llama, StreamingLLM(), budget=8, page_size=4).generate(prompts, 60, seed=0, eos_token_id=7)
    for b in range(4):
        gen = r.tokens[b][r.action_mask[b]]
        if (gen == 7).any():  # nothing after the first EOS
            assert int((gen == 7).nonzero()[0]) == gen.numel() - 1


def test_a_list_of_eos_ids_stops_sequences_at_any_of_them(llama):
    """generation_config.eos_token_id is a list for many models; compared with the tokens it was
    the Python value False, so no sequence ever ended."""
    prompts = _prompts(4, 5, 9, seed=5)
    free = Sampler(llama, StreamingLLM(), budget=8, page_size=4).generate(prompts, 40, seed=0)
    gen = [free.tokens[b][free.action_mask[b]].tolist() for b in range(4)]
    eos = [gen[0][3], gen[1][5]]  # ids that turn up early in rows 0 and 1
    r = Sampler(llama, StreamingLLM(), budget=8, page_size=4).generate(prompts, 40, seed=0, eos_token_id=eos)
    for b in range(4):
        first = next((i for i, t in enumerate(gen[b]) if t in eos), None)
        want = gen[b] if first is None else gen[b][: first + 1]  # the same draws up to the first EOS
        assert r.tokens[b][r.action_mask[b]].tolist() == want
    assert int(r.action_mask[0].sum()) <= 4 and int(r.action_mask[1].sum()) <= 6
    one = Sampler(llama, StreamingLLM(), budget=8, page_size=4).generate(prompts, 40, seed=0, eos_token_id=[eos[0]])
    for same in (eos[0], torch.tensor(eos[0]), torch.tensor([eos[0]]), np.array([eos[0]])):  # int, tensors, array
        assert torch.equal(one.tokens, Sampler(llama, StreamingLLM(), budget=8, page_size=4).generate(
            prompts, 40, seed=0, eos_token_id=same).tokens)


def test_kv_peak_within_budget(tmp_path):
    model = tiny_model(tmp_path, "llama", hidden=128, heads=2, kv_heads=2, layers=2, head_dim=64)
    sampler = Sampler(model, StreamingLLM(), budget=0.25, page_size=16)
    r = sampler.generate(_prompts(2, 16, 16), max_new_tokens=1024, seed=0)
    log_bytes = r.evicted_at.numel() * 4
    ratio = r.kv_peak_bytes / r.dense_kv_bytes
    print(f"kv_peak/dense = {ratio:.3f}, log/dense = {log_bytes / r.dense_kv_bytes:.4f}")
    assert r.seq_lens.min() >= 1024
    assert ratio <= 0.30
    assert log_bytes < 0.01 * r.dense_kv_bytes


def test_slot_scores_exist_for_score_policies_only_and_are_budget_wide(llama):
    """They were float32 [B, Hkv, T] per layer for every policy, about the eviction log's size
    again, and left out of kv_peak_bytes."""
    prompts = _prompts(2, 8, 8)
    s = Sampler(llama, StreamingLLM(), budget=8, page_size=4)
    plain = s.generate(prompts, 200, seed=0)
    assert all(t is None for t in s.slot_scores)
    assert plain.kv_peak_bytes == s.cache.peak_bytes() + plain.evicted_at.numel() * 4
    s = Sampler(llama, H2O(), budget=8, page_size=4)
    scored = s.generate(prompts, 200, seed=0)
    B, _, H, T = scored.evicted_at.shape
    width = s.slot_scores[0].shape[-1]
    assert width <= 8 + 2 * 4 + 4 < T  # the budget, a page of slack and a page: not the rollout's length
    assert scored.kv_peak_bytes == s.cache.peak_bytes() + scored.evicted_at.numel() * 4 + len(s.slot_scores) * B * H * width * 4


def test_pool_exhaustion_raises_cache_full_before_writing():
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=2, page_size=4, max_batch=2)
    k = torch.randn(2, 1, 8, 4)
    pos = torch.arange(8, dtype=torch.int32).expand(2, 8).contiguous()
    before = cache.layers[0].block_tables.clone()
    with pytest.raises(CacheFullError):
        cache.append(0, k, k, pos, torch.tensor([8, 8], dtype=torch.int32))
    assert torch.equal(cache.layers[0].block_tables, before)
    assert int(cache.layers[0].seq_lens.sum()) == 0 and cache.num_free_pages() == 2


def test_bad_block_table_raises():
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=2, page_size=4, max_batch=1)
    lc = cache.layers[0]
    lc.block_tables[0, 0] = 7  # outside the pool
    lc.free.remove(0) if 0 in lc.free else None
    with pytest.raises((ValueError, RuntimeError), match="block_tables"):
        torch.ops.shadowkv.append_kv(lc.k_pages, lc.v_pages, lc.pos_pages, lc.block_tables, lc.seq_lens,
                                     torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                     torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2], dtype=torch.int32))


class _BadPolicy(Policy):
    def select(self, positions, scores, n_keep):
        keep = torch.zeros(positions.shape, dtype=torch.bool)
        keep[:, :1] = True  # fewer than n_keep
        return keep


class _HeadsDisagree(Policy):
    """n_keep slots in head 0, one fewer in the others."""

    def select(self, positions, scores, n_keep):
        keep = torch.zeros(positions.shape, dtype=torch.bool)
        keep[:, :n_keep] = True
        keep[1:, n_keep - 1] = False
        return keep


@pytest.mark.parametrize("policy", [_BadPolicy(), _HeadsDisagree()], ids=["same_wrong_count", "heads_disagree"])
def test_policy_with_wrong_count_raises(llama, policy):
    """Checked on what the op did (no extra synchronisation): either way the error names the
    policy and the counts, and (checked CPU ops) the cache's books still match the device."""
    assert llama.config.num_key_value_heads > 1
    sampler = Sampler(llama, policy, budget=8, page_size=4)
    with pytest.raises(RuntimeError, match="kept .* slots per head, expected"):
        sampler.generate(_prompts(1, 20, 20), 4, seed=0)
    sampler.cache.verify()


def test_draws_are_torch_multinomials_without_its_host_checks(llama):
    """_sample draws what torch.multinomial(probs, 1) draws from the same generator (its
    one-sample path, minus the two checks it reads back to the host every decode step); NaN
    logits, which multinomial refused, are refused at the end of generate()."""
    import copy

    logits = 3 * torch.randn(6, 500, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in ((0, 1.0), (20, 1.0), (0, 0.9), (50, 0.8)):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        tok, _ = Sampler._sample(logits, 0.7, top_p, g1, top_k)
        probs = torch.softmax(logits / 0.7, -1)
        if top_k:
            probs = probs.masked_fill(probs < probs.topk(top_k, -1).values[:, -1:], 0.0)
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            mass = sp.cumsum(-1) - sp
            mass = mass / sp.sum(-1, keepdim=True) if top_k else mass
            probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(mass >= top_p, 0.0))
        assert torch.equal(tok, torch.multinomial(probs, 1, generator=g2)[:, 0])
    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="the model gave NaN logits while sampling"):
        Sampler(broken, StreamingLLM(sinks=4), budget=0.5).generate(_prompts(2, 6, 9), 4, seed=0)


def test_bad_generate_arguments(llama):
    s = Sampler(llama, StreamingLLM(), budget=0.5, max_batch=2)
    with pytest.raises(ValueError, match="batch"):
        s.generate(_prompts(3, 4, 4), 4)
    with pytest.raises(ValueError, match="temperature"):
        s.generate(_prompts(1, 4, 4), 4, temperature=-1.0)
    with pytest.raises(ValueError, match="budget"):
        Sampler(llama, StreamingLLM(), budget=1.5)
    with pytest.raises(ValueError, match="temperature"):
        s.generate(_prompts(1, 4, 4), 4, temperature=float("nan"))
    with pytest.raises(ValueError, match=re.escape(f"prompts[1] holds token id {VOCAB}, outside the model's "
                                                   f"vocabulary [0, {VOCAB})")):
        s.generate([[1, 2], [3, VOCAB]], 4)
    with pytest.raises(ValueError, match="seed"):
        s.generate(_prompts(1, 4, 4), 4, seed=2**64)
    with pytest.raises(ValueError, match="page_size"):
        Sampler(llama, StreamingLLM(), budget=0.5, page_size=0)
    with pytest.raises(ValueError, match=r"budget\[0\] is None"):
        Sampler(llama, StreamingLLM(), budget=[None, 4])


@pytest.mark.parametrize("call, err, message", [
    (lambda m, p: Sampler(m, "h2o", budget=4), TypeError, r"policy must be a shadowkv.policies.Policy \(FullCache, "),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4, prefill_chunk=2.5), TypeError, "prefill_chunk must be an int"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4, evict_every=2.5), TypeError, "evict_every must be an int"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4, evict_every=0), ValueError, "evict_every must be an int >= 1"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4, prefill_tokens=2.5), TypeError, "prefill_tokens must be"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4, page_size=True), TypeError, "page_size must be"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 2.5), TypeError, "max_new_tokens must be"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 0), ValueError, "max_new_tokens must be"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate([torch.tensor([1.7, 2.2])], 3), TypeError,
     r"prompts\[0\] must hold integer token ids, got dtype torch.float32"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, pad_token_id=None), TypeError,
     "pad_token_id must be an int, got None"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, pad_token_id=-1), ValueError,
     re.escape(f"pad_token_id must be a token id in [0, {VOCAB})")),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, pad_token_id=VOCAB), ValueError,
     re.escape(f"pad_token_id must be a token id in [0, {VOCAB})")),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, seed=-1), ValueError, "seed must be"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, eos_token_id=-1), ValueError,
     re.escape(f"eos_token_id must be a token id in [0, {VOCAB})")),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, eos_token_id=[2, VOCAB]), ValueError,
     "eos_token_id must be a token id"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, eos_token_id=[]), ValueError,
     "non-empty list"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, eos_token_id=2.0), TypeError,
     "eos_token_id must be an int"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, top_p=None), TypeError,
     "top_p must be a number, got NoneType"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, temperature=1e-300), ValueError,
     r"temperature 1e-300 is 0 in float32"),  # the logits' division by it gave NaN
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, temperature="1"), TypeError,
     "temperature must be a number, got str"),
    (lambda m, p: Sampler(m, StreamingLLM(), budget=4).generate(p, 3, seed=1.5), TypeError, "seed must be"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_sampler_settings_name_the_argument(llama, call, err, message):
    """Instead of an AttributeError, a float silently truncated or an IndexError deep in the
    model (the pad id fills ragged prompts, which the prefill and the replay feed the model)."""
    with pytest.raises(err, match=message):
        call(llama, _prompts(2, 6, 9, seed=1))


def test_models_the_sampler_cannot_drive_are_refused(llama):
    """Bloom keeps its own attention when asked for shadowkv's (transformers only warns): decode
    steps attended to nothing but themselves and nothing was logged. A base model has no LM
    head for the sampler to apply."""
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(NotImplementedError, match="BloomForCausalLM does not run its attention through transformers'"):
        Sampler(bloom, StreamingLLM(sinks=1), budget=4)
    with pytest.raises(TypeError, match="needs a causal LM with an output embedding .* got LlamaModel"):
        Sampler(llama.model)


def test_numpy_integers_are_accepted_where_ints_are(llama):
    prompts = _prompts(2, 6, 9, seed=1)
    a = Sampler(llama, StreamingLLM(), budget=4).generate(prompts, 3, seed=3, pad_token_id=0)
    b = Sampler(llama, StreamingLLM(), budget=np.int64(4), page_size=np.int64(16), evict_every=np.int32(2)).generate(
        [p.numpy() for p in prompts], np.int64(3), seed=np.int64(3), pad_token_id=np.int64(0))
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45])
def test_a_tiny_temperature_samples_the_greedy_token(llama, temperature):
    """logits / 1e-45 overflows; the sampler shifts first, so it is greedy decoding, not NaN,
    and the learner's replay computes the same way (it gave NaN)."""
    prompts = _prompts(2, 6, 6)
    tiny = Sampler(llama, StreamingLLM(), budget=0.5).generate(prompts, 5, temperature=temperature, seed=0)
    greedy = Sampler(llama, StreamingLLM(), budget=0.5).generate(prompts, 5, temperature=0.0)
    assert torch.equal(tiny.tokens, greedy.tokens)
    assert not tiny.logprobs.isnan().any()
    replayed = token_logprobs(llama, tiny, "shadow", temperature=temperature)
    assert not replayed.isnan().any()
    assert (replayed - tiny.logprobs)[tiny.action_mask].abs().max() <= 1e-4


def test_top_p_logprobs_are_the_policy_logprobs_and_replay(llama):
    """With top_p < 1 tokens come from the nucleus, and Rollout.logprobs are log-probs under the
    full softmax(logits / T) (README, design notes): what the learner's replay computes."""
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]]).expand(200, 4)
    tok, lp = Sampler._sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0, 1}  # the smallest prefix reaching 0.7: probabilities 0.56 + 0.34
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])
    r = Sampler(llama, StreamingLLM(sinks=2), budget=8, page_size=4).generate(_prompts(2, 10, 16), 20,
                                                                              temperature=0.8, top_p=0.7, seed=4)
    shadow = token_logprobs(llama, r, "shadow", temperature=0.8)
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4


def test_top_k_draws_among_the_k_most_likely_and_logprobs_are_the_policys(llama):
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, 1.0]]).expand(400, 5)
    lp_all = torch.log_softmax(logits, -1)
    tok, lp = Sampler._sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=3)
    assert set(tok.tolist()) == {0, 1, 4}
    torch.testing.assert_close(lp, lp_all.gather(-1, tok[:, None])[:, 0])
    # then the nucleus of the renormalised top 3 (0.46, 0.28, 0.17 of the whole; 0.51, 0.31, 0.19
    # of the three): 0.51 + 0.31 reach 0.8, where 0.46 + 0.28 of the whole softmax would not
    tok, _ = Sampler._sample(logits, 1.0, 0.8, torch.Generator().manual_seed(0), top_k=3)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = Sampler._sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=1)
    assert set(tok.tolist()) == {0}
    # as transformers' TopKLogitsWarper and vLLM: every token tied with the k-th stays
    ties = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]).expand(400, 5)
    tok, _ = Sampler._sample(ties, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=2)
    assert set(tok.tolist()) == {1, 2, 3}
    # and the nucleus stops once it holds top_p: two tied tokens of 0.5 each, top_p 0.5 -> one
    tok, _ = Sampler._sample(torch.tensor([[3.0, 3.0, 1.0, 0.0]]).expand(400, 4), 1.0, 0.5,
                             torch.Generator().manual_seed(0), top_k=2)
    assert len(set(tok.tolist())) == 1 and set(tok.tolist()) <= {0, 1}
    tok, _ = Sampler._sample(torch.tensor([[0.5, 0.25, 0.25]]).log().expand(400, 3), 1.0, 0.5,
                             torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0}
    prompts = _prompts(2, 6, 6)
    s = Sampler(llama, StreamingLLM(sinks=2), budget=8, page_size=4)
    assert torch.equal(s.generate(prompts, 8, seed=3, top_k=1).tokens, s.generate(prompts, 8, temperature=0.0).tokens)
    r = s.generate(prompts, 12, temperature=0.9, top_k=5, seed=4)
    shadow = token_logprobs(llama, r, "shadow", temperature=0.9)
    assert (shadow - r.logprobs)[r.action_mask].abs().max() <= 1e-4
    for k, err in ((-1, ValueError), (2.5, TypeError)):
        with pytest.raises(err, match="top_k must be an int >= 0"):
            s.generate(prompts, 2, top_k=k)


def test_same_seed_same_rollout_for_stochastic_policy(llama):
    sampler = Sampler(llama, RandomEvict(seed=5), budget=0.3, page_size=4)
    a = sampler.generate(_prompts(2, 10, 20, seed=6), 30, seed=11)
    b = sampler.generate(_prompts(2, 10, 20, seed=6), 30, seed=11)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.evicted_at, b.evicted_at)


def test_a_policy_that_implies_a_budget_is_the_same_as_the_budget(llama):
    prompts = _prompts(2, 6, 14, seed=3)
    for implied, plain in ((StreamingLLM(2, 6), StreamingLLM(sinks=2)), (H2O(heavy=4, recent=4), H2O())):
        a = Sampler(llama, implied, page_size=4).generate(prompts, 12, seed=0)
        b = Sampler(llama, plain, budget=8, page_size=4).generate(prompts, 12, seed=0)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.evicted_at, b.evicted_at)
        assert (a.evicted_at < NEVER_EVICTED).any()
        Sampler(llama, implied, budget=8)  # the same budget twice is fine
        with pytest.raises(ValueError, match="keeps 8 tokens .its arguments' sum., and budget=4 says otherwise"):
            Sampler(llama, implied, budget=4)


def test_policy_and_budget_argument_checks():
    from shadowkv.cli import _budget

    with pytest.raises(ValueError, match="odd"):
        SnapKV(window=8, kernel=4)
    assert _budget("64") == 64 and isinstance(_budget("64"), int) and _budget("0.25") == 0.25
    for bad in ("0", "1.5", "-3"):
        with pytest.raises(Exception, match="budget"):
            _budget(bad)


def test_attention_features_shadowkv_does_not_implement_are_refused(tmp_path):
    """Logit soft-capping (Gemma 2's default) and attention dropout (a model in training mode
    with attention_dropout > 0) change the attention: refused, not silently dropped."""
    gemma = tiny_model(tmp_path / "gemma2", "gemma2")
    assert gemma.config.attn_logit_softcapping is not None and gemma.config.final_logit_softcapping is not None
    # The causal-LM forward soft-caps the logits after the output embedding; the sampler's
    # prefill logits come from the output embedding alone: refused when it is built.
    with pytest.raises(NotImplementedError, match="final logit soft-capping .final_logit_softcapping=30.0"):
        Sampler(gemma, StreamingLLM(), budget=8)
    gemma.config.final_logit_softcapping = None
    with pytest.raises(NotImplementedError, match="attention logit soft-capping"):
        Sampler(gemma, StreamingLLM(), budget=8).generate(_prompts(1, 10, 10), 4)
    model = tiny_model(tmp_path / "llama", "llama")
    rollout = Sampler(model, StreamingLLM(), budget=8).generate(_prompts(1, 10, 10), 4)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    token_logprobs(model, rollout)  # eval mode: no dropout
    with pytest.raises(NotImplementedError, match="dropout"):
        token_logprobs(model.train(), rollout)
    for name, value in (("logit_scale", 0.0625), ("logits_scaling", 8.0)):  # Cohere, Granite
        setattr(model.config, name, value)
        with pytest.raises(NotImplementedError, match=f"{name}={value}"):
            Sampler(model, StreamingLLM(), budget=8)
        setattr(model.config, name, 1.0)  # neutral
        Sampler(model, StreamingLLM(), budget=8)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 16}], ids=lambda r: r["rope_type"])
def test_rope_that_depends_on_the_call_is_refused(tmp_path, rope):
    """Dynamic NTK rescales the frequencies from each call's longest position: past the original
    context, the step-by-step sampler and the whole-sequence replay differed by up to 3.6 in
    log-prob with FullCache, and nothing said so."""
    model = tiny_model(tmp_path / "m", "llama", hidden=32, heads=2, kv_heads=1, rope_parameters=rope)
    with pytest.raises(NotImplementedError, match=f"'{rope['rope_type']}' rope_type"):
        Sampler(model, FullCache())
    fixed = tiny_model(tmp_path / "linear", "llama", hidden=32, heads=2, kv_heads=1,
                       rope_parameters={"rope_type": "linear", "factor": 2.0})
    Sampler(fixed, FullCache())  # a fixed rescaling is the same in every call


def test_generate_under_autocast_caches_in_the_autocast_dtype(tmp_path):
    """The cache took the parameters' dtype while the attention, under autocast, handed it bf16
    keys: generate() failed with a dtype error. A forward wrapped in autocast (accelerate's
    mixed precision) with generate() outside autocast would prefill in float32 and decode in
    bf16: refused with a message that says what to do."""
    import types

    model = tiny_model(tmp_path / "m", "llama", hidden=32, heads=2, kv_heads=1)
    prompts = _prompts(3, 5, 13, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = Sampler(model, StreamingLLM(sinks=1), budget=6, page_size=4).generate(prompts, 10, seed=0)
        replay = token_logprobs(model, rollout)
        full = Sampler(model, page_size=4).generate(prompts, 10, seed=0)
    assert torch.equal(replay[rollout.action_mask], rollout.logprobs[rollout.action_mask])
    # Dense bytes in the cache's bf16 (the float32 parameters' size halved the ratio to ~0.5).
    assert 0.8 < full.kv_peak_bytes / full.dense_kv_bytes < 1.6
    original = model.forward
    model._original_forward = original  # what accelerate's prepare() leaves
    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    with pytest.raises(RuntimeError, match="call generate.. inside the same torch.autocast"):
        Sampler(model, StreamingLLM(sinks=1), budget=6, page_size=4).generate(prompts, 10, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = Sampler(model, StreamingLLM(sinks=1), budget=6, page_size=4).generate(prompts, 10, seed=0)
    assert torch.equal(again.tokens, rollout.tokens)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma3"])
def test_gradient_checkpointing_recomputes_with_the_shadow_mask(tmp_path, family):
    """The mask reached the attention through a context variable only, which is gone when
    backward() recomputes a checkpointed layer: the recompute attended densely, so the values
    were right and the gradients wrong (use_reentrant=True), or torch saw a different graph
    (the default). The replay now also hands the mask over as a layer kwarg."""
    import copy

    extra = dict(sliding_window=6) if family in ("mistral", "gemma3") else {}
    model = tiny_model(tmp_path / family, family, hidden=32, heads=4, kv_heads=2, **extra)
    rollout = Sampler(model, StreamingLLM(sinks=1), budget=6, page_size=4).generate(_prompts(3, 4, 14), 12, seed=1)

    def grads(m):
        m.train().zero_grad()
        lp = token_logprobs(m, rollout)
        lp[rollout.action_mask].sum().backward()
        return lp.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    lp, want = grads(model)
    assert (lp - rollout.logprobs)[rollout.action_mask].abs().max() < 1e-4
    for reentrant in (False, True):
        m = copy.deepcopy(model)
        if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.x's name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        lp_ckpt, got = grads(m)
        assert torch.equal(lp_ckpt, lp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_checkpointed_model_whose_layers_drop_the_kwarg_is_refused():
    from shadowkv.attention import _shadowkv_attention_forward, attention_context

    class Ctx:
        needs_kwarg = True

    q = torch.zeros(1, 2, 3, 4)
    with attention_context(Ctx()), pytest.raises(NotImplementedError, match="gradient checkpointing"):
        _shadowkv_attention_forward(torch.nn.Module(), q, q, q, None)


@pytest.mark.parametrize("policy, budget", [(FullCache(), None), (StreamingLLM(), 8)], ids=["full", "streaming"])
def test_an_ended_sequence_gives_its_pages_back_and_stops_evicting(llama, policy, budget):
    """Once the host sees a sequence's EOS, its pages go back to the pool and it is neither
    appended to nor evicted again: the peak no longer holds it at max_new_tokens, its log stops
    at its end, and the others still replay exactly."""
    prompts = _prompts(2, 6, 6, seed=3)
    sampler = Sampler(llama, policy, budget, page_size=2)
    free = sampler.generate(prompts, 30, temperature=0.0)
    gen0 = free.tokens[0][free.action_mask[0]].tolist()
    eos = next((t for t in gen0[1:6] if t not in free.tokens[1][free.action_mask[1]].tolist()), None)
    if eos is None:
        pytest.skip("no token ends sequence 0 early without ending sequence 1 (random model)")
    r = sampler.generate(prompts, 30, temperature=0.0, eos_token_id=eos)
    end0 = int(r.seq_lens[0])
    assert end0 < int(r.seq_lens[1]) == 6 + 30 and r.tokens[0, end0 - 1] == eos
    assert r.kv_peak_bytes < free.kv_peak_bytes
    logged = r.evicted_at[0][r.evicted_at[0] != NEVER_EVICTED]
    assert (logged <= end0).all()  # nothing logged past its end
    assert sampler.cache.layers[0].pages[0] == []
    logp = token_logprobs(llama, r)
    torch.testing.assert_close(logp * r.action_mask, r.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy, budget", [(H2O(), 10), (StreamingLLM(), 8), (FullCache(), None)],
                         ids=["h2o", "streaming", "full"])
def test_ended_sequences_leave_the_decode_batch(llama, policy, budget):
    """Once a sequence ends, the decode steps run the others' rows only: the model sees fewer
    rows, and the others' tokens, log-probs and eviction logs (H2O's scores summed into the
    right rows) are those of a rollout where nothing ended (ended rows still draw, so the
    random stream of the others does not move; the numbers differ by the rounding of a smaller
    batch only)."""
    prompts = _prompts(3, 5, 9, seed=11)
    sampler = Sampler(llama, policy, budget, page_size=2)
    free = sampler.generate(prompts, 24, seed=4)
    gens = [free.tokens[b][free.action_mask[b]].tolist() for b in range(3)]
    pick = next(((s, t) for s in range(3) for t in gens[s][1:8]
                 if all(t not in gens[o] for o in range(3) if o != s)), None)
    if pick is None:
        pytest.skip("no token ends one sequence early without ending another (random model)")
    s, eos = pick
    widths = []
    hook = llama.get_input_embeddings().register_forward_pre_hook(lambda m, args: widths.append(args[0].shape))
    try:
        r = sampler.generate(prompts, 24, seed=4, eos_token_id=eos)
    finally:
        hook.remove()
    end = int(r.seq_lens[s])
    assert end - len(prompts[s]) == gens[s].index(eos) + 1 < 24
    decode = [w[0] for w in widths if w[1] == 1]  # rows of each decode step (the prompts are longer)
    assert len(decode) == 23 and decode.count(2) == 23 - gens[s].index(eos) and decode.count(3) == gens[s].index(eos)
    for o in set(range(3)) - {s}:
        n = int(free.seq_lens[o])
        assert torch.equal(r.tokens[o, :n], free.tokens[o, :n])
        torch.testing.assert_close(r.logprobs[o, :n], free.logprobs[o, :n], atol=1e-4, rtol=0)  # GEMM rounding of 2 vs 3 rows
        assert torch.equal(r.evicted_at[o, ..., :n], free.evicted_at[o, ..., :n])
    logp = token_logprobs(llama, r)
    torch.testing.assert_close(logp * r.action_mask, r.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("observe", [None, 5])
@pytest.mark.parametrize("windowed", [False, True])
def test_prefill_attention_mass_goes_a_block_of_queries_at_a_time(monkeypatch, observe, windowed):
    """The per-key attention mass (H2O, SnapKV) is summed over blocks of queries, so that its
    scores never hold n x Hq x T x L floats at once: the same as all queries at once, a float64
    softmax of the causal scores (and, with a log, of the keys each query sees)."""
    from shadowkv import sampler as S

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, L, D, off = 2, 6, 2, 13, 20, 8, 7
    q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    ev = None
    if windowed:  # a random log that keeps each query's own key, as every window does
        ev = torch.randint(0, off + T + 4, (B, Hkv, L), generator=g, dtype=torch.int32)
        ev = torch.maximum(ev, torch.arange(1, L + 1, dtype=torch.int32))
    s = torch.einsum("bhgtd,bhld->bhgtl", q.double().view(B, Hkv, 3, T, D), k.double()) * 0.3
    pos = torch.arange(T)[:, None] + off
    hidden = torch.arange(L)[None, :] > pos
    if windowed:
        hidden = hidden | (pos >= ev[:, :, None, None, :])
    p = torch.softmax(s.masked_fill(hidden, -math.inf), -1)
    want = p[:, :, :, (0 if observe is None else T - observe) :].sum(dim=(2, 3))
    for block in (1, B * Hq * L * 4, 1 << 24):  # one query a block, four, all
        monkeypatch.setattr(S, "_MASS_BLOCK", block)
        torch.testing.assert_close(S._attention_mass(q, k, off, 0.3, observe, ev).double(), want, rtol=1e-5, atol=1e-5)


class _VoteCounter(SnapKV):
    """SnapKV that records, at each choice, how many queries' attention its scores hold (a
    query's attention sums to 1 over its keys in each of the group's query heads), and whether
    it was a prefill choice (no key at or past the prompt's length yet)."""

    def __init__(self, group, prompt_len, **kw):
        super().__init__(**kw)
        self.group, self.prompt_len, self.calls = group, prompt_len, []

    def select_batch(self, positions, scores, lens, n_keep):
        votes = (scores.sum(-1) / self.group).tolist()
        self.calls.append((list(lens), list(n_keep), votes, int(positions.max()) < self.prompt_len))
        return super().select_batch(positions, scores, lens, n_keep)


@pytest.mark.parametrize("chunk", [None, 16])
def test_snapkv_votes_start_anew_at_every_forced_eviction_point(llama, chunk):
    """A prompt (or chunk) within its budget is not evicted, and its window's votes carried over:
    the first decode eviction of a 32-token prompt with budget 40 and window 8 ranked by 8
    prompt queries plus the decode ones; a chunk boundary that did not evict lent its window
    to the next one (3 windows at the boundary at 48). Votes now start anew at each prefill and
    chunk boundary for every sequence, evicted or not: a boundary holds its window's votes,
    a decode eviction those of the queries since the previous eviction point."""
    group = llama.config.num_attention_heads // llama.config.num_key_value_heads
    layers = llama.config.num_hidden_layers
    window, plen = (8, 32) if chunk is None else (4, 64)
    policy = _VoteCounter(group, plen, window=window, kernel=3)
    Sampler(llama, policy, budget=40, page_size=4, prefill_chunk=chunk).generate(
        _prompts(2, plen, plen, seed=5), max_new_tokens=20, seed=0)
    kinds = [prefill for *_, prefill in policy.calls]
    assert (True in kinds) == (chunk is not None) and False in kinds
    prev = [plen] * layers  # live slots after the layer's previous eviction point
    for i, (lens, n_keep, votes, prefill) in enumerate(policy.calls):  # every layer evicts at once here
        layer = i % layers
        for n, per_head in zip(lens, votes):
            want = window if prefill else n - prev[layer]
            assert per_head == pytest.approx([want] * len(per_head), abs=1e-3), policy.calls
        prev[layer] = n_keep[0]
