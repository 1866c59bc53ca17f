// The "wgmma2o" forward: the two-warpgroup sm_90a family with each key tile's softmax overlapped
// with the previous tile's P V (shadow_attention_fwd_overlap.cuh). Its backward is wgmma2's.
// Built only with the CuTe headers; the body exists only in the sm_90a binary (traps elsewhere;
// the host asks wgmma_available first).
#include "shadow_attention_fwd_overlap.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_fwd_wgmma2o(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                        cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_fwd_wgmma2o: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_wgmma2o", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::Fwd2Traits<typename decltype(tag)::type, decltype(d)::value>;
    launch_fwd_overlap<cuda_wgmma::Family<Tr>>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
