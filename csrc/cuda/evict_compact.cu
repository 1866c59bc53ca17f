// CUDA eviction from the paged KV cache (the twin of csrc/cpu/evict_compact.cpp, same contract;
// bit-identical results).
//
// Every call runs, on the caller's stream:
//   1. validate_kernel, one block per (sequence, KV head), checks everything the CPU op checks
//      for that row and writes a HeadCheck record (kept count, first offending slot of each
//      kind, ...). Nothing of the cache is written. Checked calls (check_values) also detect two
//      evicted slots holding the same position: each evicted slot below the first other error
//      claims its log entry with atomicMin(entry, INT32_MIN + slot) (every such entry held
//      INT32_MAX, "never evicted"), and a slot that then does not find its own tag shares its
//      position with an earlier slot, so the first duplicate is found as the CPU op finds it.
//   2. Checked calls only: two small kernels (evict_compact_check.cuh) turn the records, steps
//      and block tables into one verdict, which the host copies back (one int, one stream
//      synchronisation). A bad verdict, and only that, copies the records, lengths, block tables
//      and steps to the host, which raises the CPU op's error, in its order and with its
//      message, from them. Before a checked call throws (a rejected value, or a CUDA error
//      before step 3 is launched), restore_kernel puts back INT32_MAX in the claimed log
//      entries, so a call that throws changes nothing. Unchecked calls skip this step (no copy,
//      no synchronisation: a CUDA graph can capture them).
//   3. compact_kernel, one block per (sequence, KV head), compacts the sequences the records
//      say are valid (sequence_verdict): it walks the slots in chunks, in order. Per chunk each
//      thread takes one slot; evicted slots log evicted_at[pos] = step; a block-wide prefix count
//      of the kept slots gives each its destination (kept so far + rank); then every kept slot
//      that moves (destination != source) is read in full (K and V words spread over the threads,
//      position, slot score) into registers, __syncthreads, and written. Destinations never
//      exceed sources, so a row is overwritten only after it was read: by an earlier chunk's
//      write it cannot be (those go below this chunk's first slot), within the chunk the barrier
//      orders all reads before all writes. Chunks hold as many slots as the register staging
//      allows (<= 1024 words per tensor); rows longer than that go one slot per chunk and are
//      copied directly (source and destination rows are then distinct). Finally slot_scores
//      past the new length are zeroed. With stable = false, fill_kernel instead (same blocks):
//      only the kept slots past the new length move, into the evicted slots below it (see its
//      comment in evict_compact_kernels.cuh).
//   4. The last of a sequence's compaction blocks to finish (a ticket in its head-0 record;
//      finalize_kernel, one block per sequence, when there is no KV head) lists the released
//      pages in freed (table order, -1 padded), sets their block-table entries to -1 and stores
//      the new length; a sequence that an unchecked call found invalid is left as it was, with
//      seq_lens = -1 and a freed row of -1.
// An unchecked call is two launches (validate, then compact or fill), nothing else on the
// stream: in a rollout's steady state the fixed cost of each launch is a sizeable part of the
// call.
#include <algorithm>
#include <climits>

#include "evict_compact_check.cuh"
#include "evict_compact_kernels.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

std::string idx(std::initializer_list<int64_t> i) {
  std::string s = "[";
  for (int64_t v : i) s += (s.size() > 1 ? ", " : "") + std::to_string(v);
  return s + "]";
}

