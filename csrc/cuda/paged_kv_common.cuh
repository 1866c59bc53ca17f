// Private helpers shared by the CUDA twins of the paged KV cache ops (append_kv.cu,
// paged_decode_attention.cu, evict_compact.cu). Not installed, not a public API.
//
// Validation. The CPU ops check every value they depend on (sequence lengths, page ids, keep
// masks, eviction-log entries) before writing anything. The CUDA twins keep that contract the
// simple way: IndexStager copies the (small) index arrays an op checks from the device to the
// host, gathered into one packed buffer (any strides), with one cudaMemcpyAsync and one stream
// synchronisation; the host then runs the same checks, with the same messages, on a "host view"
// of the params (the same struct, pointing at the packed host copies), and only then launches.
// The public checks check_paged_cache / check_block_tables (csrc/cpu/append_kv.cpp) are called
// as they are; the op-specific checks are copies of the CPU ones (keep them in sync).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_math.cuh"
#include "device_workspace.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "shadowkv/paged_kv.h"

namespace shadowkv {
namespace cuda_paged {

using cuda_common::from_f32;
using cuda_common::kFullMask;
using cuda_common::to_f32;
using cuda_common::warp_max;
using cuda_common::warp_sum;


// ------------------------------------------------------------------------------------------
// Host helpers.

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("shadowkv paged-KV CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size of a one-dimensional launch; the problems here are far below the limit.
inline unsigned grid_1d(int64_t blocks, const char* op) {
  if (blocks > INT32_MAX) fail(op, "problem too large for one CUDA launch");
  return static_cast<unsigned>(blocks);
}

using cuda_common::DeviceWorkspace;

// Offsets of the buffers carved out of one allocation; each starts on a 16-byte boundary.
struct Carver {
  size_t bytes = 0;
  template <typename U>
  size_t take(int64_t count) {
    const size_t off = bytes;
    bytes += (static_cast<size_t>(count) * sizeof(U) + 15) / 16 * 16;
    return off;
  }
};

// ------------------------------------------------------------------------------------------
// Device -> host copies of strided index arrays. Internal linkage: every translation unit that
// includes this header launches its own copy of the kernel.

namespace {

// dst[i] = src[i0 * s0 + i1 * s1 + i2 * s2] for the row-major index i of (i0, i1, i2) < (n0, n1, n2).
template <typename E>
__global__ void gather_strided_kernel(const E* __restrict__ src, int64_t n1, int64_t n2, int64_t s0, int64_t s1,
                                      int64_t s2, int64_t total, E* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i2 = i % n2, i1 = (i / n2) % n1, i0 = i / (n1 * n2);
    dst[i] = src[i0 * s0 + i1 * s1 + i2 * s2];
  }
}

// Collects up to a few strided int32/uint8 device arrays, then copies them all to the host with
// one gather kernel per array, one device->host copy and one stream synchronisation.
class IndexStager {
 public:
  // Registers the [n0, n1, n2] array at `src` (element strides s0, s1, s2); returns its handle.
  template <typename E>
  int add(const E* src, int64_t n0, int64_t n1 = 1, int64_t n2 = 1, int64_t s0 = 1, int64_t s1 = 0, int64_t s2 = 0) {
    Item it{src, sizeof(E), {n0, n1, n2}, {s0, s1, s2}, bytes_};
    bytes_ += (static_cast<size_t>(it.count()) * sizeof(E) + 15) / 16 * 16;
    items_.push_back(it);
    return static_cast<int>(items_.size()) - 1;
  }

  void copy_to_host(cudaStream_t stream) {
    host_.assign(bytes_, 0);
    if (bytes_ == 0) return;
    DeviceWorkspace dev(bytes_, stream);
    for (const Item& it : items_) {
      const int64_t n = it.count();
      if (n == 0) continue;
      constexpr int kThreads = 256;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 1024));
#if defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches (tests/cpp/cuda_emulation.h)
      (void)blocks;
      throw std::logic_error("IndexStager cannot launch under SHADOWKV_CUDA_EMULATION");
#else
      if (it.elsize == 4) {
        gather_strided_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(
            static_cast<const int32_t*>(it.src), it.n[1], it.n[2], it.s[0], it.s[1], it.s[2], n,
            reinterpret_cast<int32_t*>(dev.bytes() + it.offset));
      } else {
        gather_strided_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(
            static_cast<const uint8_t*>(it.src), it.n[1], it.n[2], it.s[0], it.s[1], it.s[2], n,
            dev.bytes() + it.offset);
      }
#endif
      check_launch("gather_strided_kernel");
    }
    check_cuda(cudaMemcpyAsync(host_.data(), dev.bytes(), bytes_, cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync (index arrays to the host)");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (index arrays to the host)");
  }

  // The packed host copy of an array (row-major over its sizes); null when it is empty.
  template <typename E>
  E* host(int handle) {
    const Item& it = items_.at(static_cast<size_t>(handle));
    if (it.count() == 0) return nullptr;
    return reinterpret_cast<E*>(host_.data() + it.offset);
  }

 private:
  struct Item {
    const void* src;
    size_t elsize;
    int64_t n[3];
    int64_t s[3];
    size_t offset;
    int64_t count() const { return n[0] * n[1] * n[2]; }
  };
  std::vector<Item> items_;
  std::vector<unsigned char> host_;
  size_t bytes_ = 0;
};

// The cache checks that need no values, before anything is read from the device: the shape and
// pointer checks of check_paged_cache (run with no sequences), and its null checks of the index
// arrays (same messages).
inline void check_cache_params(const PagedKVCache& c, const char* op) {
  PagedKVCache shapes = c;
  shapes.batch = 0;
  check_paged_cache(shapes, op);
  if (c.batch < 0) fail(op, "negative shape in the cache params");
  if (c.batch > 0 && !c.seq_lens) fail(op, "null `seq_lens`");
  if (c.batch > 0 && c.max_pages > 0 && !c.block_tables) fail(op, "null `block_tables`");
}

// Stages seq_lens and block_tables; host_view() then returns `c` pointing at the host copies.
struct CacheStage {
  int lens = -1, tables = -1;
  void add(IndexStager& st, const PagedKVCache& c) {
    lens = st.add(c.seq_lens, c.batch, 1, 1, c.seq_lens_stride);
    tables = st.add(c.block_tables, c.batch, c.max_pages, 1, c.bt_stride[0], c.bt_stride[1]);
  }
  PagedKVCache host_view(IndexStager& st, const PagedKVCache& c) const {
    PagedKVCache h = c;
    h.seq_lens = st.host<int32_t>(lens);
    h.seq_lens_stride = 1;
    h.block_tables = st.host<int32_t>(tables);
    h.bt_stride[0] = c.max_pages;
    h.bt_stride[1] = 1;
    return h;
  }
};

}  // namespace

// Largest of 16/8/4/2 bytes that divides every value: rows are then copied in words of that size.
inline int word_bytes(std::initializer_list<uint64_t> values) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = true;
    for (uint64_t v : values) ok = ok && v % static_cast<uint64_t>(w) == 0;
    if (ok) return w;
  }
  return 1;
}

inline size_t dtype_bytes(DType dt) {
  switch (dt) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
  }
  throw std::invalid_argument("shadowkv: unsupported dtype code " + std::to_string(static_cast<int>(dt)));
}

// Words of 2/4/8/16 bytes for copies that do not look at the values.
template <int kBytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

// Calls f(std::integral_constant<int, W>{}) for a word size W in {2, 4, 8, 16}.
template <typename F>
void dispatch_word(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(std::integral_constant<int, 16>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
  }
  throw std::invalid_argument("shadowkv: rows must be aligned to 2 bytes");
}

// ------------------------------------------------------------------------------------------
// Device helpers.

// The page holding logical slot `slot` of sequence b (block tables validated on the host).
__device__ __forceinline__ int64_t page_of(const PagedKVCache& c, int64_t b, int64_t slot) {
  return c.block_tables[b * c.bt_stride[0] + (slot / c.page_size) * c.bt_stride[1]];
}

__device__ __forceinline__ int32_t* pos_at(const PagedKVCache& c, int64_t page, int64_t row, int64_t h) {
  return c.pos_pages + page * c.pos_stride[0] + row * c.pos_stride[1] + h * c.pos_stride[2];
}


}  // namespace cuda_paged
}  // namespace shadowkv
