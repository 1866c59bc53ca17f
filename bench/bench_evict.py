"""``python bench/bench_evict.py [ARGS]`` = ``shadowkv bench evict [ARGS]``; the benchmark
lives in shadowkv/benchmarks/evict.py."""

from shadowkv.benchmarks.evict import main

if __name__ == "__main__":
    main()
