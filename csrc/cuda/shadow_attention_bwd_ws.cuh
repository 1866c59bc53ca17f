// The warp-specialised shadow-attention backward (the "wgmma_wsb" and "wgmma_wsf" families';
// sm_90a, FlashAttention-3 style): a dK/dV kernel and a dQ kernel. bfloat16/float16, head_dim 64
// or 128; the same results contract as dkdv_kernel (shadow_attention_bwd_cute.cuh), whose
// per-step math it reuses.
//
// Why: on the H200 (bench/RESULTS.md, 2026-11-27) the wgmma dK/dV kernel was the slowest part
// of fwd+bwd (1.96 of 4.45 profiled ms at 25% kept), latency-bound at 255 registers: the warps
// that run its MMAs also issue the Q/dO copies and their predicates, read the per-row lse/delta
// from global memory right after their scores, and meet at a block-wide barrier every step. The
// two-warpgroup wgmma2 kernel (retired), which shares each Q/dO tile between 128 keys, lost to it because
// that barrier then holds both warpgroups of the SM's only block in step. Here a block of three
// warpgroups owns 128 keys:
//   * the producer (warpgroup 0) copies the block's K and V once (rows no query of the block
//     sees are zeros, as own_kv_row_needed), then for every step (query head of the GQA group,
//     64-row query tile: HeadQuerySteps) the Q and dO tiles and the tile's lse2 and delta rows
//     into a ring of kWsBwdStages stages with cp.async, and hands each to the stage's "full"
//     mbarrier; it waits for the stage's "empty" mbarrier before refilling it;
//   * two consumers (warpgroups 1, 2; 64 keys each) run dkdv_kernel's step on their keys:
//     S^T = K Q^T and dP^T = V dO^T, P^T and dS^T, dV += P^T dO and dK += dS^T Q, then release
//     the stage. No block-wide barrier: each waits for what it reads and releases what it read,
//     so one warpgroup's element-wise step runs under the other's MMAs;
//   * registers move from the producer (kWsBwdProducerRegs) to the consumers
//     (kWsBwdConsumerRegs), which hold dK and dV of 64 keys in registers.
// dQ comes from dq_ws_kernel below, the same split over 128 query rows and 64-key tiles, or, for
// a family with F::kAtomicDq ("wgmma_wsf": cuda_wgmma::FusedFamily's one-pass step), from the
// dK/dV kernel itself: each step also computes dQ = dS K for the step's 64 query rows (the two
// consumers split its columns) and adds it to an fp32 workspace with atomics, so the backward is
// one pass of five products per (key, query) pair instead of two passes of seven.
#pragma once

#include "shadow_attention_bwd_cute.cuh"  // p_ds_by_key_rows, load_row_log, write_dkdv
#include "shadow_attention_fwd_ws.cuh"    // kWsProducerThreads, ws_publish, WsProducerCopy

namespace shadowkv {
namespace cuda_attn {

// Three stages: the producer can be two steps ahead of a consumer, ~2 us of products at head dim
// 128 (two warpgroups x four 64 x 64 x 128 wgmma per step), to cover a Q/dO tile's trip from
// DRAM. 160 KB of shared memory at head dim 128 (~195 KB with the one-pass step's two dS tiles;
// one block per SM: the registers allow no more).
constexpr int kWsBwdStages = 3;
// 384 threads x 168 registers (the launch bound's share of 64K) = 128 x 40 + 256 x 232: the
// consumers hold dK and dV of 64 keys in fp32 plus two 64 x 64 score tiles. No spills (ptxas,
// sm_90a, both dtypes and head dims); 24 + 240 (FlashAttention-3's split, whose producer issues
// TMA copies) spilled the cp.async producer's addresses (44-288 bytes), 32 + 232 at head dim 64.
constexpr int kWsBwdProducerRegs = 40;
constexpr int kWsBwdConsumerRegs = 232;
// The named barrier of the two consumer warpgroups (the one-pass step's dS tile; ids 1-3 are
// the forward's and the producer's).
constexpr int kWsBarConsumers = 4;

// The mbarriers of both kernels' blocks: the own tiles, then per stage of the ring.
struct WsBwdBarriers {
  uint64_t own_full;             // the block's own tiles landed
  uint64_t full[kWsBwdStages];   // producer -> consumers: the stage's partner tiles (and rows) landed
  uint64_t empty[kWsBwdStages];  // consumers -> producer: the stage was read

