// The "wgmma_wsb" backward: the warp-specialised dQ and dK/dV kernels
// (shadow_attention_bwd_ws.cuh) on the two-warpgroup wgmma family's tiles (128 own rows, 64-row
// partner tiles). Its forward is wgmma_ws's. Built only with the CuTe headers and 9.0a, compiled
// for sm_90a alone (CMakeLists.txt; the host asks wgmma_available first).
#include "shadow_attention_bwd_ws.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_bwd_wgmma_ws(const ShadowAttentionBwdParams& bp, const int2* ev_mm, int64_t n_ev, const float* lse2,
                         const float* delta, float scale_log2, cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_bwd_wgmma_ws: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(bp.fwd.dtype, bp.fwd.head_dim, "launch_bwd_wgmma_ws", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::Bwd2Traits<typename decltype(tag)::type, decltype(d)::value>;
    launch_bwd_ws<cuda_wgmma::Family<Tr>>(bp, ev_mm, n_ev, lse2, delta, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
