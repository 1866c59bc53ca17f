// CPU decode attention over the paged KV cache: one query token per sequence, two passes over
// the cached slots (scores, then softmax-weighted values) per (sequence, KV head), with the
// query heads of the GQA group sharing each K/V row load. Scratch is O(group * seq_len).
// The per-item loops exist in the baseline and the AVX2 variant (isa.h).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "fast_exp.h"
#include "isa.h"
#include "row_reduce.h"
#include "shadowkv/paged_kv.h"
#include "tile_gemm.h"

namespace shadowkv::cpu {
namespace {

// Work items [begin, end) of decode_kernel (one per sequence x KV head), with VB-byte vectors.
// Scores and the weighted sum of values are tile products over blocks of kCpuKeyTile slots
// gathered from the pages (keys transposed), so they vectorise across slots and head dims;
// every output sums over d (scores) or over slots (values) in increasing order, as a plain
// loop would.
template <typename T, int VB>
SHADOWKV_CPU_INLINE void decode_items(const PagedDecodeParams& p, int64_t begin, int64_t end) {
  using acc_t = typename acc_type<T>::type;
  constexpr int64_t BC = kCpuKeyTile;
  const PagedKVCache& c = p.cache;
  const int64_t D = c.head_dim, H = c.num_kv_heads, ps = c.page_size, group = p.num_q_heads / H;
  const acc_t scale = static_cast<acc_t>(p.scale);

  std::vector<acc_t> qf(group * D), kt(D * BC), vf(BC * D), acc(group * D), s, inv_l(group);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / H, h = item % H, len = c.seq_len(b);
    for (int64_t g = 0; g < group; ++g) {
      const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + (h * group + g) * p.q_stride[1];
      for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(src[d]) * scale;
    }
    // s[g * len + j]: score, then probability of slot j for query head g of the group.
    s.assign(group * len, acc_t(0));
    for (int64_t j0 = 0; j0 < len; j0 += BC) {
      const int64_t cols = std::min(BC, len - j0);
      for (int64_t j = 0; j < cols; ++j) {
        const T* k = c.k_row<T>(c.page_id(b, (j0 + j) / ps), (j0 + j) % ps, h);
        for (int64_t d = 0; d < D; ++d) kt[d * BC + j] = to_float(k[d]);
      }
      tile_gemm_acc<VB>(group, cols, D, qf.data(), 1, D, kt.data(), BC, s.data() + j0, len);
    }
    for (int64_t g = 0; g < group; ++g) {
      acc_t* sg = s.data() + g * len;
      const acc_t mx = len > 0 ? row_max(sg, len, sg[0]) : acc_t(0);
      for (int64_t j = 0; j < len; ++j) sg[j] = exp_fast(sg[j] - mx);
      const acc_t sum = row_sum(sg, len);
      inv_l[g] = len > 0 ? acc_t(1) / sum : acc_t(0);
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < len; j0 += BC) {
      const int64_t cols = std::min(BC, len - j0);
      for (int64_t j = 0; j < cols; ++j) {
        const T* v = c.v_row<T>(c.page_id(b, (j0 + j) / ps), (j0 + j) % ps, h);
        for (int64_t d = 0; d < D; ++d) vf[j * D + d] = to_float(v[d]);
      }
      tile_gemm_acc<VB>(group, D, cols, s.data() + j0, 1, len, vf.data(), D, acc.data(), D);
    }
    for (int64_t g = 0; g < group; ++g) {
      T* dst = static_cast<T*>(p.out) + b * p.o_stride[0] + (h * group + g) * p.o_stride[1];
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[g * D + d] * inv_l[g]);
    }
    if (p.scores) {
      float* dst = p.scores + b * p.scores_stride[0] + h * p.scores_stride[1];
      for (int64_t j = 0; j < p.scores_len; ++j) {
        acc_t mass = 0;
        if (j < len)
          for (int64_t g = 0; g < group; ++g) mass += s[g * len + j] * inv_l[g];
        dst[j * p.scores_stride[2]] = static_cast<float>(mass);
      }
    }
  }
}

template <typename T>
SHADOWKV_AVX2_FN void decode_items_avx2(const PagedDecodeParams& p, int64_t begin, int64_t end) {
  decode_items<T, detail::kAvx2VecBytes>(p, begin, end);
}

template <typename T>
SHADOWKV_AVX512_FN void decode_items_avx512(const PagedDecodeParams& p, int64_t begin, int64_t end) {
  decode_items<T, detail::kAvx512VecBytes>(p, begin, end);
}

template <typename T>
void decode_kernel(const PagedDecodeParams& p, const ParallelFor& pf) {
  [[maybe_unused]] const Isa isa = active_isa();  // unread in a build without variants (isa.h)
  const auto items =
      SHADOWKV_CPU_PICK(isa, (&decode_items<T, detail::kBaselineVecBytes>), &decode_items_avx2<T>,
                        &decode_items_avx512<T>);
  pf(p.cache.batch * p.cache.num_kv_heads, [&](int64_t begin, int64_t end) { items(p, begin, end); });
}

}  // namespace
}  // namespace shadowkv::cpu

namespace shadowkv {

void check_decode_tables(const PagedDecodeParams& p, const char* op) {
  const PagedKVCache& c = p.cache;
  check_paged_cache(c, op);  // public: seq_lens and page_size are read below
  std::vector<int64_t> used(c.batch), none(c.batch, 0);
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len = c.seq_len(b);
    if (p.scores && len > p.scores_len)
      throw std::invalid_argument(std::string(op) + ": `scores_out` has " + std::to_string(p.scores_len) +
                                  " slots (last dim) but `seq_lens`[" + std::to_string(b) +
                                  "] = " + std::to_string(len));
    used[b] = (len + c.page_size - 1) / c.page_size;
  }
  check_block_tables(c, used.data(), none.data(), none.data(), op);
}

void paged_decode_attention_cpu(const PagedDecodeParams& p, const ParallelFor& pf) {
  constexpr const char* op = "shadowkv::paged_decode_attention";
  auto fail = [](const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); };
  const PagedKVCache& c = p.cache;
  check_paged_cache(c, op);
  cpu::check_parallel_for(pf, op);
  if (p.num_q_heads < 0 || p.num_q_heads % c.num_kv_heads != 0)
    fail("the head count of `q` (" + std::to_string(p.num_q_heads) + ") must be a multiple of the KV head count (" +
         std::to_string(c.num_kv_heads) + ")");
  if (!valid_softmax_scale(p.scale)) fail("`scale` must be positive and finite, at most FLT_MAX / log2(e) (float32)");
  if (c.batch > 0 && p.num_q_heads > 0 && (!p.q || !p.out)) fail("null `q` or output pointer");
  if (p.scores && p.scores_len < 0) fail("negative `scores_out` length");
  check_written_layouts(p, op);
  check_decode_tables(p, op);
  cpu::dispatch_dtype(c.dtype, [&](auto tag) { cpu::decode_kernel<typename decltype(tag)::type>(p, pf); });
}

}  // namespace shadowkv
