// CPU backward of shadow-masked attention (FlashAttention-2 recompute from the saved lse).
//
// No output element is written by two threads, and every one sums its terms in the same order
// whichever way the work is split, so results are deterministic and do not depend on it:
//   * fused (when there are enough (batch, kv head) pairs to keep the threads busy and their
//     buffers are small): one work item per (batch, kv head) walks every (query head, query
//     tile, key tile) triple once, with dK/dV accumulated for the whole head and dQ per query
//     tile: S and dP are computed once per pair;
//   * two passes otherwise: pass 1 owns a key tile and sums dK, dV over every query head of its
//     GQA group; pass 2 owns a query tile and sums dQ. Each recomputes P from lse (one extra
//     Q K^T and dO V^T per pair), but there are many more, smaller work items.
#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "dispatch.h"
#include "fast_exp.h"
#include "isa.h"
#include "tile_gemm.h"
#include "tile_mask.h"

namespace shadowkv::cpu {
namespace {

template <typename T>
struct BwdContext {
  using acc_t = typename acc_type<T>::type;
  static constexpr int64_t BR = kCpuQueryTile, BC = kCpuKeyTile;

  const ShadowAttentionBwdParams& bp;
  const ShadowAttentionParams& p;
  KeyTileBounds tiles;
  int64_t D, group, n_qt;
  acc_t scale;
  Isa isa;  // the variant of the tile loops (isa.h)
  // delta[b, hq, i] = dO_i . O_i - dlse_i : the row term of dS = P * (dP - delta).
  std::vector<acc_t> delta;

  explicit BwdContext(const ShadowAttentionBwdParams& bp_)
      : bp(bp_), p(bp_.fwd), tiles(bp_.fwd, BC), D(p.head_dim), group(p.num_q_heads / p.num_kv_heads),
        n_qt((p.q_len + BR - 1) / BR), scale(static_cast<acc_t>(p.scale)), isa(active_isa()) {}

  const acc_t* lse_row(int64_t b, int64_t hq) const {
    return static_cast<const acc_t*>(p.lse) + b * p.lse_stride[0] + hq * p.lse_stride[1];
  }

  void compute_delta(const ParallelFor& pf) {
    delta.assign(p.batch * p.num_q_heads * p.q_len, acc_t(0));
    pf(p.batch * p.num_q_heads, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.num_q_heads, hq = bh % p.num_q_heads;
        const acc_t* glse = bp.grad_lse == nullptr ? nullptr
                                                   : static_cast<const acc_t*>(bp.grad_lse) + b * bp.glse_stride[0] +
                                                         hq * bp.glse_stride[1];
        for (int64_t i = 0; i < p.q_len; ++i) {
          const T* o = row_ptr<T>(p.out, p.o_stride, b, hq, i);
          const T* g = row_ptr<T>(bp.grad_out, bp.do_stride, b, hq, i);
          acc_t s = 0;
          for (int64_t d = 0; d < D; ++d) s += to_float(o[d]) * to_float(g[d]);
          delta[bh * p.q_len + i] = s - (glse ? glse[i] : acc_t(0));
        }
      }
    });
  }

  // Which rows load_rows reads: all (ev == nullptr), or only keys that some query position in
  // [p0, p1] sees (log entries `ev`, indexed by key); the others are loaded as zeros.
  struct RowFilter {
    const int32_t* ev = nullptr;
    int64_t p0 = 0, p1 = 0;
    bool keeps(int64_t j) const { return ev == nullptr || seen_by_some(j, p0, p1, ev[j]); }
  };

  // Every pass reads K/V through one: a key that no query of the work item sees is zeros,
  // whatever the slot holds. Its P is 0, but 0 * NaN is NaN: without this a NaN in a padding
  // slot (never visible) would reach dQ through dS K, and dK through dS = P (dP - delta).
  RowFilter keys_seen_by_any_query(const int32_t* ev) const {
    return RowFilter{ev, p.q_offset, p.q_offset + p.q_len - 1};
  }

