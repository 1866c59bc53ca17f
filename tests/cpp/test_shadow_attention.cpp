// shadow_attention_fwd_cpu / shadow_attention_bwd_cpu against a float64 reference (forward)
// and central finite differences of that reference (backward), on small shapes with the edge
// cases: empty dimensions, D = 0 and 1, GQA/MQA, rows that see no key, ragged batches, several
// key/query tiles, strided layouts, every dtype and every ParallelFor flavour.
#include <cmath>
#include <string>
#include <vector>

#include "harness.h"
#include "util.h"

namespace {

using namespace shadowkv_test;
using shadowkv::ShadowAttentionBwdParams;
using shadowkv::ShadowAttentionParams;

struct Shape {
  int64_t B, Hq, Hkv, Lq, Lk, D, q_offset;
};

std::string describe(const Shape& s) {
  return "B=" + std::to_string(s.B) + " Hq=" + std::to_string(s.Hq) + " Hkv=" + std::to_string(s.Hkv) +
         " Lq=" + std::to_string(s.Lq) + " Lk=" + std::to_string(s.Lk) + " D=" + std::to_string(s.D) +
         " q_offset=" + std::to_string(s.q_offset);
}

enum class EvictMode { kRandom, kWindow, kAllEvicted, kNone };

// One problem in float64, dense and contiguous: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D], ev [B,Hkv,Lk].
struct Problem {
  Shape s;
  double scale = 1.0;
  std::vector<double> q, k, v;
  std::vector<int32_t> ev;

  size_t qi(int64_t b, int64_t h, int64_t i, int64_t d) const { return ((b * s.Hq + h) * s.Lq + i) * s.D + d; }
  size_t ki(int64_t b, int64_t h, int64_t j, int64_t d) const { return ((b * s.Hkv + h) * s.Lk + j) * s.D + d; }
  size_t ei(int64_t b, int64_t h, int64_t j) const { return (b * s.Hkv + h) * s.Lk + j; }
  size_t ri(int64_t b, int64_t h, int64_t i) const { return (b * s.Hq + h) * s.Lq + i; }
};

// Inputs rounded to T, so the reference sees exactly what the kernel reads.
template <typename T>
Problem make_problem(const Shape& s, EvictMode mode, uint64_t seed) {
  Rng rng(seed);
  Problem p;
  p.s = s;
  p.scale = s.D > 0 ? 1.0 / std::sqrt(static_cast<double>(s.D)) : 1.0;
  for (auto* t : {&p.q, &p.k, &p.v}) {
    const int64_t heads = t == &p.q ? s.Hq : s.Hkv, len = t == &p.q ? s.Lq : s.Lk;
    t->resize(static_cast<size_t>(s.B * heads * len * s.D));
    for (double& x : *t) x = round_to<T>(rng.normal());
  }
  p.ev.resize(static_cast<size_t>(s.B * s.Hkv * s.Lk));
  const int64_t last = s.q_offset + s.Lq;  // one past the last query position
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hkv; ++h)
      for (int64_t j = 0; j < s.Lk; ++j) {
        int64_t e = kNever;
        switch (mode) {
          case EvictMode::kNone: break;
          case EvictMode::kAllEvicted: e = 0; break;
          case EvictMode::kWindow: e = j < 2 ? kNever : j + 16; break;  // 2 sinks + a window of 16
          case EvictMode::kRandom:
            switch (rng.uniform(0, 9)) {
              case 4: case 5: case 6: e = j + 1 + rng.uniform(0, last); break;   // evicted later
              case 7: e = 0; break;                                          // padding key
              case 8: e = rng.uniform(0, j); break;                          // gone before its own position
              case 9: e = s.q_offset + rng.uniform(0, s.Lq); break;          // evicted among the queries
              default: break;                                                // never evicted
            }
        }
        p.ev[p.ei(b, h, j)] = static_cast<int32_t>(std::min<int64_t>(e, kNever));
      }
  return p;
}

