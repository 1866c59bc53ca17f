// Warp-level tensor-core primitives for kernels that do not use CuTe (sm_80+): ldmatrix and
// mma.sync m16n8k16 with 16-bit A/B and fp32 accumulators, and packing two floats into one
// operand register. Older targets trap: callers select these kernels only on sm_80+. Under
// SHADOWKV_CUDA_EMULATION (tests/cpp/cuda_emulation.h) a warp-collective host emulation of the
// same layouts runs instead.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", 16-bit A/B), with g = lane / 4
// and t = lane % 4; a register holds two elements, the one with the lower k (or column) index
// in its low 16 bits:
//   A (16 x 16, M x K): a[0] = (row g, k 2t, 2t+1), a[1] = (row g+8, k 2t, 2t+1),
//                       a[2] = (row g, k 2t+8, 2t+9), a[3] = (row g+8, k 2t+8, 2t+9)
//   B (16 x 8, K x N):  b[0] = (k 2t, 2t+1, column g), b[1] = (k 2t+8, 2t+9, column g)
//   C (16 x 8, fp32):   c[0], c[1] = (row g, columns 2t, 2t+1), c[2], c[3] = (row g+8, columns 2t, 2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace shadowkv {
namespace cuda_common {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .x4: lane i gives the address of row i % 8 of 8 x 8 matrix i / 8 (16 contiguous,
// 16-byte aligned bytes in shared memory); r[m] receives matrix m as (row g, columns 2t, 2t + 1).
// With kTrans, r[m] receives it transposed: (rows 2t, 2t + 1, column g).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
  }
#elif defined(SHADOWKV_CUDA_EMULATION)
  shadowkv_emu::ldmatrix_x4(r, row, kTrans);
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

// c += A B for one m16n8k16 tile (layouts above); T is the 16-bit type of A and B.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit A and B");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(SHADOWKV_CUDA_EMULATION)
  shadowkv_emu::mma_16816<T>(c, a, b);
#else
  (void)a;
  (void)b;
  c[0] = c[1] = c[2] = c[3] = 0.0f;
  __trap();
#endif
}

// Two floats rounded to nearest into one operand register (x in the low half), and the exact
// float values of what was stored (for a hi/lo split: x - stored is exact in fp32).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y, float& x_stored, float& y_stored) {
  uint32_t r;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    x_stored = __low2float(v);
    y_stored = __high2float(v);
    memcpy(&r, &v, sizeof(r));
  } else {
    const __half2 v = __floats2half2_rn(x, y);
    x_stored = __low2float(v);
    y_stored = __high2float(v);
    memcpy(&r, &v, sizeof(r));
  }
  return r;
}

}  // namespace cuda_common
}  // namespace shadowkv
