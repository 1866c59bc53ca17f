"""``python bench/bench_replay.py [ARGS]`` = ``shadowkv bench replay [ARGS]``; the benchmark lives
in shadowkv/benchmarks/replay.py."""

from shadowkv.benchmarks.replay import main

if __name__ == "__main__":
    main()
