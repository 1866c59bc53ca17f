// The value checks of a checked paged_decode_attention call, on the device (decode_check_kernel),
// private to paged_decode_attention.cu (its anonymous namespace); in a header so that the host
// emulation of the C++ tests can run it.
//
// Why on the device: the host check of paged_decode_attention_cpu needs the block tables on the
// host, and copying them (128 KB at B = 64, 8k context, page 16), with two gather kernels, a
// pageable copy and a loop over every used entry, while the GPU waits, cost 0.10-0.16 ms per call
// on an H200 (bench/RESULTS.md; the mma kernel itself takes 0.88 ms). This kernel computes the
// verdict and the longest sequence the grid is sized for; the host copies back two ints. Only a
// failed verdict runs the host check, which then raises the same message as before.
#pragma once

#include "paged_decode_common.cuh"

namespace shadowkv {
namespace cuda_paged {
namespace {

constexpr int kCheckThreads = 256;

// result[0]: the longest seq_lens entry among the sequences that pass (0 if none), result[1]:
// nonzero if any check of paged_decode_attention_cpu on values fails: seq_lens[b] outside [0,
// capacity] or above scores_len (scores_len >= 0 only when scores_out is written), or a
// block-table entry below ceil(seq_lens[b] / page_size) outside [0, num_pages). Both zeroed
// before the launch. One thread per (sequence, block-table column), grid-stride.
__global__ void __launch_bounds__(kCheckThreads)
    decode_check_kernel(const PagedKVCache c, int64_t capacity, int64_t scores_len, int* result) {
  const int64_t cols = c.max_pages > 0 ? c.max_pages : 1;  // column 0 checks the length
  const int64_t items = c.batch * cols;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = item / cols, i = item % cols;
    const int64_t len = c.seq_lens[b * c.seq_lens_stride];
    if (len < 0 || len > capacity || (scores_len >= 0 && len > scores_len)) {
      if (i == 0) atomicOr(result + 1, 1);
      continue;
    }
    if (i == 0) atomicMax(result, static_cast<int>(len));  // len <= capacity <= INT32_MAX
    if (i < (len + c.page_size - 1) / c.page_size) {  // a column the sequence uses
      const int64_t id = c.block_tables[b * c.bt_stride[0] + i * c.bt_stride[1]];
      if (id < 0 || id >= c.num_pages) atomicOr(result + 1, 1);
    }
  }
}

}  // namespace
}  // namespace cuda_paged
}  // namespace shadowkv
