// The "wgmma_wsb" and "wgmma_wsf" backwards (the warp-specialised dQ and dK/dV kernels of
// csrc/cuda/shadow_attention_bwd_ws.cuh: a producer warpgroup and two consumer warpgroups
// synchronised by mbarriers; wsf's dK/dV kernel computes dQ too, by atomics) run from their own
// source in the host emulation of tests/cpp/cute_emulation.h against shadow_attention_bwd_cpu in
// float64, as the other families are (attention_bwd_emulation.h). The emulated mbarriers deliver
// a stage's copies only when its phase completes, so a consumer reading a stage it did not wait
// for sees stale bytes. Not yet run on a GPU.
#include "attention_bwd_emulation.h"  // first (it includes the emulation)

#include "shadow_attention_bwd_ws.cuh"
#include "shadow_attention_wgmma_fused.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv_test;

// As launch_bwd_ws: dq_ws_kernel, then dkdv_ws_kernel, on the two-warpgroup family's tiles
// (128 own rows per block, 64-row partner tiles).
template <typename T, int D>
void launch_wsb(const BwdLaunch& a) {
  using F = cuda_wgmma::Family<cuda_wgmma::Bwd2Traits<T, D>>;
  using Tr = typename F::Traits;
  const ShadowAttentionParams& p = a.bp.fwd;
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, Tr::kBlockM), kWsThreads, ws_dq_smem_bytes<Tr>(),
                       [&] { dq_ws_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); });
  shadowkv_emu::launch(grid_of(p.batch * p.num_kv_heads, p.kv_len, Tr::kBlockM), kWsThreads, ws_dkdv_smem_bytes<F>(),
                       [&] { dkdv_ws_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2, nullptr); });
}

// As launch_bwd_ws for a one-pass family (head dim 128): dkdv_ws_kernel adding dQ into a zeroed
// fp32 workspace, then dq_from_acc_kernel.
template <typename T>
void launch_wsf(const BwdLaunch& a) {
  using F = cuda_wgmma::FusedFamily<cuda_wgmma::Bwd2Traits<T, 128>>;
  using Tr = typename F::Traits;
  const ShadowAttentionParams& p = a.bp.fwd;
  with_dq_workspace<T, 128>(a, [&](float* acc) {
    shadowkv_emu::launch(grid_of(p.batch * p.num_kv_heads, p.kv_len, Tr::kBlockM), kWsThreads, ws_dkdv_smem_bytes<F>(),
                         [&] { dkdv_ws_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2, acc); });
  });
}

// No ring shape: the plain shapes already refill both kernels' three stages (six steps per
// dK/dV block at Lq=150, four live key tiles per dQ block at 200 keys), and the batch shape
// checks the batch and KV-head offsets.
TEST(emulated_attention_bwd_wgmma_wsb) {
#if SHADOWKV_EMU_RUNS(0)
  check_shapes<__nv_bfloat16, 128>("wgmma_wsb bf16 d128", false, launch_wsb<__nv_bfloat16, 128>);
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_shapes<__half, 64>("wgmma_wsb fp16 d64", false, launch_wsb<__half, 64>);
  check_backward_with<__half, 64>(kBatchShape, 98, "wgmma_wsb fp16 d64 batch", launch_wsb<__half, 64>);
#endif
}

// Head dim 128 only (at 64 wgmma_wsf runs wgmma_wsb's kernels), both dtypes wherever it runs (not
// split by SHADOWKV_EMU_RUNS; ~90 s under ThreadSanitizer). Under every build the emulation's
// own check (a wgmma operand changed between issue and wait) catches a missing consumer barrier
// or a single dS tile, and TSan an unordered access pair. The plain shapes reuse both dS tiles
// over several steps (six per block at Lq=150); the batch shape checks the workspace's batch and
// head offsets.
TEST(emulated_attention_bwd_wgmma_wsf) {
  check_shapes<__nv_bfloat16, 128>("wgmma_wsf bf16 d128", false, launch_wsf<__nv_bfloat16>);
  check_backward_with<__half, 128>(kBatchShape, 98, "wgmma_wsf fp16 d128 batch", launch_wsf<__half>);
}

}  // namespace
