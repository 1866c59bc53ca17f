// The pipelined partition kernel of paged_decode_attention.cu (SHADOWKV_DECODE_KERNEL=pipelined),
// private to that translation unit (its anonymous namespace). It has the blocks, the three steps
// and the outputs of decode_partition_kernel, for 16-bit K/V with D = 64 or 128 and 16-byte
// aligned rows. What differs is how rows arrive. The warp kernel keeps 4 rows per warp in
// flight, each behind a dependent block-table load (12% of copy bandwidth on an H200 at B=64, 8k
// context, D=128). Here a block first stages its partition's page ids in shared memory, then
// streams K (step a) and V (step c) through a RowRing (paged_decode_common.cuh) of kStages
// chunks of kChunk rows: kStages - 1 chunks are in flight while one is used, V's first chunks
// behind K's last.
//   step a: 8 threads share a slot (each holds 16-byte pieces p = sub, sub + 8, ... of the row,
//           so the 8 threads of a shared-memory phase read one row's consecutive 128 bytes), 2
//           slots per thread per chunk; the queries are read from shared memory in their own
//           16-bit type (half the shared-memory traffic of fp32 copies, which would be most of
//           this step's), a 3-step shuffle sums each dot product, the scale comes last;
//   step c: as in the warp kernel (warps over slots, lanes over the head dim), from shared rows.
#pragma once

#include "paged_decode_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

namespace pipe {
constexpr int kChunk = 32;  // slots per stage
constexpr int kStages = 4;
constexpr int kLanesPerSlot = 8;  // step a: threads per slot
constexpr int kRowsPerPass = kThreads / kLanesPerSlot;  // step a: slots a block covers at once (16)
constexpr int kSlotsPerThread = kChunk / kRowsPerPass;  // 2
static_assert(kChunk % kRowsPerPass == 0 && kChunk % kWarps == 0 && kThreads % kChunk == 0, "chunk shape");
}  // namespace pipe

template <typename T, int D>
struct PipeShape {
  static constexpr int kElemsPer16B = 16 / static_cast<int>(sizeof(T));
  // A staged row is padded by 16 bytes so that consecutive rows start in other banks.
  static constexpr int kRow = D + kElemsPer16B;
  static constexpr int kPieces = D / kElemsPer16B;                  // 16-byte pieces per row
  static constexpr int kPiecesPerThread = kPieces / pipe::kLanesPerSlot;  // step a (2 or 1)
  static constexpr int kVec = D / 32;                               // step c: dims per lane
  static constexpr size_t kStageBytes = sizeof(T) * pipe::kStages * pipe::kChunk * kRow;
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "16-bit K/V, D = 64 or 128");
  static_assert(kPieces % pipe::kLanesPerSlot == 0 && pipe::kChunk * kPieces % kThreads == 0, "row shape");
  static_assert((sizeof(T) * kRow) % 16 == 0, "staged rows keep 16-byte alignment");
  // The cross-warp sums of step c reuse the stage buffers.
  static_assert(sizeof(float) * kWarps * kGroupTile * D <= kStageBytes, "reduction buffer fits");
};

template <typename T, int D>
using Ring = RowRing<T, D, pipe::kChunk, pipe::kStages, PipeShape<T, D>::kRow>;

// Dynamic shared memory of the pipelined kernel, in bytes: the stages, then the queries
// [tile_heads][D] (T), the logits [tile_heads][part_size] (fp32), the page ids (int32).
template <typename T, int D>
size_t pipelined_smem_bytes(int tile_heads, int part_size) {
  return PipeShape<T, D>::kStageBytes + sizeof(T) * static_cast<size_t>(tile_heads) * D +
         sizeof(float) * static_cast<size_t>(tile_heads) * part_size + sizeof(int) * static_cast<size_t>(part_size + 1);
}

