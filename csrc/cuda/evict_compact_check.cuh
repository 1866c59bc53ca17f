// The value checks of a checked evict_compact call that validate_kernel's records do not settle,
// on the device (two kernels), private to evict_compact.cu (its anonymous namespace); in a header
// so that the host emulation of the C++ tests can run them.
//
// Why on the device: the host check needs the block tables and lengths on the host, and copying
// them (128 KB at B = 64, 8k context, page 16: gather kernels, a pageable copy, a loop over every
// entry) while the GPU waits cost 0.136 ms per call on an H200, 2.5x the unchecked eviction
// itself in a rollout's steady state (bench/RESULTS.md, 2026-11-27), as it had cost decode before
// paged_decode_check.cuh. These kernels compute the verdict; the host copies back one int. Only a
// failed verdict runs the host check, which raises the CPU op's message as before.
//
// validate_kernel's records already say, per (sequence, KV head): seq_lens[b] in [0, min(capacity,
// keep_len)] and every block-table entry in [0, num_pages), or -1 past the used pages (seq_ok);
// the first keep flag past the length (beyond); the kept count; the first evicted slot; the first
// evicted slot whose log entry cannot be written (bad_slot: outside the log, already evicted, or
// a position shared with an earlier slot). Left to these kernels: every KV head of a sequence
// keeps the same count, steps[b] in [0, INT32_MAX), and no page that the op writes (a column at
// or past the sequence's first page holding an evicted slot) appears in any other block-table
// entry (check_block_tables with write_end = max_pages, as evict_compact_cpu calls it).
#pragma once

#include "evict_compact_kernels.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kVerdictThreads = 256;

// One thread per (sequence b, block-table column i; column 0 also when there is none),
// grid-stride. Column 0 sets *bad when a check of sequence b fails (see the file comment) and
// stores b's first written column in write_begin[b] (-1 when b failed: nothing to compare).
// Every in-pool page id of the table is counted in refs (zeroed before the launch).
__global__ void __launch_bounds__(kVerdictThreads)
    evict_verdict_count_kernel(const EvictCompactParams p, int64_t heads, const HeadCheck* __restrict__ records,
                               int32_t* __restrict__ refs, int32_t* __restrict__ write_begin, int* __restrict__ bad) {
  const PagedKVCache& c = p.cache;
  const int64_t cols = c.max_pages > 0 ? c.max_pages : 1;
  const int64_t items = c.batch * cols, H = c.num_kv_heads;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = item / cols, i = item % cols;
    if (i < c.max_pages) {
      const int64_t id = c.block_tables[b * c.bt_stride[0] + i * c.bt_stride[1]];
      if (id >= 0 && id < c.num_pages) atomicAdd(refs + id, 1);
    }
    if (i != 0) continue;
    const HeadCheck* r = records + b * heads;
    const int64_t step = p.steps[b * p.steps_stride];
    bool ok = step >= 0 && step < kNeverEvicted;
    int64_t first_evicted = INT64_MAX;
    for (int64_t h = 0; h < heads; ++h) {
      ok = ok && r[h].seq_ok;
      if (h >= H) continue;
      ok = ok && r[h].beyond < 0 && r[h].kept == r[0].kept && r[h].bad_slot < 0;
      first_evicted = min(first_evicted, static_cast<int64_t>(r[h].first_evicted));
    }
    if (!ok) {
      atomicOr(bad, 1);
      write_begin[b] = -1;
      continue;
    }
    // seq_ok: 0 <= len <= capacity, so the column counts below fit int32 (max_pages does).
    const int64_t len = c.seq_lens[b * c.seq_lens_stride], used = (len + c.page_size - 1) / c.page_size;
    write_begin[b] = static_cast<int32_t>(r[0].kept < len ? first_evicted / c.page_size : used);
  }
}

// Same items: a column at or past write_begin[b] >= 0 holding a page that refs counts more than
// once sets *bad (the page is written, and read or written through another entry).
__global__ void __launch_bounds__(kVerdictThreads)
    evict_verdict_shared_kernel(const EvictCompactParams p, const int32_t* __restrict__ refs,
                                const int32_t* __restrict__ write_begin, int* __restrict__ bad) {
  const PagedKVCache& c = p.cache;
  const int64_t items = c.batch * c.max_pages;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = item / c.max_pages, i = item % c.max_pages, begin = write_begin[b];
    if (begin < 0 || i < begin) continue;
    const int64_t id = c.block_tables[b * c.bt_stride[0] + i * c.bt_stride[1]];
    if (id >= 0 && id < c.num_pages && refs[id] > 1) atomicOr(bad, 1);
  }
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