  // By one thread, before a block-wide barrier. Full barriers: each producer thread arrives
  // twice (ws_publish); empty ones: every consumer thread once.
  __device__ void init(int consumer_threads) {
    cuda_common::mbar_init(&own_full, 2 * kWsProducerThreads);
    for (int s = 0; s < kWsBwdStages; ++s) {
      cuda_common::mbar_init(&full[s], 2 * kWsProducerThreads);
      cuda_common::mbar_init(&empty[s], consumer_threads);
    }
  }
};

// dkdv_ws_kernel's barriers (own tiles: K and V; stages: Q, dO, lse2, delta) and what the
// producer tells the consumers, after the tiles.
template <int kRows>
struct WsDkdvControl : WsBwdBarriers {
  int64_t i0[kWsBwdStages];         // the stage's first query row
  int64_t hq[kWsBwdStages];         // its query head; -1: no more steps
  float lse2[kWsBwdStages][kRows];  // lse * log2(e) of the stage's query rows (0 past the tile's rows)
  float delta[kWsBwdStages][kRows];
};

// Bytes of shared memory a launch of either kernel asks for: two own tiles, the ring of partner
// tile pairs, the control block, the alignment slack.
template <class Tr, class Control>
constexpr size_t ws_bwd_smem_bytes() {
  return 2 * Tr::kOwnBytes + 2 * kWsBwdStages * Tr::kPartnerBytes + sizeof(Control) + cuda_wgmma::kSmemAlignSlack;
}
// dkdv_ws_kernel's dS tiles (F::kAtomicDq), after the ring: two, used by alternate steps. One
// consumer warpgroup may store step s + 1's dS^T while the other still reads step s's for its dQ
// product; a tile is rewritten only two steps later, after both passed the step in between's
// barrier (which each reaches after its own dQ product of the step before completed).
template <class F>
constexpr size_t ws_dkdv_ds_bytes() {
  if constexpr (F::kAtomicDq) {
    return 2 * F::kDsBytes;
  } else {
    return 0;
  }
}
template <class F>
constexpr size_t ws_dkdv_smem_bytes() {
  using Tr = typename F::Traits;
  return ws_bwd_smem_bytes<Tr, WsDkdvControl<Tr::kBlockN>>() + ws_dkdv_ds_bytes<F>();
}

// The consumers' barrier in dkdv_ws_kernel's one-pass step (FusedFamily::update_fused).
struct WsConsumerSync {
  __device__ void operator()() const { cuda_common::named_sync(kWsBarConsumers, kWsThreads - kWsProducerThreads); }
};

template <class F>
__global__ void __launch_bounds__(kWsThreads, 1)
    dkdv_ws_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                   const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2,
                   float* __restrict__ dq_acc) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using cuda_common::mbar_arrive;
    using cuda_common::mbar_wait;
    using Tr = typename F::Traits;
    static_assert(Tr::kThreads == 256 && Tr::kBlockM == 128, "two consumer warpgroups of 64 keys");
    static_assert(2 * Tr::kBlockN == kWsProducerThreads, "one producer thread per lse2 or delta row of a step");
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    using Control = WsDkdvControl<BN>;
    const ShadowAttentionParams& p = bp.fwd;

