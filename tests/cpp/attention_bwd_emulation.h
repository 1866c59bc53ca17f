// The emulated shadow-attention backward check shared by test_attention_bwd_emulated.cpp (the
// two-kernel families) and test_attention_bwd_fused_emulated.cpp (the one-pass ones): two
// translation units, so that the sanitizer builds compile them on both cores (the backward's
// emulation was the longest compile of CI's AddressSanitizer build, ~220 s alone).
#pragma once

#include "cute_emulation.h"  // first: it defines what the CUDA and CuTe headers below expect

#include "attention_emulation_util.h"

#include "shadow_attention_bwd_cute.cuh"

namespace shadowkv_test {

using namespace shadowkv;
using namespace shadowkv::cuda_attn;

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

template <class F, typename T>
void check_family(const std::string& family, bool ring_shape = false) {
  check_shapes<T, F::Traits::kHeadDim>(family, ring_shape, launch_family_emulated<F, T>);
}

}  // namespace shadowkv_test
