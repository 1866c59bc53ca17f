"""``python bench/bench_decode.py [ARGS]`` = ``shadowkv bench decode [ARGS]``; the benchmark
lives in shadowkv/benchmarks/decode.py."""

from shadowkv.benchmarks.decode import main

if __name__ == "__main__":
    main()
