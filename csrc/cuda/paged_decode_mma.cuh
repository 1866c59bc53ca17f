// The tensor-core partition kernel of paged_decode_attention.cu (SHADOWKV_DECODE_KERNEL=mma),
// private to that translation unit (its anonymous namespace). It has the blocks, the three steps,
// the staging (StagedBlock, RowRing) and the outputs of the pipelined kernel, for 16-bit K/V
// with D = 64 or 128, 16-byte aligned rows and sm_80+, but both products run on the tensor cores
// (mma.sync m16n8k16, fp32 accumulators; layouts in mma_sync.cuh). Why: the CUDA-core kernels
// spend about 4 FMAs and conversions per K/V element and query head of the group; at GQA groups
// of 4-8 that is close to all an SM can issue at HBM speed. Here a 16-slot x 8-head tile of
// logits costs D / 16 ldmatrix + D / 16 mma per warp, and the copies are most of what is left.
//
//   step a: S^T = K Q^T per chunk of 64 slots. Warp w takes slots 16w .. 16w + 15 as the M side
//           (A = K rows, ldmatrix from the staged rows); the tile's query heads (up to 8) are the
//           N side (B = Q^T, in registers for the whole partition, zeros for heads >= G). The
//           scaled logits go to s [G][part_size + 8] (fp32) and, with scores_out, to the global
//           logits buffer, as in the other kernels.
//   step b: partition_softmax.
//   step c: O^T = V^T P^T per chunk. Warp w takes D / 64 tiles of 16 head dims as the M side
//           (A = V^T, ldmatrix.trans of the staged V rows), the heads the N side (B = P^T from
//           s). P = exp(logit - m) in [0, 1] is split as P_hi + P_lo, both 16-bit (P rounded,
//           then the rounded remainder), in two mma: the products keep ~16 significant bits of
//           P where P_hi alone would keep bfloat16's 8, so the output stays as close to the fp32
//           reference as the kernels that multiply fp32 P. Each warp owns its dims: there is no
//           cross-warp sum, the accumulators are the partition's unnormalised output.
// kRowLoads (SHADOWKV_DECODE_KERNEL=mma_rows, opt-in until measured) changes only who copies
// what: each 256-byte row (D = 128) is copied by 16 lanes, a warp instruction moves two whole
// rows, instead of one thread per slot copying every second 16-byte piece of it (a warp
// instruction then touches 16 rows, 32 bytes each: four times the L2 requests per byte).
// Staged rows have a pitch of D + 8 elements, so the 8 row addresses of each ldmatrix fall in
// 8 different 16-byte bank groups. The logits' pitch part_size + 8 (part_size is a multiple of
// 128) keeps step c's float2 reads of s conflict-free (per half-warp: 4 heads x 4 slot pairs).
#pragma once

#include "mma_sync.cuh"
#include "paged_decode_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

namespace mmad {
constexpr int kChunk = 64;  // slots per stage
constexpr int kStages = 3;
constexpr int kTile = 16;   // the M side of an mma: slots in step a, head dims in step c
static_assert(kChunk == kWarps * kTile, "step a: one 16-slot tile per warp and chunk");
}  // namespace mmad

template <typename T, int D>
struct MmaShape {
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "16-bit K/V, D = 64 or 128");
  static constexpr int kRow = D + 8;                        // staged row pitch (elements)
  static constexpr int kSteps = D / 16;                     // step a: k-steps over the head dim
  static constexpr int kDimTiles = D / mmad::kTile / kWarps;  // step c: 16-dim tiles per warp (2 or 1)
};

template <typename T, int D, bool kRowLoads = false, int kStages = mmad::kStages>
using MmaRing = RowRing<T, D, mmad::kChunk, kStages, MmaShape<T, D>::kRow,
                        kRowLoads ? D / 8 : kThreads / mmad::kChunk>;  // loaders per slot: a row's pieces, or 2

// The row pitch of the logits in shared memory, in floats.
__host__ __device__ inline int mma_logit_pitch(int part_size) { return part_size + 8; }

// Dynamic shared memory of the mma kernel, in bytes: the stages, then the queries [tile_heads][D]
// (T), the logits [tile_heads][part_size + 8] (fp32), the page ids (int32).
template <typename T, int D, int kStages = mmad::kStages>
size_t mma_smem_bytes(int tile_heads, int part_size) {
  return MmaRing<T, D, false, kStages>::kBytes + sizeof(T) * static_cast<size_t>(tile_heads) * D +
         sizeof(float) * static_cast<size_t>(tile_heads) * mma_logit_pitch(part_size) +
         sizeof(int) * static_cast<size_t>(part_size + 1);
}

