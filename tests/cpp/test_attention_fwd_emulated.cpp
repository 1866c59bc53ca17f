// The CuTe shadow-attention forward kernels (csrc/cuda/shadow_attention_fwd_cute.cuh,
// shadow_attention_fwd_ws.cuh) on the sm_80 family and the sm_90a wgmma families, run from their
// own source in the host emulation of tests/cpp/cute_emulation.h, against
// shadow_attention_fwd_cpu in float64 on the same 16-bit inputs. "cute", "wgmma" and "wgmma_ws"
// (a producer warpgroup and two consumer warpgroups synchronised by mbarriers and named
// barriers, shadow_attention_fwd_ws.cuh) passed the GPU tests on an H200, so they calibrate the
// emulation.
#include "attention_emulation_util.h"  // first (it includes the emulation)

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

// Family F's forward on one problem, launched as launch_fwd_family / launch_fwd_wgmma_ws do.
template <class F, typename T, Body kBody>
void check_forward(const AttentionShape& s, uint32_t seed, const std::string& name) {
  using Tr = typename F::Traits;
  const AttentionProblem<T> prob(s, Tr::kHeadDim, seed);
  const size_t n_out = prob.q.size(), n_rows = n_out / Tr::kHeadDim;
  std::vector<double> out_ref(n_out), lse_ref(n_rows);
  shadow_attention_fwd_cpu(prob.params64(out_ref.data(), lse_ref.data()));

  std::vector<T> out(n_out, from_double<T>(NAN));
  std::vector<float> lse(n_rows, NAN);
  const ShadowAttentionParams p = prob.params16(out.data(), lse.data());
  const std::vector<int2> mm = prob.ev_minmax();
  const int64_t n_ev = prob.n_ev_tiles();
  const float scale_log2 = prob.scale_log2();
  const unsigned blocks = static_cast<unsigned>(p.batch * p.num_q_heads * ((p.q_len + Tr::kBlockM - 1) / Tr::kBlockM));
  // Past the tiles, as the launches ask: tile kinds (and fwd_kernel's log entries), alignment slack.
  const size_t rest = fwd_extra_smem<Tr>() + F::kSmemSlack;
  if constexpr (kBody == Body::kPlain) {
    shadowkv_emu::launch(blocks, Tr::kThreads, Tr::kOwnBytes + 2 * Tr::kPartnerBytes + rest,
                         [&] { fwd_kernel<F>(p, mm.data(), n_ev, scale_log2); });
  } else {
    shadowkv_emu::launch(blocks, kWsThreads, ws_smem_bytes<Tr>(),
                         [&] { fwd_ws_kernel<F>(p, mm.data(), n_ev, scale_log2); });
  }
  expect_close(out, out_ref, forward_tolerance<T>(), name + " out");  // lse: fp32 sums
  expect_close(lse, lse_ref, 1e-5, name + " lse");
}

template <class F, typename T, Body kBody>
void check_family(const std::string& family, bool ring_shape = false) {
  uint32_t seed = 7;
  for (const AttentionShape& s : kAttentionShapes)
    check_forward<F, T, kBody>(s, seed++, family + " Lq=" + std::to_string(s.q_len));
  if (ring_shape) check_forward<F, T, kBody>(kRingShape, seed, family + " ring shape");
  check_forward<F, T, kBody>(kPoisonShape, seed + 1, family + " NaN in keys no query sees");
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
