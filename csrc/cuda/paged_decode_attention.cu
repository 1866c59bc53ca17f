// CUDA decode attention over the paged KV cache (the twin of csrc/cpu/paged_decode_attention.cpp,
// same contract): one query token per sequence against all its cached slots, GQA, split-K.
//
// Kernels, all on the caller's stream:
//   1. decode_partition_kernel, one block per (sequence b, KV head h, tile of up to 8 query heads
//      of h's GQA group, partition of part_size consecutive slots). Blocks whose partition starts
//      at or past seq_lens[b] return at once. Each block
//        a) computes the scaled logits of its query heads for its slots into shared memory (and,
//           with scores_out, into a global logits buffer): each warp takes kUnroll slots at a
//           time (their K rows are loaded before any is used, to keep loads in flight), every
//           lane holds a slice of the head dim, a warp-sum gives each dot product;
//        b) turns them into exp(logit - partition max), one warp per query head, and stores the
//           partition's (max, sum of exp);
//        c) accumulates sum_j p_j * V_j per query head the same way (warps over slots, lanes over
//           the head dim), sums the warps' partial vectors through shared memory in a fixed order
//           and stores the unnormalised partition output.
//   2. decode_reduce_kernel, one block per (sequence, query head): combines the partitions
//      (global max M, L = sum_p l_p e^(m_p - M), out = sum_p acc_p e^(m_p - M) / L), writes out
//      (zeros for a sequence without slots) and, with scores_out, (M, 1 / L).
//   3. decode_scores_kernel (scores_out only): scores[b, h, s] = sum over the group of
//      exp(logit - M) / L for s < seq_lens[b], 0 up to scores_len.
// Everything is accumulated in fp32 from inputs widened to fp32, like the CPU kernel.
//
// Unchecked calls (check_values = false: no host copy, no synchronisation, graph-capturable)
// size the grid and workspaces for the block tables' capacity instead of the longest sequence,
// and check on the device: a block never reads a page id outside [0, num_pages) (it flags its
// sequence in `bad` instead), a sequence length outside [0, capacity] is never used, and the
// reduce and score kernels write NaN for flagged sequences.
//
// Lane layout of a head-dim slice: lane l owns dims (c * 32 + l) * VEC + v for c < NCH, v < VEC.
// Fast paths: D = 64 (VEC 2) and D = 128 (VEC 4), one vector load per lane and row, used when the
// page rows are aligned to VEC elements. Every other D <= 256 runs the generic layout (VEC 1,
// NCH 8, dims past D masked).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cp_async.cuh"
#include "fast_divmod.cuh"
#include "paged_kv_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kGroupTile = 8;  // query heads per block
constexpr int kUnroll = 4;     // slots a warp loads before it uses them
constexpr int kMaxHeadDim = 256;
constexpr int kScoreThreads = 256;
constexpr int kMaxPartSize = 512;  // slots per partition, at most (choose_part_size)

struct DecodeLaunch {
  PagedDecodeParams p;
  float scale;
  int group;        // query heads per KV head
  int group_tiles;  // ceil(group / kGroupTile)
  int tile_heads;   // min(group, kGroupTile): the most query heads of a block (shared-memory size)
  int part_size;    // slots per partition
  int num_parts;    // partitions per sequence in the grid (for the longest sequence)
  float* part_acc;  // [B, Hq, num_parts, D]: sum_j exp(logit_j - m) V_j over a partition
  float2* part_ml;  // [B, Hq, num_parts]: (m, sum_j exp(logit_j - m)), m = the partition's max
  float* logits;    // [B, Hq, logits_len]: scaled logits (scores_out only, else null)
  int64_t logits_len;
  float2* stats;  // [B, Hq]: (max, 1 / sum) over the whole sequence (scores_out only, else null)
  int* bad;          // [B], zeroed: sequences with bad values (unchecked calls only, else null)
  int64_t capacity;  // max_pages * page_size (capped at INT32_MAX): the longest valid sequence
  // The page size capped at INT32_MAX: every slot read is < seq_lens[b] <= INT32_MAX, so a larger
  // page acts the same. Computed on the host: deriving it in the kernel made the D = 128 path spill.
  int page_size;
  cuda_common::FastDivmod page_div;  // slot -> (page, row) without a divide (the pipelined kernel)
};

