"""The learner: shadow-mask replay, GRPO/PPO losses and the SMD distillation term (DESIGN.md §6).

Read top to bottom: ``replay_logits`` (one full-sequence forward, shadow or dense mask, logits
only for the rows that predict generated tokens), ``token_logprobs`` (aligned with
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

from .attention import attention_context, check_length, install
from .ops import NEVER_EVICTED, mask_padding, shadow_attention
from .policies import as_int
from .sampler import tempered_log_softmax

METHODS = ("dense", "naive", "is", "smd")


class _ReplayContext:
    """The learner's attention: ``evicted_at`` ``[B, layers, Hkv, T]`` (None: dense causal), with
    every position at or past a sequence's length masked (``ops.mask_padding``): what a real
    token sees is unchanged, while the padding of the shorter sequences of a batch, which used
    to attend causally over itself (its log entries are never evicted), now sees no key and
    the kernels skip its tiles."""

    def __init__(self, evicted_at: torch.Tensor | None, seq_lens: torch.Tensor):
        # Masked once per replay (not per layer): the layers' calls and their saved tensors
        # share one copy of the log.
        self.evicted_at = None if evicted_at is None else mask_padding(evicted_at, seq_lens, check=False)
        self.seq_lens = seq_lens
        self.dense = None  # [B, Hkv, Lk]: seq_lens[b] everywhere, shared by the layers on one device

    def attend(self, layer, q, k, v, scale):
        if self.evicted_at is not None:
            ev = self.evicted_at[:, layer, :, : k.shape[2]].to(k.device)  # a no-op on one device
        else:
            if self.dense is None or self.dense.shape != k.shape[:3] or self.dense.device != k.device:
                full = torch.full(k.shape[:3], NEVER_EVICTED, dtype=torch.int32, device=k.device)
                self.dense = mask_padding(full, self.seq_lens, check=False)
            ev = self.dense
        return shadow_attention(q, k, v, ev, 0, scale)


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


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def replay_logits(model, rollout, mask: str = "shadow", return_hidden: bool = False):
    """Logits ``[B, R, V]`` (float32) of the replay's last ``R = T - 1 - first_action_row(rollout)``
    rows: row ``r`` predicts ``rollout.tokens[:, T - R + r]`` (and, with ``return_hidden``, the
    last hidden states ``[B, R, H]`` of the same rows). ``to_tokens`` aligns per-row values with
    the tokens.

    Only rows that predict some sequence's generated token get logits: the prompt's rows would
    be ``[B, prompt, V]`` float32 that no loss reads (with a 150k vocabulary, 0.6 MB per
    position); models whose ``forward`` takes ``logits_to_keep`` (transformers' causal LMs)
    never compute them, others are sliced after the forward.

    ``mask="shadow"`` replays ``rollout.evicted_at`` (each query sees what the sampler's
    cache held); ``"dense"`` is plain causal attention.
    """
    if mask not in ("shadow", "dense"):
        raise ValueError(f"mask must be 'shadow' or 'dense', got {mask!r}")
    install(model)
    tokens = rollout.tokens
    B, T = tokens.shape
    check_length(model, T)
    rows = T - 1 - first_action_row(rollout)
    positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
    kwargs = {"logits_to_keep": rows} if _takes_logits_to_keep(model) else {}
    context = _ReplayContext(rollout.evicted_at if mask == "shadow" else None, rollout.seq_lens)
    with attention_context(context):
        out = model(input_ids=tokens[:, :-1], position_ids=positions[:, :-1], use_cache=False,
                    output_hidden_states=return_hidden, **kwargs)
    logits = out.logits[:, -rows:].float()
    if return_hidden:
        return logits, out.hidden_states[-1][:, -rows:]
    return logits


def gather_logprobs(logits: torch.Tensor, rollout, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probs of the rollout's tokens from ``replay_logits`` output (``[B, R, V]``,
    the last ``R`` rows); 0 off the action mask."""
    T, R = rollout.tokens.shape[1], logits.shape[1]
    # The sampler's form (shifted first): at a temperature it samples with, no NaN here either.
    logp = tempered_log_softmax(logits, temperature).gather(-1, rollout.tokens[:, T - R:, None])[..., 0]
    return to_tokens(logp, T) * rollout.action_mask


def token_logprobs(model, rollout, mask: str = "shadow", temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every generated token under ``model``, aligned with ``rollout.logprobs``:
    ``[B, T]`` float32, 0 where ``rollout.action_mask`` is False. Differentiable w.r.t. the
    model's parameters when grad is enabled."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return gather_logprobs(replay_logits(model, rollout, mask), rollout, temperature)


class ValueHead(torch.nn.Module):
    """PPO's critic: a scalar value per position from the policy's last hidden state.

    ``forward(hidden [B, R, H], seq_len) -> [B, seq_len]`` (``hidden``: ``replay_logits``'s
    last ``R`` rows; ``seq_len`` defaults to ``R + 1``) aligned with the rollout's tokens: entry
    ``t`` is the value of the state in which token ``t`` was generated (0 where no row was given:
    position 0 and the prompt rows before ``first_action_row``).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        v = self.proj(hidden.float())[..., 0]
        return to_tokens(v, hidden.shape[1] + 1 if seq_len is None else seq_len)


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


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages: ``rewards [N]`` with consecutive groups of ``group_size``
    samples of one prompt -> ``(r - mean_group) / (std_group + eps)``, ``[N]``. ``std_group``
    is the group's population std, so that a group's advantages have unit spread whatever its
    size (a group of two gives +-1)."""
    group_size = as_int("group_size", group_size)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size ({group_size}), got shape "
                         f"{tuple(rewards.shape)}")
    g = rewards.view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + eps)).flatten()


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
    that predict generated tokens; teacher logits are detached. Both ``[B, R, V]``: the same
    last ``R`` rows of a replay (``replay_logits``). ``p`` is the policy the sampler draws
    from, ``softmax(logits / temperature)``: at another temperature the KL of the raw logits
    is not the two policies' KL (its size and gradient differ)."""
    t = tempered_log_softmax(teacher_logits.detach(), temperature)
    s = tempered_log_softmax(student_logits, temperature)
    if direction == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    elif direction == "reverse":
        kl = (s.exp() * (s - t)).sum(-1)
    else:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return to_tokens(kl, rollout.action_mask.shape[1]) * rollout.action_mask


