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
//      Opt-in twins of this kernel (SHADOWKV_DECODE_KERNEL, requested_decode_kernel below), same
//      blocks and outputs: the pipelined one (paged_decode_pipelined.cuh: rows staged in shared
//      memory with cp.async) and the tensor-core one (paged_decode_mma.cuh: the same staging,
//      both products on mma.sync).
//   2. decode_reduce_kernel, one block per (sequence, query head): combines the partitions
//      (global max M, L = sum_p l_p e^(m_p - M), out = sum_p acc_p e^(m_p - M) / L), writes out
//      (zeros for a sequence without slots) and, with scores_out, (M, 1 / L).
//   3. decode_scores_kernel (scores_out only): scores[b, h, s] = sum over the group of
//      exp(logit - M) / L for s < seq_lens[b], 0 up to scores_len.
// Everything is accumulated in fp32 from inputs widened to fp32, like the CPU kernel (the mma
// kernel multiplies probabilities split into two 16-bit parts: ~16 significant bits).
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

#include "paged_decode_common.cuh"
#include "paged_decode_mma.cuh"
#include "paged_decode_pipelined.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kUnroll = 4;     // slots a warp loads before it uses them
constexpr int kMaxHeadDim = 256;
constexpr int kScoreThreads = 256;

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

// The staged kernels' launches (their kernels are in headers that a host-only emulation of
// them compiles too: tests/cpp/test_decode_emulated.cpp).
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

template <typename T, int D>
void launch_mma(const DecodeLaunch& a, int64_t blocks, cudaStream_t stream, const char* op) {
  const auto kernel = decode_partition_mma_kernel<T, D>;
  const size_t smem = mma_smem_bytes<T, D>(a.tile_heads, a.part_size);  // <= 71.3 KB
  if (smem > 48 * 1024) {  // the opt-in above 48 KB; per call, as it is per device
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute (decode_partition_mma_kernel)");
  }
  kernel<<<grid_1d(blocks, op), kThreads, smem, stream>>>(a);
  check_launch("decode_partition_mma_kernel");
}

enum class DecodeKernel { kWarp, kPipelined, kMma };

// SHADOWKV_DECODE_KERNEL, read at every call: "auto" (the default) and "warp" run
// decode_partition_kernel; "pipelined" runs decode_partition_pipelined_kernel and "mma"
// decode_partition_mma_kernel where they apply (bfloat16/float16, D = 64 or 128, 16-byte aligned
// rows; mma also needs sm_80+), else the warp kernel. The default stays "warp" until the others
// have passed the GPU tests and been measured.
DecodeKernel requested_decode_kernel(const char* op) {
  const char* env = std::getenv("SHADOWKV_DECODE_KERNEL");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto" || v == "warp") return DecodeKernel::kWarp;
  if (v == "pipelined") return DecodeKernel::kPipelined;
  if (v == "mma") return DecodeKernel::kMma;
  fail(op, "SHADOWKV_DECODE_KERNEL must be one of auto, warp, pipelined, mma; got '" + v + "'");
}

int device_cc_major() {
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  return major;
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
        if (kernel == DecodeKernel::kMma && rows_aligned(c, 8) && device_cc_major() >= 8) {
          if (D == 128) return launch_mma<T, 128>(a, blocks, stream, op);
          if (D == 64) return launch_mma<T, 64>(a, blocks, stream, op);
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
