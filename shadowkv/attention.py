"""Plugs shadowkv into Hugging Face models through transformers' attention interface.

``install(model)`` registers the attention implementation ``"shadowkv"`` and selects it
on the model; no model code is forked. What the function does depends on the context
entered with :func:`attention_context`: the sampler's paged-cache prefill/decode, the
learner's shadow-mask (or dense) replay, and plain SDPA when no context is active, so an
installed model still behaves as before everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

import torch

ATTN_IMPLEMENTATION = "shadowkv"

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("shadowkv_attention", default=None)


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               window: int | None = None) -> torch.Tensor:
        """q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (after RoPE) -> ``[B, Hq, T, D]``.
        ``window``: the layer's sliding window (transformers' ``sliding_window``: a query at
        position ``i`` sees keys at positions ``i - window < j <= i``), None for full attention."""


@contextlib.contextmanager
def attention_context(ctx: AttentionContext):
    """Routes the ``shadowkv`` attention of every installed model to ``ctx`` while active."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def returning_dicts(*modules: torch.nn.Module):
    """Sets ``config.return_dict = True`` on the given transformers modules while active.

    Passing ``return_dict=True`` is not enough: transformers 5.x's causal LMs call their inner
    model without it and read its output as a dict, so a config with ``return_dict=False``
    (as for TorchScript export) failed inside them ("'tuple' object has no attribute
    'last_hidden_state'"). The configs are restored on exit; nothing else reads them during
    the call.
    """
    configs = {id(c): c for m in modules if (c := getattr(m, "config", None)) is not None}.values()
    off = [c for c in configs if getattr(c, "return_dict", True) is False]
    for c in off:
        c.return_dict = True
    try:
        yield
    finally:
        for c in off:
            c.return_dict = False


# The forward kwarg that carries a context to the attention as well (see :func:`context_kwargs`).
CONTEXT_KWARG = "shadowkv_context"


def context_kwargs(model, ctx) -> dict:
    """Forward kwargs that hand ``ctx`` to the attention of ``model``'s layers besides the
    context variable: ``model(**inputs, **context_kwargs(model, ctx))`` inside
    ``attention_context(ctx)``. Gradient checkpointing recomputes each layer's forward during
    ``backward()``, after the ``with`` block ended; transformers replays the layer's kwargs
    there, so the recompute attends with the same mask (through the context variable alone it
    fell back to dense SDPA: right values, wrong gradients). A model whose layers do not pass
    their kwargs on to the attention is refused when it checkpoints (``ctx.needs_kwarg``)."""
    ctx.needs_kwarg = bool(_checkpoints(model) and model.training and torch.is_grad_enabled())
    return {CONTEXT_KWARG: ctx}


def _checkpoints(model) -> bool:
    """Whether a transformers model recomputes its layers in the backward (transformers 5.x's
    name, then the one it deprecates)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _shadowkv_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ctx = kwargs.pop(CONTEXT_KWARG, None)
    if ctx is None:
        ctx = _CONTEXT.get()
        if getattr(ctx, "needs_kwarg", False):
            raise NotImplementedError(
                f"shadowkv: {type(module).__name__} does not pass its forward kwargs on to the attention, so "
                "under gradient checkpointing its recomputed layers would attend without the shadow mask; "
                "turn gradient checkpointing off (model.gradient_checkpointing_disable())")
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _refuse_unsupported(module, dropout, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # Under autocast the projections come out in the autocast dtype but RoPE (float32 cos and
        # sin) promotes q and k back to float32: attend in the autocast dtype, as SDPA would.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    out = ctx.attend(module.layer_idx, query, key, value, scale, _window(kwargs.get("sliding_window")))
    return out.transpose(1, 2).contiguous(), None


def _refuse_unsupported(module, dropout, kwargs) -> None:
    """What a model asks of its attention beyond softmax(scale q k^T) v with the causal (or
    shadow) mask changes its outputs; the sampler and the learner would silently compute another
    model's log-probs, so they refuse."""
    if dropout:
        what = f"attention dropout ({dropout}; the model is in training mode with attention_dropout > 0)"
    elif kwargs.get("softcap") is not None:
        what = f"attention logit soft-capping (softcap={kwargs['softcap']}, e.g. Gemma 2)"
    elif kwargs.get("s_aux") is not None:
        what = "learned attention sinks (s_aux, e.g. gpt-oss)"
    elif getattr(module, "is_causal", True) is False:  # its mask lets queries see later keys
        what = "bidirectional attention (is_causal=False, e.g. Gemma 3 with use_bidirectional_attention)"
    else:
        return
    raise NotImplementedError(f"shadowkv: the model uses {what}, which shadowkv's attention does not implement")


def _mask(*args, **kwargs):
    """The mask transformers builds before the layers: SDPA's for the fallback, none inside a
    context, whose attention ignores it (for a packed replay SDPA's would be ``[rows, 1, W, W]``
    with a comparison per pair of sequences)."""
    if _CONTEXT.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPLEMENTATION, _shadowkv_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _mask)


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Selects the ``shadowkv`` attention on a transformers causal LM (Llama/Qwen2/Qwen3/Mistral/Gemma 3
    families); returns the model."""
    _register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    # Models whose attention classes do not call transformers' attention interface (Bloom, Falcon,
    # MPT) keep their own attention with a warning only: the sampler's one-token decode steps
    # then attended to nothing but themselves and no eviction was logged, a silent wrong rollout.
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION or getattr(model, "_supports_attention_backend", True) is False:
        raise NotImplementedError(
            f"shadowkv: {type(model).__name__} does not run its attention through transformers' attention "
            f"interface (it stays {impl!r} after selecting {ATTN_IMPLEMENTATION!r}), so shadowkv cannot cache, "
            "evict or replay it; models whose attention does (Llama, Qwen2/3, Mistral, Gemma, Phi3, GPT-2, ...) work")
    return model


def _window(window) -> int | None:
    """A layer's ``sliding_window`` kwarg (transformers passes it to the attention of sliding
    layers, None elsewhere) as a positive int, or None."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise NotImplementedError(f"shadowkv: sliding_window={window!r} is not a positive number of tokens")
    return window


def window_log(log: torch.Tensor, window: int | None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """A shadow mask ``log [..., L]`` (int32, in query-index space) with a sliding window laid
    over it: key ``j`` is also evicted where the queries stop seeing it, ``positions[..., j] +
    window`` (default positions: the key index ``j``, so query ``i`` sees it while ``i - j <
    window``, transformers' rule). Returns ``log`` itself without a window."""
    if window is None:
        return log
    if positions is None:
        positions = torch.arange(log.shape[-1], device=log.device, dtype=torch.int32)
    limit = positions.to(torch.int64) + window  # int64: no overflow near NEVER_EVICTED
    return torch.minimum(log.to(torch.int64), limit).to(torch.int32)


def model_geometry(model) -> tuple[int, int, int, int]:
    """``(num_layers, num_q_heads, num_kv_heads, head_dim)`` from a transformers config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim
