// The CuTe shadow-attention backward as two kernel bodies templated on the MMA family:
// cuda_cute::Family (sm_80+ mma.sync; shadow_attention_bwd_cute.cu) and cuda_wgmma::Family
// (sm_90a warpgroup MMAs; shadow_attention_bwd_wgmma_cute.cu). bfloat16/float16, head_dim 64 or
// 128. The split of shadow_attention_bwd.cu (a dQ kernel and a dK/dV kernel, every gradient
// element written once, no atomics, deterministic), with S, dP, P and dS kept in registers:
// each probability-sized accumulator, rounded to 16 bits, is the A operand of the next product.
// Per-row inputs (lse2 = lse * log2(e), delta = rowsum(dO * O) - grad_lse) come from
// bwd_rows_kernel in shadow_attention_bwd.cu, which also picks the family.
//
//   dQ kernel, block = 64 query rows, per live key tile (K, V):
//     S = Q K^T and dP = dO V^T (one product pair), P = exp2(S scale_log2 - lse2) on visible
//     pairs, dS = P (dP - delta), dQ += dS K                   (dQ *= scale at the end)
//   dK/dV kernel, block = 64 key rows, per head of the GQA group, per query tile (Q, dO) that
//   can see the block's keys:
//     S^T = K Q^T and dP^T = V dO^T, P^T, dS^T as above, dV += P^T dO and dK += dS^T Q (one
//     pair; dK *= scale)
//
// Partner tiles (K, V in the dQ kernel; Q, dO in the dK/dV kernel) are double-buffered: the
// next live one is requested with cp.async before the current one is used, so its load runs
// under the products of the current step (with 2 blocks per SM, as the registers allow at
// head_dim 128, there are too few warps for the scheduler to hide a load by switching).
// Score accumulators are seen through the family's (rows, cols) view (coordinates in `rc`): in
// the dQ kernel rows are query rows and columns keys, in the dK/dV kernel rows are keys and
// columns query rows.
#pragma once

#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"

namespace shadowkv {
namespace cuda_attn {

// The keep predicate of rows [0, valid).
__device__ __forceinline__ auto rows_below(int64_t valid) {
  return [valid](int row) { return row < valid; };
}

// The query tile st of a dK/dV block (rows st.i0.. of query head st.hq) of Q and dO into the
// shared tiles dst_q and dst_do, as load_pair.
template <int Rows, int D, class E, class GmemCopy, class GmemThr, class Coord, class Step, class DstQ, class DstDO>
__device__ __forceinline__ void load_q_do(GmemCopy const& gmem_copy, GmemThr const& gmem_thr, Coord const& coord,
                                          const ShadowAttentionBwdParams& bp, const KeyTile& kt, Step st,
                                          DstQ&& dst_q, DstDO&& dst_do) {
  const ShadowAttentionParams& p = bp.fwd;
  cuda_cute::load_pair<Rows, D>(gmem_copy, gmem_thr, coord, st.i0, rows_below(p.q_len - st.i0), p.q_len - st.i0 >= Rows,
                                static_cast<const E*>(p.q) + kt.b * p.q_stride[0] + st.hq * p.q_stride[1],
                                p.q_stride[2], dst_q,
                                static_cast<const E*>(bp.grad_out) + kt.b * bp.do_stride[0] + st.hq * bp.do_stride[1],
                                bp.do_stride[2], dst_do);
}

// lse2 = lse * log2(e) and delta = rowsum(dO * O) - grad_lse of query row q of a tile whose
// statistics start at `lse2` and `delta` (the workspaces at the tile's row 0) and which has
// `rows` rows: padding rows get lse2 = +inf and delta = 0, so their P is 0 and they add nothing.
struct RowStats {
  float lse2, delta;
};
__device__ __forceinline__ RowStats row_stats(const float* __restrict__ lse2, const float* __restrict__ delta, int q,
                                              int rows) {
  return q < rows ? RowStats{lse2[q], delta[q]} : RowStats{INFINITY, 0.f};
}

// The statistics of the query rows of the view's rows (dQ kernels).
template <int kRows, class RowCol>
__device__ __forceinline__ void load_row_stats(float (&lse2)[kRows], float (&delta)[kRows],
                                               const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws,
                                               int64_t ws_row0, int64_t rows, RowCol const& rc) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const RowStats st = row_stats(lse2_ws + ws_row0, delta_ws + ws_row0, static_cast<int>(cute::get<0>(rc(r, 0))),
                                  static_cast<int>(rows));
    lse2[r] = st.lse2;
    delta[r] = st.delta;
  }
}

