// The per-tile pieces shared by the two CuTe backward families (sm_80 mma.sync:
// shadow_attention_bwd_cute.cu; sm_90a wgmma: shadow_attention_bwd_wgmma_cute.cu): the softmax
// statistics of the query rows, P and dS from the recomputed scores, the walk of a dK/dV block
// over (GQA head, query tile) steps, and the epilogues.
// Both families see their score accumulators through a (rows, cols) view (acc_rowcol of their
// family, coordinates in `rc`): in the dQ kernels rows are query rows and columns keys, in the
// dK/dV kernels rows are keys and columns query rows.
#pragma once

#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"

namespace shadowkv {
namespace cuda_attn {

// Rows [r0, r0 + Rows) of two global [*, D] matrices (a, b: Q and dO, or K and V) into the
// shared tiles dst_a and dst_b with cp.async (gmem_thr is gmem_copy's slice for this thread,
// coord its partition of a (Rows, D) identity tensor); rows past `valid` become zeros.
template <int Rows, int D, class GmemCopy, class GmemThr, class Coord, class E, class DstA, class DstB>
__device__ __forceinline__ void load_pair(GmemCopy const& gmem_copy, GmemThr const& gmem_thr, Coord const& coord,
                                          int64_t r0, int64_t valid, const E* a, int64_t a_stride, DstA&& dst_a,
                                          const E* b, int64_t b_stride, DstB&& dst_b) {
  using cuda_cute::copy_rows;
  using cuda_cute::gmem_tile;
  copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<Rows, D>(a, a_stride, r0)), gmem_thr.partition_D(dst_a),
            coord, valid);
  copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<Rows, D>(b, b_stride, r0)), gmem_thr.partition_D(dst_b),
            coord, valid);
}

// The query tile st of a dK/dV block (rows st.i0.. of query head st.hq) of Q and dO into the
// shared tiles dst_q and dst_do, as load_pair.
template <int Rows, int D, class E, class GmemCopy, class GmemThr, class Coord, class Step, class DstQ, class DstDO>
__device__ __forceinline__ void load_q_do(GmemCopy const& gmem_copy, GmemThr const& gmem_thr, Coord const& coord,
                                          const ShadowAttentionBwdParams& bp, const KeyTile& kt, Step st,
                                          DstQ&& dst_q, DstDO&& dst_do) {
  const ShadowAttentionParams& p = bp.fwd;
  load_pair<Rows, D>(gmem_copy, gmem_thr, coord, st.i0, p.q_len - st.i0,
                     static_cast<const E*>(p.q) + kt.b * p.q_stride[0] + st.hq * p.q_stride[1], p.q_stride[2], dst_q,
                     static_cast<const E*>(bp.grad_out) + kt.b * bp.do_stride[0] + st.hq * bp.do_stride[1],
                     bp.do_stride[2], dst_do);
}

// lse2 = lse * log2(e) and delta = rowsum(dO * O) - grad_lse of query row q of a tile whose row
// 0 is workspace row ws_row0 and which has `rows` rows: padding rows get lse2 = +inf and
// delta = 0, so their P is 0 and they add nothing.
struct RowStats {
  float lse2, delta;
};
__device__ __forceinline__ RowStats row_stats(const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws,
                                              int64_t ws_row0, int64_t rows, int q) {
  return q < rows ? RowStats{lse2_ws[ws_row0 + q], delta_ws[ws_row0 + q]} : RowStats{INFINITY, 0.f};
}

// The statistics of the query rows of the view's rows (dQ kernels).
template <int kRows, class RowCol>
__device__ __forceinline__ void load_row_stats(float (&lse2)[kRows], float (&delta)[kRows],
                                               const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws,
                                               int64_t ws_row0, int64_t rows, RowCol const& rc) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const RowStats st = row_stats(lse2_ws, delta_ws, ws_row0, rows, static_cast<int>(cute::get<0>(rc(r, 0))));
    lse2[r] = st.lse2;
    delta[r] = st.delta;
  }
}

// dQ kernels: dS = P (dP - delta) of key tile k0 for the query rows at positions p0 + row,
// overwriting the scores `s` (P itself is not needed: dQ = dS K). `full`: every pair is visible;
// else `ev_col` holds each column's log entry.
template <int kRows, int kCols, class S, class DP, class RowCol>
__device__ __forceinline__ void ds_by_query_rows(S& s, DP const& dp, RowCol const& rc, const int (&ev_col)[kCols],
                                                 bool full, int64_t k0, int64_t p0, float scale_log2,
                                                 const float (&lse2)[kRows], const float (&delta)[kRows]) {
  using cute::get;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t pos = p0 + get<0>(rc(r, 0));
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const bool vis = full || visible(k0 + get<1>(rc(r, c)), pos, ev_col[c]);
      const float pr = vis ? exp2f(s(r, c) * scale_log2 - lse2[r]) : 0.f;
      s(r, c) = pr * (dp(r, c) - delta[r]);
    }
  }
}

