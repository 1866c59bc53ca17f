// The emulated shadow-attention backward check shared by test_attention_bwd_emulated.cpp (the
// two-kernel families) and test_attention_bwd_fused_emulated.cpp (the one-pass ones): two
// translation units, so that the sanitizer builds compile them on both cores (the backward's
// emulation was the longest compile of CI's AddressSanitizer build, ~220 s alone).
#pragma once

#include "attention_emulation_util.h"  // first (it includes the emulation)

#include "shadow_attention_bwd_cute.cuh"

namespace shadowkv_test {

using namespace shadowkv;
using namespace shadowkv::cuda_attn;

// The backward kernels `run(args)` launches (head dim D) on one problem against
// shadow_attention_bwd_cpu in float64.
template <typename T, int D, class Run>
void check_backward_with(const AttentionShape& s, uint32_t seed, const std::string& name, Run const& run) {
  AttentionProblem<T> prob(s, D, seed);
  const size_t n_q = prob.q.size(), n_kv = prob.k.size(), n_rows = n_q / D;
  std::mt19937 rng(seed + 1000);
  std::normal_distribution<double> normal;
  std::vector<T> dout(n_q);
  std::vector<double> dout_ref(n_q);
  for (size_t i = 0; i < n_q; ++i) dout_ref[i] = to_double(dout[i] = from_double<T>(normal(rng)));

  // The forward in float64; its out rounded to T and lse to float feed both backwards.
  std::vector<double> out_ref(n_q), lse_ref(n_rows);
  shadow_attention_fwd_cpu(prob.params64(out_ref.data(), lse_ref.data()));
  std::vector<T> out(n_q);
  std::vector<float> lse(n_rows);
  for (size_t i = 0; i < n_q; ++i) out_ref[i] = to_double(out[i] = from_double<T>(out_ref[i]));
  for (size_t i = 0; i < n_rows; ++i) lse_ref[i] = lse[i] = static_cast<float>(lse_ref[i]);

  const auto strides = [](const int64_t* from, int64_t* to) { std::copy(from, from + 3, to); };
  std::vector<double> dq_ref(n_q), dk_ref(n_kv), dv_ref(n_kv);
  ShadowAttentionBwdParams ref;
  ref.fwd = prob.params64(out_ref.data(), lse_ref.data());
  ref.grad_out = dout_ref.data();
  ref.grad_q = dq_ref.data();
  ref.grad_k = dk_ref.data();
  ref.grad_v = dv_ref.data();
  strides(prob.p.q_stride, ref.do_stride);
  strides(prob.p.q_stride, ref.dq_stride);
  strides(prob.p.k_stride, ref.dk_stride);
  strides(prob.p.k_stride, ref.dv_stride);
  ref.cpu_threads = 1;
  shadow_attention_bwd_cpu(ref);

  std::vector<T> dq(n_q, from_double<T>(NAN)), dk(n_kv, from_double<T>(NAN)), dv(n_kv, from_double<T>(NAN));
  ShadowAttentionBwdParams bp = ref;
  bp.fwd = prob.params16(out.data(), lse.data());
  bp.grad_out = dout.data();
  bp.grad_q = dq.data();
  bp.grad_k = dk.data();
  bp.grad_v = dv.data();
  std::vector<float> lse2(n_rows), delta(n_rows);
  for (size_t row = 0; row < n_rows; ++row) {
    float acc = 0.f;
    for (int d = 0; d < D; ++d)
      acc += static_cast<float>(to_double(out[row * D + d])) * static_cast<float>(to_double(dout[row * D + d]));
    delta[row] = lse[row] == -INFINITY ? 0.f : acc;
    lse2[row] = lse[row] == -INFINITY ? INFINITY : lse[row] * 1.4426950408889634f;
  }
  const std::vector<int2> mm = prob.ev_minmax();
  run(BwdLaunch{bp, mm.data(), prob.n_ev_tiles(), lse2.data(), delta.data(), prob.scale_log2(), nullptr});
  expect_close(dq, dq_ref, backward_tolerance<T>(), name + " dQ");
  expect_close(dk, dk_ref, backward_tolerance<T>(), name + " dK");
  expect_close(dv, dv_ref, backward_tolerance<T>(), name + " dV");
}

// Blocks of a grid over (batch, heads, tiles of `rows` of `len`).
inline unsigned grid_of(int64_t batch_heads, int64_t len, int rows) {
  return static_cast<unsigned>(batch_heads * ((len + rows - 1) / rows));
}

// Family F's dQ kernel alone, as launch_bwd_family launches it.
template <class F>
void launch_dq_emulated(const BwdLaunch& a) {
  using Tr = typename F::Traits;
  const ShadowAttentionParams& p = a.bp.fwd;
  shadowkv_emu::launch(grid_of(p.batch * p.num_q_heads, p.q_len, Tr::kBlockM), Tr::kThreads,
                       bwd_tiles_smem<F>() + dq_extra_smem<Tr>(),
                       [&] { dq_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2); });
}