// dQ kernels: dS = P (dP - delta) of key tile k0 for the query rows at positions p0 + row,
// overwriting the scores `s` (P itself is not needed: dQ = dS K). `full`: every pair is visible
// and `ev_col` is not read (a literal `true` leaves no test in the inlined code); else `ev_col`
// holds each column's log entry.
template <int kRows, int kCols, class S, class DP, class RowCol>
__device__ __forceinline__ void ds_by_query_rows(S& s, DP const& dp, RowCol const& rc, const int (&ev_col)[kCols],
                                                 bool full, int64_t k0, int64_t p0, float scale_log2,
                                                 const float (&lse2)[kRows], const float (&delta)[kRows]) {
  using cute::get;
  const int col0 = get<1>(rc(0, 0));  // columns relative to it: compile-time offsets (load_staged_column_log)
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t pos = p0 + get<0>(rc(r, 0));
    const int64_t last = pos - k0 - col0;  // for visible_at_offset
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int off = get<1>(rc(r, c)) - col0;
      const bool vis = full || visible_at_offset(off, last, pos, ev_col[c]);
      const float pr = vis ? cuda_common::fast_exp2(s(r, c) * scale_log2 - lse2[r]) : 0.f;
      s(r, c) = pr * (dp(r, c) - delta[r]);
    }
  }
}

// A bound on tile-relative column offsets as an int: outside [-1, 2^30] only its side matters.
__device__ __forceinline__ int clamp_offset(int64_t x) {
  return x < -1 ? -1 : x > (int64_t{1} << 30) ? (1 << 30) : static_cast<int>(x);
}

// dK/dV kernels: P^T overwrites the scores `s_t` and dS^T = P^T (dP^T - delta) overwrites `dp_t`,
// for the keys k0 + row (their log entries in `ev_row`) against the query rows at positions
// p0 + column, `rows` of them, whose statistics start at workspace row ws_row0. `full`: every
// pair is visible. Column by column, so that only one column's statistics are live at a time
// (the dK/dV accumulators take most of the registers). Two copies of this step (full and
// partial, F::kTwoMaskCopies) made the wgmma dK/dV kernel spill while the mask tested 64-bit
// positions per column; with column offsets it spills a word or two, outside the full-tile path
// (SASS, bf16 D=128: that path's step 255 instructions, the predicated one ~760 before).
template <int kRows, class S, class DP, class RowCol>
__device__ __forceinline__ void p_ds_by_key_rows(S& s_t, DP& dp_t, RowCol const& rc, const int (&ev_row)[kRows],
                                                 bool full, int64_t k0, int64_t p0, float scale_log2,
                                                 const float* __restrict__ lse2_ws,
                                                 const float* __restrict__ delta_ws, int64_t ws_row0, int64_t rows) {
  using cute::get;
  // Query columns relative to the thread's first one (compile-time offsets, as
  // load_staged_column_log): key row r is visible to the query at offset `off` iff
  // lo[r] <= off < hi[r] (key <= position < its log entry), bounds clamped to int (offsets are
  // below the tile width).
  const int col0 = get<1>(rc(0, 0));
  const int64_t pos0 = p0 + col0;
  int lo[kRows], hi[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    lo[r] = clamp_offset(k0 + get<0>(rc(r, 0)) - pos0);
    hi[r] = clamp_offset(ev_row[r] - pos0);
  }
  // The columns' statistics at compile-time offsets from one base: per column a load with an
  // immediate offset, where a 64-bit workspace index per column cost ~250 of this step's ~410
  // instructions on a full tile (SASS, wgmma bf16 D=128: the kernel parameters reloaded, the
  // addresses and the bound compared in 64 bits).
  const float* lse2_c = lse2_ws + ws_row0 + col0;
  const float* delta_c = delta_ws + ws_row0 + col0;
  const int valid = static_cast<int>(rows) - col0;  // column offsets below it are rows < rows
  CUTE_UNROLL
  for (int c = 0; c < cute::size<1>(rc); ++c) {
    const int off = get<1>(rc(0, c)) - col0;
    const RowStats st = row_stats(lse2_c, delta_c, off, valid);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const bool vis = full || (lo[r] <= off && off < hi[r]);
      const float pr = vis ? cuda_common::fast_exp2(s_t(r, c) * scale_log2 - st.lse2) : 0.f;
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
    ev[r] = row < kt.rows ? ev_at(evg, kt.k0 + row) : kEvOutOfRange;
  }
}

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

