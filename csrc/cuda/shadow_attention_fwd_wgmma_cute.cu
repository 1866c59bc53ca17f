// The CuTe shadow-attention forward (shadow_attention_fwd_cute.cuh) on the sm_90a family:
// warpgroup MMAs (wgmma) for H100/H200, one warpgroup per block (S = Q K^T from shared memory
// by descriptor, O += P V with P from registers). Built only with the CuTe headers and 9.0a,
// compiled for sm_90a alone (CMakeLists.txt; the host never picks it elsewhere: wgmma_available).
#include "shadow_attention_fwd_cute.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_fwd_wgmma(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                      cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_fwd_wgmma: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_wgmma", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::FwdTraits<typename decltype(tag)::type, decltype(d)::value>;
    launch_fwd_family<cuda_wgmma::Family<Tr>>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
