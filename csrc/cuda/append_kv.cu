// CUDA append into the paged KV cache (the twin of csrc/cpu/append_kv.cpp, same contract).
//
// One block per (sequence, token slot t < T); blocks with t >= num_new[b] return at once. A block
// copies the token's K and V rows of every KV head into slot seq_lens[b] + t in words of up to
// 16 bytes (the widest that the row size, base pointers and strides allow), and writes its
// position for every head. A second kernel then adds num_new to seq_lens. Pure data movement:
// the result is bit-identical to the CPU op. Unchecked calls (check_values = false) first run
// validate_append_kernel, which marks the sequences whose values are valid in `ok`; the others
// are not written and get seq_lens = -1.
#include "paged_kv_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kAppendThreads = 128;

// ok[b] = 1 when sequence b can be appended (see AppendKVParams::check_values), else 0.
__global__ void validate_append_kernel(const AppendKVParams p, int64_t capacity, int* __restrict__ ok) {
  const PagedKVCache& c = p.cache;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < c.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t len = c.seq_lens[b * c.seq_lens_stride], n = p.num_new[b * p.num_new_stride];
    bool good = len >= 0 && len <= capacity && n >= 0 && n <= p.num_tokens && len + n <= capacity;
    for (int64_t t = 0; good && t < n; ++t) {
      good = p.positions[b * p.positions_stride[0] + t * p.positions_stride[1]] >= 0;
    }
    if (good && n > 0) {
      for (int64_t i = len / c.page_size; good && i < (len + n + c.page_size - 1) / c.page_size; ++i) {
        const int64_t page = c.block_tables[b * c.bt_stride[0] + i * c.bt_stride[1]];
        good = page >= 0 && page < c.num_pages;
      }
    }
    ok[b] = good ? 1 : 0;
  }
}

template <int kWordBytes>
__global__ void __launch_bounds__(kAppendThreads)
    append_kernel(const AppendKVParams p, int64_t elem_bytes, int64_t words_per_row, const int* __restrict__ ok) {
  using W = typename Word<kWordBytes>::type;
  const PagedKVCache& c = p.cache;
  const int64_t b = blockIdx.x / p.num_tokens, t = blockIdx.x % p.num_tokens;
  if (ok != nullptr && ok[b] == 0) return;  // unchecked call, bad values: nothing written
  if (t >= p.num_new[b * p.num_new_stride]) return;
  const int64_t slot = c.seq_lens[b * c.seq_lens_stride] + t;
  const int64_t page = page_of(c, b, slot), row = slot % c.page_size;

  const char* k_src = static_cast<const char*>(p.k) + (b * p.k_stride[0] + t * p.k_stride[2]) * elem_bytes;
  const char* v_src = static_cast<const char*>(p.v) + (b * p.v_stride[0] + t * p.v_stride[2]) * elem_bytes;
  char* k_dst = static_cast<char*>(c.k_pages) + (page * c.k_stride[0] + row * c.k_stride[1]) * elem_bytes;
  char* v_dst = static_cast<char*>(c.v_pages) + (page * c.v_stride[0] + row * c.v_stride[1]) * elem_bytes;
  const int64_t H = c.num_kv_heads;
  for (int64_t i = threadIdx.x; i < H * words_per_row; i += blockDim.x) {
    const int64_t h = i / words_per_row, w = i % words_per_row;
    reinterpret_cast<W*>(k_dst + h * c.k_stride[2] * elem_bytes)[w] =
        reinterpret_cast<const W*>(k_src + h * p.k_stride[1] * elem_bytes)[w];
    reinterpret_cast<W*>(v_dst + h * c.v_stride[2] * elem_bytes)[w] =
        reinterpret_cast<const W*>(v_src + h * p.v_stride[1] * elem_bytes)[w];
  }
  const int32_t pos = p.positions[b * p.positions_stride[0] + t * p.positions_stride[1]];
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) *pos_at(c, page, row, h) = pos;
}

// seq_lens[b] += num_new[b], after append_kernel (which reads the old lengths); -1 for the
// sequences an unchecked call found bad values in.
__global__ void grow_seq_lens_kernel(const AppendKVParams p, const int* __restrict__ ok) {
  const PagedKVCache& c = p.cache;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < c.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int32_t& len = c.seq_lens[b * c.seq_lens_stride];
    len = ok != nullptr && ok[b] == 0 ? -1 : len + p.num_new[b * p.num_new_stride];
  }
}

