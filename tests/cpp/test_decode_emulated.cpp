// The paged-decode kernels (csrc/cuda/paged_decode_{warp,pipelined,mma}.cuh, the partition kernels,
// and paged_decode_reduce.cuh) run from their own source in the host emulation of
// tests/cpp/cuda_emulation.h, as paged_decode_attention_cuda launches them, against a float64
// reference: what each partition block must produce (the scaled logits of its slots, the
// partition's (max, sum of exp), its unnormalised output sum_j exp(logit_j - max) V_j), then
// the reduce and score kernels' out and scores_out.
// No GPU is needed, so CI runs them (under AddressSanitizer too: every buffer is an exact-size
// heap block, so a read past a pool, a table or the shared memory is reported). What this cannot
// show: speed, the hardware's memory ordering, and the exact rounding of the tensor cores.
#include "cuda_emulation.h"  // first: it defines what the CUDA headers below expect

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_values.h"
#include "harness.h"
#include "paged_decode_check.cuh"
#include "paged_decode_mma.cuh"
#include "paged_decode_pipelined.cuh"
#include "paged_decode_reduce.cuh"
#include "paged_decode_warp.cuh"

namespace {

using namespace shadowkv;
using namespace shadowkv::cuda_paged;
using shadowkv_test::from_double;
using shadowkv_test::to_double;

enum class Kernel { kWarp, kPipelined, kMma, kMmaRows, kMmaRows2Stage };

struct Case {
  std::vector<int> lens;
  int q_heads, kv_heads, page_size, part_size;
  bool unchecked = false;
  int bad_seq = -1;      // unchecked only: this sequence's block table holds a bad page id ...
  int bad_column = 0;    // ... in this column
  int bad_id = 0;        // (a page id outside [0, num_pages))
};

std::string describe(Kernel kernel, int D, const Case& c) {
  std::string s = kernel == Kernel::kMma        ? "mma"
                  : kernel == Kernel::kMmaRows ? "mma_rows"
                  : kernel == Kernel::kMmaRows2Stage ? "mma_rows_2stage"
                  : kernel == Kernel::kPipelined ? "pipelined"
                                                 : "warp";
  s += " D=" + std::to_string(D) + " Hq=" + std::to_string(c.q_heads) + " Hkv=" + std::to_string(c.kv_heads) +
       " page=" + std::to_string(c.page_size) + " part=" + std::to_string(c.part_size) + " lens=";
  for (int l : c.lens) s += std::to_string(l) + ",";
  return s;
}

template <typename T, int D>
void run_case(Kernel kernel, const Case& c, uint32_t seed) {
  const std::string what = describe(kernel, D, c);
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  const int B = static_cast<int>(c.lens.size()), Hq = c.q_heads, Hkv = c.kv_heads, ps = c.page_size;
  const int group = Hq / Hkv;
  const int max_len = std::max(1, *std::max_element(c.lens.begin(), c.lens.end()));
  const int max_pages = (max_len + ps - 1) / ps + 1;  // one spare column
  int num_pages = 0;
  for (int len : c.lens) num_pages += (len + ps - 1) / ps;
  num_pages += 2;  // pages no sequence uses

  // Pools [num_pages, page_size, Hkv, D], queries [B, Hq, D], tables with shuffled page ids.
  std::vector<T> k_pool(static_cast<size_t>(num_pages) * ps * Hkv * D), v_pool(k_pool.size()),
      q(static_cast<size_t>(B) * Hq * D);
  for (auto& x : k_pool) x = from_double<T>(normal(rng));
  for (auto& x : v_pool) x = from_double<T>(normal(rng));
  for (auto& x : q) x = from_double<T>(normal(rng));
  std::vector<int32_t> ids(num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(B) * max_pages, -1), lens(c.lens.begin(), c.lens.end());
  int next = 0;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < (c.lens[b] + ps - 1) / ps; ++i) tables[static_cast<size_t>(b) * max_pages + i] = ids[next++];
  if (c.bad_seq >= 0) tables[static_cast<size_t>(c.bad_seq) * max_pages + c.bad_column] = c.bad_id;

