"""Synthetic, verifiable long-context tasks with exact rewards (DESIGN.md §7).

Integer vocabulary, no tokenizer: ``PAD=0, BOS=1, EOS=2, SEP=3, FILL=4`` (haystack filler),
symbols from ``FIRST_SYMBOL``. Every task is built so that KV eviction *matters*: the answer needs a
token far back in the prompt (``kv-lookup``, ``copy``) or a token the model generated
itself earlier (``chain``: multi-hop pointer following; ``arithmetic``: running sums over a
long list), so decode-time eviction hurts.
A task samples ``(prompt, answer)`` pairs; the reward of a generation is the fraction of
answer positions reproduced exactly (EOS included), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PAD, BOS, EOS, SEP, FILL = 0, 1, 2, 3, 4
FIRST_SYMBOL = 5


@dataclass
class Task:
    """Base: subclasses implement ``_example``; ``num_symbols`` distinct content tokens."""

    num_symbols: int = 64
    name = "task"

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.num_symbols

    def _symbols(self, n: int, gen: torch.Generator, distinct: bool = False) -> torch.Tensor:
        if distinct:
            if n > self.num_symbols:
                raise ValueError(f"{self.name}: needs {n} distinct symbols, has {self.num_symbols}")
            return torch.randperm(self.num_symbols, generator=gen)[:n] + FIRST_SYMBOL
        return torch.randint(FIRST_SYMBOL, self.vocab_size, (n,), generator=gen)

    def _example(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def demonstration(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One supervised-warm-up example: ``(tokens, labels)`` 1-D, labels ``-100`` where no
        loss applies. Default: the answer after its prompt."""
        prompt, answer = self._example(gen)
        tokens = torch.cat([prompt, answer])
        labels = torch.full_like(tokens, -100)
        labels[prompt.numel() :] = answer
        return tokens, labels

    def curriculum(self, progress: float, gen: torch.Generator) -> "Task":
        """The task variant to warm up on at ``progress`` in [0, 1] of the warm-up (default:
        the task itself)."""
        return self

    def sample(self, n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``n`` (prompt, answer) pairs of 1-D int64 tensors; answers end with EOS."""
        pairs = [self._example(gen) for _ in range(n)]
        return [p for p, _ in pairs], [a for _, a in pairs]

    @property
    def max_answer_len(self) -> int:
        raise NotImplementedError

    @staticmethod
    def reward(generated: torch.Tensor, answer: torch.Tensor) -> float:
        """Fraction of ``answer`` positions that ``generated`` (1-D) matches exactly."""
        n = min(generated.numel(), answer.numel())
        hits = (generated[:n] == answer[:n]).sum().item()
        return hits / answer.numel()


@dataclass
class KVLookup(Task):
    """Needle retrieval: ``BOS [k1 v1 … kn vn spread over FILL tokens] SEP q`` -> ``v(q) EOS``.

    Each value is ``value_len`` tokens. Keys are distinct and drawn from the first half of
    the symbols, value tokens are distinct and drawn from the second half, so "the token
    after the earlier occurrence of this one" is unambiguous for every answer token. With
    ``value_len >= 2`` only the first answer token comes from the prefill: the rest are
    decoded from the cache *after* the post-prompt eviction, so compression can cost reward
    (with one-token values the eviction never touches the answer). With ``num_queries = m > 1``
    the prompt first shows ``m - 1`` answered queries (``SEP q1 v(q1) … q_m``), as in-context
    demonstrations."""

    num_pairs: int = 16
    num_queries: int = 1
    value_len: int = 1
    length: int = 0  # pad the pair list to this many tokens with FILL at random places
    name = "kv-lookup"

    def _haystack(self, pairs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Spreads the ``[n, 1 + value_len]`` pairs (kept whole, in order) over ``length`` tokens."""
        n, width = pairs.shape
        slots = max(n, self.length // width)  # each slot holds a pair or ``width`` FILL tokens
        out = torch.full((slots, width), FILL, dtype=torch.long)
        out[torch.randperm(slots, generator=gen)[:n].sort().values] = pairs
        return out.flatten()

    def _example(self, gen):
        half = self.num_symbols // 2
        if self.value_len < 1:
            raise ValueError(f"kv-lookup: value_len must be >= 1, got {self.value_len}")
        if self.num_pairs * self.value_len > half:
            raise ValueError(f"kv-lookup: {self.num_pairs} pairs of {self.value_len}-token values need >= "
                             f"{2 * self.num_pairs * self.value_len} symbols, have {self.num_symbols}")
        keys = torch.randperm(half, generator=gen)[: self.num_pairs] + FIRST_SYMBOL
        vals = (torch.randperm(self.num_symbols - half, generator=gen)[: self.num_pairs * self.value_len]
                + FIRST_SYMBOL + half).view(self.num_pairs, self.value_len)
        q = torch.randperm(self.num_pairs, generator=gen)[: self.num_queries]
        pairs = self._haystack(torch.cat([keys[:, None], vals], 1), gen)
        shots = torch.cat([keys[q[:-1], None], vals[q[:-1]]], 1).flatten()
        prompt = torch.cat([torch.tensor([BOS]), pairs, torch.tensor([SEP]), shots, keys[q[-1:]]])
        return prompt, torch.cat([vals[q[-1]], torch.tensor([EOS])])

    @property
    def max_answer_len(self):
        return self.value_len + 1

    def curriculum(self, progress, gen):
        # Retrieval is learnt on short haystacks first (grown to full length over the first
        # half of the warm-up), with 2..num_pairs needles throughout.
        length = int(20 + min(1.0, 2 * progress) * max(0, self.length - 20)) if self.length else 0
        most = max(2, min(self.num_pairs, max(length, 4) // (1 + self.value_len)))
        return replace(self, length=length, num_pairs=int(torch.randint(2, most + 1, (1,), generator=gen)))

    def demonstration(self, gen):
        # One supervised answer per sequence is too sparse a signal for a small model to
        # discover retrieval; up to 16 answered queries per prompt give up to 16.
        shots = replace(self, num_queries=min(self.num_pairs, max(self.num_queries, 16)))
        prompt, answer = shots._example(gen)
        tokens = torch.cat([prompt, answer])
        labels = torch.full_like(tokens, -100)
        sep = int((tokens == SEP).nonzero()[0])
        width = 1 + self.value_len
        for j in range(1, width):  # every value token after its query key, not the keys
            labels[sep + 1 + j :: width] = tokens[sep + 1 + j :: width]
        labels[-1] = EOS
        return tokens, labels


@dataclass
class Copy(Task):
    """``BOS s1 … sL EOS SEP BOS`` -> ``s1 … sL EOS`` (distinct symbols: every answer token
    is "the token after the previous occurrence of the current one")."""

    span: int = 48
    name = "copy"

    def _example(self, gen):
        s = self._symbols(self.span, gen, distinct=True)
        prompt = torch.cat([torch.tensor([BOS]), s, torch.tensor([EOS, SEP, BOS])])
        return prompt, torch.cat([s, torch.tensor([EOS])])

    @property
    def max_answer_len(self):
        return self.span + 1


@dataclass
class Chain(Task):
    """Pointer following: ``BOS a1 b1 … an bn SEP x0`` with ``f(a_i) = b_i`` a random
    permutation cycle over the keys; answer ``x1 … xh EOS`` with ``x_{i+1} = f(x_i)``. Each
    hop looks up the token the model itself generated last."""

    num_pairs: int = 48
    hops: int = 8
    name = "chain"

    def _example(self, gen):
        keys = self._symbols(self.num_pairs, gen, distinct=True)
        nxt = torch.roll(keys, -1)  # one cycle through all keys: every hop has an answer
        order = torch.randperm(self.num_pairs, generator=gen)
        pairs = torch.stack([keys[order], nxt[order]], 1).flatten()
        start = int(torch.randint(self.num_pairs, (1,), generator=gen))
        hops = keys[(start + 1 + torch.arange(self.hops)) % self.num_pairs]
        prompt = torch.cat([torch.tensor([BOS]), pairs, torch.tensor([SEP, int(keys[start])])])
        return prompt, torch.cat([hops, torch.tensor([EOS])])

    @property
    def max_answer_len(self):
        return self.hops + 1


@dataclass
class Arithmetic(Task):
    """Running sums over a long list: ``BOS k1 n1 … kn nn EOS SEP BOS`` ->
    ``k1 s1 k2 s2 … kn sn EOS`` with ``s_i = (n1 + … + n_i) mod modulus``; the reward scores
    the sums and the EOS only.

    Numbers and sums are the first ``modulus`` symbols (digit ``d`` is ``FIRST_SYMBOL + d``);
    the keys are distinct symbols from the rest and mark the list's order. Every answer step
    reads the prompt and the model's own output: ``s_i`` adds ``n_i`` (the token after the
    earlier ``k_i``) to ``s_{i-1}`` (two tokens back), and ``k_{i+1}`` is the key two tokens
    after the earlier ``k_i`` — so a key or number evicted before its turn costs every sum
    after it."""

    num_pairs: int = 16
    modulus: int = 10
    name = "arithmetic"

    def _example(self, gen):
        if self.modulus < 2:
            raise ValueError(f"arithmetic: modulus must be >= 2, got {self.modulus}")
        if self.num_pairs < 1 or self.num_pairs + self.modulus > self.num_symbols:
            raise ValueError(f"arithmetic: {self.num_pairs} keys and {self.modulus} digits need >= "
                             f"{self.num_pairs + self.modulus} symbols, have {self.num_symbols}")
        keys = torch.randperm(self.num_symbols - self.modulus, generator=gen)[: self.num_pairs]
        keys = keys + FIRST_SYMBOL + self.modulus
        nums = torch.randint(self.modulus, (self.num_pairs,), generator=gen)
        sums = nums.cumsum(0) % self.modulus + FIRST_SYMBOL
        prompt = torch.cat([torch.tensor([BOS]), torch.stack([keys, nums + FIRST_SYMBOL], 1).flatten(),
                            torch.tensor([EOS, SEP, BOS])])
        return prompt, torch.cat([torch.stack([keys, sums], 1).flatten(), torch.tensor([EOS])])

    @property
    def max_answer_len(self):
        return 2 * self.num_pairs + 1

    def reward(self, generated: torch.Tensor, answer: torch.Tensor) -> float:
        """Fraction of the sums and the EOS that ``generated`` (1-D) reproduces at their
        positions. The echoed keys earn nothing: they are the prompt's list copied, and scoring
        them paid a model that copies the whole list (numbers for sums) about 0.56."""
        scored = torch.cat([torch.arange(1, answer.numel() - 1, 2), torch.tensor([answer.numel() - 1])])
        scored = scored[scored < generated.numel()]
        return (generated[scored] == answer[scored]).sum().item() / (answer.numel() // 2 + 1)

    def curriculum(self, progress, gen):
        # Sums are learnt on short lists first: up to 4 pairs at the start of the warm-up, the
        # full list from its middle on.
        most = min(self.num_pairs, int(4 + min(1.0, 2 * progress) * self.num_pairs))
        return replace(self, num_pairs=int(torch.randint(min(2, most), most + 1, (1,), generator=gen)))


TASKS = {"kv-lookup": KVLookup, "copy": Copy, "chain": Chain, "arithmetic": Arithmetic}


def make_task(name: str, length: int | None = None, **kwargs) -> Task:
    """Task by name; ``length`` sets the prompt's content size (pairs for kv-lookup, chain
    and arithmetic, span for copy) from an approximate prompt length in tokens."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if length is not None:
        if name == "copy":
            kwargs.setdefault("span", max(1, length - 4))
        elif name == "kv-lookup":
            kwargs.setdefault("length", length - 3)
            if kwargs.get("value_len", 1) < 1:
                raise ValueError(f"kv-lookup: --value-len must be >= 1, got {kwargs['value_len']}")
            width = 1 + kwargs.get("value_len", 1)
            kwargs.setdefault("num_pairs", min(16, max(2, (length - 3) // width)))
        elif name == "arithmetic":
            kwargs.setdefault("num_pairs", max(2, (length - 4) // 2))
        else:
            kwargs.setdefault("num_pairs", max(2, (length - 8) // 2))
    task = TASKS[name](**kwargs)
    per_pair = 2 * task.value_len if name == "kv-lookup" else 1  # kv-lookup: keys and values in separate halves
    needed = max(getattr(task, "num_pairs", 0) * per_pair + getattr(task, "modulus", 0), getattr(task, "span", 0))
    if needed > task.num_symbols:
        task.num_symbols = needed
    return task
