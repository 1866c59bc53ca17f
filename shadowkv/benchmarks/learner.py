"""Learner replay time on a ragged batch: what packing and masking the padding save.

Sequences of a batch end at different lengths and are right-padded to the longest. It times the
learner's replay (``replay_rows`` + log-probs, forward + backward) of one such batch:

- ``packed`` (the learner's default when it saves a row): whole sequences end to end in fewer
  rows of the same width, the log keeping each sequence's attention inside it, so the layers
  run on little padding;
- ``padded, padding masked`` (``pack=False``): each sequence's padding sees no key
  (``ops.mask_padding``) and the attention kernels skip its tiles, the other layers still run
  on it;
- ``padded, padding unmasked``: the log as the sampler wrote it, where the padding's entries
  are never evicted and every padding query attends over the padding before it (the replay
  before this session's changes), the baseline measured in the same run;

with the shadow mask (a StreamingLLM log keeping ``--budget`` of the keys) and dense. On CUDA
it also reports the peak memory allocated during the shadow replays.

The model is a random Llama built here (never downloaded); lengths are spread evenly from
``--max-len`` down to ``--min-frac`` of it, in a shuffled order, prompts of ``--prompt`` tokens.

    shadowkv bench learner                                   # CPU, float32
    shadowkv bench learner --device cuda --dtype bfloat16 --max-len 8192 --hidden 2048 --layers 8
"""

from __future__ import annotations

import argparse

import torch

from shadowkv import learner
from shadowkv.reference import streaming_evicted_at
from shadowkv.sampler import Rollout
from . import at_least, random_llama


class _PaddingAsTokens(Rollout):
    """The rollout with every row claiming the whole width: the replay then masks nothing, as it
    did before ``mask_padding`` (the padding's never-evicted log entries stay visible)."""

    @property
    def seq_lens(self) -> torch.Tensor:
        return torch.full_like(self.prompt_lens, self.tokens.shape[1])


def ragged_rollout(args, vocab: int, layers: int, kv_heads: int, device: str) -> Rollout:
    """``--batch`` sequences of evenly spread lengths (shuffled), right-padded; a StreamingLLM log."""
    gen = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.max_len
    lens = random_llama.spread_lengths(T, max(args.prompt + 2, round(T * args.min_frac)), B, gen)
    pos = torch.arange(T)[None]
    tokens = torch.randint(1, vocab, (B, T), generator=gen).masked_fill(pos >= lens[:, None], 0)
    mask = (pos < lens[:, None]) & (pos >= args.prompt)
    window = max(1, round(T * args.budget) - 4)
    ev = streaming_evicted_at(T, 4, window).expand(B, layers, kv_heads, T).contiguous()
    return Rollout(tokens.to(device), torch.full((B,), args.prompt, device=device), mask.to(device),
                   torch.zeros(B, T, device=device), ev.to(device), 0, 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-B", "--batch", type=at_least(1), default=8)
    p.add_argument("--max-len", type=at_least(4), default=2048, help="the longest sequence (default 2048)")
    p.add_argument("--min-frac", type=float, default=0.15, help="the shortest, as a fraction of --max-len")
    p.add_argument("--prompt", type=at_least(1), default=64)
    p.add_argument("--budget", type=float, default=0.25, help="kept fraction of the shadow log (default 0.25)")
    random_llama.add_options(p)
    args = p.parse_args(argv)
    if not 0 < args.min_frac <= 1 or not 0 < args.budget <= 1:
        p.error("--min-frac and --budget must be in (0, 1]")
    if args.prompt + 2 > args.max_len:
        p.error(f"argument --prompt: must leave 2 tokens under --max-len ({args.max_len}), got {args.prompt}")
    model, device = random_llama.build(p, args, args.max_len)
    r = ragged_rollout(args, args.vocab, args.layers, args.kv_heads, device)
    lens = r.seq_lens.cpu()
    real = lens.sum().item() / (args.batch * args.max_len)

    def step(rollout, mask, pack):
        logits = learner.replay_rows(model, rollout, mask, pack=pack)
        learner.gather_logprobs(logits, rollout).sum().backward()

    unmasked = _PaddingAsTokens(**vars(r))
    rows = {"packed (learner)": (r, True), "padded, padding masked": (r, False),
            "padded, padding unmasked (baseline)": (unmasked, False)}
    table, peak = {}, {}
    for name, (rollout, pack) in rows.items():
        for mask in ("shadow", "dense"):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            table[(name, mask)] = random_llama.timed(lambda: step(rollout, mask, pack), args.repeats, device)
            if device == "cuda":  # activations kept for the backward, on top of the model
                peak[(name, mask)] = torch.cuda.max_memory_allocated() / 2**30

    print(f"{device} {args.dtype}: Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads; {args.batch} sequences of {lens.min().item()}-{lens.max().item()} tokens ({real:.0%} of the padded "
          f"batch is real), shadow log at {args.budget:.0%}; replay forward + backward, median of {args.repeats}")
    base = "padded, padding unmasked (baseline)"
    cols = ["replay", "shadow s", "dense s", "shadow vs baseline", "dense vs baseline"]
    cols += ["shadow peak GiB"] if peak else []
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for name in rows:
        s, d = table[(name, "shadow")], table[(name, "dense")]
        mem = f" {peak[(name, 'shadow')]:.2f} |" if peak else ""
        print(f"| {name} | {s:.3f} | {d:.3f} | {table[(base, 'shadow')] / s:.2f}x | {table[(base, 'dense')] / d:.2f}x |{mem}")


if __name__ == "__main__":
    main()
