// A minimal decode server over one layer of shadowkv's paged KV cache, on the CPU kernels,
// through the installed C++ API only (no torch, no Python).
//
// Two sequences get a prompt; each decode step appends one token per sequence, attends with
// paged_decode_attention (which also returns each slot's attention mass), and once a sequence
// holds more than `kBudget` slots, evict_compact drops the lowest accumulated scores
// (H2O-style, the newest slots always stay) and logs every eviction in the shadow mask
// `evicted_at`. Pages emptied by an eviction go back to the pool's free list.
//
// At the end it checks what a trainer relies on: every position is either cached or logged
// once, the pages are accounted for, and replaying the log with shadow_attention over the full
// history gives back, step for step, the outputs the server produced (the on-policy replay).
// Returns 0 when every check holds, 1 otherwise.
#include <shadowkv/shadowkv.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

namespace {

constexpr int64_t kBatch = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 16;
constexpr int64_t kPageSize = 4, kNumPages = 12, kMaxPages = 4;  // a sequence holds <= 16 slots
constexpr int64_t kBudget = 8, kRecent = 2, kDecodeSteps = 10;
constexpr int64_t kPromptLen[kBatch] = {11, 6};
constexpr int64_t kMaxLen = std::max(kPromptLen[0], kPromptLen[1]) + kDecodeSteps;  // longest sequence
constexpr int32_t kNever = std::numeric_limits<int32_t>::max();

int failures = 0;
void expect(bool ok, const char* what, int64_t b = -1) {
  if (ok) return;
  ++failures;
  std::fprintf(stderr, "FAILED: %s (sequence %lld)\n", what, static_cast<long long>(b));
}

// One layer's cache, its eviction log and the per-slot accumulated attention scores.
struct Server {
  std::vector<float> k_pages = std::vector<float>(kNumPages * kPageSize * kKvHeads * kHeadDim);
  std::vector<float> v_pages = std::vector<float>(k_pages.size());
  std::vector<int32_t> pos_pages = std::vector<int32_t>(kNumPages * kPageSize * kKvHeads);
  std::vector<int32_t> block_tables = std::vector<int32_t>(kBatch * kMaxPages, -1);
  std::vector<int32_t> seq_lens = std::vector<int32_t>(kBatch, 0);
  std::vector<int32_t> evicted_at = std::vector<int32_t>(kBatch * kKvHeads * kMaxLen, kNever);
  std::vector<float> slot_scores = std::vector<float>(kBatch * kKvHeads * kMaxPages * kPageSize, 0.0f);
  std::vector<int32_t> free_pages;

  Server() {
    for (int32_t p = kNumPages - 1; p >= 0; --p) free_pages.push_back(p);
  }

  shadowkv::PagedKVCache cache() {
    shadowkv::PagedKVCache c;
    c.num_pages = kNumPages;
    c.page_size = kPageSize;
    c.num_kv_heads = kKvHeads;
    c.head_dim = kHeadDim;
    c.batch = kBatch;
    c.max_pages = kMaxPages;
    c.dtype = shadowkv::DType::kFloat32;
    c.k_pages = k_pages.data();
    c.v_pages = v_pages.data();
    c.pos_pages = pos_pages.data();
    c.block_tables = block_tables.data();
    c.seq_lens = seq_lens.data();
    const int64_t row = kKvHeads * kHeadDim;  // contiguous [P, page_size, Hkv, D]
    for (int64_t* s : {c.k_stride, c.v_stride}) {
      s[0] = kPageSize * row;
      s[1] = row;
      s[2] = kHeadDim;
    }
    c.pos_stride[0] = kPageSize * kKvHeads;
    c.pos_stride[1] = kKvHeads;
    c.pos_stride[2] = 1;
    c.bt_stride[0] = kMaxPages;
    c.bt_stride[1] = 1;
    return c;
  }

  // Gives sequence b pages for `len` slots (the ops never allocate: the server owns the pool).
  void reserve(int64_t b, int64_t len) {
    for (int64_t i = 0; i < (len + kPageSize - 1) / kPageSize; ++i) {
      int32_t& id = block_tables[b * kMaxPages + i];
      if (id >= 0) continue;
      if (free_pages.empty()) throw std::runtime_error("page pool exhausted");
      id = free_pages.back();
      free_pages.pop_back();
    }
  }

