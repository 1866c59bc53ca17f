// CPU eviction from the paged KV cache: one pass per (sequence, KV head) moves the kept slots
// down (in order, or the ones past the new length into the holes: EvictCompactParams::stable)
// and logs the evicted ones in the shadow mask; emptied pages are then released.
// Everything is validated first, so a rejected call leaves the cache untouched.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "shadowkv/paged_kv.h"

namespace shadowkv::cpu {
namespace {

constexpr int32_t kNeverEvicted = std::numeric_limits<int32_t>::max();

std::string idx(std::initializer_list<int64_t> i) {
  std::string s = "[";
  for (int64_t v : i) s += (s.size() > 1 ? ", " : "") + std::to_string(v);
  return s + "]";
}

int32_t& log_at(const EvictCompactParams& p, int64_t b, int64_t h, int64_t pos) {
  return p.evicted_at[b * p.ev_stride[0] + h * p.ev_stride[1] + pos * p.ev_stride[2]];
}

// The keep flags of row (b, h). A torch bool mask is contiguous in its last dimension, where
// whole-row questions become byte scans the compiler vectorises (count) or libc does (memchr):
// in a rollout's steady state a few slots of thousands are evicted, and scalar loops over
// every flag were most of an eviction's time on the CPU.
struct KeepRow {
  const uint8_t* flags;
  int64_t stride;
  KeepRow(const EvictCompactParams& p, int64_t b, int64_t h)
      : flags(p.keep ? p.keep + b * p.keep_stride[0] + h * p.keep_stride[1] : nullptr),  // null: keep_len 0
        stride(p.keep_stride[2]) {}
  bool kept(int64_t s) const { return flags[s * stride] != 0; }
  // Slots of [from, to) that are kept.
  int64_t count_kept(int64_t from, int64_t to) const {
    if (stride == 1) return (to - from) - std::count(flags + from, flags + to, uint8_t{0});
    int64_t n = 0;
    for (int64_t s = from; s < to; ++s) n += kept(s);
    return n;
  }
  // The first evicted slot of [from, to), or `to`.
  int64_t next_evicted(int64_t from, int64_t to) const {
    if (from >= to) return to;
    if (stride == 1) {
      const void* z = std::memchr(flags + from, 0, static_cast<size_t>(to - from));
      return z == nullptr ? to : static_cast<const uint8_t*>(z) - flags;
    }
    while (from < to && kept(from)) ++from;
    return from;
  }
  // f(s) for every evicted slot s of [from, to), in order.
  template <typename F>
  void for_each_evicted(int64_t from, int64_t to, F&& f) const {
    for (int64_t s = next_evicted(from, to); s < to; s = next_evicted(s + 1, to)) f(s);
  }
};

template <typename T>
void compact_kernel(const EvictCompactParams& p, const std::vector<int64_t>& new_len, const ParallelFor& pf) {
  const PagedKVCache& c = p.cache;
  const int64_t D = c.head_dim, H = c.num_kv_heads, ps = c.page_size;
  pf(c.batch * H, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, len = c.seq_len(b);
      const int32_t step = p.steps[b * p.steps_stride];
      float* scores = p.slot_scores ? p.slot_scores + b * p.scores_stride[0] + h * p.scores_stride[1] : nullptr;
      auto move = [&](int64_t from, int64_t to) {
        const int64_t page_r = c.page_id(b, from / ps), row_r = from % ps;
        const int64_t page_w = c.page_id(b, to / ps), row_w = to % ps;
        std::copy_n(c.k_row<T>(page_r, row_r, h), D, c.k_row<T>(page_w, row_w, h));
        std::copy_n(c.v_row<T>(page_r, row_r, h), D, c.v_row<T>(page_w, row_w, h));
        c.pos(page_w, row_w, h) = c.pos(page_r, row_r, h);
        if (scores) scores[to * p.scores_stride[2]] = scores[from * p.scores_stride[2]];
      };
      const KeepRow keep(p, b, h);
      if (!p.stable) {
        // Fill: log every evicted slot first (a hole is overwritten below), then the i-th kept
        // slot at or past the new length goes to the i-th evicted slot below it.
        keep.for_each_evicted(0, len, [&](int64_t r) { log_at(p, b, h, c.pos(c.page_id(b, r / ps), r % ps, h)) = step; });
        int64_t hole = 0;
        for (int64_t r = new_len[b]; r < len; ++r) {
          if (!keep.kept(r)) continue;
          hole = keep.next_evicted(hole, new_len[b]);  // as many holes below n as kept slots past it
          move(r, hole++);
        }
      } else {
        // w: the next free slot; w <= r, so a slot is always read before it is overwritten. The
        // kept slots before the first evicted one stay.
        int64_t w = keep.next_evicted(0, len);
        for (int64_t r = w; r < len; ++r) {
          if (!keep.kept(r)) {
            log_at(p, b, h, c.pos(c.page_id(b, r / ps), r % ps, h)) = step;
            continue;
          }
          if (w != r) move(r, w);
          ++w;
        }
      }
      if (scores)
        for (int64_t s = new_len[b]; s < p.keep_len; ++s) scores[s * p.scores_stride[2]] = 0.0f;
    }
  });
}

}  // namespace
}  // namespace shadowkv::cpu