    unsigned char* smem = F::smem();
    Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)), typename Tr::SmemLayoutOwn{});
    E* ring = reinterpret_cast<E*>(smem + 2 * Tr::kOwnBytes);  // stage s: Q tile, dO tile
    auto ring_tile = [&](int stage, int j) {
      return make_tensor(make_smem_ptr(ring + (2 * stage + j) * (BN * D)), typename Tr::SmemLayoutPartner{});
    };
    unsigned char* ds_tiles = smem + 2 * Tr::kOwnBytes + 2 * kWsBwdStages * Tr::kPartnerBytes;  // F::kAtomicDq
    Control& c = *reinterpret_cast<Control*>(ds_tiles + ws_dkdv_ds_bytes<F>());

    const KeyTile kt = key_tile(p, BM, ev_mm, n_ev_tiles);
    const int32_t* evg = p.evicted_at + kt.b * p.ev_stride[0] + kt.hkv * p.ev_stride[1];
    const HeadQuerySteps steps(p, kt, BN);

    if (threadIdx.x == 0) c.init(Tr::kThreads);
    __syncthreads();  // the only block-wide barrier

    if (threadIdx.x < kWsProducerThreads) {
      // ---- producer
      cuda_common::setmaxnreg_dec<kWsBwdProducerRegs>();
      const int tid = threadIdx.x;
      WsProducerCopy<E> gmem_copy;
      auto gmem_thr = gmem_copy.get_thread_slice(tid);

      const E* kg = static_cast<const E*>(p.k) + kt.b * p.k_stride[0] + kt.hkv * p.k_stride[1];
      const E* vg = static_cast<const E*>(p.v) + kt.b * p.v_stride[0] + kt.hkv * p.v_stride[1];
      Tensor tOwnC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
      auto own_needed = [&](int row) { return own_kv_row_needed(row, p, kt, evg); };
      cuda_cute::copy_rows_if(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(kg, p.k_stride[2], kt.k0)),
                              gmem_thr.partition_D(sK), tOwnC, own_needed, false);
      cuda_cute::copy_rows_if(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(vg, p.v_stride[2], kt.k0)),
                              gmem_thr.partition_D(sV), tOwnC, own_needed, false);
      ws_publish(&c.own_full);

      Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
      // Threads 0..63 stage the step's lse2 rows, 64..127 its delta rows (zeros past its rows:
      // row_stats does not read them).
      const float* stats = tid < BN ? lse2_ws : delta_ws;
      const int stat_row = tid % BN;
      auto st = steps.first();
      for (cuda_common::RingCursor<kWsBwdStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        mbar_wait(&c.empty[stage], ring_at.empty_parity());
        const bool done = steps.done(st);
        if (tid == 0) {  // published with the stage: the consumers read these after their wait
          c.hq[stage] = done ? -1 : st.hq;
          c.i0[stage] = st.i0;
        }
        if (!done) {
          const int64_t rows = p.q_len - st.i0;  // >= 1; the tile's rows are min(rows, BN)
          const E* qg = static_cast<const E*>(p.q) + kt.b * p.q_stride[0] + st.hq * p.q_stride[1];
          const E* dog = static_cast<const E*>(bp.grad_out) + kt.b * bp.do_stride[0] + st.hq * bp.do_stride[1];
          cuda_cute::copy_rows<BN>(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BN, D>(qg, p.q_stride[2], st.i0)),
                                   gmem_thr.partition_D(ring_tile(stage, 0)), tPartC, rows);
          cuda_cute::copy_rows<BN>(gmem_copy,
                                   gmem_thr.partition_S(cuda_cute::gmem_tile<BN, D>(dog, bp.do_stride[2], st.i0)),
                                   gmem_thr.partition_D(ring_tile(stage, 1)), tPartC, rows);
          const int64_t ws_row0 = (kt.b * p.num_q_heads + st.hq) * p.q_len + st.i0;
          const bool in_range = stat_row < rows;
          float* dst = (tid < BN ? c.lse2[stage] : c.delta[stage]) + stat_row;
          cuda_common::cp_async_4(dst, in_range ? stats + ws_row0 + stat_row : stats, in_range);
        }
        ws_publish(&c.full[stage]);
        if (done) break;
        st = steps.after(st);
      }
      // Leave only after the last copies landed (they write the block's shared memory).
      cp_async_fence();
      cp_async_wait<0>();
    } else {
      // ---- consumers
      cuda_common::setmaxnreg_inc<kWsBwdConsumerRegs>();
      const int tid = threadIdx.x - kWsProducerThreads;  // 0..255: the family's thread index
      F mma(tid);

      Tensor acc_dk = mma.out_acc();
      Tensor acc_dv = mma.out_acc();
      clear(acc_dk);
      clear(acc_dv);
      // Rows of the score registers are this block's keys, columns the step's query rows.
      Tensor tScS_rc = F::rowcol(mma.score_coords());
      constexpr int kRows = decltype(size<0>(tScS_rc))::value;
      int ev_row[kRows];
      load_row_log(ev_row, evg, kt, tScS_rc);

      mbar_wait(&c.own_full, 0);
      auto k_op = mma.own(sK);
      auto v_op = mma.own(sV);
      int ds_tile = 0;  // F::kAtomicDq: this step's dS tile
      for (cuda_common::RingCursor<kWsBwdStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        mbar_wait(&c.full[stage], ring_at.full_parity());
        const int64_t hq = c.hq[stage];
        if (hq < 0) break;
        const int64_t i0 = c.i0[stage];
        // The copies landed through the generic proxy; the MMAs read through the async one.
        cuda_wgmma::fence_smem_for_wgmma();

        const auto [rows, p0, full] = query_rows(p, kt, BM, i0, BN);
        Tensor sQ_now = ring_tile(stage, 0);
        Tensor sdO_now = ring_tile(stage, 1);
        Tensor acc_st = mma.score_acc();
        Tensor acc_dpt = mma.score_acc();
        mma.scores_pair(acc_st, k_op, sQ_now, acc_dpt, v_op, sdO_now);

        // P^T overwrites S^T, dS^T overwrites dP^T (two copies: a full step tests no pair).
        Tensor s_t = F::rowcol(acc_st);
        Tensor dp_t = F::rowcol(acc_dpt);
        if (full) {
          p_ds_by_key_rows(s_t, dp_t, tScS_rc, ev_row, true, kt.k0, p0, scale_log2, c.lse2[stage], c.delta[stage], 0,
                           rows);
        } else {
          p_ds_by_key_rows(s_t, dp_t, tScS_rc, ev_row, false, kt.k0, p0, scale_log2, c.lse2[stage], c.delta[stage], 0,
                           rows);
        }
        Tensor rP = F::a_operand(acc_st);
        if constexpr (F::kAtomicDq) {  // dK and dQ from dS^T in shared memory, dQ added to dq_acc
          const int64_t ws_row0 = (kt.b * p.num_q_heads + hq) * p.q_len + i0;
          mma.update_fused(acc_dv, rP, sdO_now, acc_dk, acc_dpt, sQ_now, ds_tiles + ds_tile * F::kDsBytes, sK,
                           dq_acc + ws_row0 * D, rows, WsConsumerSync{});
          ds_tile ^= 1;
        } else {
          Tensor rdS = F::a_operand(acc_dpt);
          mma.update_pair(acc_dv, rP, sdO_now, acc_dk, rdS, sQ_now);
        }
        mbar_arrive(&c.empty[stage]);  // Q, dO, lse2, delta of the step were read (the MMAs waited)
      }
      write_dkdv<T>(bp, kt, acc_dk, acc_dv, mma.out_coords(), scale_log2 / kLog2e);
    }
  }
}

