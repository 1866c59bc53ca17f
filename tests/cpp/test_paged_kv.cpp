// append_kv_cpu, paged_decode_attention_cpu and evict_compact_cpu against a dense mirror of the
// cache (per sequence and KV head, the list of (position, k, v) slots), through random ragged
// appends, decode steps and evictions; strided layouts everywhere (k/v halves of one fused
// pool, transposed pos_pages and block tables, a layer view of a bigger eviction log); and
// every rejected input, which must leave every buffer untouched.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "util.h"

namespace {

using namespace shadowkv_test;
using shadowkv::EvictCompactParams;
using shadowkv::PagedDecodeParams;
using shadowkv::PagedKVCache;

struct Slot {
  int32_t pos;
  std::vector<double> k, v;
};

struct Config {
  int64_t batch, kv_heads, q_heads, head_dim, page_size, max_pages;
  bool fused;  // k and v interleaved in one buffer ([P, page_size, Hkv, 2, D])
};

// One layer's cache in deliberately awkward layouts, with its dense mirror and eviction log.
template <typename T>
struct Pool {
  Config cfg;
  int64_t num_pages, log_len = 96;
  std::vector<T> kbuf, vbuf;    // vbuf unused when fused
  std::vector<int32_t> pos;     // memory order [Hkv, P, page_size]
  std::vector<int32_t> bt;      // column-major: (b, i) at i * B + b
  std::vector<int32_t> lens;    // seq_lens with stride 2 (odd entries are never read)
  std::vector<int32_t> log;     // [B, 2 layers, Hkv, log_len]; the ops see layer 1
  std::vector<int32_t> free_list, next_pos;
  std::vector<std::vector<std::vector<Slot>>> mirror;  // [b][h]
  std::vector<int32_t> mirror_log;                     // [B, Hkv, log_len]
  Rng rng;

  Pool(const Config& c, uint64_t seed) : cfg(c), num_pages(c.batch * c.max_pages + 2), rng(seed) {
    const int64_t P = num_pages, ps = c.page_size, H = c.kv_heads, D = c.head_dim;
    kbuf.assign(static_cast<size_t>(P * ps * H * D * (c.fused ? 2 : 1)), from_double<T>(nan()));
    if (!c.fused) vbuf.assign(kbuf.size(), from_double<T>(nan()));
    pos.assign(static_cast<size_t>(H * P * ps), -1);
    bt.assign(static_cast<size_t>(c.batch * c.max_pages), -1);
    lens.assign(static_cast<size_t>(2 * c.batch - (c.batch > 0)), -99);  // ends right after the last length
    for (int64_t b = 0; b < c.batch; ++b) lens[2 * b] = 0;
    log.assign(static_cast<size_t>(c.batch * 2 * H * log_len), kNever);
    mirror_log.assign(static_cast<size_t>(c.batch * H * log_len), kNever);
    for (int32_t p = 0; p < P; ++p) free_list.push_back(p);
    std::shuffle(free_list.begin(), free_list.end(), rng.gen);
    next_pos.assign(static_cast<size_t>(c.batch), 0);
    mirror.assign(static_cast<size_t>(c.batch), std::vector<std::vector<Slot>>(static_cast<size_t>(H)));
  }

  PagedKVCache cache() {
    const int64_t P = num_pages, ps = cfg.page_size, H = cfg.kv_heads, D = cfg.head_dim;
    PagedKVCache c;
    c.num_pages = P;
    c.page_size = ps;
    c.num_kv_heads = H;
    c.head_dim = D;
    c.batch = cfg.batch;
    c.max_pages = cfg.max_pages;
    c.dtype = dtype_of<T>();
    const int64_t row = cfg.fused ? 2 * D : D;
    c.k_pages = kbuf.data();
    c.v_pages = cfg.fused ? kbuf.data() + D : vbuf.data();
    for (int64_t* s : {c.k_stride, c.v_stride}) {
      s[0] = ps * H * row;
      s[1] = H * row;
      s[2] = row;
    }
    c.pos_pages = pos.data();
    c.pos_stride[0] = ps;
    c.pos_stride[1] = 1;
    c.pos_stride[2] = P * ps;
    c.block_tables = bt.empty() ? nullptr : bt.data();
    c.bt_stride[0] = 1;
    c.bt_stride[1] = cfg.batch;
    c.seq_lens = lens.empty() ? nullptr : lens.data();
    c.seq_lens_stride = 2;
    return c;
  }

  int64_t len(int64_t b) const { return lens[2 * b]; }
  int32_t& page(int64_t b, int64_t i) { return bt[i * cfg.batch + b]; }
  int32_t& logged(int64_t b, int64_t h, int64_t p) { return log[((b * 2 + 1) * cfg.kv_heads + h) * log_len + p]; }
  int32_t& mirror_logged(int64_t b, int64_t h, int64_t p) { return mirror_log[(b * cfg.kv_heads + h) * log_len + p]; }
  int64_t pages_needed(int64_t n) const { return (n + cfg.page_size - 1) / cfg.page_size; }

