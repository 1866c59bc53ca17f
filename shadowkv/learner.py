"""The learner: shadow-mask replay, GRPO/PPO losses and the SMD distillation term (DESIGN.md §6).

Read top to bottom: ``replay_rows`` (one full-sequence forward, shadow or dense mask, packed
when that saves rows, logits only for the rows that predict generated tokens; ``replay_logits``
lays them out ``[B, R, V]``), ``token_logprobs`` (aligned with
``Rollout.logprobs``), ``ValueHead`` + ``gae`` (PPO) or
``grpo_advantages`` (GRPO, the default),
``is_weights`` (the Sparse-RL correction), ``distill_kl`` (SMD) and ``policy_loss`` which
puts them together for one optimisation epoch of one method:

- ``dense``: FullCache rollouts, dense learner, old log-probs from the sampler.
- ``naive``: compressed rollouts, dense learner, old log-probs from the (sparse) sampler.
- ``is``:    compressed rollouts, dense learner, old log-probs from a dense replay, tokens
             reweighted/rejected by the dense/sampler ratio (Sparse-RL).
- ``smd``:   compressed rollouts, shadow-mask learner (exactly the sampler's policy), plus
             ``beta * KL(teacher_dense || student_shadow)`` per generated token.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .attention import attention_context, context_kwargs, install, returning_dicts, window_log
from .ops import mask_padding, shadow_attention
from .packing import first_fit_decreasing, token_slots
from .policies import as_int
from .vocab_kl import check_temperature, tempered_entropy, tempered_kl, tempered_token_logprobs

METHODS = ("dense", "naive", "is", "smd")


class _ReplayContext:
    """The learner's attention: every layer attends with its slice of ``log``
    ``[B, layers, Hkv, L]`` int32 (a shadow mask; stride 0 over layers and heads is fine), a
    sliding layer with its window laid over it. Key and query indices of one sequence differ by
    as much as their positions, packed (``_Packing``) or not, so the window applies by index."""

    def __init__(self, log: torch.Tensor):
        self.log = log

    def attend(self, layer, q, k, v, scale, window=None):
        ev = self.log[:, layer, :, : k.shape[2]].to(k.device)  # a no-op unless the model spans devices
        return shadow_attention(q, k, v, window_log(ev, window), 0, scale)


def _dense_log(ends: torch.Tensor, layers: int, kv_heads: int) -> torch.Tensor:
    """Plain causal attention within each sequence as a log ``[B, layers, Hkv, L]`` for
    :class:`_ReplayContext`: ``ends [B, L]``, the end of the sequence of each position (every
    key evicted there), stored once for all layers and heads."""
    ends = ends.to(torch.int32).contiguous()
    return ends[:, None, None, :].expand(ends.shape[0], layers, kv_heads, ends.shape[1])


def first_action_row(rollout) -> int:
    """The first row of a replay (input position ``t`` predicts token ``t + 1``) that predicts a
    generated token of any sequence: ``min(prompt_lens) - 1`` for the sampler's rollouts, found
    from ``action_mask`` (position 0 is never an action). At most ``T - 2``, so that a replay
    keeps at least one row."""
    T = rollout.tokens.shape[1]
    cols = rollout.action_mask.any(0).nonzero()
    first = int(cols[0, 0]) - 1 if cols.numel() else T - 2
    return max(0, min(first, T - 2))


def to_tokens(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, R, ...]`` per-row values of a replay's last ``R`` rows -> ``[B, seq_len, ...]``
    aligned with the tokens they predict (row ``t`` predicts token ``t + 1``), zeros in front."""
    pad = rows.new_zeros(rows.shape[0], seq_len - rows.shape[1], *rows.shape[2:])
    return torch.cat([pad, rows], 1)


_KEEP_MODES: dict[type, str | None] = {}


def _logits_to_keep_mode(model) -> str | None:
    """How ``model.forward`` takes ``logits_to_keep``: ``"mask"`` (transformers' causal LMs that
    slice with ``slice_logits_to_keep``, which takes a 2-D bool mask of the rows to keep),
    ``"last"`` (an int, the last N positions: older transformers, or a model slicing itself), or
    None (not at all: the logits are sliced after the forward). Read once per model class."""
    cls = type(model)
    if cls not in _KEEP_MODES:
        try:
            takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        try:
            masks = "slice_logits_to_keep" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            masks = False
        _KEEP_MODES[cls] = ("mask" if masks else "last") if takes else None
    return _KEEP_MODES[cls]