// dq_kernel's shared memory past its tiles: next_live_tile's kinds, two stages of log entries.
template <class Tr>
constexpr size_t dq_extra_smem() {
  return (Tr::kThreads + 2 * Tr::kBlockN) * sizeof(int);
}

// Two own tiles, two stages of two partner tiles, the family's slack: the shared memory of the
// dQ and dK/dV kernels of family F (the dQ kernel adds dq_extra_smem).
template <class F>
constexpr size_t bwd_tiles_smem() {
  using Tr = typename F::Traits;
  return 2 * Tr::kOwnBytes + cuda_cute::PartnerStages<Tr>::kBytes + F::kSmemSlack;
}

template <class F>
__global__ void __launch_bounds__(F::Traits::kThreads)
    dq_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
              const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using Tr = typename F::Traits;
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    const ShadowAttentionParams& p = bp.fwd;
    const int tid = threadIdx.x;
    F mma(tid);

    unsigned char* smem = F::smem();
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    Tensor sdO = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)), typename Tr::SmemLayoutOwn{});
    const cuda_cute::PartnerStages<Tr> stages(reinterpret_cast<E*>(smem + 2 * Tr::kOwnBytes));  // stage s: K, V
    int* kinds_s = reinterpret_cast<int*>(smem + 2 * Tr::kOwnBytes + cuda_cute::PartnerStages<Tr>::kBytes);
    int* ev_s = kinds_s + Tr::kThreads;  // [2][BN]: a partial tile's log entries, by stage (load_kv)

    const QueryTile t = query_tile(p, BM);
    const E* qg = static_cast<const E*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1];
    const E* dog = static_cast<const E*>(bp.grad_out) + t.b * bp.do_stride[0] + t.hq * bp.do_stride[1];
    const E* kg = static_cast<const E*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
    const E* vg = static_cast<const E*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
    const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
    const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;
    const int64_t ws_row0 = (t.b * p.num_q_heads + t.hq) * p.q_len + t.i0;

    typename Tr::GmemTiledCopy gmem_copy;
    auto gmem_thr = gmem_copy.get_thread_slice(tid);
    Tensor tOwnC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
    cuda_cute::load_pair<BM, D>(gmem_copy, gmem_thr, tOwnC, t.i0, rows_below(t.rows), t.rows >= BM, qg, p.q_stride[2],
                                sQ, dog, bp.do_stride[2], sdO);
    cp_async_fence();

    auto q_op = mma.own(sQ);
    auto do_op = mma.own(sdO);
    Tensor acc_dq = mma.out_acc();
    clear(acc_dq);

    // Rows of this thread's score registers, with their lse2 and delta (padding rows: P = 0).
    Tensor tScS_rc = F::rowcol(mma.score_coords());
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;
    constexpr int kCols = decltype(size<1>(tScS_rc))::value;
    float lse2_r[kRows], delta_r[kRows];
    load_row_stats(lse2_r, delta_r, lse2_ws, delta_ws, ws_row0, t.rows, tScS_rc);

    // Keys past the last query position are in every row's future.
    const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
    // K, V rows of a tile into a stage. A partial tile's rows are all copied (those past kv_len
    // are zeros) with its log entries (into ev_s), and the rows that no valid row of the block
    // sees (kv_row_needed) are zeroed once they landed (clear_hidden_rows): the prefetch then
    // issues its copies without waiting for log entries to decide which rows to copy.
    auto load_kv = [&](int64_t tile, TileKind tile_kind, int stage) {
      const int64_t k0 = tile * BN;
      if (tile_kind == TileKind::kPartial) {
        cuda_cute::stage_tile_log(ev_s + stage * BN, evg, k0, BN, p.kv_len, tid, Tr::kThreads);
      }
      cuda_cute::load_pair<BN, D>(gmem_copy, gmem_thr, tPartC, k0, rows_below(p.kv_len - k0),
                                  tile_kind == TileKind::kFull, kg, p.k_stride[2], stages.tile(stage, 0), vg,
                                  p.v_stride[2], stages.tile(stage, 1));
    };
    // After a partial tile landed: its hidden rows (see load_kv) become zeros, before any MMA
    // reads the stage (the caller's barrier follows).
    auto clear_hidden_rows = [&](int64_t tile, int stage) {
      const int64_t k0 = tile * BN;
      const int* sev = ev_s + stage * BN;
      auto needed = [&](int row) { return staged_kv_row_needed(row, k0, p, t, sev); };
      cuda_cute::clear_rows_unless(gmem_thr.partition_D(stages.tile(stage, 0)), tPartC, needed);
      cuda_cute::clear_rows_unless(gmem_thr.partition_D(stages.tile(stage, 1)), tPartC, needed);
    };
    TileKind kind = TileKind::kSkip;
    int64_t tile = next_live_tile<BN>(0, n_key_tiles, kinds_s, mm, n_ev_tiles, p, t, kind);
    if (tile < n_key_tiles) load_kv(tile, kind, 0);
    cp_async_fence();  // group: Q, dO and the first K, V

    for (int stage = 0; tile < n_key_tiles; stage ^= 1) {
      cp_async_wait<0>();
      F::publish();
      // This stage's K, V (and on the first tile Q, dO) landed for every thread, and every warp
      // is done with the other stage (the previous tile), which the prefetch below refills.
      __syncthreads();
      if (kind == TileKind::kPartial) {  // block-uniform
        clear_hidden_rows(tile, stage);
        F::publish();
        __syncthreads();
      }
      TileKind next_kind = TileKind::kSkip;
      const int64_t next = next_live_tile<BN>(tile + 1, n_key_tiles, kinds_s, mm, n_ev_tiles, p, t, next_kind);
      if (next < n_key_tiles) load_kv(next, next_kind, stage ^ 1);
      cp_async_fence();

      const int64_t k0 = tile * BN;
      Tensor sK_now = stages.tile(stage, 0);
      Tensor acc_s = mma.score_acc();
      Tensor acc_dp = mma.score_acc();
      mma.scores_pair(acc_s, q_op, sK_now, acc_dp, do_op, stages.tile(stage, 1));

      // dS overwrites S.
      Tensor s = F::rowcol(acc_s);
      Tensor dp = F::rowcol(acc_dp);
      // F::kTwoMaskCopies: two copies behind a uniform branch (as masked_softmax_step_by in the
      // forward), so that a full tile reads no log entry and tests no pair.
      int ev_col[kCols];
      const bool full = kind == TileKind::kFull;
      if (F::kTwoMaskCopies && full) {
        ds_by_query_rows(s, dp, tScS_rc, ev_col, true, k0, t.p0, scale_log2, lse2_r, delta_r);
      } else {
        cuda_cute::load_staged_column_log(ev_col, ev_s + stage * BN, tScS_rc, !full, kEvOutOfRange);
        ds_by_query_rows(s, dp, tScS_rc, ev_col, full, k0, t.p0, scale_log2, lse2_r, delta_r);
      }
      Tensor rdS = F::a_operand(acc_s);
      mma.update(acc_dq, rdS, sK_now);

      tile = next;
      kind = next_kind;
    }
    cp_async_wait<0>();  // a block without live tiles still loaded Q and dO

    write_dq<T>(bp, t, acc_dq, mma.out_coords(), scale_log2 / kLog2e);
  }
}

