// The SIMT shadow-attention kernels (csrc/cuda/shadow_attention_simt.cuh: fwd_simt_kernel,
// dq_simt_kernel, dkdv_simt_kernel), the path of float32, of head dims other than 64 and 128
// and of rows that are not 16-byte aligned, run from their own source in the host emulation of
// tests/cpp/cuda_emulation.h (no CuTe needed), against the CPU kernels in float64 on the same
// inputs (attention_emulation_util.h), launched as launch_fwd_simt / launch_bwd_simt do.
// The kernels are templates on the dtype only; each dtype runs once, each at another head dim:
// 33 (an odd pitch: staged rows and the lanes' head-dim slices end mid-warp), 96 (the 16-bit
// models that take this path on every GPU; three slices per lane) and 200 (above 192: the
// backward's blocks of 16 rows and 4 warps, whose key tiles are half a log tile).
#include "cuda_emulation.h"  // first: it defines what the CUDA headers below expect

#include "attention_emulation_util.h"
#include "shadow_attention_simt.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv::cuda_attn;
using namespace shadowkv_test;

template <typename T>
void launch_forward(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2) {
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, SimtTraits::kRows), SimtTraits::kThreads,
                       FwdSimtSmem(static_cast<int>(p.head_dim)).bytes,
                       [&] { fwd_simt_kernel<T>(p, mm, n_ev, scale_log2); });
}

template <typename T>
void launch_backward(const BwdLaunch& a) {
  const ShadowAttentionParams& p = a.bp.fwd;
  const int d = static_cast<int>(p.head_dim);
  const int rows = SimtTraits::bwd_rows(d), threads = SimtTraits::bwd_threads(d);
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, rows), threads, DqSimtSmem(d).bytes,
                       [&] { dq_simt_kernel<T>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); });
  shadowkv_emu::launch(grid_of(p.batch * p.num_kv_heads, p.kv_len, rows), threads, DkvSimtSmem(d).bytes,
                       [&] { dkdv_simt_kernel<T>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); });
}

// Forward and backward on the shapes of the other families, and the batch shape once per family
// (tests/cpp/CMakeLists.txt splits the tests between the sanitizer builds).
TEST(emulated_attention_simt_fp32_d33) {
  check_forward_backward<float, 33>("simt fp32 d33", false, launch_forward<float>, launch_backward<float>);
}
TEST(emulated_attention_simt_bf16_d96) {
  check_forward_backward<__nv_bfloat16, 96>("simt bf16 d96", true, launch_forward<__nv_bfloat16>,
                                            launch_backward<__nv_bfloat16>);
}
TEST(emulated_attention_simt_fp16_d200) {
  check_forward_backward<__half, 200>("simt fp16 d200", false, launch_forward<__half>, launch_backward<__half>);
}

}  // namespace