def inputs_per_sequence(rollout) -> torch.Tensor:
    """``[B]`` int64 on the CPU: the replay inputs of each sequence, ``seq_lens - 1`` in
    ``[0, T - 1]`` (one host read)."""
    return (rollout.seq_lens.cpu() - 1).clamp(0, rollout.tokens.shape[1] - 1)


class _Packing:
    """A right-padded batch packed into fewer rows, for ``replay_rows(pack=True)``: each
    sequence's inputs (its first ``n_b = seq_lens[b] - 1`` tokens) are placed whole in a row
    of ``T - 1`` slots (first fit, longest first), after the sequences placed there before it,
    positions restarting at 0 (``position_ids``). What is left at a row's end is padding.

    The shadow mask carries the rows' structure (DESIGN §2's cu_seqlens variant, without a
    kernel argument): key ``j`` of sequence ``b`` at slot ``s_b + j`` of its row gets
    ``evicted_at = s_b + min(evicted_at[j], n_b)``. Its own queries (``j <= i < n_b``) see it
    exactly as before, and no later sequence's query (all at or past ``s_b + n_b``) sees it;
    padding slots get 0, so they see nothing and nothing sees them. The kernels skip other
    sequences' tiles by their min/max like evicted ones. Rows as long as the padded batch's keep
    each row's tile scan (and the CPU backward's one-pass mode) as it was.
    """

    def __init__(self, rollout, n: torch.Tensor):
        """``n``: ``[B]`` inputs per sequence on the CPU, ``inputs_per_sequence(rollout)``. The
        kept slots are those whose input predicts a generated token."""
        device = rollout.tokens.device
        T = rollout.tokens.shape[1]
        self.cap = cap = T - 1
        row_of, slot_of, self.rows = first_fit_decreasing(n.tolist(), cap)
        b, pos, flat = token_slots(n, torch.tensor(row_of) * cap + torch.tensor(slot_of))  # flat: in [rows, cap]
        s = torch.tensor(slot_of)[b]
        order = torch.argsort(flat)  # the kept rows come out of the model in slot order
        b, pos, s, flat = b[order], pos[order], s[order], flat[order]
        kept = rollout.action_mask.cpu()[b, pos + 1]  # input pos predicts token pos + 1
        self.b, self.pos, self.flat = b.to(device), pos.to(device), flat.to(device)
        # int32, as the log: start + n <= cap, and no int64 copy of the log on the way.
        self.start, self.n = s.to(device, torch.int32), n[b].to(device, torch.int32)  # per packed token
        mask = torch.zeros(self.rows * cap, dtype=torch.bool)
        mask[flat[kept]] = True
        self.kept = mask.view(self.rows, cap).to(device)
        self.kept_b, self.kept_t = b[kept].to(device), (pos[kept] + 1).to(device)

    def place(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """Per packed token ``[tokens, ...]`` -> ``[rows, cap, ...]`` (``fill`` in padding slots)."""
        out = values.new_full((self.rows * self.cap, *values.shape[1:]), fill)
        out[self.flat.to(values.device)] = values
        return out.view(self.rows, self.cap, *values.shape[1:])

    def log(self, evicted_at: torch.Tensor) -> torch.Tensor:
        """``[B, layers, Hkv, T]`` -> the packed ``[rows, layers, Hkv, cap]`` (one copy)."""
        dev = evicted_at.device
        ev = evicted_at[self.b.to(dev), :, :, self.pos.to(dev)]  # [tokens, layers, Hkv]
        ev = torch.minimum(ev, self.n.to(dev)[:, None, None]).add_(self.start.to(dev)[:, None, None])
        return self.place(ev).permute(0, 2, 3, 1).contiguous()


@dataclass
class ReplayRows:
    """What a replay computed for its rows that predict generated tokens, in the model's order:
    ``logits [K, V]`` float32 (and ``hidden [K, H]``, the last hidden states, with
    ``return_hidden``), with the sequence ``b [K]`` and the position ``t [K]`` of the token each
    row predicts (``action_mask[b, t]`` True: ``K`` is the rollout's generated tokens).
    ``shape``: the rollout's ``(B, T)``. Each ``(b, t)`` appears once."""

    logits: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    shape: tuple[int, int]
    hidden: torch.Tensor | None = None

    def to_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row ``[K, ...]`` -> ``[B, T, ...]`` aligned with the tokens, 0 off the action mask."""
        out = values.new_zeros(*self.shape, *values.shape[1:])
        out[self.b, self.t] = values
        return out

    def align(self, other: "ReplayRows") -> torch.Tensor:
        """``other``'s logits in this one's row order (a packed and a padded replay of one rollout
        list the same rows in other orders); ValueError if they are not the same rows."""
        if torch.equal(other.b, self.b) and torch.equal(other.t, self.t):
            return other.logits
        T = self.shape[1]
        mine, theirs = torch.argsort(self.b * T + self.t), torch.argsort(other.b * T + other.t)
        if other.shape != self.shape or not torch.equal((other.b * T + other.t)[theirs], (self.b * T + self.t)[mine]):
            raise ValueError("shadowkv: the two replays hold different rows; replay both from the same rollout")
        index = torch.empty_like(mine)
        index[mine] = theirs
        return other.logits[index]

    def to_rows(self, values: torch.Tensor, R: int) -> torch.Tensor:
        """Per-row ``[K, ...]`` -> ``[B, R, ...]``: row ``r`` predicts token ``T - R + r`` (the
        layout of :func:`replay_logits`), 0 where no generated token is predicted."""
        out = values.new_zeros(self.shape[0], R, *values.shape[1:])
        out[self.b, self.t - (self.shape[1] - R)] = values
        return out


def replay_rows(model, rollout, mask: str = "shadow", return_hidden: bool = False,
                pack: bool | None = None) -> ReplayRows:
    """One training forward over the rollout's sequences, with logits (float32) only for the rows
    that predict generated tokens (:class:`ReplayRows`): ``[K, V]``, not ``[B, T, V]`` with its
    prompt and padding rows, which no loss reads and which with a real vocabulary would be most
    of the learner's memory (0.6 MB per row at 150k). Models whose ``forward`` takes
    ``logits_to_keep`` (transformers' causal LMs) never compute the others; other models are
    sliced after the forward.

    ``mask="shadow"`` replays ``rollout.evicted_at`` (each query sees what the sampler's
    cache held); ``"dense"`` is plain causal attention.

    ``pack``: pack the sequences into fewer rows of the same width (``_Packing``: whole
    sequences end to end, first fit), so the layers run on little padding; the default packs
    whenever that saves a row. Unpacked, each sequence's padding is still masked out of the
    attention (``ops.mask_padding``), but the other layers run on it. Both give the same
    log-probs up to float rounding.
    """
    if mask not in ("shadow", "dense"):
        raise ValueError(f"mask must be 'shadow' or 'dense', got {mask!r}")
    install(model)
    tokens = rollout.tokens
    B, T = tokens.shape
    _, layers, kv_heads, _ = rollout.evicted_at.shape
    packing = None
    n = inputs_per_sequence(rollout)
    if pack or (pack is None and bool((n < T - 1).any())):  # some padding: maybe a row to save
        packing = _Packing(rollout, n)
        if pack is None and packing.rows == B:
            packing = None
    if packing is not None:
        log = (packing.log(rollout.evicted_at) if mask == "shadow"
               else _dense_log(packing.place(packing.start + packing.n), layers, kv_heads))
        inputs = dict(input_ids=packing.place(tokens[packing.b, packing.pos]), position_ids=packing.place(packing.pos))
        keep, b, t = packing.kept, packing.kept_b, packing.kept_t  # slot order, as the model returns them
    else:
        lens = rollout.seq_lens
        log = (mask_padding(rollout.evicted_at, lens, check=False) if mask == "shadow"
               else _dense_log(lens.clamp(0, T)[:, None].expand(B, T), layers, kv_heads))
        inputs = dict(input_ids=tokens[:, :-1], position_ids=torch.arange(T - 1, device=tokens.device).expand(B, T - 1))
        keep = rollout.action_mask[:, 1:]  # input p predicts token p + 1; row-major, as returned
        b, p = keep.nonzero(as_tuple=True)
        t = p + 1
    mode, kwargs, last = _logits_to_keep_mode(model), {}, keep.shape[1]
    if mode == "mask":
        kwargs["logits_to_keep"] = keep
    elif mode == "last":  # the columns from the first kept one on (one host read)
        cols = keep.any(0).nonzero()
        last = keep.shape[1] - int(cols[0, 0]) if cols.numel() else 1
        kwargs["logits_to_keep"] = last
    with attention_context(_ReplayContext(log)) as ctx, returning_dicts(model, model.get_decoder()):
        out = model(**inputs, use_cache=False, output_hidden_states=return_hidden, return_dict=True,
                    **context_kwargs(model, ctx), **kwargs)
    logits = out.logits if mode == "mask" else out.logits[:, -last:][keep[:, keep.shape[1] - last:]]
    hidden = out.hidden_states[-1][keep] if return_hidden else None
    return ReplayRows(logits.float(), b, t, (B, T), hidden)


def replay_logits(model, rollout, mask: str = "shadow", return_hidden: bool = False, pack: bool | None = None):
    """:func:`replay_rows` laid out as ``[B, R, V]`` (float32), the replay's last
    ``R = T - 1 - first_action_row(rollout)`` rows: row ``r`` predicts
    ``rollout.tokens[:, T - R + r]`` (and, with ``return_hidden``, the last hidden states
    ``[B, R, H]`` of the same rows). Rows that predict no generated token (a longer prompt's
    last tokens, padding) are 0. ``to_tokens`` aligns per-row values with the tokens. The
    learner's losses take :class:`ReplayRows` itself, which does not hold those rows."""
    rows = replay_rows(model, rollout, mask, return_hidden, pack)
    R = rollout.tokens.shape[1] - 1 - first_action_row(rollout)
    logits = rows.to_rows(rows.logits, R)
    return (logits, rows.to_rows(rows.hidden, R)) if return_hidden else logits


def gather_logprobs(logits, rollout, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probs of the rollout's tokens, 0 off the action mask, from
    :class:`ReplayRows` or ``replay_logits`` output (``[B, R, V]``, the last ``R`` rows)."""
    if isinstance(logits, ReplayRows):
        targets = rollout.tokens[logits.b, logits.t]
        return logits.to_tokens(tempered_token_logprobs(logits.logits, targets, temperature))
    T, R = rollout.tokens.shape[1], logits.shape[1]
    logp = tempered_token_logprobs(logits, rollout.tokens[:, T - R:], temperature)
    return to_tokens(logp, T) * rollout.action_mask


def token_logprobs(model, rollout, mask: str = "shadow", temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every generated token under ``model``, aligned with ``rollout.logprobs``:
    ``[B, T]`` float32, 0 where ``rollout.action_mask`` is False. Differentiable w.r.t. the
    model's parameters when grad is enabled."""
    check_temperature(temperature)  # before the replay's forward, not after it
    return gather_logprobs(replay_rows(model, rollout, mask), rollout, temperature)


class ValueHead(torch.nn.Module):
    """PPO's critic: a scalar value per position from the policy's last hidden state.

    ``forward(rows) -> [B, T]`` for :class:`ReplayRows` with ``hidden``, or
    ``forward(hidden [B, R, H], seq_len) -> [B, seq_len]`` (``replay_logits``'s last ``R``
    rows; ``seq_len`` defaults to ``R + 1``), aligned with the rollout's tokens: entry ``t`` is
    the value of the state in which token ``t`` was generated (0 where no row was given).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden, seq_len: int | None = None) -> torch.Tensor:
        if isinstance(hidden, ReplayRows):
            return hidden.to_tokens(self._value(hidden.hidden))
        return to_tokens(self._value(hidden), hidden.shape[1] + 1 if seq_len is None else seq_len)

    def _value(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[...]`` float32, also under autocast (--dtype bfloat16), which
        rounded the values to bfloat16 and with them GAE's advantages and their whitening."""
        with torch.autocast(h.device.type, enabled=False):
            return self.proj(h.float())[..., 0]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each sequence's generated tokens.

    Args:
        rewards: ``[B]`` terminal reward, paid at the last generated token.
        values: ``[B, T]`` value of the state before each token (``ValueHead`` output).
        mask: ``[B, T]`` bool action mask (one contiguous block per sequence).
    Returns:
        (advantages ``[B, T]``, returns ``[B, T]``), zero off the mask.
    """
    m = mask.float()
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    r = rewards[:, None] * last
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def disable_dropout(model: torch.nn.Module) -> int:
    """Turns every dropout of ``model`` off (``nn.Dropout`` modules and the float ``*dropout*``
    rates that attention layers read in training mode, e.g. Llama's ``attention_dropout``), as
    TRL's trainers do by default; returns how many were on. The sampler's log-probs come from
    the model in eval mode: a learner in training mode with dropout would score other
    log-probs, and its teacher (DESIGN §6: the same weights) would differ from the student by
    the dropout noise. (shadowkv's attention refuses dropout, rather than ignore it.)"""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages: ``rewards [N]`` with consecutive groups of ``group_size``
    samples of one prompt -> ``(r - mean_group) / (std_group + eps)``, ``[N]``. ``std_group``
    is the group's population std, so that a group's advantages have unit spread whatever its
    size (a group of two gives +-1)."""
    group_size = as_int("group_size", group_size)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size ({group_size}), got shape "
                         f"{tuple(rewards.shape)}")
    # Exactly 0 for a group whose rewards are all equal: in float32 the mean of equal rewards
    # such as 2/3 can be a rounding step off, and that step over a std of ~1e-8 (+ eps) gave
    # every sample of the group the same advantage of ~0.05.
    g = rewards.detach().view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + eps)
    return adv.masked_fill((g.amax(1) == g.amin(1))[:, None], 0.0).flatten()


@dataclass
class ISConfig:
    """Sparse-RL's correction (arXiv 2601.10079, "Sparsity-Aware Rejection Sampling" and
    "Importance-based Reweighting"; defaults as in DESIGN.md §6 and the authors' released
    training config): per-token log-ratio ``log r = logp_dense_old - logp_sampler`` clamped to
    ``[-clamp, clamp]``; weight ``min(r, cap)`` (truncated IS), detached and divided by its
    mean over the batch's valid tokens; tokens with ``r`` outside ``[reject_low,
    reject_high]`` leave the loss mask; a sequence with any token ``r < veto`` gets no
    gradient at all (``veto=0``: no veto). The paper's equation numbers could not be checked
    from this environment (see the README's design notes)."""

    clamp: float = 20.0
    cap: float = 1.5
    reject_low: float = 0.5
    reject_high: float = 1.5
    veto: float = 1e-4


def is_weights(logp_dense_old, logp_sampler, mask, cfg: ISConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights ``[B, T]``, kept-token mask ``[B, T]`` bool) of the ``is`` method.

    The weights are normalised over all valid tokens (``mask``), rejected ones included, as
    the authors' code does; the loss then uses them only where the kept mask is True.
    """
    log_r = logp_dense_old - logp_sampler
    r = torch.exp(log_r.clamp(-cfg.clamp, cfg.clamp))
    # veto 0 turns the veto off (no r is below 0), as does any veto <= 0.
    log_veto = math.log(cfg.veto) if cfg.veto > 0 else -math.inf
    vetoed = ((log_r < log_veto) & mask).any(-1, keepdim=True)
    keep = mask & (r >= cfg.reject_low) & (r <= cfg.reject_high) & ~vetoed
    w = (r.clamp(max=cfg.cap) * mask).detach()
    mean = w.sum() / mask.sum().clamp_min(1)
    if mean > 1e-8:
        w = w / mean
    return w, keep


def distill_kl(teacher_logits, student_logits, rollout, direction: str = "forward",
               temperature: float = 1.0) -> torch.Tensor:
    """Per-token SMD term ``[B, T]``: ``KL(p_teacher || p_student)`` (``forward``) or
    ``KL(p_student || p_teacher)`` (``reverse``) over the full vocabulary, at the positions
    that predict generated tokens; teacher logits are detached. Both :class:`ReplayRows` of one
    rollout (``replay_rows``), or both ``[B, R, V]``, the same last ``R`` rows of a replay
    (``replay_logits``); a ``[B, R, V]`` teacher with a student's rows is laid out as it. ``p``
    is the policy the sampler draws from, ``softmax(logits / temperature)``: at another
    temperature the KL of the raw logits is not the two policies' KL (its size and gradient
    differ)."""
    rows = student_logits if isinstance(student_logits, ReplayRows) else None
    if rows is not None:
        if isinstance(teacher_logits, ReplayRows):
            teacher_logits, student_logits = rows.align(teacher_logits), rows.logits
        else:
            student_logits, rows = rows.to_rows(rows.logits, teacher_logits.shape[1]), None
    kl = tempered_kl(teacher_logits, student_logits, temperature, direction)  # a block of rows at a time
    if rows is not None:
        return rows.to_tokens(kl)
    return to_tokens(kl, rollout.action_mask.shape[1]) * rollout.action_mask


def entropy(logits, rollout, temperature: float = 1.0, count=None) -> torch.Tensor:
    """Mean entropy of the policy ``softmax(logits / temperature)`` over generated positions
    (a scalar tensor); ``logits``: :class:`ReplayRows`, or a replay's last ``R`` rows
    ``[B, R, V]``. ``count``: what the sum is divided by (default: this rollout's generated
    tokens)."""
    m = rollout.action_mask
    if isinstance(logits, ReplayRows):  # one row per generated token
        logits = logits.logits
    else:  # [B, R, V]: the generated tokens' rows only
        m = m[:, m.shape[1] - logits.shape[1]:]
    ent = tempered_entropy(logits, temperature)  # a block of rows at a time
    if ent.dim() > 1:
        ent = ent * m
    return ent.sum() / (m.sum().clamp_min(1) if count is None else count)


class MicroBatch(NamedTuple):
    """Rows ``rows`` of a batch and the columns they need: ``cols`` covers the longest of them,
    so everything past it is padding for every row."""

    rows: slice
    cols: int

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This micro-batch's part of a per-row ``[B]`` or per-token ``[B, T, ...]`` tensor."""
        if t is None:
            return None
        t = t[self.rows]
        return t[:, : self.cols] if t.dim() > 1 else t


def micro_batches(rollout, size: int | None) -> list[MicroBatch]:
    """The learner's micro-batches: ``size`` sequences each (all at once if None), in batch
    order, each cut after its longest sequence (:attr:`Rollout.seq_lens`, at least 2 columns,
    for one input and one target); the replay then packs the part's sequences into fewer rows
    of that width when it can (``replay_rows``). One host read of the lengths per call.

    Not grouped by length: packed, a part costs about its real tokens, so sorting would only put
    the longest sequences together and raise the peak memory the micro-batches are there to
    bound.
    """
    B, T = rollout.tokens.shape
    size = B if size is None else size
    lens = rollout.seq_lens.cpu()
    return [MicroBatch(slice(i, min(B, i + size)), min(T, max(2, int(lens[i: i + size].max()))))
            for i in range(0, B, size)] or [MicroBatch(slice(0, 0), T)]


def pad_to(part: torch.Tensor, cols: int) -> torch.Tensor:
    """A micro-batch's per-token result ``[b, c, ...]`` zero-padded on the right to ``cols``."""
    extra = cols - part.shape[1]
    if extra == 0:
        return part
    return torch.cat([part, part.new_zeros(part.shape[0], extra, *part.shape[2:])], 1)


def gather_rows(values: list[torch.Tensor], cols: int) -> torch.Tensor:
    """Per-token results of the micro-batches, in batch order, back to ``[B, cols, ...]``."""
    return torch.cat([pad_to(v, cols) for v in values])


def loss_counts(rollout, token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss-mask tokens, generated tokens) of a whole batch, at least 1 each: what
    :func:`policy_loss` divides by when it scores one micro-batch of that batch."""
    mask = rollout.action_mask if token_mask is None else token_mask
    return mask.sum().clamp_min(1), rollout.action_mask.sum().clamp_min(1)


@dataclass
class LossConfig:
    method: str = "smd"
    clip: float = 0.2
    kl_ref: float = 0.0  # coefficient of KL(policy || reference), k3 estimator
    smd_beta: float = 0.1
    smd_direction: str = "forward"
    temperature: float = 1.0
    vf_coef: float = 0.5  # value loss weight (PPO with a value head)
    is_cfg: ISConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.smd_direction not in ("forward", "reverse"):  # else distill_kl fails mid-training
            raise ValueError(f"smd_direction must be 'forward' or 'reverse', got {self.smd_direction!r}")
        for name, lowest, strict in (("clip", 0, True), ("temperature", 0, True), ("kl_ref", 0, False),
                                     ("smd_beta", 0, False), ("vf_coef", 0, False)):
            value = getattr(self, name)  # NaN, or a temperature <= 0, would train on NaN or a wrong loss
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < lowest or (strict and value == lowest)):
                raise ValueError(f"LossConfig: {name} must be a finite number {'>' if strict else '>='} {lowest}, "
                                 f"got {value!r}")
        self.is_cfg = self.is_cfg or ISConfig()

    @property
    def learner_mask(self) -> str:
        return "shadow" if self.method == "smd" else "dense"


def policy_loss(model, rollout, advantages, old_logp, cfg: LossConfig, token_weights=None, token_mask=None,
                teacher_logits=None, ref_logp=None, value_head=None, returns=None,
                counts=None) -> tuple[torch.Tensor, dict]:
    """Clipped-surrogate loss of one optimisation epoch (plus the KL and SMD terms). Every term
    is a mean over the batch's loss-mask tokens (token-level, as in DAPO: a long
    answer weighs in proportion to its tokens), not a mean of per-sequence means.
    With ``counts`` (:func:`loss_counts` of the whole batch) the call scores one micro-batch of
    it: its sums are divided by the whole batch's token counts, so the micro-batches' losses,
    gradients and stats (but ``logp``, one tensor each) add up to the whole batch's.

    Args:
        advantages: ``[B]`` (GRPO) or ``[B, T]`` (PPO/GAE) advantages.
        old_logp: ``[B, T]`` log-probs the ratio is taken against.
        token_weights, token_mask: ``[B, T]`` (``is`` method), default 1 / action mask.
        teacher_logits: the dense teacher (``smd``): ``replay_rows(model, rollout, "dense")``
            (or ``replay_logits``'s ``[B, R, V]``), the same rows as the student's.
        ref_logp: ``[B, T]`` reference-policy log-probs (when ``cfg.kl_ref > 0``).
        value_head, returns: PPO's critic and its ``[B, T]`` targets (value loss added, over
            ``token_mask``).
    Returns:
        (scalar loss, stats dict of floats and the first-epoch learner log-probs).
    """
    # The ratio's denominator, the advantages and the targets are constants of the update: an
    # old_logp computed with grad on would cancel the ratio's gradient exactly (1 at epoch one).
    old_logp, advantages = old_logp.detach(), advantages.detach()
    detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
    token_weights, ref_logp, returns = detach(token_weights), detach(ref_logp), detach(returns)
    rows = replay_rows(model, rollout, cfg.learner_mask, return_hidden=value_head is not None)
    logp = gather_logprobs(rows, rollout, cfg.temperature)
    mask = rollout.action_mask if token_mask is None else token_mask
    n, n_action = loss_counts(rollout, token_mask) if counts is None else counts
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
    w = token_weights if token_weights is not None else 1.0
    loss = -(w * surr * mask).sum() / n
    stats = {
        # Tokens whose clipped branch is the minimum (no gradient through the ratio), as TRL
        # and verl count them: a ratio outside the range on the side that does not bind is not.
        "clip_frac": ((ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv < ratio * adv) & mask).sum().item() / n.item(),
        "entropy": entropy(rows, rollout, cfg.temperature, n_action).item(),
    }
    if cfg.kl_ref > 0 and ref_logp is not None:
        d = (ref_logp - logp) * mask
        # k3 = e^d - d - 1, with e^d continued linearly past d = 20 (value and slope e^20 there):
        # e^d overflowed to inf past ~88 nats (a token the reference finds far likelier, most
        # plausibly under `naive`), and clip_grad_norm_ turned the inf gradient into NaN weights.
        # The slope keeps its sign, so such a token still pulls logp towards the reference.
        c = d.clamp(max=20.0)
        k3 = (torch.exp(c) * (1 + (d - c)) - d - 1) * mask  # d - c first: exactly e^d - d - 1 up to 20
        loss = loss + cfg.kl_ref * k3.sum() / n
        stats["kl_ref"] = (k3.sum() / n).item()
    if cfg.method == "smd" and teacher_logits is not None and cfg.smd_beta > 0:
        kl = distill_kl(teacher_logits, rows, rollout, cfg.smd_direction, cfg.temperature)
        kl_mean = kl.sum() / n_action
        loss = loss + cfg.smd_beta * kl_mean
        stats["distill_kl"] = kl_mean.item()
    if value_head is not None and returns is not None:
        # Over the loss mask, as the policy term: the value head reads the policy's hidden
        # states, so a vetoed sequence's value loss would still move the policy's weights.
        v_loss = 0.5 * (((value_head(rows) - returns) ** 2) * mask).sum() / n
        loss = loss + cfg.vf_coef * v_loss
        stats["value_loss"] = v_loss.item()
    stats["logp"] = logp.detach()
    return loss, stats
