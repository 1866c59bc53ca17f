"""``python bench/bench_prefill.py [ARGS]`` = ``shadowkv bench prefill [ARGS]``; the benchmark lives
in shadowkv/benchmarks/prefill.py."""

from shadowkv.benchmarks.prefill import main

if __name__ == "__main__":
    main()
