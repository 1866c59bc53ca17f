// The kernels of evict_compact.cu (validate, restore, compact, finalize; the file comment there
// describes the protocol), private to that translation unit (its anonymous namespace). In a
// header of their own so that the host emulation of the C++ tests (tests/cpp/cuda_emulation.h)
// can run them from this source; the launches stay in the .cu.
#pragma once

#include <algorithm>
#include <climits>

#include "fast_divmod.cuh"
#include "paged_kv_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

using cuda_common::FastDivmod;

constexpr int32_t kNeverEvicted = INT32_MAX;
constexpr int32_t kNoSlot = INT32_MAX;  // "no such slot" in the block-wide minima
constexpr int kThreads = 256;
constexpr int kWordsPerThread = 4;  // staged words per thread and tensor
constexpr int kStagedWords = kThreads * kWordsPerThread;

enum BadKind : int32_t { kPosOutsideLog = 1, kAlreadyEvicted = 2, kDuplicate = 3 };

// What validate_kernel found in one (sequence, KV head) row. Slots are int32: the host rejects
// keep_len > INT32_MAX first.
struct HeadCheck {
  int32_t seq_ok;         // seq_lens[b] in [0, min(capacity, keep_len)] and the block-table row valid
  int32_t kept;           // slots below seq_lens[b] with keep set
  int32_t beyond;         // first slot >= seq_lens[b] with keep set, or -1
  int32_t first_evicted;  // first slot below seq_lens[b] without keep, else seq_lens[b]
  int32_t bad_slot;       // first evicted slot whose log entry cannot be written, or -1
  int32_t bad_kind;       // its BadKind
  int32_t bad_pos;        // its position (pos_pages)
  int32_t bad_logged;     // its log entry, for kAlreadyEvicted
  int32_t claim_end;      // the evicted slots in [first_evicted, claim_end) claimed their log entry
  int32_t arrivals;       // compaction blocks of the sequence done so far (counted in its head-0 record)
};
constexpr int kCheckFields = static_cast<int>(sizeof(HeadCheck) / sizeof(int32_t));

__device__ __forceinline__ int32_t claim_tag(int64_t slot) { return static_cast<int32_t>(INT32_MIN + slot); }

// Pointers and strides of one (sequence, KV head) row, copied by value: a reference into the
// kernel parameters would make the compiler copy them to local memory.
struct HeadRows {
  const int32_t* table;  // block-table row
  int64_t table_stride;
  // The page size as a FastDivmod (page_divmod): slot -> (page, row) is computed for every word a
  // compaction moves, and a runtime `/` plus `%` were most of the instructions per word.
  cuda_common::FastDivmod page_div;
  char* k;
  char* v;
  int32_t* pos;
  int64_t k_page, k_row, v_page, v_row;  // bytes
  int64_t pos_page, pos_row;             // elements
  const uint8_t* keep;
  int64_t keep_stride;
  int32_t* log;
  int64_t log_stride;

  __device__ __forceinline__ HeadRows(const EvictCompactParams& p, cuda_common::FastDivmod page_divmod, int64_t b,
                                      int64_t h, int64_t elem_bytes)
      : page_div(page_divmod) {
    const PagedKVCache& c = p.cache;
    table = c.block_tables + b * c.bt_stride[0];
    table_stride = c.bt_stride[1];
    k = static_cast<char*>(c.k_pages) + h * c.k_stride[2] * elem_bytes;
    v = static_cast<char*>(c.v_pages) + h * c.v_stride[2] * elem_bytes;
    pos = c.pos_pages + h * c.pos_stride[2];
    k_page = c.k_stride[0] * elem_bytes;
    k_row = c.k_stride[1] * elem_bytes;
    v_page = c.v_stride[0] * elem_bytes;
    v_row = c.v_stride[1] * elem_bytes;
    pos_page = c.pos_stride[0];
    pos_row = c.pos_stride[1];
    keep = p.keep + b * p.keep_stride[0] + h * p.keep_stride[1];
    keep_stride = p.keep_stride[2];
    log = p.evicted_at + b * p.ev_stride[0] + h * p.ev_stride[1];
    log_stride = p.ev_stride[2];
  }
  __device__ __forceinline__ bool kept(int64_t slot) const { return keep[slot * keep_stride] != 0; }
  // Slots are below seq_lens[b] <= INT32_MAX.
  // A slot's page id (a block-table entry: int32) and row in it (< page size <= INT32_MAX).
  struct Place {
    int32_t page, row;
  };
  __device__ __forceinline__ Place place(int64_t slot) const {
    const uint32_t s = static_cast<uint32_t>(slot), q = page_div.div(s);
    return {table[static_cast<int64_t>(q) * table_stride], static_cast<int32_t>(page_div.mod(s, q))};
  }
  __device__ __forceinline__ int32_t* position(int64_t slot) const {
    const Place at = place(slot);
    return pos + at.page * pos_page + at.row * pos_row;
  }
  __device__ __forceinline__ int32_t* log_entry(int64_t position) const { return log + position * log_stride; }
  template <typename W>
  __device__ __forceinline__ W* k_at(Place at) const {
    return reinterpret_cast<W*>(k + at.page * k_page + at.row * k_row);
  }
  template <typename W>
  __device__ __forceinline__ W* v_at(Place at) const {
    return reinterpret_cast<W*>(v + at.page * v_page + at.row * v_row);
  }
};

