// The CUDA eviction kernels (csrc/cuda/evict_compact_kernels.cuh: validate, then compact or fill,
// whose last block per sequence finalizes it) run from their own source in the host emulation of
// tests/cpp/cuda_emulation.h, as an unchecked call launches them (and with a checked call's claims
// of the log entries, which compaction must all overwrite), against evict_compact_cpu on a copy of
// the same state: the two must give the same bits in every buffer (pages, positions, lengths, block
// tables, the eviction log, slot scores, freed pages), as the CUDA op promises, for both
// compactions (stable and fill). Row sizes pick each word width of the copy (2, 4, 8, 16 bytes) and
// the long-row paths (more than 1024 words); fill runs rounds of 1024 pairs; a sequence that an
// unchecked call must leave alone (a bad step, an already-logged position, a position past the log)
// keeps its bytes and gets length -1. A checked call's verdict on the device
// (evict_compact_check.cuh, after validate_kernel) must be the CPU op's: reject exactly what it
// rejects.
#include "cuda_emulation.h"  // first: it defines what the CUDA headers below expect

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "evict_compact_check.cuh"
#include "evict_compact_kernels.cuh"
#include "harness.h"
#include "shadowkv/paged_kv.h"

namespace {

using namespace shadowkv;
using namespace shadowkv::cuda_paged;

struct Case {
  std::vector<int> lens;
  std::vector<int> kept;  // per sequence, in every head
  int kv_heads, page_size, head_dim;
  DType dtype;
  int bad_step_seq = -1;  // this sequence gets step -1: an unchecked call leaves it alone
  // This sequence's last evicted slot of its last head holds a position already in the log
  // (or, with bad_pos_outside, one past it): an unchecked call leaves it alone too.
  int bad_log_seq = -1;
  bool bad_pos_outside = false;
  // >= 0: every head keeps its first `sinks` slots and its last kept - sinks (StreamingLLM)
  // instead of a random set.
  int sinks = -1;
  // The keep rows' length, max(lens) + 3, rounded up to a multiple of this: 16 makes every row
  // 16-byte aligned, which validate_kernel reads 16 flags at a time.
  int keep_align = 1;
};

// Everything an eviction reads or writes, in exactly sized buffers.
struct State {
  int64_t B, H, ps, D, es, num_pages, max_pages, keep_len, log_len;
  std::vector<unsigned char> k, v;
  std::vector<int32_t> pos, tables, lens, steps, log, freed;
  std::vector<uint8_t> keep;
  std::vector<float> scores;

