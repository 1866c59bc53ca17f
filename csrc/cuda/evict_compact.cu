// CUDA eviction from the paged KV cache (the twin of csrc/cpu/evict_compact.cpp, same contract;
// bit-identical results).
//
// Host: the index arrays are copied to the host and checked exactly like the CPU op (see
// paged_kv_common.cuh); then, for the evicted slots only, their positions and eviction-log
// entries are gathered on the device (evicted_info_kernel) and checked too. The host also
// computes the new lengths, the first released block-table column and the freed list, and
// uploads them. Nothing is written before all checks pass.
//
// Device, on the caller's stream:
//   1. compact_kernel, one block per (sequence, KV head), walks the slots in chunks, in order.
//      Per chunk: each thread takes one slot; evicted slots log evicted_at[pos] = step; a
//      block-wide prefix count of the kept slots gives each its destination (kept so far + rank);
//      then every kept slot that moves (destination != source) is read in full (K and V words
//      spread over the threads, position, slot score) into registers, __syncthreads, and written.
//      Destinations never exceed sources, so a row is overwritten only after it was read: by an
//      earlier chunk's write it cannot be (those go below this chunk's first slot), within the
//      chunk the barrier orders all reads before all writes. Chunks hold as many slots as the
//      register staging allows (<= 1024 words per tensor); rows longer than that go one slot per
//      chunk and are copied directly (source and destination rows are then distinct). Finally
//      slot_scores past the new length are zeroed.
//   2. finalize_kernel writes freed, sets the released block-table entries to -1 and stores the
//      new seq_lens (after compact_kernel, which reads the old ones).
#include <algorithm>
#include <climits>

#include "paged_kv_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int32_t kNeverEvicted = INT32_MAX;
constexpr int kCompactThreads = 256;
constexpr int kWordsPerThread = 4;  // staged words per thread and tensor
constexpr int kStagedWords = kCompactThreads * kWordsPerThread;

// out[i] = (position held by evicted slot i, evicted_at at that position or 0 if outside the log),
// slot i given as (b * Hkv + h) * keep_len + s.
__global__ void evicted_info_kernel(const EvictCompactParams p, const int64_t* __restrict__ slots, int64_t count,
                                    int2* __restrict__ out) {
  const PagedKVCache& c = p.cache;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = slots[i];
    const int64_t s = id % p.keep_len, bh = id / p.keep_len;
    const int64_t h = bh % c.num_kv_heads, b = bh / c.num_kv_heads;
    const int32_t pos = *pos_at(c, page_of(c, b, s), s % c.page_size, h);
    int32_t logged = 0;
    if (pos >= 0 && pos < p.log_len)
      logged = p.evicted_at[b * p.ev_stride[0] + h * p.ev_stride[1] + pos * p.ev_stride[2]];
    out[i] = make_int2(pos, logged);
  }
}

// The K row, V row and position of logical slot `slot` of sequence b, KV head h.
template <typename W>
struct RowAccess {
  const PagedKVCache& c;
  int64_t b, h, elem_bytes;
  __device__ __forceinline__ W* k(int64_t slot) const { return row(c.k_pages, c.k_stride, slot); }
  __device__ __forceinline__ W* v(int64_t slot) const { return row(c.v_pages, c.v_stride, slot); }
  __device__ __forceinline__ int32_t* pos(int64_t slot) const {
    return pos_at(c, page_of(c, b, slot), slot % c.page_size, h);
  }
  __device__ __forceinline__ W* row(void* base, const int64_t (&stride)[3], int64_t slot) const {
    const int64_t page = page_of(c, b, slot), r = slot % c.page_size;
    const int64_t offset = (page * stride[0] + r * stride[1] + h * stride[2]) * elem_bytes;
    return reinterpret_cast<W*>(static_cast<char*>(base) + offset);
  }
};

