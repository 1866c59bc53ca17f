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

// Work items [begin, end) of fwd_kernel (one per batch x query head x query tile), with VB-byte
// vectors in the tile products; `tiles` holds the key tiles' evicted_at ranges.
template <typename T, int VB>
SHADOWKV_CPU_INLINE void fwd_items(const ShadowAttentionParams& p, const KeyTileBounds& tiles, int64_t begin,
                                   int64_t end) {
  using acc_t = typename acc_type<T>::type;
  constexpr int64_t BR = kCpuQueryTile, BC = kCpuKeyTile;
  const int64_t D = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const int64_t n_qt = (p.q_len + BR - 1) / BR;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // Per-thread scratch, reused across the work items of this chunk.
  std::vector<acc_t> qf(BR * D), kt(D * BC), vf(BC * D), s(BR * BC), acc(BR * D), m(BR), l(BR);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qt = item % n_qt, bh = item / n_qt, hq = bh % p.num_q_heads, b = bh / p.num_q_heads;
    const int64_t hk = hq / group;
    const int64_t i0 = qt * BR, rows = std::min(BR, p.q_len - i0);
    const int64_t p0 = p.q_offset + i0, p1 = p0 + rows - 1;
    const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + hk * p.ev_stride[1];

    for (int64_t r = 0; r < rows; ++r) {
      const T* src = row_ptr<T>(p.q, p.q_stride, b, hq, i0 + r);
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(src[d]) * scale;
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    std::fill(m.begin(), m.end(), neg_inf);
    std::fill(l.begin(), l.end(), acc_t(0));

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
      // S = Q K^T for the tile's rows (columns past `cols` hold stale keys and are ignored).
      std::fill(s.begin(), s.begin() + rows * BC, acc_t(0));
      tile_gemm_acc<VB>(rows, BC, D, qf.data(), 1, D, kt.data(), BC, s.data(), BC);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* sr = &s[r * BC];
        if (kind == TileKind::kPartial) mask_row(sr, cols, p0 + r, j0, ev, neg_inf);
        const acc_t mx = row_max(sr, cols, m[r]);
        if (mx == neg_inf) {  // nothing visible in this row yet: it adds nothing below
          std::fill(sr, sr + cols, acc_t(0));
          continue;
        }
        const acc_t alpha = exp_fast(m[r] - mx);
        for (int64_t c = 0; c < cols; ++c) sr[c] = exp_fast(sr[c] - mx);
        l[r] = l[r] * alpha + row_sum(sr, cols);
        m[r] = mx;
        acc_t* ar = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
      // O += P V (P: the rows' probabilities, [rows, cols] with row stride BC).
      tile_gemm_acc<VB>(rows, D, cols, s.data(), 1, BC, vf.data(), D, acc.data(), D);
    }

    acc_t* lse = static_cast<acc_t*>(p.lse) + b * p.lse_stride[0] + hq * p.lse_stride[1] + i0;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = row_ptr<T>(p.out, p.o_stride, b, hq, i0 + r);
      const bool empty = l[r] == acc_t(0);
      const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[r * D + d] * inv);
      lse[r] = empty ? neg_inf : m[r] + std::log(l[r]);
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
  const Isa isa = active_isa();
  const auto items = isa == Isa::kAvx512 ? &fwd_items_avx512<T>
                     : isa == Isa::kAvx2 ? &fwd_items_avx2<T>
                                         : &fwd_items<T, detail::kBaselineVecBytes>;
  const KeyTileBounds tiles(p, kCpuKeyTile);  // once per call, shared by every thread
  const int64_t n_qt = (p.q_len + kCpuQueryTile - 1) / kCpuQueryTile;
  pf(p.batch * p.num_q_heads * n_qt, [&](int64_t begin, int64_t end) { items(p, tiles, begin, end); });
}

}  // namespace

}  // namespace shadowkv::cpu

namespace shadowkv {

void shadow_attention_fwd_cpu(const ShadowAttentionParams& p, const ParallelFor& pf) {
  check_shadow_attention_params(p, "shadowkv::shadow_attention");
  if (p.batch == 0 || p.num_q_heads == 0 || p.q_len == 0) return;
  cpu::dispatch_dtype(p.dtype, [&](auto tag) { cpu::fwd_kernel<typename decltype(tag)::type>(p, pf); });
}

}  // namespace shadowkv