// The sequence length the kernels may use: seq_lens[b], or -1 in an unchecked call when it is
// outside [0, capacity] (or above scores_len when scores are written).
__device__ __forceinline__ int64_t usable_len(const DecodeLaunch& a, int64_t b) {
  const int64_t len = a.p.cache.seq_lens[b * a.p.cache.seq_lens_stride];
  if (a.bad != nullptr && (len < 0 || len > a.capacity || (a.p.scores != nullptr && len > a.p.scores_len))) return -1;
  return len;
}

// Unchecked calls: whether sequence b, whose usable_len is `len`, has bad values (its outputs
// are NaN). Read after decode_partition_kernel, which flags bad page ids.
__device__ __forceinline__ bool flagged(const DecodeLaunch& a, int64_t b, int64_t len) {
  return len < 0 || (a.bad != nullptr && a.bad[b] != 0);
}

// VEC consecutive elements of T, widened to float, read with one load of VEC * sizeof(T) bytes.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, float* dst) {
  if constexpr (VEC == 1) {
    dst[0] = to_f32(src[0]);
  } else {
    using W = typename Word<static_cast<int>(sizeof(T)) * VEC>::type;
    const W w = *reinterpret_cast<const W*>(src);
    T e[VEC];
    memcpy(e, &w, sizeof(w));
#pragma unroll
    for (int v = 0; v < VEC; ++v) dst[v] = to_f32(e[v]);
  }
}

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

__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ __align__(16) float shadowkv_decode_smem[];
  return shadowkv_decode_smem;
}

// Step b of both partition kernels: for each of the block's G query heads (one warp each),
// turns its n logits in s[g * part_size ...] into exp(logit - max) in place and stores the
// partition's (max, sum). `bq0` = b * Hq + the tile's first query head.
__device__ __forceinline__ void partition_softmax(const DecodeLaunch& a, float* s, int G, int n, int64_t bq0,
                                                  int part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < G; g += kWarps) {
    float* sg = s + g * a.part_size;
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, sg[j]);
    m = warp_max(m);
    float l = 0.0f;
    for (int j = lane; j < n; j += 32) {
      const float e = expf(sg[j] - m);
      sg[j] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) a.part_ml[(bq0 + g) * a.num_parts + part] = make_float2(m, l);
  }
}

// The end of step c of both partition kernels: sums the warps' partial outputs red[w][g][d]
// (in warp order) into the partition's unnormalised output.
__device__ __forceinline__ void store_partition_output(const DecodeLaunch& a, const float* red, int G, int D,
                                                       int64_t bq0, int part) {
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * G + g) * D + d];
    a.part_acc[((bq0 + g) * a.num_parts + part) * D + d] = sum;
  }
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
  partition_softmax(a, s, G, n, b * Hq + hq0, part);
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

// ------------------------------------------------------------------------------------------
// The pipelined partition kernel: the blocks, the three steps and the outputs of
// decode_partition_kernel, for 16-bit K/V with D = 64 or 128 and 16-byte aligned rows. What
// differs is how rows arrive. The warp kernel above keeps 4 rows per warp in flight, each behind
// a dependent block-table load (12% of copy bandwidth on an H200 at B=64, 8k context, D=128).
// Here a block first stages its partition's page ids in shared memory, then streams K (step a)
// and V (step c) through one ring of kStages shared-memory buffers of kChunk rows with 16-byte
// cp.async: kStages - 1 chunks are in flight while one is used, V's first chunks behind K's last.
//   step a: 8 threads share a slot (each holds 16-byte pieces p = sub, sub + 8, ... of the row,
//           so the 8 threads of a shared-memory phase read one row's consecutive 128 bytes), 2
//           slots per thread per chunk; the queries are read from shared memory in their own
//           16-bit type (half the shared-memory traffic of fp32 copies, which would be most of
//           this step's), a 3-step shuffle sums each dot product, the scale comes last;
//   step c: as in the warp kernel (warps over slots, lanes over the head dim), from shared rows.

