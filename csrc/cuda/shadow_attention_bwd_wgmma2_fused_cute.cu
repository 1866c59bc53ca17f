// The "wgmma2_fused" backward: the one-pass backward of shadow_attention_wgmma_fused.cuh with two
// warpgroups (128 keys) per block at head_dim 128, dQ's columns split between them; at head_dim
// 64 (whose halves would start inside a swizzle atom) the one-warpgroup "wgmma_fused" kernel.
// Built only with the CuTe headers; the bodies exist only in the sm_90a binary.
#include "shadow_attention_bwd_cute.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma_fused.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_wgmma2_fused(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                             const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma2_fused: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma2_fused", [&](auto tag, auto d) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(d)::value;
    using Tr = std::conditional_t<D == 128, cuda_wgmma::Bwd2Traits<T, D>, cuda_wgmma::BwdTraits<T, D>>;
    launch_bwd_family<cuda_wgmma::FusedFamily<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
