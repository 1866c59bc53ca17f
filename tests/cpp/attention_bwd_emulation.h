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

// Family F's dQ and dK/dV kernels on one problem, launched as launch_bwd_family does, after the
// pre-pass shadow_attention_bwd_cuda runs (bwd_rows_kernel: lse2 = lse log2(e), delta = rowsum(dO O)).
template <class F, typename T>
void check_backward(const AttentionShape& s, uint32_t seed, const std::string& name) {
  using Tr = typename F::Traits;
  constexpr int D = Tr::kHeadDim;
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
  const int64_t n_ev = prob.n_ev_tiles();
  const float scale_log2 = prob.scale_log2();
  const ShadowAttentionParams& p = bp.fwd;
  const size_t tiles = 2 * Tr::kOwnBytes + cuda_cute::PartnerStages<Tr>::kBytes + F::kSmemSlack;
  const unsigned kv_blocks =
      static_cast<unsigned>(p.batch * p.num_kv_heads * ((p.kv_len + Tr::kBlockM - 1) / Tr::kBlockM));
  if constexpr (F::kAtomicDq) {  // dQ by the dK/dV kernel's atomics, then dq_from_acc_kernel
    std::vector<float> acc(n_q, 0.f);
    shadowkv_emu::launch(kv_blocks, Tr::kThreads, tiles + F::kExtraSmem, [&] {
      dkdv_kernel<F>(bp, mm.data(), n_ev, lse2.data(), delta.data(), scale_log2, acc.data());
    });
    shadowkv_emu::launch(static_cast<unsigned>((n_q / 4 + 255) / 256), 256, 0,
                         [&] { dq_from_acc_kernel<T, D>(bp, acc.data(), scale_log2 / kLog2e); });
  } else {
    shadowkv_emu::launch(static_cast<unsigned>(p.batch * p.num_q_heads * ((p.q_len + Tr::kBlockM - 1) / Tr::kBlockM)),
                         Tr::kThreads, tiles + dq_extra_smem<Tr>(),
                         [&] { dq_kernel<F>(bp, mm.data(), n_ev, lse2.data(), delta.data(), scale_log2); });
    shadowkv_emu::launch(kv_blocks, Tr::kThreads, tiles, [&] {
      dkdv_kernel<F>(bp, mm.data(), n_ev, lse2.data(), delta.data(), scale_log2, nullptr);
    });
  }
  expect_close(dq, dq_ref, backward_tolerance<T>(), name + " dQ");
  expect_close(dk, dk_ref, backward_tolerance<T>(), name + " dK");
  expect_close(dv, dv_ref, backward_tolerance<T>(), name + " dV");
}

template <class F, typename T>
void check_family(const std::string& family, bool ring_shape = false) {
  uint32_t seed = 11;
  for (const AttentionShape& s : kAttentionShapes)
    check_backward<F, T>(s, seed++, family + " Lq=" + std::to_string(s.q_len));
  if (ring_shape) check_backward<F, T>(kRingShape, seed, family + " ring shape");
  check_backward<F, T>(kPoisonShape, seed + 1, family + " NaN in keys no query sees");
}

}  // namespace shadowkv_test
