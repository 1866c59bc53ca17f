"""The replay invariant on the GPU in bfloat16 (DESIGN.md §1): the sampler decodes with the CUDA
paged ops, the learner replays with the CUDA shadow_attention kernel, and the two agree as
closely as bfloat16 lets any sampler and learner agree, while a dense replay is nats off.

"As closely as bfloat16 lets" is measured in the same test: a FullCache rollout (nothing
evicted, so the shadow replay is the dense one) replayed the same way. Its error is pure bf16
rounding of a one-token decode forward against a full-sequence forward (other GEMM shapes,
other attention kernels), not masking. On an H200 (2026-11-26, bench/RESULTS.md) that floor
was max |dlogp| 2.4-2.6e-2 (mean 5.3-5.8e-3) over 600 tokens, above DESIGN.md's 2e-2, while
the shadow replays of evicting rollouts had mean 0.97-1.10x and max 0.92-1.28x the floor's.
So the test bounds the shadow replay by the floor: mean within max(2e-3, 1.5x) (a diffuse
error, e.g. a wrong mask on many keys, moves it), max within max(2e-2, 2x the floor's max) (a local error,
one token scored against the wrong keys, is tenths of a nat). Every eviction logged one step
late or early gives max |dlogp| ~1.1 nats and 45x the mean (bf16 on CPU, measured).

Skipped without a CUDA device. ``SHADOWKV_SAMPLER_TEST_DEVICE=cpu`` dry-runs the same checks
with the CPU kernels in bfloat16 (it checks the test, not the CUDA kernels).
"""

from __future__ import annotations

import os

import pytest
import torch

from shadowkv.benchmarks import replay as bench_replay
from shadowkv.policies import H2O, FullCache, SnapKV, StreamingLLM

from .models import tiny_model

DEVICE = os.environ.get("SHADOWKV_SAMPLER_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BF16_TOL = 2e-2  # DESIGN.md §1: bf16 GPU replay; the bound on the max is never tighter than this
MEAN_RATIO = 1.5  # shadow replay mean |dlogp| <= this x the no-eviction floor's
MAX_RATIO = 2.0  # shadow replay max |dlogp| <= this x the floor's (or BF16_TOL)
# ...and its mean never tighter than this. The GPU's floor is far above it (mean 5.3-5.8e-3 on an
# H200, so 1.5x of it bounds); the CPU kernels' bf16 floor is ~10x lower (5e-4), where 1.5x of it
# failed the dry run of StreamingLLM and H2O at head dim 64 (1.0-1.3e-3) although their replays are
# right; a wrong mask is still tens of times above it (one step off: ~45x the CPU floor's mean).
MEAN_TOL = BF16_TOL / 10
DENSE_GAP = 5.0  # a dense replay must be at least this many times further off than the shadow one


@pytest.fixture(scope="module", params=[64, 128], ids=lambda d: f"d{d}")
def model(request, tmp_path_factory):
    # Head dims 64 and 128 take the tensor-core path of the CUDA attention kernels. The width
    # stays 256 and the init moderate: bf16 rounds the logits to ~0.4% of their size, so
    # larger logits would measure bf16 itself, not the replay (a dense replay is still
    # nats away).
    d = request.param
    m = tiny_model(tmp_path_factory.mktemp(f"llama-d{d}"), "llama", hidden=256, heads=256 // d, kv_heads=128 // d,
                   head_dim=d, init_range=0.05)
    return m.to(device=DEVICE, dtype=torch.bfloat16)


def replay_errors(model, policy, budget):
    """(rollout, shadow errors, dense errors): shadowkv bench replay's measurement, on DEVICE."""
    rollout, shadow, dense = bench_replay.replay_errors(model, policy, budget)
    assert rollout.tokens.device.type == torch.device(DEVICE).type
    return rollout, shadow, dense


@pytest.fixture(scope="module")
def floor(model):
    """The no-eviction floor: a FullCache rollout replayed (shadow = dense there)."""
    rollout, shadow, dense = replay_errors(model, FullCache(), None)
    assert (rollout.evicted_at == 2**31 - 1).all()
    assert torch.equal(shadow, dense)
    print(f"{DEVICE} bf16 floor: max|dlogp|={shadow.max().item():.2e}, mean={shadow.mean().item():.2e}")
    return shadow


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=4), H2O(), SnapKV(window=8)], ids=lambda p: type(p).__name__)
def test_bf16_shadow_replay_matches_sampler(model, policy, floor):
    rollout, shadow, dense = replay_errors(model, policy, 0.25)
    assert (rollout.evicted_at < 2**31 - 1).any(), "budget 0.25 must evict"
    d_shadow, d_dense = shadow.max().item(), dense.max().item()
    print(f"{DEVICE} bf16 {policy!r}: shadow max|dlogp|={d_shadow:.2e} mean={shadow.mean().item():.2e} "
          f"(floor {floor.max().item():.2e} / {floor.mean().item():.2e}), dense max|dlogp|={d_dense:.2e}")
    assert shadow.mean().item() <= max(MEAN_TOL, MEAN_RATIO * floor.mean().item())
    assert d_shadow <= max(BF16_TOL, MAX_RATIO * floor.max().item())
    assert d_dense >= DENSE_GAP * max(d_shadow, BF16_TOL / 10)