  // Pages for `n` slots, sometimes one more when the pool has it (a server reserving ahead).
  void reserve(int64_t b, int64_t n) {
    const int64_t want = std::min(cfg.max_pages, pages_needed(n) + (rng.coin(0.3) ? 1 : 0));
    for (int64_t i = 0; i < want; ++i) {
      if (page(b, i) >= 0) continue;
      if (free_list.empty()) {
        if (i < pages_needed(n)) throw std::logic_error("test pool exhausted");
        return;
      }
      page(b, i) = free_list.back();
      free_list.pop_back();
    }
  }

  // A ragged append of up to `NT` tokens per sequence with fresh random k/v.
  void append(int64_t NT, const shadowkv::ParallelFor& pf) {
    const int64_t B = cfg.batch, H = cfg.kv_heads, D = cfg.head_dim;
    Tensor4<T> k(B, H, NT, D, Layout::kPadded), v(B, H, NT, D, Layout::kSwap12);
    std::vector<int32_t> positions(static_cast<size_t>(B * NT), -1), num_new(static_cast<size_t>(B));
    const int64_t capacity = cfg.max_pages * cfg.page_size;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t room = std::min(capacity - len(b), log_len - next_pos[b]);
      num_new[b] = static_cast<int32_t>(rng.uniform(0, std::min<int64_t>(NT, room)));
      reserve(b, len(b) + num_new[b]);
      for (int64_t t = 0; t < NT; ++t) {
        positions[b * NT + t] = next_pos[b] + static_cast<int32_t>(t);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) {
            k.set(b, h, t, d, rng.normal());
            v.set(b, h, t, d, rng.normal());
          }
      }
    }
    shadowkv::AppendKVParams p;
    p.cache = cache();
    p.num_tokens = NT;
    p.k = k.ptr();
    p.v = v.ptr();
    std::copy_n(k.stride, 3, p.k_stride);
    std::copy_n(v.stride, 3, p.v_stride);
    p.positions = positions.empty() ? nullptr : positions.data();
    p.positions_stride[0] = NT;
    p.positions_stride[1] = 1;
    p.num_new = num_new.empty() ? nullptr : num_new.data();
    shadowkv::append_kv_cpu(p, pf);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < num_new[b]; ++t)
        for (int64_t h = 0; h < H; ++h) {
          Slot s{positions[b * NT + t], {}, {}};
          for (int64_t d = 0; d < D; ++d) {
            s.k.push_back(k.get(b, h, t, d));
            s.v.push_back(v.get(b, h, t, d));
          }
          mirror[b][h].push_back(std::move(s));
        }
      next_pos[b] += num_new[b];
    }
  }

  // One decode step with scores; compares out and scores with the mirror.
  void decode(const shadowkv::ParallelFor& pf, const std::string& label) {
    const int64_t B = cfg.batch, H = cfg.kv_heads, Hq = cfg.q_heads, D = cfg.head_dim;
    const int64_t group = Hq / H, S = cfg.max_pages * cfg.page_size + 1;
    Tensor4<T> q(1, B, Hq, D, Layout::kPadded), out(1, B, Hq, D, Layout::kSwap12);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d) q.set(0, b, h, d, rng.normal());
    std::vector<float> scores(static_cast<size_t>(B * H * S), static_cast<float>(nan()));
    PagedDecodeParams p;
    p.cache = cache();
    p.num_q_heads = Hq;
    p.scale = 1.0 / std::sqrt(static_cast<double>(D));
    p.q = q.ptr();
    p.out = out.ptr();
    std::copy_n(q.stride + 1, 2, p.q_stride);
    std::copy_n(out.stride + 1, 2, p.o_stride);
    p.scores = scores.empty() ? nullptr : scores.data();
    p.scores_len = S;
    p.scores_stride[0] = 1;  // memory order [S, Hkv, B]
    p.scores_stride[1] = B;
    p.scores_stride[2] = B * H;
    shadowkv::paged_decode_attention_cpu(p, pf);

    const double t = std::is_same_v<T, double> ? 1e-10 : std::is_same_v<T, float> ? 2e-5 : 2e-2;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const auto& slots = mirror[b][h];
        std::vector<double> mass(slots.size(), 0.0);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t hq = h * group + g;
          std::vector<double> w(slots.size());
          double mx = -INFINITY, sum = 0;
          for (size_t j = 0; j < slots.size(); ++j) {
            double dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += q.get(0, b, hq, d) * slots[j].k[d];
            w[j] = dot * p.scale;
            mx = std::max(mx, w[j]);
          }
          for (double& x : w) sum += (x = std::exp(x - mx));
          for (int64_t d = 0; d < D; ++d) {
            double o = 0;
            for (size_t j = 0; j < slots.size(); ++j) o += w[j] / sum * slots[j].v[d];
            const double got = out.get(0, b, hq, d);
            if (slots.empty() ? got != 0.0 : !(std::fabs(got - o) <= t + t * std::fabs(o)))
              report(__FILE__, __LINE__, label + ": decode out[" + std::to_string(b) + ", " + std::to_string(hq) +
                                             "] " + std::to_string(got) + " vs " + std::to_string(o));
          }
          for (size_t j = 0; j < slots.size(); ++j) mass[j] += w[j] / sum;
        }
        for (int64_t s = 0; s < S; ++s) {
          const double want = s < static_cast<int64_t>(slots.size()) ? mass[s] : 0.0;
          const double got = scores[b + h * B + s * B * H];
          if (!(std::fabs(got - want) <= 1e-5))
            report(__FILE__, __LINE__, label + ": scores[" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                                           std::to_string(s) + "] " + std::to_string(got) + " vs " +
                                           std::to_string(want));
        }
      }
  }

  // A random eviction (the same count per KV head, sometimes none, sometimes all), with
  // slot_scores compacted alongside; checks freed and returns the pages to the pool.
  void evict(const shadowkv::ParallelFor& pf, const std::string& label) {
    const int64_t B = cfg.batch, H = cfg.kv_heads, S = cfg.max_pages * cfg.page_size;
    std::vector<uint8_t> keep(static_cast<size_t>(B * H * S), 0);  // memory order [S, Hkv, B]
    Tensor4<float> slot_scores(1, B, H, S, Layout::kPadded);       // [B, Hkv, S] with gaps
    std::vector<int32_t> steps(static_cast<size_t>(B));
    std::vector<std::vector<std::vector<float>>> kept_scores(static_cast<size_t>(B));
    std::vector<int64_t> new_len(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = len(b);
      const int64_t r = rng.uniform(0, 4);
      new_len[b] = r == 0 ? n : r == 1 ? 0 : rng.uniform(0, n);
      steps[b] = next_pos[b];
      kept_scores[b].resize(static_cast<size_t>(H));
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t s = 0; s < S; ++s) slot_scores.at(0, b, h, s) = static_cast<float>(rng.normal());
        std::vector<int64_t> idx(static_cast<size_t>(n));
        for (int64_t s = 0; s < n; ++s) idx[s] = s;
        std::shuffle(idx.begin(), idx.end(), rng.gen);
        idx.resize(static_cast<size_t>(new_len[b]));
        std::sort(idx.begin(), idx.end());
        std::vector<Slot> kept;
        size_t next = 0;
        for (int64_t s = 0; s < n; ++s) {
          Slot& slot = mirror[b][h][s];
          if (next < idx.size() && idx[next] == s) {
            ++next;
            keep[s * B * H + h * B + b] = 1;
            kept.push_back(std::move(slot));
            kept_scores[b][h].push_back(slot_scores.at(0, b, h, s));
          } else {
            mirror_logged(b, h, slot.pos) = steps[b];
          }
        }
        mirror[b][h] = std::move(kept);
      }
    }
    std::vector<int32_t> held(bt);
    std::vector<int32_t> freed(static_cast<size_t>(B * cfg.max_pages), -7);  // column-major
    EvictCompactParams p;
    p.cache = cache();
    p.keep = keep.empty() ? nullptr : keep.data();
    p.keep_len = S;
    p.keep_stride[0] = 1;
    p.keep_stride[1] = B;
    p.keep_stride[2] = B * H;
    p.steps = steps.empty() ? nullptr : steps.data();
    p.evicted_at = log.empty() ? nullptr : log.data() + H * log_len;  // layer 1
    p.log_len = log_len;
    p.ev_stride[0] = 2 * H * log_len;
    p.ev_stride[1] = log_len;
    p.ev_stride[2] = 1;
    p.slot_scores = slot_scores.ptr();
    std::copy_n(slot_scores.stride + 1, 2, p.scores_stride);
    p.scores_stride[2] = 1;
    p.freed = freed.empty() ? nullptr : freed.data();
    p.freed_stride[0] = 1;
    p.freed_stride[1] = B;
    shadowkv::evict_compact_cpu(p, pf);

    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S; ++s) {
          const float want = s < new_len[b] ? kept_scores[b][h][s] : 0.0f;
          if (slot_scores.at(0, b, h, s) != want)
            report(__FILE__, __LINE__, label + ": slot_scores not compacted at " + std::to_string(s));
        }
      int64_t n = 0;
      for (int64_t i = pages_needed(new_len[b]); i < cfg.max_pages; ++i) {
        const int32_t was = held[i * B + b];
        CHECK(page(b, i) == -1);
        if (was < 0) continue;
        CHECK(freed[n * B + b] == was);
        free_list.push_back(was);
        ++n;
      }
      for (; n < cfg.max_pages; ++n) CHECK(freed[n * B + b] == -1);
    }
  }

  // The cache holds exactly the mirror; the log layer matches, the other layer is untouched.
  void check(const std::string& label) {
    const int64_t B = cfg.batch, H = cfg.kv_heads, D = cfg.head_dim, ps = cfg.page_size;
    const PagedKVCache c = cache();
    size_t bad = 0;
    for (int64_t b = 0; b < B; ++b) {
      CHECK(len(b) == static_cast<int64_t>(mirror[b][0].size()));
      CHECK(b + 1 == B || lens[2 * b + 1] == -99);
      for (int64_t i = 0; i < pages_needed(len(b)); ++i) CHECK(page(b, i) >= 0);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t s = 0; s < len(b) && s < static_cast<int64_t>(mirror[b][h].size()); ++s) {
          const Slot& want = mirror[b][h][s];
          const int64_t pg = page(b, s / ps), row = s % ps;
          bad += c.pos(pg, row, h) != want.pos;
          for (int64_t d = 0; d < D; ++d) {
            bad += to_double(c.k_row<T>(pg, row, h)[d]) != want.k[d];
            bad += to_double(c.v_row<T>(pg, row, h)[d]) != want.v[d];
          }
        }
        for (int64_t p = 0; p < log_len; ++p) {
          bad += logged(b, h, p) != mirror_logged(b, h, p);
          bad += log[((b * 2) * H + h) * log_len + p] != kNever;
        }
      }
    }
    if (bad) report(__FILE__, __LINE__, label + ": " + std::to_string(bad) + " cache/log entries differ from the mirror");
  }
};

