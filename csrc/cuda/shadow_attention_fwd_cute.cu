// The CuTe shadow-attention forward (shadow_attention_fwd_cute.cuh) on the sm_80 family:
// mma.sync m16n8k16, ldmatrix, cp.async; sm_80+. Built only when the CuTe headers are available
// (CUTLASS_DIR); chosen by shadow_attention_fwd.cu (see shadow_attention_kernels.h for when).
#include "shadow_attention_cute.cuh"
#include "shadow_attention_fwd_cute.cuh"
#include "shadow_attention_kernels.h"

namespace shadowkv {
namespace cuda_attn {

void launch_fwd_cute(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                     cudaStream_t s) {
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_cute", [&](auto tag, auto d) {
    using Tr = cuda_cute::FwdTraits<typename decltype(tag)::type, decltype(d)::value>;
    launch_fwd_family<cuda_cute::Family<Tr>>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
