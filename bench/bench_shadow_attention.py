"""``python bench/bench_shadow_attention.py [ARGS]`` = ``shadowkv bench attention [ARGS]``; the benchmark
lives in shadowkv/benchmarks/attention.py."""

from shadowkv.benchmarks.attention import main

if __name__ == "__main__":
    main()