// dq_ws_kernel's control block: its barriers (own tiles: Q and dO; stages: K, V and a partial
// tile's log entries) and what the producer tells the consumers.
template <int kCols>
struct WsDqControl : WsBwdBarriers {
  int64_t tile[kWsBwdStages];        // the stage's key tile; n_key_tiles: no more
  int kind[kWsBwdStages];            // its TileKind
  int kinds[kWsProducerThreads];     // next_live_tile's batch (the producer's)
  int ev[kWsBwdStages][kCols];       // a partial tile's log entries (kEvOutOfRange past kv_len)
};

template <class Tr>
constexpr size_t ws_dq_smem_bytes() {
  return ws_bwd_smem_bytes<Tr, WsDqControl<Tr::kBlockN>>();
}

// The warp-specialised dQ kernel: the same split as dkdv_ws_kernel with the roles of queries and
// keys swapped. A block owns 128 query rows (two consumer warpgroups of 64); the producer copies
// their Q and dO once, then classifies the key tiles (next_live_tile over its 128 threads) and
// copies each live tile's K and V (rows no valid query row sees are zeros, as in dq_kernel) with,
// for a partial tile, its 64 log entries, which its own row tests and the consumers' masks read.
// The consumers run dq_kernel's step: S = Q K^T and dP = dO V^T, dS, dQ += dS K, then release.
// Registers as fwd_ws_kernel's (56 + 224: this producer classifies key tiles too; 40 + 232
// spilled 12 bytes at head dim 64).
template <class F>
__global__ void __launch_bounds__(kWsThreads, 1)
    dq_ws_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                 const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
  if constexpr (!F::kBody) {
    __trap();  // the host only launches a family where its body was built (and loads)
  } else {
    using namespace cute;
    using cuda_common::mbar_arrive;
    using cuda_common::mbar_wait;
    using Tr = typename F::Traits;
    static_assert(Tr::kThreads == 256 && Tr::kBlockM == 128, "two consumer warpgroups of 64 query rows");
    static_assert(Tr::kBlockN <= kWsProducerThreads, "one producer thread per key of a tile (its log entry)");
    using T = typename Tr::Input;
    using E = typename Tr::Element;
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
    using Control = WsDqControl<BN>;
    const ShadowAttentionParams& p = bp.fwd;

    unsigned char* smem = F::smem();
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
    Tensor sdO = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)), typename Tr::SmemLayoutOwn{});
    E* ring = reinterpret_cast<E*>(smem + 2 * Tr::kOwnBytes);  // stage s: K tile, V tile
    auto ring_tile = [&](int stage, int j) {
      return make_tensor(make_smem_ptr(ring + (2 * stage + j) * (BN * D)), typename Tr::SmemLayoutPartner{});
    };
    Control& c = *reinterpret_cast<Control*>(smem + 2 * Tr::kOwnBytes + 2 * kWsBwdStages * Tr::kPartnerBytes);

    const QueryTile t = query_tile(p, BM);
    const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
    const int64_t ws_row0 = (t.b * p.num_q_heads + t.hq) * p.q_len + t.i0;

    if (threadIdx.x == 0) c.init(Tr::kThreads);
    __syncthreads();  // the only block-wide barrier

    if (threadIdx.x < kWsProducerThreads) {
      // ---- producer
      cuda_common::setmaxnreg_dec<kWsProducerRegs>();
      const int tid = threadIdx.x;
      WsProducerCopy<E> gmem_copy;
      auto gmem_thr = gmem_copy.get_thread_slice(tid);

      const E* qg = static_cast<const E*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1];
      const E* dog = static_cast<const E*>(bp.grad_out) + t.b * bp.do_stride[0] + t.hq * bp.do_stride[1];
      Tensor tOwnC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
      cuda_cute::copy_rows<BM>(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(qg, p.q_stride[2], t.i0)),
                               gmem_thr.partition_D(sQ), tOwnC, t.rows);
      cuda_cute::copy_rows<BM>(gmem_copy,
                               gmem_thr.partition_S(cuda_cute::gmem_tile<BM, D>(dog, bp.do_stride[2], t.i0)),
                               gmem_thr.partition_D(sdO), tOwnC, t.rows);
      ws_publish(&c.own_full);

      const E* kg = static_cast<const E*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
      const E* vg = static_cast<const E*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
      const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
      const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;
      Tensor tPartC = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
      // This thread's log entry of a partial tile (key tile * BN + tid, threads below BN), read
      // one tile ahead as in fwd_ws_kernel: its latency passes while the producer waits for the
      // stage.
      auto log_entry = [&](int64_t tile, TileKind kind) {
        const int64_t j = tile * BN + tid;
        return kind == TileKind::kPartial && tile < n_key_tiles && tid < BN && j < p.kv_len ? ev_at(evg, j)
                                                                                           : kEvOutOfRange;
      };
      TileKind kind = TileKind::kSkip;
      int64_t tile = next_live_tile<BN>(0, n_key_tiles, c.kinds, mm, n_ev_tiles, p, t, kind, WsProducerGroup{});
      int ev_next = log_entry(tile, kind);
      for (cuda_common::RingCursor<kWsBwdStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        mbar_wait(&c.empty[stage], ring_at.empty_parity());
        if (tid == 0) {  // published with the stage: the consumers read these after their wait
          c.tile[stage] = tile;
          c.kind[stage] = static_cast<int>(kind);
        }
        if (tile < n_key_tiles) {
          const int64_t k0 = tile * BN;
          const int* sev = c.ev[stage];
          if (kind == TileKind::kPartial) {  // producer-uniform (next_live_tile)
            if (tid < BN) c.ev[stage][tid] = ev_next;
            cuda_common::named_sync(kWsBarProducer, kWsProducerThreads);  // every entry is staged
          }
          auto needed = [&](int row) { return staged_kv_row_needed(row, k0, p, t, sev); };
          const bool every_row = kind == TileKind::kFull;
          cuda_cute::copy_rows_if(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BN, D>(kg, p.k_stride[2], k0)),
                                  gmem_thr.partition_D(ring_tile(stage, 0)), tPartC, needed, every_row);
          cuda_cute::copy_rows_if(gmem_copy, gmem_thr.partition_S(cuda_cute::gmem_tile<BN, D>(vg, p.v_stride[2], k0)),
                                  gmem_thr.partition_D(ring_tile(stage, 1)), tPartC, needed, every_row);
        }
        ws_publish(&c.full[stage]);
        if (tile >= n_key_tiles) break;
        kind = TileKind::kSkip;  // as the end marker's kind (next_live_tile leaves it when none is left)
        tile = next_live_tile<BN>(tile + 1, n_key_tiles, c.kinds, mm, n_ev_tiles, p, t, kind, WsProducerGroup{});
        ev_next = log_entry(tile, kind);
      }
      // Leave only after the last copies landed (they write the block's shared memory).
      cp_async_fence();
      cp_async_wait<0>();
    } else {
      // ---- consumers
      cuda_common::setmaxnreg_inc<kWsConsumerRegs>();
      const int tid = threadIdx.x - kWsProducerThreads;  // 0..255: the family's thread index
      F mma(tid);

      Tensor acc_dq = mma.out_acc();
      clear(acc_dq);
      // Rows of this thread's score registers, with their lse2 and delta (padding rows: P = 0).
      Tensor tScS_rc = F::rowcol(mma.score_coords());
      constexpr int kRows = decltype(size<0>(tScS_rc))::value;
      constexpr int kCols = decltype(size<1>(tScS_rc))::value;
      float lse2_r[kRows], delta_r[kRows];
      load_row_stats(lse2_r, delta_r, lse2_ws, delta_ws, ws_row0, t.rows, tScS_rc);

      mbar_wait(&c.own_full, 0);
      auto q_op = mma.own(sQ);
      auto do_op = mma.own(sdO);
      for (cuda_common::RingCursor<kWsBwdStages> ring_at;; ring_at.advance()) {
        const int stage = ring_at.stage;
        mbar_wait(&c.full[stage], ring_at.full_parity());
        const int64_t tile = c.tile[stage];
        if (tile >= n_key_tiles) break;
        const bool full = static_cast<TileKind>(c.kind[stage]) == TileKind::kFull;
        // The copies landed through the generic proxy; the MMAs read through the async one.
        cuda_wgmma::fence_smem_for_wgmma();

        Tensor sK_now = ring_tile(stage, 0);
        Tensor acc_s = mma.score_acc();
        Tensor acc_dp = mma.score_acc();
        mma.scores_pair(acc_s, q_op, sK_now, acc_dp, do_op, ring_tile(stage, 1));

        // dS overwrites S (two copies: a full tile reads no log entry and tests no pair).
        Tensor s = F::rowcol(acc_s);
        Tensor dp = F::rowcol(acc_dp);
        int ev_col[kCols];
        if (full) {
          ds_by_query_rows(s, dp, tScS_rc, ev_col, true, tile * BN, t.p0, scale_log2, lse2_r, delta_r);
        } else {
          cuda_cute::load_staged_column_log(ev_col, c.ev[stage], tScS_rc, true, kEvOutOfRange);
          ds_by_query_rows(s, dp, tScS_rc, ev_col, false, tile * BN, t.p0, scale_log2, lse2_r, delta_r);
        }
        Tensor rdS = F::a_operand(acc_s);
        mma.update(acc_dq, rdS, sK_now);
        mbar_arrive(&c.empty[stage]);  // K, V and the entries of the tile were read (the MMAs waited)
      }
      write_dq<T>(bp, t, acc_dq, mma.out_coords(), scale_log2 / kLog2e);
    }
  }
}

