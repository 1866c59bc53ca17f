"""The default policy model: a tiny Llama built locally and warmed up by supervised training.

RL needs a policy with non-trivial reward to start from. ``pretrained_policy`` builds a
small ``LlamaConfig`` model (no download), trains it on task demonstrations with teacher
forcing (loss on answer tokens, dense attention), saves it with ``save_pretrained`` under
a cache folder keyed by everything that determines it, and loads it back with
``from_pretrained`` — the path users take with real checkpoints (``--init PATH``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import write_dir
from .tasks import Copy, Task


@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # head dim 32: the eviction log and slot positions cost 1.6% of K/V each, not 3%
    max_positions: int = 4096


@dataclass
class SFTConfig:
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0
    copy_frac: float = 1 / 3  # leading share of steps spent on copy demonstrations


def build_model(task: Task, cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = (task.vocab_size + 7) // 8 * 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def sft(model, task: Task, cfg: SFTConfig, progress=None) -> list[float]:
    """Teacher-forced training on ``(prompt, answer)`` demonstrations; returns the losses.

    The first ``copy_frac`` of the steps copy spans of distinct symbols (8-48 tokens) from
    the task's alphabet. A small model learns that within a few hundred steps, and the
    induction circuit it builds ("the token after the earlier occurrence of this one") is
    exactly what retrieval and pointer following need; trained on the task alone, the same
    model plateaus for thousands of steps.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    # A 5% ramp; short warm-ups (tests) get 30%: OneCycleLR divides by zero when the ramp is
    # exactly one step (20 steps at 5%).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps,
                                                pct_start=0.05 if cfg.steps >= 40 else 0.3)
    model.train()
    losses = []
    n_copy = int(cfg.copy_frac * cfg.steps)
    for step in range(cfg.steps):
        if step < n_copy:
            span = int(torch.randint(8, min(48, task.num_symbols) + 1, (1,), generator=gen))
            variant = Copy(num_symbols=task.num_symbols, span=span)
        else:
            variant = task.curriculum((step - n_copy) / max(1, cfg.steps - n_copy), gen)
        demos = [variant.demonstration(gen) for _ in range(cfg.batch)]
        seqs = torch.nn.utils.rnn.pad_sequence([t for t, _ in demos], batch_first=True)
        labels = torch.nn.utils.rnn.pad_sequence([lab for _, lab in demos], batch_first=True, padding_value=-100)
        # transformers shifts labels inside the loss: labels[t] is predicted at t - 1.
        loss = model(input_ids=seqs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(loss.item())
    model.eval()
    return losses


def cache_root() -> Path:
    return Path(os.environ.get("SHADOWKV_CACHE", Path.home() / ".cache" / "shadowkv")) / "models"


def pretrained_policy(task: Task, model_cfg: ModelConfig, sft_cfg: SFTConfig, progress=None):
    """The warmed-up default model for ``task`` (trained once, then loaded from the cache)."""
    from transformers import AutoModelForCausalLM

    key = json.dumps({"task": {"name": task.name, **asdict(task)}, "model": asdict(model_cfg),
                      "sft": asdict(sft_cfg), "v": 1}, sort_keys=True)
    path = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (path / "config.json").exists():
        # A folder without config.json is damaged (write_dir never leaves one half-written): it is
        # replaced, where keeping "theirs" retrained the model on every run and then failed to load.
        damaged = path.exists()
        torch.manual_seed(sft_cfg.seed)
        model = build_model(task, model_cfg)
        sft(model, task, sft_cfg, progress)

        def fill(folder: Path) -> None:
            model.save_pretrained(folder)
            (folder / "shadowkv_key.json").write_text(key)

        write_dir(path, fill, replace=damaged)  # a concurrent or killed run never sees half a model
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