// Reference forward: out [B,Hq,Lq,D], lse [B,Hq,Lq] (-inf and zeros for a row that sees nothing).
void reference(const Problem& p, std::vector<double>& out, std::vector<double>& lse) {
  const Shape& s = p.s;
  out.assign(static_cast<size_t>(s.B * s.Hq * s.Lq * s.D), 0.0);
  lse.assign(static_cast<size_t>(s.B * s.Hq * s.Lq), -INFINITY);
  if (s.Hq == 0) return;
  const int64_t group = s.Hq / s.Hkv;
  std::vector<double> sc(static_cast<size_t>(s.Lk));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t hk = hq / group, pos = s.q_offset + i;
        double m = -INFINITY;
        for (int64_t j = 0; j < s.Lk; ++j) {
          sc[j] = -INFINITY;
          if (!(j <= pos && pos < p.ev[p.ei(b, hk, j)])) continue;
          double dot = 0;
          for (int64_t d = 0; d < s.D; ++d) dot += p.q[p.qi(b, hq, i, d)] * p.k[p.ki(b, hk, j, d)];
          sc[j] = dot * p.scale;
          m = std::max(m, sc[j]);
        }
        if (m == -INFINITY) continue;
        double l = 0;
        for (int64_t j = 0; j < s.Lk; ++j) l += std::exp(sc[j] - m);
        lse[p.ri(b, hq, i)] = m + std::log(l);
        for (int64_t j = 0; j < s.Lk; ++j) {
          const double w = std::exp(sc[j] - m) / l;
          if (w == 0.0) continue;
          for (int64_t d = 0; d < s.D; ++d) out[p.qi(b, hq, i, d)] += w * p.v[p.ki(b, hk, j, d)];
        }
      }
}

template <typename T>
using lse_t = typename shadowkv::acc_type<T>::type;

// Kernel-side buffers of one problem, in the given layouts; outputs start as NaN. lse and
// evicted_at have gaps between their rows (filled with NaN / a key that is always visible).
template <typename T>
struct Buffers {
  Tensor4<T> q, k, v, out;
  std::vector<lse_t<T>> lse;
  std::vector<int32_t> ev;
  ShadowAttentionParams p;

  Buffers(const Problem& pr, Layout lq, Layout lkv, Layout lo)
      : q(pr.s.B, pr.s.Hq, pr.s.Lq, pr.s.D, lq),
        k(pr.s.B, pr.s.Hkv, pr.s.Lk, pr.s.D, lkv),
        v(pr.s.B, pr.s.Hkv, pr.s.Lk, pr.s.D, lkv == Layout::kPadded ? Layout::kContiguous : Layout::kPadded),
        out(pr.s.B, pr.s.Hq, pr.s.Lq, pr.s.D, lo) {
    const Shape& s = pr.s;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t d = 0; d < s.D; ++d) {
        for (int64_t h = 0; h < s.Hq; ++h)
          for (int64_t i = 0; i < s.Lq; ++i) q.set(b, h, i, d, pr.q[pr.qi(b, h, i, d)]);
        for (int64_t h = 0; h < s.Hkv; ++h)
          for (int64_t j = 0; j < s.Lk; ++j) {
            k.set(b, h, j, d, pr.k[pr.ki(b, h, j, d)]);
            v.set(b, h, j, d, pr.v[pr.ki(b, h, j, d)]);
          }
      }
    p.batch = s.B;
    p.num_q_heads = s.Hq;
    p.num_kv_heads = s.Hkv;
    p.q_len = s.Lq;
    p.kv_len = s.Lk;
    p.head_dim = s.D;
    p.q_offset = s.q_offset;
    p.scale = pr.scale;
    p.dtype = dtype_of<T>();
    p.ev_stride[1] = s.Lk + 1;
    p.ev_stride[0] = s.Hkv * p.ev_stride[1];
    const bool no_ev = s.B == 0 || s.Hkv == 0 || s.Lk == 0;
    ev.assign(no_ev ? 0 : static_cast<size_t>((s.B - 1) * p.ev_stride[0] + (s.Hkv - 1) * p.ev_stride[1] + s.Lk), kNever);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hkv; ++h)
        for (int64_t j = 0; j < s.Lk; ++j) ev[b * p.ev_stride[0] + h * p.ev_stride[1] + j] = pr.ev[pr.ei(b, h, j)];
    p.lse_stride[1] = s.Lq + 2;
    p.lse_stride[0] = s.Hq * p.lse_stride[1];
    const bool no_lse = s.B == 0 || s.Hq == 0 || s.Lq == 0;
    lse.assign(no_lse ? 0 : static_cast<size_t>((s.B - 1) * p.lse_stride[0] + (s.Hq - 1) * p.lse_stride[1] + s.Lq),
               static_cast<lse_t<T>>(nan()));
    p.q = q.ptr();
    p.k = k.ptr();
    p.v = v.ptr();
    p.out = out.ptr();
    p.evicted_at = ev.empty() ? nullptr : ev.data();
    p.lse = lse.empty() ? nullptr : lse.data();
    std::copy_n(q.stride, 3, p.q_stride);
    std::copy_n(k.stride, 3, p.k_stride);
    std::copy_n(v.stride, 3, p.v_stride);
    std::copy_n(out.stride, 3, p.o_stride);
  }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;

  double lse_at(int64_t b, int64_t h, int64_t i) const {
    return static_cast<double>(lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i]);
  }
};

