"""Replay precision: how closely a learner's replay reproduces the sampler's log-probs.

For each policy it samples a rollout, replays it with the shadow mask and densely, and prints
max / 99.9th percentile / mean of |sampler log-prob - replay log-prob| over the generated
tokens. The first row is FullCache: nothing is evicted, so its shadow and dense replays are
the same, and its error is what the sampler and the learner differ by *without* any masking
(a one-token decode forward against a full-sequence forward, other kernels and GEMM shapes,
rounded in ``--dtype``): the floor the shadow replays of the evicting policies are measured
against (``x floor`` columns). The dense column shows what a learner without the log is off by.

``--fp32-head`` computes the logits in float32 (the LM head's weights and input upcast) in
both the sampler and the learner, to separate the logits' own rounding from the rest.

    shadowkv bench replay --device cuda --dtype bfloat16 --head-dim 128   # the GPU test's model
    shadowkv bench replay                                                 # CPU, bfloat16

The model is a tiny random Llama (built here, saved with ``save_pretrained`` and loaded back),
3 prompts of 37, 64 and 90 tokens, 200 new tokens each, budget 25%, as in
``tests/test_sampler_cuda.py``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from shadowkv import Sampler
from shadowkv.learner import token_logprobs
from shadowkv.policies import H2O, FullCache, SnapKV, StreamingLLM
from . import at_least

VOCAB = 96
POLICIES = {"full": (FullCache, None), "streaming": (lambda: StreamingLLM(sinks=4), 0.25), "h2o": (H2O, 0.25),
            "snapkv": (lambda: SnapKV(window=8), 0.25)}


class _Fp32Head(torch.nn.Module):
    """An LM head computed in float32 from the hidden state (returns float32 logits)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.lin.bias is None else self.lin.bias.float()
        return torch.nn.functional.linear(x.float(), self.lin.weight.float(), bias)


def replay_errors(model, policy, budget, new: int = 200, seed: int = 0):
    """Samples 3 prompts (37, 64, 90 tokens) x ``new`` tokens with ``policy`` at ``budget`` and
    replays them: (rollout, shadow errors, dense errors), where the errors are float32
    |sampler log-prob - replay log-prob| over the generated tokens, on the model's device.
    ``tests/test_sampler_cuda.py`` bounds exactly these."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in (37, 64, 90)]
    rollout = Sampler(model, policy, budget=budget, page_size=16).generate(prompts, max_new_tokens=new, seed=seed)
    m = rollout.action_mask
    with torch.no_grad():
        shadow, dense = ((token_logprobs(model, rollout, mask).float() - rollout.logprobs)[m].abs()
                         for mask in ("shadow", "dense"))
    return rollout, shadow, dense


def times_floor(value: float, floor: float) -> str:
    """``value / floor`` for an ``x floor`` column, or ``n/a`` when the floor is exactly 0 (in
    float32 the sampler and the learner can agree to the bit): no multiple of 0 says anything,
    and the absolute columns beside it still show each policy's error."""
    return f"{value / floor:.2f}" if floor > 0 else "n/a"


def build_model(head_dim: int, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """The replay test's model: width 256, 256 / D query and 128 / D KV heads, 2 layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=256 // head_dim, num_key_value_heads=max(1, 128 // head_dim),
                      head_dim=head_dim, max_position_embeddings=4096, initializer_range=0.05,
                      tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--head-dim", type=at_least(1), default=128, help="a divisor of 128 (default 128)")
    p.add_argument("--new", type=at_least(1), default=200, help="new tokens per prompt (default 200)")
    p.add_argument("--fp32-head", action="store_true", help="float32 logits in the sampler and the learner")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if 128 % args.head_dim:
        p.error(f"argument --head-dim: must divide 128, got {args.head_dim}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)

    model = build_model(args.head_dim, dtype, device, args.seed)
    if args.fp32_head:
        model.lm_head = _Fp32Head(model.lm_head)
    rows, floor = [], None
    for name, (make, budget) in POLICIES.items():
        _, shadow, dense = replay_errors(model, make(), budget, args.new, args.seed)
        shadow = shadow.double().cpu()
        stats = (shadow.max().item(), torch.quantile(shadow, 0.999).item(), shadow.mean().item())
        if floor is None:
            floor = stats
        rows.append([name, *(f"{v:.2e}" for v in stats), times_floor(stats[0], floor[0]),
                     times_floor(stats[2], floor[2]), f"{dense.max().item():.2e}", str(shadow.numel())])

    head = "fp32 LM head" if args.fp32_head else f"{args.dtype} logits"
    print(f"{device} {args.dtype}, head dim {args.head_dim}, {head}; |sampler logp - replay logp| over the generated "
          f"tokens (FullCache = the no-eviction floor)")
    cols = ["policy", "shadow max", "p99.9", "mean", "max x floor", "mean x floor", "dense max", "tokens"]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