// What one thread of validate_kernel has found so far in its slots: the kept ones below the
// length, and the first slot of each kind (kNoSlot if none).
struct ScanAcc {
  int kept = 0, beyond = kNoSlot, first_evicted = kNoSlot, bad = kNoSlot;
};

// validate_kernel's scan of G consecutive slots s0 .. s0 + G - 1 (those < S) with keep flags k:
// counts and first slots into `acc`, and with `read_pos` (the block table is valid) the first
// evicted slot whose position is outside the log or whose log entry is taken. The G position
// loads, then the G log loads, are independent: one round trip each per group.
template <int G>
__device__ __forceinline__ void scan_group(const HeadRows& rows, int64_t s0, const bool (&k)[G], int64_t S, int64_t len,
                                           bool read_pos, int64_t log_len, ScanAcc& acc) {
  bool evicted[G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int64_t s = s0 + j;
    evicted[j] = s < len && !k[j];
    if (s >= S) continue;
    if (k[j] && s < len) ++acc.kept;
    else if (k[j]) acc.beyond = min(acc.beyond, static_cast<int>(s));
    else if (s < len) acc.first_evicted = min(acc.first_evicted, static_cast<int>(s));
  }
  if (!read_pos) return;
  int32_t pos[G], logged[G];
#pragma unroll
  for (int j = 0; j < G; ++j) pos[j] = evicted[j] ? *rows.position(s0 + j) : 0;
#pragma unroll
  for (int j = 0; j < G; ++j) {
    logged[j] = evicted[j] && pos[j] >= 0 && pos[j] < log_len ? *rows.log_entry(pos[j]) : kNeverEvicted;
  }
#pragma unroll
  for (int j = G - 1; j >= 0; --j) {  // the group's first bad slot wins; earlier groups' stay
    if (evicted[j] && (pos[j] < 0 || pos[j] >= log_len || logged[j] != kNeverEvicted)) {
      acc.bad = min(acc.bad, static_cast<int>(s0 + j));
    }
  }
}

// validate_kernel reads the keep flags 16 at a time (one 16-byte load) where the row is
// contiguous and 16-byte aligned (a [B, Hkv, S] bool tensor with S % 16 == 0), else 4 at a time
// (independent byte loads). Either way one pass: at 8k slots two round trips per thread for
// the flags instead of 8 (four-slot steps) and 8 more for a second pass over the evicted
// slots, which made validate_kernel most of a steady-state eviction's time.
constexpr int kScanVector = 16;
constexpr int kScanSlots = 4;