// 4 blocks per SM is what shared memory allows at D = 128 anyway; without the bound ptxas spilled
// the float16 D = 128 instance at 80 registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4) decode_partition_pipelined_kernel(const DecodeLaunch a) {
  using S = PipeShape<T, D>;
  using namespace pipe;
  const int64_t Hq = a.p.num_q_heads;
  const StagedBlock blk(a);
  if (!blk.active) return;
  const int k0 = blk.k0, n = blk.n, G = blk.G, part = blk.part;
  const int64_t b = blk.b, hq0 = blk.hq0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  unsigned char* smem = reinterpret_cast<unsigned char*>(dynamic_smem());
  T* stages = reinterpret_cast<T*>(smem);
  T* qs = reinterpret_cast<T*>(smem + S::kStageBytes);                  // [G][D]
  float* s = reinterpret_cast<float*>(qs + static_cast<size_t>(a.tile_heads) * D);  // [G][part_size]
  int* pages = reinterpret_cast<int*>(s + static_cast<size_t>(a.tile_heads) * a.part_size);
  stage_pages_and_queries(a, blk, D, pages, qs);

  Ring<T, D> ring(a, blk, stages, pages);
  const int chunks = ring.chunks;
  ring.prime();

  // a) logits.
  const int sub = threadIdx.x % kLanesPerSlot, row0 = threadIdx.x / kLanesPerSlot;
  for (int ch = 0; ch < chunks; ++ch) {
    const T* tile_rows = ring.next(ch);
    float kf[kSlotsPerThread][S::kPiecesPerThread * S::kElemsPer16B];
#pragma unroll
    for (int u = 0; u < kSlotsPerThread; ++u) {
#pragma unroll
      for (int r = 0; r < S::kPiecesPerThread; ++r) {
        const int piece = sub + r * kLanesPerSlot;
        load_vec<T, S::kElemsPer16B>(tile_rows + (row0 + u * kRowsPerPass) * S::kRow + piece * S::kElemsPer16B,
                                     &kf[u][r * S::kElemsPer16B]);
      }
    }
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      if (g < G) {  // uniform across the block
        float dot[kSlotsPerThread];
#pragma unroll
        for (int u = 0; u < kSlotsPerThread; ++u) dot[u] = 0.0f;
#pragma unroll
        for (int r = 0; r < S::kPiecesPerThread; ++r) {
          float qf[S::kElemsPer16B];
          load_vec<T, S::kElemsPer16B>(qs + g * D + (sub + r * kLanesPerSlot) * S::kElemsPer16B, qf);
#pragma unroll
          for (int e = 0; e < S::kElemsPer16B; ++e) {
#pragma unroll
            for (int u = 0; u < kSlotsPerThread; ++u) dot[u] = fmaf(qf[e], kf[u][r * S::kElemsPer16B + e], dot[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kSlotsPerThread; ++u) {
#pragma unroll
          for (int o = kLanesPerSlot / 2; o > 0; o /= 2) dot[u] += __shfl_xor_sync(kFullMask, dot[u], o);
          dot[u] *= a.scale;
          const int j = ch * kChunk + row0 + u * kRowsPerPass;
          if (sub == 0 && j < n) {
            s[g * a.part_size + j] = dot[u];
            if (a.logits) a.logits[(b * Hq + hq0 + g) * a.logits_len + k0 + j] = dot[u];
          }
        }
      }
    }
  }
  __syncthreads();  // every logit is in s (V's first chunks are on their way)

  // b) partition softmax statistics.
  partition_softmax(a, s, a.part_size, G, n, b * Hq + hq0, part);
  // (next_chunk's barrier orders step b's writes of s before step c reads them.)

  // c) unnormalised partition output: warps over slots, lane l holds dims l * kVec ... + kVec.
  float acc[kGroupTile][S::kVec];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int v = 0; v < S::kVec; ++v) acc[g][v] = 0.0f;
  }
  for (int ch = 0; ch < chunks; ++ch) {
    const T* tile_rows = ring.next(chunks + ch);
#pragma unroll
    for (int r = 0; r < kChunk / kWarps; ++r) {
      const int jl = warp + r * kWarps;
      const int j = ch * kChunk + jl;
      if (j < n) {  // uniform across the warp
        float vf[S::kVec];
        load_vec<T, S::kVec>(tile_rows + jl * S::kRow + lane * S::kVec, vf);
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          if (g < G) {
            const float pj = s[g * a.part_size + j];
#pragma unroll
            for (int v = 0; v < S::kVec; ++v) acc[g][v] = fmaf(pj, vf[v], acc[g][v]);
          }
        }
      }
    }
  }
  cuda_common::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: they hold the cross-warp sums below

  float* red = reinterpret_cast<float*>(stages);  // [kWarps][G][D]
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    if (g < G) {
      float* dst = red + (warp * G + g) * D + lane * S::kVec;
      if constexpr (S::kVec == 4) {  // one 16-byte store: no bank conflicts
        *reinterpret_cast<float4*>(dst) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      } else {
        *reinterpret_cast<float2*>(dst) = make_float2(acc[g][0], acc[g][1]);
      }
    }
  }
  __syncthreads();
  store_partition_output(a, red, G, D, b * Hq + hq0, part);
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
