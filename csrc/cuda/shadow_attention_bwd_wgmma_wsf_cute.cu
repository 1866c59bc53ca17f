// The "wgmma_wsf" backward: the warp-specialised dK/dV kernel (shadow_attention_bwd_ws.cuh) with
// the one-pass step of shadow_attention_wgmma_fused.cuh at head_dim 128 (dQ by atomics into an
// fp32 workspace, its columns split between the two consumer warpgroups); at head_dim 64, whose
// column halves would start inside a swizzle atom, wgmma_wsb's two warp-specialised kernels. Its
// forward is wgmma_ws's. Built only with the CuTe headers and 9.0a, compiled for sm_90a alone
// (CMakeLists.txt; the host asks wgmma_available first).
#include "shadow_attention_bwd_ws.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma_fused.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_wgmma_wsf(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                          const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma_wsf: the sm_90a body does not run here");
  if (bp.fwd.head_dim != 128) return launch_bwd_wgmma_ws(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma_wsf", [&](auto tag, auto d) {
    if constexpr (decltype(d)::value == 128) {
      using Tr = cuda_wgmma::Bwd2Traits<typename decltype(tag)::type, 128>;
      launch_bwd_ws<cuda_wgmma::FusedFamily<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
    }
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
