// The CuTe shadow-attention backward kernels (csrc/cuda/shadow_attention_bwd_cute.cuh: the dQ
// kernel and the dK/dV kernel) on the sm_80 family and the sm_90a wgmma families, run from their
// own source in the host emulation of tests/cpp/cute_emulation.h, against
// shadow_attention_bwd_cpu in float64 on the same inputs (the forward's out rounded to 16 bits
// and its lse to fp32, as the CUDA backward gets them; attention_bwd_emulation.h). "cute"
// and "wgmma" passed the GPU tests on an H200 (the calibration).
#include "attention_bwd_emulation.h"  // first (it includes the emulation)

#include "shadow_attention_cute.cuh"
#include "shadow_attention_wgmma.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv_test;

template <typename T, int D>
using Cute = cuda_cute::Family<cuda_cute::BwdTraits<T, D>>;
template <typename T, int D>
using Wgmma = cuda_wgmma::Family<cuda_wgmma::BwdTraits<T, D>>;

TEST(emulated_attention_bwd_cute) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<Cute<__nv_bfloat16, 64>, __nv_bfloat16>("cute bf16 d64");
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_family<Cute<__half, 128>, __half>("cute fp16 d128");
#endif
}
TEST(emulated_attention_bwd_wgmma) {
#if SHADOWKV_EMU_RUNS(0)
  check_family<Wgmma<__nv_bfloat16, 128>, __nv_bfloat16>("wgmma bf16 d128");
#endif
#if SHADOWKV_EMU_RUNS(1)
  check_family<Wgmma<__half, 64>, __half>("wgmma fp16 d64");
#endif
}

}  // namespace
