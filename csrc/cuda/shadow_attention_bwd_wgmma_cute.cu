// Shadow-attention backward for sm_90a (H100/H200) with warpgroup MMAs (wgmma) through CUTLASS
// CuTe: bfloat16/float16, head_dim 64 or 128. The algorithm of the sm_80 CuTe backward
// (shadow_attention_bwd_cute.cu: a dQ kernel and a dK/dV kernel, every gradient element written
// once, no atomics, deterministic; per-row lse2/delta from bwd_rows_kernel) with its products on
// wgmma (shadow_attention_wgmma.cuh) and one warpgroup per block:
//   dQ kernel, 64 query rows, per live key tile of 64 (K, V double-buffered):
//     S = Q K^T and dP = dO V^T       one wgmma batch, Q/dO and K/V from shared memory
//     dS = P (dP - delta)             in the S registers
//     dQ += dS K                      dS from registers, K read MN-major
//   dK/dV kernel, 64 key rows, per (GQA head, query tile of 64) that can see them (Q, dO
//   double-buffered):
//     S^T = K Q^T and dP^T = V dO^T   one batch
//     P^T, dS^T                       in registers
//     dV += P^T dO and dK += dS^T Q   one batch, both A operands from registers
// Built only with the CuTe headers; the bodies exist only in the sm_90a binary (traps elsewhere;
// the host asks wgmma_available first). As in the wgmma forward, every thread fences the
// generic-proxy writes of cp.async and zero fills (fence.proxy.async) before the barrier that
// hands a tile to the wgmmas.
#include "shadow_attention_bwd_tile.cuh"
#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {
namespace {

using namespace cute;
using cuda_cute::load_column_log;
using cuda_cute::PartnerStages;
using cuda_wgmma::acc_rowcol;
using cuda_wgmma::as_a_operand;
using cuda_wgmma::BwdTraits;
using cuda_wgmma::fence_smem_for_wgmma;

template <typename T, int D>
__global__ void __launch_bounds__(BwdTraits<T, D>::kThreads)
    dq_wgmma_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                    const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
#if !SHADOWKV_WGMMA_BODY
  __trap();  // the host only picks this kernel where the sm_90a body was built and loads
#else
  using Tr = BwdTraits<T, D>;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  const ShadowAttentionParams& p = bp.fwd;
  const int tid = threadIdx.x;

  unsigned char* smem = cuda_wgmma::smem_1024();
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutOwn{});
  const PartnerStages<Tr> stages(sdO.data() + size(sdO));  // stage s: K, then V
  int* kinds_s = reinterpret_cast<int*>(smem + 2 * Tr::kOwnBytes + PartnerStages<Tr>::kBytes);

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
  load_pair<BM, D>(gmem_copy, gmem_thr, tOwnC, t.i0, t.rows, qg, p.q_stride[2], sQ, dog, bp.do_stride[2], sdO);
  cp_async_fence();

  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // shared-memory descriptors
  Tensor tdPrdO = thr_s.partition_fragment_A(sdO);
  Tensor acc_dq = partition_fragment_C(mma_o, Shape<Int<BM>, Int<D>>{});
  clear(acc_dq);

  // Rows of this thread's score registers, with their lse2 and delta (padding rows: P = 0).
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;
  float lse2_r[kRows], delta_r[kRows];
  load_row_stats(lse2_r, delta_r, lse2_ws, delta_ws, ws_row0, t.rows, tScS_rc);

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  auto load_kv = [&](int64_t tile, int stage) {
    load_pair<BN, D>(gmem_copy, gmem_thr, tPartC, tile * BN, p.kv_len - tile * BN, kg, p.k_stride[2],
                     stages.tile(stage, 0), vg, p.v_stride[2], stages.tile(stage, 1));
  };
  TileKind kind = TileKind::kSkip;
  int64_t tile = next_live_tile<BN>(0, n_key_tiles, kinds_s, mm, n_ev_tiles, p, t, kind);
  if (tile < n_key_tiles) load_kv(tile, 0);
  cp_async_fence();  // group: Q, dO and the first K, V

  for (int stage = 0; tile < n_key_tiles; stage ^= 1) {
    cp_async_wait<0>();
    fence_smem_for_wgmma();
    // This stage's K, V (and on the first tile Q, dO) landed for every thread, and every warp's
    // wgmmas of the previous tile, the last readers of the other stage, are complete.
    __syncthreads();
    TileKind next_kind = TileKind::kSkip;
    const int64_t next = next_live_tile<BN>(tile + 1, n_key_tiles, kinds_s, mm, n_ev_tiles, p, t, next_kind);
    if (next < n_key_tiles) load_kv(next, stage ^ 1);
    cp_async_fence();

    const int64_t k0 = tile * BN;
    Tensor sK_now = stages.tile(stage, 0);
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<BM>, Int<BN>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<BM>, Int<BN>>{});
    cuda_wgmma::gemm_pair</*kZero=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, thr_s.partition_fragment_B(sK_now),
                                                                acc_s, tdPrdO,
                                                                thr_s.partition_fragment_B(stages.tile(stage, 1)),
                                                                acc_dp);

    // dS overwrites S.
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    int ev_col[kCols];
    load_column_log(ev_col, evg, k0, p.kv_len, tScS_rc, kind == TileKind::kPartial, kEvOutOfRange);
    ds_by_query_rows(s, dp, tScS_rc, ev_col, kind == TileKind::kFull, k0, t.p0, scale_log2, lse2_r, delta_r);

    Tensor rdS = as_a_operand<E>(acc_s);
    cuda_wgmma::gemm</*kZero=*/false, /*kRegisterA=*/true>(
        mma_o, rdS, thr_o.partition_fragment_B(PartnerStages<Tr>::transposed(sK_now)), acc_dq);

    tile = next;
    kind = next_kind;
  }
  cp_async_wait<0>();  // a block without live tiles still loaded Q and dO

  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  write_dq<T>(bp, t, acc_dq, tOcO, scale_log2 / kLog2e);
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdTraits<T, D>::kThreads)
    dkdv_wgmma_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                      const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
