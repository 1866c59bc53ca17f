// exp() for the CPU attention kernels' softmax loops, written so compilers vectorise it.
//
// std::exp(float) is a libm call per element, which no compiler vectorises without
// -ffast-math. exp_fast<float> is branch-free arithmetic (loops that call it vectorise at
// -O3 on any ISA): Cody-Waite range reduction x = n ln2 + r with |r| <= ln2/2, a degree-7
// Taylor-form polynomial in Horner order for e^r, and 2^n built in the exponent bits.
// Over [ln(FLT_MIN), 88.37] the relative error is below 2^-22 (tests/cpp sweeps 2 million
// arguments against double; about 1.2 ulp at worst). Below ln(FLT_MIN), -inf included (a
// masked score), the result is exactly 0; NaN propagates; above 88.37 it saturates at
// about 2.4e38 instead of overflowing (the kernels only pass arguments <= 0, after the
// running-max subtraction). double keeps std::exp: float64 runs are the accuracy reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace shadowkv::cpu {

SHADOWKV_CPU_INLINE float exp_fast(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;      // ln 2 with its low mantissa bits zero: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;   // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer in the low bits
  constexpr float kMin = -87.33654f;          // ln(FLT_MIN): 2^n stays a normal number above it
  constexpr float kMax = 88.37626f;           // 2^127 * e^r stays finite for every r up to here
  // std::max/min as written (not fmax/fmin) keep NaN, and compile to branch-free max/min.
  const float xc = std::min(std::max(x, kMin), kMax);
  const float t = xc * kLog2e + kRound;
  uint32_t ti;  // unsigned: for a NaN argument the bits below are garbage, but not UB
  std::memcpy(&ti, &t, sizeof ti);
  const uint32_t n_biased = ti - 0x4B400000u + 127u;  // round(xc / ln 2) + 127, in [1, 254]
  const float nf = t - kRound;
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  // e^r = 1 + r + r^2/2! + ... + r^7/7!, Horner order.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = n_biased << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kMin ? 0.0f : p * scale;  // -inf (a masked score) included
}

inline double exp_fast(double x) { return std::exp(x); }

}  // namespace shadowkv::cpu