  DecodeLaunch a{};
  PagedKVCache& cache = a.p.cache;
  cache.num_pages = num_pages;
  cache.page_size = ps;
  cache.num_kv_heads = Hkv;
  cache.head_dim = D;
  cache.batch = B;
  cache.max_pages = max_pages;
  cache.dtype = std::is_same<T, float>::value           ? DType::kFloat32
                : std::is_same<T, __nv_bfloat16>::value ? DType::kBFloat16
                                                        : DType::kFloat16;
  cache.k_pages = k_pool.data();
  cache.v_pages = v_pool.data();
  cache.block_tables = tables.data();
  cache.seq_lens = lens.data();
  const int64_t strides[3] = {int64_t{ps} * Hkv * D, int64_t{Hkv} * D, D};
  std::copy(strides, strides + 3, cache.k_stride);
  std::copy(strides, strides + 3, cache.v_stride);
  cache.bt_stride[0] = max_pages;
  cache.bt_stride[1] = 1;
  a.p.num_q_heads = Hq;
  a.p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  a.p.q = q.data();
  a.p.q_stride[0] = int64_t{Hq} * D;
  a.p.q_stride[1] = D;
  a.p.check_values = !c.unchecked;
  a.scale = static_cast<float>(a.p.scale);
  a.group = group;
  a.group_tiles = (group + kGroupTile - 1) / kGroupTile;
  a.tile_heads = std::min(group, kGroupTile);
  a.part_size = c.part_size;
  a.num_parts = (max_len + c.part_size - 1) / c.part_size;
  a.capacity = int64_t{max_pages} * ps;
  a.page_size = ps;
  a.page_div = cuda_common::FastDivmod(static_cast<uint32_t>(ps));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> part_acc(static_cast<size_t>(B) * Hq * a.num_parts * D, nan);
  std::vector<float> logits(static_cast<size_t>(B) * Hq * max_len, nan);
  std::vector<float2> part_ml(static_cast<size_t>(B) * Hq * a.num_parts, make_float2(nan, nan));
  std::vector<int> bad(B, 0);
  a.part_acc = part_acc.data();
  a.part_ml = part_ml.data();
  a.logits = logits.data();
  a.logits_len = max_len;
  a.bad = c.unchecked ? bad.data() : nullptr;
  // The final outputs: out [B, Hq, D] and scores_out [B, Hkv, max_len + 2] (2 slots past the
  // longest sequence, which must become 0), and the reduce kernel's (M, 1 / L) for the scores.
  const int64_t scores_len = max_len + 2;
  std::vector<T> out(q.size(), from_double<T>(nan));
  std::vector<float> scores(static_cast<size_t>(B) * Hkv * scores_len, nan);
  std::vector<float2> stats(static_cast<size_t>(B) * Hq, make_float2(nan, nan));
  a.p.out = out.data();
  a.p.o_stride[0] = int64_t{Hq} * D;
  a.p.o_stride[1] = D;
  a.p.scores = scores.data();
  a.p.scores_len = scores_len;
  a.p.scores_stride[0] = int64_t{Hkv} * scores_len;
  a.p.scores_stride[1] = scores_len;
  a.p.scores_stride[2] = 1;
  a.stats = stats.data();

  // paged_decode_attention_cuda's launches: the partition kernel, the reduce, the scores.
  const unsigned blocks = static_cast<unsigned>(B * Hkv * a.group_tiles * a.num_parts);
  if (kernel == Kernel::kMma || kernel == Kernel::kMmaRows || kernel == Kernel::kMmaRows2Stage) {
    if constexpr (sizeof(T) == 2 && (D == 64 || D == 128)) {
      const size_t smem = mma_smem_bytes<T, D>(a.tile_heads, a.part_size);
      if (kernel == Kernel::kMma)
        shadowkv_emu::launch(blocks, kThreads, smem, [&] { decode_partition_mma_kernel<T, D, false>(a); });
      else if (kernel == Kernel::kMmaRows)
        shadowkv_emu::launch(blocks, kThreads, smem, [&] { decode_partition_mma_kernel<T, D, true>(a); });
      else
        shadowkv_emu::launch(blocks, kThreads, mma_smem_bytes<T, D, 2>(a.tile_heads, a.part_size),
                             [&] { decode_partition_mma_kernel<T, D, true, 2>(a); });
    }
  } else if (kernel == Kernel::kPipelined) {
    if constexpr (sizeof(T) == 2 && (D == 64 || D == 128))
      shadowkv_emu::launch(blocks, kThreads, pipelined_smem_bytes<T, D>(a.tile_heads, a.part_size),
                           [&] { decode_partition_pipelined_kernel<T, D>(a); });
  } else {
    constexpr int kVec = D == 128 ? 4 : D == 64 ? 2 : 1, kNch = kVec == 1 ? 8 : 1;  // as the launch picks
    const size_t smem =
        sizeof(float) * static_cast<size_t>(std::max(a.tile_heads * a.part_size, kWarps * a.tile_heads * D));
    shadowkv_emu::launch(blocks, kThreads, smem, [&] { decode_partition_kernel<T, kVec, kNch>(a); });
  }
  shadowkv_emu::launch(static_cast<unsigned>(B * Hq), kThreads, 0, [&] { decode_reduce_kernel<T>(a); });
  const int64_t chunks = (scores_len + kScoreThreads - 1) / kScoreThreads;
  shadowkv_emu::launch(static_cast<unsigned>(B * Hkv * chunks), kScoreThreads, 0,
                       [&] { decode_scores_kernel(a, chunks); });