// A one-pass backward's dQ, as DqWorkspace does it on a GPU: `dkdv(acc)` adds dQ into a zeroed
// fp32 workspace ([B, Hq, Lq, D]), then dq_from_acc_kernel writes it out.
template <typename T, int D, class Dkdv>
void with_dq_workspace(const BwdLaunch& a, Dkdv const& dkdv) {
  const ShadowAttentionParams& p = a.bp.fwd;
  const size_t n_q = static_cast<size_t>(p.batch * p.num_q_heads * p.q_len * D);
  std::vector<float> acc(n_q, 0.f);
  dkdv(acc.data());
  shadowkv_emu::launch(static_cast<unsigned>((n_q / 4 + 255) / 256), 256, 0,
                       [&] { dq_from_acc_kernel<T, D>(a.bp, acc.data(), a.scale_log2 / kLog2e); });
}

// Family F's dQ and dK/dV kernels, launched as launch_bwd_family does.
template <class F, typename T>
void launch_family_emulated(const BwdLaunch& a) {
  using Tr = typename F::Traits;
  constexpr int D = Tr::kHeadDim;
  const ShadowAttentionParams& p = a.bp.fwd;
  const unsigned kv_blocks = grid_of(p.batch * p.num_kv_heads, p.kv_len, Tr::kBlockM);
  if constexpr (F::kAtomicDq) {  // dQ by the dK/dV kernel's atomics, then dq_from_acc_kernel
    with_dq_workspace<T, D>(a, [&](float* acc) {
      shadowkv_emu::launch(kv_blocks, Tr::kThreads, bwd_tiles_smem<F>() + F::kExtraSmem, [&] {
        dkdv_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2, acc);
      });
    });
  } else {
    launch_dq_emulated<F>(a);
    shadowkv_emu::launch(kv_blocks, Tr::kThreads, bwd_tiles_smem<F>(), [&] {
      dkdv_kernel<F>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2, nullptr);
    });
  }
}

template <class F, typename T>
void check_backward(const AttentionShape& s, uint32_t seed, const std::string& name) {
  check_backward_with<T, F::Traits::kHeadDim>(s, seed, name, launch_family_emulated<F, T>);
}

// The backward `run` launches (head dim D) on every shape of kAttentionShapes, the ring shape
// (ring_shape) and the NaN-in-hidden-keys shape.
template <typename T, int D, class Run>
void check_shapes(const std::string& family, bool ring_shape, Run const& run) {
  uint32_t seed = 11;
  for (const AttentionShape& s : kAttentionShapes)
    check_backward_with<T, D>(s, seed++, family + " Lq=" + std::to_string(s.q_len), run);
  if (ring_shape) check_backward_with<T, D>(kRingShape, seed, family + " ring shape", run);
  check_backward_with<T, D>(kPoisonShape, seed + 1, family + " NaN in keys no query sees", run);
}

template <class F, typename T>
void check_family(const std::string& family, bool ring_shape = false) {
  check_shapes<T, F::Traits::kHeadDim>(family, ring_shape, launch_family_emulated<F, T>);
}

}  // namespace shadowkv_test
