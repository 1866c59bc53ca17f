// The CuTe shadow-attention backward (shadow_attention_bwd_cute.cuh) on the sm_80 family:
// mma.sync m16n8k16, ldmatrix, cp.async; sm_80+. Built only with the CuTe headers; chosen by
// shadow_attention_bwd.cu (shadow_attention_kernels.h).
#include "shadow_attention_bwd_cute.cuh"
#include "shadow_attention_cute.cuh"
#include "shadow_attention_kernels.h"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_cute(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                     const float* delta, float scale_log2, cudaStream_t s) {
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_cute", [&](auto tag, auto d) {
    using Tr = cuda_cute::BwdTraits<typename decltype(tag)::type, decltype(d)::value>;
    launch_bwd_family<cuda_cute::Family<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