template <class F>
__global__ void __launch_bounds__(F::Traits::kThreads)
    dkdv_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2,
                float* __restrict__ dq_acc) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using Tr = typename F::Traits;
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    const ShadowAttentionParams& p = bp.fwd;
    const int tid = threadIdx.x;
    F mma(tid);

    unsigned char* smem = F::smem();
    Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)), typename Tr::SmemLayoutOwn{});
    const cuda_cute::PartnerStages<Tr> stages(reinterpret_cast<E*>(smem + 2 * Tr::kOwnBytes));  // stage s: Q, dO

    const KeyTile kt = key_tile(p, BM, ev_mm, n_ev_tiles);
    const int32_t* evg = p.evicted_at + kt.b * p.ev_stride[0] + kt.hkv * p.ev_stride[1];
    const E* kg = static_cast<const E*>(p.k) + kt.b * p.k_stride[0] + kt.hkv * p.k_stride[1];
    const E* vg = static_cast<const E*>(p.v) + kt.b * p.v_stride[0] + kt.hkv * p.v_stride[1];

    typename Tr::GmemTiledCopy gmem_copy;
    auto gmem_thr = gmem_copy.get_thread_slice(tid);
    Tensor tOwnC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
    // Own K, V rows that no query of the block's range sees are zeros (own_kv_row_needed).
    cuda_cute::load_pair<BM, D>(gmem_copy, gmem_thr, tOwnC, kt.k0,
                                [&](int row) { return own_kv_row_needed(row, p, kt, evg); }, false, kg,
                                p.k_stride[2], sK,
                                vg, p.v_stride[2], sV);
    cp_async_fence();

    auto k_op = mma.own(sK);
    auto v_op = mma.own(sV);
    Tensor acc_dk = mma.out_acc();
    Tensor acc_dv = mma.out_acc();
    clear(acc_dk);
    clear(acc_dv);

    // Rows of the score registers are this block's keys, columns the query tile's rows.
    Tensor tScS_rc = F::rowcol(mma.score_coords());
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;
    int ev_row[kRows];
    load_row_log(ev_row, evg, kt, tScS_rc);

    const HeadQuerySteps steps(p, kt, BN);
    auto load_qdo = [&](HeadQuerySteps::Step st, int stage) {
      load_q_do<BN, D, E>(gmem_copy, gmem_thr, tPartC, bp, kt, st, stages.tile(stage, 0), stages.tile(stage, 1));
    };
    if (!steps.done(steps.first())) load_qdo(steps.first(), 0);
    cp_async_fence();  // group: K, V and the first Q, dO

    int stage = 0;
    for (auto st = steps.first(); !steps.done(st); st = steps.after(st), stage ^= 1) {
      cp_async_wait<0>();
      F::publish();
      // This stage's Q, dO (and on the first step K, V) landed for every thread, and every warp
      // is done with the other stage (the previous step), which the prefetch below refills.
      __syncthreads();
      const auto next = steps.after(st);
      if (!steps.done(next)) load_qdo(next, stage ^ 1);
      cp_async_fence();

      const auto [rows, p0, full] = query_rows(p, kt, BM, st.i0, BN);
      Tensor sQ_now = stages.tile(stage, 0);
      Tensor sdO_now = stages.tile(stage, 1);
      Tensor acc_st = mma.score_acc();
      Tensor acc_dpt = mma.score_acc();
      mma.scores_pair(acc_st, k_op, sQ_now, acc_dpt, v_op, sdO_now);

      // P^T overwrites S^T, dS^T overwrites dP^T.
      Tensor s_t = F::rowcol(acc_st);
      Tensor dp_t = F::rowcol(acc_dpt);
      const int64_t ws_row0 = (kt.b * p.num_q_heads + st.hq) * p.q_len + st.i0;
      // F::kTwoMaskCopies: a full step tests no pair (as in the dQ kernel).
      if (F::kTwoMaskCopies && full) {
        p_ds_by_key_rows(s_t, dp_t, tScS_rc, ev_row, true, kt.k0, p0, scale_log2, lse2_ws, delta_ws, ws_row0, rows);
      } else {
        p_ds_by_key_rows(s_t, dp_t, tScS_rc, ev_row, full, kt.k0, p0, scale_log2, lse2_ws, delta_ws, ws_row0, rows);
      }
      Tensor rP = F::a_operand(acc_st);
      if constexpr (F::kAtomicDq) {  // dK and dQ from dS^T in shared memory, dQ added to dq_acc
        mma.update_fused(acc_dv, rP, sdO_now, acc_dk, acc_dpt, sQ_now,
                         smem + 2 * Tr::kOwnBytes + cuda_cute::PartnerStages<Tr>::kBytes, sK, dq_acc + ws_row0 * D,
                         rows);
      } else {
        Tensor rdS = F::a_operand(acc_dpt);
        mma.update_pair(acc_dv, rP, sdO_now, acc_dk, rdS, sQ_now);
      }
    }
    cp_async_wait<0>();  // a block whose keys no query sees still loaded K and V

    write_dkdv<T>(bp, kt, acc_dk, acc_dv, mma.out_coords(), scale_log2 / kLog2e);
  }
}

