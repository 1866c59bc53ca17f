// Per-key-tile summary of the eviction log, shared by the CPU forward and backward passes.
//
// A (query tile, key tile) pair is classified once from the tile's min/max evicted_at, so
// the inner loops either skip the pair, run unmasked, or test each element. Skipped pairs
// are what makes the cost fall with the budget.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa.h"
#include "shadowkv/shadow_attention.h"

namespace shadowkv::cpu {

enum class TileKind { kSkip, kFull, kPartial };

struct KeyTileBounds {
  // min/max of evicted_at over each key tile, layout [B, Hkv, num_tiles].
  std::vector<int32_t> min_ev, max_ev;
  int64_t num_tiles = 0;

  KeyTileBounds(const ShadowAttentionParams& p, int64_t tile) {
    num_tiles = (p.kv_len + tile - 1) / tile;
    const int64_t n = p.batch * p.num_kv_heads * num_tiles;
    min_ev.resize(n);
    max_ev.resize(n);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        const int32_t* ev = p.evicted_at + b * p.ev_stride[0] + h * p.ev_stride[1];
        for (int64_t t = 0; t < num_tiles; ++t) {
          const int64_t j0 = t * tile, j1 = std::min(p.kv_len, j0 + tile);
          int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
          for (int64_t j = j0; j < j1; ++j) {
            lo = std::min(lo, ev[j]);
            hi = std::max(hi, ev[j]);
          }
          const int64_t idx = (b * p.num_kv_heads + h) * num_tiles + t;
          min_ev[idx] = lo;
          max_ev[idx] = hi;
        }
      }
    }
  }

  // Query positions [p0, p1] against keys [j0, j1) of tile `t` of (b, h).
  TileKind classify(int64_t b, int64_t h, int64_t num_kv_heads, int64_t t, int64_t j0, int64_t j1, int64_t p0,
                    int64_t p1) const {
    const int64_t idx = (b * num_kv_heads + h) * num_tiles + t;
    if (j0 > p1 || max_ev[idx] <= p0) return TileKind::kSkip;
    if (j1 - 1 <= p0 && min_ev[idx] > p1) return TileKind::kFull;
    return TileKind::kPartial;
  }
};

// Replaces the scores of keys [j0, j0 + cols) that query position `pos` cannot see with
// `hidden`: key j is visible iff j <= pos < evicted_at[j]. Written as a select over 32-bit
// ints so it vectorises (a position at or past INT32_MAX sees nothing, as in the 64-bit rule).
template <typename acc_t>
SHADOWKV_CPU_INLINE void mask_row(acc_t* s, int64_t cols, int64_t pos, int64_t j0, const int32_t* ev, acc_t hidden) {
  const int32_t p = static_cast<int32_t>(std::min<int64_t>(pos, std::numeric_limits<int32_t>::max()));
  const int32_t last = static_cast<int32_t>(std::max<int64_t>(-1, std::min(pos - j0, cols - 1)));
  const int32_t* e = ev + j0;
  for (int32_t c = 0; c < static_cast<int32_t>(cols); ++c) s[c] = (c <= last) & (p < e[c]) ? s[c] : hidden;
}

// Whether some query position in [p0, p1] sees key j (evicted_at[j] = `ev`): the first one
// that could, max(j, p0), is inside the range and before the key's eviction.
SHADOWKV_CPU_INLINE bool seen_by_some(int64_t j, int64_t p0, int64_t p1, int32_t ev) {
  const int64_t first = std::max(j, p0);
  return first <= p1 && first < ev;
}

// Element (q, k or v row) of a [B, H, L, D] tensor given element strides.
template <typename T>
inline const T* row_ptr(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + i * stride[2];
}
template <typename T>
inline T* row_ptr(void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(base) + b * stride[0] + h * stride[1] + i * stride[2];
}

// The query heads of one GQA group share its K, V and eviction log: the CPU forward and dQ
// passes give a work item up to kCpuHeadStack of them (same query tile), so that each key tile
// is converted and transposed once for all of them. The cap bounds the per-thread scratch.
constexpr int64_t kCpuHeadStack = 8;

struct HeadChunks {
  int64_t stack;  // heads per chunk: min(group, kCpuHeadStack)
  int64_t count;  // chunks per group
};
inline HeadChunks head_chunks(int64_t group) {
  const int64_t stack = std::min(group, kCpuHeadStack);
  return {stack, (group + stack - 1) / stack};
}

}  // namespace shadowkv::cpu