  // The reference: per (sequence, query head) the logits of every slot, then each partition's
  // (max, sum) and unnormalised output and the whole sequence's out and scores_out from them.
  int wrong = 0;
  const auto fail = [&](const std::string& where) {
    if (++wrong <= 5) shadowkv_test::report(__FILE__, __LINE__, what + ": " + where);
  };
  // Slot j of sequence b, KV head h, in a pool.
  const auto row = [&](const std::vector<T>& pool, int b, int j, int h) {
    const int page = tables[static_cast<size_t>(b) * max_pages + j / ps];
    return &pool[((static_cast<size_t>(page) * ps + j % ps) * Hkv + h) * D];
  };
  const double out_tol = sizeof(T) == 2 ? 1e-2 : 1e-5;  // the 16-bit rounding of out
  for (int b = 0; b < B; ++b) {
    const int len = c.lens[b];
    if (c.unchecked) {
      const bool expect_bad = b == c.bad_seq && c.bad_column * ps < len;
      if ((bad[b] != 0) != expect_bad) fail("bad[" + std::to_string(b) + "] = " + std::to_string(bad[b]));
      if (expect_bad) {  // no reference (its table holds a bad id): NaN everywhere after the reduce
        for (int64_t i = 0; i < int64_t{Hq} * D; ++i)
          if (!std::isnan(to_double(out[static_cast<size_t>(b) * Hq * D + i])))
            fail("out of a flagged sequence not NaN");
        for (int64_t i = 0; i < int64_t{Hkv} * scores_len; ++i)
          if (!std::isnan(scores[static_cast<size_t>(b) * Hkv * scores_len + i]))
            fail("scores of a flagged sequence not NaN");
        continue;
      }
    }
    std::vector<double> mass(static_cast<size_t>(Hkv) * scores_len, 0.0);
    for (int hq = 0; hq < Hq; ++hq) {
      const int h = hq / group;
      const size_t bq = static_cast<size_t>(b) * Hq + hq;
      std::vector<double> s(len);
      for (int j = 0; j < len; ++j) {
        const T* kr = row(k_pool, b, j, h);
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += to_double(q[bq * D + d]) * to_double(kr[d]);
        s[j] = dot * a.scale;
        const double got = logits[bq * max_len + j];
        if (!(std::fabs(got - s[j]) <= 1e-5 * (1 + std::fabs(s[j]))))
          fail("logit (b " + std::to_string(b) + ", hq " + std::to_string(hq) + ", slot " + std::to_string(j) +
               "): " + std::to_string(got) + " vs " + std::to_string(s[j]));
      }
      for (int j = len; j < max_len; ++j)
        if (!std::isnan(logits[bq * max_len + j])) fail("a logit past the sequence was written");

      for (int part = 0; part < a.num_parts; ++part) {
        const int k0 = part * c.part_size, n = std::min(c.part_size, len - k0);
        const float2 ml = part_ml[bq * a.num_parts + part];
        const float* acc = &part_acc[(bq * a.num_parts + part) * D];
        if (n <= 0) {  // never written
          if (!std::isnan(ml.x) || !std::isnan(acc[0])) fail("a partition past the sequence was written");
          continue;
        }
        const double m = *std::max_element(s.begin() + k0, s.begin() + k0 + n);
        double l = 0, vmax = 0;
        std::vector<double> o(D, 0.0);
        for (int j = k0; j < k0 + n; ++j) {
          const T* vr = row(v_pool, b, j, h);
          const double p = std::exp(s[j] - m);
          l += p;
          for (int d = 0; d < D; ++d) {
            o[d] += p * to_double(vr[d]);
            vmax = std::max(vmax, std::fabs(to_double(vr[d])));
          }
        }
        if (!(std::fabs(ml.x - m) <= 1e-5 * (1 + std::fabs(m)) && std::fabs(ml.y - l) <= 1e-5 * l))
          fail("(max, sum) of (b " + std::to_string(b) + ", hq " + std::to_string(hq) + ", part " +
               std::to_string(part) + "): " + std::to_string(ml.x) + ", " + std::to_string(ml.y) + " vs " +
               std::to_string(m) + ", " + std::to_string(l));
        for (int d = 0; d < D; ++d) {
          // fp32 accumulation of n terms <= vmax each, P to ~16 bits in the mma kernel.
          if (!(std::fabs(acc[d] - o[d]) <= 2e-5 * l * vmax))
            fail("output (b " + std::to_string(b) + ", hq " + std::to_string(hq) + ", part " + std::to_string(part) +
                 ", d " + std::to_string(d) + "): " + std::to_string(acc[d]) + " vs " + std::to_string(o[d]));
        }
      }

      // out and this head's share of scores_out, over the whole sequence.
      const double m = len > 0 ? *std::max_element(s.begin(), s.end()) : 0.0;
      double l = 0;
      std::vector<double> o(D, 0.0);
      for (int j = 0; j < len; ++j) {
        const T* vr = row(v_pool, b, j, h);
        const double pj = std::exp(s[j] - m);
        l += pj;
        for (int d = 0; d < D; ++d) o[d] += pj * to_double(vr[d]);
      }
      for (int d = 0; d < D; ++d) {
        const double got = to_double(out[bq * D + d]), want = len > 0 ? o[d] / l : 0.0;
        if (!(std::fabs(got - want) <= out_tol * (1 + std::fabs(want))))
          fail("out (b " + std::to_string(b) + ", hq " + std::to_string(hq) + ", d " + std::to_string(d) +
               "): " + std::to_string(got) + " vs " + std::to_string(want));
      }
      for (int j = 0; j < len; ++j) mass[static_cast<size_t>(h) * scores_len + j] += std::exp(s[j] - m) / l;
    }
    for (int h = 0; h < Hkv; ++h)
      for (int64_t j = 0; j < scores_len; ++j) {
        const double got = scores[(static_cast<size_t>(b) * Hkv + h) * scores_len + j];
        const double want = mass[static_cast<size_t>(h) * scores_len + j];
        if (!(std::fabs(got - want) <= 1e-5))
          fail("scores (b " + std::to_string(b) + ", h " + std::to_string(h) + ", slot " + std::to_string(j) +
               "): " + std::to_string(got) + " vs " + std::to_string(want));
      }
  }
}

