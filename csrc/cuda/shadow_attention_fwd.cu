// CUDA forward of shadow attention: out = softmax(scale * q k^T, shadow mask) v, plus the
// natural-log log-sum-exp per row (DESIGN.md section 2). FlashAttention-2 style: one block owns
// a query tile, streams the key tiles that can be visible to it and keeps an online softmax.
// The kernel families and how one is chosen: shadow_attention_kernels.h.
#include "shadow_attention_common.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_simt.cuh"
#include "shadow_attention_wmma.cuh"

#include <string>

#include "../core/kernel_choice.h"

namespace shadowkv {
namespace {

using namespace cuda_attn;

// ------------------------------------------------------------------------------------------
// Host side: launches of the kernels of shadow_attention_wmma.cuh and shadow_attention_simt.cuh.

template <typename T, int D>
void launch_fwd_tc(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  const size_t smem = FwdTcSmem<T, D>().bytes;
  auto kernel = fwd_tc_kernel<T, D>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, TcTraits<D>::kRows);
  kernel<<<grid_1d(blocks, "fwd_tc_kernel"), TcTraits<D>::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_tc_kernel");
}

template <typename T>
void launch_fwd_simt(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  const size_t smem = FwdSimtSmem(static_cast<int>(p.head_dim)).bytes;
  auto kernel = fwd_simt_kernel<T>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, SimtTraits::kRows);
  kernel<<<grid_1d(blocks, "fwd_simt_kernel"), SimtTraits::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_simt_kernel");
}

bool fwd_uses_tensor_cores(const ShadowAttentionParams& p) {
  return p.dtype != DType::kFloat32 && (p.head_dim == 64 || p.head_dim == 128) && rows_16b_aligned(p.q, p.q_stride) &&
         rows_16b_aligned(p.k, p.k_stride) && rows_16b_aligned(p.v, p.v_stride) && device_cc_major() >= 8;
}

}  // namespace

namespace cuda_attn {

namespace {
// The SHADOWKV_ATTENTION_KERNEL values besides "auto", in the order the error message lists them;
// `cute`: the family exists only in builds with the CuTe kernels.
struct NamedKernel {
  const char* name;
  AttnKernel kernel;
  bool cute;
};
constexpr NamedKernel kNamedKernels[] = {
    {"cute", AttnKernel::kCute, true},          {"wgmma", AttnKernel::kWgmma, true},
    {"wgmma_ws", AttnKernel::kWgmmaWs, true},   {"wgmma_wsb", AttnKernel::kWgmmaWsb, true},
    {"wgmma_wsf", AttnKernel::kWgmmaWsf, true}, {"wgmma_fused", AttnKernel::kWgmmaFused, true},
    {"wmma", AttnKernel::kWmma, false},         {"simt", AttnKernel::kSimt, false},
};
}  // namespace

AttnKernel requested_kernel(const char* fn) {
  const std::string v = core::kernel_choice("SHADOWKV_ATTENTION_KERNEL");  // an override, else the environment
  if (v.empty() || v == "auto") {
#ifdef SHADOWKV_HAS_CUTE
    return AttnKernel::kAuto;  // wgmma_ws's forward at D=128, else wgmma's; cute where no sm_90a code runs
#else
    return AttnKernel::kWmma;
#endif
  }
  for (const NamedKernel& k : kNamedKernels) {
    if (v != k.name) continue;
#ifndef SHADOWKV_HAS_CUTE
    if (k.cute) {
      bad_arg(fn, "SHADOWKV_ATTENTION_KERNEL=" + v + ", but this build has no CuTe kernel (it was built without the "
              "CUTLASS headers: install nvidia-cutlass or set CUTLASS_DIR, then rebuild)");
    }
#endif
    return k.kernel;
  }
  std::string names = "auto";
  for (const NamedKernel& k : kNamedKernels) names += std::string(", ") + k.name;
  bad_arg(fn, "SHADOWKV_ATTENTION_KERNEL must be one of " + names + "; got '" + v + "'");
}

}  // namespace cuda_attn

void shadow_attention_fwd_cuda(const ShadowAttentionParams& p, void* stream) {
  check_shadow_attention_params(p, "shadow_attention_fwd_cuda");
  check_cuda_support(p, "shadow_attention_fwd_cuda");
  if (p.batch == 0 || p.num_q_heads == 0 || p.q_len == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const AttnKernel choice = requested_kernel("shadow_attention_fwd_cuda");

  DeviceWorkspace ev_mm(ev_minmax_bytes(p), s);
  launch_ev_minmax(p, ev_mm.as<int2>(), s);
  const int64_t n_ev = ev_minmax_tiles(p);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const bool tc = choice != AttnKernel::kSimt && fwd_uses_tensor_cores(p);
#ifdef SHADOWKV_HAS_CUTE
#ifdef SHADOWKV_HAS_SM90A  // else the wgmma families are not built (CMakeLists.txt): cute runs
  // auto: the warp-specialised forward where it was measured faster (H200, 2026-11-27, bf16,
  // D=128, L=8k: 0.87 vs 0.94 ms at 25% kept, 1.17 vs 1.58 ms dense; bench/RESULTS.md); head
  // dim 64 keeps wgmma's until a GPU has timed both there.
  if (tc && choice == AttnKernel::kAuto && wgmma_available(s)) {
    if (p.head_dim == 128) return launch_fwd_wgmma_ws(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
    return launch_fwd_wgmma(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  }
  if (tc && (choice == AttnKernel::kWgmma || choice == AttnKernel::kWgmmaFused) && wgmma_available(s))
    return launch_fwd_wgmma(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  if (tc && (choice == AttnKernel::kWgmmaWs || choice == AttnKernel::kWgmmaWsb || choice == AttnKernel::kWgmmaWsf) &&
      wgmma_available(s))
    return launch_fwd_wgmma_ws(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
#endif
  if (tc && choice != AttnKernel::kWmma)  // cute, and the wgmma families where no sm_90a code runs
    return launch_fwd_cute(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
#endif

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same<T, float>::value) {
      if (tc && p.head_dim == 64) return launch_fwd_tc<T, 64>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
      if (tc && p.head_dim == 128) return launch_fwd_tc<T, 128>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
    }
    launch_fwd_simt<T>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  });
}

}  // namespace shadowkv
