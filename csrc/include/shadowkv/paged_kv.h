// Paged KV cache of one layer: append, one-token decode attention, and in-place eviction
// that writes the shadow mask (DESIGN.md sections 1-3).
//
// Layout (vLLM-like):
//   k_pages, v_pages  [P, page_size, Hkv, D]   the page pool (float32/float64/bfloat16/float16)
//   pos_pages         [P, page_size, Hkv]      int32, original (absolute) position of each slot,
//                                              per KV head (heads keep different tokens)
//   block_tables      [B, max_pages]           int32, page ids of each sequence in order, -1 = none
//   seq_lens          [B]                      int32, slots in use (same for every KV head)
// Logical slot s of sequence b lives in page block_tables[b, s / page_size], row s % page_size.
//
// Plain C++ API over raw pointers and element strides, usable without torch. Rows of head
// data (the D dimension of k/v/q/out) must be contiguous; every other dimension has a stride.
// All strides are in elements.
//
// Each op validates its params and every value it depends on (sequence lengths, page ids, ...)
// before it writes anything, and throws std::invalid_argument whose message names the argument
// as the torch op spells it (`block_tables`, `keep`, ...). Sequences must not share a page that
// an op writes (checked); pages that are only read may be shared.
//
// The CUDA twins (append_kv_cuda, ...) take the same params, with every array on the device.
#pragma once

#include <cstdint>

#include "shadowkv/dtypes.h"
#include "shadowkv/shadow_attention.h"  // ParallelFor, serial_for

namespace shadowkv {

// One layer's cache. The ops below state which of these they write.
struct PagedKVCache {
  int64_t num_pages = 0, page_size = 0, num_kv_heads = 0, head_dim = 0;
  int64_t batch = 0, max_pages = 0;  // block_tables is [batch, max_pages]
  DType dtype = DType::kFloat32;     // of k_pages and v_pages

  void* k_pages = nullptr;
  void* v_pages = nullptr;
  int32_t* pos_pages = nullptr;
  int32_t* block_tables = nullptr;
  int32_t* seq_lens = nullptr;

  int64_t k_stride[3] = {0, 0, 0};    // page, row, head (D is contiguous)
  int64_t v_stride[3] = {0, 0, 0};
  int64_t pos_stride[3] = {0, 0, 0};  // page, row, head
  int64_t bt_stride[2] = {0, 0};      // sequence, column
  int64_t seq_lens_stride = 1;