template <int kWordBytes>
__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(const EvictCompactParams p, int64_t elem_bytes, int words_per_row, int chunk) {
  using W = typename Word<kWordBytes>::type;
  const PagedKVCache& c = p.cache;
  const int64_t b = blockIdx.x / c.num_kv_heads, h = blockIdx.x % c.num_kv_heads;
  const RowAccess<W> rows{c, b, h, elem_bytes};
  const int64_t len = c.seq_lens[b * c.seq_lens_stride];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float* scores = p.slot_scores ? p.slot_scores + b * p.scores_stride[0] + h * p.scores_stride[1] : nullptr;
  const bool direct = words_per_row > kStagedWords;  // then chunk == 1

  __shared__ int s_src[kCompactThreads];  // chunk offset of the chunk's i-th kept slot
  __shared__ int s_warp_kept[kCompactThreads / 32];

  int64_t kept = 0;  // slots kept before the chunk: the destination of its first kept slot
  for (int64_t c0 = 0; c0 < len; c0 += chunk) {
    const int64_t r = c0 + tid;
    const bool live = tid < chunk && r < len;
    const bool keep = live && p.keep[b * p.keep_stride[0] + h * p.keep_stride[1] + r * p.keep_stride[2]] != 0;
    if (live && !keep) {  // log the eviction (row r is not overwritten before this chunk's writes)
      const int32_t pos = *rows.pos(r);
      p.evicted_at[b * p.ev_stride[0] + h * p.ev_stride[1] + pos * p.ev_stride[2]] = p.steps[b * p.steps_stride];
    }
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (lane == 0) s_warp_kept[warp] = __popc(ballot);
    __syncthreads();  // also: every thread is done with the previous chunk's s_src
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kCompactThreads / 32; ++w) {
      before += w < warp ? s_warp_kept[w] : 0;
      total += s_warp_kept[w];
    }
    if (keep) s_src[before + __popc(ballot & ((1u << lane) - 1u))] = tid;
    __syncthreads();

    // Read every moving kept slot of the chunk: slot c0 + s_src[i] goes to slot kept + i.
    W kbuf[kWordsPerThread], vbuf[kWordsPerThread];
    if (!direct) {
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        const int item = tid + u * kCompactThreads, i = item / words_per_row, w = item % words_per_row;
        const int64_t src = c0 + (i < total ? s_src[i] : 0);
        if (i < total && src != kept + i) {
          kbuf[u] = rows.k(src)[w];
          vbuf[u] = rows.v(src)[w];
        }
      }
    }
    int32_t pos_moved = 0;
    float score_moved = 0.0f;
    const int64_t my_src = c0 + (tid < total ? s_src[tid] : 0);
    const bool my_move = tid < total && my_src != kept + tid;
    if (my_move) {
      pos_moved = *rows.pos(my_src);
      if (scores) score_moved = scores[my_src * p.scores_stride[2]];
    }
    __syncthreads();  // every source of the chunk has been read

    if (!direct) {
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        const int item = tid + u * kCompactThreads, i = item / words_per_row, w = item % words_per_row;
        const int64_t src = c0 + (i < total ? s_src[i] : 0);
        if (i < total && src != kept + i) {
          rows.k(kept + i)[w] = kbuf[u];
          rows.v(kept + i)[w] = vbuf[u];
        }
      }
    } else if (total == 1 && c0 + s_src[0] != kept) {  // one slot per chunk: distinct rows
      const int64_t src = c0 + s_src[0];
      const W* ks = rows.k(src);
      const W* vs = rows.v(src);
      W* kd = rows.k(kept);
      W* vd = rows.v(kept);
      for (int w = tid; w < words_per_row; w += kCompactThreads) {
        kd[w] = ks[w];
        vd[w] = vs[w];
      }
    }
    if (my_move) {
      *rows.pos(kept + tid) = pos_moved;
      if (scores) scores[(kept + tid) * p.scores_stride[2]] = score_moved;
    }
    kept += total;
  }
  if (scores) {
    for (int64_t s = kept + tid; s < p.keep_len; s += kCompactThreads) scores[s * p.scores_stride[2]] = 0.0f;
  }
}

// Host-computed results: new_len [B], first released column [B], freed [B, max_pages] (packed).
__global__ void finalize_kernel(const EvictCompactParams p, const int32_t* __restrict__ host_results) {
  const PagedKVCache& c = p.cache;
  const int64_t B = c.batch, M = c.max_pages;
  const int32_t* new_len = host_results;
  const int32_t* first_free = host_results + B;
  const int32_t* freed = host_results + 2 * B;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B * M; i += stride) {
    const int64_t b = i / M, col = i % M;
    p.freed[b * p.freed_stride[0] + col * p.freed_stride[1]] = freed[i];
    if (col >= first_free[b]) c.block_tables[b * c.bt_stride[0] + col * c.bt_stride[1]] = -1;
  }
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    c.seq_lens[b * c.seq_lens_stride] = new_len[b];
  }
}