template <typename T>
void run_random_session(const Config& cfg, uint64_t seed) {
  Pool<T> pool(cfg, seed);
  const auto& fors = all_parallel_fors();
  for (int step = 0; step < 40; ++step) {
    const auto& pf = fors[step % fors.size()];
    const std::string label = std::string(shadowkv::dtype_name(dtype_of<T>())) + " B=" + std::to_string(cfg.batch) +
                              " D=" + std::to_string(cfg.head_dim) + " step " + std::to_string(step);
    if (step == 0 || pool.rng.coin(0.8)) pool.append(pool.rng.uniform(0, 6), pf);
    pool.check(label + " after append");
    pool.decode(pf, label);
    if (pool.rng.coin(0.4)) {
      pool.evict(pf, label);
      pool.check(label + " after evict");
    }
  }
}

}  // namespace

TEST(paged_kv_random_sessions_match_mirror) {
  uint64_t seed = 1;
  for (int rep = 0; rep < 3; ++rep) {
    run_random_session<double>({3, 2, 4, 5, 3, 5, false}, ++seed);     // GQA, a page size that divides nothing
    run_random_session<float>({2, 1, 3, 1, 1, 8, true}, ++seed);       // MQA, D = 1, one-slot pages
    run_random_session<shadowkv::bf16_t>({3, 2, 2, 4, 4, 4, true}, ++seed);
    run_random_session<shadowkv::fp16_t>({1, 3, 6, 2, 2, 6, false}, ++seed);
  }
}