// The checks of evict_compact_cpu on the values, in its order and with its messages, from the
// host copies of the cache index arrays, steps and the validation records [B, heads].
void check_values_on_host(const EvictCompactParams& p, const PagedKVCache& hc, const int32_t* steps_h,
                          const HeadCheck* records, int64_t heads, const char* op) {
  const int64_t B = hc.batch, H = hc.num_kv_heads, ps = hc.page_size, M = hc.max_pages, S = p.keep_len;
  check_paged_cache(hc, op);
  std::vector<int64_t> used(B), write_begin(B), write_end(B, M);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = hc.seq_len(b), step = steps_h[b];
    if (len > S)
      fail(op, "`keep` has " + std::to_string(S) + " slots (last dim) but `seq_lens`[" + std::to_string(b) +
                   "] = " + std::to_string(len));
    if (step < 0 || step >= kNeverEvicted)
      fail(op, "`steps`[" + std::to_string(b) + "] = " + std::to_string(step) + " must be in [0, 2147483647)");
    int64_t new_len = 0, first_evicted = len;
    for (int64_t h = 0; h < H; ++h) {
      const HeadCheck& r = records[b * heads + h];
      if (r.beyond >= 0)
        fail(op, "`keep`" + idx({b, h, r.beyond}) + " is True but the sequence has only `seq_lens`[" +
                     std::to_string(b) + "] = " + std::to_string(len) + " slots");
      if (h == 0) new_len = r.kept;
      if (r.kept != new_len)
        fail(op, "`keep`: every KV head of a sequence must keep the same number of slots; sequence " +
                     std::to_string(b) + " keeps " + std::to_string(new_len) + " in head 0 and " +
                     std::to_string(r.kept) + " in head " + std::to_string(h));
      first_evicted = std::min<int64_t>(first_evicted, r.first_evicted);
    }
    used[b] = (len + ps - 1) / ps;
    write_begin[b] = new_len < len ? first_evicted / ps : used[b];
  }
  check_block_tables(hc, used.data(), write_begin.data(), write_end.data(), op);

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const HeadCheck& r = records[b * heads + h];
      if (!r.seq_ok) fail(op, "internal error: the device rejected the lengths or block table of sequence " +
                                  std::to_string(b) + " that the host accepted");
      if (h >= H || r.bad_slot < 0) continue;
      const std::string s = std::to_string(r.bad_slot), pos = std::to_string(r.bad_pos);
      switch (r.bad_kind) {
        case kPosOutsideLog:
          fail(op, "`evicted_at` covers positions [0, " + std::to_string(p.log_len) + ") but evicted slot " + s +
                       " of sequence " + std::to_string(b) + ", KV head " + std::to_string(h) + " holds position " +
                       pos + " (`pos_pages`)");
        case kAlreadyEvicted:
          fail(op, "`evicted_at`" + idx({b, h, r.bad_pos}) + " = " + std::to_string(r.bad_logged) +
                       ": the key at that position was already evicted; a key cannot be evicted twice");
        default:
          fail(op, "`evicted_at`" + idx({b, h, r.bad_pos}) + ": two evicted slots of the sequence hold position " +
                       pos + " (`pos_pages`); a key cannot be evicted twice");
      }
    }
  }
}

// The int32 scratch of device_verdict_ok: [bad, pad] [write_begin: B] [refs: P].
int64_t verdict_ints(const PagedKVCache& c) { return 2 + c.batch + c.num_pages; }

// The verdict of evict_compact_check.cuh's kernels on validate_kernel's records: true when the
// host check would pass. One int comes back (one stream synchronisation). `scratch`:
// verdict_ints(p.cache) int32, zeroed on the stream.
bool device_verdict_ok(const EvictCompactParams& p, int64_t heads, const HeadCheck* records, int32_t* scratch,
                       cudaStream_t stream) {
  const PagedKVCache& c = p.cache;
  const int64_t B = c.batch;
  int32_t* bad = scratch;
  int32_t* write_begin = bad + 2;
  int32_t* refs = write_begin + B;
  const auto blocks = [](int64_t items) {
    return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, kVerdictThreads), 1024)));
  };
  evict_verdict_count_kernel<<<blocks(B * std::max<int64_t>(c.max_pages, 1)), kVerdictThreads, 0, stream>>>(
      p, heads, records, refs, write_begin, bad);
  check_launch("evict_verdict_count_kernel");
  if (c.max_pages > 0) {
    evict_verdict_shared_kernel<<<blocks(B * c.max_pages), kVerdictThreads, 0, stream>>>(p, refs, write_begin, bad);
    check_launch("evict_verdict_shared_kernel");
  }
  int32_t verdict = 0;
  check_cuda(cudaMemcpyAsync(&verdict, bad, sizeof(verdict), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (evict verdict)");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (evict verdict)");
  return verdict == 0;
}

}  // namespace
}  // namespace cuda_paged