  EvictCompactParams params() {
    EvictCompactParams p;
    PagedKVCache& c = p.cache;
    c.num_pages = num_pages;
    c.page_size = ps;
    c.num_kv_heads = H;
    c.head_dim = D;
    c.batch = B;
    c.max_pages = max_pages;
    c.dtype = es == 2 ? DType::kBFloat16 : DType::kFloat32;
    c.k_pages = k.data();
    c.v_pages = v.data();
    c.pos_pages = pos.data();
    c.block_tables = tables.data();
    c.seq_lens = lens.data();
    const int64_t st[3] = {ps * H * D, H * D, D};
    std::copy(st, st + 3, c.k_stride);
    std::copy(st, st + 3, c.v_stride);
    c.pos_stride[0] = ps * H;
    c.pos_stride[1] = H;
    c.pos_stride[2] = 1;
    c.bt_stride[0] = max_pages;
    c.bt_stride[1] = 1;
    p.keep = keep.data();
    p.keep_len = keep_len;
    p.keep_stride[0] = H * keep_len;
    p.keep_stride[1] = keep_len;
    p.keep_stride[2] = 1;
    p.steps = steps.data();
    p.evicted_at = log.data();
    p.log_len = log_len;
    p.ev_stride[0] = H * log_len;
    p.ev_stride[1] = log_len;
    p.ev_stride[2] = 1;
    p.slot_scores = scores.data();
    p.scores_stride[0] = H * keep_len;
    p.scores_stride[1] = keep_len;
    p.scores_stride[2] = 1;
    p.freed = freed.data();
    p.freed_stride[0] = max_pages;
    p.freed_stride[1] = 1;
    return p;
  }
};

State make_state(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  State s;
  s.B = static_cast<int64_t>(c.lens.size());
  s.H = c.kv_heads;
  s.ps = c.page_size;
  s.D = c.head_dim;
  s.es = c.dtype == DType::kBFloat16 ? 2 : 4;
  const int max_len = *std::max_element(c.lens.begin(), c.lens.end());
  s.max_pages = (max_len + s.ps - 1) / s.ps + 1;
  s.num_pages = 1;  // one page nobody uses
  for (int len : c.lens) s.num_pages += (len + s.ps - 1) / s.ps;
  s.keep_len = (max_len + 3 + c.keep_align - 1) / c.keep_align * c.keep_align;
  s.log_len = max_len + 7;
  s.k.resize(static_cast<size_t>(s.num_pages * s.ps * s.H * s.D * s.es));
  s.v.resize(s.k.size());
  for (auto& x : s.k) x = static_cast<unsigned char>(rng());
  for (auto& x : s.v) x = static_cast<unsigned char>(rng());
  s.pos.assign(static_cast<size_t>(s.num_pages * s.ps * s.H), -5);
  s.tables.assign(static_cast<size_t>(s.B * s.max_pages), -1);
  s.lens.assign(c.lens.begin(), c.lens.end());
  s.steps.resize(s.B);
  s.log.assign(static_cast<size_t>(s.B * s.H * s.log_len), kNeverEvicted);
  s.freed.assign(static_cast<size_t>(s.B * s.max_pages), 77);
  s.keep.assign(static_cast<size_t>(s.B * s.H * s.keep_len), 0);
  s.scores.resize(static_cast<size_t>(s.B * s.H * s.keep_len));
  for (auto& x : s.scores) x = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
  std::vector<int32_t> ids(s.num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  int next = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    const int len = c.lens[b];
    s.steps[b] = b == c.bad_step_seq ? -1 : 100 + static_cast<int32_t>(b);
    for (int64_t i = 0; i < (len + s.ps - 1) / s.ps; ++i) s.tables[b * s.max_pages + i] = ids[next++];
    for (int64_t h = 0; h < s.H; ++h) {
      // Distinct positions per head (a shuffled range; some already logged ones are never evicted).
      std::vector<int32_t> positions(s.log_len);
      std::iota(positions.begin(), positions.end(), 0);
      std::shuffle(positions.begin(), positions.end(), rng);
      std::vector<int> order(len);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      for (int j = 0; j < c.kept[b]; ++j) {
        const int slot = c.sinks < 0 ? order[j] : j < c.sinks ? j : len - (c.kept[b] - j);
        s.keep[(b * s.H + h) * s.keep_len + slot] = 1;
      }
      for (int slot = 0; slot < len; ++slot) {
        const int64_t page = s.tables[b * s.max_pages + slot / s.ps];
        s.pos[(page * s.ps + slot % s.ps) * s.H + h] = positions[slot];
      }
    }
  }
  if (c.bad_log_seq >= 0) {
    const int64_t b = c.bad_log_seq, h = s.H - 1;
    int slot = c.lens[b] - 1;
    while (slot >= 0 && s.keep[(b * s.H + h) * s.keep_len + slot]) --slot;
    if (slot < 0) std::abort();  // the case must evict something in that sequence
    const int64_t page = s.tables[b * s.max_pages + slot / s.ps];
    int32_t& pos = s.pos[(page * s.ps + slot % s.ps) * s.H + h];
    if (c.bad_pos_outside) pos = static_cast<int32_t>(s.log_len + 3);
    else s.log[(b * s.H + h) * s.log_len + pos] = 5;
  }
  return s;
}

// evict_compact_cuda's launches, in the emulation: unchecked, or (`claim`) with the checked
// call's claims of the evicted slots' log entries, which compaction must all overwrite (the
// host-side check between the two is skipped: only valid states are claimed). `order`: the
// compaction's block order, which decides the head whose block finalizes a sequence.
void evict_emulated(EvictCompactParams p, bool claim = false,
                    shadowkv_emu::BlockOrder order = shadowkv_emu::BlockOrder::kAscending) {
  p.check_values = claim;
  const PagedKVCache& c = p.cache;
  const int64_t B = c.batch, H = c.num_kv_heads, heads = std::max<int64_t>(H, 1);
  const CompactShape shape = compact_shape(c);
  const int64_t es = shape.elem_bytes, words_per_row = shape.words_per_row;
  const int word = shape.word, chunk = shape.chunk;
  // As on the device: a checked call zeroes the records, an unchecked one leaves whatever the
  // workspace held (validate_kernel must write every field that a later kernel reads).
  std::vector<HeadCheck> records(static_cast<size_t>(B * heads), HeadCheck{});
  if (!claim) std::memset(records.data(), 0x5a, records.size() * sizeof(HeadCheck));
  const FastDivmod page_div(static_cast<uint32_t>(c.page_size));
  HeadCheck* rec = records.data();
  shadowkv_emu::launch(static_cast<unsigned>(B * heads), kThreads, 0,
                       [&] { validate_kernel(p, page_div, c.slot_capacity(), heads, claim, rec); });
  const FastDivmod words(static_cast<uint32_t>(std::max<int64_t>(words_per_row, 1)));
  if (H == 0) {
    shadowkv_emu::launch(static_cast<unsigned>(B), kThreads, 0, [&] { finalize_kernel(p, rec, heads); });
    return;
  }
  dispatch_word(word, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    if (p.stable) {
      shadowkv_emu::launch(
          static_cast<unsigned>(B * H), kThreads, 0, [&] { compact_kernel<kW>(p, page_div, rec, es, words, chunk); },
          order);
    } else {
      shadowkv_emu::launch(
          static_cast<unsigned>(B * H), kThreads, 0, [&] { fill_kernel<kW>(p, page_div, rec, es, words); }, order);
    }
  });
}

