// The CPU attention kernels' private helpers, directly: exp_fast against std::exp in double
// (relative error below 2^-22 over [-87.3, 88.3], exact 0 for masked (-inf) and underflowing
// scores, NaN kept), row_max/row_sum, and tile_gemm_acc against a plain triple loop on every
// block/edge combination with transposed operands.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fast_exp.h"
#include "harness.h"
#include "row_reduce.h"
#include "tile_gemm.h"

namespace {

using shadowkv::cpu::exp_fast;

TEST(shadow_attention_exp_fast_relative_error) {
  constexpr double kUlp = 1.0 / (1 << 23);  // float's spacing at 1: 2^-23
  constexpr int kN = 1 << 21;
  double worst = 0.0;
  float worst_x = 0.0f;
  for (int i = 0; i <= kN; ++i) {  // 2 million arguments spanning [-87.3, 88.3]
    const float x = static_cast<float>(-87.3 + (88.3 + 87.3) * i / kN);
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(exp_fast(x) - want) / want;
    if (rel > worst) worst = rel, worst_x = x;
  }
  if (!(worst <= 2 * kUlp))
    shadowkv_test::report(__FILE__, __LINE__, "exp_fast relative error " + std::to_string(worst / kUlp) +
                                                  " ulp at x=" + std::to_string(worst_x));
}

TEST(shadow_attention_exp_fast_edges) {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(exp_fast(-inf) == 0.0f);
  CHECK(exp_fast(-100.0f) == 0.0f);
  CHECK(exp_fast(0.0f) == 1.0f);
  CHECK(std::isnan(exp_fast(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isfinite(exp_fast(1000.0f)));  // saturates, never inf
  CHECK(exp_fast(-1.0) == std::exp(-1.0));  // double is std::exp
}

TEST(shadow_attention_row_reductions) {
  std::vector<float> x = {3, -1, 7, 2, 5, 0, -4, 6, 1, 9, -2};  // 8 lanes + a tail of 3
  for (int64_t n = 0; n <= static_cast<int64_t>(x.size()); ++n) {
    float mx = -1e30f, sum = 0.0f;
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, x[c]), sum += x[c];
    CHECK(shadowkv::cpu::row_max(x.data(), n, -1e30f) == mx);
    CHECK(shadowkv::cpu::row_sum(x.data(), n) == sum);  // small integers: exact in any order
  }
  CHECK(shadowkv::cpu::row_max(x.data(), 4, 100.0f) == 100.0f);
}

// Every vector width's blocking (16: SSE, 4 x 8 doubles; 32: AVX2, 6 x 8; 64: AVX-512, 8 x 16),
// with row and column counts that leave full blocks, edges and one-row blocks. The generic
// vector code is the same on any target (a 64-byte vector is split on a narrower one), so all
// three run here whatever the CPU.
template <int VB>
void check_tile_gemm() {
  std::mt19937 rng(7 + VB);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int64_t m : {1, 3, 4, 9, 17}) {
    for (int64_t n : {1, 15, 16, 33, 65}) {
      for (int64_t K : {0, 1, 5}) {
        for (bool a_transposed : {false, true}) {
          // A(k, i) at a[k * a_k + i * a_i]; B [K, n] with row stride n + 2; C [m, n] with stride n + 1.
          const int64_t a_k = a_transposed ? m : 1, a_i = a_transposed ? 1 : K;
          std::vector<double> a(m * K + 1), b(K * (n + 2) + 1), c(m * (n + 1)), want;
          for (auto* v : {&a, &b, &c})
            for (double& e : *v) e = u(rng);
          want = c;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t w = 0; w < n; ++w)
              for (int64_t k = 0; k < K; ++k) want[i * (n + 1) + w] += a[k * a_k + i * a_i] * b[k * (n + 2) + w];
          shadowkv::cpu::tile_gemm_acc<VB>(m, n, K, a.data(), a_k, a_i, b.data(), n + 2, c.data(), n + 1);
          for (size_t j = 0; j < c.size(); ++j) CHECK_CLOSE(c[j], want[j], 1e-12, 1e-12);
        }
      }
    }
  }
}

TEST(shadow_attention_tile_gemm_matches_triple_loop) {
  check_tile_gemm<16>();
  check_tile_gemm<32>();
  check_tile_gemm<64>();
}

}  // namespace