@pytest.mark.parametrize("pack_prompts", [True, False], ids=["packed_prefill", "padded_prefill"])
def test_bf16_packed_replay_matches_sampler(model, floor, pack_prompts):
    """The sampler's packed prefill (the two short prompts share a row with pack_prompts) and the
    learner's packed replay (two of the three sequences share a row: the log shifted and
    clamped per sequence) on DEVICE: within the same bounds of the sampler as the padded ones.
    (bench replay's prompts, 37, 64 and 90 tokens, do not pack into fewer rows: no
    sequence fits beside another.)"""
    from shadowkv import Sampler, learner

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in (90, 10, 20)]
    sampler = Sampler(model, StreamingLLM(sinks=4), budget=0.25, page_size=16, pack_prompts=pack_prompts)
    rows_run = []
    real = sampler._forward_last
    sampler._forward_last = lambda ids, *a: rows_run.append(ids.shape[0]) or real(ids, *a)
    rollout = sampler.generate(prompts, 60, seed=0)
    assert sum(rows_run) == (2 if pack_prompts else 3)
    n = learner.inputs_per_sequence(rollout)
    assert learner._Packing(rollout, n).rows == 2
    errors = {}
    with torch.no_grad():
        for pack in (True, False):
            logits = learner.replay_logits(model, rollout, "shadow", pack=pack)
            errors[pack] = (learner.gather_logprobs(logits, rollout) - rollout.logprobs)[rollout.action_mask].abs()
    packed, padded = errors[True], errors[False]
    print(f"{DEVICE} bf16 prefill {'packed' if pack_prompts else 'padded'}, replay packed: "
          f"max|dlogp|={packed.max().item():.2e} mean={packed.mean().item():.2e} "
          f"(padded {padded.max().item():.2e} / {padded.mean().item():.2e})")
    for err in (packed, padded):
        assert err.mean().item() <= max(MEAN_TOL, MEAN_RATIO * floor.mean().item())
        assert err.max().item() <= max(BF16_TOL, MAX_RATIO * floor.max().item())