template <typename V>
bool same_bytes(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0;
}

// Copies sequence b's rows (its pages, table row, log and score rows) from `from` into `to`.
void copy_sequence(State& to, const State& from, int64_t b, int len) {
  const auto copy = [](auto& dst, const auto& src, size_t begin, size_t count) {
    std::copy(src.begin() + begin, src.begin() + begin + count, dst.begin() + begin);
  };
  const size_t page_bytes = static_cast<size_t>(from.ps * from.H * from.D * from.es);
  const size_t page_slots = static_cast<size_t>(from.ps * from.H);
  for (int64_t i = 0; i < (len + from.ps - 1) / from.ps; ++i) {
    const size_t page = static_cast<size_t>(from.tables[b * from.max_pages + i]);
    copy(to.k, from.k, page * page_bytes, page_bytes);
    copy(to.v, from.v, page * page_bytes, page_bytes);
    copy(to.pos, from.pos, page * page_slots, page_slots);
  }
  copy(to.tables, from.tables, static_cast<size_t>(b * from.max_pages), static_cast<size_t>(from.max_pages));
  copy(to.log, from.log, static_cast<size_t>(b * from.H * from.log_len), static_cast<size_t>(from.H * from.log_len));
  copy(to.scores, from.scores, static_cast<size_t>(b * from.H * from.keep_len),
       static_cast<size_t>(from.H * from.keep_len));
}

void run_case(const Case& c, uint32_t seed, const std::string& name, bool stable = true, bool claim = false) {
  State emu = make_state(c, seed);
  // The expected state: the CPU op on the same state with every step valid (the CPU op rejects
  // a whole call with a bad step), then the bad sequence as it was, with length -1 and a freed
  // row of -1.
  Case valid = c;
  valid.bad_step_seq = -1;
  valid.bad_log_seq = -1;
  State cpu = make_state(valid, seed);
  EvictCompactParams cpu_params = cpu.params();
  cpu_params.stable = stable;
  evict_compact_cpu(cpu_params);
  for (const int64_t b : {static_cast<int64_t>(c.bad_step_seq), static_cast<int64_t>(c.bad_log_seq)}) {
    if (b < 0) continue;
    copy_sequence(cpu, emu, b, c.lens[b]);
    cpu.lens[b] = -1;
    std::fill(cpu.freed.begin() + b * cpu.max_pages, cpu.freed.begin() + (b + 1) * cpu.max_pages, -1);
  }
  EvictCompactParams emu_params = emu.params();
  emu_params.stable = stable;
  // Odd seeds run the compaction's blocks last to first: the first head finalizes.
  evict_emulated(emu_params, claim,
                 seed % 2 ? shadowkv_emu::BlockOrder::kDescending : shadowkv_emu::BlockOrder::kAscending);
  const std::pair<const char*, bool> checks[] = {
      {"k_pages", same_bytes(cpu.k, emu.k)},        {"v_pages", same_bytes(cpu.v, emu.v)},
      {"pos_pages", same_bytes(cpu.pos, emu.pos)},  {"block_tables", same_bytes(cpu.tables, emu.tables)},
      {"seq_lens", same_bytes(cpu.lens, emu.lens)}, {"evicted_at", same_bytes(cpu.log, emu.log)},
      {"freed", same_bytes(cpu.freed, emu.freed)},  {"slot_scores", same_bytes(cpu.scores, emu.scores)},
  };
  for (const auto& [what, ok] : checks)
    if (!ok) shadowkv_test::report(__FILE__, __LINE__, name + ": " + what + " differs from evict_compact_cpu");
}

