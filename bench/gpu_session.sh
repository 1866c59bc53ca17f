#!/usr/bin/env bash
# Everything a GPU session has to check, in stages that each fit one device-tool command
# (10 minutes) and leave one log each under $OUT (the tool brings back at most 8 files).
# GPU sessions are rare and short (15 minutes of device time), so the whole sequence is
# written down here once instead of being improvised in a session:
#
#   bash bench/gpu_session.sh cutlass    # HERE, not on the GPU: CUTLASS headers -> .cutlass/,
#                                        # wheels the GPU image lacks -> .whl/
#   PREBUILD_PYTHON=... bash bench/gpu_session.sh prebuild
#                                        # HERE, optional: the extension for the image's Python
#                                        # 3.12 + torch 2.11, sm_90a -> .prebuilt/ (saves the
#                                        # first call's ~80 s build)
#   bash bench/gpu_session.sh build      # nvidia-smi, CUDA build for this GPU's arch, info
#   bash bench/gpu_session.sh test       # the GPU tests + the sampler replay invariant
#   bash bench/gpu_session.sh memcheck   # compute-sanitizer memcheck, the tests' small cases
#   bash bench/gpu_session.sh racecheck  # compute-sanitizer racecheck, the same cases
#   bash bench/gpu_session.sh bench      # the four benchmarks at the acceptance shapes
#   bash bench/gpu_session.sh profile    # Nsight Compute on the mma decode and the wgmma* attention kernels
#   bash bench/gpu_session.sh first      # all of it that fits ONE device call (see below)
#
# A session that draws a GPU gets 15 minutes of device time in all, start-up included, so its
# first call should be `first` (timeout_s 600, carry .cutlass and .whl): the build, then each test
# group and benchmark under its own time limit, so that a slow or hanging part costs its
# slice, not the session; everything lands in one log. The separate stages are for sessions
# with time to spare.
#
# Run from the repository root on the GPU machine; the machine keeps the build between
# commands while it stays warm. Its image has torch, pybind11, cmake, ninja, pytest,
# hypothesis and transformers; the build uses them (--no-deps: nothing can be downloaded).
# The GPU image has no nvidia-cutlass: run the `cutlass` stage on the dev machine first and pass
# `.cutlass` (and `.whl`) in the device tool's `carry` list, so the build compiles the CuTe kernel.
# Copy the tables into bench/RESULTS.md with the device, date and commands.
set -uo pipefail
stage=${1:?usage: gpu_session.sh cutlass|prebuild|build|test|memcheck|racecheck|bench|profile|first}
out=${OUT:-gpu-out}
mkdir -p "$out"
log="$out/$stage.log"
py=${PYTHON:-python3}
# The sanitizers slow kernels down 10-100x: only the named cases (~280 tests with the CuTe
# kernels built: every kernel family, dtype and edge case, the unchecked paged paths on bad
# values included); no long contexts, random shapes, layouts, opcheck or argument errors.
cases="named_cases or matches_reference or round_trip or empty or no_visible_key or out_only or unchecked"
# The newest kernels' test selections: each stage runs them in processes of their own (an
# illegal address poisons the CUDA context of the process that hits it), so that a fault brought
# in by a change to them spares the verdict on the rest. All of them passed on an H200 on
# 2026-11-27 (672e419, with test_deterministic allowing the one-pass backwards' atomic dQ), as did
# everything else; a kernel added later joins this list until it has (mma_rows_2stage, whose
# test ids start with mma_decode, since).
untried="pipelined or mma_decode or wgmma_ws or wgmma_fused or unchecked"

# What the extension is built from: a prebuilt one is used only if this matches its stamp.
src_stamp() { find csrc CMakeLists.txt setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }

