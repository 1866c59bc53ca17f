"""Batched generation with a compressed paged KV cache and an eviction log (DESIGN.md §5).

The sampler drives a transformers causal LM through the ``shadowkv`` attention
implementation: prompts are prefilled in batches of whole prompts, packed end to end or
right-padded (or one sequence at a time in chunks, with eviction at each chunk boundary),
then all sequences decode together, one token per step, with ``paged_decode_attention``.
Every eviction is logged in ``evicted_at`` so the learner can replay exactly the attention the
sampler used.
"""

from __future__ import annotations

import collections
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from .attention import attention_context, install, model_geometry, returning_dicts, window_log
from .cache import PagedKVCache, to_device
from .ops import NEVER_EVICTED, shadow_attention
from .packing import PackedPrompts, first_fit_decreasing
from .policies import POLICIES, FullCache, Policy, as_int, budget_tokens
from .vocab_kl import tempered_log_softmax


@dataclass
class Rollout:
    """Sequences produced by :class:`Sampler`; right-padded to ``T``.

    Attributes:
        tokens: ``[B, T]`` int64, prompt then generated tokens, padded with ``pad_token_id``.
        prompt_lens: ``[B]`` int64.
        action_mask: ``[B, T]`` bool, True at generated (non-pad) positions (EOS included).
        logprobs: ``[B, T]`` float32, log-prob of each generated token under
            ``softmax(logits / temperature)`` (temperature 1 when greedy); 0 elsewhere. With
            ``top_p < 1`` or ``top_k`` too: the policy's log-prob, which the learner can
            compute, not the log-prob under the renormalised set the token was drawn from
            (README, design notes).
        evicted_at: ``[B, num_layers, Hkv, T]`` int32 shadow mask (DESIGN.md §1).
        kv_peak_bytes: peak bytes of allocated KV pages plus the eviction log (and, for the
            score-based policies, their float32 per-slot scores).
        dense_kv_bytes: K/V bytes a dense cache would hold for these sequences.
        timings: seconds spent in ``prefill`` and ``decode``, and ``tokens_per_s``.
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    evicted_at: torch.Tensor
    kv_peak_bytes: int
    dense_kv_bytes: int
    timings: dict = field(default_factory=dict)

    @property
    def seq_lens(self) -> torch.Tensor:
        """``[B]`` int64 tokens per sequence: through its last generated token, or its prompt
        when it generated none. Everything after is padding (the learner's replay masks it)."""
        mask, lens = self.action_mask, self.prompt_lens.to(self.action_mask.device, torch.int64)
        if mask.shape[1] == 0:
            return lens
        last = torch.where(mask, torch.arange(1, mask.shape[1] + 1, device=mask.device), 0).amax(-1)
        return torch.maximum(lens, last)

    def rows(self, rows: slice, cols: int | None = None) -> "Rollout":
        """The sequences ``rows`` (views, the same ``T`` or their first ``cols`` positions), e.g.
        a learner's micro-batch, whose columns past its longest sequence are padding; the byte
        counts and timings stay the whole rollout's."""
        c = slice(None, cols)
        return Rollout(self.tokens[rows, c], self.prompt_lens[rows], self.action_mask[rows, c],
                       self.logprobs[rows, c], self.evicted_at[rows, ..., c], self.kv_peak_bytes,
                       self.dense_kv_bytes, self.timings)


class _SamplerContext:
    """Attention for one model call of the sampler: ``"decode"`` (one token per sequence of
    ``rows``, all of the batch as a slice or the sequences still running as a list, whose
    ``index`` is the same rows as an int64 tensor on the model's device; ``lengths`` 1 each),
    ``"prompts"`` (whole prompts of ``rows``, ``lengths`` tokens each, right-padded or, with
    ``packing``, packed end to end; ``positions`` are the right-padded layout's) or ``"chunk"``
    (a prefill chunk of each sequence of ``rows``, a list with ``index``: ``counts[i]`` tokens
    ending at position ``lengths[i]``, right-padded, after its survivors). Prefill evicts each
    layer to ``lengths`` once its attention is done."""

    def __init__(self, sampler: "Sampler", rows: slice | list[int], positions: torch.Tensor, mode: str,
                 observe: int | None = None, lengths: list[int] | None = None,
                 forks: tuple[list[int], list[int]] = ([], []), fork_batch: int = 1,
                 index: torch.Tensor | None = None, packing: PackedPrompts | None = None,
                 counts: list[int] | None = None, last: int = 0):
        self.s, self.rows, self.positions, self.mode, self.observe = sampler, rows, positions, mode, observe
        self.last = last  # "decode": the largest query position (on the host)
        self.lengths, self.index, self.packing, self.counts = lengths, index, packing, counts
        if mode == "chunk":  # each chunk's end, counted from the survivors
            self.ends = to_device(counts, positions.device, torch.int32)
        # "prompts": (source rows, rows that get a copy of the source's prompt); with a
        # stochastic policy copied and evicted fork_batch rows at a time
        self.forks, self.fork_batch = forks, fork_batch

    def attend(self, layer, q, k, v, scale, window=None):
        if window is not None:
            self.s.windows[layer] = window
        if self.mode == "prompts":
            return self._prompts(layer, q, k, v, scale, window)
        if self.mode == "chunk":
            return self._chunk(layer, q, k, v, scale, window)
        s, cache = self.s, self.s.cache
        B = q.shape[0]
        cache.append(layer, k, v, self.positions, self.lengths, rows=self.rows, index=self.index)
        if window is not None and self.last >= window:  # some cached key may have left the window
            return self._windowed_decode(layer, q, scale, window)
        rows = self.rows if self.index is None else self.index
        scores = s.slot_scores[layer]
        step_scores = scores.new_zeros((B,) + scores.shape[1:]) if s.policy.needs_scores else None
        out = cache.decode_attention(layer, q[:, :, 0], scale, step_scores, rows=rows)
        if step_scores is not None:
            if self.index is None:
                scores[rows].add_(step_scores)
            else:
                scores.index_add_(0, self.index, step_scores)
        return out[:, :, None]

    def _windowed_decode(self, layer, q, scale, window):
        """A decode step of a sliding layer (q ``[n, Hq, 1, D]``, its key already cached): the
        sequences' cached keys gathered, those at positions ``<= t - window`` masked out for the
        query at ``t``. Evicting them instead would leave the heads of a sequence (whose
        policies keep different positions) with different numbers of slots."""
        s, cache = self.s, self.s.cache
        index = self.index if self.index is not None else torch.arange(q.shape[0], device=q.device)
        rows = range(q.shape[0]) if self.index is None else self.rows
        lens = cache.layers[layer].lens
        w = max(lens[b] for b in rows)
        kc, vc = cache.gather_rows(layer, index, w)
        kpos = cache.positions(layer, index, w)  # [n, Hkv, w], -1 past each length
        visible = (kpos >= 0) & (kpos > self.positions[:, :1, None] - window)
        # The query is index w - 1 (q_offset): a key it sees gets evicted_at w, the others 0.
        ev = visible.to(torch.int32) * w
        out = shadow_attention(q, kc, vc, ev, w - 1, scale)
        if s.policy.needs_scores:
            s.slot_scores[layer][:, :, :w].index_add_(0, index, _attention_mass(q, kc, w - 1, scale, None, ev))
        return out

    def _chunk(self, layer, q, k, v, scale, window=None):
        """Prefill chunks of several sequences (q ``[n, Hq, T, D]``, right-padded): each chunk
        attends to its sequence's survivors and causally to itself, all read from the cache.

        The sequences of a call are at the same position, so they hold the same number ``S``
        of survivors: the gathered keys ``[n, Hkv, S + T, D]`` put every chunk at slot ``S``,
        one ``q_offset`` for all. Keys past a chunk's end (its padding, or other pages' slots)
        are logged as evicted at that end, where only the padding queries would have seen
        them: those see nothing (zeros) and the kernels skip the tiles."""
        s, cache, rows, counts = self.s, self.s.cache, self.rows, self.counts
        live = {cache.layers[layer].lens[b] for b in rows}
        if len(live) != 1:  # the caller's grouping broke: never on user input
            raise RuntimeError(f"shadowkv: a prefill chunk call's sequences hold {sorted(live)} slots in layer {layer}")
        S, T = live.pop(), q.shape[2]
        cache.append(layer, k, v, self.positions, counts, rows=rows, index=self.index)
        kc, vc = cache.gather_rows(layer, self.index, S + T)
        ends = self.ends + S
        ev = ends[:, None, None].expand(kc.shape[:3]).contiguous()
        if window is not None:  # the query at slot S + i is at position c0 + i
            slots = cache.positions(layer, self.index, S + T) + (S - self.positions[:, :1, None])
            ev = window_log(ev, window, slots).clamp_(min=0)
        out = shadow_attention(q, kc, vc, ev, S, scale)
        if s.policy.needs_scores:
            for i, (b, c) in enumerate(zip(rows, counts)):
                s.slot_scores[layer][b, :, : S + c] += _attention_mass(
                    q[i : i + 1, :, :c], kc[i : i + 1, :, : S + c], S, scale, self.observe, ev[i : i + 1, :, : S + c]
                )[0]
        # As in _prompts, without sliding: the chunks of a call need as many survivors in every
        # sequence, which the policy's budget gives and a slide's per-sequence count would not.
        s._evict(rows, self.lengths, True, layers=[layer], slide=False)
        return out

    def _prompts(self, layer, q, k, v, scale, window=None):
        """Prefill of whole prompts (nothing was cached before): causal attention over their own
        keys, the keys cached, the layer evicted.

        Right-padded rows: the padding keys of a shorter prompt come after its last token, so
        only its padding queries (whose outputs are dropped) see them. Packed rows
        (:class:`PackedPrompts`): the log keeps each prompt to its own keys, and the cache gets
        each prompt's keys from its slots, a chunk of prompts at a time, longest first
        (``PackedPrompts.chunks``), so that no copy is larger than the packed rows."""
        s, cache, p = self.s, self.s.cache, self.packing
        # Within a prompt, slots differ by as much as positions (packed too), so a window applies by slot.
        if p is None:
            ev = torch.full(k.shape[:3], NEVER_EVICTED, dtype=torch.int32, device=q.device)
            out = shadow_attention(q, k, v, window_log(ev, window), 0, scale)
            cache.append(layer, k, v, self.positions, self.lengths, rows=self.rows)
        else:
            out = shadow_attention(q, k, v, window_log(p.log(k.shape[1]), window), 0, scale)
            for members, gather, positions in p.chunks:
                cache.append(layer, p.unpack(k, gather), p.unpack(v, gather), positions,
                             [self.lengths[i] for i in members], rows=[self.rows[i] for i in members])
        scores = s.slot_scores[layer]
        if s.policy.needs_scores:
            own = None if window is None else window_log(torch.full((k.shape[1], max(self.lengths)), NEVER_EVICTED,
                                                                    dtype=torch.int32, device=q.device), window)
            for i, n in enumerate(self.lengths):
                r, first = (i, 0) if p is None else p.slot(i)
                scores[self.rows[i], :, :n] += _attention_mass(q[r : r + 1, :, first : first + n],
                                                               k[r : r + 1, :, first : first + n], 0, scale,
                                                               self.observe, None if own is None else own[None, :, :n])[0]
        # This layer is done with its prompt keys: evict it now, not after the last layer,
        # so that only one layer at a time holds whole prompts. Repeats of a prompt get a
        # copy of its cache (and scores, and eviction log) instead of a forward of their own.
        src, dst = self.forks
        if s.policy.deterministic:  # a repeat would evict the same slots: copy the survivors
            s._evict(self.rows, self.lengths, True, layers=[layer])
            if dst:
                s._copy_rows(layer, src, dst)
            return out
        # Otherwise each repeat chooses on its own from the whole prompt: copies go a batch
        # at a time, each batch evicted before the next is copied.
        length_of = dict(zip(self.rows, self.lengths))
        for i in range(0, len(dst), self.fork_batch):
            a, b = src[i : i + self.fork_batch], dst[i : i + self.fork_batch]
            cache.fork(layer, a, b)
            if scores is not None:
                pairs = to_device([a, b], k.device, torch.int64)
                scores[pairs[1]] = scores[pairs[0]]
            s._evict(b, [length_of[r] for r in a], True, layers=[layer])
        s._evict(self.rows, self.lengths, True, layers=[layer])
        return out


_MASS_BLOCK = 1 << 24  # float32 scores per block of queries in _attention_mass (64 MiB)


def _attention_mass(q, k, q_offset, scale, observe, evicted_at=None):
    """Attention probability received by each key from the last ``observe`` queries (all if
    None), summed over queries and the GQA group: q ``[n, Hq, T, D]``, k ``[n, Hkv, L, D]`` ->
    ``[n, Hkv, L]`` float32, query ``i`` (index ``q_offset + i``) seeing keys ``j <= q_offset + i``
    (and, with ``evicted_at [n, Hkv, L]``, ``q_offset + i < evicted_at[j]``: a sliding window).
    For prefill (the decode kernel reports this itself) and a sliding layer's masked decode.

    The queries go a block at a time, each block's scores at most ``_MASS_BLOCK`` floats: all
    of them at once would be ``Hq x T x L`` (H2O observes every query: 8 GiB for one 8k-token
    prompt of 32 heads)."""
    n, Hkv, L, D = k.shape
    Hq, T = q.shape[1], q.shape[2]
    first = 0 if observe is None else max(0, T - observe)
    kf = k.float()
    cols = torch.arange(L, device=q.device)
    mass = kf.new_zeros(n, Hkv, L)
    step = max(1, _MASS_BLOCK // max(1, n * Hq * L))
    for t0 in range(first, T, step):
        qo = q[:, :, t0 : min(T, t0 + step)].float()  # [n, Hq, t, D]
        s = torch.einsum("bhgtd,bhld->bhgtl", qo.reshape(n, Hkv, Hq // Hkv, -1, D), kf) * scale
        pos = torch.arange(t0, t0 + qo.shape[2], device=q.device)[:, None] + q_offset
        hidden = cols[None, :] > pos  # [t, L]
        if evicted_at is not None:
            hidden = hidden | (pos >= evicted_at[:, :, None, None, :])  # [n, Hkv, 1, t, L]
        mass += torch.softmax(s.masked_fill(hidden, -math.inf), -1).sum(dim=(2, 3))
    return mass


def _prefer_visible(keep: torch.Tensor, pos: torch.Tensor, first_visible: torch.Tensor) -> torch.Tensor:
    """A policy's ``keep [n, Hkv, w]`` (bool) with each head's kept keys that a sliding window
    hid (positions ``pos [n, Hkv, w]`` below ``first_visible [n]``; -1 past a length) traded,
    oldest first, for its newest visible keys not kept, as many as there are of both: every
    head keeps as many slots, and none on a key no later query sees."""
    valid = pos >= 0
    hidden = valid & (pos < first_visible[:, None, None])
    wasted, spare = keep & hidden, valid & ~hidden & ~keep
    trades = torch.minimum(wasted.sum(-1), spare.sum(-1))[..., None]  # [n, Hkv, 1]
    return (keep & ~_first(wasted, pos, trades)) | _first(spare, -pos, trades)


def _first(mask: torch.Tensor, key: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The slots of ``mask`` that are among its first ``n`` (broadcast over the last dim) by
    ``key`` (an int tensor, distinct within ``mask`` along the last dim)."""
    rank = torch.where(mask, key, torch.iinfo(key.dtype).max).argsort(-1).argsort(-1)
    return mask & (rank < n)


def zero_in_float32(temperature: float) -> bool:
    """Whether a positive ``temperature`` rounds to 0 in float32, the precision the logits are
    divided in (below ~1.4e-45, float32's smallest subnormal): the division then gave NaN."""
    return temperature > 0 and torch.tensor(temperature, dtype=torch.float32).item() == 0


class NonFiniteLogitsError(RuntimeError):
    """The model's logits were NaN while sampling: its weights or inputs are not finite."""


def _refuse_logit_processing(config) -> None:
    """Some causal LMs change their logits after the output embedding (Gemma 2's final
    soft-capping, Cohere's logit scale, Granite's logit scaling). The sampler computes the
    first token's logits with the output embedding alone (:meth:`Sampler._forward_last`), so
    they would be another model's (and its log-probs not the learner's): refused, as attention
    soft-capping is."""
    for name, neutral, what, example in (("final_logit_softcapping", None, "final logit soft-capping", "Gemma 2"),
                                         ("logit_scale", 1, "a logit scale", "Cohere"),
                                         ("logits_scaling", 1, "logit scaling", "Granite")):
        value = getattr(config, name, None)
        if value not in (None, neutral):
            raise NotImplementedError(f"shadowkv: the model applies {what} ({name}={value!r}, e.g. {example}) to "
                                      f"its logits after the output embedding, which shadowkv's sampler does not "
                                      f"implement")


def _rope_types(config) -> set[str]:
    """The RoPE types of a transformers config: ``rope_parameters`` (transformers 5; one dict,
    or one per layer type) or ``rope_scaling`` (4.x; ``rope_type`` or ``type``)."""
    found = set()
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if not isinstance(params, dict):
            continue
        for d in ([params] if ("rope_type" in params or "type" in params) else params.values()):
            if isinstance(d, dict):
                found.add(str(d.get("rope_type", d.get("type", "default"))))
    return found


def _refuse_call_dependent_rope(config) -> None:
    """Dynamic-NTK and LongRoPE recompute the rotary frequencies from the longest position of
    each forward call: the sampler's keys are rotated a step at a time, the learner's replay
    rotates all of them with its longest sequence's frequencies, so past the original context
    length the two compute different log-probs (FullCache included). Refused, not silently
    off-policy."""
    bad = sorted(_rope_types(config) & {"dynamic", "longrope"})
    if bad:
        raise NotImplementedError(f"shadowkv: the model's rotary embedding ({bad[0]!r} rope_type) depends on the "
                                  "longest position of each forward call, so the sampler's step-by-step keys and "
                                  "the learner's replay would differ; use a model with a fixed RoPE (default, "
                                  "linear, yarn, llama3)")


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued so far: on a GPU the
    host runs ahead of the kernels, and the rollout's prefill/decode timings (and tokens/s) would
    otherwise count only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Sampler:
    """Generates with a compressed KV cache and logs every eviction.

    Args:
        model: a transformers causal LM (Llama/Qwen2/Qwen3/Mistral/Gemma 3 families); its attention
            implementation is switched to ``shadowkv`` (plain SDPA outside the sampler).
        policy: which tokens to keep (:mod:`shadowkv.policies`).
        budget: live tokens per sequence and layer: int, or float fraction of the current
            length, or a list with one such budget per layer; ``None`` (or a ``FullCache``
            policy) keeps everything, unless the policy's arguments imply a budget
            (``policy.budget``: ``StreamingLLM(sinks, window)``, ``H2O(heavy=, recent=)``).
        page_size: tokens per KV page.
        max_batch: largest batch :meth:`generate` accepts.
        evict_every: evict after the prefill and then every this many decode steps only
            (Sparse-RL's schedule; a sequence then holds up to its budget + ``evict_every``
            tokens); default ``None`` evicts whenever a sequence exceeds its budget by a page.
        prefill_chunk: prefill prompts in chunks of this many tokens, evicting at each
            chunk boundary (bounds the peak for long prompts); the chunks that start at the
            same position run in one call, each after its own survivors (a call of several
            sequences holds all their chunks: ``prefill_tokens=1`` runs one a call, at the
            lowest peak). ``None``: whole prompts, many per model call.
        prefill_tokens: with ``prefill_chunk``, the most tokens one call holds in a layer,
            counted as each sequence's survivors and chunk in whole pages (default:
            ``num_layers`` sequences' worth); at least one sequence a call. With whole
            prompts, the most prompt tokens one prefill call holds in a layer, rounded up to
            whole pages; bounds its activations and the KV of prompts not yet evicted. Packed
            (``pack_prompts``), a call's rows x its longest prompt and
            its sequences' own pages (repeats included) each stay within it, and so does every
            copy of its keys for the cache; right-padded, its sequences (repeats included) x its
            longest prompt. A longer prompt goes alone; so does a prompt whose repeats do not
            fit beside it under a stochastic policy, each copy then held beside it in turn (up to
            twice its pages). Each layer is evicted as soon as its attention is done, so a call
            holds whole prompts in one layer at a time; the default, ``num_layers`` x the
            longest prompt's pages, is what prefilling that prompt alone held in all layers.
        share_prompts: prefill each distinct prompt once and give its repeats (the samples of
            a GRPO group) a copy of its cache, layer by layer: with a deterministic policy a
            copy of its survivors (it is evicted once), otherwise of the whole prompt, each
            copy then evicted on its own. With ``prefill_chunk``, deterministic policies only
            (a copy of what survived the last chunk); under a stochastic one every sequence
            runs its chunks, choosing on its own at every boundary.
        pack_prompts: a whole-prompt prefill call whose prompts differ in length runs them
            packed end to end in rows as wide as its longest prompt (longest first, each in the
            first row with room; positions restart per prompt, and the shadow mask keeps each
            prompt to its own keys) when that takes fewer rows than right-padding them, so
            less of the call's work is padding; calls then take prompts longest first, so that
            short prompts fill the rows of long ones. The rollout is the same up to float
            rounding (with RandomEvict, whose draws depend on which sequences it evicts together,
            the same only when the calls are: ``prefill_tokens`` large enough for one).
    """

    def __init__(self, model, policy: Policy | None = None, budget: int | float | list | None = None, page_size: int = 16,
                 max_batch: int = 64, evict_every: int | None = None, prefill_chunk: int | None = None,
                 prefill_tokens: int | None = None, share_prompts: bool = True, pack_prompts: bool = True):
        if policy is not None and not isinstance(policy, Policy):
            names = ", ".join(cls.__name__ for cls in POLICIES.values())
            raise TypeError(f"policy must be a shadowkv.policies.Policy ({names} or a subclass; "
                            f"make_policy(name) builds one by name), got {policy!r}")
        if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
            # The sampler applies the output embedding itself (_logits); a base model has none.
            raise TypeError(f"shadowkv: the sampler needs a causal LM with an output embedding (an ...ForCausalLM), "
                            f"got {type(model).__name__}")
        _refuse_logit_processing(model.config)
        _refuse_call_dependent_rope(model.config)
        self.model = install(model)
        self.policy = policy or FullCache()
        implied = getattr(self.policy, "budget", None)  # DESIGN §4's StreamingLLM(sinks, window), H2O(heavy=, recent=)
        if implied is not None and budget is not None and budget != implied:
            raise ValueError(f"{self.policy!r} keeps {implied} tokens (its arguments' sum), and budget={budget!r} "
                             "says otherwise; give one of the two")
        self.budget = None if isinstance(self.policy, FullCache) else (implied if budget is None else budget)
        self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = model_geometry(model)
        if self.budget is not None:
            per_layer = list(self.budget) if isinstance(self.budget, (list, tuple)) else [self.budget] * self.num_layers
            if len(per_layer) != self.num_layers:
                raise ValueError(f"budget has {len(per_layer)} entries for a model of {self.num_layers} layers")
            for i, b in enumerate(per_layer):
                if b is None:  # a layer without eviction is not supported: every layer of a row evicts together
                    raise ValueError(f"budget[{i}] is None; give every layer a budget (or use FullCache)")
                budget_tokens(b, 1)  # validates
            self.layer_budgets = per_layer
        self.page_size, self.max_batch = as_int("page_size", page_size), as_int("max_batch", max_batch)
        self.evict_every, self.prefill_chunk, self.prefill_tokens = (
            None if value is None else as_int(name, value)
            for name, value in (("evict_every", evict_every), ("prefill_chunk", prefill_chunk),
                                ("prefill_tokens", prefill_tokens)))
        self.share_prompts, self.pack_prompts = share_prompts, pack_prompts
        self.cache: PagedKVCache | None = None
        self.slot_scores: list[torch.Tensor | None] = []
        self.evicted_at: torch.Tensor | None = None

    def release(self) -> None:
        """Drops the last :meth:`generate`'s KV pool, score buffers and log (the returned Rollout
        keeps what it holds: its log may be a view of this one). generate() keeps them for
        inspection until the next call; a trainer calls this before its learner step, which
        would otherwise run beside a whole pool."""
        self.cache, self.slot_scores, self.evicted_at = None, [], None

    # ---- sizing
    def _max_live(self, total: int, prompt: int) -> int:
        """Most slots a sequence of ``total`` tokens holds in a layer: its survivors (at most the
        budget) plus a prefill chunk (the whole prompt without ``prefill_chunk``) or, while
        decoding, the tokens appended since its last eviction (the query's own key included):
        ``evict_every`` of them on a fixed schedule, else up to a page over the budget + 1."""
        if self.budget is None:
            return total
        chunk = self.prefill_chunk or prompt
        keep = max(budget_tokens(b, total) for b in self.layer_budgets)
        return min(total, keep + max(chunk, self.evict_every or self.page_size + 1))

    def _new_cache(self, B: int, prompt_lens: list[int], max_new: int) -> PagedKVCache:
        totals = [p + max_new for p in prompt_lens]
        per_seq = [math.ceil(self._max_live(t, p) / self.page_size) + 1 for t, p in zip(totals, prompt_lens)]
        max_pages = math.ceil(max(totals) / self.page_size) + 1
        # Slots a sequence can reach: what its pages hold (per-slot state is that wide, not T).
        self._slot_width = min(max(per_seq), max_pages) * self.page_size
        p = next(self.model.parameters())
        # Under autocast the attention gets (and stores) keys and values in the autocast dtype.
        autocast = torch.is_autocast_enabled(p.device.type)
        dtype = torch.get_autocast_dtype(p.device.type) if autocast else p.dtype
        return PagedKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, num_pages=sum(per_seq), page_size=self.page_size,
            max_batch=B, max_pages_per_seq=max_pages, dtype=dtype,
            device=p.device,
            # The cache's own bookkeeping makes the tables and lengths right; on a GPU the ops then
            # skip their host round trips (a decode step does not wait for the device), and
            # verify() at the end of generate() reports any value the device rejected.
            check=p.device.type != "cuda",
        )

    # ---- eviction
    def _evict(self, rows: list[int], lengths: list[int], force: bool, layers: list[int] | None = None,
               slide: bool = True) -> None:
        """Evicts the sequences ``rows`` (each layer of ``layers``, default all, to its own
        budget) before their queries at ``lengths``: one policy call and one
        ``evict_compact`` per layer for all of them. With ``slide``, a sliding layer first
        drops what its window hid (:meth:`_slide`), so that the budget goes to keys its
        queries can still see.

        Without ``force`` a sequence waits until it exceeds its budget by a page (one
        eviction per page of decoding, not per token); the prefill and the ``evict_every``
        schedule force it.
        """
        cache, device = self.cache, self.evicted_at.device
        slack = 0 if force else self.page_size
        revote = self.policy.needs_scores and self.policy.reset_scores_after_evict
        # A forced call (the prefill, a chunk boundary, an evict_every boundary) is a vote for
        # every row, due or not: SnapKV's scores then hold the queries since that point only.
        # Reset after the choice, also where nothing was due: a prompt within its budget carried
        # its window's votes into the first decode eviction, and a chunk boundary into the next
        # one's. Otherwise the rows evicted start anew.
        every_row = to_device(rows, device, torch.int64) if revote and force and self.budget is not None else None
        for layer in range(self.num_layers) if layers is None else layers:
            if slide and layer in self.windows:
                self._slide(layer, rows, lengths, force)
            if self.budget is None:
                continue
            # Runs before every decode step and is due once a page: kept to list lookups (the
            # per-row budget_tokens and checked seq_len calls were a fifth of a B=64 rollout on
            # the CPU). Sequences decoding in lockstep share a few lengths, so budgets are memoised.
            live, budgets, due = cache.layers[layer].lens, {}, []
            for b, n in zip(rows, lengths):
                k = budgets.get(n)
                if k is None:
                    k = budgets[n] = budget_tokens(self.layer_budgets[layer], n)
                if live[b] > k + slack:
                    due.append((b, n, k))
            if not due:
                if every_row is not None:
                    self.slot_scores[layer][every_row] = 0.0
                continue
            picked, steps, n_keep = (list(t) for t in zip(*due))
            idx = to_device(picked, device, torch.int64)
            scores = self.slot_scores[layer]
            # The policy sees the due sequences' live slots only (not the whole table's width,
            # which grows with the rollout while the live slots stay near the budget).
            lens = [cache.seq_len(layer, b) for b in picked]
            w = max(lens)
            pos = cache.positions(layer, idx, w)
            keep = self.policy.select_batch(pos, scores[idx, :, :w] if self.policy.needs_scores else None, lens, n_keep)
            at = to_device(steps, device, torch.int32)
            if layer in self.windows:  # keys the slide could not drop in every head: not worth a slot
                keep = _prefer_visible(keep, pos, at - (self.windows[layer] - 1))
            # The policy's keep counts are checked on what the op did (the new lengths it reads back
            # anyway), not before: a check before would cost a second synchronisation per layer.
            # Counts that differ between heads are rejected by the op, which leaves such a
            # sequence's slots as they were (an unchecked CUDA call also marks its length -1, and
            # the cache reports it); equal but wrong counts are compacted, then reported.
            try:
                self._keep(layer, idx, keep, at)
            except (RuntimeError, ValueError) as err:
                raise RuntimeError(f"evicting layer {layer} failed; {self.policy!r} kept "
                                   f"{keep.sum(-1).tolist()} slots per head, expected {n_keep}: {err}") from err
            if [cache.seq_len(layer, b) for b in picked] != n_keep:
                raise RuntimeError(f"{self.policy!r} kept {keep.sum(-1).tolist()} slots per head, expected {n_keep}")
            if revote:
                scores[idx if every_row is None else every_row] = 0.0

    def _slide(self, layer: int, rows: list[int], lengths: list[int], force: bool) -> None:
        """Evicts keys that the sliding ``layer``'s window hid from the sequences ``rows``
        (queries from ``lengths`` on: positions ``<= length - window``). Exact, since no later
        query sees them; it bounds a sliding layer's cache by about its window, FullCache's
        included. The cache keeps the same number of slots in every head, while per-head
        policies leave heads with different hidden keys: each head drops as many as the head
        with fewest has, its oldest; the windowed decode masks the rest. Logged at ``lengths``
        (lowered to ``j + window`` at the end of :meth:`generate`). Without ``force`` a
        sequence slides once a page of decoding (each slide reads its positions)."""
        window, cache, device = self.windows[layer], self.cache, self.evicted_at.device
        last, lc = self._slid[layer], cache.layers[layer]
        due = [(b, n) for b, n in zip(rows, lengths) if n >= window and lc.lens[b] > 0
               and (force or n - last.get(b, -self.page_size) >= self.page_size)]
        if not due:
            return
        for b, n in due:
            last[b] = n
        picked, steps = (list(t) for t in zip(*due))
        idx = to_device(picked, device, torch.int64)
        w = max(lc.lens[b] for b in picked)
        pos = cache.positions(layer, idx, w)  # [n, Hkv, w], -1 past each length
        t = to_device(steps, device, torch.int32)
        hidden = (pos >= 0) & (pos <= t[:, None, None] - window)
        count = hidden.sum(-1).amin(-1)[:, None, None]  # [n, 1, 1]: what every head of the sequence can drop
        if not bool(count.any()):
            return
        self._keep(layer, idx, (pos >= 0) & ~_first(hidden, pos, count), t)  # each head's oldest

    def _keep(self, layer: int, idx: torch.Tensor, keep: torch.Tensor, steps: torch.Tensor) -> None:
        """Keeps the slots ``keep [n, Hkv, w]`` of the sequences ``idx`` (``[n]`` int64) in
        ``layer``, logging the others evicted at ``steps [n]`` (int32); every other sequence
        keeps all its slots, which the op leaves as they are."""
        cache, scores, device = self.cache, self.slot_scores[layer], self.evicted_at.device
        full = torch.arange(self._slot_width, device=device) < cache.layers[layer].seq_lens[:, None, None]
        full = full.expand(-1, self.num_kv_heads, -1).clone()
        full[idx, :, : keep.shape[-1]] = keep
        step_of = torch.zeros(cache.max_batch, dtype=torch.int32, device=device)
        step_of[idx] = steps
        cache.evict(layer, full, step_of, self.evicted_at[:, layer], scores)

    def _copy_rows(self, layer: int, src: list[int], dst: list[int]) -> None:
        """Gives each (empty) sequence ``dst[i]`` a copy of sequence ``src[i]`` in ``layer``: its
        cache (pages of its own), its slots' scores and its eviction log."""
        self.cache.fork(layer, src, dst)
        pairs = to_device([src, dst], self.evicted_at.device, torch.int64)
        if self.slot_scores[layer] is not None:
            self.slot_scores[layer][pairs[1]] = self.slot_scores[layer][pairs[0]]
        self.evicted_at[pairs[1], layer] = self.evicted_at[pairs[0], layer]

    # ---- sampling
    @staticmethod
    def _sample(logits, temperature, top_p, gen, top_k=0):
        """logits ``[B, V]`` -> (tokens ``[B]``, log-probs ``[B]`` under softmax(logits/T), also
        with ``top_p < 1`` or ``top_k``: see :class:`Rollout`)."""
        logits = logits.float()
        if temperature == 0.0:
            tok = logits.argmax(-1)
            return tok, tempered_log_softmax(logits, 1.0).gather(-1, tok[:, None])[:, 0]
        logp = tempered_log_softmax(logits, temperature)
        probs = logp.exp()
        by_k = 0 < top_k < probs.shape[-1]
        if by_k:  # the k most likely, and every token tied with the k-th
            kth = probs.topk(top_k, -1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
        if top_p < 1.0:  # then the nucleus of what is left, as transformers' and vLLM's samplers order them
            sp, si = probs.sort(-1, descending=True)
            mass = sp.cumsum(-1) - sp
            if by_k:  # the nucleus of the renormalised top k
                mass = mass / sp.sum(-1, keepdim=True)
            drop = mass >= top_p  # keep the smallest prefix reaching top_p (the first token always)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
        # torch.multinomial(probs, 1) draws exactly this (its one-sample path: the argmax of p / q,
        # q ~ Exp(1) from the same generator), after reading two validity checks back to the host:
        # a sync every decode step on a GPU. Probabilities from a softmax are never negative and
        # never all zero, so only NaN logits make them invalid: generate() checks once at the end.
        q = torch.empty_like(probs).exponential_(1, generator=gen)
        tok = probs.div(q).argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]

    def _forward(self, ids, positions, ctx):
        with attention_context(ctx), returning_dicts(self.model, self.model.get_decoder()):
            return self.model(input_ids=ids, position_ids=positions.long(), use_cache=False,
                              return_dict=True).logits[:, -1]

    def _forward_last(self, ids, positions, ctx, last: torch.Tensor, last_row: torch.Tensor | None = None):
        """Logits at column ``last[b]`` of row ``b`` (of row ``last_row[b]`` when given) only:
        the LM head on B positions, not on B x L (``[B, L, vocab]`` logits of a prefill can be
        gigabytes). The supported families (Llama, Qwen2, Qwen3, Mistral, Gemma 3) apply the output
        embedding and nothing after it, which is what the causal-LM forward does for them too
        (models that do more are refused: :func:`_refuse_logit_processing`)."""
        decoder = self.model.get_decoder()
        with attention_context(ctx), returning_dicts(decoder):
            h = decoder(input_ids=ids, position_ids=positions.long(), use_cache=False, return_dict=True)
        rows = torch.arange(ids.shape[0], device=ids.device) if last_row is None else last_row
        h = h.last_hidden_state[rows, last]
        return self.model.get_output_embeddings()(h)

    def _prefill_limit(self, plens: list[int]) -> int:
        """Most prompt tokens one prefill call may hold in a layer, counted in whole pages
        (``prefill_tokens``; default: the longest prompt's pages in every layer)."""
        return self.prefill_tokens or self.num_layers * self._paged(max(plens))

    def _chunk_rows(self, plens: list[int]) -> int:
        """Sequences per call of a chunked prefill: each holds at most its survivors and a chunk
        in a layer (``_max_live`` of its prompt), and a call holds at most ``prefill_tokens`` of
        those (default: ``num_layers`` sequences' worth). At least one."""
        longest = max(plens)
        held = self._paged(self._max_live(longest, longest))
        return max(1, (self.prefill_tokens or self.num_layers * held) // held)

    def _paged(self, n: int) -> int:
        """``n`` tokens rounded up to whole pages."""
        return -(-n // self.page_size) * self.page_size

    def _prefill_groups(self, plens: list[int], rows: list[int] | None = None) -> list[list[int]]:
        """Prompts per batched prefill call (indices into ``plens``, ascending in each call), at
        least one each, holding at most ``_prefill_limit`` tokens in a layer, counted in whole
        pages (which bounds the pages a call holds: many short prompts, a partly filled page
        each, would otherwise exceed it). Prompt ``i`` counts ``rows[i]`` sequences (its repeats
        hold whole prompts in the layer too). A longer prompt goes alone.

        Right-padded (``pack_prompts=False``): consecutive prompts, holding their sequences x
        the longest prompt. Packed: longest first, each call taking prompts while its packed
        rows x its longest prompt and its sequences' own pages both stay within the limit, so
        that short prompts fill the rows of long ones."""
        rows = rows or [1] * len(plens)
        limit = self._prefill_limit(plens)
        groups, group = [], []
        if not self.pack_prompts:
            longest, held = 0, 0
            for i, (n, r) in enumerate(zip(plens, rows)):
                if group and (held + r) * self._paged(max(longest, n)) > limit:
                    groups.append(group)
                    group, longest, held = [], 0, 0
                group.append(i)
                longest, held = max(longest, n), held + r
            return groups + [group]
        held = 0  # the group's sequences' own pages
        for i in sorted(range(len(plens)), key=lambda i: -plens[i]):
            own = held + rows[i] * self._paged(plens[i])
            lens = [plens[j] for j in group] + [plens[i]]
            packed_rows = first_fit_decreasing(lens, lens[0])[2]  # lens[0]: the longest
            if group and max(own, packed_rows * self._paged(lens[0])) > limit:
                groups.append(sorted(group))
                group, own = [], rows[i] * self._paged(plens[i])
            group.append(i)
            held = own
        return groups + [sorted(group)]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 top_k: int = 0) -> Rollout:
        """Samples ``max_new_tokens`` (fewer after EOS) for each prompt.

        Args:
            prompts: ``[B, L]`` int tensor (all of length L) or a list of 1-D int tensors /
                int lists (ragged).
            temperature: 0 for greedy decoding.
            eos_token_id: a token id, or a list of them (``generation_config.eos_token_id``),
                that ends a sequence; None: every sequence runs ``max_new_tokens``.
            top_p, top_k: draw from the smallest set of most likely tokens holding ``top_p`` of
                the probability, among the ``top_k`` most likely (and those tied with the k-th;
                0: all). The log-probs are still the policy's (:class:`Rollout`).
        Returns:
            a :class:`Rollout` (on the model's device).
        """
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(temperature) and temperature >= 0) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if zero_in_float32(temperature):
            raise ValueError(f"temperature {temperature} is 0 in float32, the precision the logits are divided in: "
                             "use at least 1.4e-45, or 0 for greedy decoding")
        max_new_tokens = as_int("max_new_tokens", max_new_tokens)
        top_k = as_int("top_k", top_k, 0)
        if seed is not None:
            seed = as_int("seed", seed, 0)  # NumPy integers too
            if seed >= 2**63:
                raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
        device = next(self.model.parameters()).device
        if getattr(self.model, "_original_forward", None) is not None and not torch.is_autocast_enabled(device.type):
            # accelerate's mixed precision wraps forward() in autocast; the prefill, which runs the
            # decoder and the output embedding on their own, would then store float32 keys and
            # the decode autocast ones.
            raise RuntimeError("shadowkv: the model's forward is wrapped (accelerate's mixed precision?) and "
                               "generate() runs outside autocast, so the prefill and the decode steps would run in "
                               "different dtypes; call generate() inside the same torch.autocast, or on the "
                               "unwrapped model (accelerator.unwrap_model)")
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts must be [B, L], got shape {tuple(prompts.shape)}")
            prompts = list(prompts)
        prompts = [torch.as_tensor(p) for p in prompts]
        B = len(prompts)
        if not 0 < B <= self.max_batch:
            raise ValueError(f"batch of {B} prompts; this sampler takes 1..{self.max_batch}")
        if any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("every prompt must be a non-empty 1-D sequence of token ids")
        for b, p in enumerate(prompts):  # converting 1.7 to a token id would silently truncate it
            if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise TypeError(f"prompts[{b}] must hold integer token ids, got dtype {p.dtype}")
        prompts = [p.long() for p in prompts]
        vocab = self.model.get_input_embeddings().num_embeddings
        # The pad id fills ragged prompts in the prefill and the rollout past each sequence's end,
        # which the learner's replay reads: it must be a token of the model too.
        pad_token_id = as_int("pad_token_id", pad_token_id, None)
        if not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (the model's vocabulary), "
                             f"got {pad_token_id}")
        # One id or several (generation_config.eos_token_id is a list for Llama 3, Qwen2.5-Instruct):
        # a list compared with the tokens was the Python value False, and nothing ever ended.
        eos_ids = None
        if eos_token_id is not None:
            many = isinstance(eos_token_id, (list, tuple, set, frozenset)) or (
                isinstance(eos_token_id, torch.Tensor) and eos_token_id.dim() > 0) or (
                type(eos_token_id).__module__ == "numpy" and getattr(eos_token_id, "ndim", 0) > 0)
            ids = [as_int("eos_token_id", e, None) for e in (list(eos_token_id) if many else [eos_token_id])]
            if not ids or any(not 0 <= e < vocab for e in ids):
                raise ValueError(f"eos_token_id must be a token id in [0, {vocab}) (the model's vocabulary) or a "
                                 f"non-empty list of them, got {eos_token_id!r}")
            eos_ids = torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):  # an id past the embedding would be an IndexError deep in the model
            lo, hi = (int(x) for x in torch.aminmax(p))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompts[{b}] holds token id {lo if lo < 0 else hi}, outside the model's "
                                 f"vocabulary [0, {vocab})")
        keys = [tuple(p.tolist()) if self.share_prompts else b for b, p in enumerate(prompts)]
        prompts = [p.to(device) for p in prompts]
        plens = [p.numel() for p in prompts]
        T = max(plens) + max_new_tokens
        if seed is None:
            seed = torch.Generator().seed() % 2**63  # fresh entropy, global RNG untouched
        # On the model's device: a CPU generator would take the probabilities to the host each
        # step. Draws are reproducible per seed and device type.
        gen = torch.Generator(device=device).manual_seed(seed)
        self.policy.reset(seed)

        self.release()  # the previous call's pool goes before this one's is allocated, not after
        self.cache = self._new_cache(B, plens, max_new_tokens)
        self.windows: dict[int, int] = {}  # sliding layers' windows, as the model's attention reports them
        self._slid: dict[int, dict[int, int]] = collections.defaultdict(dict)  # layer -> row -> last slide
        # Score-based policies' accumulated attention per slot (None for the others): float32
        # [B, Hkv, slots a sequence can reach], counted in kv_peak_bytes.
        self.slot_scores = [torch.zeros(B, self.num_kv_heads, self._slot_width, device=device)
                            if self.policy.needs_scores else None for _ in range(self.num_layers)]
        self.evicted_at = torch.full((B, self.num_layers, self.num_kv_heads, T), NEVER_EVICTED, dtype=torch.int32,
                                     device=device)
        tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, T, device=device)
        action = torch.zeros(B, T, dtype=torch.bool, device=device)

        t0 = _clock(device)
        observe = getattr(self.policy, "window", None)
        for b, p in enumerate(prompts):
            tokens[b, : plens[b]] = p
        # Each sequence's first-token logits; sampled once, in row order, after the prefill,
        # so that the draws do not depend on how the prompts were grouped or shared.
        first = None
        first_row: dict = {}
        owner = [first_row.setdefault(key, b) for b, key in enumerate(keys)]  # first row with this prompt
        repeats: dict[int, list[int]] = {a: [] for a in first_row.values()}
        for b, a in enumerate(owner):
            if b != a:
                repeats[a].append(b)
        firsts = list(repeats)
        if self.prefill_chunk is None:
            limit = self._prefill_limit(plens)
            for group in self._prefill_groups([plens[a] for a in firsts], [1 + len(repeats[a]) for a in firsts]):
                rows = [firsts[i] for i in group]
                lens = [plens[a] for a in rows]
                src = [a for a in rows for _ in repeats[a]]
                dst = [b for a in rows for b in repeats[a]]
                width = max(lens)
                # A shorter prompt is padded with pad_token_id at positions past its end.
                ids = tokens[to_device(rows, device, torch.int64), :width]
                pos = torch.arange(width, dtype=torch.int32, device=device).expand(len(lens), width).contiguous()
                packing = None
                if self.pack_prompts and first_fit_decreasing(lens, width)[2] < len(lens):
                    packing = PackedPrompts(lens, device)
                # Copies of whole prompts (a stochastic policy's repeats) a call may hold beside its
                # prompts: packed calls were sized with their own prompts' pages, right-padded
                # ones with their longest prompt's for each.
                held = (sum(map(self._paged, lens)) if self.pack_prompts else len(rows) * self._paged(width))
                ctx = _SamplerContext(self, rows, pos, "prompts", observe, lens, (src, dst),
                                      fork_batch=max(1, (limit - held) // self._paged(width)),
                                      packing=packing)  # evicts per layer
                if packing is None:
                    logits = self._forward_last(ids, pos, ctx, to_device([n - 1 for n in lens], device, torch.int64))
                else:
                    logits = self._forward_last(packing.place(ids, pad_token_id), packing.positions, ctx,
                                                packing.last_col, packing.last_row)
                if first is None:
                    first = logits.new_empty(B, logits.shape[-1])
                first[to_device(rows, device, torch.int64)] = logits
            first = first[to_device(owner, device, torch.int64)]  # repeats: their prompt's logits
        else:
            # Chunk by chunk, the sequences at the same position batched: chunk c0 of every prompt
            # longer than c0, ``_chunk_rows`` sequences a call, longest chunk first (the shorter
            # last chunks share calls, which are as wide as their longest chunk). With a
            # deterministic policy a repeated prompt runs once and its repeats get a copy of what
            # survived its last chunk: each chunk boundary would evict the same slots of a repeat.
            # Otherwise every repeat chooses at every boundary on its own, so every sequence runs.
            share = self.policy.deterministic
            seqs = firsts if share else list(range(B))
            C, per_call = self.prefill_chunk, self._chunk_rows(plens)
            for c0 in range(0, max(plens), C):
                active = sorted((b for b in seqs if plens[b] > c0), key=lambda b: -min(plens[b] - c0, C))
                for i in range(0, len(active), per_call):
                    rows = active[i : i + per_call]
                    counts = [min(plens[b], c0 + C) - c0 for b in rows]
                    index = to_device(rows, device, torch.int64)
                    # A shorter (last) chunk is padded with the tokens after its prompt: pad_token_id.
                    ids = tokens[index, c0 : c0 + max(counts)]
                    pos = torch.arange(c0, c0 + ids.shape[1], dtype=torch.int32, device=device).repeat(len(rows), 1)
                    ctx = _SamplerContext(self, rows, pos, "chunk", observe, [c0 + c for c in counts],
                                          index=index, counts=counts)  # evicts per layer
                    logits = self._forward_last(ids, pos, ctx, to_device([c - 1 for c in counts], device, torch.int64))
                    if first is None:
                        first = logits.new_empty(B, logits.shape[-1])
                    first[index] = logits  # a sequence's last chunk writes last
            if share:
                src, dst = [a for a in firsts for _ in repeats[a]], [b for a in firsts for b in repeats[a]]
                if dst:
                    for layer in range(self.num_layers):
                        self._copy_rows(layer, src, dst)
                first = first[to_device(owner, device, torch.int64)]
        next_tok, next_lp = self._sample(first, temperature, top_p, gen, top_k)
        t1 = _clock(device)

        cur = to_device(plens, device, torch.int64)  # position of each sequence's next token
        cur_host = list(plens)  # the same on the host: eviction decisions read no device value
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # Whether sequences ended is a device value: reading it waits for the GPU, so there it is
        # read every few steps (the steps in between change nothing visible).
        done_every = 1 if device.type == "cpu" else 8
        # Sequences the host has seen end: their pages go back to the pool, and the remaining
        # steps neither append to nor evict them nor run their rows through the model. Without
        # this an ended sequence kept growing and evicting until the longest one ended: memory
        # the peak counted (a FullCache rollout up to max_new_tokens for every sequence) and
        # evictions its log recorded past its end; and a group of GRPO samples whose lengths
        # differ paid every step for the whole batch.
        ended = [False] * B
        running, run_index = list(range(B)), None  # run_index: `running` on the device, once some ended
        for step in range(max_new_tokens):
            live = ~done
            col = cur[:, None]
            # Written through masks, not boolean indexing (which would wait for the device).
            tokens.scatter_(1, col, torch.where(live, next_tok, tokens.gather(1, col)[:, 0])[:, None])
            logprobs.scatter_(1, col, torch.where(live, next_lp, logprobs.gather(1, col)[:, 0])[:, None])
            action.scatter_(1, col, (live | action.gather(1, col)[:, 0])[:, None])
            if eos_ids is not None:
                done |= live & torch.isin(next_tok, eos_ids)
                if step % done_every == done_every - 1:
                    seen = done.tolist()
                    if all(seen):
                        break
                    for b in range(B):
                        if seen[b] and not ended[b]:
                            ended[b] = True
                            self.cache.release(b)
                    if len(running) != B - sum(ended):
                        running = [b for b in range(B) if not ended[b]]
                        run_index = to_device(running, device, torch.int64)
            if step == max_new_tokens - 1:
                break
            if self.evict_every is None:  # once a sequence is a page over its budget
                self._evict(running, [cur_host[b] for b in running], force=False)
            elif step % self.evict_every == 0 and step > 0:  # step 0 follows the prefill's eviction
                self._evict(running, [cur_host[b] for b in running], force=True)
            pos = cur.to(torch.int32)[:, None]
            if run_index is None:
                ctx = _SamplerContext(self, slice(0, B), pos, "decode", lengths=[1] * B, last=max(cur_host))
                logits = self._forward(next_tok[:, None], pos, ctx)
            else:
                # The running rows only. The ended rows get logits of 0: every row still draws,
                # so that a sequence's draws do not depend on when the others end (what an ended
                # row draws is not recorded).
                pos = pos[run_index]
                ctx = _SamplerContext(self, running, pos, "decode", lengths=[1] * len(running), index=run_index,
                                      last=max(cur_host[b] for b in running))
                run_logits = self._forward(next_tok[run_index, None], pos, ctx)
                logits = run_logits.new_zeros(B, run_logits.shape[-1]).index_copy_(0, run_index, run_logits)
            cur += 1
            cur_host = [c + 1 for c in cur_host]
            next_tok, next_lp = self._sample(logits, temperature, top_p, gen, top_k)
        t2 = _clock(device)

        self.cache.verify()  # an op that ran unchecked on the GPU and rejected a value surfaces here
        if logprobs[action].isnan().any():  # as torch.multinomial would have refused (_sample)
            raise NonFiniteLogitsError("shadowkv: the model gave NaN logits while sampling (the log-probs of sampled "
                               "tokens are NaN); its weights or inputs are not finite")
        lens = torch.tensor(plens, device=device) + action.sum(-1)
        T_used = int(lens.max())
        for layer, window in self.windows.items():  # keys a sliding layer's window hid from later tokens
            hid = self.evicted_at[:, layer, :, : max(0, T_used - window)]
            hid.copy_(window_log(hid, window))
        # In the cache's dtype (under autocast the keys are stored in the autocast dtype, and the
        # parameters' float32 size doubled the dense bytes).
        elt = torch.empty((), dtype=self.cache.dtype).element_size()
        dense = int(lens.sum()) * self.num_layers * self.num_kv_heads * 2 * self.head_dim * elt
        n_gen = int(action.sum())
        return Rollout(
            tokens=tokens[:, :T_used],
            prompt_lens=torch.tensor(plens, device=device),
            action_mask=action[:, :T_used],
            logprobs=logprobs[:, :T_used],
            evicted_at=self.evicted_at[..., :T_used].contiguous(),
            kv_peak_bytes=self.cache.peak_bytes() + self.evicted_at[..., :T_used].numel() * 4
            + sum(t.numel() * 4 for t in self.slot_scores if t is not None),
            dense_kv_bytes=dense,
            timings={"prefill": t1 - t0, "decode": t2 - t1, "tokens_per_s": n_gen / max(t2 - t0, 1e-9)},
        )
