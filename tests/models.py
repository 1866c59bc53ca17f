"""Tiny randomly initialised transformers models for tests (built locally, never downloaded).

Each is saved with ``save_pretrained`` and loaded back with ``from_pretrained`` so the tests
go through the same loading code as a real checkpoint.
"""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

VOCAB = 96


def _config(family: str, hidden: int, heads: int, kv_heads: int, layers: int, head_dim: int | None,
            init_range: float, **overrides):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[family]
    # A large init range makes the random model's attention and logits peaked, so
    # dropping tokens visibly changes its log-probs (as it does in a trained model).
    return cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
               max_position_embeddings=4096, initializer_range=init_range, tie_word_embeddings=False, **overrides)


def tiny_model(path, family: str = "llama", hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               head_dim: int | None = None, seed: int = 0, init_range: float = 0.2, **overrides):
    """A float32 CPU causal LM saved to and reloaded from ``path`` (``overrides``: more config
    fields)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, hidden, heads, kv_heads, layers, head_dim, init_range,
                                                     **overrides))
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