def entropy(logits: torch.Tensor, rollout, temperature: float = 1.0, count=None) -> torch.Tensor:
    """Mean entropy of the policy ``softmax(logits / temperature)`` over generated positions
    (a scalar tensor); ``logits``: a replay's last ``R`` rows, ``[B, R, V]``. ``count``: what
    the sum is divided by (default: this rollout's generated tokens)."""
    logp = tempered_log_softmax(logits.detach(), temperature)
    ent = -(logp.exp() * logp).sum(-1)
    m = rollout.action_mask[:, rollout.action_mask.shape[1] - logits.shape[1]:]
    return (ent * m).sum() / (m.sum().clamp_min(1) if count is None else count)


class MicroBatch(NamedTuple):
    """Rows of a batch (``[b]`` int64 indices) and the columns they need: ``cols`` covers the
    longest of them, so everything past it is padding for every row."""

    rows: torch.Tensor
    cols: int

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This micro-batch's part of a per-row ``[B]`` or per-token ``[B, T, ...]`` tensor."""
        if t is None:
            return None
        t = t[self.rows.to(t.device)]
        return t[:, : self.cols] if t.dim() > 1 else t


def micro_batches(rollout, size: int | None) -> list[MicroBatch]:
    """The learner's micro-batches of ``size`` sequences (all at once if None).

    With more than one, the sequences are grouped by length (longest first) and each group is
    cut after its longest sequence (:attr:`Rollout.seq_lens`, at least 2 columns, for one
    input and one target): the model's forward and backward, not only the attention, then run
    on little padding. The order does not change the step: advantages are computed over the
    whole batch and every part is normalised by the whole batch's counts (:func:`loss_counts`).
    One host read of the lengths per call.
    """
    B, T = rollout.tokens.shape
    if size is None or size >= B:
        return [MicroBatch(torch.arange(B), T)]
    lens = rollout.seq_lens.cpu()
    order = torch.argsort(lens, descending=True, stable=True)
    parts = [order[i: i + size] for i in range(0, B, size)]
    return [MicroBatch(rows, min(T, max(2, int(lens[rows].max())))) for rows in parts]


