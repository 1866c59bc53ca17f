// Shared by the emulated shadow-attention tests (test_attention_fwd_emulated.cpp,
// test_attention_bwd_emulated.cpp): a random problem in 16-bit and float64, the launch-side
// pre-pass the CUDA op runs before the kernels, and the comparison of 16-bit results.
#pragma once

#include "cute_emulation.h"  // first: it defines what the CUDA and CuTe headers below expect

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

// Tolerances relative to max |reference| (attention_emulation_util's expect_close): 16-bit
// rounding of the outputs and of P (and dS) before their products; the largest errors seen are
// 2-3x below them (bf16 forward 1.5e-3, backward 2.2e-3; fp16 2.2e-4, 3.2e-4).
template <typename T>
constexpr double forward_tolerance() {
  return std::is_same<T, __nv_bfloat16>::value ? 4e-3 : 1e-3;
}
template <typename T>
constexpr double backward_tolerance() {
  return std::is_same<T, __nv_bfloat16>::value ? 6e-3 : 1.5e-3;
}

// One random problem: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] in T (and the same values in float64),
// an eviction log with holes (a third of the keys evicted at a random later position, keys 64-95
// evicted right after themselves: a tile no later query sees; the first 4 and those below
// holes_from never), contiguous. With s.poison, every fifth key from 7 on (not a sink, at or
// past holes_from) is logged at its own position, so that no query sees it, and its 16-bit K
// and V rows are NaN (the float64 copies keep their values: the reference never reads them).
template <typename T>
struct AttentionProblem {
  shadowkv::ShadowAttentionParams p;  // strides and shapes; pointers set by params16 / params64
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

  // p with the 16-bit inputs (T) or their float64 copies, and the given outputs.
  shadowkv::ShadowAttentionParams params16(void* out, float* lse) const {
    const auto dtype = std::is_same<T, __nv_bfloat16>::value ? shadowkv::DType::kBFloat16 : shadowkv::DType::kFloat16;
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

}  // namespace shadowkv_test