// Block (sequence b, head h < max(Hkv, 1)): the HeadCheck of that row, see the file comment.
// Reads pos_pages and the log only where the length and the block-table row are valid.
__global__ void __launch_bounds__(kThreads)
    validate_kernel(const EvictCompactParams p, FastDivmod page_div, int64_t capacity, int64_t heads, bool claim,
                    HeadCheck* __restrict__ out) {
  const int64_t b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int64_t S = p.keep_len, M = p.cache.max_pages, P = p.cache.num_pages, ps = p.cache.page_size;
  const int tid = threadIdx.x;
  const int64_t len = p.cache.seq_lens[b * p.cache.seq_lens_stride];
  const bool len_ok = len >= 0 && len <= capacity && len <= S;
  const bool has_head = h < p.cache.num_kv_heads;
  const HeadRows rows(p, page_div, b, has_head ? h : 0, 1);

  __shared__ int s_table_bad, s_kept, s_beyond, s_first_evicted, s_bad, s_dup;
  if (tid == 0) {
    s_table_bad = 0;
    s_kept = 0;
    s_beyond = kNoSlot;
    s_first_evicted = len_ok ? static_cast<int>(len) : 0;
    s_bad = kNoSlot;
    s_dup = kNoSlot;
  }
  __syncthreads();
  if (len_ok) {
    const int64_t used = (len + ps - 1) / ps;
    for (int64_t col = tid; col < M; col += kThreads) {
      const int64_t id = rows.table[col * rows.table_stride];
      if (id >= P || id < (col < used ? 0 : -1)) s_table_bad = 1;
    }
  }
  __syncthreads();  // s_table_bad: the positions can be read where it is 0
  if (len_ok && has_head) {
    // Positions are read before the block knows whether a keep flag past the length (an error
    // that comes first) voids them: only reads, and only through a valid table.
    const bool read_pos = s_table_bad == 0;
    ScanAcc acc;
    const bool vector = rows.keep_stride == 1 && reinterpret_cast<uintptr_t>(rows.keep) % 16 == 0;
    if (vector) {
      for (int64_t s0 = static_cast<int64_t>(tid) * kScanVector; s0 < S; s0 += kThreads * kScanVector) {
        bool k[kScanVector];
        if (s0 + kScanVector <= S) {
          const uint4 w = *reinterpret_cast<const uint4*>(rows.keep + s0);
          const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int j = 0; j < kScanVector; ++j) k[j] = ((words[j / 4] >> (8 * (j % 4))) & 0xffu) != 0;
        } else {
#pragma unroll
          for (int j = 0; j < kScanVector; ++j) k[j] = s0 + j < S && rows.keep[s0 + j] != 0;
        }
        scan_group(rows, s0, k, S, len, read_pos, p.log_len, acc);
      }
    } else {
      for (int64_t s0 = static_cast<int64_t>(tid) * kScanSlots; s0 < S; s0 += kThreads * kScanSlots) {
        bool k[kScanSlots];
#pragma unroll
        for (int j = 0; j < kScanSlots; ++j) k[j] = s0 + j < S && rows.kept(s0 + j);
        scan_group(rows, s0, k, S, len, read_pos, p.log_len, acc);
      }
    }
    if (acc.kept > 0) atomicAdd(&s_kept, acc.kept);
    if (acc.beyond != kNoSlot) atomicMin(&s_beyond, acc.beyond);
    if (acc.first_evicted != kNoSlot) atomicMin(&s_first_evicted, acc.first_evicted);
    if (acc.bad != kNoSlot) atomicMin(&s_bad, acc.bad);
  }
  __syncthreads();  // the block's counts and first slots are final; every log entry was read
  // Block-uniform: the positions were read (valid pages) and are needed (no earlier error).
  const bool scan = len_ok && has_head && s_table_bad == 0 && s_beyond == kNoSlot;
  const int64_t first = s_first_evicted;
  if (scan && claim) {
    const int64_t end = min(static_cast<int64_t>(s_bad), len);
    for (int64_t s = first + tid; s < end; s += kThreads) {
      if (!rows.kept(s)) atomicMin(rows.log_entry(*rows.position(s)), claim_tag(s));
    }
    __syncthreads();  // every claim is made
    int dup = kNoSlot;
    for (int64_t s = first + tid; s < end && dup == kNoSlot; s += kThreads) {
      if (!rows.kept(s) && __ldcg(rows.log_entry(*rows.position(s))) != claim_tag(s)) dup = static_cast<int>(s);
    }
    if (dup != kNoSlot) atomicMin(&s_dup, dup);
  }
  __syncthreads();
  if (tid != 0) return;
  HeadCheck r;
  r.seq_ok = len_ok && s_table_bad == 0;
  r.kept = s_kept;
  r.beyond = s_beyond == kNoSlot ? -1 : s_beyond;
  r.first_evicted = s_first_evicted;
  r.bad_slot = -1;
  r.bad_kind = 0;
  r.bad_pos = 0;
  r.bad_logged = 0;
  r.claim_end = scan && claim ? static_cast<int32_t>(min(static_cast<int64_t>(s_bad), len)) : 0;
  r.arrivals = 0;  // the ticket of last_of_sequence (the next kernel on the stream counts it)
  const int bad = min(s_bad, s_dup);
  if (scan && bad < len) {
    const int32_t pos = *rows.position(bad);
    r.bad_slot = bad;
    r.bad_pos = pos;
    if (s_dup < s_bad) {
      r.bad_kind = kDuplicate;
    } else if (pos < 0 || pos >= p.log_len) {
      r.bad_kind = kPosOutsideLog;
    } else {  // not claimed (an entry is claimed only if it held INT32_MAX): the caller's value
      r.bad_kind = kAlreadyEvicted;
      r.bad_logged = __ldcg(rows.log_entry(pos));
    }
  }
  out[blockIdx.x] = r;
}

