// The one-pass shadow-attention backward (csrc/cuda/shadow_attention_wgmma_fused.cuh: the wgmma
// dK/dV kernel also computes dQ and adds it to an fp32 workspace with atomics, then
// dq_from_acc_kernel) run from its own source in the host emulation of
// tests/cpp/cute_emulation.h against shadow_attention_bwd_cpu in float64, as the two-kernel
// families are (attention_bwd_emulation.h). Neither fused family has run on a GPU yet.
#include "attention_bwd_emulation.h"  // first (it includes the emulation)

#include "shadow_attention_wgmma_fused.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv_test;

template <typename T, int D, int Warpgroups = 1>
using WgmmaFused = cuda_wgmma::FusedFamily<cuda_wgmma::TileTraits<T, D, 64, Warpgroups>>;

// Each combination also on two sequences x two KV heads (the other shapes have one of each), so
// that the dQ workspace's batch and head offsets are checked.
TEST(emulated_attention_bwd_wgmma_fused) {
  if (run_combo(0)) {
    check_family<WgmmaFused<__nv_bfloat16, 128>, __nv_bfloat16>("wgmma_fused bf16 d128");
    check_backward<WgmmaFused<__nv_bfloat16, 128>, __nv_bfloat16>(kBatchShape, 97, "wgmma_fused bf16 d128 batch");
  }
  if (run_combo(1)) {
    check_family<WgmmaFused<__half, 64>, __half>("wgmma_fused fp16 d64");
    check_backward<WgmmaFused<__half, 64>, __half>(kBatchShape, 98, "wgmma_fused fp16 d64 batch");
  }
}
// Two warpgroups at head_dim 128 only; no ring shape (wgmma2's test refills the same partner
// stages with two warpgroups, and every shape here reuses the dS tile over several steps).
TEST(emulated_attention_bwd_wgmma2_fused) {
  check_family<WgmmaFused<__nv_bfloat16, 128, 2>, __nv_bfloat16>("wgmma2_fused bf16 d128");
  check_family<WgmmaFused<__half, 128, 2>, __half>("wgmma2_fused fp16 d128");
}

}  // namespace
