// CPU forward of shadow-masked attention: tiled, online softmax (FlashAttention-2 order),
// O(tile * D) scratch per thread, fully masked key tiles skipped.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "fast_exp.h"
#include "isa.h"
#include "row_reduce.h"
#include "tile_gemm.h"
#include "tile_mask.h"

namespace shadowkv::cpu {

namespace {

// Work items [begin, end) of fwd_kernel (one per batch x KV head x chunk of up to kCpuHeadStack
// query heads of its group x query tile), with VB-byte vectors in the tile products; `tiles`
// holds the key tiles' evicted_at ranges. The query heads of a GQA group share K, V and the
// eviction log, so an item stacks its heads' query rows (stacked row g * rows + r is head
// h0 + g, query i0 + r): each key tile is converted and transposed once for all of them, and
// the products run on `heads` times as many rows. With one head per item, staging K^T and V per
// (query tile, key tile) pair cost about as much as the products themselves. The sums are
// unchanged: every output still sums over the same k in the same order. Scratch per thread: at
// D = 128 and 8 heads, 320 KB of queries, scores and outputs.
template <typename T, int VB>
SHADOWKV_CPU_INLINE void fwd_items(const ShadowAttentionParams& p, const KeyTileBounds& tiles, int64_t begin,
                                   int64_t end) {
  using acc_t = typename acc_type<T>::type;
  constexpr int64_t BR = kCpuQueryTile, BC = kCpuKeyTile;
  const int64_t D = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const auto [stack, n_hc] = head_chunks(group);
  const int64_t n_qt = (p.q_len + BR - 1) / BR;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // Per-thread scratch, reused across the work items of this chunk.
  std::vector<acc_t> qf(stack * BR * D), kt(D * BC), vf(BC * D), s(stack * BR * BC), acc(stack * BR * D),
      m(stack * BR), l(stack * BR);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qt = item % n_qt, hc = item / n_qt % n_hc, bk = item / n_qt / n_hc;
    const int64_t hk = bk % p.num_kv_heads, b = bk / p.num_kv_heads;
    const int64_t h0 = hk * group + hc * stack, heads = std::min(stack, group - hc * stack);
    const int64_t i0 = qt * BR, rows = std::min(BR, p.q_len - i0), n_rows = heads * rows;
    const int64_t p0 = p.q_offset + i0, p1 = p0 + rows - 1;
    const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + hk * p.ev_stride[1];

    for (int64_t g = 0; g < heads; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* src = row_ptr<T>(p.q, p.q_stride, b, h0 + g, i0 + r);
        acc_t* dst = qf.data() + (g * rows + r) * D;  // (not &qf[...]: empty when D = 0)
        for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]) * scale;
      }
    }
    std::fill(acc.begin(), acc.begin() + n_rows * D, acc_t(0));
    std::fill(m.begin(), m.begin() + n_rows, neg_inf);
    std::fill(l.begin(), l.begin() + n_rows, acc_t(0));

    for (int64_t t = 0; t < tiles.num_tiles; ++t) {
      const int64_t j0 = t * BC, cols = std::min(BC, p.kv_len - j0);
      const TileKind kind = tiles.classify(b, hk, p.num_kv_heads, t, j0, j0 + cols, p0, p1);
      if (kind == TileKind::kSkip) continue;
      // K transposed ([D, BC]) and V row-major ([BC, D]): both products below then read
      // their B operand along contiguous rows. In a partial tile, the V row of a key that no
      // row of this query tile sees is zeros, not its content: its P is 0, and 0 * NaN (a
      // slot a server reused, say) would still be NaN. The CUDA kernels do the same.
      for (int64_t c = 0; c < cols; ++c) {
        const T* ks = row_ptr<T>(p.k, p.k_stride, b, hk, j0 + c);
        const T* vs = row_ptr<T>(p.v, p.v_stride, b, hk, j0 + c);
        const bool seen = kind == TileKind::kFull || seen_by_some(j0 + c, p0, p1, ev[j0 + c]);
        for (int64_t d = 0; d < D; ++d) {
          kt[d * BC + c] = to_float(ks[d]);
          vf[c * D + d] = seen ? to_float(vs[d]) : acc_t(0);
        }
      }
      // S = Q K^T for the stacked rows (columns past `cols` hold stale keys and are ignored).
      std::fill(s.begin(), s.begin() + n_rows * BC, acc_t(0));
      tile_gemm_acc<VB>(n_rows, BC, D, qf.data(), 1, D, kt.data(), BC, s.data(), BC);
      for (int64_t row = 0; row < n_rows; ++row) {
        acc_t* sr = &s[row * BC];
        if (kind == TileKind::kPartial) mask_row(sr, cols, p0 + row % rows, j0, ev, neg_inf);
        const acc_t mx = row_max(sr, cols, m[row]);
        if (mx == neg_inf) {  // nothing visible in this row yet: it adds nothing below
          std::fill(sr, sr + cols, acc_t(0));
          continue;
        }
        const acc_t alpha = exp_fast(m[row] - mx);
        for (int64_t c = 0; c < cols; ++c) sr[c] = exp_fast(sr[c] - mx);
        l[row] = l[row] * alpha + row_sum(sr, cols);
        m[row] = mx;
        acc_t* ar = acc.data() + row * D;
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
      // O += P V (P: the rows' probabilities, [n_rows, cols] with row stride BC).
      tile_gemm_acc<VB>(n_rows, D, cols, s.data(), 1, BC, vf.data(), D, acc.data(), D);
    }

    for (int64_t g = 0; g < heads; ++g) {
      acc_t* lse = static_cast<acc_t*>(p.lse) + b * p.lse_stride[0] + (h0 + g) * p.lse_stride[1] + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = g * rows + r;
        T* dst = row_ptr<T>(p.out, p.o_stride, b, h0 + g, i0 + r);
        const bool empty = l[row] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[row];
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[row * D + d] * inv);
        lse[r] = empty ? neg_inf : m[row] + std::log(l[row]);
      }
    }
  }
}