// A rejected checked call: INT32_MAX back into every log entry that validate_kernel claimed
// (only the claim that won an entry finds its own tag there).
__global__ void __launch_bounds__(kThreads)
    restore_kernel(const EvictCompactParams p, FastDivmod page_div, int64_t heads,
                   const HeadCheck* __restrict__ checks) {
  const int64_t b = blockIdx.x / heads, h = blockIdx.x % heads;
  const HeadCheck r = checks[blockIdx.x];
  if (r.claim_end <= r.first_evicted) return;
  const HeadRows rows(p, page_div, b, h, 1);
  for (int64_t s = r.first_evicted + threadIdx.x; s < r.claim_end; s += kThreads) {
    if (rows.kept(s)) continue;
    int32_t* entry = rows.log_entry(*rows.position(s));
    if (*entry == claim_tag(s)) *entry = kNeverEvicted;
  }
}

// The new length of sequence b, or -1 when a record (or steps[b]) makes it invalid.
__device__ int32_t sequence_verdict(const EvictCompactParams& p, const HeadCheck* checks, int64_t heads, int64_t b) {
  const int32_t step = p.steps[b * p.steps_stride];
  bool ok = step >= 0 && step < kNeverEvicted;
  const HeadCheck* r = checks + b * heads;
  for (int64_t h = 0; h < heads; ++h) ok = ok && r[h].seq_ok != 0;
  for (int64_t h = 0; h < p.cache.num_kv_heads; ++h)
    ok = ok && r[h].beyond < 0 && r[h].bad_slot < 0 && r[h].kept == r[0].kept;
  if (!ok) return -1;
  return p.cache.num_kv_heads > 0 ? r[0].kept : 0;
}

// sequence_verdict of block-uniform sequence b, computed by thread 0 and broadcast to the block
// (one barrier). Called once per kernel: its shared variable is not rewritten after the barrier.
__device__ __forceinline__ int32_t block_verdict(const EvictCompactParams& p, const HeadCheck* checks, int64_t heads,
                                                 int64_t b) {
  __shared__ int32_t s_verdict;
  if (threadIdx.x == 0) s_verdict = sequence_verdict(p, checks, heads, b);
  __syncthreads();
  return s_verdict;
}

// The slot_scores row of (sequence b, KV head h), or none (null base) when the call has no scores.
struct ScoreRow {
  float* base;
  int64_t stride;
  __device__ __forceinline__ ScoreRow(const EvictCompactParams& p, int64_t b, int64_t h)
      : base(p.slot_scores ? p.slot_scores + b * p.scores_stride[0] + h * p.scores_stride[1] : nullptr),
        stride(p.scores_stride[2]) {}
  __device__ __forceinline__ explicit operator bool() const { return base != nullptr; }
  __device__ __forceinline__ float& operator[](int64_t slot) const { return base[slot * stride]; }
  // Both compactions end with this: the slots past the new length hold no token, score 0.
  __device__ __forceinline__ void zero_from(int64_t first, int64_t end) const {
    if (!base) return;
    for (int64_t s = first + threadIdx.x; s < end; s += kThreads) base[s * stride] = 0.0f;
  }
};

// Block-wide exclusive prefix sum of `count` (0 .. 2^kBits - 1) over the block's threads, in
// thread order, plus the total: one ballot per bit of the count, then the warps' totals through
// `warp_counts` (shared scratch of kThreads / 32 ints). Synchronises twice (callers may reuse
// the scratch right after it returns).
template <int kBits>
__device__ __forceinline__ int block_prefix(int count, int* warp_counts, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned below = (1u << lane) - 1u;
  int in_warp = 0, warp_total = 0;
#pragma unroll
  for (int bit = 0; bit < kBits; ++bit) {
    const unsigned ballot = __ballot_sync(kFullMask, (count >> bit) & 1);
    in_warp += __popc(ballot & below) << bit;
    warp_total += __popc(ballot) << bit;
  }
  if (lane == 0) warp_counts[warp] = warp_total;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    total += warp_counts[w];
  }
  __syncthreads();
  return before + in_warp;
}

// Block-wide exclusive prefix count of `flag`, plus the total (block_prefix of one bit).
__device__ __forceinline__ int block_rank(bool flag, int* warp_counts, int& total) {
  return block_prefix<1>(flag, warp_counts, total);
}

