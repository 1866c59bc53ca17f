// Instruction-set variants of the CPU attention kernels' hot loops.
//
// The library is compiled for its target's baseline (x86-64: SSE2), so one build runs on any
// machine. On x86-64 with GCC or Clang the per-chunk work functions of the attention kernels
// also exist as AVX2 + FMA copies and as AVX-512 copies: thin wrappers marked SHADOWKV_AVX2_FN /
// SHADOWKV_AVX512_FN (target attributes) into which the work function and every helper it
// calls (tile products, exp, masks, row loads) are inlined, so that they are compiled for that
// instruction set there. The helpers are marked
// SHADOWKV_CPU_INLINE (always_inline) for that, because Clang's `flatten` only inlines one
// level. Safety does not depend on the inlining: a function the compiler emits out of line is
// compiled for the baseline target whoever calls it, so no AVX2 instruction runs unless
// active_isa() picked a wrapper. active_isa() picks per call.
//
// Results can differ in the last bits between the variants (FMA rounds once where the
// baseline rounds twice); each is deterministic (independent of threads and tiling).
#pragma once

namespace shadowkv::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The variant the kernels run now: by default ("auto") AVX-512 where the CPU has AVX-512 F, VL,
// DQ and BW, else AVX2 + FMA where it has them, else the baseline; the setting SHADOWKV_CPU_ISA
// ("baseline", "avx2", "avx512": its in-process override, else the environment variable,
// csrc/core/kernel_choice.h) picks one (read at every call, as SHADOWKV_ATTENTION_KERNEL is for
// CUDA). Throws std::invalid_argument for another value, and for
// a variant the CPU (or the build) does not have.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace shadowkv::cpu

#if defined(__GNUC__)
#define SHADOWKV_CPU_INLINE inline __attribute__((always_inline))
#else
#define SHADOWKV_CPU_INLINE inline
#endif

// SHADOWKV_CPU_VARIANTS=0 builds the baseline only: CMake sets it in sanitizer builds, whose
// compile the variants tripled (the CPU backward alone 145 s under ASan + UBSan, 2026-11-29)
// while they add nothing a sanitizer checks: every variant is the same source. active_isa()
// is then the baseline, and asking for another variant throws as on a CPU without it.
#ifndef SHADOWKV_CPU_VARIANTS
#define SHADOWKV_CPU_VARIANTS 1
#endif

#if SHADOWKV_CPU_VARIANTS && defined(__GNUC__) && defined(__x86_64__) && !defined(__AVX2__)
#define SHADOWKV_CPU_AVX2_VARIANT 1
#define SHADOWKV_AVX2_FN __attribute__((target("avx2,fma"), flatten))
#else
// Not x86-64 GCC/Clang, or the whole build already targets AVX2 (-march=native): the "AVX2"
// functions are plain copies of the baseline ones (which are AVX2 code in the second case).
#define SHADOWKV_CPU_AVX2_VARIANT 0
#define SHADOWKV_AVX2_FN
#endif

#if SHADOWKV_CPU_VARIANTS && defined(__GNUC__) && defined(__x86_64__) && !defined(__AVX512F__)
#define SHADOWKV_CPU_AVX512_VARIANT 1
#define SHADOWKV_AVX512_FN __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"), flatten))
#else
// As for AVX2: not x86-64 GCC/Clang, or a build that targets AVX-512 already.
#define SHADOWKV_CPU_AVX512_VARIANT 0
#define SHADOWKV_AVX512_FN
#endif

// The function of the variant `isa` among a kernel's three. A macro, so that a build without
// variants does not even name the other two: they are templates, and never instantiated
// unless named. Parenthesise an argument that has a comma.
#if SHADOWKV_CPU_VARIANTS
#define SHADOWKV_CPU_PICK(isa, baseline, avx2, avx512)                                      \
  ((isa) == ::shadowkv::cpu::Isa::kAvx512 ? (avx512)                                        \
   : (isa) == ::shadowkv::cpu::Isa::kAvx2 ? (avx2)                                          \
                                          : (baseline))
#else
#define SHADOWKV_CPU_PICK(isa, baseline, avx2, avx512) (baseline)
#endif