// Dense copy of a Tensor4 in [n0, n1, n2, d] order.
template <typename T>
std::vector<double> dense(const Tensor4<T>& t) {
  std::vector<double> r;
  r.reserve(static_cast<size_t>(t.n0 * t.n1 * t.n2 * t.d));
  for (int64_t a = 0; a < t.n0; ++a)
    for (int64_t b = 0; b < t.n1; ++b)
      for (int64_t c = 0; c < t.n2; ++c)
        for (int64_t d = 0; d < t.d; ++d) r.push_back(t.get(a, b, c, d));
  return r;
}

// Reports the first mismatch (and how many) of got vs want; -inf must match -inf exactly.
void expect_close(const std::string& label, const std::vector<double>& got, const std::vector<double>& want,
                  double atol, double rtol) {
  if (got.size() != want.size()) {
    report(__FILE__, __LINE__, label + ": size " + std::to_string(got.size()) + " vs " + std::to_string(want.size()));
    return;
  }
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = std::isinf(want[i]) ? got[i] == want[i] : std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]);
    if (!ok && bad++ == 0) first = i;
  }
  if (bad)
    report(__FILE__, __LINE__,
           label + ": " + std::to_string(bad) + " of " + std::to_string(got.size()) + " differ, first at " +
               std::to_string(first) + ": " + std::to_string(got[first]) + " vs " + std::to_string(want[first]));
}

struct Tol {
  double fwd, bwd;
};
template <typename T>
constexpr Tol tol();
template <>
constexpr Tol tol<double>() { return {1e-10, 1e-6}; }
template <>
constexpr Tol tol<float>() { return {2e-5, 2e-3}; }
template <>
constexpr Tol tol<shadowkv::bf16_t>() { return {2e-2, 8e-2}; }
template <>
constexpr Tol tol<shadowkv::fp16_t>() { return {4e-3, 2e-2}; }

// Runs the forward kernel on `pr` and compares out and lse with the reference.
template <typename T>
void check_forward(const Problem& pr, Layout lq, Layout lkv, Layout lo, const shadowkv::ParallelFor& pf,
                   const std::string& label) {
  Buffers<T> buf(pr, lq, lkv, lo);
  shadowkv::shadow_attention_fwd_cpu(buf.p, pf);
  std::vector<double> out, lse;
  reference(pr, out, lse);
  std::vector<double> got_lse;
  for (int64_t b = 0; b < pr.s.B; ++b)
    for (int64_t h = 0; h < pr.s.Hq; ++h)
      for (int64_t i = 0; i < pr.s.Lq; ++i) got_lse.push_back(buf.lse_at(b, h, i));
  const double t = tol<T>().fwd;
  expect_close(label + " out", dense(buf.out), out, t, t);
  expect_close(label + " lse", got_lse, lse, t, t);
}

const std::vector<Shape>& forward_shapes() {
  static const std::vector<Shape> shapes{
      {2, 4, 2, 5, 7, 3, 0},      // GQA, one tile
      {1, 1, 1, 1, 1, 1, 0},      // the smallest problem, D = 1
      {1, 3, 1, 70, 130, 1, 0},   // MQA, D = 1, three query tiles x three key tiles (partial last ones)
      {2, 2, 2, 33, 65, 5, 60},   // tile edges + 1, queries past the last key
      {1, 2, 1, 40, 200, 8, 170}, // decode-like: few queries late in a long context
      {3, 6, 3, 4, 9, 2, 3},
  };
  return shapes;
}

}  // namespace

