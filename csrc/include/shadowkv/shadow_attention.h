// Shadow-masked attention: the training op that replays a sampler's eviction log.
//
// Query i (absolute position q_offset + i) sees key j iff
//     j <= q_offset + i  and  q_offset + i < evicted_at[b, h_kv, j]
// (DESIGN.md section 1). Query head hq reads KV head hq / (Hq / Hkv) (GQA).
// Rows that see no key produce out = 0 and lse = -inf.
//
// Plain C++ API over raw pointers and element strides (the last dimension of every
// tensor must be contiguous), usable without torch. All strides are in elements.
#pragma once

#include <cstdint>
#include <functional>

#include "shadowkv/dtypes.h"

namespace shadowkv {

struct ShadowAttentionParams {
  // Shapes: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], evicted_at [B, Hkv, Lk] (int32),
  // out [B, Hq, Lq, D] (same dtype as q), lse [B, Hq, Lq] (float32; float64 for float64).
  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
  int64_t q_offset = 0;  // absolute position of query row 0
  double scale = 1.0;    // softmax scale, usually 1/sqrt(D)
  DType dtype = DType::kFloat32;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* evicted_at = nullptr;
  void* out = nullptr;
  void* lse = nullptr;

  int64_t q_stride[3] = {0, 0, 0};  // batch, head, row
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  int64_t ev_stride[2] = {0, 0};  // batch, kv head (row stride is 1)
  int64_t lse_stride[2] = {0, 0};  // batch, head (row stride is 1)
};

struct ShadowAttentionBwdParams {
  ShadowAttentionParams fwd;  // q, k, v, evicted_at, out and lse of the forward pass (read only)
  const void* grad_out = nullptr;  // [B, Hq, Lq, D], dtype of q
  const void* grad_lse = nullptr;  // optional [B, Hq, Lq], dtype of lse; nullptr = zeros
  void* grad_q = nullptr;          // [B, Hq, Lq, D], dtype of q
  void* grad_k = nullptr;          // [B, Hkv, Lk, D]
  void* grad_v = nullptr;          // [B, Hkv, Lk, D]
  int64_t do_stride[3] = {0, 0, 0};
  int64_t glse_stride[2] = {0, 0};
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};
  int64_t dv_stride[3] = {0, 0, 0};
  // CPU kernel only: how many threads the ParallelFor runs work items on (it picks between a
  // fused pass with one item per (batch, kv head) and two passes with many more); 0 = unknown,
  // taken as std::thread::hardware_concurrency(). Pass 1 with serial_for.
  int64_t cpu_threads = 0;
};

// Runs body(begin, end) over [0, n) work items, possibly split across threads. The torch
// bindings pass at::parallel_for; C++ users may pass their own pool. Default: serial.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;
inline void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  if (n > 0) body(0, n);
}

// Key/query tile sizes of the CPU kernels; fully masked key tiles are skipped whole.
constexpr int64_t kCpuQueryTile = 32;
constexpr int64_t kCpuKeyTile = 64;

// The checks every kernel (CPU and CUDA) runs first, public so that a server can validate
// params it assembled; std::invalid_argument prefixed with `fn`. Shapes >= 0 and element
// counts within int64; num_q_heads a multiple of num_kv_heads; q_offset >= 0 and
// q_offset + q_len, kv_len within int32 (evicted_at holds int32 positions);
// valid_softmax_scale(scale) (dtypes.h: 0 < scale <= FLT_MAX / log2(e)); a known dtype; no
// null pointer for a non-empty tensor (the _bwd form: also the gradients; grad_lse may be null;
// cpu_threads >= 0); and check_written_layouts on what the op writes.
void check_shadow_attention_params(const ShadowAttentionParams& p, const char* fn);
void check_shadow_attention_bwd_params(const ShadowAttentionBwdParams& bp, const char* fn);
// Every array the op writes (forward: out and lse; backward: grad_q, grad_k and grad_v) gives
// each element its own memory (as paged_kv.h's check_written_layouts: strides left at their
// default 0 are refused), has an element count within int64 and reaches no element 2^60 or more
// elements from the first. Part of the checks above.
void check_written_layouts(const ShadowAttentionParams& p, const char* op);
void check_written_layouts(const ShadowAttentionBwdParams& bp, const char* op);

// CPU kernels. Throw std::invalid_argument on inconsistent params.
void shadow_attention_fwd_cpu(const ShadowAttentionParams& p, const ParallelFor& pf = serial_for);
void shadow_attention_bwd_cpu(const ShadowAttentionBwdParams& p, const ParallelFor& pf = serial_for);

// CUDA kernels (`stream` is a cudaStream_t; in a build without CUDA, built_with_cuda() false,
// each throws std::runtime_error). Same contract.
// bfloat16/float16/float32 inputs; float64 is rejected. Throw std::runtime_error on launch errors.
void shadow_attention_fwd_cuda(const ShadowAttentionParams& p, void* stream);
void shadow_attention_bwd_cuda(const ShadowAttentionBwdParams& p, void* stream);

// True when this library was built with its CUDA kernels; the arch list it was built for.
bool built_with_cuda();
const char* cuda_archs();  // e.g. "90a;80", "" without CUDA
// The instruction set the CPU kernels run: "avx512" (AVX-512 F/VL/DQ/BW variants of the hot loops),
// "avx2" (AVX2 + FMA variants), each on x86-64 CPUs that have it, or "baseline"; the environment
// variable SHADOWKV_CPU_ISA (auto, baseline, avx2, avx512) overrides the choice per call (and the
// Python package's in-process override, its ops.cpu_isa() blocks, overrides that).
// Throws std::invalid_argument for a bad value of it (or an ISA this CPU lacks).
const char* cpu_isa();
// True when the CuTe (CUTLASS) kernels were compiled in (CUDA builds with CUTLASS headers);
// they are then the default ("auto") at head dims 64 and 128, on wgmma on an sm_90 GPU with a
// 9.0a build, on mma.sync elsewhere; SHADOWKV_ATTENTION_KERNEL=cute asks for the mma.sync ones.
bool built_with_cute();
// True when the current CUDA device runs this build's sm_90a wgmma kernels (forward and
// backward; an sm_90 GPU, a build with the CuTe kernels and 9.0a); "auto" and
// SHADOWKV_ATTENTION_KERNEL=wgmma then run them. False without a device.
bool wgmma_runs_here();

}  // namespace shadowkv
