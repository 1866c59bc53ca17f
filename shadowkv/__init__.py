"""shadowkv: KV-cache compression that stays on-policy in RL post-training.

The sampler logs every eviction as a shadow mask (``evicted_at``); the learner replays it
with :func:`shadowkv.ops.shadow_attention` so its log-probs are the sampler's.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C  # noqa: F401  (registers torch.ops.shadowkv.*)
from . import ops, policies
from .cache import CacheFullError, PagedKVCache
from .ops import shadow_attention, shadow_attention_with_lse
from .sampler import Rollout, Sampler

__version__ = _C.version()

__all__ = [
    "CacheFullError",
    "PagedKVCache",
    "Rollout",
    "Sampler",
    "ops",
    "policies",
    "shadow_attention",
    "shadow_attention_with_lse",
    "__version__",
]
