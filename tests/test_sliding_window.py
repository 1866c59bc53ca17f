"""Sliding-window models (Mistral, Qwen2/Qwen3 with ``use_sliding_window``, Gemma 3): the
sampler attends within each sliding layer's window, its log records where the window hid a
key, and the learner's replay (shadow or dense) applies the same window.

Ground truth is the model's own transformers forward (SDPA with its sliding-window mask)."""

from __future__ import annotations

import pytest
import torch

from shadowkv import Sampler
from shadowkv.attention import _window, window_log
from shadowkv.learner import token_logprobs
from shadowkv.ops import NEVER_EVICTED
from shadowkv.policies import H2O, FullCache, RandomEvict, SnapKV, StreamingLLM

from .models import VOCAB, tiny_model

WINDOW = 7
# family -> (config fields, layers that slide)
FAMILIES = {
    "mistral": (dict(sliding_window=WINDOW), [0, 1]),
    "qwen2": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, layers=3), [1, 2]),
    "gemma3": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    head_dim=16, layers=3), [0, 2]),
}


def _model(tmp_path, family, window=True):
    fields, _ = FAMILIES[family]
    fields = dict(fields)
    layers = fields.pop("layers", 2)
    head_dim = fields.pop("head_dim", None)
    if not window:
        fields = {"sliding_window": None} if family != "gemma3" else {**fields, "sliding_window": 10**6}
    return tiny_model(tmp_path / f"{family}-{window}", family, layers=layers, head_dim=head_dim, **fields)