TEST(shadow_attention_fwd_matches_reference) {
  uint64_t seed = 1;
  for (const Shape& s : forward_shapes())
    for (EvictMode mode : {EvictMode::kRandom, EvictMode::kWindow, EvictMode::kNone}) {
      const std::string label = describe(s) + " mode " + std::to_string(static_cast<int>(mode));
      check_forward<double>(make_problem<double>(s, mode, ++seed), Layout::kContiguous, Layout::kContiguous,
                            Layout::kContiguous, shadowkv::serial_for, label + " f64");
      check_forward<float>(make_problem<float>(s, mode, ++seed), Layout::kSwap12, Layout::kPadded,
                           Layout::kPadded, reverse_items_for, label + " f32");
      check_forward<shadowkv::bf16_t>(make_problem<shadowkv::bf16_t>(s, mode, ++seed), Layout::kPadded,
                                      Layout::kSwap12, Layout::kSwap12, threaded_for, label + " bf16");
      check_forward<shadowkv::fp16_t>(make_problem<shadowkv::fp16_t>(s, mode, ++seed), Layout::kContiguous,
                                      Layout::kPadded, Layout::kContiguous, threaded_for, label + " f16");
    }
}

TEST(shadow_attention_fwd_same_bits_for_every_parallel_for) {
  const Shape s{2, 4, 2, 37, 150, 6, 20};
  const Problem pr = make_problem<float>(s, EvictMode::kRandom, 99);
  std::vector<std::vector<double>> outs;
  for (const auto& pf : all_parallel_fors()) {
    Buffers<float> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
    shadowkv::shadow_attention_fwd_cpu(buf.p, pf);
    outs.push_back(dense(buf.out));
  }
  for (const auto& o : outs) CHECK(o == outs[0]);
}

// A row that sees no key gives exactly zeros and lse = -inf, never NaN: every key evicted, or
// only keys evicted before the row's position, or a key past the query (causality).
TEST(shadow_attention_fwd_rows_that_see_nothing) {
  for (const Shape& s : {Shape{2, 4, 2, 5, 7, 3, 0}, Shape{1, 2, 1, 70, 130, 1, 0}}) {
    const Problem pr = make_problem<double>(s, EvictMode::kAllEvicted, 5);
    Buffers<double> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
    shadowkv::shadow_attention_fwd_cpu(buf.p);
    for (double x : dense(buf.out)) CHECK(x == 0.0);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hq; ++h)
        for (int64_t i = 0; i < s.Lq; ++i) CHECK(buf.lse_at(b, h, i) == -INFINITY);
  }
  // Keys 0..2 are evicted at 1..3 (each one step after its own position); keys 3.. are never
  // visible. Query 0 sees key 0, query 1 key 1, query 2 key 2, queries 3.. nothing.
  Problem pr = make_problem<double>(Shape{1, 1, 1, 6, 6, 2, 0}, EvictMode::kNone, 6);
  for (int64_t j = 0; j < 6; ++j) pr.ev[j] = j < 3 ? static_cast<int32_t>(j + 1) : 0;
  Buffers<double> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
  shadowkv::shadow_attention_fwd_cpu(buf.p);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t d = 0; d < 2; ++d) CHECK(buf.out.get(0, 0, i, d) == (i < 3 ? pr.v[pr.ki(0, 0, i, d)] : 0.0));
  for (int64_t i = 3; i < 6; ++i) CHECK(buf.lse_at(0, 0, i) == -INFINITY);
}