#if !SHADOWKV_WGMMA_BODY
  __trap();  // the host only picks this kernel where the sm_90a body was built and loads
#else
  using Tr = BwdTraits<T, D>;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  const ShadowAttentionParams& p = bp.fwd;
  const int tid = threadIdx.x;

  unsigned char* smem = cuda_wgmma::smem_1024();
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutOwn{});
  const PartnerStages<Tr> stages(sV.data() + size(sV));  // stage s: Q, then dO

  const KeyTile kt = key_tile(p, BM, ev_mm, n_ev_tiles);
  const int32_t* evg = p.evicted_at + kt.b * p.ev_stride[0] + kt.hkv * p.ev_stride[1];
  const E* kg = static_cast<const E*>(p.k) + kt.b * p.k_stride[0] + kt.hkv * p.k_stride[1];
  const E* vg = static_cast<const E*>(p.v) + kt.b * p.v_stride[0] + kt.hkv * p.v_stride[1];

  typename Tr::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tOwnC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  load_pair<BM, D>(gmem_copy, gmem_thr, tOwnC, kt.k0, kt.rows, kg, p.k_stride[2], sK, vg, p.v_stride[2], sV);
  cp_async_fence();

  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrK = thr_s.partition_fragment_A(sK);  // shared-memory descriptors
  Tensor tdPrV = thr_s.partition_fragment_A(sV);
  Tensor acc_dk = partition_fragment_C(mma_o, Shape<Int<BM>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma_o, Shape<Int<BM>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);

  // Rows of the score registers are this block's keys, columns the query tile's rows.
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
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
    fence_smem_for_wgmma();
    // This stage's Q, dO (and on the first step K, V) landed for every thread, and every warp's
    // wgmmas of the previous step, the last readers of the other stage, are complete.
    __syncthreads();
    const auto next = steps.after(st);
    if (!steps.done(next)) load_qdo(next, stage ^ 1);
    cp_async_fence();

    const auto [rows, p0, full] = query_rows(p, kt, BM, st.i0, BN);
    Tensor sQ_now = stages.tile(stage, 0);
    Tensor sdO_now = stages.tile(stage, 1);
    Tensor acc_st = partition_fragment_C(mma_s, Shape<Int<BM>, Int<BN>>{});
    Tensor acc_dpt = partition_fragment_C(mma_s, Shape<Int<BM>, Int<BN>>{});
    cuda_wgmma::gemm_pair</*kZero=*/true, /*kRegisterA=*/false>(mma_s, tSrK, thr_s.partition_fragment_B(sQ_now),
                                                                acc_st, tdPrV, thr_s.partition_fragment_B(sdO_now),
                                                                acc_dpt);

    // P^T overwrites S^T, dS^T overwrites dP^T.
    Tensor s_t = make_tensor(acc_st.data(), acc_rowcol(acc_st.layout()));
    Tensor dp_t = make_tensor(acc_dpt.data(), acc_rowcol(acc_dpt.layout()));
    const int64_t ws_row0 = (kt.b * p.num_q_heads + st.hq) * p.q_len + st.i0;
    p_ds_by_key_rows(s_t, dp_t, tScS_rc, ev_row, full, kt.k0, p0, scale_log2, lse2_ws, delta_ws, ws_row0, rows);

    Tensor rP = as_a_operand<E>(acc_st);
    Tensor rdS = as_a_operand<E>(acc_dpt);
    cuda_wgmma::gemm_pair</*kZero=*/false, /*kRegisterA=*/true>(
        mma_o, rP, thr_o.partition_fragment_B(PartnerStages<Tr>::transposed(sdO_now)), acc_dv, rdS,
        thr_o.partition_fragment_B(PartnerStages<Tr>::transposed(sQ_now)), acc_dk);
  }
  cp_async_wait<0>();  // a block whose keys no query sees still loaded K and V

  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  write_dkdv<T>(bp, kt, acc_dk, acc_dv, tOcO, scale_log2 / kLog2e);
#endif
}

template <typename T, int D>
void launch(const ShadowAttentionBwdParams& bp, const int2* mm, int64_t n_ev, const float* lse2, const float* delta,
            float scale_log2, cudaStream_t s) {
  using Tr = BwdTraits<T, D>;
  static_assert(Tr::kThreads == kBwdThreads, "launch_cute_bwd_kernel launches kBwdThreads threads");
  const ShadowAttentionParams& p = bp.fwd;
  const size_t tiles = 2 * Tr::kOwnBytes + PartnerStages<Tr>::kBytes + cuda_wgmma::kSmemAlignSlack;
  const int64_t q_blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  const int64_t k_blocks = p.batch * p.num_kv_heads * ceil_div(p.kv_len, Tr::kBlockM);
  launch_cute_bwd_kernel(dq_wgmma_kernel<T, D>, q_blocks, tiles + Tr::kThreads * sizeof(int), "dq_wgmma_kernel", bp, mm,
                         n_ev, lse2, delta, scale_log2, s);
  launch_cute_bwd_kernel(dkdv_wgmma_kernel<T, D>, k_blocks, tiles, "dkdv_wgmma_kernel", bp, mm, n_ev, lse2, delta,
                         scale_log2, s);
}

}  // namespace

void launch_bwd_wgmma(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                      const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma", [&](auto tag, auto d) {
    launch<typename decltype(tag)::type, decltype(d)::value>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
