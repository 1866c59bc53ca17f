// The kernels that finish paged_decode_attention.cu's decode after the partition kernels:
// decode_reduce_kernel (combines the partitions into out, and (M, 1 / L) for scores) and
// decode_scores_kernel (scores_out). Private to that translation unit (its anonymous
// namespace); in a header so that the host emulation of the C++ tests can run them.
#pragma once

#include "paged_decode_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kScoreThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_reduce_kernel(const DecodeLaunch a) {
  const PagedKVCache& c = a.p.cache;
  const int64_t Hq = a.p.num_q_heads, D = c.head_dim;
  const int64_t bq = blockIdx.x, b = bq / Hq, hq = bq % Hq;
  const int64_t len = usable_len(a, b);
  T* out = static_cast<T*>(a.p.out) + b * a.p.o_stride[0] + hq * a.p.o_stride[1];
  if (flagged(a, b, len)) {  // unchecked call, bad values: NaN
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[d] = from_f32<T>(NAN);
    // Block-uniform branch: every thread of the block has read bad[b] (flagged) before thread 0
    // writes it (ThreadSanitizer flags the race in the host emulation; harmless on a GPU).
    __syncthreads();
    if (threadIdx.x == 0) {
      if (a.stats) a.stats[bq] = make_float2(NAN, NAN);
      if (a.bad) a.bad[b] = 1;  // for decode_scores_kernel (every block of b writes the same value)
    }
    return;
  }
  const int parts = static_cast<int>((len + a.part_size - 1) / a.part_size);
  if (parts == 0) {  // no slot: out = 0
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[d] = from_f32<T>(0.0f);
    if (a.stats && threadIdx.x == 0) a.stats[bq] = make_float2(0.0f, 0.0f);
    return;
  }
  const float2* ml = a.part_ml + bq * a.num_parts;
  float m = -INFINITY;
  for (int p = 0; p < parts; ++p) m = fmaxf(m, ml[p].x);
  float l = 0.0f;
  for (int p = 0; p < parts; ++p) l += ml[p].y * expf(ml[p].x - m);
  const float inv_l = 1.0f / l;  // l >= 1: the maximal logit contributes exp(0)
  const float* acc = a.part_acc + bq * a.num_parts * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.0f;
    for (int p = 0; p < parts; ++p) o += acc[p * D + d] * expf(ml[p].x - m);
    out[d] = from_f32<T>(o * inv_l);
  }
  if (a.stats && threadIdx.x == 0) a.stats[bq] = make_float2(m, inv_l);
}

__global__ void __launch_bounds__(kScoreThreads) decode_scores_kernel(const DecodeLaunch a, int64_t chunks) {
  const PagedKVCache& c = a.p.cache;
  const int64_t Hq = a.p.num_q_heads;
  const int64_t chunk = blockIdx.x % chunks, bh = blockIdx.x / chunks;
  const int64_t h = bh % c.num_kv_heads, b = bh / c.num_kv_heads;
  const int64_t s = chunk * kScoreThreads + threadIdx.x;
  if (s >= a.p.scores_len) return;
  const int64_t len = usable_len(a, b);
  float mass = 0.0f;
  if (flagged(a, b, len)) {  // unchecked call, bad values
    mass = NAN;
  } else if (s < len) {
    for (int g = 0; g < a.group; ++g) {
      const int64_t bq = b * Hq + h * a.group + g;
      const float2 st = a.stats[bq];
      mass += expf(a.logits[bq * a.logits_len + s] - st.x) * st.y;
    }
  }
  a.p.scores[b * a.p.scores_stride[0] + h * a.p.scores_stride[1] + s * a.p.scores_stride[2]] = mass;
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