failed=0
run() { echo "+ $*"; "$@"; local rc=$?; echo "= exit $rc"; [ $rc -eq 0 ] || failed=1; last_rc=$rc; }
summary=""  # first: one line per part, printed last (the device tool returns the output's tail)
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
ncu=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
# Nsight Compute on one forward, dQ and dK/dV launch of a family (bench/profile_attention.py at
# the benchmark's shape, 25% kept; for the one-pass families the forward, dK/dV and the dQ
# workspace's scaling kernel): where the attention kernels' time goes (issue stalls,
# occupancy, memory), which no machine without a GPU can say.
profile=("$ncu" --target-processes all -k "regex:(fwd_kernel|fwd_ws_kernel|dq_kernel|dkdv_kernel|dq_ws_kernel|dkdv_ws_kernel|dq_from_acc_kernel)"
  -c 3
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
  --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters
  $py bench/profile_attention.py --family)
# Nsight Compute on the mma paged decode kernels at the decode benchmark's shape: the first
# three launches, i.e. the default mma_rows's agreement checks (checked and unchecked), then its
# first timed call (--warmup 0). On 2026-11-27 mma was L2-bound (85% busy, DRAM 51%) and mma_rows
# latency-bound (18.75% occupancy by shared memory, a fixed-latency dependency the top stall).
profile_decode=("$ncu" --target-processes all -k "regex:decode_partition_mma_kernel" -c 3
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
  --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters
  $py -m shadowkv bench decode --device cuda --reps 20 --warmup 0)
# Nsight Compute on the eviction kernels at the acceptance row's state (the steady scenario,
# fill compaction): the first checked calls' kernels (validate, the two verdict kernels, fill,
# whose last block per sequence finalizes it; finalize_kernel only runs without KV heads), the
# restoring copies between calls not matched.
profile_evict=("$ncu" --target-processes all -k "regex:(validate|evict_verdict_[a-z]+|fill|finalize)_kernel" -c 10
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
  --section MemoryWorkloadAnalysis
  $py -m shadowkv bench evict --device cuda --scenario steady --compaction fill --reps 20 --warmup 0)

