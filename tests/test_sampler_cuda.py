"""The replay invariant on the GPU in bfloat16 (DESIGN.md §1): the sampler decodes with the CUDA
paged ops, the learner replays with the CUDA shadow_attention kernel, and the two agree to
max |Δlogprob| <= 2e-2 while a dense replay is clearly off.

Skipped without a CUDA device. ``SHADOWKV_SAMPLER_TEST_DEVICE=cpu`` dry-runs the same checks
with the CPU kernels in bfloat16 (it checks the test, not the CUDA kernels).
"""

from __future__ import annotations

import os

import pytest
import torch

from shadowkv import Sampler
from shadowkv.learner import token_logprobs
from shadowkv.policies import H2O, SnapKV, StreamingLLM

from .models import VOCAB, tiny_model

DEVICE = os.environ.get("SHADOWKV_SAMPLER_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BF16_TOL = 2e-2  # DESIGN.md §1: bf16 GPU replay
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


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=4), H2O(), SnapKV(window=8)], ids=lambda p: type(p).__name__)
def test_bf16_shadow_replay_matches_sampler(model, policy):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (int(n),), generator=g) for n in (37, 64, 90)]
    rollout = Sampler(model, policy, budget=0.25, page_size=16).generate(prompts, max_new_tokens=200, seed=0)
    m = rollout.action_mask
    assert rollout.tokens.device.type == torch.device(DEVICE).type
    assert (rollout.evicted_at < 2**31 - 1).any(), "budget 0.25 must evict"
    shadow = token_logprobs(model, rollout, "shadow")
    dense = token_logprobs(model, rollout, "dense")
    d_shadow = (shadow.float() - rollout.logprobs)[m].abs().max().item()
    d_dense = (dense.float() - rollout.logprobs)[m].abs().max().item()
    print(f"{DEVICE} bf16 {policy!r}: shadow max|dlogp|={d_shadow:.2e}, dense max|dlogp|={d_dense:.2e}")
    assert d_shadow <= BF16_TOL
    assert d_dense >= DENSE_GAP * max(d_shadow, BF16_TOL / 10)
