// The WMMA tensor-core shadow-attention kernels (csrc/cuda/shadow_attention_wmma.cuh:
// fwd_tc_kernel, dq_tc_kernel, dkdv_tc_kernel), the default of builds without the CuTe kernels,
// run from their own source in the host emulation of tests/cpp/cuda_emulation.h and
// wmma_emulation.h (no CuTe needed), against the CPU kernels in float64 on the same inputs
// (attention_emulation_util.h), launched as launch_fwd_tc / launch_bwd_tc do. Their dynamic
// shared memory is 128-byte aligned, as the kernels declare it (dynamic_smem): every WMMA
// pointer must be 32-byte aligned.
#include "wmma_emulation.h"  // first: it defines what the CUDA headers below expect

#include "attention_emulation_util.h"
#include "shadow_attention_wmma.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv::cuda_attn;
using namespace shadowkv_test;

constexpr size_t kSmemAlign = 128;  // dynamic_smem's __align__(128)

template <typename T, int D>
void launch_forward(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2) {
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, TcTraits<D>::kRows), TcTraits<D>::kThreads,
                       FwdTcSmem<T, D>().bytes, [&] { fwd_tc_kernel<T, D>(p, mm, n_ev, scale_log2); },
                       shadowkv_emu::BlockOrder::kAscending, kSmemAlign);
}

template <typename T, int D>
void launch_backward(const BwdLaunch& a) {
  using Tr = TcTraits<D>;
  const ShadowAttentionParams& p = a.bp.fwd;
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, Tr::kRows), Tr::kThreads, DqTcSmem<T, D>().bytes,
                       [&] { dq_tc_kernel<T, D>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); },
                       shadowkv_emu::BlockOrder::kAscending, kSmemAlign);
  shadowkv_emu::launch(grid_of(p.batch * p.num_kv_heads, p.kv_len, Tr::kRows), Tr::kThreads, DkvTcSmem<T, D>().bytes,
                       [&] { dkdv_tc_kernel<T, D>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); },
                       shadowkv_emu::BlockOrder::kAscending, kSmemAlign);
}

// Forward and backward on the shapes of the other families, and the batch shape once per family
// (tests/cpp/CMakeLists.txt splits the tests between the sanitizer builds).
TEST(emulated_attention_wmma_bf16_d64) {
  check_forward_backward<__nv_bfloat16, 64>("wmma bf16 d64", false, launch_forward<__nv_bfloat16, 64>,
                                            launch_backward<__nv_bfloat16, 64>);
}
TEST(emulated_attention_wmma_fp16_d128) {
  check_forward_backward<__half, 128>("wmma fp16 d128", true, launch_forward<__half, 128>,
                                      launch_backward<__half, 128>);
}

}  // namespace
