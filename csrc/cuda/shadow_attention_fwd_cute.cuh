// The CuTe shadow-attention forward, FlashAttention-2 style, as one kernel body templated on the
// MMA family: cuda_cute::Family (sm_80+ mma.sync; shadow_attention_fwd_cute.cu) and
// cuda_wgmma::Family (sm_90a warpgroup MMAs; shadow_attention_fwd_wgmma_cute.cu). bfloat16/
// float16, head_dim 64 or 128. Same results contract as the other kernels: out and lse of the
// shadow mask, fp32 accumulation, rows without a visible key give out = 0, lse = -inf.
//
// Per block: 64 query rows of one (batch, query head). Per key tile of 64:
//   wait K -> issue V copy -> S = Q K^T -> mask + online softmax -> wait V ->
//   issue next live K copy -> O += P V with P taken straight from S's registers.
// Key tiles that the eviction log hides from all 64 rows are never loaded (ev_minmax pre-pass).
// The softmax sees the score and output accumulators through the family's (rows, cols) view,
// in which a thread's row r is one query row held by the four lanes of a quad.
#pragma once

#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"

#include <cute/tensor.hpp>

namespace shadowkv {
namespace cuda_attn {

// Masks the scores `s` of key tile k0 (rows x cols view; its coordinates in `rc`) and applies one
// online-softmax step without touching the output: P = 2^(s scale_log2 - m scale_log2)
// overwrites S in place, the running max `m_run` (of the unscaled scores: the scaling folds into
// one FFMA per score, as in FlashAttention, instead of a multiply before the max and a subtract
// after it) and partial sums `l_run` are updated, and alpha[r] is the factor the output rows
// must be rescaled by. `partial`: some pairs of the tile are hidden and `ev_col` holds the log
// entry of each column; else every pair is visible and `ev_col` is not read (a literal `false`
// leaves no test in the inlined code). scale_log2 > 0 (the op checks scale > 0), so the max of
// the unscaled scores is that of the scaled ones.
template <int kRows, int kCols, class S, class RowCol>
__device__ __forceinline__ void softmax_step(S& s, RowCol const& rc, const int (&ev_col)[kCols], bool partial,
                                             int64_t k0, int64_t p0, float scale_log2, float (&m_run)[kRows],
                                             float (&l_run)[kRows], float (&alpha)[kRows]) {
  using cute::get;
  const int col0 = get<1>(rc(0, 0));  // columns relative to it: compile-time offsets (load_staged_column_log)
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t pos = p0 + get<0>(rc(r, 0));
    const int64_t last = pos - k0 - col0;  // for visible_at_offset
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int off = get<1>(rc(r, c)) - col0;
      if (partial && !visible_at_offset(off, last, pos, ev_col[c])) s(r, c) = -INFINITY;
      mx = fmaxf(mx, s(r, c));
    }
    const float m_new = fmaxf(m_run[r], cuda_cute::quad_max(mx));
    const bool none = m_new == -INFINITY;  // no visible key in this row so far: avoid inf - inf
    const float m_scaled = m_new * scale_log2;
    alpha[r] = none ? 1.f : cuda_common::fast_exp2(m_run[r] * scale_log2 - m_scaled);
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float pr = none ? 0.f : cuda_common::fast_exp2(fmaf(s(r, c), scale_log2, -m_scaled));
      s(r, c) = pr;
      sum += pr;
    }
    l_run[r] = l_run[r] * alpha[r] + sum;
    m_run[r] = m_new;
  }
}

// Output rows `o` (rows x cols view) times alpha[r].
template <int kRows, class O>
__device__ __forceinline__ void rescale_rows(O& o, const float (&alpha)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < cute::size<1>(o); ++c) o(r, c) *= alpha[r];
  }
}

// softmax_step of key tile k0 of kind `kind` (kFull or kPartial, the same in the whole block)
// with the tile's log entries in shared memory: `sev` [tile width], entry i for key k0 + i (past
// kv_len: one that hides the key from every query), read only in a partial tile. The
// warp-specialised forward's producer and the one-stage forward's K prefetch stage them, so
// that a partial tile's mask costs shared-memory reads, not a global load after each S.
// Two copies of the step behind a uniform branch: with `partial` a run-time value the compiler
// predicated the 16 log loads and the pair tests (~450 instructions of the wgmma forward's
// ~2500 per key tile, SASS), which then issued for every tile. (A single copy would save
// registers; the retired two-warpgroup staged forward spilled with two.)
template <int kRows, class S, class RowCol>
__device__ __forceinline__ void masked_softmax_step_staged(TileKind kind, S& s, RowCol const& rc, const int* sev,
                                                           int64_t k0, int64_t p0, float scale_log2,
                                                           float (&m_run)[kRows], float (&l_run)[kRows],
                                                           float (&alpha)[kRows]) {
  constexpr int kCols = decltype(cute::size<1>(rc))::value;
  int ev_col[kCols];
  if (kind != TileKind::kPartial) {
    softmax_step(s, rc, ev_col, false, k0, p0, scale_log2, m_run, l_run, alpha);
  } else {
    cuda_cute::load_staged_column_log(ev_col, sev, rc, true, kEvOutOfRange);
    softmax_step(s, rc, ev_col, true, k0, p0, scale_log2, m_run, l_run, alpha);
  }
}