// Block-uniform sequence b with new length new_len (-1: invalid): the released pages of a valid
// sequence (block-table entries at index >= ceil(new_len / page_size) that hold a page) go to
// freed[b] in table order and become -1 in the table; the rest of freed[b] is -1; seq_lens[b] =
// new_len. Runs after every block that reads the sequence's old length and table (the
// compactions: last_of_sequence). warp_counts: block_rank's scratch.
__device__ __forceinline__ void finalize_sequence(const EvictCompactParams& p, int64_t b, int32_t new_len,
                                                  int* warp_counts) {
  const PagedKVCache& c = p.cache;
  const int64_t M = c.max_pages;
  const int tid = threadIdx.x;
  int32_t* table = c.block_tables + b * c.bt_stride[0];
  int32_t* freed = p.freed + b * p.freed_stride[0];
  const int64_t table_stride = c.bt_stride[1], freed_stride = p.freed_stride[1];
  int64_t released = 0;
  if (new_len >= 0) {
    const int64_t first_free = (new_len + c.page_size - 1) / c.page_size;
    for (int64_t c0 = 0; c0 < M; c0 += kThreads) {  // block-uniform trip count (block_rank syncs)
      const int64_t col = c0 + tid;
      const int32_t id = col < M ? table[col * table_stride] : -1;
      const bool release = col >= first_free && id >= 0;
      int total;
      const int rank = block_rank(release, warp_counts, total);
      if (release) {
        freed[(released + rank) * freed_stride] = id;
        table[col * table_stride] = -1;
      }
      released += total;
    }
  }
  for (int64_t i = released + tid; i < M; i += kThreads) freed[i * freed_stride] = -1;
  if (tid == 0) c.seq_lens[b * c.seq_lens_stride] = new_len;
}

// Whether this block is the last of sequence b's `heads` compaction blocks to get here (block-
// uniform), counted in the ticket that validate_kernel zeroed (checks[b * heads].arrivals). The
// sequence's length and block table may be rewritten only when every block that reads them is
// done: each block's reads come before its barrier and its thread 0's fence and ticket; the
// last block's fence after its ticket orders its writes after them all (the pattern of CUDA's
// threadFenceReduction sample). One launch instead of a compaction then a finalize kernel: in a
// rollout's steady state every launch is a few microseconds of a call that has a budget of 5% of
// a decode step.
__device__ __forceinline__ bool last_of_sequence(HeadCheck* checks, int64_t heads, int64_t b) {
  __shared__ int s_last;
  __syncthreads();  // every thread of the block is done with the sequence
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(&checks[b * heads].arrivals, 1) == heads - 1;
    __threadfence();
  }
  __syncthreads();
  return s_last != 0;
}

// compact_kernel's work on the row (sequence b, KV head h) of a valid sequence.
// s_src: kThreads ints, the chunk offset of the chunk's i-th kept slot; warp_counts: block_rank's.
template <int kWordBytes>
__device__ __forceinline__ void compact_row(const EvictCompactParams& p, FastDivmod page_div, int64_t b, int64_t h,
                                            int64_t first_evicted, int64_t elem_bytes, FastDivmod words, int chunk,
                                            int* s_src, int* s_warp_counts) {
  const int words_per_row = static_cast<int>(words.divisor);
  using W = typename Word<kWordBytes>::type;
  const int tid = threadIdx.x;
  const HeadRows rows(p, page_div, b, h, elem_bytes);
  const int64_t len = p.cache.seq_lens[b * p.cache.seq_lens_stride];
  const int32_t step = p.steps[b * p.steps_stride];
  const ScoreRow scores(p, b, h);
  const bool direct = words_per_row > kStagedWords;  // then chunk == 1

  // The slots before the row's first evicted one (validate_kernel's) stay where they are.
  int64_t kept = first_evicted;  // slots kept before the chunk: the destination of its first kept slot
  for (int64_t c0 = first_evicted; c0 < len; c0 += chunk) {
    const int64_t r = c0 + tid;
    const bool live = tid < chunk && r < len;
    const bool keep = live && rows.kept(r);
    if (live && !keep) *rows.log_entry(*rows.position(r)) = step;  // row r is not overwritten before
                                                                      // this chunk's writes
    int total;
    const int rank = block_rank(keep, s_warp_counts, total);
    if (keep) s_src[rank] = tid;
    __syncthreads();

    // Read every moving kept slot of the chunk: slot c0 + s_src[i] goes to slot kept + i.
    W kbuf[kWordsPerThread], vbuf[kWordsPerThread];
    if (!direct) {
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        const uint32_t item = tid + u * kThreads;
        const int i = static_cast<int>(words.div(item)), w = static_cast<int>(words.mod(item, i));
        if (i < total && c0 + s_src[i] != kept + i) {
          const auto at = rows.place(c0 + s_src[i]);
          kbuf[u] = rows.k_at<W>(at)[w];
          vbuf[u] = rows.v_at<W>(at)[w];
        }
      }
    }
    int32_t pos_moved = 0;
    float score_moved = 0.0f;
    const int64_t my_src = c0 + (tid < total ? s_src[tid] : 0);
    const bool my_move = tid < total && my_src != kept + tid;
    if (my_move) {
      pos_moved = *rows.position(my_src);
      if (scores) score_moved = scores[my_src];
    }
    __syncthreads();  // every source of the chunk has been read

    if (!direct) {
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        const uint32_t item = tid + u * kThreads;
        const int i = static_cast<int>(words.div(item)), w = static_cast<int>(words.mod(item, i));
        if (i < total && c0 + s_src[i] != kept + i) {
          const auto at = rows.place(kept + i);
          rows.k_at<W>(at)[w] = kbuf[u];
          rows.v_at<W>(at)[w] = vbuf[u];
        }
      }
    } else if (total == 1 && c0 + s_src[0] != kept) {  // one slot per chunk: distinct rows
      const auto from = rows.place(c0 + s_src[0]), to = rows.place(kept);
      const W* ks = rows.k_at<W>(from);
      const W* vs = rows.v_at<W>(from);
      W* kd = rows.k_at<W>(to);
      W* vd = rows.v_at<W>(to);
      for (int64_t w = tid; w < words_per_row; w += kThreads) {
        kd[w] = ks[w];
        vd[w] = vs[w];
      }
    }
    if (my_move) {
      *rows.position(kept + tid) = pos_moved;
      if (scores) scores[kept + tid] = score_moved;
    }
    kept += total;  // (the next chunk writes s_src only after block_rank's barriers)
  }
  scores.zero_from(kept, p.keep_len);
}

