// Shared by the emulated shadow-attention tests (the CuTe families': test_attention_fwd_emulated.cpp,
// attention_bwd_emulation.h, which include cute_emulation.h first; the SIMT and WMMA families':
// test_attention_simt_emulated.cpp, test_attention_wmma_emulated.cpp): a random problem in the
// kernels' dtype and float64, the launch-side pre-pass the CUDA op runs before the kernels, and
// the checks of a forward and a backward against the CPU kernels in float64.
#pragma once

#include "cuda_emulation.h"  // first: it defines what the CUDA headers below expect

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_values.h"
#include "harness.h"
#include "shadow_attention_common.cuh"
#include "shadowkv/shadow_attention.h"

namespace shadowkv_test {

struct AttentionShape {
  int batch, q_heads, kv_heads, q_len, kv_len, q_offset;
  int evict_all_by = 0;  // > 0: every key is evicted by this position (later rows see no key)
  int holes_from = 0;    // keys below this are never evicted
  bool poison = false;   // keys that no query sees hold NaN in the 16-bit K and V (AttentionProblem)
};

// Ragged tiles (lengths off the 64/128 grid), GQA, queries at an offset (chunked prefill),
// query rows that see no key at all (lse = -inf, out = 0, no gradient), and key tiles that
// later query tiles see whole (the kernels' full-tile paths: no log read, no pair tested, K/V
// copied without a test per row; with a third of the keys evicted every tile is partial).
inline const AttentionShape kAttentionShapes[] = {
    {1, 2, 1, 150, 150, 0}, {1, 1, 1, 70, 200, 130}, {1, 2, 1, 64, 96, 100, 130}, {1, 1, 1, 200, 200, 0, 0, 128}};
// For the warp-specialised forward (bf16) also: two sequences x two KV heads with enough live
// key tiles that every K/V stage of its ring is refilled (batch and head indexing,
// write-after-read hazards of the ring): four live 128-key tiles, seven of 64 keys. Slow to
// emulate.
inline const AttentionShape kRingShape = {2, 4, 2, 70, 400, 330};
// Two sequences x two KV heads at a fraction of the ring shape's cost (the fused backward's dQ
// workspace offsets).
inline const AttentionShape kBatchShape = {2, 4, 2, 70, 200, 130};
// NaN in the K/V rows of keys that no query sees, in partial tiles of every query tile: the
// kernels must stage those rows as zeros (0 * NaN would reach out, dQ, dK and dV).
inline const AttentionShape kPoisonShape = {1, 2, 1, 100, 260, 100, 0, 0, true};

// Whether combination k (0 or 1) of a family's two (dtype, head_dim) combinations is compiled
// and run (in `#if`): both, unless the compile definition SHADOWKV_EMU_COMBO names one. CI's
// sanitizer builds split them, 0 under AddressSanitizer and 1 under ThreadSanitizer
// (tests/cpp/CMakeLists.txt), so that each runs under one sanitizer in half the time, and each
// build compiles only the kernels it runs: these translation units were most of the two
// sanitizer stages' compile (each a few minutes under ASan on a 2-core CI machine).
#ifndef SHADOWKV_EMU_COMBO
#define SHADOWKV_EMU_COMBO (-1)
#endif
#define SHADOWKV_EMU_RUNS(k) (SHADOWKV_EMU_COMBO < 0 || SHADOWKV_EMU_COMBO == (k))

// Tolerances relative to max |reference| (expect_close): 16-bit rounding of the outputs and of
// P (and dS) before their products; the largest errors seen are 2-3x below them (bf16 forward
// 1.5e-3, backward 2.2e-3; fp16 2.2e-4, 3.2e-4). float32 (the SIMT kernels): fp32 sums only
// (forward 3.3e-7, backward 5.6e-7 at head dim 33).
template <typename T>
constexpr double forward_tolerance() {
  return std::is_same<T, __nv_bfloat16>::value ? 4e-3 : std::is_same<T, __half>::value ? 1e-3 : 2e-6;
}
template <typename T>
constexpr double backward_tolerance() {
  return std::is_same<T, __nv_bfloat16>::value ? 6e-3 : std::is_same<T, __half>::value ? 1.5e-3 : 2e-6;
}

// One random problem: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] in T (float32, bfloat16 or float16;
// and the same values in float64),
// an eviction log with holes (a third of the keys evicted at a random later position, keys 64-95
// evicted right after themselves: a tile no later query sees; the first 4 and those below
// holes_from never), contiguous. With s.poison, every fifth key from 7 on (not a sink, at or
// past holes_from) is logged at its own position, so that no query sees it, and its K and V
// rows in T are NaN (the float64 copies keep their values: the reference never reads them).
template <typename T>
struct AttentionProblem {
  shadowkv::ShadowAttentionParams p;  // strides and shapes; pointers set by params_t / params64
  std::vector<T> q, k, v;
  std::vector<double> qd, kd, vd;
  std::vector<int32_t> ev;

