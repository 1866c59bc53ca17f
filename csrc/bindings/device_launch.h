// Runs a core kernel on the device of its tensors: at::parallel_for on CPU, the current
// stream (under a device guard) on CUDA.
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>

#include "shadowkv/paged_kv.h"
#include "shadowkv/shadow_attention.h"

namespace shadowkv::bindings {

// Core kernels report bad params and values with std::invalid_argument; runs f and surfaces
// that as a Python ValueError.
template <typename F>
void rethrow_as_value_error(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

// at::parallel_for as the core's ParallelFor.
void torch_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body);

void launch_shadow_attention_fwd(const ShadowAttentionParams& p, const at::Device& device);
void launch_shadow_attention_bwd(const ShadowAttentionBwdParams& p, const at::Device& device);

#ifdef SHADOWKV_WITH_CUDA
// Defined in cuda_launch.cpp, built only with CUDA.
void launch_shadow_attention_fwd_cuda(const ShadowAttentionParams& p, const at::Device& device);
void launch_shadow_attention_bwd_cuda(const ShadowAttentionBwdParams& p, const at::Device& device);
void launch_append_kv_cuda(const AppendKVParams& p, const at::Device& device);
void launch_paged_decode_attention_cuda(const PagedDecodeParams& p, const at::Device& device);
void launch_evict_compact_cuda(const EvictCompactParams& p, const at::Device& device);
#endif

}  // namespace shadowkv::bindings
