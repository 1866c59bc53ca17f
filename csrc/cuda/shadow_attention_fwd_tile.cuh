// The per-key-tile softmax and the epilogue shared by the two CuTe forward
// kernels (sm_80 mma.sync: shadow_attention_fwd_cute.cu; sm_90a wgmma:
// shadow_attention_fwd_wgmma_cute.cu).
// Both see their score and output accumulators through a (rows, cols) view (acc_rowcol of
// their family) in which a thread's row r is one query row held by the four lanes of a quad.
#pragma once

#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"

namespace shadowkv {
namespace cuda_attn {

// Masks the scores `s` of key tile k0 (rows x cols view; its coordinates in `rc`), scales them
// into the log2 domain and applies one online-softmax step: P overwrites S in place, the
// running max `m_run` / partial sums `l_run` are updated and the output rows `o` rescaled.
// `ev_col` holds the log entry of each column (read only for partial tiles).
template <int kRows, int kCols, class S, class RowCol, class O>
__device__ __forceinline__ void softmax_tile(S& s, RowCol const& rc, O& o, const int (&ev_col)[kCols], bool partial,
                                             int64_t k0, int64_t p0, float scale_log2, float (&m_run)[kRows],
                                             float (&l_run)[kRows]) {
  using cute::get;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t pos = p0 + get<0>(rc(r, 0));
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      float x = s(r, c) * scale_log2;
      if (partial && !visible(k0 + get<1>(rc(r, c)), pos, ev_col[c])) x = -INFINITY;
      s(r, c) = x;
      mx = fmaxf(mx, x);
    }
    const float m_new = fmaxf(m_run[r], cuda_cute::quad_max(mx));
    const bool none = m_new == -INFINITY;  // no visible key in this row so far: avoid inf - inf
    const float alpha = none ? 1.f : exp2f(m_run[r] - m_new);
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float pr = none ? 0.f : exp2f(s(r, c) - m_new);
      s(r, c) = pr;
      sum += pr;
    }
    l_run[r] = l_run[r] * alpha + sum;
    m_run[r] = m_new;
    CUTE_UNROLL
    for (int c = 0; c < cute::size<1>(o); ++c) o(r, c) *= alpha;
  }
}

// Normalises the output rows `o` (coordinates in `rc`) and writes those below t.rows, and
// their log-sum-exp (one lane per quad).
template <typename T, int kRows, class O, class RowCol>
__device__ __forceinline__ void write_rows(const ShadowAttentionParams& p, const QueryTile& t, O const& o,
                                           RowCol const& rc, const float (&m_run)[kRows],
                                           const float (&l_run)[kRows]) {
  using cute::get;
  T* og = static_cast<T*>(p.out) + t.b * p.o_stride[0] + t.hq * p.o_stride[1] + t.i0 * p.o_stride[2];
  float* lse = static_cast<float*>(p.lse) + t.b * p.lse_stride[0] + t.hq * p.lse_stride[1] + t.i0;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float l = cuda_cute::quad_sum(l_run[r]);  // every lane of the quad, before any leaves
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = get<0>(rc(r, 0));
    if (row >= t.rows) continue;
    CUTE_UNROLL
    for (int c = 0; c < cute::size<1>(o); ++c) og[row * p.o_stride[2] + get<1>(rc(r, c))] = from_f32<T>(o(r, c) * inv);
    if (threadIdx.x % 4 == 0) lse[row] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
  }
}

// Whether V row `row` of key tile k0 is loaded (else staged as zeros): a key past kv_len never
// is; in a partial tile only keys that some valid row of the block can see are, so that a
// hidden slot's content (NaN, inf) adds exactly nothing where its P is 0.
__device__ __forceinline__ bool v_row_needed(int row, int64_t k0, const ShadowAttentionParams& p, const QueryTile& t,
                                             TileKind kind, const int32_t* evg) {
  const int64_t j = k0 + row;
  if (j >= p.kv_len) return false;
  if (kind != TileKind::kPartial) return true;
  const int64_t first = j > t.p0 ? j : t.p0;  // the first position of the block that can see j
  return first <= t.p1 && first < __ldg(evg + j);
}

}  // namespace cuda_attn
}  // namespace shadowkv