std::string idx(std::initializer_list<int64_t> i) {
  std::string s = "[";
  for (int64_t v : i) s += (s.size() > 1 ? ", " : "") + std::to_string(v);
  return s + "]";
}

}  // namespace
}  // namespace cuda_paged

void evict_compact_cuda(const EvictCompactParams& p, void* stream_ptr) {
  using namespace cuda_paged;
  constexpr const char* op = "shadowkv::evict_compact";
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const PagedKVCache& c = p.cache;

  // The checks of evict_compact_cpu, in its order; values are read from host copies.
  check_cache_params(c, op);
  if (p.keep_len < 0 || p.log_len < 0) fail(op, "negative `keep` or `evicted_at` length");
  if (c.num_pages > 0 && !c.pos_pages) fail(op, "null `pos_pages`");
  if (c.batch > 0 && ((p.keep_len > 0 && !p.keep) || !p.steps || (p.log_len > 0 && !p.evicted_at) ||
                      (c.max_pages > 0 && !p.freed)))
    fail(op, "null input or output pointer");

  const int64_t B = c.batch, H = c.num_kv_heads, ps = c.page_size, M = c.max_pages, S = p.keep_len;
  IndexStager stager;
  CacheStage cache_stage;
  cache_stage.add(stager, c);
  const int keep_id = stager.add(p.keep, B, H, S, p.keep_stride[0], p.keep_stride[1], p.keep_stride[2]);
  const int steps_id = stager.add(p.steps, B, 1, 1, p.steps_stride);
  stager.copy_to_host(stream);
  const PagedKVCache hc = cache_stage.host_view(stager, c);
  const uint8_t* keep_h = stager.host<uint8_t>(keep_id);
  const int32_t* steps_h = stager.host<int32_t>(steps_id);
  const auto keep_at = [&](int64_t b, int64_t h, int64_t s) { return keep_h[(b * H + h) * S + s]; };

  check_paged_cache(hc, op);
  std::vector<int64_t> new_len(B), used(B), write_begin(B), write_end(B, M);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = hc.seq_len(b), step = steps_h[b];
    if (len > S)
      fail(op, "`keep` has " + std::to_string(S) + " slots (last dim) but `seq_lens`[" + std::to_string(b) +
                   "] = " + std::to_string(len));
    if (step < 0 || step >= kNeverEvicted)
      fail(op, "`steps`[" + std::to_string(b) + "] = " + std::to_string(step) + " must be in [0, 2147483647)");
    int64_t first_evicted = len;
    for (int64_t h = 0; h < H; ++h) {
      int64_t kept = 0;
      for (int64_t s = 0; s < S; ++s) {
        const bool k = keep_at(b, h, s) != 0;
        if (k && s >= len)
          fail(op, "`keep`" + idx({b, h, s}) + " is True but the sequence has only `seq_lens`[" + std::to_string(b) +
                       "] = " + std::to_string(len) + " slots");
        if (k) ++kept;
        else if (s < first_evicted) first_evicted = s;
      }
      if (h == 0) new_len[b] = kept;
      if (kept != new_len[b])
        fail(op, "`keep`: every KV head of a sequence must keep the same number of slots; sequence " +
                     std::to_string(b) + " keeps " + std::to_string(new_len[b]) + " in head 0 and " +
                     std::to_string(kept) + " in head " + std::to_string(h));
    }
    used[b] = (len + ps - 1) / ps;
    write_begin[b] = new_len[b] < len ? first_evicted / ps : used[b];
  }
  check_block_tables(hc, used.data(), write_begin.data(), write_end.data(), op);

  // The evicted slots, in the CPU op's order, and their positions and log entries.
  std::vector<int64_t> evicted;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < hc.seq_len(b); ++s)
        if (!keep_at(b, h, s)) evicted.push_back((b * H + h) * S + s);
  const int64_t E = static_cast<int64_t>(evicted.size());
  std::vector<int2> info(static_cast<size_t>(E));
  if (E > 0) {
    Carver carve;
    const size_t ids_off = carve.take<int64_t>(E);
    const size_t info_off = carve.take<int2>(E);
    DeviceBuffer dev(carve.bytes, stream);
    int64_t* ids_dev = reinterpret_cast<int64_t*>(dev.bytes() + ids_off);
    int2* info_dev = reinterpret_cast<int2*>(dev.bytes() + info_off);
    upload(evicted, ids_dev, stream);
    evicted_info_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(E, 256), 1024)), 256, 0, stream>>>(
        p, ids_dev, E, info_dev);
    check_launch("evicted_info_kernel");
    check_cuda(cudaMemcpyAsync(info.data(), info_dev, E * sizeof(int2), cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync (evicted positions to the host)");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (evicted positions to the host)");
  }
  // Every evicted key must have a position inside the log that was never evicted before, and
  // (per head) appear once: otherwise the log would be written twice for it.
  std::vector<uint8_t> seen(static_cast<size_t>(p.log_len), 0);
  std::vector<int64_t> marked;
  for (int64_t e = 0; e < E;) {
    const int64_t bh = evicted[e] / S;
    for (; e < E && evicted[e] / S == bh; ++e) {  // the evicted slots of one (sequence, head)
      const int64_t b = bh / H, h = bh % H, s = evicted[e] % S;
      const int64_t pos = info[e].x;
      if (pos < 0 || pos >= p.log_len)
        fail(op, "`evicted_at` covers positions [0, " + std::to_string(p.log_len) + ") but evicted slot " +
                     std::to_string(s) + " of sequence " + std::to_string(b) + ", KV head " + std::to_string(h) +
                     " holds position " + std::to_string(pos) + " (`pos_pages`)");
      const int32_t logged = info[e].y;
      if (logged != kNeverEvicted)
        fail(op, "`evicted_at`" + idx({b, h, pos}) + " = " + std::to_string(logged) +
                     ": the key at that position was already evicted; a key cannot be evicted twice");
      if (seen[pos])
        fail(op, "`evicted_at`" + idx({b, h, pos}) + ": two evicted slots of the sequence hold position " +
                     std::to_string(pos) + " (`pos_pages`); a key cannot be evicted twice");
      seen[pos] = 1;
      marked.push_back(pos);
    }
    for (int64_t pos : marked) seen[pos] = 0;
    marked.clear();
  }

  // Results of the bookkeeping, as the CPU op computes them: new lengths, the first released
  // block-table column, and the released pages in table order (-1 padded).
  std::vector<int32_t> results(static_cast<size_t>(2 * B + B * M), -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first_free = (new_len[b] + ps - 1) / ps;
    results[b] = static_cast<int32_t>(new_len[b]);
    results[B + b] = static_cast<int32_t>(first_free);
    int64_t n = 0;
    for (int64_t i = first_free; i < M; ++i) {
      const int32_t id = hc.page_id(b, i);
      if (id >= 0) results[2 * B + b * M + n++] = id;
    }
  }
  if (B == 0) return;

  DeviceBuffer results_dev(results.size() * sizeof(int32_t), stream);
  upload(results, reinterpret_cast<int32_t*>(results_dev.bytes()), stream);
  if (H > 0 && (E > 0 || p.slot_scores)) {
    const int64_t es = static_cast<int64_t>(dtype_bytes(c.dtype));
    const int64_t row_bytes = c.head_dim * es;
    auto u = [](const void* ptr) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr)); };
    auto sb = [es](int64_t stride) { return static_cast<uint64_t>(stride * es); };
    const int word = word_bytes({static_cast<uint64_t>(row_bytes), u(c.k_pages), u(c.v_pages), sb(c.k_stride[0]),
                                 sb(c.k_stride[1]), sb(c.k_stride[2]), sb(c.v_stride[0]), sb(c.v_stride[1]),
                                 sb(c.v_stride[2])});
    const int64_t words_per_row = row_bytes / word;
    if (words_per_row > INT32_MAX) fail(op, "rows too long for the CUDA kernel");
    const int chunk = static_cast<int>(std::clamp<int64_t>(kStagedWords / words_per_row, 1, kCompactThreads));
    const unsigned blocks = grid_1d(B * H, op);
    dispatch_word(word, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      compact_kernel<kW><<<blocks, kCompactThreads, 0, stream>>>(p, es, static_cast<int>(words_per_row), chunk);
    });
    check_launch("compact_kernel");
  }
  finalize_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(B * M + B, 256), 1024)), 256, 0, stream>>>(
      p, reinterpret_cast<const int32_t*>(results_dev.bytes()));
  check_launch("finalize_kernel");
}

}  // namespace shadowkv
