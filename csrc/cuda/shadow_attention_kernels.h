// Which shadow-attention kernels run, forward and backward (private to csrc/cuda/).
//
// These kernel choices compute the same thing:
//   * cute: FlashAttention-2-style CuTe kernels (shadow_attention_{fwd,bwd}_cute.cuh on the
//     mma.sync family), bfloat16/float16, head_dim 64/128, 16-byte aligned rows, sm_80+; built
//     only when the CUTLASS/CuTe headers are found (CUTLASS_DIR, or the nvidia-cutlass package).
//   * wgmma: the same kernel bodies on the sm_90a warpgroup-MMA family, same coverage, on
//     H100/H200 in builds with 9.0a and the CuTe headers; one warpgroup (64 own rows) per block.
//   * wgmma_ws: a warp-specialised forward (fwd_ws_kernel: a producer warpgroup copies K/V
//     into an mbarrier ring, two consumer warpgroups take turns on the tensor cores);
//     wgmma's backward. auto's forward at head_dim 128: it passed the GPU tests and racecheck
//     on an H200 and was the fastest forward there (bench/RESULTS.md, 2026-11-27).
//   * wgmma_wsb: wgmma_ws's forward; a warp-specialised backward (dq_ws_kernel, dkdv_ws_kernel:
//     a producer warpgroup copies the partner tiles into an mbarrier ring, two consumer
//     warpgroups of 64 own rows each share them). Opt-in: not yet run on a GPU.
//   * wgmma_wsf: wgmma_ws's forward; at head_dim 128 a one-pass warp-specialised backward
//     (dkdv_ws_kernel with the one-pass step of shadow_attention_wgmma_fused.cuh: dQ by atomics,
//     bitwise non-deterministic), at 64 wgmma_wsb's. Opt-in: not yet run on a GPU.
//   * wgmma_fused: wgmma's forward; a one-pass backward (the dK/dV kernel computes dQ too and
//     adds it to an fp32 workspace with atomics: five products per pair instead of seven, dQ
//     bitwise non-deterministic). Opt-in: it passed the GPU tests on an H200, but its backward
//     was 1.2x slower than wgmma's there (the dK/dV kernel issues every ~10 cycles).
//   * wmma: tensor-core kernels with the same coverage (shadow_attention_wmma.cuh).
//   * simt: every dtype and head_dim (shadow_attention_simt.cuh).
// SHADOWKV_ATTENTION_KERNEL picks one per call (forward and backward alike): "auto" (default) =
// in builds with the CuTe kernels "wgmma" with wgmma_ws's forward at head_dim 128, else "wmma";
// "cute" = cute where it applies (an error in a build without it), else simt; "wgmma",
// "wgmma_ws", "wgmma_wsb", "wgmma_wsf", "wgmma_fused" = those kernels where they apply, else as
// "cute"; "wmma" = wmma where it applies, else simt; "simt" = simt always.
// Retired (2026-11-27, after losing on an H200 twice: bench/RESULTS.md): "wgmma2" (two
// warpgroups per block, a double-buffered K/V ring in the forward), "wgmma2o" (its forward with
// the softmax overlapped with the previous tile's P V) and "wgmma2_fused" (the one-pass backward
// with two warpgroups); their tile traits live on in the warp-specialised kernels.
// The CuTe kernels became the default after passing every GPU test on an H200, 2.1-2.8x faster
// than wmma there (bench/RESULTS.md, 2026-11-26).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "shadowkv/shadow_attention.h"

namespace shadowkv {
namespace cuda_attn {

enum class AttnKernel { kAuto, kWmma, kCute, kWgmma, kWgmmaWs, kWgmmaWsb, kWgmmaWsf, kWgmmaFused, kSimt };

// The family SHADOWKV_ATTENTION_KERNEL asks for; throws std::invalid_argument (naming `fn`) on a
// bad value, and for "cute" in a build without the CuTe kernels.
AttnKernel requested_kernel(const char* fn);

#ifdef SHADOWKV_HAS_CUTE
// Runs the CuTe forward for bfloat16/float16 and head_dim 64 or 128 (the caller checks).
void launch_fwd_cute(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                     cudaStream_t s);
// Runs the CuTe dQ and dK/dV kernels; lse2 and delta are bwd_rows_kernel's [B, Hq, Lq] rows.
void launch_bwd_cute(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                     const float* delta, float scale_log2, cudaStream_t s);
// True when the current device is sm_90 and runs the sm_90a wgmma kernels of this build
// (SHADOWKV_CUDA_ARCHS has 9.0a); asked once per device (not while `caller`, the stream the
// kernels will run on, is being captured: then false until an eager call has asked). Never
// throws: any CUDA error means false.
bool wgmma_available(cudaStream_t caller = nullptr);
// Run the wgmma forward, and the wgmma dQ and dK/dV kernels (bfloat16/float16, head_dim 64 or
// 128; the caller checks, and checks wgmma_available()).
void launch_fwd_wgmma(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                      cudaStream_t s);
void launch_bwd_wgmma(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                      const float* delta, float scale_log2, cudaStream_t s);
// The warp-specialised forward (its backward is launch_bwd_wgmma).
void launch_fwd_wgmma_ws(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                         cudaStream_t s);
// The warp-specialised backward, "wgmma_wsb" (its forward is launch_fwd_wgmma_ws).
void launch_bwd_wgmma_ws(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                         const float* delta, float scale_log2, cudaStream_t s);
// The one-pass warp-specialised backward, "wgmma_wsf" (its forward is launch_fwd_wgmma_ws).
void launch_bwd_wgmma_wsf(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                          const float* delta, float scale_log2, cudaStream_t s);
// The one-pass backward with dQ by atomics (its forward is launch_fwd_wgmma).
void launch_bwd_wgmma_fused(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                            const float* delta, float scale_log2, cudaStream_t s);
#endif

}  // namespace cuda_attn
}  // namespace shadowkv