  AttentionProblem(const AttentionShape& s, int head_dim, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    const int64_t B = s.batch, Hq = s.q_heads, Hkv = s.kv_heads, Lq = s.q_len, Lk = s.kv_len, D = head_dim;
    draw(rng, normal, B * Hq * Lq * D, q, qd);
    draw(rng, normal, B * Hkv * Lk * D, k, kd);
    draw(rng, normal, B * Hkv * Lk * D, v, vd);
    ev.assign(B * Hkv * Lk, INT32_MAX);
    for (int64_t i = 0; i < static_cast<int64_t>(ev.size()); ++i) {
      const int64_t key = i % Lk;
      if (key >= 4 && key >= s.holes_from && rng() % 3 == 0) ev[i] = static_cast<int32_t>(key + 1 + rng() % 80);
      if (key >= 64 && key < 96 && key >= s.holes_from) ev[i] = static_cast<int32_t>(key + 1);
      if (s.evict_all_by > 0) ev[i] = std::min(ev[i], static_cast<int32_t>(std::max<int64_t>(key + 1, s.evict_all_by)));
      if (s.poison && key >= 4 && key >= s.holes_from && key % 5 == 2) {
        ev[i] = static_cast<int32_t>(key);  // query `key` is the first that could see it: none does
        for (int64_t d = 0; d < D; ++d) {
          k[i * D + d] = from_double<T>(NAN);
          v[i * D + d] = from_double<T>(NAN);
        }
      }
    }
    p.batch = B;
    p.num_q_heads = Hq;
    p.num_kv_heads = Hkv;
    p.q_len = Lq;
    p.kv_len = Lk;
    p.head_dim = D;
    p.q_offset = s.q_offset;
    p.scale = 1.0 / std::sqrt(static_cast<double>(D));
    p.evicted_at = ev.data();
    const int64_t qs[3] = {Hq * Lq * D, Lq * D, D}, ks[3] = {Hkv * Lk * D, Lk * D, D};
    std::copy(qs, qs + 3, p.q_stride);
    std::copy(qs, qs + 3, p.o_stride);
    std::copy(ks, ks + 3, p.k_stride);
    std::copy(ks, ks + 3, p.v_stride);
    p.ev_stride[0] = Hkv * Lk;
    p.ev_stride[1] = Lk;
    p.lse_stride[0] = Hq * Lq;
    p.lse_stride[1] = Lq;
  }

  // p with the inputs in T (what the kernels read) or their float64 copies, and the given outputs.
  shadowkv::ShadowAttentionParams params_t(void* out, float* lse) const {
    const auto dtype = std::is_same<T, __nv_bfloat16>::value ? shadowkv::DType::kBFloat16
                       : std::is_same<T, __half>::value     ? shadowkv::DType::kFloat16
                                                            : shadowkv::DType::kFloat32;
    return with(dtype, q.data(), k.data(), v.data(), out, lse);
  }
  shadowkv::ShadowAttentionParams params64(double* out, double* lse) const {
    return with(shadowkv::DType::kFloat64, qd.data(), kd.data(), vd.data(), out, lse);
  }

  // What shadow_attention_{fwd,bwd}_cuda compute before the kernels (ev_minmax_kernel): the
  // (min, max) of the log over each kEvTile keys of each (batch, kv head).
  std::vector<int2> ev_minmax() const {
    const int64_t Lk = p.kv_len, n = n_ev_tiles();
    std::vector<int2> mm(p.batch * p.num_kv_heads * n);
    for (int64_t bh = 0; bh < p.batch * p.num_kv_heads; ++bh)
      for (int64_t t = 0; t < n; ++t) {
        int lo = INT_MAX, hi = INT_MIN;
        const int64_t tile = shadowkv::cuda_attn::kEvTile;
        for (int64_t j = t * tile; j < std::min<int64_t>(Lk, (t + 1) * tile); ++j) {
          lo = std::min(lo, ev[bh * Lk + j]);
          hi = std::max(hi, ev[bh * Lk + j]);
        }
        mm[bh * n + t] = make_int2(lo, hi);
      }
    return mm;
  }
  int64_t n_ev_tiles() const { return (p.kv_len + shadowkv::cuda_attn::kEvTile - 1) / shadowkv::cuda_attn::kEvTile; }
  float scale_log2() const { return static_cast<float>(p.scale * 1.4426950408889634); }

