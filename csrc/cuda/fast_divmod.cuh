// Division by a divisor that is fixed for a whole launch (the page size), without a divide.
//
// GPUs have no integer divider: `n / d` with d known only at run time compiles to ~20
// instructions (a float reciprocal and fix-ups), `n % d` to as many again. A kernel that maps a
// slot to (page, row) for every 16-byte piece it copies pays that per piece, which is a large
// part of its instruction budget when the loop should be bound by memory. FastDivmod computes
// the quotient with a multiply-high, an add and a shift (Granlund and Montgomery, "Division by
// invariant integers using multiplication", 1994): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, floor(n / d) = (umulhi(n, m) + n) >> s for n < 2^31 (the
// add cannot overflow 32 bits there). The host builds it; tests/cpp/test_fast_divmod.cpp checks it
// against `/` and `%`.
#pragma once

#include <cassert>
#include <cstdint>

#if defined(__CUDACC__)
#define SHADOWKV_HD __host__ __device__ __forceinline__
#else
#define SHADOWKV_HD inline
#endif

namespace shadowkv {
namespace cuda_common {

struct FastDivmod {
  uint32_t divisor = 1, mul = 1, shift = 0;  // the identity: n / 1

  FastDivmod() = default;
  // d in [1, 2^31] (0 would divide by zero below, a larger d shift by 32).
  SHADOWKV_HD explicit FastDivmod(uint32_t d) : divisor(d) {
    assert(d >= 1 && d <= (uint32_t(1) << 31));
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = static_cast<uint32_t>((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d) / d + 1);
  }

  // floor(n / divisor) for n in [0, 2^31).
  SHADOWKV_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }

  // n % divisor, given q = div(n).
  SHADOWKV_HD uint32_t mod(uint32_t n, uint32_t q) const { return n - q * divisor; }
};

}  // namespace cuda_common
}  // namespace shadowkv

#undef SHADOWKV_HD