  // k, v [B, Hkv, T, D]; positions [B, T]; the first num_new[b] tokens of sequence b.
  void append(const std::vector<float>& k, const std::vector<float>& v, const std::vector<int32_t>& positions,
              const std::vector<int32_t>& num_new, int64_t T) {
    for (int64_t b = 0; b < kBatch; ++b) reserve(b, seq_lens[b] + num_new[b]);
    shadowkv::AppendKVParams p;
    p.cache = cache();
    p.num_tokens = T;
    p.k = k.data();
    p.v = v.data();
    p.positions = positions.data();
    p.num_new = num_new.data();
    for (int64_t* s : {p.k_stride, p.v_stride}) {
      s[0] = kKvHeads * T * kHeadDim;
      s[1] = T * kHeadDim;
      s[2] = kHeadDim;
    }
    p.positions_stride[0] = T;
    p.positions_stride[1] = 1;
    shadowkv::append_kv_cpu(p);
  }

  // q, out [B, Hq, D]; scores [B, Hkv, S] gets each slot's attention mass.
  void decode(const float* q, float* out, std::vector<float>& scores) {
    shadowkv::PagedDecodeParams p;
    p.cache = cache();
    p.num_q_heads = kQHeads;
    p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
    p.q = q;
    p.out = out;
    p.q_stride[0] = p.o_stride[0] = kQHeads * kHeadDim;
    p.q_stride[1] = p.o_stride[1] = kHeadDim;
    p.scores = scores.data();
    p.scores_len = kMaxPages * kPageSize;
    p.scores_stride[0] = kKvHeads * p.scores_len;
    p.scores_stride[1] = p.scores_len;
    p.scores_stride[2] = 1;
    shadowkv::paged_decode_attention_cpu(p);
  }

  // Sequences over the budget keep their kRecent newest slots and the best-scored others;
  // `next_pos[b]` is the position of b's next query, the first that no longer sees them.
  void evict(const std::vector<int32_t>& next_pos) {
    const int64_t S = kMaxPages * kPageSize;
    std::vector<uint8_t> keep(kBatch * kKvHeads * S, 0);
    for (int64_t b = 0; b < kBatch; ++b) {
      const int64_t len = seq_lens[b];
      for (int64_t h = 0; h < kKvHeads; ++h) {
        uint8_t* kp = &keep[(b * kKvHeads + h) * S];
        if (len <= kBudget) {
          std::fill(kp, kp + len, uint8_t{1});
          continue;
        }
        const float* sc = &slot_scores[(b * kKvHeads + h) * S];
        std::vector<int64_t> order(len - kRecent);
        for (int64_t s = 0; s < len - kRecent; ++s) order[s] = s;
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return sc[x] > sc[y]; });
        for (int64_t i = 0; i < kBudget - kRecent; ++i) kp[order[i]] = 1;
        for (int64_t s = len - kRecent; s < len; ++s) kp[s] = 1;
      }
    }
    shadowkv::EvictCompactParams p;
    p.cache = cache();
    p.keep = keep.data();
    p.keep_len = S;
    p.keep_stride[0] = kKvHeads * S;
    p.keep_stride[1] = S;
    p.keep_stride[2] = 1;
    p.steps = next_pos.data();
    p.evicted_at = evicted_at.data();
    p.log_len = kMaxLen;
    p.ev_stride[0] = kKvHeads * kMaxLen;
    p.ev_stride[1] = kMaxLen;
    p.ev_stride[2] = 1;
    p.slot_scores = slot_scores.data();
    std::copy(std::begin(p.keep_stride), std::end(p.keep_stride), p.scores_stride);
    std::vector<int32_t> freed(kBatch * kMaxPages);
    p.freed = freed.data();
    p.freed_stride[0] = kMaxPages;
    p.freed_stride[1] = 1;
    shadowkv::evict_compact_cpu(p);
    for (int32_t id : freed)
      if (id >= 0) free_pages.push_back(id);
  }
};

}  // namespace