// Block (sequence b, KV head h): compact_row where the sequence is valid (else nothing is
// written), then the sequence's last block to finish runs finalize_sequence.
// words: words_per_row as a FastDivmod (a word index -> (row, word) per moved word). At least 2
// blocks per SM, as before FastDivmod (96 registers): without the bound ptxas went down to 80
// registers for 16-byte words and spilled (4-20 bytes).
template <int kWordBytes>
__global__ void __launch_bounds__(kThreads, 2) compact_kernel(const EvictCompactParams p, FastDivmod page_div,
                                                           HeadCheck* checks, int64_t elem_bytes, FastDivmod words,
                                                           int chunk) {
  __shared__ int s_src[kThreads];
  __shared__ int s_warp_counts[kThreads / 32];
  const int64_t H = p.cache.num_kv_heads, b = blockIdx.x / H, h = blockIdx.x % H;
  const int32_t new_len = block_verdict(p, checks, H, b);
  if (new_len >= 0) {
    compact_row<kWordBytes>(p, page_div, b, h, checks[blockIdx.x].first_evicted, elem_bytes, words, chunk, s_src,
                            s_warp_counts);
  }
  if (last_of_sequence(checks, H, b)) finalize_sequence(p, b, new_len, s_warp_counts);
}

// fill_kernel's scan: each thread looks at kFillSlots consecutive slots, a step covers kFillChunk.
constexpr int kFillSlots = 4;
static_assert(kFillSlots < 8, "a thread's count fits block_prefix<3>");
constexpr int kFillChunk = kThreads * kFillSlots;
constexpr int kFillPairs = 1024;  // (hole, source) pairs moved per round
constexpr int kFillUnroll = 4;    // words each thread loads before it stores them
static_assert(kFillPairs % kThreads == 0, "fill_kernel's position copy covers a round in whole steps");

// Shared state of fill_kernel.
struct FillShared {
  int holes[kFillPairs];    // the round's evicted slots below the new length, in order
  int sources[kFillPairs];  // the round's kept slots at or past it, in order
  int warp_counts[kThreads / 32];
  int next;                 // the slot after the last one collect_slots took
};

