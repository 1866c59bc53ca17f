"""``python bench/bench_rollout.py [ARGS]`` = ``shadowkv bench rollout [ARGS]``; the benchmark
lives in shadowkv/benchmarks/rollout.py."""

from shadowkv.benchmarks.rollout import main

if __name__ == "__main__":
    main()