// kStages: the ring's depth (mmad::kStages; 2 in "mma_rows_2stage", whose ~17 KB less shared
// memory fits 4 blocks per SM instead of 3 at the benchmark's shape).
template <typename T, int D, bool kRowLoads = false, int kStages = mmad::kStages>
__global__ void __launch_bounds__(kThreads) decode_partition_mma_kernel(const DecodeLaunch a) {
  using S = MmaShape<T, D>;
  using namespace mmad;
  using cuda_common::ldmatrix_x4;
  using cuda_common::mma_16816;
  using cuda_common::pack2;
  const StagedBlock blk(a);
  if (!blk.active) return;
  const int k0 = blk.k0, n = blk.n, G = blk.G;
  const int64_t bq0 = blk.b * a.p.num_q_heads + blk.hq0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int fg = lane / 4, ft = lane % 4;  // fragment coordinates g, t (mma_sync.cuh)
  const int pitch = mma_logit_pitch(a.part_size);

  unsigned char* smem = reinterpret_cast<unsigned char*>(dynamic_smem());
  T* stages = reinterpret_cast<T*>(smem);
  T* qs = reinterpret_cast<T*>(smem + MmaRing<T, D, kRowLoads, kStages>::kBytes);                      // [G][D]
  float* s = reinterpret_cast<float*>(qs + static_cast<size_t>(a.tile_heads) * D);  // [G][pitch]
  int* pages = reinterpret_cast<int*>(s + static_cast<size_t>(a.tile_heads) * pitch);
  stage_pages_and_queries(a, blk, D, pages, qs);

  MmaRing<T, D, kRowLoads, kStages> ring(a, blk, stages, pages);
  const int chunks = ring.chunks;
  ring.prime();

  // Q^T as B fragments: qb[k] = (dims 16k + 2t, +1 | 16k + 8 + 2t, +1; head g), zeros for g >= G.
  uint32_t qb[S::kSteps][2];
#pragma unroll
  for (int k = 0; k < S::kSteps; ++k) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      qb[k][r] = fg < G ? *reinterpret_cast<const uint32_t*>(qs + fg * D + 16 * k + 8 * r + 2 * ft) : 0u;
    }
  }

  // a) logits. Lane i addresses row (slot) 16 warp + i % 16, dims 8 (i / 16) + 16k of the chunk:
  // ldmatrix matrices 0-3 are then the A fragment's (slots 0-7 | 8-15) x (dims 0-7 | 8-15).
  const int a_offset = (kTile * warp + lane % 16) * S::kRow + 8 * (lane / 16);
  for (int ch = 0; ch < chunks; ++ch) {
    const T* rows = ring.next(ch);
    // Two accumulators, even and odd k-steps: two chains of D / 32 dependent mma instead of one
    // of D / 16 (the kernel was latency-bound on the H200, a fixed-latency dependency its top
    // stall).
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int k = 0; k < S::kSteps; ++k) {
      uint32_t kf[4];
      ldmatrix_x4<false>(kf, rows + a_offset + 16 * k);
      mma_16816<T>(acc[k % 2], kf, qb[k]);
    }
    // acc[.][e]: slot 16 warp + g + 8 (e / 2), head 2t + e % 2.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int g = 2 * ft + e % 2;
      const int j = ch * kChunk + kTile * warp + fg + 8 * (e / 2);
      if (g < G && j < n) {
        const float x = (acc[0][e] + acc[1][e]) * a.scale;
        s[g * pitch + j] = x;
        if (a.logits) a.logits[(bq0 + g) * a.logits_len + k0 + j] = x;
      }
    }
  }
  __syncthreads();  // every logit is in s (V's first chunks are on their way)

  // b) partition softmax statistics.
  partition_softmax(a, s, pitch, G, n, bq0, blk.part);
  // (ring.next's barrier orders step b's writes of s before step c reads them.)

  // c) unnormalised partition output. Lane i addresses row (slot) 16kk + i % 8 + 8 (i / 16),
  // dims 8 ((i / 8) % 2) of each 16-dim tile: ldmatrix.trans matrices 0-3 are then the V^T A
  // fragment's (dims 0-7 | 8-15) x (slots 0-7 | 8-15).
  const int v_offset = (lane % 8 + 8 * (lane / 16)) * S::kRow + 8 * ((lane / 8) % 2) + kTile * S::kDimTiles * warp;
  const float* sg = s + fg * pitch;  // head g's probabilities (read only when g < G)
  // The P_hi and P_lo products in accumulators of their own (o and o_lo, summed at the end):
  // independent mma chains, as in step a.
  float o[S::kDimTiles][4], o_lo[S::kDimTiles][4];
#pragma unroll
  for (int i = 0; i < S::kDimTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      o[i][e] = 0.0f;
      o_lo[i][e] = 0.0f;
    }
  }
  for (int ch = 0; ch < chunks; ++ch) {
    const T* rows = ring.next(chunks + ch);
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      // P^T as B fragments (slots 16kk + 2t, +1 | 16kk + 8 + 2t, +1; head g), zeros past n and
      // for g >= G; ph = the rounded P, pl = the rounded remainder.
      uint32_t ph[2], pl[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int j = ch * kChunk + 16 * kk + 8 * r + 2 * ft;
        float2 p = make_float2(0.0f, 0.0f);
        if (fg < G) {
          if (j + 1 < n) {
            p = *reinterpret_cast<const float2*>(sg + j);
          } else if (j < n) {
            p.x = sg[j];
          }
        }
        float hx, hy, unused_x, unused_y;
        ph[r] = pack2<T>(p.x, p.y, hx, hy);
        pl[r] = pack2<T>(p.x - hx, p.y - hy, unused_x, unused_y);
      }
#pragma unroll
      for (int i = 0; i < S::kDimTiles; ++i) {
        uint32_t vf[4];
        ldmatrix_x4<true>(vf, rows + 16 * kk * S::kRow + v_offset + kTile * i);
        mma_16816<T>(o[i], vf, ph);
        mma_16816<T>(o_lo[i], vf, pl);
      }
    }
  }

  // o[i][e]: dim 16 (warp kDimTiles + i) + g + 8 (e / 2), head 2t + e % 2.
#pragma unroll
  for (int i = 0; i < S::kDimTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int g = 2 * ft + e % 2;
      const int d = kTile * (warp * S::kDimTiles + i) + fg + 8 * (e / 2);
      if (g < G) a.part_acc[((bq0 + g) * a.num_parts + blk.part) * D + d] = o[i][e] + o_lo[i][e];
    }
  }
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