// Both compactions start at the row's first evicted slot (validate_kernel's): here slot 1500 of
// 3000 (past a fill round's 1024-slot scan and many stable chunks), the first 1500 slots kept
// and 100 of the tail, so 100 holes [1500, 1600) take the tail's kept slots.
Case late_first_eviction() {
  Case c{{3000, 40}, {1600, 40}, 2, 16, 8, DType::kBFloat16};
  c.sinks = 1500;
  return c;
}

TEST(emulated_evict_matches_cpu) {
  // lens, kept per sequence, Hkv, page size, D, dtype; row bytes 128 (16-byte words), 20 (4),
  // 6 (2), 24 (8), 16400 (1025 16-byte words: the direct path).
  const Case cases[] = {
      {{300, 0, 17, 64}, {75, 0, 17, 1}, 2, 16, 64, DType::kBFloat16},
      {{130, 129}, {0, 128}, 3, 5, 5, DType::kFloat32},
      {{600}, {150}, 1, 1, 3, DType::kBFloat16},
      {{260, 33}, {259, 2}, 2, 7, 6, DType::kFloat32},
      {{20, 9}, {5, 9}, 2, 4, 4100, DType::kFloat32},
  };
  uint32_t seed = 3;
  for (const Case& c : cases) {
    run_case(c, seed, "case seed " + std::to_string(seed));
    run_case(c, seed, "case seed " + std::to_string(seed) + ", claimed", true, true);
    Case aligned = c;  // validate_kernel's 16-flag loads
    aligned.keep_align = 16;
    run_case(aligned, seed, "case seed " + std::to_string(seed) + ", aligned keep rows, claimed", true, true);
    ++seed;
  }
  run_case(late_first_eviction(), seed, "first eviction at slot 1500");
}

TEST(emulated_evict_unchecked_leaves_a_bad_sequence_alone) {
  Case c{{300, 100, 40}, {70, 30, 40}, 2, 16, 64, DType::kBFloat16};
  c.bad_step_seq = 1;
  run_case(c, 17, "bad step");
  run_case(c, 17, "bad step, fill", false);
  // validate_kernel's scan must find a bad log entry or position at the end of a long row.
  Case log{{3000, 900, 40}, {2200, 30, 40}, 2, 16, 8, DType::kBFloat16};
  log.bad_log_seq = 0;
  run_case(log, 18, "already logged");
  log.keep_align = 16;
  run_case(log, 18, "already logged, aligned keep rows");
  log.keep_align = 1;
  run_case(log, 18, "already logged, fill", false);
  log.bad_pos_outside = true;
  run_case(log, 19, "position outside the log", false);
}

TEST(emulated_evict_fill_matches_cpu) {
  // stable = false (fill_kernel). Row bytes 128 (16-byte words), 20 (4), 6 (2), 16400 (1025
  // words: one pair at a time); 5000 slots keeping 2500 have ~1250 holes below the new length
  // (two rounds of 1024 pairs); nothing evicted, everything evicted, one slot kept.
  const Case cases[] = {
      {{300, 0, 17, 64}, {75, 0, 17, 1}, 2, 16, 64, DType::kBFloat16},
      {{130, 129}, {0, 128}, 3, 5, 5, DType::kFloat32},
      {{600}, {150}, 1, 1, 3, DType::kBFloat16},
      {{5000, 2100}, {2500, 2099}, 2, 16, 64, DType::kBFloat16},
      {{20, 9}, {5, 9}, 2, 4, 4100, DType::kFloat32},
  };
  // Streaming: 1024 and 2048 holes right after 4 sinks (full rounds, then one that finds none),
  // 1023 (one short of a round), none (only the sinks kept); 2200-wide bf16 rows (275 words,
  // the word-indexed copy).
  Case exact{{3000, 5000, 2500, 1030}, {1028, 2052, 1027, 4}, 1, 16, 64, DType::kBFloat16};
  exact.sinks = 4;
  Case wide{{700}, {300}, 1, 16, 2200, DType::kBFloat16};
  uint32_t seed = 31;
  run_case(exact, seed, "fill streaming rounds", false);
  run_case(wide, seed, "fill wide rows", false);
  run_case(late_first_eviction(), seed, "fill, first eviction at slot 1500", false);
  for (const Case& c : cases) {
    run_case(c, seed, "fill case seed " + std::to_string(seed), false);
    run_case(c, seed, "fill case seed " + std::to_string(seed) + ", claimed", false, true);
    ++seed;
  }
}