def _prompts(lengths=(5, 13, 20, 9), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def _model_logprobs(model, rollout):
    """The rollout's generated tokens' log-probs under the model's own forward ``[B, T]``."""
    with torch.no_grad():
        logits = model(input_ids=rollout.tokens, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, rollout.tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logp, (1, 0)) * rollout.action_mask


PREFILLS = {"padded": dict(pack_prompts=False), "packed": dict(pack_prompts=True), "chunked": dict(prefill_chunk=4)}


@pytest.mark.parametrize("prefill", list(PREFILLS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_cache_rollout_is_the_models_own_windowed_attention(tmp_path, family, prefill):
    model = _model(tmp_path, family)
    rollout = Sampler(model, FullCache(), page_size=4, **PREFILLS[prefill]).generate(_prompts(), 15, seed=0)
    expected = _model_logprobs(model, rollout)
    torch.testing.assert_close(rollout.logprobs, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(token_logprobs(model, rollout, "dense") * rollout.action_mask, expected,
                               atol=2e-5, rtol=0)
    # The window matters here: the same weights without it give other log-probs.
    unwindowed = _model_logprobs(_model(tmp_path, family, window=False), rollout)
    assert (unwindowed - expected).abs().max() > 1e-2
    # The log says where the window hid each key, in the sliding layers only.
    ev, T = rollout.evicted_at, rollout.tokens.shape[1]
    j = torch.arange(T, dtype=torch.int32)
    hidden = torch.where(j + WINDOW < T, j + WINDOW, NEVER_EVICTED)  # keys past T - WINDOW: seen by every later token
    for layer in range(ev.shape[1]):
        if layer in FAMILIES[family][1]:
            assert torch.equal(ev[:, layer], hidden.expand_as(ev[:, layer]))
        else:
            assert bool((ev[:, layer] == NEVER_EVICTED).all())


@pytest.mark.parametrize("policy", [StreamingLLM(), H2O(), SnapKV(window=4), RandomEvict()],
                         ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prefill", list(PREFILLS))
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_compressed_rollouts_replay_exactly(tmp_path, family, prefill, policy):
    """Eviction and window together: the shadow replay gives the sampler's log-probs (repeated
    prompts and sequences that end early included), and no sliding layer's key stays visible
    past its window."""
    model = _model(tmp_path, family)
    prompts = _prompts() + _prompts((13,))
    rollout = Sampler(model, policy, budget=6, page_size=4, **PREFILLS[prefill]).generate(
        prompts, 20, seed=0, eos_token_id=5)
    mask = rollout.action_mask
    torch.testing.assert_close(token_logprobs(model, rollout) * mask, rollout.logprobs, atol=2e-5, rtol=0)
    assert (token_logprobs(model, rollout, "dense") * mask - rollout.logprobs).abs().max() > 1e-2
    ev, T = rollout.evicted_at, rollout.tokens.shape[1]
    j = torch.arange(T - WINDOW)
    for layer in FAMILIES[family][1]:
        assert bool((ev[:, layer, :, : T - WINDOW] <= j + WINDOW).all())


def test_a_window_longer_than_the_rollout_changes_nothing(tmp_path):
    """Mistral's default window (4096) is far past these sequences: the same rollout as a
    model without one, and no decode step takes the windowed path's gather."""
    prompts = _prompts()
    runs = [Sampler(tiny_model(tmp_path / str(w), "mistral", sliding_window=w), H2O(), budget=6,
                    page_size=4).generate(prompts, 15, seed=0) for w in (4096, None)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].evicted_at, runs[1].evicted_at)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=0, rtol=0)


def test_window_log():
    log = torch.tensor([[9, 2, NEVER_EVICTED, NEVER_EVICTED]], dtype=torch.int32)
    assert window_log(log, None) is log
    assert window_log(log, 3).tolist() == [[3, 2, 5, 6]]
    positions = torch.tensor([[-1, 0, 10, 2**31 - 2]], dtype=torch.int32)  # no int32 overflow
    assert window_log(log, 3, positions).tolist() == [[2, 2, 13, NEVER_EVICTED]]
    assert window_log(log, 3).dtype == torch.int32


@pytest.mark.parametrize("bad", [0, -4, True, 2.5, "8"])
def test_bad_windows_are_refused(bad):
    with pytest.raises(NotImplementedError, match="sliding_window"):
        _window(bad)
    assert _window(None) is None and _window(16) == 16


@pytest.mark.parametrize("policy, budget", [(FullCache(), None), (H2O(), 12)], ids=["full", "h2o"])
def test_sliding_layers_free_what_the_window_hid(tmp_path, policy, budget):
    """A sliding layer's cache holds about its window (a page more between slides), FullCache's
    included, so a FullCache rollout's KV peak falls; every layer of this Mistral slides."""
    prompts = _prompts((30, 52, 11))
    peaks = {}
    for window in (WINDOW, None):
        model = tiny_model(tmp_path / str(window), "mistral", sliding_window=window)
        sampler = Sampler(model, policy, budget=budget, page_size=4)
        rollout = sampler.generate(prompts, 40, seed=0)
        mask = rollout.action_mask
        torch.testing.assert_close(token_logprobs(model, rollout) * mask, rollout.logprobs, atol=2e-5, rtol=0)
        peaks[window] = rollout.kv_peak_bytes
        if window is not None:
            assert all(max(layer.lens) <= WINDOW + 4 for layer in sampler.cache.layers)
            if budget is None:
                torch.testing.assert_close(rollout.logprobs, _model_logprobs(model, rollout), atol=2e-5, rtol=0)
    assert peaks[WINDOW] < (0.6 if budget is None else 1.0) * peaks[None]


def test_kept_keys_the_window_hid_are_traded_for_visible_ones():
    """_prefer_visible: per head, the oldest kept hidden keys (positions < 4) go, the newest
    visible unkept ones come, as many as there are of both; the counts per head stay."""
    from shadowkv.sampler import _prefer_visible

    pos = torch.tensor([[[0, 1, 5, 6, 7, -1], [3, 0, 8, 2, 9, 10], [4, 5, 0, 6, 1, 2]]], dtype=torch.int32)
    keep = torch.tensor([[[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1], [1, 1, 0, 1, 0, 0]]], dtype=torch.bool)
    out = _prefer_visible(keep, pos, torch.tensor([4], dtype=torch.int32))
    assert out.int().tolist() == [[[0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1], [1, 1, 0, 1, 0, 0]]]


@pytest.mark.parametrize("settings", [dict(evict_every=3), dict(budget=[5, 0.4]), dict(share_prompts=False)],
                         ids=["evict_every", "layer_budgets", "no_sharing"])
def test_schedules_budgets_and_sharing_replay_exactly(tmp_path, settings):
    model = _model(tmp_path, "mistral")
    settings = {"budget": 6, **settings}
    prompts = _prompts() + _prompts((13,))
    for policy in (SnapKV(window=2), RandomEvict()):
        rollout = Sampler(model, policy, page_size=4, **settings).generate(prompts, 30, seed=0)
        torch.testing.assert_close(token_logprobs(model, rollout) * rollout.action_mask, rollout.logprobs,
                                   atol=2e-5, rtol=0)


def test_bidirectional_attention_is_refused(tmp_path):
    """Gemma 3's use_bidirectional_attention (embedding models) lets queries see later keys."""
    from transformers import Gemma3TextConfig

    if "use_bidirectional_attention" not in Gemma3TextConfig().to_dict():  # 4.56 keeps the kwarg, ignores it
        pytest.skip("this transformers' Gemma 3 has no use_bidirectional_attention")
    fields, _ = FAMILIES["gemma3"]
    model = tiny_model(tmp_path, "gemma3", layers=3, head_dim=16, use_bidirectional_attention=True,
                       **{k: v for k, v in fields.items() if k not in ("layers", "head_dim")})
    with pytest.raises(NotImplementedError, match="bidirectional"):
        Sampler(model, FullCache(), page_size=4).generate(_prompts((5,)), 3, seed=0)