  // Loads `n` rows [start, start+n) of a [B,H,L,D] tensor as acc_t, row-major [n, D], and
  // optionally transposed [D, ld]; rows `filter` drops are zeros.
  SHADOWKV_CPU_INLINE static void load_rows(const void* base, const int64_t* stride, int64_t b, int64_t h,
                                            int64_t start, int64_t n, int64_t D, acc_t* rows, acc_t* cols_t,
                                            int64_t ld, RowFilter filter = {}) {
    for (int64_t r = 0; r < n; ++r) {
      const T* src = row_ptr<T>(base, stride, b, h, start + r);
      const bool keep = filter.keeps(start + r);
      for (int64_t d = 0; d < D; ++d) {
        const acc_t x = keep ? to_float(src[d]) : acc_t(0);
        if (rows) rows[r * D + d] = x;
        if (cols_t) cols_t[d * ld + r] = x;
      }
    }
  }

  // Writes `n` rows [start, start+n) of a [B,H,L,D] tensor from acc_t rows [n, D].
  SHADOWKV_CPU_INLINE static void store_rows(void* base, const int64_t* stride, int64_t b, int64_t h,
                                             int64_t start, int64_t n, int64_t D, const acc_t* rows) {
    for (int64_t r = 0; r < n; ++r) {
      T* dst = row_ptr<T>(base, stride, b, h, start + r);
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(rows[r * D + d]);
    }
  }

