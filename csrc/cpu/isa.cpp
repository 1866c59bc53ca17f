// Which instruction-set variant the CPU kernels run (isa.h).
#include "isa.h"

#include <stdexcept>
#include <string>

#include "../core/kernel_choice.h"
#include "shadowkv/shadow_attention.h"

namespace shadowkv::cpu {
namespace {

// Whether the AVX2 functions may run: the CPU has AVX2 and FMA (cpuid, OS support included),
// or the whole build targets them already (-march=native and the like: the "variants" are the
// baseline code, which is AVX2 code). Never in a build without variants (SHADOWKV_CPU_VARIANTS=0).
bool cpu_has_avx2() {
#if SHADOWKV_CPU_AVX2_VARIANT
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#elif SHADOWKV_CPU_VARIANTS && defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

// The same for the AVX-512 functions (F, VL, DQ, BW: what their target attribute allows).
bool cpu_has_avx512() {
#if SHADOWKV_CPU_AVX512_VARIANT
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#elif SHADOWKV_CPU_VARIANTS && defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

}  // namespace

Isa active_isa() {
  const std::string choice = core::kernel_choice("SHADOWKV_CPU_ISA");  // an override, else the environment
  const std::string want = choice.empty() ? "auto" : choice;
  if (want == "auto")
    return cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kBaseline;
  if (want == "baseline") return Isa::kBaseline;
  if (want == "avx2") {
    if (!cpu_has_avx2())
      throw std::invalid_argument(
          "shadowkv: SHADOWKV_CPU_ISA=avx2, but this CPU or build has no AVX2+FMA variant of the CPU kernels");
    return Isa::kAvx2;
  }
  if (want == "avx512") {
    if (!cpu_has_avx512())
      throw std::invalid_argument(
          "shadowkv: SHADOWKV_CPU_ISA=avx512, but this CPU or build has no AVX-512 (F, VL, DQ, BW) variant of the "
          "CPU kernels");
    return Isa::kAvx512;
  }
  throw std::invalid_argument("shadowkv: SHADOWKV_CPU_ISA must be one of auto, baseline, avx2, avx512; got '" + want +
                              "'");
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

}  // namespace shadowkv::cpu

namespace shadowkv {

const char* cpu_isa() { return cpu::isa_name(cpu::active_isa()); }

}  // namespace shadowkv