{
  echo "== $stage  $(date -u +%FT%TZ)  $(git rev-parse --short HEAD 2>/dev/null)"
  case $stage in
    cutlass)
      src=$($py -c "import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).parent / 'source' / 'include')")
      rm -rf .cutlass && mkdir -p .cutlass && run cp -r "$src" .cutlass/include
      run du -sh .cutlass
      # Pure-Python wheels the GPU image lacks or may have too old (see the first stage).
      rm -rf .whl && run $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d .whl expecttest "setuptools>=77,<82"
      ;;
    prebuild)
      # The GPU image runs Python 3.12 and torch 2.11.0+cu130 with CUDA 13.0: PREBUILD_PYTHON must
      # be such a Python (with pybind11, cmake, ninja, setuptools>=77) on this machine. The
      # extension is built in a scratch copy of the sources, for sm_90a with the CuTe kernels.
      pyb=${PREBUILD_PYTHON:?set PREBUILD_PYTHON to a Python 3.12 with torch 2.11.0}
      $pyb -c "import sys, torch; assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith('2.11.')" \
        || { echo "PREBUILD_PYTHON must be Python 3.12 with torch 2.11"; exit 2; }
      scratch=$(mktemp -d)
      tar cf - csrc CMakeLists.txt setup.py pyproject.toml README.md shadowkv cmake examples tests/cpp 2>/dev/null \
        | tar xf - -C "$scratch"
      (cd "$scratch" && PATH="$(dirname "$pyb"):$PATH" SHADOWKV_CUDA=ON SHADOWKV_CUDA_ARCHS=9.0a \
        MAX_JOBS="${MAX_JOBS:-2}" CUTLASS_DIR="$OLDPWD/.cutlass" run "$pyb" setup.py -q build_ext --inplace)
      rm -rf .prebuilt && mkdir -p .prebuilt
      run cp "$scratch"/shadowkv/_C.cpython-312-*.so .prebuilt/
      src_stamp > .prebuilt/stamp
      rm -rf "$scratch"
      run ls -la .prebuilt
      ;;
    build)
      run nvidia-smi
      # CMake looks for nvcc on PATH; images often keep it only under CUDA_HOME.
      command -v nvcc >/dev/null || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
      run nvcc --version
      $py -c "import torch, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__)"
      # Only the running GPU's arch: a full "9.0a;8.0" build doubles the compile time.
      arch=$($py -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
      export SHADOWKV_CUDA=ON SHADOWKV_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-16}"
      if [ -z "${CUTLASS_DIR:-}" ] && [ -f .cutlass/include/cute/tensor.hpp ]; then export CUTLASS_DIR=$PWD/.cutlass; fi
      echo "CUTLASS_DIR=${CUTLASS_DIR:-<none: the CuTe kernel is not built>}"
      run $py -m pip install -q --no-deps --no-build-isolation -e .
      # What was built, for a later call's FIRST_FROM (which skips this stage only for these sources).
      [ "$last_rc" -ne 0 ] || src_stamp > build/gpu-session-stamp
      run $py -m shadowkv info
      ;;
    test)
      # The newest kernels ($untried) go in their own processes: a fault there (an illegal
      # address poisons the CUDA context) must not take the verdict on everything else with it.
      run $py -m pytest -q -rs tests/test_shadow_attention_cuda.py tests/test_paged_kv_cuda.py \
        tests/test_sampler_cuda.py tests/test_cache.py tests/test_vocab_kl.py -s -k "not ($untried)"
      run $py -m pytest -q -rs tests/test_paged_kv_cuda.py -k "pipelined or mma_decode"
      run $py -m pytest -q -rs tests/test_shadow_attention_cuda.py -k "wgmma_ws or wgmma_fused"
      # + sync-free decode
      run $py -m pytest -q -rs tests/test_paged_kv_cuda.py tests/test_cache.py \
        -k "unchecked and not (pipelined or mma_decode)"
      run $py -m pytest -q -m slow tests/test_shadow_attention_cuda.py  # 32k context, every family
      ;;
    memcheck|racecheck)
      # Without the caching allocator every tensor is its own allocation, so memcheck sees an
      # access past a tensor's end instead of landing in a cached block (the CUDA graph tests
      # skip themselves then: capture needs the caching allocator). The newest kernels in a
      # second process, as in the test stage.
      for sel in "not ($untried)" "$untried"; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run "$sanitizer" --tool "$stage" --error-exitcode 3 \
          --target-processes all $py -m pytest -q -x tests/test_paged_kv_cuda.py \
          tests/test_shadow_attention_cuda.py -k "($cases) and not long_contexts and ($sel)"
      done
      ;;
    first)
      # One device call: wheels the image lacks, the build, then each part in priority order
      # under its own time limit, all of it ending by FIRST_BUDGET seconds (default 570 of a
      # 600 s call; a smaller budget leaves device time for a second call after a fix). A part
      # that no longer fits is skipped and named, so the log says what is left to run.
      # FIRST_FROM=k starts at part k (numbered in the summary): a second call on the still-warm
      # machine picks up where the first ran out of time.
      # Without the carried folders the build has no CuTe kernels and the opcheck tests no
      # expecttest: stop before spending device time on a run that cannot pass.
      if [ ! -f .cutlass/include/cute/tensor.hpp ] || ! ls .whl/expecttest-*.whl >/dev/null 2>&1; then
        echo "first: .cutlass/include/cute/tensor.hpp or .whl/expecttest-*.whl is missing. Run"
        echo "  bash bench/gpu_session.sh cutlass"
        echo "on the dev machine (not the GPU) first, then pass .cutlass and .whl in the device tool's carry list."
        exit 2
      fi
      deadline=$((SECONDS + ${FIRST_BUDGET:-570}))
      part_no=0
      part() {
        local t=$1; shift
        part_no=$((part_no + 1))
        [ "$part_no" -ge "${FIRST_FROM:-1}" ] || return 0
        local left=$((deadline - SECONDS))
        local what="$*"
        [ ${#what} -le 84 ] || what="...${what: -81}"  # the end says which part it was
        if [ "$left" -lt 15 ]; then
          echo "+ SKIPPED (out of time): $*"; failed=1; summary+="  $(printf %2d $part_no) skipped  $what"$'\n'; return
        fi
        [ "$t" -le "$left" ] || t=$left
        local t0=$SECONDS
        run timeout -k 5 "$t" "$@"
        echo "  ($((SECONDS - t0)) s of $t)"
        summary+="  $(printf %2d $part_no) exit $(printf %-3s "$last_rc") $(printf %4s $((SECONDS - t0))) s  $what"$'\n'
      }
      # The image has no expecttest (torch.library.opcheck needs it); an old setuptools cannot
      # read pyproject's SPDX license string. Both travel as wheels in .whl (the cutlass stage).
      wanted=".whl/expecttest-*.whl"
      $py -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
        || wanted="$wanted .whl/setuptools-*.whl"
      # shellcheck disable=SC2086
      run $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wanted
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      # A prebuilt extension (the prebuild stage, carried as .prebuilt) replaces the build when it
      # was built from these very sources and loads here.
      so=$(ls .prebuilt/_C.cpython-312-*.so 2>/dev/null | head -n 1)
      stamp=$(src_stamp)
      if [ -n "$so" ] && [ "$(cat .prebuilt/stamp 2>/dev/null)" = "$stamp" ] \
          && cp "$so" shadowkv/ && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} $py -m shadowkv info; then
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
        run nvidia-smi
        echo "using the prebuilt extension $so (stamp $stamp)"
        # Part 1 either way, so that a FIRST_FROM read off one call's summary means the same
        # part in the next call whichever way that one gets its extension.
        part_no=1
        summary+="   1 prebuilt  $so"$'\n'
      else
        [ -z "$so" ] || { echo "the prebuilt extension does not match these sources or does not load: building"; rm -f shadowkv/_C.cpython-312-*.so; }
        if [ "${FIRST_FROM:-1}" -gt 1 ] && [ "$(cat build/gpu-session-stamp 2>/dev/null)" = "$stamp" ] \
            && $py -m shadowkv info >/dev/null 2>&1; then
          part 300 bash "$0" build  # skipped: a second call, and the first call built these sources
        else  # nothing loads (a fresh machine, the prebuilt removed above) or the sources changed: build
          from=${FIRST_FROM:-1}
          FIRST_FROM=1
          part 300 bash "$0" build
          FIRST_FROM=$from
        fi
      fi
      tests="tests/test_shadow_attention_cuda.py tests/test_paged_kv_cuda.py tests/test_cache.py tests/test_sampler_cuda.py
        tests/test_vocab_kl.py"
      # Parallel workers when pytest-xdist is there: the float64 references run on the CPU.
      xd() { $py -c "import xdist" 2>/dev/null && echo "-n $1"; }
      opts="-q -rs -p no:cacheprovider --maxfail=25 --durations=8"
      # The newest kernels go in processes of their own (an illegal address poisons the CUDA
      # context of the process that hits it): the pipelined and mma decode kernels, the
      # warp-specialised and one-pass attention kernels, the unchecked paged paths; everything else first.
      # Measured on an H200 (2026-11-26, e365d73, prebuilt extension): the four groups 84, 49, 39
      # and 23 s, the benchmarks 5-43 s each, the sanitizer parts 10-21 s, racecheck of the two
      # attention cases 93 s; the whole sequence ~8 min.
      # shellcheck disable=SC2086
      {
        part 170 $py -m pytest $opts $(xd 12) $tests -k "not ($untried)"
        # (67 s on 2026-11-27 with four kernels; mma_rows_2stage came after)
        part 110 $py -m pytest $opts $(xd 8) tests/test_paged_kv_cuda.py -k "pipelined or mma_decode"
        part 120 $py -m pytest $opts $(xd 8) tests/test_shadow_attention_cuda.py \
          -k "wgmma_ws or wgmma_fused"  # + wgmma_wsb, wgmma_wsf
        part 50 $py -m pytest $opts $(xd 8) tests/test_paged_kv_cuda.py tests/test_cache.py \
          -k "unchecked and not (pipelined or mma_decode)"
        # 32k contexts, every attention family (12 s on 2026-11-26; out of time at the end of
        # the 2026-11-27 call, so now here).
        part 40 $py -m pytest $opts -m slow tests/test_shadow_attention_cuda.py
        # The attention target is the furthest from its acceptance (0.86x FlexAttention on
        # 2026-11-27, 1.5x needed).
        part 90 $py -m shadowkv bench attention --device cuda
        part 60 $py -m shadowkv bench decode --device cuda --scores  # the four decode kernels
        # The third acceptance number (evict_compact < 5% of a decode step: the `steady | ...,
        # fill` rows, checked and not: the checked call's verdict moved to the device after
        # 2026-11-27), before the sanitizers and profiles.
        part 30 $py -m shadowkv bench evict --device cuda
        # compute-sanitizer (clean on 2026-11-26 and 27): small cases of the newest kernels (-x:
        # the first finding ends it): the decode kernels, every attention family, and the
        # eviction kernels changed since (validate_kernel in one pass, the device verdict of
        # checked calls, finalize folded into fill: memcheck on the named cases, the bad values
        # and the argument errors, racecheck on the shared counters and the ticket).
        mc() { PYTORCH_NO_CUDA_MEMORY_CACHING=1 part "$2" "$sanitizer" --tool "$1" --error-exitcode 3 \
          --target-processes all $py -m pytest -q -x -p no:cacheprovider "${@:3}"; }
        # (bf16 and the checked calls' cases only: with mma_rows and mma_rows_2stage the wider
        # selection had grown to 392 tests, past what 60 s under memcheck holds; 84 now)
        mc memcheck 60 tests/test_paged_kv_cuda.py \
          -k "(pipelined or mma_decode) and ((matches_reference and bf16 and not unchecked) or (unchecked_bad and bf16)) and not many_seq"
        mc memcheck 60 tests/test_shadow_attention_cuda.py -k "family_matches_reference and (tiny or random_d64 or chunk_d64)"
        mc memcheck 60 tests/test_paged_kv_cuda.py tests/test_cache.py \
          -k "evict and (named_cases or unchecked_bad or bad_inputs or shared_pages) and not long"
        mc racecheck 60 tests/test_paged_kv_cuda.py \
          -k "evict_named_cases and no_scores and checked and not unchecked and fill and not long"
        # The attention defaults' shared-memory log entries (wgmma_ws forward: per stage and round
        # parity; wgmma's dQ: per stage, rows zeroed after landing), after 2026-11-27, and the
        # warp-specialised backward's rings (wgmma_wsb, new: dq_ws_kernel's K/V and log entries,
        # dkdv_ws_kernel's Q/dO/lse/delta; up to 10 steps per dK/dV block there).
        mc racecheck 140 "tests/test_shadow_attention_cuda.py::test_family_matches_reference[tiny-bf16-wgmma_ws]" \
          "tests/test_shadow_attention_cuda.py::test_family_matches_reference[tiny-bf16-wgmma]" \
          "tests/test_shadow_attention_cuda.py::test_family_matches_reference[gqa2_streaming_d128-bf16-wgmma_wsb]"
        # The one-pass warp-specialised backward's two dS tiles (wgmma_wsf, new after the eighteenth
        # session: the consumers' named barrier, a tile rewritten two steps later).
        mc racecheck 60 "tests/test_shadow_attention_cuda.py::test_family_matches_reference[gqa2_streaming_d128-bf16-wgmma_wsf]"
        # Where the eviction's time goes (validate, verdict, fill at the steady state).
        part 45 "${profile_evict[@]}"
        # mma_rows's stall reasons at the GPU's own clocks (latency-bound at 18.75% occupancy on
        # 2026-11-27: which dependency?).
        part 45 "${profile_decode[0]}" --print-details all --clock-control none "${profile_decode[@]:1}"
        # The main job on the GPU: 4 steps in bf16 mixed precision of a
        # random model with head dim 64 (--init: no warm-up; the default model's head dim 32
        # would run the SIMT kernels), so the learner runs the default tensor-core kernels. The
        # run folder stays out of $OUT (only 8 files come back). Its errors go to the log.
        part 30 $py -c "from shadowkv.tasks import make_task; from shadowkv.warmup import ModelConfig, build_model; \
build_model(make_task('kv-lookup', length=256, value_len=2), ModelConfig(hidden=256, heads=4, kv_heads=2))\
.save_pretrained('/tmp/init-d64')"
        part 90 $py -m shadowkv train --device cuda --dtype bfloat16 --init /tmp/init-d64 --steps 4 \
          --eval-prompts 16 --quiet --out /tmp/train-run
        part 30 $py -m shadowkv bench replay --device cuda  # the bf16 replay floor (DESIGN.md's 2e-2)
        # Decode away from the acceptance shape: few long sequences (split-K), GQA groups of 8 at
        # head dim 64 (~7 s each).
        part 30 $py -m shadowkv bench decode --device cuda -B 8 --ctx 32768
        part 30 $py -m shadowkv bench decode --device cuda --heads 64 --kv-heads 8 --head-dim 64
        # Tokens/s: median of 3 rollouts per row (rows print as measured; ~75 s if it all fits).
        part 90 $py -m shadowkv bench rollout --device cuda --dtype bfloat16 -B 64 --prompt 512 --new 512 \
          --head-dim 128 --max-fit-batch 256
        # The learner's replay of a ragged batch: packed, padded with the padding masked, and
        # unmasked (new after the twenty-fourth session; CPU numbers in RESULTS.md).
        part 40 $py -m shadowkv bench learner --device cuda --dtype bfloat16 --max-len 4096 --hidden 1024 \
          --heads 8 --kv-heads 2 --layers 4 --repeats 5
        # The sampler's packed prefill of uneven prompts against the right-padded one (new after
        # the twenty-sixth session; CPU numbers in RESULTS.md).
        part 30 $py -m shadowkv bench prefill --device cuda --dtype bfloat16 -B 32 --max-len 4096 --hidden 1024 \
          --heads 8 --kv-heads 2 --layers 4 --repeats 5
        # Chunked prefill, the sequences at a position batched against one a call (new after the
        # twenty-seventh session).
        part 30 $py -m shadowkv bench prefill --device cuda --dtype bfloat16 -B 32 --max-len 4096 --hidden 1024 \
          --heads 8 --kv-heads 2 --layers 4 --repeats 5 --chunk 512
      }
      ;;
    bench)
      run $py bench/bench_shadow_attention.py --device cuda  # bf16, D=128, L=8k, 25% kept
      run $py bench/bench_decode.py --device cuda --scores
      run $py bench/bench_evict.py --device cuda
      run $py bench/bench_rollout.py --device cuda --dtype bfloat16 -B 64 --prompt 512 --new 2048 --head-dim 128
      run $py bench/bench_learner.py --device cuda --dtype bfloat16 --max-len 8192 --hidden 2048 --heads 16 \
        --kv-heads 4 --layers 8 --repeats 5
      run $py bench/bench_prefill.py --device cuda --dtype bfloat16 -B 64 --max-len 4096 --hidden 2048 --heads 16 \
        --kv-heads 4 --layers 8 --repeats 5
      run $py bench/bench_prefill.py --device cuda --dtype bfloat16 -B 64 --max-len 4096 --hidden 2048 --heads 16 \
        --kv-heads 4 --layers 8 --repeats 5 --chunk 512
      ;;
    profile)
      run "${profile_decode[@]}"
      run "${profile[@]}" wgmma
      run "${profile[@]}" wgmma_ws
      run "${profile[@]}" wgmma_wsb
      run "${profile[@]}" wgmma_wsf
      run "${profile[@]}" wgmma_fused
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  [ -z "$summary" ] || printf '== parts (exit 124, or 137 when it had to be killed: out of its time slice)\n%s' "$summary"
  echo "== $stage: $([ $failed -eq 0 ] && echo ok || echo FAILED)"
  exit $failed
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
