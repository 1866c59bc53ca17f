// The shadow-attention forward with the softmax of one key tile overlapped with the P V
// product of the one before (the "wgmma2o" kernel; cuda_wgmma families only: the overlap needs
// asynchronous warpgroup MMAs). bfloat16/float16, head_dim 64 or 128; same results contract as
// fwd_kernel.
//
// In fwd_kernel and fwd_staged_kernel a warpgroup waits for each product before the next step,
// so its tensor cores idle through every softmax, and with two warpgroups per block running in
// step (one block per SM at head_dim 128) so do the SM's. Here, per live key tile j:
//
//   issue S_j = Q K_j^T; issue O += P_{j-1} V_{j-1}     (two wgmma batches, in that order)
//   wait for S_j; mask + online softmax of tile j -> P_j, alpha_j   (while P V runs)
//   wait for P V; O *= alpha_j; P_j -> registers (the A operand of the next P V)
//
// and O += P_last V_last after the loop. This is the online softmax reordered, not changed:
// O holds sum_i P_i V_i relative to the running max of the last tile whose alpha it received,
// so P_{j-1} V_{j-1} (relative to m_{j-1}) is added before O is rescaled by alpha_j =
// exp2(m_{j-1} - m_j). Because tile j-1's V is still read while tile j+1 loads, K/V rotate
// through three shared-memory stages (fwd_staged_kernel has two): Q and the ring take 224 KB
// at head_dim 128 with 128-key tiles, 226 KB with the tile kinds and the alignment slack, 1 KB
// under an sm_90 block's 227 KB; one block per SM as before.
#pragma once

#include "shadow_attention_fwd_cute.cuh"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

constexpr int kOverlapStages = 3;

// The two waits of an overlapped step (fwd_overlap_kernel, fwd_ws_kernel), after S_j and, when
// pv_in_flight, P_{j-1} V_{j-1} were issued as two batches in that order.
// wait_scores: S_j is done (batches complete in order; P V may run on) and its registers are
// the compiler's again.
template <class F, class AccS>
__device__ __forceinline__ void wait_scores(bool pv_in_flight, AccS& acc_s) {
  if (pv_in_flight) {
    F::template wait<1>();
  } else {
    F::template wait<0>();
  }
  F::fence(acc_s);
}
// finish_step, once the softmax of tile j gave alpha: P_{j-1} V_{j-1} is done (O and the
// registers of rP are free), O *= alpha, and rP = P_j rounded to the input type (as
// FlashAttention does), the A operand of the next P V.
template <class F, int kRows, class AccO, class RP, class AccS>
__device__ __forceinline__ void finish_step(AccO& acc_o, RP& rP, AccS const& acc_s, const float (&alpha)[kRows]) {
  F::template wait<0>();
  F::fence(acc_o);
  F::fence(rP);
  auto o_rc = F::rowcol(acc_o);
  rescale_rows(o_rc, alpha);
  rP = F::a_operand(acc_s);
}

// Bytes of the K/V ring of fwd_overlap_kernel: kOverlapStages stages of a K and a V tile.
template <class Tr>
constexpr size_t overlap_ring_bytes() {
  return 2 * kOverlapStages * Tr::kPartnerBytes;
}

