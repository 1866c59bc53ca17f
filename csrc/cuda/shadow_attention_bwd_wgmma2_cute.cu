// The CuTe shadow-attention backward on the sm_90a family with two warpgroups per block
// ("wgmma2"): the dQ kernel's blocks own 128 query rows, the dK/dV kernel's 128 keys, so each
// staged partner tile (K, V or Q, dO) feeds twice the MMAs of the one-warpgroup kernels. Built
// only with the CuTe headers; the bodies exist only in the sm_90a binary.
#include "shadow_attention_bwd_cute.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_wgmma2(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                       const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma2: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma2", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::Bwd2Traits<typename decltype(tag)::type, decltype(d)::value>;
    launch_bwd_family<cuda_wgmma::Family<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
