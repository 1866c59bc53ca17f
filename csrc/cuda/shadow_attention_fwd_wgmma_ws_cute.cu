// The "wgmma_ws" forward: the warp-specialised sm_90a kernel (shadow_attention_fwd_ws.cuh) on the
// two-warpgroup wgmma family's tiles (128 query rows, 128-key tiles). Its backward is wgmma's.
// Built only with the CuTe headers and 9.0a, compiled for sm_90a alone (CMakeLists.txt; the host
// asks wgmma_available first).
#include "shadow_attention_fwd_ws.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_attn {

void launch_fwd_wgmma_ws(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                         cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_fwd_wgmma_ws: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_wgmma_ws", [&](auto tag, auto d) {
    using Tr = cuda_wgmma::Fwd2Traits<typename decltype(tag)::type, decltype(d)::value>;
    launch_fwd_ws<cuda_wgmma::Family<Tr>>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