template <typename T>
SHADOWKV_AVX2_FN void fwd_items_avx2(const ShadowAttentionParams& p, const KeyTileBounds& tiles, int64_t begin,
                                     int64_t end) {
  fwd_items<T, detail::kAvx2VecBytes>(p, tiles, begin, end);
}

template <typename T>
SHADOWKV_AVX512_FN void fwd_items_avx512(const ShadowAttentionParams& p, const KeyTileBounds& tiles, int64_t begin,
                                         int64_t end) {
  fwd_items<T, detail::kAvx512VecBytes>(p, tiles, begin, end);
}

template <typename T>
void fwd_kernel(const ShadowAttentionParams& p, const ParallelFor& pf) {
  [[maybe_unused]] const Isa isa = active_isa();  // unread in a build without variants (isa.h)
  const auto items =
      SHADOWKV_CPU_PICK(isa, (&fwd_items<T, detail::kBaselineVecBytes>), &fwd_items_avx2<T>, &fwd_items_avx512<T>);
  const KeyTileBounds tiles(p, kCpuKeyTile);  // once per call, shared by every thread
  const int64_t n_qt = (p.q_len + kCpuQueryTile - 1) / kCpuQueryTile;
  const int64_t n_hc = head_chunks(p.num_q_heads / p.num_kv_heads).count;
  pf(p.batch * p.num_kv_heads * n_hc * n_qt, [&](int64_t begin, int64_t end) { items(p, tiles, begin, end); });
}

}  // namespace

}  // namespace shadowkv::cpu

namespace shadowkv {

void shadow_attention_fwd_cpu(const ShadowAttentionParams& p, const ParallelFor& pf) {
  check_shadow_attention_params(p, "shadowkv::shadow_attention");
  cpu::check_parallel_for(pf, "shadowkv::shadow_attention");
  if (p.batch == 0 || p.num_q_heads == 0 || p.q_len == 0) return;
  cpu::dispatch_dtype(p.dtype, [&](auto tag) { cpu::fwd_kernel<typename decltype(tag)::type>(p, pf); });
}

}  // namespace shadowkv