// Shapes: GQA groups of 1-16 (two head tiles at 16, a partial tile at 3), pages of 1-16 slots that
// straddle the 32/64-slot chunks and the partitions, empty and one-slot sequences, partitions
// of 128 and 256 slots.
std::vector<Case> cases() {
  return {
      {{300, 0, 1, 65}, 8, 2, 16, 128},
      {{129, 64}, 3, 1, 3, 128},
      {{257}, 16, 1, 5, 256},
      {{40, 200}, 2, 2, 1, 128},
  };
}

template <typename T, int D>
void run_all(Kernel kernel, uint32_t seed) {
  for (const Case& c : cases()) run_case<T, D>(kernel, c, seed++);
}

TEST(emulated_decode_warp_bf16_d128) { run_all<__nv_bfloat16, 128>(Kernel::kWarp, 51); }
TEST(emulated_decode_warp_fp32_d64) { run_all<float, 64>(Kernel::kWarp, 61); }
// The generic layout (VEC 1, dims past D masked).
TEST(emulated_decode_warp_fp16_d80) { run_all<__half, 80>(Kernel::kWarp, 71); }
TEST(emulated_decode_mma_bf16_d128) { run_all<__nv_bfloat16, 128>(Kernel::kMma, 1); }
TEST(emulated_decode_mma_fp16_d64) { run_all<__half, 64>(Kernel::kMma, 11); }
TEST(emulated_decode_mma_rows_bf16_d128) { run_all<__nv_bfloat16, 128>(Kernel::kMmaRows, 81); }
TEST(emulated_decode_mma_rows_fp16_d64) { run_all<__half, 64>(Kernel::kMmaRows, 91); }
// The two-stage ring (cp_async_wait<0>: each chunk lands before the next is requested into the
// stage just read), at the smaller head dim: it runs under ThreadSanitizer, CI's longest stage
// (the unchecked test below runs it at bf16 d128 too).
TEST(emulated_decode_mma_rows_2stage_fp16_d64) { run_all<__half, 64>(Kernel::kMmaRows2Stage, 101); }
TEST(emulated_decode_pipelined_bf16_d128) { run_all<__nv_bfloat16, 128>(Kernel::kPipelined, 21); }
TEST(emulated_decode_pipelined_fp16_d64) { run_all<__half, 64>(Kernel::kPipelined, 31); }

