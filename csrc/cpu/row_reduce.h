// Max and sum of a row of scores with independent lanes.
//
// A plain `for (c) m = max(m, x[c])` or `s += x[c]` is one dependency chain: at 64 keys per
// tile the chains cost as much as the tile's matrix products. kLanes running partial results
// (combined in a fixed order at the end) break the chain and vectorise. The max is exact in
// any order; the sum's rounding differs from a left-to-right sum but is the same for every
// tile position and thread count.
#pragma once

#include <cstdint>

#include "isa.h"

namespace shadowkv::cpu {

constexpr int kLanes = 8;

// max(init, x[0..n)); a NaN in x is ignored like std::max(m, NaN) does.
template <typename acc_t>
SHADOWKV_CPU_INLINE acc_t row_max(const acc_t* x, int64_t n, acc_t init) {
  acc_t lane[kLanes];
  for (int w = 0; w < kLanes; ++w) lane[w] = init;
  const int64_t n_full = n - n % kLanes;
  for (int64_t c = 0; c < n_full; c += kLanes)
    for (int w = 0; w < kLanes; ++w) lane[w] = lane[w] < x[c + w] ? x[c + w] : lane[w];
  acc_t m = init;
  for (int w = 0; w < kLanes; ++w) m = m < lane[w] ? lane[w] : m;
  for (int64_t c = n_full; c < n; ++c) m = m < x[c] ? x[c] : m;
  return m;
}

template <typename acc_t>
SHADOWKV_CPU_INLINE acc_t row_sum(const acc_t* x, int64_t n) {
  acc_t lane[kLanes] = {};
  const int64_t n_full = n - n % kLanes;
  for (int64_t c = 0; c < n_full; c += kLanes)
    for (int w = 0; w < kLanes; ++w) lane[w] += x[c + w];
  acc_t s = 0;
  for (int w = 0; w < kLanes; ++w) s += lane[w];
  for (int64_t c = n_full; c < n; ++c) s += x[c];
  return s;
}

}  // namespace shadowkv::cpu