namespace pipe {
constexpr int kChunk = 32;  // slots per stage
constexpr int kStages = 4;
constexpr int kLanesPerSlot = 8;  // step a: threads per slot
constexpr int kRowsPerPass = kThreads / kLanesPerSlot;  // step a: slots a block covers at once (16)
constexpr int kSlotsPerThread = kChunk / kRowsPerPass;  // 2
constexpr int kLoadersPerSlot = kThreads / kChunk;       // copies: threads per staged slot (4)
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
  static constexpr int kCopies = pipe::kChunk * kPieces / kThreads;  // cp.async per thread per chunk
  static_assert(kCopies * pipe::kLoadersPerSlot == kPieces, "a slot's loaders cover its pieces");
  static constexpr size_t kStageBytes = sizeof(T) * pipe::kStages * pipe::kChunk * kRow;
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "16-bit K/V, D = 64 or 128");
  static_assert(kPieces % pipe::kLanesPerSlot == 0 && pipe::kChunk * kPieces % kThreads == 0, "row shape");
  static_assert((sizeof(T) * kRow) % 16 == 0, "staged rows keep 16-byte alignment");
  // The cross-warp sums of step c reuse the stage buffers.
  static_assert(sizeof(float) * kWarps * kGroupTile * D <= kStageBytes, "reduction buffer fits");
};

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
  const PagedKVCache& c = a.p.cache;
  const int64_t Hq = a.p.num_q_heads;
  int64_t bid = blockIdx.x;
  const int part = static_cast<int>(bid % a.num_parts);
  bid /= a.num_parts;
  const int tile = static_cast<int>(bid % a.group_tiles);
  bid /= a.group_tiles;
  const int64_t h = bid % c.num_kv_heads, b = bid / c.num_kv_heads;

  const int64_t len = usable_len(a, b);  // -1: reported by decode_reduce_kernel
  // Slots are < len <= INT32_MAX: 32-bit slot arithmetic from here on.
  const int k0 = part * a.part_size;  // first slot of the partition
  if (k0 >= len) return;
  const int n = static_cast<int>(min(static_cast<int64_t>(a.part_size), len - k0));  // slots, >= 1
  const int g0 = tile * kGroupTile;
  const int G = min(kGroupTile, a.group - g0);
  const int64_t hq0 = h * a.group + g0;
  const int ps = a.page_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  unsigned char* smem = reinterpret_cast<unsigned char*>(dynamic_smem());
  T* stages = reinterpret_cast<T*>(smem);
  T* qs = reinterpret_cast<T*>(smem + S::kStageBytes);                  // [G][D]
  float* s = reinterpret_cast<float*>(qs + static_cast<size_t>(a.tile_heads) * D);  // [G][part_size]
  int* pages = reinterpret_cast<int*>(s + static_cast<size_t>(a.tile_heads) * a.part_size);

  // The partition's page ids (-1 and the sequence flagged where an unchecked call's table holds
  // an id outside [0, num_pages); checked calls validated every id, all < num_pages <= INT32_MAX)
  // and the queries.
  const int first_page = k0 / ps;
  const int num_pages = (k0 + n - 1) / ps - first_page + 1;
  for (int i = threadIdx.x; i < num_pages; i += kThreads) {
    int64_t page = c.block_tables[b * c.bt_stride[0] + static_cast<int64_t>(first_page + i) * c.bt_stride[1]];
    if (a.bad != nullptr && (page < 0 || page >= c.num_pages)) {
      atomicOr(a.bad + b, 1);
      page = -1;
    }
    pages[i] = static_cast<int>(page);
  }
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const T* qg = static_cast<const T*>(a.p.q) + b * a.p.q_stride[0] + (hq0 + i / D) * a.p.q_stride[1];
    qs[i] = qg[i % D];
  }
  __syncthreads();

  // K and V stream through one ring of stages: chunk t < chunks is K's chunk t, chunk t >= chunks
  // is V's chunk t - chunks, in stage t % kStages; so V's first chunks load during the last K
  // chunks and step b, and the pipeline never drains in between.
  const int chunks = (n + kChunk - 1) / kChunk;
  // Requests ring chunk t into its stage: rows past n and rows on a bad page become zeros (their
  // results are never stored, or the sequence's outputs are NaN). A thread copies kCopies pieces
  // of ONE slot of the chunk (kLoadersPerSlot threads per slot, pieces q, q + kLoadersPerSlot,
  // ..., so each copy instruction of a warp reads 64 contiguous bytes of 8 rows): the slot's
  // place (a FastDivmod, a shared-memory page id, two 64-bit multiply-adds) is paid once per
  // slot and thread, not once per 16-byte piece. Per piece the SASS spent ~90 instructions with
  // a runtime `/` and `%` per piece; the copies are ~40% of this kernel's instructions, in a loop
  // that has to keep up with HBM.
  const int load_slot = threadIdx.x / kLoadersPerSlot, load_q = threadIdx.x % kLoadersPerSlot;
  const T* k_head = static_cast<const T*>(c.k_pages) + h * c.k_stride[2] + load_q * S::kElemsPer16B;
  const T* v_head = static_cast<const T*>(c.v_pages) + h * c.v_stride[2] + load_q * S::kElemsPer16B;
  const auto issue = [&](int t) {
    const bool values = t >= chunks;
    const int ch = values ? t - chunks : t;
    T* dst = stages + (t % kStages) * kChunk * S::kRow + load_slot * S::kRow + load_q * S::kElemsPer16B;
    const int jj = ch * kChunk + load_slot;  // slot within the partition (k0 + jj may pass INT32_MAX when jj >= n)
    // A valid global address (q is never empty here), not read by a zero fill.
    const T* src = static_cast<const T*>(a.p.q);
    bool ok = jj < n;
    if (ok) {
      const uint32_t slot = static_cast<uint32_t>(k0 + jj);  // < len <= INT32_MAX
      const uint32_t page_index = a.page_div.div(slot);
      const int page = pages[page_index - first_page];
      ok = page >= 0;
      if (ok) {
        const int64_t row = a.page_div.mod(slot, page_index);
        src = values ? v_head + page * c.v_stride[0] + row * c.v_stride[1]
                     : k_head + page * c.k_stride[0] + row * c.k_stride[1];
      }
    }
#pragma unroll
    for (int r = 0; r < S::kCopies; ++r) {
      const int step = ok ? r * kLoadersPerSlot * S::kElemsPer16B : 0;  // a zero fill reads nothing
      cuda_common::cp_async_16(dst + r * kLoadersPerSlot * S::kElemsPer16B, src + step, ok);
    }
  };
  // Waits for ring chunk t (this thread's copies, then everyone's through the barrier, which also
  // tells that chunk t - 1 is used up) and requests chunk t + kStages - 1 into t - 1's stage.
  // Every call commits one group, empty or not, so group t holds chunk t.
  const auto next_chunk = [&](int t) {
    cuda_common::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < 2 * chunks) issue(t + kStages - 1);
    cuda_common::cp_async_commit();
    return stages + (t % kStages) * kChunk * S::kRow;
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < 2 * chunks) issue(t);
    cuda_common::cp_async_commit();
  }

  // a) logits.
  const int sub = threadIdx.x % kLanesPerSlot, row0 = threadIdx.x / kLanesPerSlot;
  for (int ch = 0; ch < chunks; ++ch) {
    const T* tile_rows = next_chunk(ch);
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
  partition_softmax(a, s, G, n, b * Hq + hq0, part);
  // (next_chunk's barrier orders step b's writes of s before step c reads them.)

  // c) unnormalised partition output: warps over slots, lane l holds dims l * kVec ... + kVec.
  float acc[kGroupTile][S::kVec];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int v = 0; v < S::kVec; ++v) acc[g][v] = 0.0f;
  }
  for (int ch = 0; ch < chunks; ++ch) {
    const T* tile_rows = next_chunk(chunks + ch);
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

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_reduce_kernel(const DecodeLaunch a) {
  const PagedKVCache& c = a.p.cache;
  const int64_t Hq = a.p.num_q_heads, D = c.head_dim;
  const int64_t bq = blockIdx.x, b = bq / Hq, hq = bq % Hq;
  const int64_t len = usable_len(a, b);
  T* out = static_cast<T*>(a.p.out) + b * a.p.o_stride[0] + hq * a.p.o_stride[1];
  if (flagged(a, b, len)) {  // unchecked call, bad values: NaN
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[d] = from_f32<T>(NAN);
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

template <typename T, int VEC, int NCH>
void launch_partitions(const DecodeLaunch& a, int64_t blocks, size_t smem, cudaStream_t stream, const char* op) {
  // At most max(8 x 512, 4 x 8 x 256) floats = 32 KB: no opt-in above 48 KB is needed.
  decode_partition_kernel<T, VEC, NCH><<<grid_1d(blocks, op), kThreads, smem, stream>>>(a);
  check_launch("decode_partition_kernel");
}

// Slots per partition: 512, halved (down to 128) while the grid would not fill the GPU twice.
int choose_part_size(int64_t heads_x_tiles, int64_t max_len) {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  int part = kMaxPartSize;
  while (part > 128 && heads_x_tiles * ceil_div(max_len, part) < 2 * static_cast<int64_t>(sms)) part /= 2;
  return part;
}

template <typename T, int D>
void launch_pipelined(const DecodeLaunch& a, int64_t blocks, cudaStream_t stream, const char* op) {
  const auto kernel = decode_partition_pipelined_kernel<T, D>;
  const size_t smem = pipelined_smem_bytes<T, D>(a.tile_heads, a.part_size);  // <= 55.3 KB
  if (smem > 48 * 1024) {  // the opt-in above 48 KB; per call, as it is per device
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute (decode_partition_pipelined_kernel)");
  }
  kernel<<<grid_1d(blocks, op), kThreads, smem, stream>>>(a);
  check_launch("decode_partition_pipelined_kernel");
}

enum class DecodeKernel { kWarp, kPipelined };

// SHADOWKV_DECODE_KERNEL, read at every call: "auto" (the default) and "warp" run
// decode_partition_kernel; "pipelined" runs decode_partition_pipelined_kernel where it applies
// (bfloat16/float16, D = 64 or 128, 16-byte aligned rows), else the warp kernel. The default
// stays "warp" until the pipelined kernel has passed the GPU tests and been measured.
DecodeKernel requested_decode_kernel(const char* op) {
  const char* env = std::getenv("SHADOWKV_DECODE_KERNEL");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto" || v == "warp") return DecodeKernel::kWarp;
  if (v == "pipelined") return DecodeKernel::kPipelined;
  fail(op, "SHADOWKV_DECODE_KERNEL must be one of auto, warp, pipelined; got '" + v + "'");
}

bool rows_aligned(const PagedKVCache& c, int64_t vec) {
  const uint64_t bytes = static_cast<uint64_t>(vec) * dtype_bytes(c.dtype);
  const auto aligned = [bytes](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  bool ok = aligned(c.k_pages) && aligned(c.v_pages);
  for (int i = 0; i < 3; ++i) ok = ok && c.k_stride[i] % vec == 0 && c.v_stride[i] % vec == 0;
  return ok;
}

}  // namespace
}  // namespace cuda_paged

void paged_decode_attention_cuda(const PagedDecodeParams& p, void* stream_ptr) {
  using namespace cuda_paged;
  constexpr const char* op = "shadowkv::paged_decode_attention";
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const PagedKVCache& c = p.cache;

  // The checks of paged_decode_attention_cpu, in its order; values are read from host copies.
  check_cache_params(c, op);
  if (p.num_q_heads < 0 || p.num_q_heads % c.num_kv_heads != 0)
    fail(op, "the head count of `q` (" + std::to_string(p.num_q_heads) +
                 ") must be a multiple of the KV head count (" + std::to_string(c.num_kv_heads) + ")");
  if (!valid_softmax_scale(p.scale)) fail(op, "`scale` must be positive and finite, at most FLT_MAX (float32)");
  if (c.batch > 0 && p.num_q_heads > 0 && (!p.q || !p.out)) fail(op, "null `q` or output pointer");
  if (p.scores && p.scores_len < 0) fail(op, "negative `scores_out` length");
  if (c.dtype == DType::kFloat64)
    fail(op, "`q` float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA");
  if (c.head_dim > kMaxHeadDim)
    fail(op, "the head dim of `k_pages` must be <= 256 on CUDA, got " + std::to_string(c.head_dim));
  const DecodeKernel kernel = requested_decode_kernel(op);

  const int64_t B = c.batch, Hkv = c.num_kv_heads, Hq = p.num_q_heads, D = c.head_dim;
  // The longest sequence (checked call), or the longest any block table can hold (unchecked).
  const int64_t capacity = c.slot_capacity();
  // Unchecked calls with scores reject lengths above scores_len: size for that when smaller.
  int64_t max_len = p.scores ? std::min(capacity, std::max<int64_t>(p.scores_len, 0)) : capacity;
  if (p.check_values) {
    IndexStager stager;
    CacheStage cache_stage;
    cache_stage.add(stager, c);
    stager.copy_to_host(stream);
    const PagedKVCache hc = cache_stage.host_view(stager, c);
    check_paged_cache(hc, op);
    std::vector<int64_t> used(B), none(B, 0);
    max_len = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = hc.seq_len(b);
      if (p.scores && len > p.scores_len)
        fail(op, "`scores_out` has " + std::to_string(p.scores_len) + " slots (last dim) but `seq_lens`[" +
                     std::to_string(b) + "] = " + std::to_string(len));
      used[b] = (len + c.page_size - 1) / c.page_size;
      max_len = std::max(max_len, len);
    }
    check_block_tables(hc, used.data(), none.data(), none.data(), op);
  }
  if (B == 0) return;

  DecodeLaunch a;
  a.p = p;
  a.scale = static_cast<float>(p.scale);
  a.group = static_cast<int>(Hq / Hkv);
  a.group_tiles = static_cast<int>(ceil_div(a.group, kGroupTile));
  a.tile_heads = std::min(a.group, kGroupTile);
  a.part_size = choose_part_size(B * Hkv * a.group_tiles, max_len);
  a.num_parts = static_cast<int>(ceil_div(max_len, a.part_size));
  const bool with_scores = p.scores != nullptr && p.scores_len > 0;
  a.logits_len = with_scores ? max_len : 0;

  Carver carve;
  const size_t acc_off = carve.take<float>(B * Hq * a.num_parts * D);
  const size_t ml_off = carve.take<float2>(B * Hq * a.num_parts);
  const size_t logits_off = carve.take<float>(B * Hq * a.logits_len);
  const size_t stats_off = carve.take<float2>(with_scores ? B * Hq : 0);
  const size_t bad_off = carve.take<int>(p.check_values ? 0 : B);
  DeviceBuffer work(carve.bytes, stream);
  a.part_acc = reinterpret_cast<float*>(work.bytes() + acc_off);
  a.part_ml = reinterpret_cast<float2*>(work.bytes() + ml_off);
  a.logits = with_scores ? reinterpret_cast<float*>(work.bytes() + logits_off) : nullptr;
  a.stats = with_scores ? reinterpret_cast<float2*>(work.bytes() + stats_off) : nullptr;
  a.capacity = capacity;
  a.page_size = static_cast<int>(std::min<int64_t>(c.page_size, INT32_MAX));
  a.page_div = cuda_common::FastDivmod(static_cast<uint32_t>(a.page_size));
  a.bad = nullptr;
  if (!p.check_values) {
    a.bad = reinterpret_cast<int*>(work.bytes() + bad_off);
    check_cuda(cudaMemsetAsync(a.bad, 0, static_cast<size_t>(B) * sizeof(int), stream), "cudaMemsetAsync (flags)");
  }

  if (Hq > 0 && max_len > 0) {
    const int64_t blocks = B * Hkv * a.group_tiles * a.num_parts;
    const size_t smem = sizeof(float) * static_cast<size_t>(std::max<int64_t>(
                                            int64_t{a.tile_heads} * a.part_size, int64_t{kWarps} * a.tile_heads * D));
    const auto run = [&](auto tag) {
      using T = typename decltype(tag)::type;
      if constexpr (sizeof(T) == 2) {
        if (kernel == DecodeKernel::kPipelined && rows_aligned(c, 8)) {
          if (D == 128) return launch_pipelined<T, 128>(a, blocks, stream, op);
          if (D == 64) return launch_pipelined<T, 64>(a, blocks, stream, op);
        }
      }
      if (D == 128 && rows_aligned(c, 4)) return launch_partitions<T, 4, 1>(a, blocks, smem, stream, op);
      if (D == 64 && rows_aligned(c, 2)) return launch_partitions<T, 2, 1>(a, blocks, smem, stream, op);
      launch_partitions<T, 1, kMaxHeadDim / 32>(a, blocks, smem, stream, op);
    };
    switch (c.dtype) {
      case DType::kFloat32: run(std::common_type<float>{}); break;
      case DType::kBFloat16: run(std::common_type<__nv_bfloat16>{}); break;
      default: run(std::common_type<__half>{}); break;
    }
  }
  if (Hq > 0) {
    const unsigned blocks = grid_1d(B * Hq, op);
    switch (c.dtype) {
      case DType::kFloat32: decode_reduce_kernel<float><<<blocks, kThreads, 0, stream>>>(a); break;
      case DType::kBFloat16: decode_reduce_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(a); break;
      default: decode_reduce_kernel<__half><<<blocks, kThreads, 0, stream>>>(a); break;
    }
    check_launch("decode_reduce_kernel");
  }
  if (with_scores && Hkv > 0) {
    const int64_t chunks = ceil_div(p.scores_len, kScoreThreads);
    decode_scores_kernel<<<grid_1d(B * Hkv * chunks, op), kScoreThreads, 0, stream>>>(a, chunks);
    check_launch("decode_scores_kernel");
  }
}

}  // namespace shadowkv