// Families with F::kAtomicDq: dQ = scale * acc, rounded to T, from the fp32 workspace acc
// ([B, Hq, Lq, D] contiguous, which the dK/dV kernel's atomics filled); a thread per 4 columns.
template <typename T, int D>
__global__ void __launch_bounds__(256) dq_from_acc_kernel(const ShadowAttentionBwdParams bp,
                                                          const float* __restrict__ acc, float scale) {
  static_assert(D % 4 == 0, "4 columns per thread");
  const ShadowAttentionParams& p = bp.fwd;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 4-column group
  const int64_t row = i / (D / 4), d = (i % (D / 4)) * 4;
  if (row >= p.batch * p.num_q_heads * p.q_len) return;
  const int64_t q = row % p.q_len, bh = row / p.q_len;
  const float4 v = *reinterpret_cast<const float4*>(acc + row * D + d);
  T* dst = static_cast<T*>(bp.grad_q) + (bh / p.num_q_heads) * bp.dq_stride[0] +
           (bh % p.num_q_heads) * bp.dq_stride[1] + q * bp.dq_stride[2] + d;
  dst[0] = from_f32<T>(v.x * scale);
  dst[1] = from_f32<T>(v.y * scale);
  dst[2] = from_f32<T>(v.z * scale);
  dst[3] = from_f32<T>(v.w * scale);
}

