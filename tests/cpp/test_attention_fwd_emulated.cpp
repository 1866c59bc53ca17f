// The CuTe shadow-attention forward kernels (csrc/cuda/shadow_attention_fwd_cute.cuh,
// shadow_attention_fwd_ws.cuh) on the sm_80 family and the sm_90a wgmma families, run from their
// own source in the host emulation of tests/cpp/cute_emulation.h, against
// shadow_attention_fwd_cpu in float64 on the same 16-bit inputs. "cute", "wgmma" and "wgmma_ws"
// (a producer warpgroup and two consumer warpgroups synchronised by mbarriers and named
// barriers, shadow_attention_fwd_ws.cuh) passed the GPU tests on an H200, so they calibrate the
// emulation.
#include "cute_emulation.h"  // first: it defines what the CUDA and CuTe headers below expect

#include "attention_emulation_util.h"
#include "shadow_attention_cute.cuh"
#include "shadow_attention_fwd_cute.cuh"
#include "shadow_attention_fwd_ws.cuh"
#include "shadow_attention_wgmma.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv::cuda_attn;
using namespace shadowkv_test;

// fwd_kernel, fwd_ws_kernel
enum class Body { kPlain, kWarpSpecialised };

// Family F's forward, launched as launch_fwd_family / launch_fwd_wgmma_ws do.
template <class F, Body kBody>
void launch_forward(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2) {
  using Tr = typename F::Traits;
  const unsigned blocks = grid_of(p.batch * p.num_q_heads, p.q_len, Tr::kBlockM);
  // Past the tiles, as the launches ask: tile kinds (and fwd_kernel's log entries), alignment slack.
  const size_t rest = fwd_extra_smem<Tr>() + F::kSmemSlack;
  if constexpr (kBody == Body::kPlain) {
    shadowkv_emu::launch(blocks, Tr::kThreads, Tr::kOwnBytes + 2 * Tr::kPartnerBytes + rest,
                         [&] { fwd_kernel<F>(p, mm, n_ev, scale_log2); });
  } else {
    shadowkv_emu::launch(blocks, kWsThreads, ws_smem_bytes<Tr>(), [&] { fwd_ws_kernel<F>(p, mm, n_ev, scale_log2); });
  }
}

template <class F, typename T, Body kBody>
void check_family(const std::string& family, bool ring_shape = false) {
  check_forward_shapes<T, F::Traits::kHeadDim>(family, ring_shape, launch_forward<F, kBody>);
}

template <typename T, int D>
using Cute = cuda_cute::Family<cuda_cute::FwdTraits<T, D>>;
template <typename T, int D>
using Wgmma = cuda_wgmma::Family<cuda_wgmma::FwdTraits<T, D>>;
template <typename T, int D>
using Wgmma2 = cuda_wgmma::Family<cuda_wgmma::Fwd2Traits<T, D>>;

TEST(emulated_attention_fwd_cute) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<Cute<__nv_bfloat16, 64>, __nv_bfloat16, Body::kPlain>("cute bf16 d64");
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_family<Cute<__half, 128>, __half, Body::kPlain>("cute fp16 d128");
#endif
}
TEST(emulated_attention_fwd_wgmma) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<Wgmma<__nv_bfloat16, 64>, __nv_bfloat16, Body::kPlain>("wgmma bf16 d64");
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_family<Wgmma<__half, 128>, __half, Body::kPlain>("wgmma fp16 d128");
#endif
}
TEST(emulated_attention_fwd_wgmma_ws) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<Wgmma2<__nv_bfloat16, 128>, __nv_bfloat16, Body::kWarpSpecialised>("wgmma_ws bf16 d128", true);
#endif
#if SHADOWKV_EMU_RUNS(1)  // ring: as bf16
  check_family<Wgmma2<__half, 64>, __half, Body::kWarpSpecialised>("wgmma_ws fp16 d64");
#endif
}

}  // namespace