// Collects, in slot order, up to `need` slots of [cursor, end) whose keep flag is `want_kept`
// into `list` and moves `cursor` past the last one taken (to `end` when fewer were found).
// Every evicted slot the cursor passes logs evicted_at[pos] = step: the holes (want_kept false)
// before a round overwrites them, the evicted slots among the sources (the others are logged
// by the caller). Block-uniform; returns the count taken. The first write to `list` or
// `sh.next` comes after block_prefix's barriers, so a caller's reads of them before the call
// are safe.
__device__ __forceinline__ int collect_slots(const HeadRows& rows, int32_t step, int64_t& cursor, int64_t end,
                                             bool want_kept, int need, int* list, FillShared& sh) {
  int n = 0;
  while (n < need && cursor < end) {
    const int64_t first = cursor + static_cast<int64_t>(threadIdx.x) * kFillSlots;
    unsigned flags = 0, evicted = 0;
#pragma unroll
    for (int j = 0; j < kFillSlots; ++j) {
      if (first + j < end) {
        const bool k = rows.kept(first + j);
        flags |= static_cast<unsigned>(k == want_kept) << j;
        evicted |= static_cast<unsigned>(!k) << j;
      }
    }
    int total;
    int idx = n + block_prefix<3>(__popc(flags), sh.warp_counts, total);
#pragma unroll
    for (int j = 0; j < kFillSlots; ++j) {
      if ((flags >> j) & 1u) {
        if (idx < need) {
          list[idx] = static_cast<int>(first + j);
          if (idx == need - 1) sh.next = static_cast<int>(first + j + 1);
        }
        ++idx;
      }
    }
    __syncthreads();  // sh.next and the list are written
    const int64_t next = n + total >= need ? static_cast<int64_t>(sh.next) : min(cursor + kFillChunk, end);
#pragma unroll
    for (int j = 0; j < kFillSlots; ++j) {
      if (((evicted >> j) & 1u) && first + j < next) *rows.log_entry(*rows.position(first + j)) = step;
    }
    n = min(n + total, need);
    cursor = next;
  }
  return n;
}