def pad_to(part: torch.Tensor, cols: int) -> torch.Tensor:
    """A micro-batch's per-token result ``[b, c, ...]`` zero-padded on the right to ``cols``."""
    extra = cols - part.shape[1]
    if extra == 0:
        return part
    return torch.cat([part, part.new_zeros(part.shape[0], extra, *part.shape[2:])], 1)


def gather_rows(parts: list[MicroBatch], values: list[torch.Tensor], cols: int) -> torch.Tensor:
    """Per-token results of each micro-batch back in the batch's row order, ``[B, cols, ...]``."""
    out = pad_to(values[0], cols).new_zeros(sum(len(p.rows) for p in parts), cols, *values[0].shape[2:])
    for p, v in zip(parts, values):
        out[p.rows.to(out.device)] = pad_to(v, cols)
    return out


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
        teacher_logits: ``[B, R, V]`` dense teacher (``smd``): ``replay_logits(model, rollout,
            "dense")``, the same rows as the student's.
        ref_logp: ``[B, T]`` reference-policy log-probs (when ``cfg.kl_ref > 0``).
        value_head, returns: PPO's critic and its ``[B, T]`` targets (value loss added, over
            ``token_mask``).
    Returns:
        (scalar loss, stats dict of floats and the first-epoch learner log-probs).
    """
    if value_head is not None:
        logits, hidden = replay_logits(model, rollout, cfg.learner_mask, return_hidden=True)
    else:
        logits = replay_logits(model, rollout, cfg.learner_mask)
    logp = gather_logprobs(logits, rollout, cfg.temperature)
    mask = rollout.action_mask if token_mask is None else token_mask
    n, n_action = loss_counts(rollout, token_mask) if counts is None else counts
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
    w = token_weights if token_weights is not None else 1.0
    loss = -(w * surr * mask).sum() / n
    stats = {
        "clip_frac": (((ratio - 1).abs() > cfg.clip) & mask).sum().item() / n.item(),
        "entropy": entropy(logits, rollout, cfg.temperature, n_action).item(),
    }
    if cfg.kl_ref > 0 and ref_logp is not None:
        d = (ref_logp - logp) * mask
        k3 = (torch.exp(d) - d - 1) * mask
        loss = loss + cfg.kl_ref * k3.sum() / n
        stats["kl_ref"] = (k3.sum() / n).item()
    if cfg.method == "smd" and teacher_logits is not None and cfg.smd_beta > 0:
        kl = distill_kl(teacher_logits, logits, rollout, cfg.smd_direction, cfg.temperature)
        kl_mean = kl.sum() / n_action
        loss = loss + cfg.smd_beta * kl_mean
        stats["distill_kl"] = kl_mean.item()
    if value_head is not None and returns is not None:
        # Over the loss mask, as the policy term: the value head reads the policy's hidden
        # states, so a vetoed sequence's value loss would still move the policy's weights.
        v_loss = 0.5 * (((value_head(hidden, mask.shape[1]) - returns) ** 2) * mask).sum() / n
        loss = loss + cfg.vf_coef * v_loss
        stats["value_loss"] = v_loss.item()
    stats["logp"] = logp.detach()
    return loss, stats