// A checked call's device verdict: validate_kernel (claiming, as a checked call does), then
// evict_compact_check.cuh's two kernels, on at most two blocks (grid-stride loops). True: good.
bool device_verdict(EvictCompactParams p) {
  p.check_values = true;
  const PagedKVCache& c = p.cache;
  const int64_t B = c.batch, heads = std::max<int64_t>(c.num_kv_heads, 1);
  std::vector<HeadCheck> records(static_cast<size_t>(B * heads), HeadCheck{});
  const FastDivmod page_div(static_cast<uint32_t>(c.page_size));
  HeadCheck* rec = records.data();
  shadowkv_emu::launch(static_cast<unsigned>(B * heads), kThreads, 0,
                       [&] { validate_kernel(p, page_div, c.slot_capacity(), heads, true, rec); });
  std::vector<int32_t> refs(static_cast<size_t>(c.num_pages), 0), write_begin(static_cast<size_t>(B), 77);
  int bad = 0;
  // 32-thread blocks (the kernels loop by blockDim): fewer emulated threads to run.
  constexpr int kTestThreads = 32;
  const auto blocks = [](int64_t items) {
    return static_cast<unsigned>(std::clamp<int64_t>((items + kTestThreads - 1) / kTestThreads, 1, 2));
  };
  shadowkv_emu::launch(blocks(B * std::max<int64_t>(c.max_pages, 1)), kTestThreads, 0, [&] {
    evict_verdict_count_kernel(p, heads, rec, refs.data(), write_begin.data(), &bad);
  });
  if (c.max_pages > 0) {
    shadowkv_emu::launch(blocks(B * c.max_pages), kTestThreads, 0,
                         [&] { evict_verdict_shared_kernel(p, refs.data(), write_begin.data(), &bad); });
  }
  return bad == 0;
}

// Slot `slot` of sequence b, head h: its position (pos_pages).
int32_t& position(State& s, int64_t b, int64_t h, int64_t slot) {
  const int64_t page = s.tables[b * s.max_pages + slot / s.ps];
  return s.pos[(page * s.ps + slot % s.ps) * s.H + h];
}