// Batch 0 and absent pointers: every op is a no-op.
TEST(paged_kv_empty_batch) {
  PagedKVCache c;
  c.page_size = 4;
  c.num_kv_heads = 2;
  c.head_dim = 3;
  shadowkv::AppendKVParams a;
  a.cache = c;
  shadowkv::append_kv_cpu(a);
  PagedDecodeParams d;
  d.cache = c;
  d.num_q_heads = 4;
  shadowkv::paged_decode_attention_cpu(d);
  EvictCompactParams e;
  e.cache = c;
  shadowkv::evict_compact_cpu(e);
  // No query heads: decode writes only the (zero) scores.
  Pool<float> pool({2, 2, 2, 3, 2, 3, false}, 5);
  pool.append(3, shadowkv::serial_for);
  std::vector<float> scores(2 * 2 * 6, 1.0f);
  d = PagedDecodeParams{};
  d.cache = pool.cache();
  d.num_q_heads = 0;
  d.scores = scores.data();
  d.scores_len = 6;
  d.scores_stride[0] = 12;
  d.scores_stride[1] = 6;
  d.scores_stride[2] = 1;
  shadowkv::paged_decode_attention_cpu(d);
  for (float x : scores) CHECK(x == 0.0f);
}

// Two sequences share a full prefix page: reading it and appending after it are fine.
TEST(paged_kv_shared_read_only_page) {
  Pool<float> pool({2, 1, 1, 2, 2, 3, false}, 9);
  pool.page(0, 0) = 0;
  pool.page(1, 0) = 0;
  pool.page(0, 1) = 1;
  pool.page(1, 1) = 2;
  pool.lens[0] = 2;
  pool.lens[2] = 2;
  float* k = pool.kbuf.data();
  float* v = pool.vbuf.data();
  for (int i = 0; i < 4; ++i) k[i] = v[i] = static_cast<float>(i);  // page 0: two slots of D = 2
  for (int b = 0; b < 2; ++b)
    for (int s = 0; s < 2; ++s) {
      pool.pos[s] = s;
      pool.mirror[b][0].push_back(Slot{s, {2.0 * s, 2.0 * s + 1}, {2.0 * s, 2.0 * s + 1}});
    }
  pool.next_pos = {2, 2};
  pool.free_list.clear();
  pool.decode(shadowkv::serial_for, "shared prefix");
  pool.append(1, shadowkv::serial_for);
  pool.check("shared prefix");
  pool.decode(shadowkv::serial_for, "shared prefix");
}