  // For one (query tile, key tile) pair: P (into s) and dS * scale (into ds), both [rows, BC]
  // with only the first `cols` columns meaningful. q, dout: [rows, D]; kt, vt: [D, BC]
  // (transposed key / value tiles).
  template <int VB>
  SHADOWKV_CPU_INLINE void probs_and_dscores(TileKind kind, int64_t b, int64_t hq, int64_t i0, int64_t rows,
                                             int64_t j0, int64_t cols, const int32_t* ev, const acc_t* q,
                                             const acc_t* dout, const acc_t* kt, const acc_t* vt, acc_t* s,
                                             acc_t* ds) const {
    const acc_t* lse = lse_row(b, hq) + i0;
    const acc_t* dl = &delta[(b * p.num_q_heads + hq) * p.q_len + i0];
    const int64_t pos0 = p.q_offset + i0;
    std::fill(s, s + rows * BC, acc_t(0));
    std::fill(ds, ds + rows * BC, acc_t(0));
    tile_gemm_acc<VB>(rows, BC, D, q, 1, D, kt, BC, s, BC);      // S = Q K^T
    tile_gemm_acc<VB>(rows, BC, D, dout, 1, D, vt, BC, ds, BC);  // dP = dO V^T
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = &s[r * BC];
      acc_t* dr = &ds[r * BC];
      if (std::isinf(lse[r])) {  // row saw no key: no gradient flows through it
        std::fill(sr, sr + cols, acc_t(0));
        std::fill(dr, dr + cols, acc_t(0));
        continue;
      }
      // Separate loops so the exps vectorise; only partial tiles test visibility.
      for (int64_t c = 0; c < cols; ++c) sr[c] = exp_fast(sr[c] * scale - lse[r]);
      if (kind == TileKind::kPartial) mask_row(sr, cols, pos0 + r, j0, ev, acc_t(0));
      for (int64_t c = 0; c < cols; ++c) dr[c] = sr[c] * (dr[c] - dl[r]) * scale;
    }
  }

  // Runs a pass's work items over [0, n) in pf's chunks (items: SHADOWKV_CPU_PICK's choice).
  using Items = void (BwdContext::*)(int64_t, int64_t) const;
  void run(const ParallelFor& pf, int64_t n, Items items) const {
    pf(n, [&](int64_t begin, int64_t end) { (this->*items)(begin, end); });
  }

  // Whether the fused pass runs. It does ~0.6x the two passes' work (S and dP once per tile
  // pair, not twice; measured 0.58x at B=1, Hq/Hkv=8/2, L=4096, D=64) but in coarse items, one per
  // (batch, kv head): it runs when every thread gets one and the busiest thread has at most
  // 1.5x the average (ceil(items / threads) items, e.g. 2 of 3 on two threads: 1.48x faster
  // there than the two passes, measured), and its per-item buffers (K^T, V^T, K, dK, dV of the
  // whole kv head) stay under 32 MB, 256 MB for all threads at once.
  bool use_fused() const {
    const int64_t threads = bp.cpu_threads > 0 ? bp.cpu_threads
                                               : std::max<int64_t>(1, std::thread::hardware_concurrency());
    const int64_t items = p.batch * p.num_kv_heads;
    if (items < threads) return false;  // first: ceil(items / threads) below overflows for a huge count
    const int64_t busiest = (items + threads - 1) / threads;
    const int64_t bytes = 5 * tiles.num_tiles * BC * D * static_cast<int64_t>(sizeof(acc_t));
    return 2 * busiest * threads <= 3 * items && bytes <= (int64_t{32} << 20) && bytes * threads <= (int64_t{256} << 20);
  }

  // Work items [begin, end) of the fused pass (one per batch x kv head), with VB-byte vectors.
  // For each dK/dV element the terms arrive in (query head, query tile) order and for each dQ
  // element in key-tile order, as in the two passes: the results are the same bits.
  template <int VB>
  SHADOWKV_CPU_INLINE void fused_items(int64_t begin, int64_t end) const {
    const int64_t n_kt = tiles.num_tiles, L = n_kt * BC;
    // Per key tile t: K^T and V^T as [D, BC] at t * D * BC; K, dK, dV row-major [L, D].
    std::vector<acc_t> kt(D * L), vt(D * L), kf(L * D), dk(L * D), dv(L * D), q(BR * D), dout(BR * D), s(BR * BC),
        ds(BR * BC), dq(BR * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t hk = item % p.num_kv_heads, b = item / p.num_kv_heads;
      const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + hk * p.ev_stride[1];
      const RowFilter seen = keys_seen_by_any_query(ev);
      for (int64_t t = 0; t < n_kt; ++t) {
        const int64_t j0 = t * BC, cols = std::min(BC, p.kv_len - j0);
        load_rows(p.k, p.k_stride, b, hk, j0, cols, D, kf.data() + j0 * D, kt.data() + t * D * BC, BC, seen);
        load_rows(p.v, p.v_stride, b, hk, j0, cols, D, nullptr, vt.data() + t * D * BC, BC, seen);
      }
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t i0 = qt * BR, rows = std::min(BR, p.q_len - i0);
          const int64_t p0 = p.q_offset + i0;
          load_rows(p.q, p.q_stride, b, hq, i0, rows, D, q.data(), nullptr, 0);
          load_rows(bp.grad_out, bp.do_stride, b, hq, i0, rows, D, dout.data(), nullptr, 0);
          std::fill(dq.begin(), dq.end(), acc_t(0));
          for (int64_t t = 0; t < n_kt; ++t) {
            const int64_t j0 = t * BC, cols = std::min(BC, p.kv_len - j0);
            const TileKind kind = tiles.classify(b, hk, p.num_kv_heads, t, j0, j0 + cols, p0, p0 + rows - 1);
            if (kind == TileKind::kSkip) continue;
            probs_and_dscores<VB>(kind, b, hq, i0, rows, j0, cols, ev, q.data(), dout.data(), kt.data() + t * D * BC,
                                  vt.data() + t * D * BC, s.data(), ds.data());
            tile_gemm_acc<VB>(cols, D, rows, s.data(), BC, 1, dout.data(), D, dv.data() + j0 * D, D);  // dV += P^T dO
            tile_gemm_acc<VB>(cols, D, rows, ds.data(), BC, 1, q.data(), D, dk.data() + j0 * D, D);   // dK += dS^T Q
            tile_gemm_acc<VB>(rows, D, cols, ds.data(), 1, BC, kf.data() + j0 * D, D, dq.data(), D);  // dQ += dS K
          }
          store_rows(bp.grad_q, bp.dq_stride, b, hq, i0, rows, D, dq.data());
        }
      }
      store_rows(bp.grad_k, bp.dk_stride, b, hk, 0, p.kv_len, D, dk.data());
      store_rows(bp.grad_v, bp.dv_stride, b, hk, 0, p.kv_len, D, dv.data());
    }
  }
  SHADOWKV_AVX2_FN void fused_items_avx2(int64_t begin, int64_t end) const {
    fused_items<detail::kAvx2VecBytes>(begin, end);
  }
  SHADOWKV_AVX512_FN void fused_items_avx512(int64_t begin, int64_t end) const {
    fused_items<detail::kAvx512VecBytes>(begin, end);
  }

  void fused_pass(const ParallelFor& pf) const {
    run(pf, p.batch * p.num_kv_heads,
        SHADOWKV_CPU_PICK(isa, &BwdContext::fused_items<detail::kBaselineVecBytes>, &BwdContext::fused_items_avx2,
                          &BwdContext::fused_items_avx512));
  }

  // Work items [begin, end) of the dK/dV pass, with VB-byte vectors in the tile products.
  template <int VB>
  SHADOWKV_CPU_INLINE void dkdv_items(int64_t begin, int64_t end) const {
    std::vector<acc_t> kt(D * BC), vt(D * BC), q(BR * D), dout(BR * D), s(BR * BC), ds(BR * BC), dk(BC * D),
        dv(BC * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item % tiles.num_tiles, bh = item / tiles.num_tiles;
      const int64_t hk = bh % p.num_kv_heads, b = bh / p.num_kv_heads;
      const int64_t j0 = t * BC, cols = std::min(BC, p.kv_len - j0);
      const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + hk * p.ev_stride[1];
      const RowFilter seen = keys_seen_by_any_query(ev);
      load_rows(p.k, p.k_stride, b, hk, j0, cols, D, nullptr, kt.data(), BC, seen);
      load_rows(p.v, p.v_stride, b, hk, j0, cols, D, nullptr, vt.data(), BC, seen);
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t i0 = qt * BR, rows = std::min(BR, p.q_len - i0);
          const int64_t p0 = p.q_offset + i0;
          const TileKind kind = tiles.classify(b, hk, p.num_kv_heads, t, j0, j0 + cols, p0, p0 + rows - 1);
          if (kind == TileKind::kSkip) continue;
          load_rows(p.q, p.q_stride, b, hq, i0, rows, D, q.data(), nullptr, 0);
          load_rows(bp.grad_out, bp.do_stride, b, hq, i0, rows, D, dout.data(), nullptr, 0);
          probs_and_dscores<VB>(kind, b, hq, i0, rows, j0, cols, ev, q.data(), dout.data(), kt.data(), vt.data(),
                                s.data(), ds.data());
          // dV += P^T dO and dK += dS^T Q over this query tile's rows.
          tile_gemm_acc<VB>(cols, D, rows, s.data(), BC, 1, dout.data(), D, dv.data(), D);
          tile_gemm_acc<VB>(cols, D, rows, ds.data(), BC, 1, q.data(), D, dk.data(), D);
        }
      }
      store_rows(bp.grad_k, bp.dk_stride, b, hk, j0, cols, D, dk.data());
      store_rows(bp.grad_v, bp.dv_stride, b, hk, j0, cols, D, dv.data());
    }
  }
  SHADOWKV_AVX2_FN void dkdv_items_avx2(int64_t begin, int64_t end) const {
    dkdv_items<detail::kAvx2VecBytes>(begin, end);
  }
  SHADOWKV_AVX512_FN void dkdv_items_avx512(int64_t begin, int64_t end) const {
    dkdv_items<detail::kAvx512VecBytes>(begin, end);
  }

  void dkdv_pass(const ParallelFor& pf) const {
    run(pf, p.batch * p.num_kv_heads * tiles.num_tiles,
        SHADOWKV_CPU_PICK(isa, &BwdContext::dkdv_items<detail::kBaselineVecBytes>, &BwdContext::dkdv_items_avx2,
                          &BwdContext::dkdv_items_avx512));
  }

  // Work items [begin, end) of the dQ pass (one per batch x KV head x chunk of up to
  // kCpuHeadStack query heads of its group x query tile), with VB-byte vectors in the tile
  // products. The heads of a GQA group share K, V and the log: an item stages each key tile
  // (K, K^T, V^T: the transposes cost about as much as the products) once for all its heads,
  // then runs each head's products as a one-head item would (the same bits).
  template <int VB>
  SHADOWKV_CPU_INLINE void dq_items(int64_t begin, int64_t end) const {
    const auto [stack, n_hc] = head_chunks(group);
    std::vector<acc_t> kf(BC * D), kt(D * BC), vt(D * BC), q(stack * BR * D), dout(stack * BR * D), s(BR * BC),
        ds(BR * BC), dq(stack * BR * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qt = item % n_qt, hc = item / n_qt % n_hc, bk = item / n_qt / n_hc;
      const int64_t hk = bk % p.num_kv_heads, b = bk / p.num_kv_heads;
      const int64_t h0 = hk * group + hc * stack, heads = std::min(stack, group - hc * stack);
      const int64_t i0 = qt * BR, rows = std::min(BR, p.q_len - i0);
      const int64_t p0 = p.q_offset + i0;
      const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + hk * p.ev_stride[1];
      for (int64_t g = 0; g < heads; ++g) {
        load_rows(p.q, p.q_stride, b, h0 + g, i0, rows, D, q.data() + g * BR * D, nullptr, 0);
        load_rows(bp.grad_out, bp.do_stride, b, h0 + g, i0, rows, D, dout.data() + g * BR * D, nullptr, 0);
      }
      std::fill(dq.begin(), dq.begin() + heads * BR * D, acc_t(0));
      for (int64_t t = 0; t < tiles.num_tiles; ++t) {
        const int64_t j0 = t * BC, cols = std::min(BC, p.kv_len - j0);
        const TileKind kind = tiles.classify(b, hk, p.num_kv_heads, t, j0, j0 + cols, p0, p0 + rows - 1);
        if (kind == TileKind::kSkip) continue;
        const RowFilter seen{ev, p0, p0 + rows - 1};
        load_rows(p.k, p.k_stride, b, hk, j0, cols, D, kf.data(), kt.data(), BC, seen);
        load_rows(p.v, p.v_stride, b, hk, j0, cols, D, nullptr, vt.data(), BC, seen);
        for (int64_t g = 0; g < heads; ++g) {
          probs_and_dscores<VB>(kind, b, h0 + g, i0, rows, j0, cols, ev, q.data() + g * BR * D,
                                dout.data() + g * BR * D, kt.data(), vt.data(), s.data(), ds.data());
          tile_gemm_acc<VB>(rows, D, cols, ds.data(), 1, BC, kf.data(), D, dq.data() + g * BR * D, D);  // dQ += dS K
        }
      }
      for (int64_t g = 0; g < heads; ++g)
        store_rows(bp.grad_q, bp.dq_stride, b, h0 + g, i0, rows, D, dq.data() + g * BR * D);
    }
  }
  SHADOWKV_AVX2_FN void dq_items_avx2(int64_t begin, int64_t end) const {
    dq_items<detail::kAvx2VecBytes>(begin, end);
  }
  SHADOWKV_AVX512_FN void dq_items_avx512(int64_t begin, int64_t end) const {
    dq_items<detail::kAvx512VecBytes>(begin, end);
  }

  void dq_pass(const ParallelFor& pf) const {
    const int64_t items = p.batch * p.num_kv_heads * head_chunks(group).count * n_qt;
    run(pf, items,
        SHADOWKV_CPU_PICK(isa, &BwdContext::dq_items<detail::kBaselineVecBytes>, &BwdContext::dq_items_avx2,
                          &BwdContext::dq_items_avx512));
  }
};