  int64_t seq_len(int64_t b) const { return seq_lens[b * seq_lens_stride]; }
  int32_t& page_id(int64_t b, int64_t i) const { return block_tables[b * bt_stride[0] + i * bt_stride[1]]; }
  // The most slots a block-table row addresses, max_pages * page_size, capped at INT32_MAX (the
  // largest seq_lens entry) so that it never overflows; 0 for empty shapes.
  int64_t slot_capacity() const {
    if (max_pages <= 0 || page_size <= 0) return 0;
    return max_pages > 2147483647 / page_size ? 2147483647 : max_pages * page_size;
  }
  int32_t& pos(int64_t page, int64_t row, int64_t h) const {
    return pos_pages[page * pos_stride[0] + row * pos_stride[1] + h * pos_stride[2]];
  }
  template <typename T>
  T* k_row(int64_t page, int64_t row, int64_t h) const {
    return static_cast<T*>(k_pages) + page * k_stride[0] + row * k_stride[1] + h * k_stride[2];
  }
  template <typename T>
  T* v_row(int64_t page, int64_t row, int64_t h) const {
    return static_cast<T*>(v_pages) + page * v_stride[0] + row * v_stride[1] + h * v_stride[2];
  }
};

// Appends the first num_new[b] tokens of each sequence b at slots seq_lens[b] ..
// seq_lens[b] + num_new[b] - 1 (pos_pages gets positions[b, t] for every KV head), then
// seq_lens[b] += num_new[b]. Writes k_pages, v_pages, pos_pages, seq_lens.
struct AppendKVParams {
  PagedKVCache cache;
  int64_t num_tokens = 0;  // T
  const void* k = nullptr;  // [B, Hkv, T, D], dtype of the cache
  const void* v = nullptr;
  const int32_t* positions = nullptr;  // [B, T], >= 0
  const int32_t* num_new = nullptr;    // [B], 0 <= num_new[b] <= T
  int64_t k_stride[3] = {0, 0, 0};  // batch, head, token
  int64_t v_stride[3] = {0, 0, 0};
  int64_t positions_stride[2] = {0, 0};  // batch, token
  int64_t num_new_stride = 1;
  // true: every value is checked before anything is written (std::invalid_argument on bad ones);
  // on CUDA that costs a device->host copy and a stream synchronisation per call.
  // false (CUDA only; the CPU kernel checks regardless): no copy, no synchronisation (a decode
  // step of append + paged_decode_attention can be captured in a CUDA graph). Each sequence is
  // checked on the device instead: seq_lens[b] in [0, capacity], num_new[b] in [0, T], the new
  // length within capacity (max_pages * page_size), positions >= 0, and the page ids it writes
  // in [0, num_pages). A sequence that fails is not written and its seq_lens entry becomes -1,
  // which every later call rejects (checked) or turns into NaN (unchecked decode). Not checked:
  // that no page is written twice, by two sequences or through two entries of one table (the
  // writes would race).
  bool check_values = true;
};

// One query token per sequence against all seq_lens[b] cached slots (every cached key precedes
// the query). Query head hq reads KV head hq / (Hq / Hkv) (GQA). A sequence with no slot gives
// out = 0. Reads the cache only, and not pos_pages (which may be null).
struct PagedDecodeParams {
  PagedKVCache cache;
  int64_t num_q_heads = 0;
  double scale = 1.0;        // softmax scale, usually 1/sqrt(D)
  const void* q = nullptr;   // [B, Hq, D], dtype of the cache
  void* out = nullptr;       // [B, Hq, D], dtype of the cache
  int64_t q_stride[2] = {0, 0};  // batch, head
  int64_t o_stride[2] = {0, 0};
  // Optional [B, Hkv, scores_len] (scores_len >= max seq_lens): overwritten with the softmax
  // probability of each slot summed over the query heads of its GQA group; 0 past seq_lens[b].
  float* scores = nullptr;
  int64_t scores_len = 0;
  int64_t scores_stride[3] = {0, 0, 0};  // batch, head, slot
  // true: every value is checked before anything is written (std::invalid_argument on bad ones);
  // on CUDA that costs a check kernel, a device->host copy of its verdict and a stream
  // synchronisation per call.
  // false (CUDA only; the CPU kernel checks regardless): no copy, no synchronisation, so the
  // call can be captured in a CUDA graph; the values are checked on the device instead, and a
  // sequence whose seq_lens entry is outside [0, max_pages * page_size] (or above scores_len),
  // or whose block table holds a page id outside [0, num_pages) where it is read, gets NaN in
  // `out` (and in its scores row) instead of an exception. Nothing is read out of bounds.
  bool check_values = true;
};

// Drops the slots with keep == 0, in place and in one pass: for each (b, h) the survivors move
// down inside the sequence's own pages (k, v, pos, and slot_scores when given; how: `stable`), every
// evicted slot logs evicted_at[b, h, pos] = steps[b] (pos = its pos_pages entry), seq_lens[b]
// becomes the kept count, and every block-table entry at index >= ceil(new_len / page_size)
// that holds a page is released: set to -1 and listed in freed[b, :] (in table order, -1
// padded). Writes everything in the cache, evicted_at, slot_scores and freed.
//
// Requirements (checked): keep[b, h, s] == 0 for s >= seq_lens[b]; every KV head of a sequence
// keeps the same number of slots; steps[b] in [0, INT32_MAX); each evicted position is in
// [0, log_len) and has evicted_at == INT32_MAX (a key is evicted once).
struct EvictCompactParams {
  PagedKVCache cache;
  const uint8_t* keep = nullptr;  // [B, Hkv, keep_len] (bool: nonzero = keep), keep_len >= max seq_lens
  int64_t keep_len = 0;
  int64_t keep_stride[3] = {0, 0, 0};  // batch, head, slot
  const int32_t* steps = nullptr;  // [B]
  int64_t steps_stride = 1;
  int32_t* evicted_at = nullptr;  // [B, Hkv, log_len]
  int64_t log_len = 0;
  int64_t ev_stride[3] = {0, 0, 0};
  float* slot_scores = nullptr;  // optional [B, Hkv, keep_len]; past the new length set to 0
  int64_t scores_stride[3] = {0, 0, 0};
  int32_t* freed = nullptr;  // [B, max_pages]
  int64_t freed_stride[2] = {0, 0};
  // true: the survivors keep their order (slot i of the result holds the i-th kept slot), so
  // every kept slot after the first evicted one moves: a streaming window's eviction rewrites
  // the whole window. false ("fill"): the survivors at or past the new length n move, in order,
  // into the evicted slots below n, in order; the rest stay where they are. That moves at most
  // min(evicted, kept) slots (the evicted count in a rollout's steady state: a page or so per
  // eviction) and gives the same set of (position, k, v, score) in slots [0, n), but slot order
  // then no longer follows position order (which pos_pages records; decode attention does not
  // depend on the order).
  bool stable = true;
  // true: every value is checked before anything is written (std::invalid_argument on bad ones);
  // on CUDA the checks run on the device and one int (the verdict) is copied to the host: one
  // stream synchronisation (the index arrays follow only when it is bad, to word the error).
  // false (CUDA only; the CPU kernel checks regardless): no copy, no synchronisation (capturable
  // in a CUDA graph). A sequence that fails a requirement above, or whose seq_lens entry is
  // outside [0, min(max_pages * page_size, keep_len)], or whose block table holds an entry
  // outside [-1, num_pages) (or -1 below ceil(seq_lens / page_size)), is not written: its
  // seq_lens becomes -1 (which later calls reject or turn into NaN) and its freed row is all -1.
  // Not checked then: that no page is written twice, by two sequences or through two entries of
  // one table (compaction would read rows it already overwrote), that no two evicted slots of a
  // head hold the same position (only a corrupted pos_pages can; both log the same step). (That
  // the sequences' block-table rows and seq_lens entries do not overlap in memory, which on CUDA
  // matters as the last block to finish a sequence rewrites its row and length while other
  // sequences' blocks may still read theirs, is checked either way: check_written_layouts.)
  bool check_values = true;
};

// CPU kernels. Throw std::invalid_argument (before writing anything) on bad params or values.
void append_kv_cpu(const AppendKVParams& p, const ParallelFor& pf = serial_for);
void paged_decode_attention_cpu(const PagedDecodeParams& p, const ParallelFor& pf = serial_for);
void evict_compact_cpu(const EvictCompactParams& p, const ParallelFor& pf = serial_for);

// CUDA kernels (`stream` is a cudaStream_t, every array of the params is in device memory; in a
// build without CUDA, built_with_cuda() false, each throws std::runtime_error). Same contract,
// checks and messages as the CPU kernels, and the same results: bit-identical for append_kv and
// evict_compact, within float rounding for decode (fp32 accumulation; bfloat16/float16/float32
// only, head_dim <= 256; append and evict take every dtype).
// To check the values before writing anything, each call copies what it validates to the host and
// synchronises `stream` first (append: seq_lens, block_tables, num_new and positions; decode and
// evict: the verdict of check kernels, and the index arrays only when it is bad), so these calls
// block the host and cannot be captured in a CUDA graph (unless check_values = false, see the
// params above). Throw std::invalid_argument on bad params or values (nothing written) and
// std::runtime_error on CUDA errors. evict_compact_cuda also rejects keep_len > INT32_MAX (it
// indexes slots in int32).
void append_kv_cuda(const AppendKVParams& p, void* stream);
void paged_decode_attention_cuda(const PagedDecodeParams& p, void* stream);
void evict_compact_cuda(const EvictCompactParams& p, void* stream);

// Validation shared by the ops above, public so that a server can check a cache it assembled.
//
// check_paged_cache: the shape fields and pointers of `c` (page_size, max_pages and num_pages
// within int32, the pool's element count within int64), and 0 <= seq_lens[b] <=
// max_pages * page_size. check_block_tables (which runs check_paged_cache first, and needs
// used_pages, write_begin and write_end non-null when batch > 0): the block tables against
// per-sequence page ranges (column indices; each end <= max_pages, else the table is too short):
//   [0, used_pages[b])              must hold page ids in [0, num_pages);
//   [used_pages[b], write_end[b])   may also hold -1;
//   [write_begin[b], write_end[b])  pages that the op writes: each must appear in no other
//                                   entry of the ranges above (any sequence).
// `op` prefixes the messages ("shadowkv::append_kv").
void check_paged_cache(const PagedKVCache& c, const char* op);
void check_block_tables(const PagedKVCache& c, const int64_t* used_pages, const int64_t* write_begin,
                        const int64_t* write_end, const char* op);
// check_written_layouts: every array the op writes (append: the cache's pages, positions and
// seq_lens; evict: those, block_tables, evicted_at, slot_scores and freed; decode: out and
// scores) gives each element its own memory: ordered by |stride|, each dimension of size > 1
// steps past everything the smaller ones reach (so a zero stride there, the default, is refused),
// its element count fits int64, and its strides reach no element 2^60 or more elements from the
// first (the kernels' int64 byte offsets). Needs no values. Not checked: that two different
// arrays overlap (the torch ops check that), nor the strides of the arrays an op only reads.
void check_written_layouts(const AppendKVParams& p, const char* op);
void check_written_layouts(const PagedDecodeParams& p, const char* op);
void check_written_layouts(const EvictCompactParams& p, const char* op);
// paged_decode_attention's checks of values: check_paged_cache (again, so that a server may call
// it alone), no seq_lens entry above scores_len (when scores is set), then check_block_tables
// on the pages each sequence uses.
void check_decode_tables(const PagedDecodeParams& p, const char* op);

}  // namespace shadowkv