// check=False calls: a page id outside the pool in a column a partition reads flags the sequence
// (and nothing is read from it); the other sequences are exact.
TEST(emulated_decode_unchecked_bad_page) {
  for (Kernel kernel : {Kernel::kMma, Kernel::kMmaRows, Kernel::kMmaRows2Stage, Kernel::kPipelined, Kernel::kWarp}) {
    Case c{{200, 150}, 4, 2, 16, 128};
    c.unchecked = true;
    c.bad_seq = 0;
    c.bad_column = 9;  // slots 144-159: the second partition
    for (int id : {-1, 1 << 20}) {
      c.bad_id = id;
      run_case<__nv_bfloat16, 128>(kernel, c, 41);
    }
  }
}

// Runs decode_check_kernel on `c` (scores_len < 0: no scores_out) and reports where its verdict
// or longest length differs from the host checks of paged_decode_attention_cpu (check_paged_cache,
// the scores_out length, check_block_tables on the used columns); returns the host verdict.
bool compare_check(const std::string& what, const PagedKVCache& c, int64_t scores_len) {
  bool host_bad = false;
  int64_t host_max = 0;
  try {
    check_paged_cache(c, "test");
    PagedDecodeParams p{};
    p.cache = c;
    float scores = 0;  // only whether it is set counts
    p.scores = scores_len >= 0 ? &scores : nullptr;
    p.scores_len = scores_len;
    check_decode_tables(p, "test");
    for (int64_t b = 0; b < c.batch; ++b) host_max = std::max(host_max, c.seq_len(b));
  } catch (const std::invalid_argument&) {
    host_bad = true;
  }
  int result[2] = {0, 0};
  const int64_t items = c.batch * std::max<int64_t>(c.max_pages, 1);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + kCheckThreads - 1) / kCheckThreads, 2));
  shadowkv_emu::launch(blocks, kCheckThreads, 0,
                       [&] { decode_check_kernel(c, c.slot_capacity(), scores_len, result); });
  if ((result[1] != 0) != host_bad || (!host_bad && result[0] != host_max))
    shadowkv_test::report(__FILE__, __LINE__, what + ": device verdict " + std::to_string(result[1]) + ", longest " +
                                                  std::to_string(result[0]) + "; host " + (host_bad ? "bad" : "good") +
                                                  ", longest " + std::to_string(host_max));
  return host_bad;
}

// A cache of B sequences for the check kernel: no K/V values, row-major block tables.
PagedKVCache check_cache(int64_t B, int64_t max_pages, int64_t ps, int64_t num_pages, int32_t* lens, int32_t* tables) {
  static float dummy = 0;
  PagedKVCache c{};
  c.num_pages = num_pages;
  c.page_size = ps;
  c.num_kv_heads = 1;
  c.head_dim = 1;
  c.batch = B;
  c.max_pages = max_pages;
  c.dtype = DType::kFloat32;
  c.k_pages = c.v_pages = &dummy;
  c.seq_lens = lens;
  c.block_tables = tables;
  c.bt_stride[0] = max_pages;
  c.bt_stride[1] = 1;
  return c;
}