template <typename T>
void bwd_kernel(const ShadowAttentionBwdParams& bp, const ParallelFor& pf) {
  BwdContext<T> ctx(bp);
  ctx.compute_delta(pf);
  if (ctx.use_fused()) {
    ctx.fused_pass(pf);
  } else {
    ctx.dkdv_pass(pf);
    ctx.dq_pass(pf);
  }
}

// Writes zeros into a [B, H, L, D] strided tensor (outputs with no contribution).
template <typename T>
void zero_rows(void* base, const int64_t* stride, int64_t B, int64_t H, int64_t L, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i) std::fill_n(row_ptr<T>(base, stride, b, h, i), D, from_float<T>(0.0f));
}

}  // namespace
}  // namespace shadowkv::cpu

namespace shadowkv {

void shadow_attention_bwd_cpu(const ShadowAttentionBwdParams& bp, const ParallelFor& pf) {
  const ShadowAttentionParams& p = bp.fwd;
  check_shadow_attention_bwd_params(bp, "shadowkv::shadow_attention_bwd");
  cpu::check_parallel_for(pf, "shadowkv::shadow_attention_bwd");
  cpu::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.batch == 0) return;
    if (p.num_q_heads == 0 || p.q_len == 0 || p.kv_len == 0) {  // no pair interacts: all gradients are zero
      cpu::zero_rows<T>(bp.grad_q, bp.dq_stride, p.batch, p.num_q_heads, p.q_len, p.head_dim);
      cpu::zero_rows<T>(bp.grad_k, bp.dk_stride, p.batch, p.num_kv_heads, p.kv_len, p.head_dim);
      cpu::zero_rows<T>(bp.grad_v, bp.dv_stride, p.batch, p.num_kv_heads, p.kv_len, p.head_dim);
      return;
    }
    cpu::bwd_kernel<T>(bp, pf);
  });
}

}  // namespace shadowkv