namespace {

// A small valid state for the rejection tests: B = 2, Hkv = 2, D = 2, page_size = 2, 3 pages
// per sequence, sequence 0 holds 3 slots (pages 4, 1), sequence 1 holds 1 slot (page 2).
struct Small {
  static constexpr int64_t P = 6, ps = 2, H = 2, D = 2, B = 2, M = 3, T = 2, S = 6, L = 8;
  std::vector<float> k = std::vector<float>(P * ps * H * D, 0.5f), v = k;
  std::vector<int32_t> pos = std::vector<int32_t>(P * ps * H, 0);
  std::vector<int32_t> bt{4, 1, -1, 2, -1, -1};
  std::vector<int32_t> lens{3, 1};
  // append inputs
  std::vector<float> ak = std::vector<float>(B * H * T * D, 1.0f), av = ak;
  std::vector<int32_t> positions{3, 4, 1, 2}, num_new{1, 1};
  // decode inputs/outputs
  std::vector<float> q = std::vector<float>(B * 4 * D, 0.25f), out = std::vector<float>(B * 4 * D, -3.0f);
  std::vector<float> scores = std::vector<float>(B * H * S, -3.0f);
  // evict inputs/outputs: evict slot 1 of sequence 0 in both heads, nothing in sequence 1
  std::vector<uint8_t> keep{1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0};
  std::vector<int32_t> steps{3, 1};
  std::vector<int32_t> log = std::vector<int32_t>(B * H * L, kNever);
  std::vector<float> slot_scores = std::vector<float>(B * H * S, 0.125f);
  std::vector<int32_t> freed = std::vector<int32_t>(B * M, -5);

  Small() {
    // positions: slot s of sequence 0 holds position s, sequence 1's slot 0 holds 0
    const int32_t slots[][3] = {{4, 0, 0}, {4, 1, 1}, {1, 0, 2}, {2, 0, 0}};  // page, row, position
    for (const auto& e : slots)
      for (int64_t h = 0; h < H; ++h) pos[(e[0] * ps + e[1]) * H + h] = e[2];
  }