int main() {
  std::printf("shadowkv %s, CUDA kernels built: %s\n", SHADOWKV_VERSION_STRING,
              shadowkv::built_with_cuda() ? "yes" : "no");
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  // What the model would produce: k/v of every position ([B, Hkv, kMaxLen, D], kept here for the
  // replay check) and the query of every decode step ([B, Hq, kDecodeSteps, D]).
  std::vector<float> hist_k(kBatch * kKvHeads * kMaxLen * kHeadDim), hist_v(hist_k.size());
  std::vector<float> hist_q(kBatch * kQHeads * kDecodeSteps * kHeadDim), hist_out(hist_q.size());
  for (float& x : hist_k) x = normal(rng);
  for (float& x : hist_v) x = normal(rng);
  for (float& x : hist_q) x = normal(rng);
  auto hist = [](std::vector<float>& t, int64_t heads, int64_t len, int64_t b, int64_t h, int64_t i) {
    return &t[((b * heads + h) * len + i) * kHeadDim];
  };

  Server server;
  int64_t total[kBatch] = {kPromptLen[0], kPromptLen[1]};  // positions appended so far

  // Prefill: the whole prompt of both sequences in one ragged append.
  {
    const int64_t T = *std::max_element(std::begin(kPromptLen), std::end(kPromptLen));
    std::vector<float> k(kBatch * kKvHeads * T * kHeadDim, 0.0f), v(k.size(), 0.0f);
    std::vector<int32_t> positions(kBatch * T, 0), num_new(kBatch);
    for (int64_t b = 0; b < kBatch; ++b) {
      num_new[b] = static_cast<int32_t>(kPromptLen[b]);
      for (int64_t t = 0; t < kPromptLen[b]; ++t) {
        positions[b * T + t] = static_cast<int32_t>(t);
        for (int64_t h = 0; h < kKvHeads; ++h) {
          std::copy_n(hist(hist_k, kKvHeads, kMaxLen, b, h, t), kHeadDim, &k[((b * kKvHeads + h) * T + t) * kHeadDim]);
          std::copy_n(hist(hist_v, kKvHeads, kMaxLen, b, h, t), kHeadDim, &v[((b * kKvHeads + h) * T + t) * kHeadDim]);
        }
      }
    }
    server.append(k, v, positions, num_new, T);
  }
  server.evict({static_cast<int32_t>(total[0]), static_cast<int32_t>(total[1])});  // prompts over budget

  // Decode loop: append the new token, attend, accumulate scores, evict down to the budget.
  const int64_t S = kMaxPages * kPageSize;
  std::vector<float> scores(kBatch * kKvHeads * S);
  for (int64_t step = 0; step < kDecodeSteps; ++step) {
    std::vector<float> k(kBatch * kKvHeads * kHeadDim), v(k.size()), q(kBatch * kQHeads * kHeadDim), out(q.size());
    std::vector<int32_t> positions(kBatch), num_new(kBatch, 1), next_pos(kBatch);
    for (int64_t b = 0; b < kBatch; ++b) {
      positions[b] = static_cast<int32_t>(total[b]);
      for (int64_t h = 0; h < kKvHeads; ++h) {
        std::copy_n(hist(hist_k, kKvHeads, kMaxLen, b, h, total[b]), kHeadDim, &k[(b * kKvHeads + h) * kHeadDim]);
        std::copy_n(hist(hist_v, kKvHeads, kMaxLen, b, h, total[b]), kHeadDim, &v[(b * kKvHeads + h) * kHeadDim]);
      }
      for (int64_t h = 0; h < kQHeads; ++h)
        std::copy_n(hist(hist_q, kQHeads, kDecodeSteps, b, h, step), kHeadDim, &q[(b * kQHeads + h) * kHeadDim]);
    }
    server.append(k, v, positions, num_new, 1);
    server.decode(q.data(), out.data(), scores);
    for (int64_t b = 0; b < kBatch; ++b) {
      ++total[b];
      next_pos[b] = static_cast<int32_t>(total[b]);
      for (int64_t h = 0; h < kQHeads; ++h)
        std::copy_n(&out[(b * kQHeads + h) * kHeadDim], kHeadDim, hist(hist_out, kQHeads, kDecodeSteps, b, h, step));
      for (int64_t h = 0; h < kKvHeads; ++h) {
        double mass = 0.0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (b * kKvHeads + h) * S + s;
          server.slot_scores[i] += scores[i];
          mass += scores[i];
        }
        // Each query head's probabilities sum to 1, and the group shares one KV head.
        expect(std::fabs(mass - double(kQHeads / kKvHeads)) < 1e-4, "scores of a KV head sum to its group size", b);
      }
    }
    server.evict(next_pos);
  }

  // 1. Lengths: every sequence is at the budget. 2. Each position is cached (per KV head) or
  // logged as evicted, never both, and a logged key was evicted after its own position.
  const shadowkv::PagedKVCache c = server.cache();
  int64_t pages_held = 0;
  for (int64_t b = 0; b < kBatch; ++b) {
    expect(server.seq_lens[b] == kBudget, "seq_lens == budget", b);
    for (int64_t h = 0; h < kKvHeads; ++h) {
      std::vector<int> cached(kMaxLen, 0);
      for (int64_t s = 0; s < server.seq_lens[b]; ++s) {
        const int32_t pos = c.pos(c.page_id(b, s / kPageSize), s % kPageSize, h);
        expect(pos >= 0 && pos < total[b], "cached position in range", b);
        if (pos >= 0 && pos < total[b]) ++cached[pos];
      }
      int64_t evicted = 0;
      for (int64_t j = 0; j < kMaxLen; ++j) {
        const int32_t ev = server.evicted_at[(b * kKvHeads + h) * kMaxLen + j];
        const bool logged = ev != kNever;
        evicted += logged;
        if (j >= total[b]) {
          expect(!logged, "no eviction logged past the sequence", b);
          continue;
        }
        expect(cached[j] + int(logged) == 1, "a position is cached xor logged", b);
        expect(!logged || (ev > j && ev <= total[b]), "evicted_at in (position, length]", b);
      }
      expect(evicted == total[b] - kBudget, "evictions == tokens - budget", b);
    }
    // 3. Pages: a sequence holds exactly the pages its slots need.
    int64_t held = 0;
    for (int64_t i = 0; i < kMaxPages; ++i) held += c.page_id(b, i) >= 0;
    expect(held == (server.seq_lens[b] + kPageSize - 1) / kPageSize, "pages held == pages needed", b);
    pages_held += held;
  }
  expect(pages_held + static_cast<int64_t>(server.free_pages.size()) == kNumPages, "every page held or free");

  // 4. Replay: shadow_attention over the full history, masked by the log, reproduces every
  // decode output (what the learner computes to stay on-policy).
  std::vector<float> replay(hist_out.size());
  std::vector<float> lse(kBatch * kQHeads * kDecodeSteps);
  for (int64_t b = 0; b < kBatch; ++b) {
    shadowkv::ShadowAttentionParams p;  // one sequence at a time: each has its own q_offset
    p.batch = 1;
    p.num_q_heads = kQHeads;
    p.num_kv_heads = kKvHeads;
    p.q_len = kDecodeSteps;
    p.kv_len = kMaxLen;
    p.head_dim = kHeadDim;
    p.q_offset = kPromptLen[b];
    p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
    p.q = hist(hist_q, kQHeads, kDecodeSteps, b, 0, 0);
    p.k = hist(hist_k, kKvHeads, kMaxLen, b, 0, 0);
    p.v = hist(hist_v, kKvHeads, kMaxLen, b, 0, 0);
    p.evicted_at = &server.evicted_at[b * kKvHeads * kMaxLen];
    p.out = hist(replay, kQHeads, kDecodeSteps, b, 0, 0);
    p.lse = &lse[b * kQHeads * kDecodeSteps];
    for (int64_t* s : {p.q_stride, p.o_stride}) {
      s[0] = kQHeads * kDecodeSteps * kHeadDim;
      s[1] = kDecodeSteps * kHeadDim;
      s[2] = kHeadDim;
    }
    for (int64_t* s : {p.k_stride, p.v_stride}) {
      s[0] = kKvHeads * kMaxLen * kHeadDim;
      s[1] = kMaxLen * kHeadDim;
      s[2] = kHeadDim;
    }
    p.ev_stride[0] = kKvHeads * kMaxLen;
    p.ev_stride[1] = kMaxLen;
    p.lse_stride[0] = kQHeads * kDecodeSteps;
    p.lse_stride[1] = kDecodeSteps;
    shadowkv::shadow_attention_fwd_cpu(p);
  }
  float max_diff = 0.0f;
  for (size_t i = 0; i < replay.size(); ++i) max_diff = std::max(max_diff, std::fabs(replay[i] - hist_out[i]));
  expect(max_diff < 1e-4f, "shadow_attention replays the decode outputs");

  // 5. A server built against either kind of library calls the CUDA entry points behind
  // built_with_cuda(): they link in a CPU-only build too, and throw there.
  if (!shadowkv::built_with_cuda()) {
    bool threw = false;
    try {
      shadowkv::paged_decode_attention_cuda(shadowkv::PagedDecodeParams{}, nullptr);
    } catch (const std::runtime_error&) {
      threw = true;
    }
    expect(threw, "a CUDA entry point of a CPU-only build throws std::runtime_error");
  }

  std::printf("%lld decode steps, budget %lld slots, %zu free pages, replay max |diff| %.3g: %s\n",
              static_cast<long long>(kDecodeSteps), static_cast<long long>(kBudget), server.free_pages.size(),
              static_cast<double>(max_diff), failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
