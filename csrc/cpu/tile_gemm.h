// The one small matrix product the CPU attention kernels are made of.
//
// Every product of the forward and backward (S = Q K^T, dP = dO V^T, O += P V, dV += P^T dO,
// dK += dS^T Q, dQ += dS K) is C[i, w] += sum_k A(k, i) * B[k, w] on one (query tile, key
// tile) pair, with A read through two strides so transposed operands need no copy. Blocks of
// kRows x kCols outputs are accumulated in a local array that the compiler keeps in vector
// registers across the whole k loop (the naive loop order reloads and stores a row of C for
// every k). Each output still sums over k in increasing order, so results do not depend on
// the blocking, the tile position or the thread count.
#pragma once

#include <cstdint>

#include "isa.h"

namespace shadowkv::cpu {

namespace detail {

#if defined(__GNUC__)
// GCC/Clang vector extensions: the accumulators are vectors along w, written out so the
// compiler cannot pick the k loop (strided A) as the one to vectorise instead. VB is the
// vector width in bytes: the widest the code's target has natively (a wider generic vector is
// lowered piecewise, which is slower than scalar code): 16 on the SSE baseline, 32 with AVX
// and in the AVX2 variants (isa.h).
#if defined(__AVX__)
constexpr int kBaselineVecBytes = 32;
#else
constexpr int kBaselineVecBytes = 16;
#endif
// The width the AVX2 variants (SHADOWKV_AVX2_FN functions) use.
constexpr int kAvx2VecBytes = SHADOWKV_CPU_AVX2_VARIANT ? 32 : kBaselineVecBytes;
// The width the AVX-512 variants (SHADOWKV_AVX512_FN functions) use.
#if SHADOWKV_CPU_AVX512_VARIANT || defined(__AVX512F__)
constexpr int kAvx512VecBytes = 64;
#else
constexpr int kAvx512VecBytes = kBaselineVecBytes;
#endif
template <typename acc_t, int VB>
struct Vec;  // a vector_size attribute on a dependent type would be ignored: one per case
template <>
struct Vec<float, 16> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Vec<float, 32> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double, 16> {
  typedef double type __attribute__((vector_size(16)));
};
template <>
struct Vec<double, 32> {
  typedef double type __attribute__((vector_size(32)));
};
template <>
struct Vec<float, 64> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double, 64> {
  typedef double type __attribute__((vector_size(64)));
};

template <int MR, int NR, int VB, typename acc_t>
SHADOWKV_CPU_INLINE void gemm_block(int64_t K, const acc_t* __restrict a, int64_t a_k, int64_t a_i,
                                    const acc_t* __restrict b, int64_t b_k, acc_t* __restrict c, int64_t c_i) {
  using V = typename Vec<acc_t, VB>::type;
  constexpr int L = VB / sizeof(acc_t);  // lanes
  static_assert(NR % L == 0, "blocks are whole vectors");
  constexpr int NV = NR / L;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&acc[i][v], c + i * c_i + L * v, sizeof(V));
  for (int64_t k = 0; k < K; ++k) {
    V bk[NV];
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&bk[v], b + k * b_k + L * v, sizeof(V));
    for (int i = 0; i < MR; ++i) {
      const acc_t av = a[k * a_k + i * a_i];
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bk[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) __builtin_memcpy(c + i * c_i + L * v, &acc[i][v], sizeof(V));
}
#else
constexpr int kBaselineVecBytes = 16;  // unused: plain loops
constexpr int kAvx2VecBytes = kBaselineVecBytes;
constexpr int kAvx512VecBytes = kBaselineVecBytes;
template <int MR, int NR, int VB, typename acc_t>
SHADOWKV_CPU_INLINE void gemm_block(int64_t K, const acc_t* a, int64_t a_k, int64_t a_i, const acc_t* b, int64_t b_k,
                                    acc_t* c, int64_t c_i) {
  acc_t acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int w = 0; w < NR; ++w) acc[i][w] = c[i * c_i + w];
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < MR; ++i) {
      const acc_t av = a[k * a_k + i * a_i];
      for (int w = 0; w < NR; ++w) acc[i][w] += av * b[k * b_k + w];
    }
  for (int i = 0; i < MR; ++i)
    for (int w = 0; w < NR; ++w) c[i * c_i + w] = acc[i][w];
}
#endif

// Edges of the block grid: the same sums, element by element.
template <typename acc_t>
SHADOWKV_CPU_INLINE void gemm_edge(int64_t m, int64_t n, int64_t K, const acc_t* a, int64_t a_k, int64_t a_i,
                                   const acc_t* b, int64_t b_k, acc_t* c, int64_t c_i) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t w = 0; w < n; ++w) {
      acc_t s = c[i * c_i + w];
      for (int64_t k = 0; k < K; ++k) s += a[k * a_k + i * a_i] * b[k * b_k + w];
      c[i * c_i + w] = s;
    }
}

}  // namespace detail

// C[i * c_i + w] += sum_{k < K} a[k * a_k + i * a_i] * b[k * b_k + w]  for i < m, w < n.
// C must not overlap A or B. VB: vector bytes of the code's target (the AVX2 variants pass 32).
template <int VB = detail::kBaselineVecBytes, typename acc_t>
SHADOWKV_CPU_INLINE void tile_gemm_acc(int64_t m, int64_t n, int64_t K, const acc_t* a, int64_t a_k, int64_t a_i,
                                       const acc_t* b, int64_t b_k, acc_t* c, int64_t c_i) {
  // Rows x 64 bytes of accumulators (16 floats, 8 doubles): 4 rows in 16 SSE registers (on the
  // SSE baseline, 4 x 8, 6 x 8, 3 x 16 and 4 x 16 floats measured within 5% of each other);
  // 6 rows in 12 of the 16 AVX registers (about 4% faster than 4 rows in the AVX2 variants).
  // AVX-512: 8 rows x 128 bytes (32 floats) in 16 of the 32 registers; 8 divides the 32-row
  // query tiles, so no row is left to the one-row blocks.
  constexpr int kRows = VB == 64 ? 8 : VB == 32 ? 6 : 4;
  constexpr int kCols = static_cast<int>((VB == 64 ? 128 : 64) / sizeof(acc_t));
  const int64_t m_full = m - m % kRows, n_full = n - n % kCols;
  for (int64_t i = 0; i < m_full; i += kRows) {
    for (int64_t w = 0; w < n_full; w += kCols)
      detail::gemm_block<kRows, kCols, VB>(K, a + i * a_i, a_k, a_i, b + w, b_k, c + i * c_i + w, c_i);
    detail::gemm_edge(kRows, n - n_full, K, a + i * a_i, a_k, a_i, b + n_full, b_k, c + i * c_i + n_full, c_i);
  }
  for (int64_t w = 0; w < n_full; w += kCols)  // the last m % kRows rows, one at a time
    for (int64_t i = m_full; i < m; ++i)
      detail::gemm_block<1, kCols, VB>(K, a + i * a_i, a_k, a_i, b + w, b_k, c + i * c_i + w, c_i);
  detail::gemm_edge(m - m_full, n - n_full, K, a + m_full * a_i, a_k, a_i, b + n_full, b_k,
                    c + m_full * c_i + n_full, c_i);
}

}  // namespace shadowkv::cpu
