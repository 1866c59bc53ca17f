// The launch description and the device helpers shared by the partition kernels of
// paged_decode_attention.cu (the warp, pipelined and mma kernels): private to that one
// translation unit, so everything here lives in its anonymous namespace.
#pragma once

#include <cmath>
#include <cstring>

#include "cp_async.cuh"
#include "fast_divmod.cuh"
#include "paged_kv_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kGroupTile = 8;  // query heads per block
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

__device__ __forceinline__ float* dynamic_smem() {
#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
  return static_cast<float*>(shadowkv_emu::dynamic_shared_memory());  // tests/cpp/cuda_emulation.h
#else
  extern __shared__ __align__(16) float shadowkv_decode_smem[];
  return shadowkv_decode_smem;
#endif
}

// Step b of the partition kernels: for each of the block's G query heads (one warp each), turns
// its n logits in s[g * stride ...] into exp(logit - max) in place and stores the partition's
// (max, sum). `bq0` = b * Hq + the tile's first query head.
__device__ __forceinline__ void partition_softmax(const DecodeLaunch& a, float* s, int stride, int G, int n,
                                                  int64_t bq0, int part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < G; g += kWarps) {
    float* sg = s + g * stride;
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

// The end of step c of the warp and pipelined kernels: sums the warps' partial outputs red[w][g][d]
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


// Where a block of the staged kernels (pipelined, mma) works: blocks are (sequence b, KV head h,
// tile of up to kGroupTile query heads of h's group, partition), the partition fastest. Slots
// are < len <= INT32_MAX: 32-bit slot arithmetic. `active` is false for a partition that starts
// at or past the sequence's usable length (-1 when it is bad: decode_reduce_kernel reports it).
struct StagedBlock {
  int64_t b, h;
  int part;
  int k0;     // first slot of the partition
  int n;      // its slots, >= 1 when active
  int G;      // query heads of the tile
  int64_t hq0;  // the tile's first query head
  int first_page;  // the partition's pages: first_page ... first_page + num_pages - 1
  int num_pages;
  bool active;

  __device__ explicit StagedBlock(const DecodeLaunch& a) {
    int64_t bid = blockIdx.x;
    part = static_cast<int>(bid % a.num_parts);
    bid /= a.num_parts;
    const int tile = static_cast<int>(bid % a.group_tiles);
    bid /= a.group_tiles;
    h = bid % a.p.cache.num_kv_heads;
    b = bid / a.p.cache.num_kv_heads;
    const int64_t len = usable_len(a, b);
    k0 = part * a.part_size;
    active = k0 < len;
    n = active ? static_cast<int>(min(static_cast<int64_t>(a.part_size), len - k0)) : 0;
    const int g0 = tile * kGroupTile;
    G = min(kGroupTile, a.group - g0);
    hq0 = h * a.group + g0;
    first_page = k0 / a.page_size;
    num_pages = active ? (k0 + n - 1) / a.page_size - first_page + 1 : 0;
  }
};

// A staged block's prologue: the partition's page ids into `pages` (-1 and the sequence flagged
// where an unchecked call's table holds an id outside [0, num_pages); checked calls validated
// every id, all < num_pages <= INT32_MAX) and its G query rows into qs [G][D] (element by
// element: q rows need not be aligned), then a block barrier.
template <typename T>
__device__ __forceinline__ void stage_pages_and_queries(const DecodeLaunch& a, const StagedBlock& blk, int D,
                                                        int* pages, T* qs) {
  const PagedKVCache& c = a.p.cache;
  const int first_page = blk.first_page, num_pages = blk.num_pages;
  for (int i = threadIdx.x; i < num_pages; i += kThreads) {
    int64_t page = c.block_tables[blk.b * c.bt_stride[0] + static_cast<int64_t>(first_page + i) * c.bt_stride[1]];
    if (a.bad != nullptr && (page < 0 || page >= c.num_pages)) {
      atomicOr(a.bad + blk.b, 1);
      page = -1;
    }
    pages[i] = static_cast<int>(page);
  }
  for (int i = threadIdx.x; i < blk.G * D; i += kThreads) {
    const T* qg = static_cast<const T*>(a.p.q) + blk.b * a.p.q_stride[0] + (blk.hq0 + i / D) * a.p.q_stride[1];
    qs[i] = qg[i % D];
  }
  __syncthreads();
}

// Streams a staged block's K rows, then its V rows, through a ring of kStages shared-memory
// stages of kChunk rows (row pitch kRow elements) with 16-byte cp.async. Ring chunk t < chunks
// is K's chunk t and chunk t >= chunks is V's chunk t - chunks, in stage t % kStages: V's first
// chunks load while the last K chunks (and what follows them) are used, and the pipeline never
// drains in between. Rows past the partition's n slots and rows on a bad page (id -1 in `pages`)
// become zeros: their results are never stored, or the sequence's outputs are NaN.
//
// kLoaders threads share each slot: thread q of a slot copies its pieces q, q + kLoaders, ...
// (kCopies of them), so the slot's place (a FastDivmod, a shared-memory page id, two 64-bit
// multiply-adds) is paid once per slot and thread, not per 16-byte piece. (With a runtime `/`
// and `%` per piece the SASS spent ~90 instructions per piece, ~40% of the pipelined kernel's
// instructions, in a loop that has to keep up with HBM.) The default, kThreads / kChunk loaders,
// gives each thread one slot of the chunk (one pass); with kLoaders = the row's pieces, each
// warp instruction copies whole rows (32 lanes: two 256-byte rows at D = 128) instead of 32
// bytes of each of 16 rows, in kPasses passes of kThreads / kLoaders slots, a slot lookup per
// pass.
//
// Protocol: prime() once, then next(t) for t = 0, 1, ..., 2 * chunks - 1 in order, by every
// thread: it waits for chunk t (this thread's copies, then everyone's through the block barrier,
// which also tells that chunk t - 1 is used up), requests chunk t + kStages - 1 into chunk t - 1's
// stage and returns chunk t's rows. Every call commits one group, empty or not, so group t holds
// chunk t and nothing is in flight after the last call.
template <typename T, int D, int kChunk, int kStages, int kRow, int kLoaders = kThreads / kChunk>
struct RowRing {
  static constexpr int kElemsPer16B = 16 / static_cast<int>(sizeof(T));
  static constexpr int kPieces = D / kElemsPer16B;  // 16-byte pieces per row
  static constexpr int kSlotsPerPass = kThreads / kLoaders;
  static constexpr int kPasses = kChunk / kSlotsPerPass;
  static constexpr int kCopies = kPieces / kLoaders;  // cp.async per thread, slot and chunk
  static constexpr size_t kBytes = sizeof(T) * kStages * kChunk * kRow;
  static_assert(sizeof(T) == 2 && kThreads % kLoaders == 0 && kChunk % kSlotsPerPass == 0 && kPieces % kLoaders == 0,
                "16-bit rows; the passes cover the chunk's slots, a slot's loaders its pieces");
  static_assert(kRow >= D && (sizeof(T) * kRow) % 16 == 0, "staged rows keep 16-byte alignment");
  static_assert(kStages >= 2, "a ring");

  const DecodeLaunch& a;
  T* stages;
  const int* pages;  // the partition's page ids, from its first page on
  const T* k_head;   // this thread's first piece of (page 0, row 0, KV head h) in K and in V
  const T* v_head;
  T* dst0;           // this thread's first piece in stage 0
  int first_page, k0, n, chunks, load_slot;

  __device__ RowRing(const DecodeLaunch& a_, const StagedBlock& blk, T* stages_, const int* pages_)
      : a(a_), stages(stages_), pages(pages_) {
    const PagedKVCache& c = a.p.cache;
    load_slot = threadIdx.x / kLoaders;
    const int load_q = threadIdx.x % kLoaders;
    k_head = static_cast<const T*>(c.k_pages) + blk.h * c.k_stride[2] + load_q * kElemsPer16B;
    v_head = static_cast<const T*>(c.v_pages) + blk.h * c.v_stride[2] + load_q * kElemsPer16B;
    dst0 = stages + load_slot * kRow + load_q * kElemsPer16B;
    first_page = blk.first_page;
    k0 = blk.k0;
    n = blk.n;
    chunks = (n + kChunk - 1) / kChunk;
  }

  // Requests ring chunk t into its stage.
  __device__ __forceinline__ void issue(int t) const {
    const PagedKVCache& c = a.p.cache;
    const bool values = t >= chunks;
    const int ch = values ? t - chunks : t;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      T* dst = dst0 + (t % kStages) * kChunk * kRow + pass * kSlotsPerPass * kRow;
      // The slot within the partition (k0 + jj may pass INT32_MAX when jj >= n).
      const int jj = ch * kChunk + pass * kSlotsPerPass + load_slot;
      // A zero fill reads nothing, but cp.async still wants a valid, 16-byte aligned address: the
      // partition workspace's (never empty when a block runs; q need not be aligned, and an empty
      // page pool may have no address at all).
      const T* src = reinterpret_cast<const T*>(a.part_acc);
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
      for (int r = 0; r < kCopies; ++r) {
        const int step = ok ? r * kLoaders * kElemsPer16B : 0;  // a zero fill reads nothing
        cuda_common::cp_async_16(dst + r * kLoaders * kElemsPer16B, src + step, ok);
      }
    }
  }

  __device__ __forceinline__ void prime() const {
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < 2 * chunks) issue(t);
      cuda_common::cp_async_commit();
    }
  }

  __device__ __forceinline__ const T* next(int t) const {
    cuda_common::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < 2 * chunks) issue(t + kStages - 1);
    cuda_common::cp_async_commit();
    return stages + (t % kStages) * kChunk * kRow;
  }
};

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
