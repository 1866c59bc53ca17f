// The warp partition kernel of paged_decode_attention.cu (decode_partition_kernel, the default;
// the file comment there describes its steps), private to that translation unit (its anonymous
// namespace); in a header so that the host emulation of the C++ tests can run it.
//
// Lane layout of a head-dim slice: lane l owns dims (c * 32 + l) * VEC + v for c < NCH, v < VEC.
// Fast paths: D = 64 (VEC 2) and D = 128 (VEC 4), one vector load per lane and row, used when the
// page rows are aligned to VEC elements. Every other D <= 256 runs the generic layout (VEC 1,
// NCH 8, dims past D masked).
#pragma once

#include "paged_decode_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kUnroll = 4;  // slots a warp loads before it uses them

// A lane's slice of a row of D elements (see the lane layout above); zeros past D.
template <typename T, int VEC, int NCH>
__device__ __forceinline__ void load_slice(const T* __restrict__ row, int lane, int D, float (&x)[VEC * NCH]) {
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int d0 = (c * 32 + lane) * VEC;
    if (VEC > 1 || d0 < D) {  // the fast paths have D == 32 * VEC * NCH
      load_vec<T, VEC>(row + d0, &x[c * VEC]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[c * VEC + v] = 0.0f;
    }
  }
}

template <typename T>
__device__ __forceinline__ const T* k_row(const PagedKVCache& c, int64_t page, int64_t row, int64_t h) {
  return static_cast<const T*>(c.k_pages) + page * c.k_stride[0] + row * c.k_stride[1] + h * c.k_stride[2];
}

template <typename T>
__device__ __forceinline__ const T* v_row(const PagedKVCache& c, int64_t page, int64_t row, int64_t h) {
  return static_cast<const T*>(c.v_pages) + page * c.v_stride[0] + row * c.v_stride[1] + h * c.v_stride[2];
}

// page_of with 32-bit slot arithmetic (slot < seq_lens[b] <= INT32_MAX, page_size <= INT32_MAX).
__device__ __forceinline__ int64_t page_of32(const PagedKVCache& c, int64_t b, int slot, int ps) {
  return c.block_tables[b * c.bt_stride[0] + (slot / ps) * c.bt_stride[1]];
}

// The page holding `slot` of sequence b; in an unchecked call -1 (and b flagged) when the block
// table holds an id outside [0, num_pages) there. Checked calls have validated every id.
__device__ __forceinline__ int64_t checked_page(const DecodeLaunch& a, int64_t b, int slot, int ps) {
  const int64_t page = page_of32(a.p.cache, b, slot, ps);
  if (a.bad != nullptr && (page < 0 || page >= a.p.cache.num_pages)) {
    atomicOr(a.bad + b, 1);
    return -1;
  }
  return page;
}

// A lane's slice of the K (kV = false) or V row of `slot` of sequence b, KV head h; zeros when
// an unchecked call's block table holds a bad page id there (checked_page flags b).
template <typename T, int VEC, int NCH, bool kV>
__device__ __forceinline__ void load_slot(const DecodeLaunch& a, int64_t b, int slot, int ps, int64_t h, int lane,
                                          int D, float (&x)[VEC * NCH]) {
  const int64_t page = checked_page(a, b, slot, ps);
  if (page < 0) {
#pragma unroll
    for (int i = 0; i < VEC * NCH; ++i) x[i] = 0.0f;
    return;
  }
  const PagedKVCache& c = a.p.cache;
  load_slice<T, VEC, NCH>(kV ? v_row<T>(c, page, slot % ps, h) : k_row<T>(c, page, slot % ps, h), lane, D, x);
}

template <typename T, int VEC, int NCH>
__global__ void __launch_bounds__(kThreads) decode_partition_kernel(const DecodeLaunch a) {
  constexpr int kDims = VEC * NCH;  // head dims per lane
  const PagedKVCache& c = a.p.cache;
  const int64_t Hq = a.p.num_q_heads;
  int64_t bid = blockIdx.x;
  const int part = static_cast<int>(bid % a.num_parts);
  bid /= a.num_parts;
  const int tile = static_cast<int>(bid % a.group_tiles);
  bid /= a.group_tiles;
  const int64_t h = bid % c.num_kv_heads, b = bid / c.num_kv_heads;

  const int64_t len = usable_len(a, b);  // -1: reported by decode_reduce_kernel
  const int64_t k0 = static_cast<int64_t>(part) * a.part_size;  // first slot of the partition
  if (k0 >= len) return;
  const int n = static_cast<int>(min(static_cast<int64_t>(a.part_size), len - k0));  // slots, >= 1
  const int g0 = tile * kGroupTile;          // first query head of the tile within the group
  const int G = min(kGroupTile, a.group - g0);
  const int64_t hq0 = h * a.group + g0;  // its query head index
  const int D = static_cast<int>(c.head_dim);
  const int ps = a.page_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s = dynamic_smem();  // [G][part_size]: logits, then exp(logit - m)

  // a) logits.
  float q[kGroupTile][kDims];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    if (g < G) {  // element by element: q rows need not be aligned for vector loads
      const T* qg = static_cast<const T*>(a.p.q) + b * a.p.q_stride[0] + (hq0 + g) * a.p.q_stride[1];
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int d = (i / VEC * 32 + lane) * VEC + i % VEC;
        q[g][i] = d < D ? to_f32(qg[d]) * a.scale : 0.0f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kDims; ++i) q[g][i] = 0.0f;
    }
  }
  for (int j0 = warp * kUnroll; j0 < n; j0 += kWarps * kUnroll) {
    float kr[kUnroll][kDims];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      if (j < n) {
        load_slot<T, VEC, NCH, false>(a, b, static_cast<int>(k0) + j, ps, h, lane, D, kr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      if (j >= n) break;  // uniform across the warp
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        if (g < G) {
          float dot = 0.0f;
#pragma unroll
          for (int i = 0; i < kDims; ++i) dot = fmaf(q[g][i], kr[u][i], dot);
          dot = warp_sum(dot);
          if (lane == 0) {
            s[g * a.part_size + j] = dot;
            if (a.logits) a.logits[(b * Hq + hq0 + g) * a.logits_len + k0 + j] = dot;
          }
        }
      }
    }
  }
  __syncthreads();

  // b) partition softmax statistics.
  partition_softmax(a, s, a.part_size, G, n, b * Hq + hq0, part);
  __syncthreads();

  // c) unnormalised partition output.
  float acc[kGroupTile][kDims];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[g][i] = 0.0f;
  }
  for (int j0 = warp * kUnroll; j0 < n; j0 += kWarps * kUnroll) {
    float vr[kUnroll][kDims];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      if (j < n) {
        load_slot<T, VEC, NCH, true>(a, b, static_cast<int>(k0) + j, ps, h, lane, D, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      if (j >= n) break;
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        if (g < G) {
          const float pj = s[g * a.part_size + j];
#pragma unroll
          for (int i = 0; i < kDims; ++i) acc[g][i] = fmaf(pj, vr[u][i], acc[g][i]);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the probabilities: the buffer is reused below

  float* red = s;  // [kWarps][G][D]
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    if (g < G) {
#pragma unroll
      for (int ch = 0; ch < NCH; ++ch) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int d = (ch * 32 + lane) * VEC + v;
          if (d < D) red[(warp * G + g) * D + d] = acc[g][ch * VEC + v];
        }
      }
    }
  }
  __syncthreads();
  store_partition_output(a, red, G, D, b * Hq + hq0, part);
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