  PagedKVCache cache() {
    PagedKVCache c;
    c.num_pages = P;
    c.page_size = ps;
    c.num_kv_heads = H;
    c.head_dim = D;
    c.batch = B;
    c.max_pages = M;
    c.k_pages = k.data();
    c.v_pages = v.data();
    c.pos_pages = pos.data();
    c.block_tables = bt.data();
    c.seq_lens = lens.data();
    for (int64_t* s : {c.k_stride, c.v_stride}) {
      s[0] = ps * H * D;
      s[1] = H * D;
      s[2] = D;
    }
    c.pos_stride[0] = ps * H;
    c.pos_stride[1] = H;
    c.pos_stride[2] = 1;
    c.bt_stride[0] = M;
    c.bt_stride[1] = 1;
    return c;
  }
  shadowkv::AppendKVParams append() {
    shadowkv::AppendKVParams p;
    p.cache = cache();
    p.num_tokens = T;
    p.k = ak.data();
    p.v = av.data();
    for (int64_t* s : {p.k_stride, p.v_stride}) {
      s[0] = H * T * D;
      s[1] = T * D;
      s[2] = D;
    }
    p.positions = positions.data();
    p.positions_stride[0] = T;
    p.positions_stride[1] = 1;
    p.num_new = num_new.data();
    return p;
  }
  PagedDecodeParams decode() {
    PagedDecodeParams p;
    p.cache = cache();
    p.num_q_heads = 4;
    p.scale = 0.5;
    p.q = q.data();
    p.out = out.data();
    p.q_stride[0] = p.o_stride[0] = 4 * D;
    p.q_stride[1] = p.o_stride[1] = D;
    p.scores = scores.data();
    p.scores_len = S;
    p.scores_stride[0] = H * S;
    p.scores_stride[1] = S;
    p.scores_stride[2] = 1;
    return p;
  }
  EvictCompactParams evict() {
    EvictCompactParams p;
    p.cache = cache();
    p.keep = keep.data();
    p.keep_len = S;
    p.keep_stride[0] = H * S;
    p.keep_stride[1] = S;
    p.keep_stride[2] = 1;
    p.steps = steps.data();
    p.evicted_at = log.data();
    p.log_len = L;
    p.ev_stride[0] = H * L;
    p.ev_stride[1] = L;
    p.ev_stride[2] = 1;
    p.slot_scores = slot_scores.data();
    std::copy_n(p.keep_stride, 3, p.scores_stride);
    p.freed = freed.data();
    p.freed_stride[0] = M;
    p.freed_stride[1] = 1;
    return p;
  }
  // Every buffer an op may write, as bytes.
  std::vector<char> snapshot() const {
    std::vector<char> all;
    auto add = [&](const auto& vec) {
      const char* p = reinterpret_cast<const char*>(vec.data());
      all.insert(all.end(), p, p + vec.size() * sizeof(vec[0]));
    };
    add(k), add(v), add(pos), add(bt), add(lens), add(out), add(scores), add(log), add(slot_scores), add(freed);
    return all;
  }
};

enum class Op { kAppend, kDecode, kEvict };

// `mutate` breaks the state or the params of `op`; the op must throw invalid_argument naming
// `needle` and leave every buffer as it was.
template <typename F>
void expect_rejected(Op op, F mutate, const std::string& needle, int line) {
  Small st;
  auto a = st.append();
  auto d = st.decode();
  auto e = st.evict();
  mutate(st, a, d, e);
  const std::vector<char> before = st.snapshot();
  const char* expr = op == Op::kAppend ? "append_kv_cpu" : op == Op::kDecode ? "paged_decode_attention_cpu"
                                                                             : "evict_compact_cpu";
  check_throws(
      [&] {
        if (op == Op::kAppend) shadowkv::append_kv_cpu(a);
        if (op == Op::kDecode) shadowkv::paged_decode_attention_cpu(d);
        if (op == Op::kEvict) shadowkv::evict_compact_cpu(e);
      },
      needle, expr, __FILE__, line);
  if (st.snapshot() != before) report(__FILE__, line, std::string(expr) + " wrote before rejecting (" + needle + ")");
}

using A = shadowkv::AppendKVParams;
using Dp = PagedDecodeParams;
using E = EvictCompactParams;
#define REJECT(op, body, needle) \
  expect_rejected(op, [&](Small & st, A & a, Dp & d, E & e) { (void)st, (void)a, (void)d, (void)e; body; }, needle, __LINE__)

}  // namespace

TEST(paged_kv_valid_small_state_is_accepted) {
  // The baseline of the rejection tests must itself be valid.
  Small st;
  shadowkv::paged_decode_attention_cpu(st.decode());
  shadowkv::evict_compact_cpu(st.evict());
  CHECK(st.lens[0] == 2 && st.lens[1] == 1);
  CHECK(st.log[1] == 3 && st.log[Small::L + 1] == 3);  // position 1 of sequence 0, both heads
  CHECK(st.bt[0] == 4 && st.bt[1] == -1 && st.freed[0] == 1 && st.freed[1] == -1);
  st.bt[1] = 1;  // page 1 back for the append
  shadowkv::append_kv_cpu(st.append());
  CHECK(st.lens[0] == 3 && st.lens[1] == 2);
}

