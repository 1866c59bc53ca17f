"""The benchmarks, importable from an installed wheel: ``shadowkv bench NAME [ARGS]`` (or
``python bench/bench_NAME.py [ARGS]`` from a checkout). Each prints a table of ratios against
baselines measured in the same run; ``--help`` says what and how.

- ``attention``: shadow_attention forward + backward vs FlexAttention and SDPA.
- ``decode``: paged_decode_attention bandwidth vs a device-to-device copy.
- ``evict``: evict_compact as a share of a decode step.
- ``rollout``: the sampler's peak KV and tokens/s vs FullCache, at equal batch and memory.
- ``replay``: |sampler - replay| log-probs per policy against the no-eviction floor.
- ``learner``: the learner's replay of a ragged batch, packed or padded with the padding masked,
  vs the padding unmasked.
- ``prefill``: the sampler's prefill of prompts of different lengths, packed vs right-padded.
"""

BENCHMARKS = ("attention", "decode", "evict", "rollout", "replay", "learner", "prefill")


def at_least(low: int):
    """An argparse type: an int >= ``low`` (a usage error, not a traceback deep in the run)."""
    import argparse

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text}")
        return value

    parse.__name__ = f"int >= {low}"  # argparse names the type in its message
    return parse


def kv_budget(text: str) -> int | float:
    """An argparse type: a KV budget as the rest of shadowkv takes it (``shadowkv train --budget``,
    ``policies.budget_tokens``): ``64`` is 64 tokens, ``0.25`` a quarter of the length; NaN, inf
    and anything else are usage errors before the run, not tracebacks in it."""
    from shadowkv.cli import _budget  # imported here: the command imports this package to list BENCHMARKS

    return _budget(text)


def fraction(text: str) -> float:
    """An argparse type: a finite float in (0, 1] (NaN fails the comparison, so it is refused too)."""
    import argparse

    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value