// masked_softmax_step_staged, then the output rows rescaled.
template <int kRows, class S, class RowCol, class O>
__device__ __forceinline__ void softmax_tile_staged(TileKind kind, S& s, RowCol const& rc, O& o, const int* sev,
                                                    int64_t k0, int64_t p0, float scale_log2, float (&m_run)[kRows],
                                                    float (&l_run)[kRows]) {
  float alpha[kRows];
  masked_softmax_step_staged(kind, s, rc, sev, k0, p0, scale_log2, m_run, l_run, alpha);
  rescale_rows(o, alpha);
}

// Normalises the output rows `o` (coordinates in `rc`) and writes those below t.rows, and
// their log-sum-exp (one lane per quad; m_run is softmax_step's unscaled running max).
template <typename T, int kRows, class O, class RowCol>
__device__ __forceinline__ void write_rows(const ShadowAttentionParams& p, const QueryTile& t, O const& o,
                                           RowCol const& rc, const float (&m_run)[kRows],
                                           const float (&l_run)[kRows], float scale_log2) {
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
    if (threadIdx.x % 4 == 0) lse[row] = l > 0.f ? (m_run[r] * scale_log2 + log2f(l)) * kLn2 : -INFINITY;
  }
}

// What a forward block of query tile t reads from global memory: its query rows (from row
// t.i0 on), the keys and values of its KV head, that head's eviction log and the log's
// per-kEvTile (min, max) from the pre-pass.
template <typename E>
struct FwdRows {
  const E* q;
  const E* k;
  const E* v;
  const int32_t* ev;
  const int2* mm;
  __device__ FwdRows(const ShadowAttentionParams& p, const QueryTile& t, const int2* ev_mm, int64_t n_ev_tiles)
      : q(static_cast<const E*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] + t.i0 * p.q_stride[2]),
        k(static_cast<const E*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1]),
        v(static_cast<const E*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1]),
        ev(p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1]),
        mm(ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles) {}
};

// The running max (of the unscaled scores) and this thread's partial sum of each of its rows,
// before any key.
template <int kRows>
__device__ __forceinline__ void init_row_stats(float (&m_run)[kRows], float (&l_run)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
}

// The block's query rows [0, t.rows) into sQ with cp.async (the rest zeros).
template <int BM, int D, class GmemCopy, class GmemThr, class E, class SQ>
__device__ __forceinline__ void load_query_tile(GmemCopy const& gmem_copy, GmemThr const& gmem_thr, const E* q,
                                                int64_t q_row_stride, SQ& sQ, int rows) {
  using namespace cute;
  cuda_cute::copy_rows<BM>(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(q, q_row_stride, 0)),
                       gmem_thr.partition_D(sQ), gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{})),
                       rows);
}

// fwd_kernel's shared memory past its tiles: next_live_tile's kinds, then a partial tile's log
// entries.
template <class Tr>
constexpr size_t fwd_extra_smem() {
  return (Tr::kThreads + Tr::kBlockN) * sizeof(int);
}