TEST(paged_kv_rejects_bad_append) {
  const Op op = Op::kAppend;
  REJECT(op, st.num_new[0] = 3, "`num_new`[0] = 3 must be in [0, 2]");
  REJECT(op, st.num_new[1] = -1, "`num_new`[1] = -1");
  REJECT(op, st.positions[2] = -4, "`positions`[1, 0] = -4 must be >= 0");
  REJECT(op, st.bt[1] = -1, "`block_tables`[0, 1] = -1 must be a page id in [0, 6)");
  REJECT(op, st.bt[1] = 6, "`block_tables`[0, 1] = 6 must be a page id");
  REJECT(op, (st.lens[0] = 6, st.num_new[0] = 1), "sequence 0 needs 4 pages");
  REJECT(op, st.lens[0] = 7, "`seq_lens`[0] = 7 must be in [0, 6]");
  REJECT(op, st.lens[1] = -1, "`seq_lens`[1] = -1");
  REJECT(op, st.bt[3] = 1, "which this op writes, appears in 2 entries");  // sequence 1 on sequence 0's page
  REJECT(op, a.k = nullptr, "null input pointer");
  REJECT(op, a.num_new = nullptr, "null input pointer");
  REJECT(op, a.cache.pos_pages = nullptr, "null `pos_pages`");
  REJECT(op, a.cache.seq_lens = nullptr, "null `seq_lens`");
  REJECT(op, a.cache.block_tables = nullptr, "null `block_tables`");
  REJECT(op, a.cache.k_pages = nullptr, "null page pointer");
  REJECT(op, a.num_tokens = -1, "negative token count");
  REJECT(op, a.cache.head_dim = 0, "head dim (dim 3) >= 1");
  REJECT(op, a.cache.page_size = 0, "page size (dim 1) >= 1");
  REJECT(op, a.cache.num_kv_heads = 0, ">= 1 KV head");
  REJECT(op, a.cache.num_pages = -1, "negative shape");
  // ceil(len / page_size) went negative and the kernel wrote through block-table entry -1.
  REJECT(op, a.cache.page_size = INT64_MAX - 1, "must fit int32");
  REJECT(op, a.cache.dtype = static_cast<shadowkv::DType>(9), "unsupported dtype");
  // seq_lens + num_new past int32: caught before the (here absent) pages are touched.
  // (Page strides that fit the larger pages: the layout check comes before the values.)
  REJECT(op,
         (a.cache.page_size = int64_t{1} << 30, a.cache.k_stride[0] = a.cache.v_stride[0] = int64_t{4} << 30,
          a.cache.pos_stride[0] = int64_t{2} << 30, st.lens[0] = 2147483647, st.lens[1] = 0, st.num_new[0] = 1,
          st.num_new[1] = 0),
         "overflows int32");
  // Layouts that fold elements of a written array onto each other (C++ callers pass strides; they
  // default to 0): refused before any value is read.
  REJECT(op, a.cache.k_stride[0] = a.cache.k_stride[1] = a.cache.k_stride[2] = 0,
         "`k_pages` [P, page_size, Hkv, D] of shape [6, 2, 2, 2] has element strides [0, 0, 0, 1] that put two "
         "elements in the same memory");
  REJECT(op, a.cache.v_stride[1] = 1, "`v_pages` [P, page_size, Hkv, D] of shape [6, 2, 2, 2] has element strides "
                                      "[8, 1, 2, 1]");
  REJECT(op, a.cache.pos_stride[0] = 2, "`pos_pages` [P, page_size, Hkv]");  // pages 2 apart, each spans 4
  REJECT(op, a.cache.seq_lens_stride = 0, "`seq_lens` [B] of shape [2] has element strides [0]");
  // Page 1 at element 2^62 wrapped to byte offset 0 (8 * 2^62 overflows int64): page 1's keys were
  // written over page 0's while every distinctness check passed.
  REJECT(op, a.cache.k_stride[0] = int64_t{1} << 62,
         "`k_pages` [P, page_size, Hkv, D] of shape [6, 2, 2, 2] has element strides [4611686018427387904, 4, 2, 1] "
         "that reach past int64 byte offsets");
  REJECT(op, a.cache.pos_stride[0] = -(int64_t{1} << 61), "`pos_pages` [P, page_size, Hkv] of shape [6, 2, 2] has "
                                                          "element strides [-2305843009213693952, 2, 1] that reach past");
}

TEST(paged_kv_rejects_bad_decode) {
  const Op op = Op::kDecode;
  REJECT(op, d.o_stride[1] = 0, "`out` [B, Hq, D] of shape [2, 4, 2] has element strides [8, 0, 1]");
  REJECT(op, d.scores_stride[0] = 1, "`scores_out` [B, Hkv, S]");
  // [B, Hq, D] past int64 (q read through zero strides): the kernel's group * D overflowed (UBSan).
  REJECT(op, (d.num_q_heads = (int64_t{1} << 62) + 2, d.q_stride[0] = d.q_stride[1] = 0),
         "`out` [B, Hq, D] of shape [2, 4611686018427387906, 2] is too large: its element count overflows int64");
  REJECT(op, d.num_q_heads = 3, "the head count of `q` (3) must be a multiple of the KV head count (2)");
  REJECT(op, d.num_q_heads = -2, "the head count of `q`");
  REJECT(op, d.scale = 0.0, "`scale` must be positive and finite");
  REJECT(op, d.scale = nan(), "`scale` must be positive and finite");
  REJECT(op, d.scores_len = 2, "`scores_out` has 2 slots (last dim) but `seq_lens`[0] = 3");
  REJECT(op, d.scores_len = -1, "negative `scores_out` length");
  REJECT(op, d.q = nullptr, "null `q` or output pointer");
  REJECT(op, st.bt[0] = -1, "`block_tables`[0, 0] = -1 must be a page id");
  REJECT(op, st.lens[1] = 9, "`seq_lens`[1] = 9");
  REJECT(op, d.cache.dtype = static_cast<shadowkv::DType>(9), "unsupported dtype");
}

