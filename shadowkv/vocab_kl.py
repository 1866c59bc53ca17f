"""The KL divergence of two tempered policies over the vocabulary, one's entropy and the
log-probs of chosen tokens, a block of rows at a time.

SMD's per-token term is ``KL(p_teacher || p_student)`` (or the reverse) over the whole vocabulary
for every generated token. Written with autograd ops it keeps two more ``[K, V]`` float32 tensors
alive until the backward (the student's log-softmax and the teacher's probabilities) and makes
four or so more at its peak (shifted and scaled logits, the difference, the product), each
0.6 MB per token with a 150k vocabulary; its backward makes as many again.
:func:`tempered_kl` saves only its two inputs and works a block of rows at a time, recomputing
each block's softmaxes in the backward as fused cross-entropy kernels do: beyond the inputs, it
holds the gradient and one block's temporaries. :func:`tempered_token_logprobs`, the policy
term's log-probs, does the same: ``log_softmax(...).gather(...)`` kept the ``[K, V]``
log-softmax for the backward.
"""

from __future__ import annotations

import math

import torch

# Elements of a [rows, V] block: on a GPU 64 MiB of float32, few launches per block; on the CPU
# 1 MiB, which stays in cache across a block's passes (2-core VM, K=1024, V=32000, forward +
# backward: 0.32 s at 2^18, 0.47 s at 2^20, 1.1 s at 2^24; the plain autograd formula 0.57-0.66 s).
BLOCK, CPU_BLOCK = 1 << 24, 1 << 18


def _blocks(n: int, x: torch.Tensor):
    rows = max(1, (CPU_BLOCK if x.device.type == "cpu" else BLOCK) // max(1, x.shape[-1]))
    return ((i, min(n, i + rows)) for i in range(0, n, rows))


def _log_probs(x: torch.Tensor, temperature: float, stats: torch.Tensor | None = None):
    """``log_softmax(x / temperature)`` of a block ``[rows, V]`` and its per-row ``(max,
    logsumexp)`` ``[rows, 2]``; given those, only the elementwise part. Shifted before dividing,
    as the sampler's log-probs (``tempered_log_softmax``): no overflow at a tiny temperature."""
    if stats is None:
        m = x.amax(-1, keepdim=True)
        y = (x - m) / temperature
        stats = torch.cat([m, torch.logsumexp(y, -1, keepdim=True)], -1)
        return y - stats[:, 1:], stats
    return (x - stats[:, :1]) / temperature - stats[:, 1:], stats


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension, for the sampler's log-probs
    and the learner's alike (so that a replay gives the sampler's). Shifted before dividing:
    with a tiny temperature ``logits / T`` overflows to +-inf and the softmax of inf - inf is
    NaN; shifted, the best logit stays 0 and the rest go to -inf. The shift is a constant per
    row, so it is detached (log_softmax does not depend on it)."""
    return torch.log_softmax((logits - logits.amax(-1, keepdim=True).detach()) / temperature, -1)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs (their exponentials and sums lose too much), else their own."""
    return torch.promote_types(x.dtype, torch.float32)


