// FastDivmod (csrc/cuda/fast_divmod.cuh), the CUDA paged kernels' division by the page size,
// against the `/` and `%` it replaces: every divisor up to 4096 (page sizes are small) and
// powers of two up to 2^31 with edge numerators, and random divisors with random numerators.
// The header is plain C++ on the host, so this runs (under the sanitizers too) without nvcc.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fast_divmod.cuh"
#include "harness.h"

namespace {

using shadowkv::cuda_common::FastDivmod;

// Numerators near 0, near multiples of d, and near the top of [0, 2^31).
std::vector<uint32_t> edge_numerators(uint32_t d) {
  std::vector<uint32_t> ns;
  const uint64_t top = (uint64_t(1) << 31) - 1;
  for (uint64_t n : {uint64_t(0), uint64_t(1), uint64_t(2), top, top - 1, top - d + 1, top / d * d, top / d * d - 1})
    if (n <= top) ns.push_back(static_cast<uint32_t>(n));
  for (uint64_t k = 1; k <= 64; ++k)
    for (int delta = -1; delta <= 1; ++delta) {
      const int64_t n = static_cast<int64_t>(k * d) + delta;
      if (n >= 0 && static_cast<uint64_t>(n) <= top) ns.push_back(static_cast<uint32_t>(n));
    }
  return ns;
}

bool check_divisor(uint32_t d, const std::vector<uint32_t>& ns) {
  const FastDivmod f(d);
  for (uint32_t n : ns) {
    const uint32_t q = f.div(n);
    if (q != n / d || f.mod(n, q) != n % d) {
      shadowkv_test::report(__FILE__, __LINE__, "FastDivmod(" + std::to_string(d) + "): n=" + std::to_string(n) +
                                                    " gives " + std::to_string(q) + ", want " + std::to_string(n / d));
      return false;
    }
  }
  return true;
}

TEST(paged_kv_fast_divmod_small_divisors) {
  std::mt19937 gen(1);
  std::uniform_int_distribution<uint32_t> any(0, (1u << 31) - 1);
  for (uint32_t d = 1; d <= 4096; ++d) {
    std::vector<uint32_t> ns = edge_numerators(d);
    for (int i = 0; i < 64; ++i) ns.push_back(any(gen));
    for (uint32_t n = 0; n < 3 * d && n < 20000; ++n) ns.push_back(n);
    if (!check_divisor(d, ns)) return;
  }
}

TEST(paged_kv_fast_divmod_large_divisors) {
  std::mt19937 gen(2);
  std::uniform_int_distribution<uint32_t> any(0, (1u << 31) - 1);
  std::uniform_int_distribution<uint32_t> divisor(4097, 1u << 31);
  std::vector<uint32_t> ds;
  for (int s = 12; s <= 31; ++s) {
    const uint32_t p = 1u << s;
    ds.insert(ds.end(), {p - 1, p, p + 1});
  }
  for (int i = 0; i < 2000; ++i) ds.push_back(divisor(gen));
  for (uint32_t d : ds) {
    if (d == 0 || d > (1u << 31)) continue;
    std::vector<uint32_t> ns = edge_numerators(d);
    for (int i = 0; i < 256; ++i) ns.push_back(any(gen));
    if (!check_divisor(d, ns)) return;
  }
}

TEST(paged_kv_fast_divmod_default_is_identity) {
  const FastDivmod f;
  CHECK(f.div(0) == 0 && f.div(12345) == 12345 && f.div((1u << 31) - 1) == (1u << 31) - 1);
  CHECK(f.mod(77, f.div(77)) == 0);
}

}  // namespace