TEST(paged_kv_rejects_bad_evict) {
  const Op op = Op::kEvict;
  REJECT(op, e.cache.bt_stride[0] = 0, "`block_tables` [B, max_pages] of shape [2, 3] has element strides [0, 1]");
  REJECT(op, e.cache.k_stride[2] = 1, "`k_pages`");
  REJECT(op, e.ev_stride[1] = 0, "`evicted_at` [B, Hkv, T]");
  REJECT(op, e.scores_stride[2] = 0, "`slot_scores` [B, Hkv, S]");
  REJECT(op, e.freed_stride[0] = 2, "`freed` [B, max_pages] of shape [2, 3] has element strides [2, 1]");
  REJECT(op, st.keep[Small::S + 3] = 1, "`keep`[0, 1, 3] is True but the sequence has only `seq_lens`[0] = 3");
  REJECT(op, st.keep[Small::S + 0] = 0, "every KV head of a sequence must keep the same number of slots");
  REJECT(op, st.steps[0] = -1, "`steps`[0] = -1 must be in [0, 2147483647)");
  REJECT(op, st.steps[1] = kNever, "`steps`[1] = 2147483647");
  REJECT(op, e.log_len = 1, "`evicted_at` covers positions [0, 1) but evicted slot 1 of sequence 0");
  REJECT(op, e.log_len = int64_t{1} << 50, "exceeds the int32 positions");  // was a 1 PB allocation
  REJECT(op, st.log[Small::L + 1] = 2, "`evicted_at`[0, 1, 1] = 2: the key at that position was already evicted");
  REJECT(op, (st.keep[0] = 0, st.keep[Small::S] = 0, st.keep[2] = 0, st.keep[Small::S + 2] = 0,
              st.pos[(4 * 2 + 0) * 2 + 0] = 1),
         "two evicted slots of the sequence hold position 1");
  REJECT(op, e.keep_len = 2, "`keep` has 2 slots (last dim) but `seq_lens`[0] = 3");
  REJECT(op, e.keep_len = -1, "negative `keep` or `evicted_at` length");
  REJECT(op, st.bt[3] = 4, "appears in 2 entries");  // sequence 1 reads the page sequence 0 compacts
  REJECT(op, st.bt[2] = -2, "`block_tables`[0, 2] = -2 must be -1 or a page id");  // released columns too
  REJECT(op, e.freed = nullptr, "null input or output pointer");
  REJECT(op, e.steps = nullptr, "null input or output pointer");
  REJECT(op, e.cache.pos_pages = nullptr, "null `pos_pages`");
  REJECT(op, e.cache.dtype = static_cast<shadowkv::DType>(9), "unsupported dtype");
}

TEST(paged_kv_check_block_tables_refuses_negative_ranges) {
  // Public for servers; a negative range would read block-table column -1.
  Small st;
  const PagedKVCache c = st.cache();
  const int64_t used[2] = {2, 1}, begin[2] = {0, -1}, end[2] = {2, 1};
  check_throws([&] { shadowkv::check_block_tables(c, used, begin, end, "t"); },
               "negative page range for sequence 1 (used 1, written [-1, 1))", "check_block_tables", __FILE__, __LINE__);
  const int64_t ok_begin[2] = {0, 0};
  shadowkv::check_block_tables(c, used, ok_begin, end, "t");
  // Called alone (without check_paged_cache first): a null table was read (segfault), and a
  // negative pool size sized a vector (length_error).
  PagedKVCache no_table = c;
  no_table.block_tables = nullptr;
  check_throws([&] { shadowkv::check_block_tables(no_table, used, ok_begin, end, "t"); }, "t: null `block_tables`",
               "check_block_tables", __FILE__, __LINE__);
  PagedKVCache no_pool = c;
  no_pool.num_pages = -3;
  check_throws([&] { shadowkv::check_block_tables(no_pool, used, ok_begin, end, "t"); }, "t: negative shape",
               "check_block_tables", __FILE__, __LINE__);
  check_throws([&] { shadowkv::check_block_tables(c, nullptr, ok_begin, end, "t"); },
               "t: null `used_pages`, `write_begin` or `write_end` for 2 sequences", "check_block_tables", __FILE__,
               __LINE__);
  // check_decode_tables, public too, read seq_lens and divided by page_size first.
  PagedDecodeParams d = st.decode();
  d.cache.page_size = 0;
  check_throws([&] { shadowkv::check_decode_tables(d, "t"); }, "t: `k_pages` must have a page size (dim 1) >= 1",
               "check_decode_tables", __FILE__, __LINE__);
  d = st.decode();
  d.cache.seq_lens = nullptr;
  check_throws([&] { shadowkv::check_decode_tables(d, "t"); }, "t: null `seq_lens`", "check_decode_tables", __FILE__,
               __LINE__);
}

// An empty ParallelFor threw bad_function_call from inside the kernels; it is refused by name
// before anything is written.
TEST(paged_kv_rejects_an_empty_parallel_for) {
  const shadowkv::ParallelFor none;
  for (int op = 0; op < 3; ++op) {
    Small st;
    const auto before = st.snapshot();
    const char* needle = "`pf` is an empty ParallelFor";
    if (op == 0) CHECK_THROWS(shadowkv::append_kv_cpu(st.append(), none), needle);
    if (op == 1) CHECK_THROWS(shadowkv::paged_decode_attention_cpu(st.decode(), none), needle);
    if (op == 2) CHECK_THROWS(shadowkv::evict_compact_cpu(st.evict(), none), needle);
    CHECK(st.snapshot() == before);
  }
}