def _kl(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """Per-row ``sum exp(a) (a - b)`` of log-probabilities (``b = 0``: minus the entropy of
    ``a``), 0 for a token ``a`` gives no mass
    (a vocabulary entry masked with -inf would otherwise give 0 * nan)."""
    return (a.exp() * (a - b)).masked_fill(a == -torch.inf, 0.0).sum(-1)


class _TemperedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher, student, temperature, reverse):
        V = student.shape[-1]
        t_all, s_all = teacher.reshape(-1, V), student.reshape(-1, V)
        work = _work_dtype(student)
        out = student.new_empty(s_all.shape[0], dtype=work)
        stats = student.new_empty(2, s_all.shape[0], 2, dtype=work)  # each row's (max, logsumexp)
        for a, b in _blocks(s_all.shape[0], s_all):
            t, stats[0, a:b] = _log_probs(t_all[a:b].to(work), temperature)
            s, stats[1, a:b] = _log_probs(s_all[a:b].to(work), temperature)
            out[a:b] = _kl(s, t) if reverse else _kl(t, s)
        ctx.save_for_backward(teacher, student, stats)
        ctx.temperature, ctx.reverse = temperature, reverse
        return out.view(student.shape[:-1]).to(student.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        teacher, student, stats = ctx.saved_tensors
        T, V = ctx.temperature, student.shape[-1]
        t_all, s_all = teacher.reshape(-1, V), student.reshape(-1, V)
        g_all = grad_out.reshape(-1, 1).to(stats.dtype)
        grad = torch.empty_like(s_all)
        for a, b in _blocks(s_all.shape[0], s_all):
            t, _ = _log_probs(t_all[a:b].to(stats.dtype), T, stats[0, a:b])
            s, _ = _log_probs(s_all[a:b].to(stats.dtype), T, stats[1, a:b])
            q = s.exp()
            if ctx.reverse:  # d KL(q || p) / d z = q (log q - log p - KL) / T
                d = (s - t).masked_fill(q == 0, 0.0)  # a token neither policy can draw: -inf - -inf
                d = q * (d - (q * d).sum(-1, keepdim=True))
            else:  # d KL(p || q) / d z = (q - p) / T
                d = q - t.exp()
            grad[a:b] = d * (g_all[a:b] / T)
        return None, grad.view(student.shape), None, None


def check_temperature(temperature) -> float:
    """``temperature`` as a float, refused unless finite and > 0: 0 gives NaN and a negative one
    the distribution of ``-logits`` (a plausible, wrong answer)."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def tempered_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                direction: str = "forward") -> torch.Tensor:
    """Per-row ``KL(p_teacher || p_student)`` (``forward``) or ``KL(p_student || p_teacher)``
    (``reverse``), ``p = softmax(logits / temperature)``: logits ``[..., V]`` (same shape, float
    dtype) -> ``[...]`` in their dtype. Differentiable w.r.t. the student's logits only (the
    teacher's are detached); the backward holds no ``[..., V]`` tensor but the gradient."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher and student logits differ in shape: {tuple(teacher_logits.shape)} vs "
                         f"{tuple(student_logits.shape)}")
    teacher = teacher_logits.detach().to(student_logits.dtype)
    return _TemperedKL.apply(teacher, student_logits, check_temperature(temperature), direction == "reverse")


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        V = logits.shape[-1]
        x_all, idx = logits.reshape(-1, V), targets.reshape(-1, 1)
        out = logits.new_empty(x_all.shape[0], dtype=_work_dtype(logits))
        for a, b in _blocks(x_all.shape[0], x_all):  # the sampler's formula, row for row
            out[a:b] = tempered_log_softmax(x_all[a:b].to(out.dtype), temperature).gather(-1, idx[a:b])[:, 0]
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        return out.view(targets.shape).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        T, V = ctx.temperature, logits.shape[-1]
        x_all, idx = logits.reshape(-1, V), targets.reshape(-1, 1)
        work = _work_dtype(logits)
        g_all = grad_out.reshape(-1, 1).to(work) / T
        grad = torch.empty_like(x_all)
        for a, b in _blocks(x_all.shape[0], x_all):  # d log p_y / d z = (onehot(y) - p) / T
            d = tempered_log_softmax(x_all[a:b].to(work), T).exp_().mul_(-g_all[a:b])
            grad[a:b] = d.scatter_add_(-1, idx[a:b], g_all[a:b])
        return grad.view(logits.shape), None, None


def tempered_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature).gather(-1, targets[..., None])[..., 0]``: logits
    ``[..., V]`` (float dtype), targets ``[...]`` int64 in ``[0, V)`` -> ``[...]`` in the
    logits' dtype (worked in float32 for half inputs), each row by the sampler's
    :func:`tempered_log_softmax`. Differentiable w.r.t. the logits; the graph saves only the
    logits and targets, and the backward recomputes a block of rows' softmax at a time."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)} "
                         "(one target per row of logits)")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    return _TokenLogProbs.apply(logits, targets, check_temperature(temperature))


@torch.no_grad()
def tempered_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row entropy of ``softmax(logits / temperature)``: ``[..., V]`` -> ``[...]``, a block
    of rows at a time (a diagnostic: no gradient)."""
    temperature = check_temperature(temperature)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    out = rows.new_empty(rows.shape[0], dtype=_work_dtype(rows))
    for a, b in _blocks(rows.shape[0], rows):
        logp, _ = _log_probs(rows[a:b].to(out.dtype), temperature)
        out[a:b] = -_kl(logp, 0.0)
    return out.view(logits.shape[:-1]).to(logits.dtype)