#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
// Host: runs dq_ws_kernel<F> over every (batch, query head, 128-row query tile), then
// dkdv_ws_kernel<F> over every (batch, kv head, 128-key tile); with F::kAtomicDq only the
// latter, adding dQ into a zeroed fp32 workspace that dq_from_acc_kernel then writes out.
template <class F>
void launch_bwd_ws(const ShadowAttentionBwdParams& bp, const int2* mm, int64_t n_ev, const float* lse2,
                   const float* delta, float scale_log2, cudaStream_t s) {
  using Tr = typename F::Traits;
  const ShadowAttentionParams& p = bp.fwd;
  auto run = [&](auto kernel, int64_t blocks, size_t smem, const char* name, auto... extra) {
    if (blocks == 0) return;
    set_smem_limit(kernel, smem);
    kernel<<<grid_1d(blocks, name), kWsThreads, smem, s>>>(bp, mm, n_ev, lse2, delta, scale_log2, extra...);
    check_launch(name);
  };
  static_assert(ws_dq_smem_bytes<Tr>() <= 227 * 1024 && ws_dkdv_smem_bytes<F>() <= 227 * 1024,
                "more shared memory than an sm_90 block can have");
  const int64_t kv_blocks = p.batch * p.num_kv_heads * ceil_div(p.kv_len, Tr::kBlockM);
  if constexpr (F::kAtomicDq) {
    DqWorkspace<typename Tr::Input, Tr::kHeadDim> dq(bp, s);
    run(dkdv_ws_kernel<F>, kv_blocks, ws_dkdv_smem_bytes<F>(), "dkdv_ws_kernel (wgmma_wsf)", dq.acc());
    dq.write(bp, scale_log2, s);
  } else {
    run(dq_ws_kernel<F>, p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM), ws_dq_smem_bytes<Tr>(),
        "dq_ws_kernel (wgmma_wsb)");
    run(dkdv_ws_kernel<F>, kv_blocks, ws_dkdv_smem_bytes<F>(), "dkdv_ws_kernel (wgmma_wsb)",
        static_cast<float*>(nullptr));
  }
}
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
