"""The benchmarks, importable from an installed wheel: ``shadowkv bench NAME [ARGS]`` (or
``python bench/bench_NAME.py [ARGS]`` from a checkout). Each prints a table of ratios against
baselines measured in the same run; ``--help`` says what and how.

- ``attention``: shadow_attention forward + backward vs FlexAttention and SDPA.
- ``decode``: paged_decode_attention bandwidth vs a device-to-device copy.
- ``evict``: evict_compact as a share of a decode step.
- ``rollout``: the sampler's peak KV and tokens/s vs FullCache, at equal batch and memory.
"""

BENCHMARKS = ("attention", "decode", "evict", "rollout")