void evict_compact_cuda(const EvictCompactParams& p, void* stream_ptr) {
  using namespace cuda_paged;
  constexpr const char* op = "shadowkv::evict_compact";
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const PagedKVCache& c = p.cache;

  // The parameter checks of evict_compact_cpu, in its order (no values read yet).
  check_cache_params(c, op);
  if (p.keep_len < 0 || p.log_len < 0) fail(op, "negative `keep` or `evicted_at` length");
  if (p.log_len > INT32_MAX) fail(op, "`evicted_at` length " + std::to_string(p.log_len) + " exceeds the int32 positions");
  if (c.num_pages > 0 && !c.pos_pages) fail(op, "null `pos_pages`");
  if (c.batch > 0 && ((p.keep_len > 0 && !p.keep) || !p.steps || (p.log_len > 0 && !p.evicted_at) ||
                      (c.max_pages > 0 && !p.freed)))
    fail(op, "null input or output pointer");
  check_written_layouts(p, op);
  if (p.keep_len > INT32_MAX)
    fail(op, "`keep` has " + std::to_string(p.keep_len) + " slots (last dim); the CUDA kernel takes at most 2147483647");

  const int64_t B = c.batch, H = c.num_kv_heads, heads = std::max<int64_t>(H, 1);
  if (B == 0) return;
  // Everything that can still fail without a value is decided before anything is launched.
  const CompactShape shape = compact_shape(c);
  const int64_t es = shape.elem_bytes, words_per_row = shape.words_per_row;
  const int word = shape.word, chunk = shape.chunk;
  if (words_per_row > INT32_MAX - kThreads) fail(op, "rows too long for the CUDA kernel");
  const unsigned row_blocks = grid_1d(B * heads, op), seq_blocks = grid_1d(B, op);

  // The records [B, heads], then for a checked call device_verdict_ok's scratch. A checked call
  // zeroes both with one memset: if validate_kernel never runs, the records claim nothing
  // (restore_kernel then does nothing either). An unchecked call has no claims to restore, and
  // validate_kernel writes every record before anything reads it: no memset, two launches.
  const size_t record_bytes = static_cast<size_t>(B * heads) * sizeof(HeadCheck);
  const size_t scratch_bytes = p.check_values ? static_cast<size_t>(verdict_ints(c)) * sizeof(int32_t) : 0;
  const size_t work_bytes = record_bytes + scratch_bytes;
  DeviceWorkspace records(work_bytes, stream);
  HeadCheck* records_dev = reinterpret_cast<HeadCheck*>(records.bytes());
  int32_t* verdict_scratch = p.check_values ? reinterpret_cast<int32_t*>(records.bytes() + record_bytes) : nullptr;
  if (p.check_values) {
    check_cuda(cudaMemsetAsync(records_dev, 0, work_bytes, stream), "cudaMemsetAsync (evict records)");
  }
  // check_cache_params has checked page_size >= 1; slots are < INT32_MAX, so a larger page acts
  // as one of INT32_MAX slots.
  const FastDivmod page_div(static_cast<uint32_t>(std::min<int64_t>(c.page_size, INT32_MAX)));
  validate_kernel<<<row_blocks, kThreads, 0, stream>>>(p, page_div, c.slot_capacity(), heads, p.check_values,
                                                       records_dev);
  // A checked call claimed log entries for its duplicate detection: whatever makes it leave
  // before compact_kernel (which overwrites the claims) is launched, a rejected value or a CUDA
  // error, puts them back first, so that a call that throws changes nothing.
  struct ClaimGuard {
    bool armed;
    const EvictCompactParams& p;
    FastDivmod page_div;
    int64_t heads;
    unsigned blocks;
    const HeadCheck* records;
    cudaStream_t stream;
    ~ClaimGuard() {
      if (!armed) return;
      restore_kernel<<<blocks, kThreads, 0, stream>>>(p, page_div, heads, records);
      (void)cudaGetLastError();  // the exception in flight is the one to report
    }
  } guard{p.check_values, p, page_div, heads, row_blocks, records_dev, stream};  // destroyed before `records`
  check_launch("validate_kernel");

  if (p.check_values && !device_verdict_ok(p, heads, records_dev, verdict_scratch, stream)) {
    // Only now the host copies, to raise the CPU op's message for the first bad value.
    IndexStager stager;
    CacheStage cache_stage;
    cache_stage.add(stager, c);
    const int steps_id = stager.add(p.steps, B, 1, 1, p.steps_stride);
    const int records_id = stager.add(reinterpret_cast<const int32_t*>(records_dev), B * heads, kCheckFields, 1,
                                      kCheckFields, 1);
    stager.copy_to_host(stream);
    check_values_on_host(p, cache_stage.host_view(stager, c), stager.host<int32_t>(steps_id),
                         reinterpret_cast<const HeadCheck*>(stager.host<int32_t>(records_id)), heads, op);
    fail(op, "the device check found a bad value that the host check did not; were the cache's index "
             "tensors, `keep` or `steps` written while the op ran?");
  }

  if (H > 0) {
    const FastDivmod words(static_cast<uint32_t>(std::max<int64_t>(words_per_row, 1)));
    dispatch_word(word, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      if (p.stable) {
        compact_kernel<kW><<<grid_1d(B * H, op), kThreads, 0, stream>>>(p, page_div, records_dev, es, words, chunk);
      } else {
        fill_kernel<kW><<<grid_1d(B * H, op), kThreads, 0, stream>>>(p, page_div, records_dev, es, words);
      }
    });
    check_launch(p.stable ? "compact_kernel" : "fill_kernel");
    guard.armed = false;  // compact_kernel / fill_kernel replace every claim by its step (and finalize)
  } else {
    guard.armed = false;  // no KV head, nothing claimed
    finalize_kernel<<<seq_blocks, kThreads, 0, stream>>>(p, records_dev, heads);
    check_launch("finalize_kernel");
  }
}

}  // namespace shadowkv