// Ragged batch: sequence 1 is 4 keys long and padded to 9 with evicted_at = 0. Its rows must be
// bit-identical to a batch of one with only its 4 keys.
TEST(shadow_attention_fwd_ragged_batch) {
  const Shape s{2, 4, 2, 3, 9, 3, 3};
  Problem pr = make_problem<float>(s, EvictMode::kRandom, 11);
  for (int64_t h = 0; h < s.Hkv; ++h)
    for (int64_t j = 4; j < s.Lk; ++j) pr.ev[pr.ei(1, h, j)] = 0;
  Buffers<float> both(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
  shadowkv::shadow_attention_fwd_cpu(both.p);

  Problem one = make_problem<float>(Shape{1, 4, 2, 3, 4, 3, 3}, EvictMode::kNone, 12);
  for (int64_t h = 0; h < s.Hq; ++h)
    for (int64_t i = 0; i < s.Lq; ++i)
      for (int64_t d = 0; d < s.D; ++d) one.q[one.qi(0, h, i, d)] = pr.q[pr.qi(1, h, i, d)];
  for (int64_t h = 0; h < s.Hkv; ++h)
    for (int64_t j = 0; j < 4; ++j) {
      one.ev[one.ei(0, h, j)] = pr.ev[pr.ei(1, h, j)];
      for (int64_t d = 0; d < s.D; ++d) {
        one.k[one.ki(0, h, j, d)] = pr.k[pr.ki(1, h, j, d)];
        one.v[one.ki(0, h, j, d)] = pr.v[pr.ki(1, h, j, d)];
      }
    }
  Buffers<float> single(one, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
  shadowkv::shadow_attention_fwd_cpu(single.p);
  for (int64_t h = 0; h < s.Hq; ++h)
    for (int64_t i = 0; i < s.Lq; ++i) {
      CHECK(both.lse_at(1, h, i) == single.lse_at(0, h, i));  // -inf == -inf for an empty row
      for (int64_t d = 0; d < s.D; ++d) CHECK(both.out.get(1, h, i, d) == single.out.get(0, h, i, d));
    }
  check_forward<float>(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous, shadowkv::serial_for,
                       "ragged");
}

// Empty dimensions (null pointers where a tensor has no element) and D = 0.
TEST(shadow_attention_fwd_empty_shapes) {
  for (const Shape& s : {Shape{0, 2, 1, 3, 4, 2, 0}, Shape{2, 0, 0, 3, 4, 2, 0}, Shape{2, 0, 2, 3, 4, 2, 0},
                         Shape{2, 2, 1, 0, 4, 2, 0}, Shape{2, 2, 1, 3, 0, 2, 0}, Shape{2, 2, 1, 3, 4, 0, 1},
                         Shape{1, 2, 2, 0, 0, 0, 0}}) {
    for (const auto& pf : all_parallel_fors()) {
      check_forward<float>(make_problem<float>(s, EvictMode::kRandom, 3), Layout::kContiguous, Layout::kPadded,
                           Layout::kContiguous, pf, "empty " + describe(s));
      check_forward<shadowkv::bf16_t>(make_problem<shadowkv::bf16_t>(s, EvictMode::kRandom, 4), Layout::kPadded,
                                      Layout::kContiguous, Layout::kSwap12, pf, "empty " + describe(s));
    }
  }
}

TEST(shadow_attention_rejects_bad_params) {
  const Problem pr = make_problem<float>(Shape{1, 4, 2, 3, 5, 2, 0}, EvictMode::kRandom, 7);
  auto expect_rejected = [&](auto mutate, const char* needle) {
    Buffers<float> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
    mutate(buf.p);
    CHECK_THROWS(shadowkv::shadow_attention_fwd_cpu(buf.p), needle);
    for (double x : dense(buf.out)) CHECK(std::isnan(x));  // nothing written
    ShadowAttentionBwdParams bp;
    bp.fwd = buf.p;
    CHECK_THROWS(shadowkv::shadow_attention_bwd_cpu(bp), needle);
  };
  expect_rejected([](ShadowAttentionParams& p) { p.kv_len = -1; }, "negative shape");
  expect_rejected([](ShadowAttentionParams& p) { p.head_dim = -2; }, "negative shape");
  expect_rejected([](ShadowAttentionParams& p) { p.num_q_heads = 3; }, "multiple of num_kv_heads");
  expect_rejected([](ShadowAttentionParams& p) { p.num_kv_heads = 0; }, "multiple of num_kv_heads");
  expect_rejected([](ShadowAttentionParams& p) { p.q_offset = -1; }, "q_offset must be >= 0");
  expect_rejected([](ShadowAttentionParams& p) { p.scale = 0.0; }, "scale must be positive and finite");
  expect_rejected([](ShadowAttentionParams& p) { p.scale = INFINITY; }, "scale must be positive and finite");
  expect_rejected([](ShadowAttentionParams& p) { p.scale = nan(); }, "scale must be positive and finite");
  // Finite as a double but inf in the float32 kernels (out and lse came back NaN).
  expect_rejected([](ShadowAttentionParams& p) { p.scale = 1e39; }, "scale must be positive and finite");
  // Products and sums that overflow int64 (tile bounds were sized from a wrapped count).
  expect_rejected([](ShadowAttentionParams& p) { p.batch = int64_t{1} << 62; }, "overflows int64");
  expect_rejected([](ShadowAttentionParams& p) { p.q_offset = INT64_MAX - 1; }, "must fit the int32 positions");
  expect_rejected([](ShadowAttentionParams& p) { p.kv_len = int64_t{1} << 31; }, "must fit the int32 positions");
  // Null pointers of non-empty tensors (they were dereferenced).
  expect_rejected([](ShadowAttentionParams& p) { p.q = nullptr; }, "q/out must not be null");
  expect_rejected([](ShadowAttentionParams& p) { p.lse = nullptr; }, "lse must not be null");
  expect_rejected([](ShadowAttentionParams& p) { p.evicted_at = nullptr; }, "evicted_at must not be null");
  Buffers<float> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
  ShadowAttentionBwdParams bp;
  bp.fwd = buf.p;  // a valid forward, but no gradient buffers
  CHECK_THROWS(shadowkv::shadow_attention_bwd_cpu(bp), "grad_out/grad_q must not be null");
  expect_rejected([](ShadowAttentionParams& p) { p.dtype = static_cast<shadowkv::DType>(9); }, "unsupported dtype");
}

namespace {

// Backward buffers: a forward run (its out and lse feed the backward), grad_out in one layout
// and the three gradients in others; grad_lse optional with gaps between rows.
template <typename T>
struct BwdBuffers {
  Buffers<T> f;
  Tensor4<T> dout, dq, dk, dv;
  std::vector<lse_t<T>> glse;
  ShadowAttentionBwdParams bp;

  BwdBuffers(const Problem& pr, const std::vector<double>& g, const std::vector<double>* gl, Layout la, Layout lb)
      : f(pr, la, lb, lb),
        dout(pr.s.B, pr.s.Hq, pr.s.Lq, pr.s.D, lb),
        dq(pr.s.B, pr.s.Hq, pr.s.Lq, pr.s.D, la),
        dk(pr.s.B, pr.s.Hkv, pr.s.Lk, pr.s.D, lb),
        dv(pr.s.B, pr.s.Hkv, pr.s.Lk, pr.s.D, la) {
    const Shape& s = pr.s;
    shadowkv::shadow_attention_fwd_cpu(f.p);
    bp.fwd = f.p;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hq; ++h)
        for (int64_t i = 0; i < s.Lq; ++i)
          for (int64_t d = 0; d < s.D; ++d) dout.set(b, h, i, d, g[pr.qi(b, h, i, d)]);
    bp.grad_out = dout.ptr();
    bp.grad_q = dq.ptr();
    bp.grad_k = dk.ptr();
    bp.grad_v = dv.ptr();
    std::copy_n(dout.stride, 3, bp.do_stride);
    std::copy_n(dq.stride, 3, bp.dq_stride);
    std::copy_n(dk.stride, 3, bp.dk_stride);
    std::copy_n(dv.stride, 3, bp.dv_stride);
    if (gl) {
      bp.glse_stride[1] = s.Lq + 1;
      bp.glse_stride[0] = s.Hq * bp.glse_stride[1];
      const bool empty = s.B == 0 || s.Hq == 0 || s.Lq == 0;
      glse.assign(empty ? 0 : static_cast<size_t>((s.B - 1) * bp.glse_stride[0] + (s.Hq - 1) * bp.glse_stride[1] + s.Lq),
                  static_cast<lse_t<T>>(nan()));
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < s.Hq; ++h)
          for (int64_t i = 0; i < s.Lq; ++i)
            glse[b * bp.glse_stride[0] + h * bp.glse_stride[1] + i] = static_cast<lse_t<T>>((*gl)[pr.ri(b, h, i)]);
      bp.grad_lse = glse.empty() ? nullptr : glse.data();
    }
  }
};

// sum(out * g) + sum over rows that see a key of lse * gl.
double loss(const Problem& pr, const std::vector<double>& g, const std::vector<double>& gl) {
  std::vector<double> out, lse;
  reference(pr, out, lse);
  double sum = 0;
  for (size_t i = 0; i < out.size(); ++i) sum += out[i] * g[i];
  for (size_t i = 0; i < lse.size(); ++i)
    if (std::isfinite(lse[i])) sum += lse[i] * gl[i];
  return sum;
}

// d loss / d (pr.*field), by central differences of the float64 reference.
std::vector<double> finite_difference(Problem pr, std::vector<double> Problem::*field, const std::vector<double>& g,
                                      const std::vector<double>& gl) {
  constexpr double h = 1e-5;
  std::vector<double>& x = pr.*field;
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = loss(pr, g, gl);
    x[i] = x0 - h;
    const double down = loss(pr, g, gl);
    x[i] = x0;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

template <typename T>
void check_backward(const Shape& s, EvictMode mode, bool with_glse, Layout la, Layout lb,
                    const shadowkv::ParallelFor& pf, uint64_t seed) {
  const Problem pr = make_problem<T>(s, mode, seed);
  Rng rng(seed + 1000);
  std::vector<double> g(pr.q.size()), gl(static_cast<size_t>(s.B * s.Hq * s.Lq), 0.0);
  for (double& x : g) x = round_to<T>(rng.normal());
  if (with_glse)
    for (double& x : gl) x = static_cast<lse_t<T>>(rng.normal());
  BwdBuffers<T> buf(pr, g, with_glse ? &gl : nullptr, la, lb);
  shadowkv::shadow_attention_bwd_cpu(buf.bp, pf);
  const std::string label = describe(s) + " mode " + std::to_string(static_cast<int>(mode)) +
                            (with_glse ? " with grad_lse" : "") + " " + shadowkv::dtype_name(dtype_of<T>());
  const double t = tol<T>().bwd;
  expect_close(label + " grad_q", dense(buf.dq), finite_difference(pr, &Problem::q, g, gl), t, t);
  expect_close(label + " grad_k", dense(buf.dk), finite_difference(pr, &Problem::k, g, gl), t, t);
  expect_close(label + " grad_v", dense(buf.dv), finite_difference(pr, &Problem::v, g, gl), t, t);
}

}  // namespace

TEST(shadow_attention_bwd_matches_finite_differences) {
  const std::vector<Shape> shapes{
      {2, 4, 2, 5, 7, 3, 0},    {1, 1, 1, 1, 1, 1, 0},  {1, 2, 1, 40, 70, 2, 30}, {1, 2, 2, 3, 4, 0, 0},
      {2, 2, 1, 0, 5, 3, 0},    {1, 2, 1, 4, 0, 3, 0},  {1, 0, 2, 4, 5, 3, 0},    {0, 2, 1, 3, 3, 2, 0},
      {2, 3, 3, 6, 66, 1, 2},
  };
  uint64_t seed = 100;
  for (const Shape& s : shapes)
    for (EvictMode mode : {EvictMode::kRandom, EvictMode::kWindow})
      for (bool with_glse : {false, true}) {
        check_backward<double>(s, mode, with_glse, Layout::kContiguous, Layout::kContiguous, shadowkv::serial_for,
                               ++seed);
        check_backward<float>(s, mode, with_glse, Layout::kSwap12, Layout::kPadded, reverse_items_for, ++seed);
        check_backward<shadowkv::bf16_t>(s, mode, with_glse, Layout::kPadded, Layout::kSwap12, threaded_for, ++seed);
        check_backward<shadowkv::fp16_t>(s, mode, with_glse, Layout::kContiguous, Layout::kPadded, threaded_for,
                                         ++seed);
      }
}

// No visible pair: every gradient is exactly zero (the outputs start as NaN).
TEST(shadow_attention_bwd_zero_when_nothing_is_visible) {
  for (const Shape& s : {Shape{2, 4, 2, 5, 7, 3, 0}, Shape{1, 2, 1, 40, 70, 2, 0}, Shape{2, 2, 1, 3, 0, 2, 0},
                         Shape{2, 2, 1, 0, 4, 2, 0}, Shape{2, 0, 2, 3, 4, 2, 0}}) {
    for (const auto& pf : all_parallel_fors()) {
      const Problem pr = make_problem<float>(s, EvictMode::kAllEvicted, 8);
      std::vector<double> g(pr.q.size(), 1.0), gl(static_cast<size_t>(s.B * s.Hq * s.Lq), 1.0);
      BwdBuffers<float> buf(pr, g, &gl, Layout::kPadded, Layout::kSwap12);
      shadowkv::shadow_attention_bwd_cpu(buf.bp, pf);
      for (const auto* t : {&buf.dq, &buf.dk, &buf.dv})
        for (double x : dense(*t)) CHECK(x == 0.0);
    }
  }
}

// An empty ParallelFor (a default-constructed std::function) threw bad_function_call from
// inside the kernels; it is refused by name before anything is written.
TEST(shadow_attention_rejects_an_empty_parallel_for) {
  const Problem pr = make_problem<float>(Shape{1, 4, 2, 3, 5, 2, 0}, EvictMode::kRandom, 7);
  Buffers<float> fb(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
  CHECK_THROWS(shadowkv::shadow_attention_fwd_cpu(fb.p, shadowkv::ParallelFor{}), "`pf` is an empty ParallelFor");
  for (double x : dense(fb.out)) CHECK(std::isnan(x));
  std::vector<double> g(pr.q.size(), 1.0);
  BwdBuffers<float> bb(pr, g, nullptr, Layout::kContiguous, Layout::kContiguous);
  CHECK_THROWS(shadowkv::shadow_attention_bwd_cpu(bb.bp, shadowkv::ParallelFor{}), "`pf` is an empty ParallelFor");
}

// The arrays the ops write must give each element its own memory: with out's or a gradient's
// strides left at their default 0, every row was written to element 0 and the call succeeded
// (threads raced on it with a threaded ParallelFor). The checks are the public ones, so the
// CUDA entry points refuse the same params.
TEST(shadow_attention_rejects_written_layouts_that_fold_elements) {
  const Shape s{1, 4, 2, 3, 5, 2, 0};
  const Problem pr = make_problem<float>(s, EvictMode::kRandom, 9);
  for (int which = 0; which < 3; ++which) {
    Buffers<float> buf(pr, Layout::kContiguous, Layout::kContiguous, Layout::kContiguous);
    if (which == 0) buf.p.o_stride[2] = 0;
    if (which == 1) buf.p.o_stride[1] = buf.p.o_stride[2];  // heads onto rows
    if (which == 2) buf.p.lse_stride[1] = 0;
    CHECK_THROWS(shadowkv::shadow_attention_fwd_cpu(buf.p), which == 2 ? "`lse` [B, Hq, Lq]" : "`out` [B, Hq, Lq, D]");
    CHECK_THROWS(shadowkv::check_shadow_attention_params(buf.p, "server"), "put two elements in the same memory");
    for (double x : dense(buf.out)) CHECK(std::isnan(x));  // nothing written
  }
  std::vector<double> g(pr.q.size(), 1.0);
  const char* names[] = {"`grad_q`", "`grad_k`", "`grad_v`"};
  for (int which = 0; which < 3; ++which) {
    BwdBuffers<float> buf(pr, g, nullptr, Layout::kContiguous, Layout::kPadded);
    int64_t* strides[] = {buf.bp.dq_stride, buf.bp.dk_stride, buf.bp.dv_stride};
    strides[which][2] = 0;
    CHECK_THROWS(shadowkv::shadow_attention_bwd_cpu(buf.bp), names[which]);
    for (const auto* t : {&buf.dq, &buf.dk, &buf.dv})
      for (double x : dense(*t)) CHECK(std::isnan(x));
  }
  BwdBuffers<float> buf(pr, g, nullptr, Layout::kContiguous, Layout::kPadded);
  buf.bp.cpu_threads = -1;
  CHECK_THROWS(shadowkv::shadow_attention_bwd_cpu(buf.bp), "cpu_threads must be >= 0");
  buf.bp.cpu_threads = INT64_MAX;  // ceil(items / threads) overflowed (UBSan), before the item count capped it
  shadowkv::shadow_attention_bwd_cpu(buf.bp);
  for (double x : dense(buf.dq)) CHECK(std::isfinite(x));
}
