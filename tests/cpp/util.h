// Helpers shared by the core tests: exactly sized strided buffers (so that AddressSanitizer
// sees any read past a tensor), NaN-filled padding (so that a kernel reading a gap or skipping
// an output shows up as NaN), random data, and the ParallelFor flavours the kernels must
// accept.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "shadowkv/shadowkv.h"

namespace shadowkv_test {

constexpr int32_t kNever = std::numeric_limits<int32_t>::max();

template <typename T>
constexpr shadowkv::DType dtype_of();
template <>
constexpr shadowkv::DType dtype_of<float>() { return shadowkv::DType::kFloat32; }
template <>
constexpr shadowkv::DType dtype_of<double>() { return shadowkv::DType::kFloat64; }
template <>
constexpr shadowkv::DType dtype_of<shadowkv::bf16_t>() { return shadowkv::DType::kBFloat16; }
template <>
constexpr shadowkv::DType dtype_of<shadowkv::fp16_t>() { return shadowkv::DType::kFloat16; }

template <typename T>
T from_double(double x) {
  return shadowkv::from_float<T>(x);
}
template <typename T>
double to_double(T x) {
  return static_cast<double>(shadowkv::to_float(x));
}
// x as it survives a round trip through T (what a kernel of type T actually reads).
template <typename T>
double round_to(double x) {
  return to_double(from_double<T>(x));
}

inline double nan() { return std::numeric_limits<double>::quiet_NaN(); }

// How a [N0, N1, N2, D] tensor is laid out in memory; D is always contiguous.
enum class Layout {
  kContiguous,  // [N0, N1, N2, D]
  kSwap12,      // memory order [N0, N2, N1, D] (e.g. [B, L, H, D] for a [B, H, L, D] view)
  kPadded,      // rows of D + 3 elements, the gaps NaN
};

// A strided 4-D tensor whose buffer ends right after its last element.
template <typename T>
struct Tensor4 {
  int64_t n0 = 0, n1 = 0, n2 = 0, d = 0;
  int64_t stride[3] = {0, 0, 0};
  std::vector<T> data;

  Tensor4() = default;
  Tensor4(int64_t n0_, int64_t n1_, int64_t n2_, int64_t d_, Layout layout) : n0(n0_), n1(n1_), n2(n2_), d(d_) {
    const int64_t row = layout == Layout::kPadded ? d + 3 : d;
    if (layout == Layout::kSwap12) {
      stride[1] = row;
      stride[2] = n1 * row;
      stride[0] = n2 * n1 * row;
    } else {
      stride[2] = row;
      stride[1] = n2 * row;
      stride[0] = n1 * n2 * row;
    }
    const bool empty = n0 == 0 || n1 == 0 || n2 == 0 || d == 0;
    const int64_t size = empty ? 0 : (n0 - 1) * stride[0] + (n1 - 1) * stride[1] + (n2 - 1) * stride[2] + d;
    data.assign(static_cast<size_t>(size), from_double<T>(nan()));
  }
  int64_t offset(int64_t i0, int64_t i1, int64_t i2) const { return i0 * stride[0] + i1 * stride[1] + i2 * stride[2]; }
  T& at(int64_t i0, int64_t i1, int64_t i2, int64_t k) { return data[offset(i0, i1, i2) + k]; }
  double get(int64_t i0, int64_t i1, int64_t i2, int64_t k) const { return to_double(data[offset(i0, i1, i2) + k]); }
  void set(int64_t i0, int64_t i1, int64_t i2, int64_t k, double x) { at(i0, i1, i2, k) = from_double<T>(x); }
  // Nullptr for an empty tensor, as an allocator may give.
  T* ptr() { return data.empty() ? nullptr : data.data(); }
};

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  double normal() { return std::normal_distribution<double>()(gen); }
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }  // [lo, hi]
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(gen); }
};

// The ParallelFor flavours: one call; one item per call in reverse order (any split, any
// order); three threads.
inline void reverse_items_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  for (int64_t i = n - 1; i >= 0; --i) body(i, i + 1);
}
inline void threaded_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t parts = std::min<int64_t>(n, 3);
  std::vector<std::thread> threads;
  for (int64_t i = 0; i < parts; ++i) threads.emplace_back(body, i * n / parts, (i + 1) * n / parts);
  for (auto& t : threads) t.join();
}
inline const std::vector<shadowkv::ParallelFor>& all_parallel_fors() {
  static const std::vector<shadowkv::ParallelFor> fors{shadowkv::serial_for, reverse_items_for, threaded_for};
  return fors;
}

}  // namespace shadowkv_test
