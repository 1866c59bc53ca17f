// The warp-specialised shadow-attention forward (the "wgmma_ws" family; sm_90a, FlashAttention-3
// style). bfloat16/float16, head_dim 64 or 128; same results contract as fwd_kernel.
//
// Why: Nsight Compute found every other forward issue-bound (bench/RESULTS.md): the warps that
// run the MMAs also issue the K/V copies, their predicates and the block-wide barriers, and the
// block's warpgroups run in step, so their softmaxes leave the tensor cores idle together.
// Here a block of three warpgroups owns 128 query rows:
//   * the producer (warpgroup 0) classifies the key tiles (next_live_tile over its 128 threads),
//     copies Q once and the K and V tiles of every live key tile with cp.async into a ring of
//     kWsStages stages, and hands each to the stage's "full" mbarrier (ws_publish: the copies'
//     arrival and a release arrival for its zero rows); it waits for a stage's "empty"
//     mbarrier before refilling it. With the K tile it writes the stage's tile number and kind
//     (n_key_tiles after the last: the consumers stop there) and, for a partial tile, the
//     tile's log entries (WsControl::ev), which its own row tests and the consumers' masks read;
//   * two consumers (warpgroups 1, 2; 64 query rows each) run an overlapped loop on their own
//     rows: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, wait for S_j, release K_j, mask +
//     softmax (while P V runs), wait for P V, release V_{j-1}. This is the online softmax
//     reordered, not changed: O holds sum_i P_i V_i relative to the running max of the last tile
//     whose alpha it received, so P_{j-1} V_{j-1} (relative to m_{j-1}) is added before O is
//     rescaled by alpha_j = exp2(m_{j-1} - m_j); O += P_last V_last after the loop. No
//     block-wide barrier: each waits for what it reads and releases what it read;
//   * the consumers take turns issuing their MMAs (two named barriers, "ping-pong"): one
//     warpgroup's softmax runs while the other's products keep the tensor cores busy;
//   * registers move from the producer (kWsProducerRegs) to the consumers (kWsConsumerRegs).
// K/V tiles are 128 keys wide (wgmma 64 x 128 x 16 for S).
#pragma once

#include "mbarrier.cuh"
#include "shadow_attention_fwd_cute.cuh"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

// The two waits of an overlapped step (fwd_ws_kernel's consumers), after S_j and, when
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

constexpr int kWsStages = 2;
constexpr int kWsProducerThreads = 128;
constexpr int kWsThreads = kWsProducerThreads + 256;
// 384 threads x 168 registers (the launch bound's share of 64K) = 128 x 56 + 256 x 224.
constexpr int kWsProducerRegs = 56;
constexpr int kWsConsumerRegs = 224;
// Named barriers: the producer's tile classification, then one per consumer warpgroup ("your
// turn to issue MMAs"; 256 threads: the waiting warpgroup's sync and the other's arrive).
constexpr int kWsBarProducer = 1;
constexpr int kWsBarTurn = 2;  // + consumer warpgroup 0 or 1

// The block's barriers and what the producer tells the consumers, after the tiles.
struct WsControl {
  uint64_t q_full;
  uint64_t k_full[kWsStages], v_full[kWsStages];    // producer -> consumers: the stage landed
  uint64_t k_empty[kWsStages], v_empty[kWsStages];  // consumers -> producer: the stage was read
  int64_t tile[kWsStages];                          // the stage's key tile; n_key_tiles: no more
  int kind[kWsStages];                              // its TileKind
  int kinds[kWsProducerThreads];                    // next_live_tile's batch (the producer's)
  // A partial tile's log entries (key k0 + i; kEvOutOfRange past kv_len), by stage and round
  // parity: the slot a tile's consumers read is rewritten two rounds later, after both consumer
  // warpgroups released the stage's K again (they read the entries before that release).
  int ev[kWsStages][2][kWsProducerThreads];
};

// Bytes of shared memory a launch asks for: Q, the K/V ring, the control block, the slack.
template <class Tr>
constexpr size_t ws_smem_bytes() {
  return Tr::kOwnBytes + 2 * kWsStages * Tr::kPartnerBytes + sizeof(WsControl) + cuda_wgmma::kSmemAlignSlack;
}

// A producer thread hands what it wrote for a full barrier's phase to the consumers: its cp.async
// copies (an arrival when they land) and its ordinary stores (zero rows, the tile slots: a
// release arrival, after the proxy fence that lets the MMAs' async proxy read them). So a full
// barrier counts two arrivals per producer thread.
__device__ __forceinline__ void ws_publish(uint64_t* full) {
  cuda_wgmma::fence_smem_for_wgmma();
  cuda_common::cp_async_arrive(full);
  cuda_common::mbar_arrive(full);
}