// The device verdict against evict_compact_cpu (which checks everything before it writes) on
// random states with one bad value or none: lengths (negative, past the capacity or `keep`,
// shorter than the keep flags), steps, keep flags past the length, kept counts that differ
// between heads, block-table entries (outside the pool where used, garbage where unused), a
// page in two tables (an error where either entry is written, not where both are below the
// first evicted slot's page), evicted positions already logged, outside the log or shared;
// half of them with 16-byte aligned keep rows (validate_kernel's vector loads).
//
// Under ThreadSanitizer (CI's race run, ~1 s per state there: 98 s, the run's longest test) only
// the first 40 states: every state runs under AddressSanitizer, and the draw is seeded, so the
// draw's own checks at the end hold there for the same states.
#if defined(__SANITIZE_THREAD__)
constexpr int kVerdictStates = 40;
#else
constexpr int kVerdictStates = 100;
#endif
TEST(emulated_evict_check_matches_cpu_checks) {
  std::mt19937 rng(23);
  const auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int flagged = 0, shared_ok = 0;
  for (int iter = 0; iter < kVerdictStates; ++iter) {
    const int B = uniform(1, 4), H = uniform(1, 3), ps = uniform(1, 5);
    Case c{{}, {}, H, ps, 2, DType::kFloat32};
    c.keep_align = uniform(0, 1) ? 16 : 1;
    for (int b = 0; b < B; ++b) {
      c.lens.push_back(uniform(0, 30));
      c.kept.push_back(uniform(0, c.lens.back()));
    }
    // Streaming keep masks with whole sink pages sometimes: their first pages are not written.
    if (uniform(0, 2) == 0) {
      c.sinks = ps * uniform(1, 2);
      for (int b = 0; b < B; ++b) {
        c.lens[b] = std::max(c.lens[b], c.sinks + 2);
        c.kept[b] = uniform(c.sinks + 1, c.lens[b]);
      }
    }
    State s = make_state(c, static_cast<uint32_t>(1000 + iter));
    const int b = uniform(0, B - 1), len = c.lens[b], h = uniform(0, H - 1);
    const int used = (len + ps - 1) / ps;
    const auto keep_at = [&](int64_t hh, int64_t slot) -> uint8_t& {
      return s.keep[(b * s.H + hh) * s.keep_len + slot];
    };
    // An evicted slot of (b, h), or -1.
    int evicted = -1;
    for (int slot = 0; slot < len; ++slot)
      if (!keep_at(h, slot)) evicted = slot;
    bool shared_read_only = false;
    switch (uniform(0, 13)) {
      case 0: s.lens[b] = uniform(0, 1) ? -uniform(1, 3) : static_cast<int32_t>(s.max_pages * ps + uniform(1, 2)); break;
      case 1: s.lens[b] = static_cast<int32_t>(s.keep_len + 1); break;
      case 2: s.lens[b] = uniform(0, len); break;  // keep flags may now lie past it
      case 3: s.steps[b] = uniform(0, 1) ? -1 : INT32_MAX; break;
      case 4: if (len < s.keep_len) keep_at(h, len) = 1; break;
      case 5: if (H > 1 && len > 0) { const int slot = uniform(0, len - 1); keep_at(1, slot) ^= 1; } break;
      case 6: if (used > 0) s.tables[b * s.max_pages + uniform(0, used - 1)] = uniform(0, 1) ? -1 : static_cast<int32_t>(s.num_pages); break;
      case 7: if (used < s.max_pages) s.tables[b * s.max_pages + used] = uniform(0, 1) ? -1 : -3; break;
      case 8: {  // another sequence's page (or its own) in an unused column: that column is written
        const int o = uniform(0, B - 1), o_used = (c.lens[o] + ps - 1) / ps;
        if (o_used > 0 && used < s.max_pages) s.tables[b * s.max_pages + used] = s.tables[o * s.max_pages + uniform(0, o_used - 1)];
        break;
      }
      case 9: {  // two sequences' first (sink) pages shared: an error only where one of them is written
        const int o = (b + 1) % B;
        if (o != b && used > 0 && c.lens[o] > 0) {
          s.tables[b * s.max_pages] = s.tables[o * s.max_pages];
          // Its rows must hold sequence b's positions for the CPU op to find nothing else wrong.
          for (int64_t hh = 0; hh < H; ++hh)
            for (int slot = 0; slot < std::min(ps, std::min(len, c.lens[o])); ++slot) position(s, b, hh, slot) = position(s, o, hh, slot);
          shared_read_only = c.sinks >= ps;
        }
        break;
      }
      case 10: if (evicted >= 0) s.log[(b * s.H + h) * s.log_len + position(s, b, h, evicted)] = 3; break;
      case 11: if (evicted >= 0) position(s, b, h, evicted) = uniform(0, 1) ? -1 : static_cast<int32_t>(s.log_len); break;
      case 12: {  // an evicted slot takes another slot's position
        const int other = uniform(0, std::max(len - 1, 0));
        if (evicted >= 0 && other != evicted) position(s, b, h, evicted) = position(s, b, h, other);
        break;
      }
      default: break;
    }
    State cpu = s;
    bool host_bad = false;
    try {
      evict_compact_cpu(cpu.params());
    } catch (const std::invalid_argument&) {
      host_bad = true;
    }
    const bool device_good = device_verdict(s.params());
    if (device_good == host_bad)
      shadowkv_test::report(__FILE__, __LINE__, "iteration " + std::to_string(iter) + ": device verdict " +
                                                    (device_good ? "good" : "bad") + ", evict_compact_cpu " +
                                                    (host_bad ? "rejects" : "accepts"));
    flagged += host_bad;
    shared_ok += shared_read_only && !host_bad;
  }
  if (kVerdictStates == 100) {
    CHECK(flagged > 20 && flagged < 90);  // both verdicts drawn
    CHECK(shared_ok > 0);                  // a shared page that nobody writes passed
  }
}

}  // namespace
