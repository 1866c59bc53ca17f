// Element types the kernels accept, and their conversion to the accumulator type.
// Plain C++ (no torch, no CUDA headers) so inference servers can include it.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace shadowkv {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

// A softmax scale every kernel can use: positive, and finite in float32 also times log2(e)
// (the CUDA attention kernels compute exp2 of scores times scale * log2(e) in float32; a larger
// finite double would become inf there, and inf * 0 a NaN). At most kMaxSoftmaxScale.
constexpr double kMaxSoftmaxScale = static_cast<double>(FLT_MAX) / 1.4426950408889634;
inline bool valid_softmax_scale(double s) { return s > 0.0 && s <= kMaxSoftmaxScale; }

// Whether the product of non-negative sizes (an element count, an offset bound) fits in int64.
// Sizes: any range of int64_t (a braced list, a std::vector).
template <typename Sizes>
inline bool product_fits_int64(const Sizes& sizes) {
  int64_t acc = 1;
  for (const int64_t s : sizes) {
    if (s < 0 || (s != 0 && acc > INT64_MAX / s)) return false;
    acc *= s;
  }
  return true;
}
inline bool product_fits_int64(std::initializer_list<int64_t> sizes) {
  return product_fits_int64<std::initializer_list<int64_t>>(sizes);
}

// Storage-only 16-bit types for the CPU kernels: loads widen to float, stores round to
// nearest even. Layout-compatible with c10::BFloat16 / c10::Half and CUDA's types.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }

inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(fp16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;  // +-0
  } else {
    // Subnormal half: renormalise into a float exponent.
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
T from_float(float x);
template <typename T>
T from_float(double x);

template <>
inline float from_float<float>(float x) { return x; }
template <>
inline double from_float<double>(double x) { return x; }
template <>
inline float from_float<float>(double x) { return static_cast<float>(x); }
template <>
inline double from_float<double>(float x) { return x; }

template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <>
inline fp16_t from_float<fp16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (au >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero) in half: shift the full mantissa with RNE.
    if (au < 0x33000000u) return fp16_t{sign};
    const uint32_t e = au >> 23;
    const uint32_t man = (au & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // value = r * 2^-24 with r = man * 2^(e - 150 + 24)
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return fp16_t{static_cast<uint16_t>(sign | r)};
  }
  uint32_t r = au - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | (r >> 13))};
}

template <>
inline bf16_t from_float<bf16_t>(double x) { return from_float<bf16_t>(static_cast<float>(x)); }
template <>
inline fp16_t from_float<fp16_t>(double x) { return from_float<fp16_t>(static_cast<float>(x)); }

// Accumulator type: double for double inputs, float otherwise.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

}  // namespace shadowkv