template <class F>
__global__ void __launch_bounds__(F::Traits::kThreads)
    fwd_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles, float scale_log2) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using cuda_cute::copy_rows;
    using cuda_cute::copy_rows_if;
    using cuda_cute::gmem_tile;
    using Tr = typename F::Traits;
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    const int tid = threadIdx.x;
    F mma(tid);

    unsigned char* smem = F::smem();
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)),
                            typename Tr::SmemLayoutPartner{});
    Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes + Tr::kPartnerBytes)),
                            typename Tr::SmemLayoutPartner{});
    int* kinds_s = reinterpret_cast<int*>(smem + Tr::kOwnBytes + 2 * Tr::kPartnerBytes);
    int* ev_s = kinds_s + Tr::kThreads;  // [BN]: a partial tile's log entries, staged with its K

    const QueryTile t = query_tile(p, BM);
    const FwdRows<E> g(p, t, ev_mm, n_ev_tiles);

    typename Tr::GmemTiledCopy gmem_copy;
    auto gmem_thr = gmem_copy.get_thread_slice(tid);
    Tensor tKsK = gmem_thr.partition_D(sK);
    Tensor tVsV = gmem_thr.partition_D(sV);
    Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));

    auto q_op = mma.own(sQ);
    Tensor acc_o = mma.out_acc();
    clear(acc_o);

    // (row, key) of each score register as (rows, cols) for the softmax.
    Tensor tScS_rc = F::rowcol(mma.score_coords());
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // 2: rows lane/4 and lane/4 + 8 of a warp
    float m_run[kRows], l_run[kRows];  // running max (unscaled) and this thread's partial sum
    init_row_stats(m_run, l_run);
    load_query_tile<BM, D>(gmem_copy, gmem_thr, g.q, p.q_stride[2], sQ, t.rows);

    // Keys past the last query position are in every row's future.
    const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
    auto next_live = [&](int64_t from, TileKind& kind) {
      return next_live_tile<BN>(from, n_key_tiles, kinds_s, g.mm, n_ev_tiles, p, t, kind);
    };
    // A partial tile's log entries into ev_s, and K rows: the tile's V row tests and masks read
    // the entries after the barrier that follows (ev_s is rewritten only after the barrier that
    // ends the previous tile's masks). Entries first: in the other order the wgmma forward took
    // 182 registers at head dim 128 instead of 164 (3 blocks per SM -> 2).
    auto load_k = [&](int64_t tile, TileKind tile_kind) {
      if (tile_kind == TileKind::kPartial) {
        cuda_cute::stage_tile_log(ev_s, g.ev, tile * BN, BN, p.kv_len, tid, Tr::kThreads);
      }
      copy_rows<BN>(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(g.k, p.k_stride[2], tile * BN)), tKsK, tKVcKV,
                p.kv_len - tile * BN);
    };

    TileKind kind = TileKind::kSkip;
    int64_t tile = next_live(0, kind);
    if (tile < n_key_tiles) load_k(tile, kind);
    cp_async_fence();

    while (tile < n_key_tiles) {
      const int64_t k0 = tile * BN;
      TileKind next_kind = TileKind::kSkip;
      const int64_t next = next_live(tile + 1, next_kind);

      cp_async_wait<0>();
      F::publish();
      __syncthreads();  // K (and Q) landed for every thread; every warp is done with the last V
      // V rows that no valid row of the block sees are zeros (staged_kv_row_needed on the staged
      // entries: only a partial tile tests its rows).
      copy_rows_if(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(g.v, p.v_stride[2], k0)), tVsV, tKVcKV,
                   [&](int row) { return staged_kv_row_needed(row, k0, p, t, ev_s); },
                   kind == TileKind::kFull);
      cp_async_fence();

      Tensor acc_s = mma.score_acc();
      mma.scores(acc_s, q_op, sK);

      // Mask, online softmax (in the log2 domain). P overwrites S in place.
      Tensor s = F::rowcol(acc_s);
      Tensor o_rc = F::rowcol(acc_o);
      softmax_tile_staged(kind, s, tScS_rc, o_rc, ev_s, k0, t.p0, scale_log2, m_run, l_run);

      cp_async_wait<0>();
      F::publish();
      __syncthreads();  // V landed for every thread; every warp is done with this K and ev_s
      if (next < n_key_tiles) load_k(next, next_kind);
      cp_async_fence();

      // O += P V, with P rounded to the input type (as FlashAttention does).
      Tensor rP = F::a_operand(acc_s);
      mma.update(acc_o, rP, sV);

      tile = next;
      kind = next_kind;
    }
    cp_async_wait<0>();  // nothing may be in flight at exit (a block without live tiles loaded Q)

    // Normalise, write out (rows < t.rows) and lse (one lane per quad).
    write_rows<T>(p, t, F::rowcol(acc_o), F::rowcol(mma.out_coords()), m_run, l_run, scale_log2);
  }
}

#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
// Host: runs fwd_kernel<F> over every (batch, query head, kBlockM-row query tile).
template <class F>
void launch_fwd_family(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2,
                       cudaStream_t s) {
  using Tr = typename F::Traits;
  // Q, K and V, the tile kinds and log entries, the family's slack
  const size_t smem = Tr::kOwnBytes + 2 * Tr::kPartnerBytes + fwd_extra_smem<Tr>() + F::kSmemSlack;
  auto kernel = fwd_kernel<F>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  const std::string name = std::string("fwd_kernel (") + F::kName + ")";
  kernel<<<grid_1d(blocks, name.c_str()), Tr::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch(name.c_str());
}
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
