// CPU append into the paged KV cache, and the cache/block-table validation that all three
// paged ops share (declared in paged_kv.h).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "shadowkv/paged_kv.h"

namespace shadowkv {

namespace {

std::string at2(int64_t i, int64_t j) { return "[" + std::to_string(i) + ", " + std::to_string(j) + "]"; }

}  // namespace

void check_paged_cache(const PagedKVCache& c, const char* op) {
  auto fail = [op](const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); };
  if (c.num_pages < 0 || c.batch < 0 || c.max_pages < 0) fail("negative shape in the cache params");
  if (c.head_dim < 1) fail("`k_pages` must have a head dim (dim 3) >= 1, got " + std::to_string(c.head_dim));
  if (c.page_size < 1) fail("`k_pages` must have a page size (dim 1) >= 1, got " + std::to_string(c.page_size));
  if (c.num_kv_heads < 1) fail("`k_pages` must have >= 1 KV head (dim 2), got " + std::to_string(c.num_kv_heads));
  // Slots and page ids are int32 (seq_lens, block_tables); with these bounds no slot or page
  // count below overflows (a page_size near INT64_MAX made ceil(len / page_size) negative).
  if (c.page_size > INT32_MAX || c.max_pages > INT32_MAX || c.num_pages > INT32_MAX)
    fail("page size, pages per sequence and pool pages must fit int32, got " + std::to_string(c.page_size) + ", " +
         std::to_string(c.max_pages) + ", " + std::to_string(c.num_pages));
  if (!product_fits_int64({c.num_pages, c.page_size, c.num_kv_heads, c.head_dim}))
    fail("the page pool is too large: its element count overflows int64");
  if (c.num_pages > 0 && (!c.k_pages || !c.v_pages)) fail("null page pointer");
  if (c.batch > 0 && !c.seq_lens) fail("null `seq_lens`");
  if (c.batch > 0 && c.max_pages > 0 && !c.block_tables) fail("null `block_tables`");
  const int64_t capacity = c.slot_capacity();
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len = c.seq_len(b);
    if (len < 0 || len > capacity)
      fail("`seq_lens`[" + std::to_string(b) + "] = " + std::to_string(len) + " must be in [0, " +
           std::to_string(capacity) + "] (`block_tables` holds " + std::to_string(c.max_pages) + " pages of " +
           std::to_string(c.page_size) + " slots per sequence)");
  }
}

void check_block_tables(const PagedKVCache& c, const int64_t* used_pages, const int64_t* write_begin,
                        const int64_t* write_end, const char* op) {
  auto fail = [op](const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); };
  // Public: a server may call it alone, so the cache's own fields (block_tables non-null,
  // sizes >= 0) are checked here too; O(batch) next to the O(batch * max_pages) scan below.
  check_paged_cache(c, op);
  if (c.batch > 0 && (!used_pages || !write_begin || !write_end))
    fail("null `used_pages`, `write_begin` or `write_end` for " + std::to_string(c.batch) + " sequences");
  const std::string pool = "[0, " + std::to_string(c.num_pages) + ")";
  for (int64_t b = 0; b < c.batch; ++b) {
    if (used_pages[b] < 0 || write_begin[b] < 0 || write_end[b] < 0)  // a caller's bug: it would read column -1
      fail("negative page range for sequence " + std::to_string(b) + " (used " + std::to_string(used_pages[b]) +
           ", written [" + std::to_string(write_begin[b]) + ", " + std::to_string(write_end[b]) + "))");
    if (used_pages[b] > c.max_pages || write_end[b] > c.max_pages)
      fail("`block_tables` has " + std::to_string(c.max_pages) + " columns but sequence " + std::to_string(b) +
           " needs " + std::to_string(std::max(used_pages[b], write_end[b])) + " pages of " +
           std::to_string(c.page_size) + " slots");
  }
  bool writes = false;
  for (int64_t b = 0; b < c.batch; ++b) writes = writes || write_begin[b] < write_end[b];
  // refs[page] = number of block-table entries (of the checked ranges) that hold the page; only
  // needed (O(num_pages)) when the op writes pages.
  std::vector<int32_t> refs(writes ? static_cast<size_t>(c.num_pages) : 0, 0);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t i = 0; i < std::max(used_pages[b], write_end[b]); ++i) {
      const int64_t id = c.page_id(b, i);
      const bool in_pool = id >= 0 && id < c.num_pages;
      if (i < used_pages[b] && !in_pool)
        fail("`block_tables`" + at2(b, i) + " = " + std::to_string(id) + " must be a page id in " + pool +
             " (sequence " + std::to_string(b) + " uses " + std::to_string(used_pages[b]) + " pages)");
      if (!in_pool && id != -1)
        fail("`block_tables`" + at2(b, i) + " = " + std::to_string(id) + " must be -1 or a page id in " + pool);
      if (in_pool && writes) ++refs[id];
    }
  }
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t i = write_begin[b]; i < write_end[b]; ++i) {
      const int64_t id = c.page_id(b, i);
      if (id >= 0 && refs[id] > 1)
        fail("`block_tables`" + at2(b, i) + " = page " + std::to_string(id) +
             ", which this op writes, appears in " + std::to_string(refs[id]) +
             " entries; sequences must not share a page that is written");
    }
  }
}