// The `stable = false` compaction ("fill"), one block per (sequence b, KV head h) of a valid
// sequence with new length n: in rounds of up to kFillPairs, the next kept slots at or past n
// (sources) and as many next evicted slots below n (holes) are collected, the holes logged,
// and each source's K and V rows, position and score copied into its hole. A hole is below n
// and a source at or past it, so no row is both read and written: the copies need no staging,
// only the barriers that end the hole scan's logging and the round. The source scans log the
// evicted slots past n (the last one runs to the end), and slot_scores past n are zeroed at
// the end. Sources first: there are as many holes as sources (every head keeps n), so the hole
// scan stops at the last hole instead of looking for kFillPairs of them up to n; in a rollout's
// steady state (a page + 1 evicted after the sinks) that is one step of kFillChunk flags
// instead of all n. Cost: the keep flags from the first hole to the last and from n to the end
// (kFillChunk per step, three barriers each), and the moved rows.
template <int kWordBytes>
__device__ __forceinline__ void fill_row(const EvictCompactParams& p, FastDivmod page_div, int64_t b, int64_t h,
                                         int32_t new_len, int64_t first_evicted, int64_t elem_bytes, FastDivmod words,
                                         FillShared& sh) {
  const int words_per_row = static_cast<int>(words.divisor);
  using W = typename Word<kWordBytes>::type;
  const int tid = threadIdx.x;
  const HeadRows rows(p, page_div, b, h, elem_bytes);
  const int64_t len = p.cache.seq_lens[b * p.cache.seq_lens_stride];
  const int32_t step = p.steps[b * p.steps_stride];
  const ScoreRow scores(p, b, h);
  // Rows of more than kStagedWords words go one pair at a time (the word index of the other
  // path, < kFillPairs x kStagedWords = 2^20, stays far below FastDivmod's 2^31).
  const bool per_pair = words_per_row > kStagedWords;

  // No hole (and nothing to log) before the row's first evicted slot (validate_kernel's).
  int64_t hole_cursor = first_evicted, source_cursor = new_len;
  for (;;) {
    const int sources = collect_slots(rows, step, source_cursor, len, true, kFillPairs, sh.sources, sh);
    if (sources == 0) break;  // no kept slot past new_len: no hole below it either
    // As many holes below new_len as kept slots past it (sequence_verdict: every head keeps
    // new_len, none past len), so this finds as many (m < sources only were the keep flags
    // rewritten while the op ran: then only the pairs found move); its last step logs the holes
    // it passed.
    const int m = collect_slots(rows, step, hole_cursor, new_len, false, sources, sh.holes, sh);
    __syncthreads();  // the holes' positions were read (logged) before the copies overwrite them
    if (per_pair) {
      for (int i = 0; i < m; ++i) {
        const auto from = rows.place(sh.sources[i]), to = rows.place(sh.holes[i]);
        const W* ks = rows.k_at<W>(from);
        const W* vs = rows.v_at<W>(from);
        W* kd = rows.k_at<W>(to);
        W* vd = rows.v_at<W>(to);
        for (int w = tid; w < words_per_row; w += kThreads) {
          kd[w] = ks[w];
          vd[w] = vs[w];
        }
      }
    } else {
      const uint32_t items = static_cast<uint32_t>(m) * static_cast<uint32_t>(words_per_row);  // <= 2^20
      for (uint32_t base = 0; base < items; base += kThreads * kFillUnroll) {
        W kbuf[kFillUnroll], vbuf[kFillUnroll];
        W* kdst[kFillUnroll];
        W* vdst[kFillUnroll];
#pragma unroll
        for (int u = 0; u < kFillUnroll; ++u) {
          const uint32_t item = base + u * kThreads + tid;
          kdst[u] = nullptr;
          vdst[u] = nullptr;
          if (item < items) {
            const uint32_t i = words.div(item), w = words.mod(item, i);
            const auto from = rows.place(sh.sources[i]), to = rows.place(sh.holes[i]);
            kbuf[u] = rows.k_at<W>(from)[w];
            vbuf[u] = rows.v_at<W>(from)[w];
            kdst[u] = rows.k_at<W>(to) + w;
            vdst[u] = rows.v_at<W>(to) + w;
          }
        }
#pragma unroll
        for (int u = 0; u < kFillUnroll; ++u) {
          if (kdst[u]) {
            *kdst[u] = kbuf[u];
            *vdst[u] = vbuf[u];
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kFillPairs / kThreads; ++u) {  // a fixed trip count: no loop counter to keep
      const int i = tid + u * kThreads;
      if (i < m) {
        *rows.position(sh.holes[i]) = *rows.position(sh.sources[i]);
        if (scores) scores[sh.holes[i]] = scores[sh.sources[i]];
      }
    }
    __syncthreads();  // the round has read its lists
    if (sources < kFillPairs) break;
  }
  // Every evicted slot is logged: the source scan ended at len (a round that found fewer than
  // kFillPairs sources ran to it), the hole scans at the last hole. Then the scores past the
  // new length.
  scores.zero_from(new_len, p.keep_len);
}

// Block (sequence b, KV head h): fill_row where the sequence is valid (else nothing is written),
// then the sequence's last block to finish runs finalize_sequence.
template <int kWordBytes>
__global__ void __launch_bounds__(kThreads) fill_kernel(const EvictCompactParams p, FastDivmod page_div,
                                                        HeadCheck* checks, int64_t elem_bytes, FastDivmod words) {
  __shared__ FillShared sh;
  const int64_t H = p.cache.num_kv_heads, b = blockIdx.x / H, h = blockIdx.x % H;
  const int32_t new_len = block_verdict(p, checks, H, b);
  if (new_len >= 0) {
    fill_row<kWordBytes>(p, page_div, b, h, new_len, checks[blockIdx.x].first_evicted, elem_bytes, words, sh);
  }
  if (last_of_sequence(checks, H, b)) finalize_sequence(p, b, new_len, sh.warp_counts);
}

// Block b, for calls without KV heads (the compactions finalize otherwise): finalize_sequence.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const EvictCompactParams p, const HeadCheck* checks, int64_t heads) {
  __shared__ int s_warp_counts[kThreads / 32];
  const int64_t b = blockIdx.x;
  finalize_sequence(p, b, block_verdict(p, checks, heads, b), s_warp_counts);
}

// How compact_kernel copies rows (host side, shared with the emulated tests): in words of the
// widest size that divides the row bytes and every address and stride (2-16 bytes), and in
// chunks of as many slots as the register staging holds (kStagedWords per tensor, at least 1).
struct CompactShape {
  int64_t elem_bytes;
  int word;
  int64_t words_per_row;
  int chunk;
};
inline CompactShape compact_shape(const PagedKVCache& c) {
  CompactShape r;
  r.elem_bytes = static_cast<int64_t>(dtype_bytes(c.dtype));
  const int64_t es = r.elem_bytes, row_bytes = c.head_dim * es;
  auto u = [](const void* ptr) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr)); };
  auto sb = [es](int64_t stride) { return static_cast<uint64_t>(stride * es); };
  r.word = word_bytes({static_cast<uint64_t>(row_bytes), u(c.k_pages), u(c.v_pages), sb(c.k_stride[0]),
                       sb(c.k_stride[1]), sb(c.k_stride[2]), sb(c.v_stride[0]), sb(c.v_stride[1]), sb(c.v_stride[2])});
  r.words_per_row = row_bytes / r.word;
  r.chunk = static_cast<int>(std::clamp<int64_t>(kStagedWords / std::max<int64_t>(r.words_per_row, 1), 1, kThreads));
  return r;
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