// The append and length kernels; `ok` is null for checked calls (which launch only when some
// sequence has new tokens).
void launch_append(const AppendKVParams& p, const int* ok, cudaStream_t stream, const char* op) {
  const PagedKVCache& c = p.cache;
  const int64_t B = c.batch, T = p.num_tokens;
  const int64_t es = static_cast<int64_t>(dtype_bytes(c.dtype));
  const int64_t row_bytes = c.head_dim * es;
  auto u = [](const void* ptr) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr)); };
  auto sb = [es](int64_t stride) { return static_cast<uint64_t>(stride * es); };
  const int word = word_bytes({static_cast<uint64_t>(row_bytes), u(c.k_pages), u(c.v_pages), u(p.k), u(p.v),
                               sb(c.k_stride[0]), sb(c.k_stride[1]), sb(c.k_stride[2]), sb(c.v_stride[0]),
                               sb(c.v_stride[1]), sb(c.v_stride[2]), sb(p.k_stride[0]), sb(p.k_stride[1]),
                               sb(p.k_stride[2]), sb(p.v_stride[0]), sb(p.v_stride[1]), sb(p.v_stride[2])});
  if (B * T > 0) {
    const unsigned blocks = grid_1d(B * T, op);
    dispatch_word(word, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      append_kernel<kW><<<blocks, kAppendThreads, 0, stream>>>(p, es, row_bytes / kW, ok);
    });
    check_launch("append_kernel");
  }
  grow_seq_lens_kernel<<<grid_1d(std::min<int64_t>(ceil_div(B, 256), 1024), op), 256, 0, stream>>>(p, ok);
  check_launch("grow_seq_lens_kernel");
}

// check_values = false: validate on the device (validate_append_kernel), no host round trip.
void append_unchecked(const AppendKVParams& p, cudaStream_t stream, const char* op) {
  const PagedKVCache& c = p.cache;
  if (c.batch == 0) return;
  const int64_t capacity = c.slot_capacity();
  DeviceWorkspace ok(static_cast<size_t>(c.batch) * sizeof(int), stream);
  validate_append_kernel<<<grid_1d(std::min<int64_t>(ceil_div(c.batch, 256), 1024), op), 256, 0, stream>>>(
      p, capacity, reinterpret_cast<int*>(ok.bytes()));
  check_launch("validate_append_kernel");
  launch_append(p, reinterpret_cast<const int*>(ok.bytes()), stream, op);
}

}  // namespace
}  // namespace cuda_paged

void append_kv_cuda(const AppendKVParams& p, void* stream_ptr) {
  using namespace cuda_paged;
  constexpr const char* op = "shadowkv::append_kv";
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const PagedKVCache& c = p.cache;

  // The checks of append_kv_cpu, in its order; values are read from host copies.
  check_cache_params(c, op);
  if (p.num_tokens < 0) fail(op, "negative token count");
  if (c.num_pages > 0 && !c.pos_pages) fail(op, "null `pos_pages`");
  if (c.batch > 0 && (!p.num_new || (p.num_tokens > 0 && (!p.k || !p.v || !p.positions))))
    fail(op, "null input pointer");
  check_written_layouts(p, op);

  if (!p.check_values) return append_unchecked(p, stream, op);
  const int64_t B = c.batch, T = p.num_tokens, ps = c.page_size;
  IndexStager stager;
  CacheStage cache_stage;
  cache_stage.add(stager, c);
  const int num_new_id = stager.add(p.num_new, B, 1, 1, p.num_new_stride);
  const int positions_id = stager.add(p.positions, B, T, 1, p.positions_stride[0], p.positions_stride[1]);
  stager.copy_to_host(stream);
  const PagedKVCache hc = cache_stage.host_view(stager, c);
  const int32_t* num_new_h = stager.host<int32_t>(num_new_id);
  const int32_t* positions_h = stager.host<int32_t>(positions_id);

  check_paged_cache(hc, op);
  std::vector<int64_t> used(B), write_begin(B), write_end(B);
  int64_t total_new = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = num_new_h[b], len = hc.seq_len(b);
    if (n < 0 || n > T)
      fail(op, "`num_new`[" + std::to_string(b) + "] = " + std::to_string(n) + " must be in [0, " + std::to_string(T) +
                   "] (T, the token dimension of `k`)");
    for (int64_t t = 0; t < n; ++t) {
      const int32_t pos = positions_h[b * T + t];
      if (pos < 0)
        fail(op, "`positions`[" + std::to_string(b) + ", " + std::to_string(t) + "] = " + std::to_string(pos) +
                     " must be >= 0");
    }
    if (len + n > INT32_MAX)
      fail(op, "`seq_lens`[" + std::to_string(b) + "] + `num_new`[" + std::to_string(b) + "] overflows int32");
    used[b] = (len + n + ps - 1) / ps;
    write_begin[b] = n > 0 ? len / ps : 0;
    write_end[b] = n > 0 ? used[b] : 0;
    total_new += n;
  }
  check_block_tables(hc, used.data(), write_begin.data(), write_end.data(), op);
  if (total_new == 0) return;  // nothing to write (seq_lens unchanged)

  launch_append(p, nullptr, stream, op);
}

}  // namespace shadowkv