namespace cpu {
namespace {

template <typename T>
void append_kernel(const AppendKVParams& p, const std::vector<int64_t>& num_new, const ParallelFor& pf) {
  const PagedKVCache& c = p.cache;
  const int64_t D = c.head_dim, H = c.num_kv_heads, ps = c.page_size;
  pf(c.batch * H, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, start = c.seq_len(b);
      for (int64_t t = 0; t < num_new[b]; ++t) {
        const int64_t slot = start + t, page = c.page_id(b, slot / ps), row = slot % ps;
        const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1] + t * p.k_stride[2];
        const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + t * p.v_stride[2];
        std::copy_n(k, D, c.k_row<T>(page, row, h));
        std::copy_n(v, D, c.v_row<T>(page, row, h));
        c.pos(page, row, h) = p.positions[b * p.positions_stride[0] + t * p.positions_stride[1]];
      }
    }
  });
}

}  // namespace
}  // namespace cpu

void append_kv_cpu(const AppendKVParams& p, const ParallelFor& pf) {
  constexpr const char* op = "shadowkv::append_kv";
  auto fail = [](const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); };
  const PagedKVCache& c = p.cache;
  check_paged_cache(c, op);
  cpu::check_parallel_for(pf, op);
  if (p.num_tokens < 0) fail("negative token count");
  if (c.num_pages > 0 && !c.pos_pages) fail("null `pos_pages`");
  if (c.batch > 0 && (!p.num_new || (p.num_tokens > 0 && (!p.k || !p.v || !p.positions))))
    fail("null input pointer");
  check_written_layouts(p, op);

  const int64_t B = c.batch, T = p.num_tokens, ps = c.page_size;
  std::vector<int64_t> num_new(B), used(B), write_begin(B), write_end(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = p.num_new[b * p.num_new_stride], len = c.seq_len(b);
    if (n < 0 || n > T)
      fail("`num_new`[" + std::to_string(b) + "] = " + std::to_string(n) + " must be in [0, " + std::to_string(T) +
           "] (T, the token dimension of `k`)");
    for (int64_t t = 0; t < n; ++t) {
      const int32_t pos = p.positions[b * p.positions_stride[0] + t * p.positions_stride[1]];
      if (pos < 0) fail("`positions`" + at2(b, t) + " = " + std::to_string(pos) + " must be >= 0");
    }
    if (len + n > std::numeric_limits<int32_t>::max())
      fail("`seq_lens`[" + std::to_string(b) + "] + `num_new`[" + std::to_string(b) + "] overflows int32");
    num_new[b] = n;
    used[b] = (len + n + ps - 1) / ps;
    write_begin[b] = n > 0 ? len / ps : 0;
    write_end[b] = n > 0 ? used[b] : 0;
  }
  check_block_tables(c, used.data(), write_begin.data(), write_end.data(), op);

  cpu::dispatch_dtype(c.dtype, [&](auto tag) { cpu::append_kernel<typename decltype(tag)::type>(p, num_new, pf); });
  for (int64_t b = 0; b < B; ++b) c.seq_lens[b * c.seq_lens_stride] = static_cast<int32_t>(c.seq_len(b) + num_new[b]);
}

}  // namespace shadowkv
