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
//      (paged_decode_warp.cuh). Twins of this kernel (SHADOWKV_DECODE_KERNEL,
//      requested_decode_kernel below), same blocks and outputs: the pipelined one
//      (paged_decode_pipelined.cuh: rows staged in shared memory with cp.async) and the
//      tensor-core one (paged_decode_mma.cuh: the same staging, both products on mma.sync),
//      the default where it applies; the warp kernel runs everything else.
//   2. decode_reduce_kernel (paged_decode_reduce.cuh, as 3), one block per (sequence, query
//      head): combines the partitions
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
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "paged_decode_check.cuh"
#include "paged_decode_common.cuh"
#include "paged_decode_mma.cuh"
#include "paged_decode_pipelined.cuh"
#include "paged_decode_reduce.cuh"
#include "paged_decode_warp.cuh"
#include "smem_optin.cuh"

#include "../core/kernel_choice.h"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kMaxHeadDim = 256;

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
// them compiles too: tests/cpp/test_decode_emulated.cpp), with `smem` bytes of dynamic shared
// memory: the opt-in above 48 KB grows to the largest size a call has needed on the device
// (cuda_common::opt_in_smem), and a GPU with less gets an error that names the smaller kernel
// to choose.
template <class Kernel>
void launch_staged(Kernel kernel, size_t smem, const DecodeLaunch& a, int64_t blocks, cudaStream_t stream,
                   const char* op, const char* name) {
  cuda_common::opt_in_smem(kernel, smem, op, name,
                           "SHADOWKV_DECODE_KERNEL=warp runs the kernel without staging");
  kernel<<<grid_1d(blocks, op), kThreads, smem, stream>>>(a);
  check_launch(name);
}

template <typename T, int D>
void launch_pipelined(const DecodeLaunch& a, int64_t blocks, cudaStream_t stream, const char* op) {
  launch_staged(decode_partition_pipelined_kernel<T, D>, pipelined_smem_bytes<T, D>(a.tile_heads, a.part_size), a,
                blocks, stream, op, "decode_partition_pipelined_kernel");  // <= 55.3 KB
}

// The mma kernel for head dim D (64 or 128; false, launching nothing, for any other).
template <typename T, bool kRowLoads, int kStages = mmad::kStages>
bool launch_mma(int64_t D, const DecodeLaunch& a, int64_t blocks, cudaStream_t stream, const char* op) {
  const auto launch = [&](auto d) {
    constexpr int kD = decltype(d)::value;
    launch_staged(decode_partition_mma_kernel<T, kD, kRowLoads, kStages>,
                  mma_smem_bytes<T, kD, kStages>(a.tile_heads, a.part_size), a, blocks, stream, op,
                  "decode_partition_mma_kernel");  // <= 71.3 KB (3 stages), 54.3 KB (2)
    return true;
  };
  if (D == 128) return launch(std::integral_constant<int, 128>{});
  if (D == 64) return launch(std::integral_constant<int, 64>{});
  return false;
}

enum class DecodeKernel { kWarp, kPipelined, kMma, kMmaRows, kMmaRows2Stage };

