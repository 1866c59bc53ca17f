// Device helpers shared by every CUDA kernel: dtype conversion to/from the fp32 accumulator
// and warp-wide reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace shadowkv {
namespace cuda_common {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 2^x on the special-function unit (ex2.approx.ftz: ~2 ulp, results below 2^-126 flushed to 0).
// Without -use_fast_math, exp2f compiles to a range test and two scalings around it (for
// denormal results), whose predicates the CuTe attention kernels' unrolled softmax then packs
// into registers: ~500 of the warp-specialised forward's ~1040 instructions per key tile (SASS).
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

}  // namespace cuda_common
}  // namespace shadowkv