namespace shadowkv {

void evict_compact_cpu(const EvictCompactParams& p, const ParallelFor& pf) {
  using cpu::idx;
  constexpr const char* op = "shadowkv::evict_compact";
  auto fail = [](const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); };
  const PagedKVCache& c = p.cache;
  check_paged_cache(c, op);
  cpu::check_parallel_for(pf, op);
  if (p.keep_len < 0 || p.log_len < 0) fail("negative `keep` or `evicted_at` length");
  if (p.log_len > INT32_MAX) fail("`evicted_at` length " + std::to_string(p.log_len) + " exceeds the int32 positions");
  if (c.num_pages > 0 && !c.pos_pages) fail("null `pos_pages`");
  if (c.batch > 0 && ((p.keep_len > 0 && !p.keep) || !p.steps || (p.log_len > 0 && !p.evicted_at) ||
                      (c.max_pages > 0 && !p.freed)))
    fail("null input or output pointer");
  check_written_layouts(p, op);

  const int64_t B = c.batch, H = c.num_kv_heads, ps = c.page_size;
  std::vector<int64_t> new_len(B), used(B), write_begin(B), write_end(B, c.max_pages);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = c.seq_len(b), step = p.steps[b * p.steps_stride];
    if (len > p.keep_len)
      fail("`keep` has " + std::to_string(p.keep_len) + " slots (last dim) but `seq_lens`[" + std::to_string(b) +
           "] = " + std::to_string(len));
    if (step < 0 || step >= cpu::kNeverEvicted)
      fail("`steps`[" + std::to_string(b) + "] = " + std::to_string(step) + " must be in [0, 2147483647)");
    int64_t first_evicted = len;
    for (int64_t h = 0; h < H; ++h) {
      const cpu::KeepRow keep(p, b, h);
      if (keep.count_kept(len, p.keep_len) > 0) {
        int64_t s = len;
        while (!keep.kept(s)) ++s;
        fail("`keep`" + idx({b, h, s}) + " is True but the sequence has only `seq_lens`[" + std::to_string(b) +
             "] = " + std::to_string(len) + " slots");
      }
      const int64_t kept = keep.count_kept(0, len);
      first_evicted = std::min(first_evicted, keep.next_evicted(0, len));
      if (h == 0) new_len[b] = kept;
      if (kept != new_len[b])
        fail("`keep`: every KV head of a sequence must keep the same number of slots; sequence " +
             std::to_string(b) + " keeps " + std::to_string(new_len[b]) + " in head 0 and " + std::to_string(kept) +
             " in head " + std::to_string(h));
    }
    used[b] = (len + ps - 1) / ps;
    // Compaction writes from the page of the first evicted slot on; release touches the tail.
    write_begin[b] = new_len[b] < len ? first_evicted / ps : used[b];
  }
  check_block_tables(c, used.data(), write_begin.data(), write_end.data(), op);

  // Every evicted key must have a position inside the log that was never evicted before, and
  // (per head) appear once: otherwise the log would be written twice for it.
  std::vector<uint8_t> seen(static_cast<size_t>(p.log_len), 0);
  std::vector<int64_t> marked;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      cpu::KeepRow(p, b, h).for_each_evicted(0, c.seq_len(b), [&](int64_t s) {
        const int64_t pos = c.pos(c.page_id(b, s / ps), s % ps, h);
        if (pos < 0 || pos >= p.log_len)
          fail("`evicted_at` covers positions [0, " + std::to_string(p.log_len) + ") but evicted slot " +
               std::to_string(s) + " of sequence " + std::to_string(b) + ", KV head " + std::to_string(h) +
               " holds position " + std::to_string(pos) + " (`pos_pages`)");
        const int32_t logged = cpu::log_at(p, b, h, pos);
        if (logged != cpu::kNeverEvicted)
          fail("`evicted_at`" + idx({b, h, pos}) + " = " + std::to_string(logged) +
               ": the key at that position was already evicted; a key cannot be evicted twice");
        if (seen[pos])
          fail("`evicted_at`" + idx({b, h, pos}) + ": two evicted slots of the sequence hold position " +
               std::to_string(pos) + " (`pos_pages`); a key cannot be evicted twice");
        seen[pos] = 1;
        marked.push_back(pos);
      });
      for (int64_t pos : marked) seen[pos] = 0;
      marked.clear();
    }
  }

  cpu::dispatch_dtype(c.dtype, [&](auto tag) { cpu::compact_kernel<typename decltype(tag)::type>(p, new_len, pf); });

  for (int64_t b = 0; b < B; ++b) {
    c.seq_lens[b * c.seq_lens_stride] = static_cast<int32_t>(new_len[b]);
    if (c.max_pages == 0) continue;
    int32_t* freed = p.freed + b * p.freed_stride[0];
    int64_t n = 0;
    for (int64_t i = (new_len[b] + ps - 1) / ps; i < c.max_pages; ++i) {
      int32_t& id = c.page_id(b, i);
      if (id < 0) continue;
      freed[n++ * p.freed_stride[1]] = id;
      id = -1;
    }
    for (; n < c.max_pages; ++n) freed[n * p.freed_stride[1]] = -1;
  }
}

}  // namespace shadowkv