template <class F>
__global__ void __launch_bounds__(F::Traits::kThreads)
    fwd_overlap_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                       float scale_log2) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using Tr = typename F::Traits;
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    const int tid = threadIdx.x;
    F mma(tid);

    unsigned char* smem = F::smem();
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    E* ring = reinterpret_cast<E*>(smem + Tr::kOwnBytes);  // stage s: K tile, V tile
    int* kinds_s = reinterpret_cast<int*>(smem + Tr::kOwnBytes + overlap_ring_bytes<Tr>());
    // Tile j (0: K, 1: V) of a stage; each tile is a whole number of 1024-byte swizzle periods.
    auto ring_tile = [&](int stage, int j) {
      return make_tensor(make_smem_ptr(ring + (2 * stage + j) * (BN * D)), typename Tr::SmemLayoutPartner{});
    };

    const QueryTile t = query_tile(p, BM);
    const FwdRows<E> g(p, t, ev_mm, n_ev_tiles);

    typename Tr::GmemTiledCopy gmem_copy;
    auto gmem_thr = gmem_copy.get_thread_slice(tid);
    Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));

    auto q_op = mma.own(sQ);
    Tensor acc_o = mma.out_acc();
    clear(acc_o);
    Tensor acc_s = mma.score_acc();
    clear(acc_s);
    auto rP = F::a_operand(acc_s);  // P of the previous live tile, as the A operand of its P V

    Tensor tScS_rc = F::rowcol(mma.score_coords());
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;
    float m_run[kRows], l_run[kRows];
    init_row_stats(m_run, l_run);
    load_query_tile<BM, D>(gmem_copy, gmem_thr, g.q, p.q_stride[2], sQ, t.rows);

    const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
    auto load_kv = [&](int64_t tile, TileKind tile_kind, int stage) {
      load_kv_tile<BN, D, false>(gmem_copy, gmem_thr, tPartC, p, t, g, tile, tile_kind, ring_tile(stage, 0),
                          ring_tile(stage, 1));
    };
    TileKind kind = TileKind::kSkip;
    int64_t tile = next_live_tile<BN>(0, n_key_tiles, kinds_s, g.mm, n_ev_tiles, p, t, kind);
    if (tile < n_key_tiles) load_kv(tile, kind, 0);
    cp_async_fence();  // group: Q and the first K, V

    bool have_p = false;  // rP holds the previous live tile's P, whose V is in stage p_stage
    int p_stage = 0;
    for (int stage = 0; tile < n_key_tiles; stage = stage + 1 == kOverlapStages ? 0 : stage + 1) {
      cp_async_wait<0>();
      F::publish();
      // This stage's K, V (and on the first tile Q) landed for every thread; every warpgroup is
      // done with the stage the prefetch below refills: its last tile (two live tiles back) had
      // its S waited two iterations ago and its P V waited in the previous iteration.
      __syncthreads();
      TileKind next_kind = TileKind::kSkip;
      const int64_t next = next_live_tile<BN>(tile + 1, n_key_tiles, kinds_s, g.mm, n_ev_tiles, p, t, next_kind);
      if (next < n_key_tiles) load_kv(next, next_kind, stage + 1 == kOverlapStages ? 0 : stage + 1);
      cp_async_fence();

      const int64_t k0 = tile * BN;
      mma.scores_async(acc_s, q_op, ring_tile(stage, 0));
      if (have_p) mma.update_async(acc_o, rP, ring_tile(p_stage, 1));
      wait_scores<F>(have_p, acc_s);

      Tensor s = F::rowcol(acc_s);
      float alpha[kRows];
      masked_softmax_step<false>(kind, s, tScS_rc, g.ev, k0, p.kv_len, t.p0, scale_log2, m_run, l_run, alpha);
      finish_step<F>(acc_o, rP, acc_s, alpha);

      have_p = true;
      p_stage = stage;
      tile = next;
      kind = next_kind;
    }
    if (have_p) mma.update(acc_o, rP, ring_tile(p_stage, 1));  // O += P_last V_last, waited
    cp_async_wait<0>();  // nothing may be in flight at exit (a block without live tiles loaded Q)

    write_rows<T>(p, t, F::rowcol(acc_o), F::rowcol(mma.out_coords()), m_run, l_run, scale_log2);
  }
}

#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
// Host: runs fwd_overlap_kernel<F> over every (batch, query head, kBlockM-row query tile).
template <class F>
void launch_fwd_overlap(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2,
                        cudaStream_t s) {
  using Tr = typename F::Traits;
  // Q, the K/V ring, the tile kinds (next_live_tile), the family's slack
  constexpr size_t smem = Tr::kOwnBytes + overlap_ring_bytes<Tr>() + Tr::kThreads * sizeof(int) + F::kSmemSlack;
  static_assert(smem <= 227 * 1024, "more shared memory than an sm_90 block can have");
  auto kernel = fwd_overlap_kernel<F>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  const std::string name = std::string("fwd_overlap_kernel (") + F::kName + "o)";  // wgmma2o
  kernel<<<grid_1d(blocks, name.c_str()), Tr::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch(name.c_str());
}
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
