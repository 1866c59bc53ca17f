"""``python bench/bench_learner.py [ARGS]`` = ``shadowkv bench learner [ARGS]``; the benchmark lives
in shadowkv/benchmarks/learner.py."""

from shadowkv.benchmarks.learner import main

if __name__ == "__main__":
    main()