// SHADOWKV_DECODE_KERNEL, read at every call: "warp" runs decode_partition_kernel; "pipelined"
// runs decode_partition_pipelined_kernel, "mma" decode_partition_mma_kernel and "mma_rows" or
// "auto" (the default) the same kernel with whole-row copies (paged_decode_mma.cuh), each where it
// applies (bfloat16/float16, D = 64 or 128, 16-byte aligned rows; mma also needs sm_80+), else the
// warp kernel. mma_rows is the default since it passed the GPU tests and compute-sanitizer memcheck
// on an H200 and was the fastest kernel at every shape measured there (bench/RESULTS.md,
// 2026-11-27: 0.66 vs 0.83 ms for mma at B=64, ctx 8k, D=128, unchecked; also at 8 x 32k and at
// head dim 64 with GQA groups of 8). "mma_rows_2stage" is mma_rows with two ring stages instead
// of three: Nsight Compute found mma_rows latency-bound at 3 blocks (12 warps) per SM, a limit
// set by shared memory; two stages fit 4. Opt-in until a GPU has timed it.
DecodeKernel requested_decode_kernel(const char* op) {
  const std::string v = core::kernel_choice("SHADOWKV_DECODE_KERNEL");  // an override, else the environment
  if (v == "warp") return DecodeKernel::kWarp;
  if (v == "pipelined") return DecodeKernel::kPipelined;
  if (v == "mma") return DecodeKernel::kMma;
  if (v.empty() || v == "auto" || v == "mma_rows") return DecodeKernel::kMmaRows;
  if (v == "mma_rows_2stage") return DecodeKernel::kMmaRows2Stage;
  fail(op, "SHADOWKV_DECODE_KERNEL must be one of auto, warp, pipelined, mma, mma_rows, mma_rows_2stage; got '" + v +
               "'");
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

// The checks of paged_decode_attention_cpu on values, in its order, on host copies of seq_lens
// and the block tables: raises on the first bad value. Only run after decode_check_kernel found
// one (the copies cost more than the decode kernels' own host work).
void check_values_on_host(const PagedDecodeParams& p, cudaStream_t stream, const char* op) {
  const PagedKVCache& c = p.cache;
  IndexStager stager;
  CacheStage cache_stage;
  cache_stage.add(stager, c);
  stager.copy_to_host(stream);
  PagedDecodeParams hp = p;
  hp.cache = cache_stage.host_view(stager, c);
  check_paged_cache(hp.cache, op);
  check_decode_tables(hp, op);
}

}  // namespace
}  // namespace cuda_paged

void paged_decode_attention_cuda(const PagedDecodeParams& p, void* stream_ptr) {
  using namespace cuda_paged;
  constexpr const char* op = "shadowkv::paged_decode_attention";
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const PagedKVCache& c = p.cache;

  // The checks of paged_decode_attention_cpu, in its order: the params' here, the values' on the
  // device (checked calls; their host copies only to word an error).
  check_cache_params(c, op);
  if (p.num_q_heads < 0 || p.num_q_heads % c.num_kv_heads != 0)
    fail(op, "the head count of `q` (" + std::to_string(p.num_q_heads) +
                 ") must be a multiple of the KV head count (" + std::to_string(c.num_kv_heads) + ")");
  if (!valid_softmax_scale(p.scale)) fail(op, "`scale` must be positive and finite, at most FLT_MAX / log2(e) (float32)");
  if (c.batch > 0 && p.num_q_heads > 0 && (!p.q || !p.out)) fail(op, "null `q` or output pointer");
  if (p.scores && p.scores_len < 0) fail(op, "negative `scores_out` length");
  check_written_layouts(p, op);
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
  if (p.check_values && B > 0) {
    // The verdict and the longest sequence from the device (paged_decode_check.cuh); the host
    // check, with its messages, only when the verdict is bad.
    int result[2] = {0, 0};
    {
      DeviceWorkspace dev(sizeof(result), stream);
      int* r = reinterpret_cast<int*>(dev.bytes());
      check_cuda(cudaMemsetAsync(r, 0, sizeof(result), stream), "cudaMemsetAsync (check result)");
      const int64_t items = B * std::max<int64_t>(c.max_pages, 1);
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(items, kCheckThreads), 1024));
      decode_check_kernel<<<blocks, kCheckThreads, 0, stream>>>(c, capacity, p.scores ? p.scores_len : -1, r);
      check_launch("decode_check_kernel");
      check_cuda(cudaMemcpyAsync(result, r, sizeof(result), cudaMemcpyDeviceToHost, stream),
                 "cudaMemcpyAsync (check result)");
      check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (check result)");
    }
    if (result[1] != 0) {
      check_values_on_host(p, stream, op);  // raises the message of the first bad value
      fail(op, "`seq_lens` or `block_tables` failed the device check but not the host check; were they "
                   "written while the op ran?");
    }
    max_len = result[0];
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
  DeviceWorkspace work(carve.bytes, stream);
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
        if (kernel != DecodeKernel::kWarp && kernel != DecodeKernel::kPipelined && rows_aligned(c, 8) &&
            device_cc_major() >= 8) {
          const bool launched = kernel == DecodeKernel::kMma       ? launch_mma<T, false>(D, a, blocks, stream, op)
                                : kernel == DecodeKernel::kMmaRows ? launch_mma<T, true>(D, a, blocks, stream, op)
                                                                   : launch_mma<T, true, 2>(D, a, blocks, stream, op);
          if (launched) return;
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
