// Instruction-set variants of the CPU attention kernels' hot loops.
//
// The library is compiled for its target's baseline (x86-64: SSE2), so one build runs on any
// machine. On x86-64 with GCC or Clang the per-tile loops of the attention kernels are also
// compiled for AVX2 + FMA, through function target attributes rather than a second translation
// unit: `flatten` inlines every helper they call (tile products, exp, masks) into them, so those
// helpers are compiled for AVX2 there and nothing compiled for AVX2 is ever shared with (or
// picked by the linker for) the baseline code. active_isa() picks the variant per call.
//
// Results can differ in the last bits between the variants (FMA rounds once where the
// baseline rounds twice); each is deterministic (independent of threads and tiling).
#pragma once

namespace shadowkv::cpu {

enum class Isa { kBaseline, kAvx2 };

// The variant the kernels run now: AVX2 + FMA where the CPU has them, unless the environment
// variable SHADOWKV_CPU_ISA says "baseline" (read at every call, as SHADOWKV_ATTENTION_KERNEL is
// for CUDA). Throws std::invalid_argument for a value other than auto, baseline and avx2, and
// for "avx2" on a CPU (or a build) without the variant.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace shadowkv::cpu

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__AVX2__)
#define SHADOWKV_CPU_AVX2_VARIANT 1
#define SHADOWKV_AVX2_FN __attribute__((target("avx2,fma"), flatten))
#else
// Not x86-64 GCC/Clang, or the whole build already targets AVX2 (-march=native): the "AVX2"
// functions are plain copies of the baseline ones, and active_isa() never picks them.
#define SHADOWKV_CPU_AVX2_VARIANT 0
#define SHADOWKV_AVX2_FN
#endif