def test_bf16_chunked_prefill_replay_matches_sampler(model, floor):
    """``prefill_chunk`` on DEVICE: the prompts' chunks at the same position run in one call
    (the cache's gathered survivors, the chunks' ends in the log), with H2O's prefill scores:
    within the same bounds of the sampler as the whole-prompt prefill."""
    from shadowkv import Sampler, learner

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in (90, 10, 50)]
    sampler = Sampler(model, H2O(), budget=0.25, page_size=16, prefill_chunk=32, prefill_tokens=10**6)
    rows_run = []
    real = sampler._forward_last
    sampler._forward_last = lambda ids, *a: rows_run.append(ids.shape[0]) or real(ids, *a)
    rollout = sampler.generate(prompts, 60, seed=0)
    assert rows_run == [3, 2, 1]  # the chunks at 0, 32 and 64
    assert (rollout.evicted_at < 2**31 - 1).any(), "budget 0.25 must evict"
    with torch.no_grad():
        logits = learner.replay_logits(model, rollout, "shadow")
    err = (learner.gather_logprobs(logits, rollout) - rollout.logprobs)[rollout.action_mask].abs()
    print(f"{DEVICE} bf16 chunked prefill: max|dlogp|={err.max().item():.2e} mean={err.mean().item():.2e}")
    assert err.mean().item() <= max(MEAN_TOL, MEAN_RATIO * floor.mean().item())
    assert err.max().item() <= max(BF16_TOL, MAX_RATIO * floor.max().item())


@pytest.fixture(scope="module")
def sliding_model(model, tmp_path_factory):
    """A Qwen2 model of the same geometry whose second layer slides over 48 tokens."""
    d = model.config.head_dim
    m = tiny_model(tmp_path_factory.mktemp(f"qwen2-sliding-d{d}"), "qwen2", hidden=256, heads=256 // d,
                   kv_heads=128 // d, head_dim=d, init_range=0.05, use_sliding_window=True, sliding_window=48,
                   max_window_layers=1)
    return m.to(device=DEVICE, dtype=torch.bfloat16)


@pytest.mark.parametrize("prefill_chunk", [None, 32], ids=["whole_prefill", "chunked_prefill"])
def test_bf16_sliding_window_replay_matches_sampler(sliding_model, prefill_chunk, floor):
    """A sliding layer on DEVICE: windowed prefill masks, the windowed decode steps (gathered
    keys, one-query shadow_attention, H2O's scores) and the learner's window over the log. Its
    own FullCache rollout (nothing evicted; the window alone in the log) is a floor too: the
    bounds take the larger of it and the Llama model's (the CPU kernels can replay a FullCache
    rollout exactly, a floor of 0)."""
    from shadowkv import Sampler, learner

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, sliding_model.config.vocab_size, (n,), generator=g) for n in (90, 10, 50)]
    errors = {}
    for name, policy, budget in (("floor", FullCache(), None), ("h2o", H2O(), 0.25)):
        rollout = Sampler(sliding_model, policy, budget=budget, page_size=16, prefill_chunk=prefill_chunk).generate(
            prompts, 100, seed=0)
        if name == "floor":  # the window alone, in the sliding layer
            ev = rollout.evicted_at
            assert (ev[:, 1, :, :100] == torch.arange(100, device=ev.device) + 48).all()
            assert (ev[:, 0] == 2**31 - 1).all()
        with torch.no_grad():
            errors[name] = [(learner.token_logprobs(sliding_model, rollout, mask).float() - rollout.logprobs)
                            [rollout.action_mask].abs() for mask in ("shadow", "dense")]
    own, (shadow, dense) = errors["floor"][0], errors["h2o"]
    floor_max, floor_mean = (max(f(own).item(), f(floor).item()) for f in (torch.max, torch.mean))
    print(f"{DEVICE} bf16 sliding window ({prefill_chunk=}): shadow max|dlogp|={shadow.max().item():.2e} "
          f"mean={shadow.mean().item():.2e} (own floor {own.max().item():.2e} / {own.mean().item():.2e}), "
          f"dense max|dlogp|={dense.max().item():.2e}")
    assert shadow.mean().item() <= max(MEAN_TOL, MEAN_RATIO * floor_mean)
    assert shadow.max().item() <= max(BF16_TOL, MAX_RATIO * floor_max)
    assert dense.max().item() >= DENSE_GAP * max(shadow.max().item(), BF16_TOL / 10)