#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
// Host: the one-pass backwards' dQ (F::kAtomicDq): a zeroed fp32 workspace ([B, Hq, Lq, D]
// contiguous) for the dK/dV kernel's atomics, then write() launches dq_from_acc_kernel on it.
template <typename T, int D>
class DqWorkspace {
 public:
  DqWorkspace(const ShadowAttentionBwdParams& bp, cudaStream_t s)
      : n_(bp.fwd.batch * bp.fwd.num_q_heads * bp.fwd.q_len * D), acc_(static_cast<size_t>(n_) * sizeof(float), s) {
    if (n_ > 0) {
      check_cuda(cudaMemsetAsync(acc(), 0, static_cast<size_t>(n_) * sizeof(float), s), "cudaMemsetAsync (dQ workspace)");
    }
  }
  float* acc() const { return acc_.as<float>(); }
  void write(const ShadowAttentionBwdParams& bp, float scale_log2, cudaStream_t s) const {
    if (n_ == 0) return;
    dq_from_acc_kernel<T, D><<<grid_1d(ceil_div(n_ / 4, 256), "dq_from_acc_kernel"), 256, 0, s>>>(bp, acc(),
                                                                                                   scale_log2 / kLog2e);
    check_launch("dq_from_acc_kernel");
  }

 private:
  int64_t n_;
  DeviceWorkspace acc_;
};

// Host: runs the dQ kernel over every (batch, query head, 64-row query tile) and the dK/dV
// kernel over every (batch, kv head, 64-key tile) of family F. With F::kAtomicDq the dK/dV
// kernel adds dQ into a zeroed fp32 workspace instead, and dq_from_acc_kernel writes dQ.
template <class F>
void launch_bwd_family(const ShadowAttentionBwdParams& bp, const int2* mm, int64_t n_ev, const float* lse2,
                       const float* delta, float scale_log2, cudaStream_t s) {
  using Tr = typename F::Traits;
  using T = typename Tr::Input;
  constexpr int D = Tr::kHeadDim;
  const ShadowAttentionParams& p = bp.fwd;
  auto run = [&](auto kernel, int64_t blocks, size_t smem, const char* kernel_name, auto... extra) {
    if (blocks == 0) return;
    const std::string name = std::string(kernel_name) + " (" + F::kName + ")";
    set_smem_limit(kernel, smem);
    kernel<<<grid_1d(blocks, name.c_str()), Tr::kThreads, smem, s>>>(bp, mm, n_ev, lse2, delta, scale_log2,
                                                                       extra...);
    check_launch(name.c_str());
  };
  const size_t tiles = bwd_tiles_smem<F>();
  const int64_t kv_blocks = p.batch * p.num_kv_heads * ceil_div(p.kv_len, Tr::kBlockM);
  if constexpr (F::kAtomicDq) {
    DqWorkspace<T, D> dq(bp, s);
    run(dkdv_kernel<F>, kv_blocks, tiles + F::kExtraSmem, "dkdv_kernel", dq.acc());
    dq.write(bp, scale_log2, s);
  } else {
    run(dq_kernel<F>, p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM), tiles + dq_extra_smem<Tr>(),
        "dq_kernel");
    run(dkdv_kernel<F>, kv_blocks, tiles, "dkdv_kernel", static_cast<float*>(nullptr));
  }
}
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