 private:
  shadowkv::ShadowAttentionParams with(shadowkv::DType dtype, const void* q_, const void* k_, const void* v_,
                                       void* out, void* lse) const {
    shadowkv::ShadowAttentionParams r = p;
    r.dtype = dtype;
    r.q = q_;
    r.k = k_;
    r.v = v_;
    r.out = out;
    r.lse = lse;
    return r;
  }
  static void draw(std::mt19937& rng, std::normal_distribution<double>& normal, int64_t n, std::vector<T>& h,
                   std::vector<double>& d) {
    h.resize(n);
    d.resize(n);
    for (int64_t i = 0; i < n; ++i) d[i] = to_double(h[i] = from_double<T>(normal(rng)));
  }
};

// |got - want| <= tol * (max finite |want| + |want|) for every element (infinities must match);
// NaN never passes.
template <typename G>
void expect_close(const std::vector<G>& got, const std::vector<double>& want, double tol, const std::string& what) {
  double scale = 0;
  for (double w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double g;
    if constexpr (std::is_same<G, float>::value) {
      g = got[i];
    } else {
      g = to_double(got[i]);
    }
    const bool same_inf = std::isinf(want[i]) && g == want[i];
    if (!same_inf && !(std::fabs(g - want[i]) <= tol * (scale + std::fabs(want[i]))) && ++bad <= 5)
      report(__FILE__, __LINE__, what + "[" + std::to_string(i) + "] = " + std::to_string(g) + ", want " +
                                     std::to_string(want[i]) + " (max |want| " + std::to_string(scale) + ")");
  }
}

// The forward `run(p, mm, n_ev, scale_log2)` launches (head dim D) on one problem (p: the inputs
// in T; mm, n_ev: ev_minmax's) against shadow_attention_fwd_cpu in float64 on the same inputs.
template <typename T, int D, class Run>
void check_forward_with(const AttentionShape& s, uint32_t seed, const std::string& name, Run const& run) {
  const AttentionProblem<T> prob(s, D, seed);
  const size_t n_out = prob.q.size(), n_rows = n_out / D;
  std::vector<double> out_ref(n_out), lse_ref(n_rows);
  shadowkv::shadow_attention_fwd_cpu(prob.params64(out_ref.data(), lse_ref.data()));

  std::vector<T> out(n_out, from_double<T>(NAN));
  std::vector<float> lse(n_rows, NAN);
  const std::vector<int2> mm = prob.ev_minmax();
  run(prob.params_t(out.data(), lse.data()), mm.data(), prob.n_ev_tiles(), prob.scale_log2());
  expect_close(out, out_ref, forward_tolerance<T>(), name + " out");  // lse: fp32 sums
  expect_close(lse, lse_ref, 1e-5, name + " lse");
}

// The forward `run` launches (head dim D) on every shape of kAttentionShapes, the ring shape
// (ring_shape) and the NaN-in-hidden-keys shape.
template <typename T, int D, class Run>
void check_forward_shapes(const std::string& family, bool ring_shape, Run const& run) {
  uint32_t seed = 7;
  for (const AttentionShape& s : kAttentionShapes)
    check_forward_with<T, D>(s, seed++, family + " Lq=" + std::to_string(s.q_len), run);
  if (ring_shape) check_forward_with<T, D>(kRingShape, seed, family + " ring shape", run);
  check_forward_with<T, D>(kPoisonShape, seed + 1, family + " NaN in keys no query sees", run);
}

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
  shadowkv::shadow_attention_fwd_cpu(prob.params64(out_ref.data(), lse_ref.data()));
  std::vector<T> out(n_q);
  std::vector<float> lse(n_rows);
  for (size_t i = 0; i < n_q; ++i) out_ref[i] = to_double(out[i] = from_double<T>(out_ref[i]));
  for (size_t i = 0; i < n_rows; ++i) lse_ref[i] = lse[i] = static_cast<float>(lse_ref[i]);

  const auto strides = [](const int64_t* from, int64_t* to) { std::copy(from, from + 3, to); };
  std::vector<double> dq_ref(n_q), dk_ref(n_kv), dv_ref(n_kv);
  shadowkv::ShadowAttentionBwdParams ref;
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
  shadowkv::shadow_attention_bwd_cpu(ref);

  std::vector<T> dq(n_q, from_double<T>(NAN)), dk(n_kv, from_double<T>(NAN)), dv(n_kv, from_double<T>(NAN));
  shadowkv::ShadowAttentionBwdParams bp = ref;
  bp.fwd = prob.params_t(out.data(), lse.data());
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
  run(shadowkv::cuda_attn::BwdLaunch{bp, mm.data(), prob.n_ev_tiles(), lse2.data(), delta.data(), prob.scale_log2(),
                                     nullptr});
  expect_close(dq, dq_ref, backward_tolerance<T>(), name + " dQ");
  expect_close(dk, dk_ref, backward_tolerance<T>(), name + " dK");
  expect_close(dv, dv_ref, backward_tolerance<T>(), name + " dV");
}

// Blocks of a grid over (batch, heads, tiles of `rows` of `len`).
inline unsigned grid_of(int64_t batch_heads, int64_t len, int rows) {
  return static_cast<unsigned>(batch_heads * ((len + rows - 1) / rows));
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

// A family's forward `fwd` and backward `bwd` launches (head dim D) on every shape of
// kAttentionShapes and the NaN-in-hidden-keys shape, and with `batch` on kBatchShape too (two
// sequences x two KV heads: the batch offsets, which the other shapes leave at 0).
template <typename T, int D, class Fwd, class Bwd>
void check_forward_backward(const std::string& family, bool batch, Fwd const& fwd, Bwd const& bwd) {
  check_forward_shapes<T, D>(family, false, fwd);
  check_shapes<T, D>(family, false, bwd);
  if (!batch) return;
  check_forward_with<T, D>(kBatchShape, 97, family + " batch", fwd);
  check_backward_with<T, D>(kBatchShape, 98, family + " batch", bwd);
}

}  // namespace shadowkv_test