// dK/dV kernels: P^T overwrites the scores `s_t` and dS^T = P^T (dP^T - delta) overwrites `dp_t`,
// for the keys k0 + row (their log entries in `ev_row`) against the query rows at positions
// p0 + column, `rows` of them, whose statistics start at workspace row ws_row0. `full`: every
// pair is visible. Column by column, so that only one column's statistics are live at a time
// (the dK/dV accumulators take most of the registers).
template <int kRows, class S, class DP, class RowCol>
__device__ __forceinline__ void p_ds_by_key_rows(S& s_t, DP& dp_t, RowCol const& rc, const int (&ev_row)[kRows],
                                                 bool full, int64_t k0, int64_t p0, float scale_log2,
                                                 const float* __restrict__ lse2_ws,
                                                 const float* __restrict__ delta_ws, int64_t ws_row0, int64_t rows) {
  using cute::get;
  CUTE_UNROLL
  for (int c = 0; c < cute::size<1>(rc); ++c) {
    const int col = get<1>(rc(0, c));
    const RowStats st = row_stats(lse2_ws, delta_ws, ws_row0, rows, col);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const bool vis = full || visible(k0 + get<0>(rc(r, 0)), p0 + col, ev_row[r]);
      const float pr = vis ? exp2f(s_t(r, c) * scale_log2 - st.lse2) : 0.f;
      s_t(r, c) = pr;
      dp_t(r, c) = pr * (dp_t(r, c) - st.delta);
    }
  }
}

// The log entries of the view's rows (the keys of a dK/dV block), kEvOutOfRange past its rows.
template <int kRows, class RowCol>
__device__ __forceinline__ void load_row_log(int (&ev)[kRows], const int32_t* evg, const KeyTile& kt,
                                             RowCol const& rc) {
  using cute::get;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = get<0>(rc(r, 0));
    ev[r] = row < kt.rows ? __ldg(evg + kt.k0 + row) : kEvOutOfRange;
  }
}

// A dK/dV block's steps: every (query head of the GQA group, query tile of `tile` rows in
// [i_begin, i_end)), heads outer, so that a prefetch crosses from one head to the next.
struct HeadQuerySteps {
  struct Step {
    int64_t hq, i0;
  };
  int64_t hq_begin, hq_end, i_begin, i_end;
  int tile;
  // No steps at all when no query can see the block's keys (i_begin >= i_end).
  __device__ HeadQuerySteps(const ShadowAttentionParams& p, const KeyTile& kt, int tile_rows)
      : hq_begin(kt.hkv * (p.num_q_heads / p.num_kv_heads)),
        hq_end(kt.i_begin < kt.i_end ? hq_begin + p.num_q_heads / p.num_kv_heads : hq_begin),
        i_begin(kt.i_begin),
        i_end(kt.i_end),
        tile(tile_rows) {}
  __device__ Step first() const { return Step{hq_begin, i_begin}; }
  __device__ bool done(Step st) const { return st.hq >= hq_end; }
  __device__ Step after(Step st) const {
    st.i0 += tile;
    if (st.i0 >= i_end) st = Step{st.hq + 1, i_begin};
    return st;
  }
};

// dQ = scale * acc for the rows of query tile t below t.rows (coordinates of acc in `coord`).
template <typename T, class Acc, class Coord>
__device__ __forceinline__ void write_dq(const ShadowAttentionBwdParams& bp, const QueryTile& t, Acc const& acc,
                                         Coord const& coord, float scale) {
  using cute::get;
  T* dqg = static_cast<T*>(bp.grad_q) + t.b * bp.dq_stride[0] + t.hq * bp.dq_stride[1] + t.i0 * bp.dq_stride[2];
  CUTE_UNROLL
  for (int i = 0; i < cute::size(acc); ++i) {
    const int row = get<0>(coord(i));
    if (row < t.rows) dqg[row * bp.dq_stride[2] + get<1>(coord(i))] = from_f32<T>(acc(i) * scale);
  }
}

// dK = scale * acc_dk and dV = acc_dv for the keys of block kt below kt.rows.
template <typename T, class Acc, class Coord>
__device__ __forceinline__ void write_dkdv(const ShadowAttentionBwdParams& bp, const KeyTile& kt, Acc const& acc_dk,
                                           Acc const& acc_dv, Coord const& coord, float scale) {
  using cute::get;
  T* dkg = static_cast<T*>(bp.grad_k) + kt.b * bp.dk_stride[0] + kt.hkv * bp.dk_stride[1] + kt.k0 * bp.dk_stride[2];
  T* dvg = static_cast<T*>(bp.grad_v) + kt.b * bp.dv_stride[0] + kt.hkv * bp.dv_stride[1] + kt.k0 * bp.dv_stride[2];
  CUTE_UNROLL
  for (int i = 0; i < cute::size(acc_dk); ++i) {
    const int row = get<0>(coord(i)), d = get<1>(coord(i));
    if (row < kt.rows) {
      dkg[row * bp.dk_stride[2] + d] = from_f32<T>(acc_dk(i) * scale);
      dvg[row * bp.dv_stride[2] + d] = from_f32<T>(acc_dv(i));
    }
  }
}

// Host: launches one backward kernel (dQ or dK/dV: the same arguments) on `blocks` blocks of
// kBwdThreads threads with `smem` bytes of dynamic shared memory; nothing when blocks == 0.
constexpr int kBwdThreads = 128;
template <typename Kernel>
void launch_cute_bwd_kernel(Kernel kernel, int64_t blocks, size_t smem, const char* name,
                            const ShadowAttentionBwdParams& bp, const int2* mm, int64_t n_ev, const float* lse2,
                            const float* delta, float scale_log2, cudaStream_t s) {
  if (blocks == 0) return;
  set_smem_limit(kernel, smem);
  kernel<<<grid_1d(blocks, name), kBwdThreads, smem, s>>>(bp, mm, n_ev, lse2, delta, scale_log2);
  check_launch(name);
}

}  // namespace cuda_attn
}  // namespace shadowkv
