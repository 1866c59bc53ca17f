// The CuTe shadow-attention backward (shadow_attention_bwd_cute.cuh) on the sm_90a family:
// warpgroup MMAs (wgmma), one warpgroup per block, partner tiles of 64 rows; S/dP and dV/dK each
// issued as one wgmma batch. Built only with the CuTe headers and 9.0a, compiled for sm_90a
// alone (CMakeLists.txt; the host asks wgmma_available first).
#include "shadow_attention_bwd_cute.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_wgmma(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                      const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::BwdTraits<typename decltype(tag)::type, decltype(d)::value>;
    launch_bwd_family<cuda_wgmma::Family<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