// The producer warpgroup's global -> shared copy: 16 rows x 64 elements per pass, 16-byte
// cp.async (the traits' copy is for the 256 consumer threads).
template <class E>
using WsProducerCopy = decltype(cute::make_tiled_copy(
    cute::Copy_Atom<SHADOWKV_EMULATED(cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>), E>{},
    cute::Layout<cute::Shape<cute::Int<kWsProducerThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>{},
    cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

// The producer warpgroup as a BlockGroup for next_live_tile: its own barrier, not the block's.
struct WsProducerGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return kWsProducerThreads; }
  __device__ void sync() const { cuda_common::named_sync(kWsBarProducer, kWsProducerThreads); }
};

template <class F>
__global__ void __launch_bounds__(kWsThreads, 1)
    fwd_ws_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                  float scale_log2) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using cuda_common::mbar_arrive;
    using cuda_common::mbar_wait;
    using Tr = typename F::Traits;
    static_assert(Tr::kThreads == 256 && Tr::kBlockM == 128, "two consumer warpgroups of 64 rows");
    static_assert(Tr::kBlockN == kWsProducerThreads, "one producer thread per key of a tile (its log entry)");
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;

    unsigned char* smem = F::smem();
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    E* ring = reinterpret_cast<E*>(smem + Tr::kOwnBytes);  // stage s: K tile, V tile
    auto ring_tile = [&](int stage, int j) {
      return make_tensor(make_smem_ptr(ring + (2 * stage + j) * (BN * D)), typename Tr::SmemLayoutPartner{});
    };
    WsControl& c = *reinterpret_cast<WsControl*>(smem + Tr::kOwnBytes + 2 * kWsStages * Tr::kPartnerBytes);

    const QueryTile t = query_tile(p, BM);
    const FwdRows<E> g(p, t, ev_mm, n_ev_tiles);
    const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;

    if (threadIdx.x == 0) {
      // Full barriers: each producer thread arrives twice (ws_publish).
      cuda_common::mbar_init(&c.q_full, 2 * kWsProducerThreads);
      for (int s = 0; s < kWsStages; ++s) {
        cuda_common::mbar_init(&c.k_full[s], 2 * kWsProducerThreads);
        cuda_common::mbar_init(&c.v_full[s], 2 * kWsProducerThreads);
        cuda_common::mbar_init(&c.k_empty[s], Tr::kThreads);
        cuda_common::mbar_init(&c.v_empty[s], Tr::kThreads);
      }
    }
    __syncthreads();  // the only block-wide barrier

    if (threadIdx.x < kWsProducerThreads) {
      // ---- producer
      cuda_common::setmaxnreg_dec<kWsProducerRegs>();
      const int tid = threadIdx.x;
      WsProducerCopy<E> gmem_copy;
      auto gmem_thr = gmem_copy.get_thread_slice(tid);
      Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));

      cuda_cute::copy_rows<BM>(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(g.q, p.q_stride[2], 0)),
                               gmem_thr.partition_D(sQ),
                               gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{})), t.rows);
      ws_publish(&c.q_full);

      // One K or V tile into a stage: rows no valid query row sees are zeros (staged_kv_row_needed
      // on the entries staged in `sev`).
      auto load = [&](const E* src, int64_t stride, int64_t tile, TileKind kind, const int* sev, int stage, int j) {
        const int64_t k0 = tile * BN;
        cuda_cute::copy_rows_if(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BN, D>(src, stride, k0)),
                                gmem_thr.partition_D(ring_tile(stage, j)), tPartC,
                                [&](int row) { return staged_kv_row_needed(row, k0, p, t, sev); },
                                kind == TileKind::kFull);
      };
      // This thread's log entry of a partial tile (key tile * BN + tid), read one tile ahead: its
      // load's latency passes while the producer waits for the stage, instead of each producer
      // thread reading the entries of its 16 rows (twice, K and V) on the way to the copies and
      // each consumer 32 more after its scores. Why: on the H200 (bench/RESULTS.md, 2026-11-27)
      // the 25% log took 0.74 of the dense forward's time for about half its key tiles; fitting
      // both rows, a partial tile (the sink tile, the window's trailing edge, the diagonal: ~3
      // of ~16 per query tile) cost about four full ones.
      auto log_entry = [&](int64_t tile, TileKind kind) {
        const int64_t j = tile * BN + tid;
        return kind == TileKind::kPartial && tile < n_key_tiles && j < p.kv_len ? ev_at(g.ev, j) : kEvOutOfRange;
      };

      TileKind kind = TileKind::kSkip;
      int64_t tile = next_live_tile<BN>(0, n_key_tiles, c.kinds, g.mm, n_ev_tiles, p, t, kind, WsProducerGroup{});
      int ev_next = log_entry(tile, kind);
      for (cuda_common::RingCursor<kWsStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        const uint32_t empty_parity = ring_at.empty_parity();
        mbar_wait(&c.k_empty[stage], empty_parity);
        if (tid == 0) {  // published with the K tile: the consumers read these after their wait
          c.tile[stage] = tile;
          c.kind[stage] = static_cast<int>(kind);
        }
        int* sev = c.ev[stage][ring_at.full_parity()];
        if (kind == TileKind::kPartial) {  // producer-uniform (next_live_tile)
          sev[tid] = ev_next;
          cuda_common::named_sync(kWsBarProducer, kWsProducerThreads);  // every entry is staged
        }
        if (tile < n_key_tiles) load(g.k, p.k_stride[2], tile, kind, sev, stage, 0);
        ws_publish(&c.k_full[stage]);
        if (tile >= n_key_tiles) break;
        mbar_wait(&c.v_empty[stage], empty_parity);
        load(g.v, p.v_stride[2], tile, kind, sev, stage, 1);
        ws_publish(&c.v_full[stage]);
        kind = TileKind::kSkip;  // as the end marker's kind (next_live_tile leaves it when none is left)
        tile = next_live_tile<BN>(tile + 1, n_key_tiles, c.kinds, g.mm, n_ev_tiles, p, t, kind, WsProducerGroup{});
        ev_next = log_entry(tile, kind);
      }
      // Leave only after the last copies landed (they write the block's shared memory).
      cp_async_fence();
      cp_async_wait<0>();
    } else {
      // ---- consumers
      cuda_common::setmaxnreg_inc<kWsConsumerRegs>();
      const int tid = threadIdx.x - kWsProducerThreads;  // 0..255: the family's thread index
      const int wg = tid / 128;
      F mma(tid);

      auto q_op = mma.own(sQ);
      Tensor acc_o = mma.out_acc();
      clear(acc_o);
      Tensor acc_s = mma.score_acc();
      clear(acc_s);
      auto rP = F::a_operand(acc_s);  // P of the previous live tile, the A operand of its P V

      Tensor tScS_rc = F::rowcol(mma.score_coords());
      constexpr int kRows = decltype(size<0>(tScS_rc))::value;
      float m_run[kRows], l_run[kRows];
      init_row_stats(m_run, l_run);

      mbar_wait(&c.q_full, 0);
      // Warpgroup 0 issues first: warpgroup 1 passes it the turn before its first wait.
      if (wg == 1) cuda_common::named_arrive(kWsBarTurn, Tr::kThreads);

      bool have_p = false;  // rP holds the previous live tile's P, whose V is in stage p_stage
      int p_stage = 0;
      uint32_t p_parity = 0;
      for (cuda_common::RingCursor<kWsStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        const uint32_t parity = ring_at.full_parity();
        mbar_wait(&c.k_full[stage], parity);
        const int64_t tile = c.tile[stage];
        const TileKind kind = static_cast<TileKind>(c.kind[stage]);
        if (tile >= n_key_tiles) break;
        // The copies landed through the generic proxy; the MMAs read through the async one.
        cuda_wgmma::fence_smem_for_wgmma();

        cuda_common::named_sync(kWsBarTurn + wg, Tr::kThreads);  // this warpgroup's turn
        mma.scores_async(acc_s, q_op, ring_tile(stage, 0));
        if (have_p) {
          mbar_wait(&c.v_full[p_stage], p_parity);
          cuda_wgmma::fence_smem_for_wgmma();
          mma.update_async(acc_o, rP, ring_tile(p_stage, 1));
        }
        wait_scores<F>(have_p, acc_s);
        // The other warpgroup's turn. Not before the wait: ptxas then serialises every wgmma of
        // the loop (one batch per MMA, C7514).
        cuda_common::named_arrive(kWsBarTurn + (wg ^ 1), Tr::kThreads);
        mbar_arrive(&c.k_empty[stage]);  // K_j was read

        Tensor s = F::rowcol(acc_s);
        float alpha[kRows];
        masked_softmax_step_staged(kind, s, tScS_rc, c.ev[stage][parity], tile * BN, t.p0, scale_log2,
                                         m_run, l_run, alpha);

        finish_step<F>(acc_o, rP, acc_s, alpha);
        if (have_p) mbar_arrive(&c.v_empty[p_stage]);  // V_{j-1} was read (finish_step waited)

        have_p = true;
        p_stage = stage;
        p_parity = parity;
      }
      // Every turn passed to warpgroup 0 is taken: its last sync answers warpgroup 1's last arrive.
      if (wg == 0) cuda_common::named_sync(kWsBarTurn, Tr::kThreads);
      if (have_p) {  // O += P_last V_last, waited
        mbar_wait(&c.v_full[p_stage], p_parity);
        cuda_wgmma::fence_smem_for_wgmma();
        mma.update(acc_o, rP, ring_tile(p_stage, 1));
      }
      write_rows<T>(p, t, F::rowcol(acc_o), F::rowcol(mma.out_coords()), m_run, l_run, scale_log2);
    }
  }
}

#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
// Host: runs fwd_ws_kernel<F> over every (batch, query head, 128-row query tile).
template <class F>
void launch_fwd_ws(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  using Tr = typename F::Traits;
  constexpr size_t smem = ws_smem_bytes<Tr>();
  static_assert(smem <= 227 * 1024, "more shared memory than an sm_90 block can have");
  auto kernel = fwd_ws_kernel<F>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  const char* name = "fwd_ws_kernel (wgmma_ws)";
  kernel<<<grid_1d(blocks, name), kWsThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch(name);
}
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
