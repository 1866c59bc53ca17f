// The one-pass shadow-attention backward (csrc/cuda/shadow_attention_wgmma_fused.cuh: the wgmma
// dK/dV kernel also computes dQ and adds it to an fp32 workspace with atomics, then
// dq_from_acc_kernel) run from its own source in the host emulation of
// tests/cpp/cute_emulation.h against shadow_attention_bwd_cpu in float64, as the two-kernel
// families are (attention_bwd_emulation.h). It passed the GPU tests on an H200 (dQ's last bits
// vary between runs).
#include "attention_bwd_emulation.h"  // first (it includes the emulation)

#include "shadow_attention_wgmma_fused.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv_test;

template <typename T, int D>
using WgmmaFused = cuda_wgmma::FusedFamily<cuda_wgmma::BwdTraits<T, D>>;

// Each combination also on two sequences x two KV heads (the other shapes have one of each), so
// that the dQ workspace's batch and head offsets are checked.
TEST(emulated_attention_bwd_wgmma_fused) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<WgmmaFused<__nv_bfloat16, 128>, __nv_bfloat16>("wgmma_fused bf16 d128");
  check_backward<WgmmaFused<__nv_bfloat16, 128>, __nv_bfloat16>(kBatchShape, 97, "wgmma_fused bf16 d128 batch");
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_family<WgmmaFused<__half, 64>, __half>("wgmma_fused fp16 d64");
  check_backward<WgmmaFused<__half, 64>, __half>(kBatchShape, 98, "wgmma_fused fp16 d64 batch");
#endif
}

}  // namespace