// A checked call's value checks on the device (decode_check_kernel) give the verdict of the host
// checks of paged_decode_attention_cpu (check_paged_cache, the scores_out length, check_block_tables
// on the used columns) and the longest sequence, on random tables with one bad value or none:
// lengths outside [0, capacity] or above scores_len, used entries outside the pool, garbage in
// unused columns (not an error), strided tables and lengths.
TEST(emulated_decode_check_matches_host_check) {
  std::mt19937 rng(7);
  const auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int flagged = 0;
  for (int iter = 0; iter < 300; ++iter) {
    const int B = uniform(1, 6), max_pages = uniform(0, 7), ps = uniform(1, 5), num_pages = uniform(1, 40);
    const bool transposed = uniform(0, 1) == 1, scores = uniform(0, 1) == 1;
    const int capacity = max_pages * ps;
    std::vector<int32_t> lens(2 * static_cast<size_t>(B), -7);  // stride 2: the odd entries are never read
    std::vector<int32_t> tables(static_cast<size_t>(B) * std::max(max_pages, 1), 12345);
    PagedKVCache c = check_cache(B, max_pages, ps, num_pages, lens.data(), tables.data());
    c.seq_lens_stride = 2;
    c.bt_stride[0] = transposed ? 1 : max_pages;
    c.bt_stride[1] = transposed ? B : 1;
    for (int b = 0; b < B; ++b) {
      const int len = uniform(0, capacity);
      lens[2 * static_cast<size_t>(b)] = len;
      for (int i = 0; i < max_pages; ++i)
        c.page_id(b, i) = i < (len + ps - 1) / ps ? uniform(0, num_pages - 1) : uniform(-3, num_pages + 3);
    }
    int64_t scores_len = -1;
    if (scores) scores_len = uniform(0, capacity + 1);
    switch (uniform(0, 5)) {  // one bad value, or none
      case 0: lens[2 * static_cast<size_t>(uniform(0, B - 1))] = uniform(-5, -1); break;
      case 1: lens[2 * static_cast<size_t>(uniform(0, B - 1))] = capacity + uniform(1, 3); break;
      case 2: {
        const int b = uniform(0, B - 1), used = (c.seq_len(b) + ps - 1) / ps;
        if (used > 0) c.page_id(b, uniform(0, used - 1)) = uniform(0, 1) == 1 ? -1 : num_pages + uniform(0, 2);
        break;
      }
      default: break;
    }
    flagged += compare_check("iteration " + std::to_string(iter), c, scores_len);
  }
  CHECK(flagged > 50 && flagged < 250);  // both verdicts drawn
}

// decode_check_kernel at the edges the random draws miss: a capacity capped at INT32_MAX with
// lengths and scores_len near it, a page of INT32_MAX slots, no block-table columns, negative
// strides (the tables and lengths read backwards).
TEST(emulated_decode_check_edges) {
  {  // 4096 pages of 2^20 slots: capacity capped at INT32_MAX; every column reads one entry
    int32_t lens[2] = {INT32_MAX, 0}, t[1] = {3};
    PagedKVCache c = check_cache(2, 4096, 1 << 20, 5, lens, t);
    c.bt_stride[0] = c.bt_stride[1] = 0;
    compare_check("capped capacity, len INT32_MAX", c, -1);
    compare_check("capped capacity, scores_len INT32_MAX - 1", c, INT32_MAX - 1);
    compare_check("capped capacity, scores_len INT32_MAX", c, INT32_MAX);
    t[0] = 5;
    compare_check("capped capacity, a page id past the pool", c, -1);
  }
  {  // one page of INT32_MAX slots
    int32_t lens[3] = {INT32_MAX, 1, 0}, t[3] = {0, 0, -5};
    compare_check("page of INT32_MAX slots", check_cache(3, 1, INT32_MAX, 1, lens, t), -1);
  }
  {  // a capacity of INT32_MAX - 1 slots
    int32_t lens[1] = {INT32_MAX}, t[1] = {0};
    PagedKVCache c = check_cache(1, 1, INT32_MAX - 1, 1, lens, t);
    compare_check("len past a capacity of INT32_MAX - 1", c, -1);
    lens[0] = INT32_MIN;
    compare_check("len INT32_MIN", c, -1);
  }
  {  // no block-table columns
    int32_t lens[3] = {0, 0, 0};
    PagedKVCache c = check_cache(3, 0, 16, 0, lens, nullptr);
    compare_check("no columns, empty sequences", c, 0);
    lens[1] = 1;
    compare_check("no columns, a non-empty sequence", c, -1);
  }
  {  // negative strides: sequence b's length at lens[2 - b], its column i at t[8 - 3 b - i]
    int32_t lens[3] = {5, 0, 9}, t[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
    PagedKVCache c = check_cache(3, 3, 4, 9, lens + 2, t + 8);
    c.seq_lens_stride = -1;
    c.bt_stride[0] = -3;
    c.bt_stride[1] = -1;
    compare_check("negative strides", c, -1);
    compare_check("negative strides, scores_len below a length", c, 8);
    t[6] = 9;
    compare_check("negative strides, a used id past the pool", c, -1);
    t[6] = 6;
    t[0] = 9;  // sequence 2, column 2: unused (length 5)
    compare_check("negative strides, an unused id past the pool", c, -1);
  }
}

}  // namespace
