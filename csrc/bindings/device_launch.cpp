#include "device_launch.h"

#include <ATen/Parallel.h>

#include <stdexcept>

namespace shadowkv::bindings {

void torch_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(begin, end); });
}

namespace {

[[noreturn]] void no_cuda(const at::Device& device) {
  TORCH_CHECK(false, "shadowkv: tensors are on ", device,
              " but this build of shadowkv has no CUDA kernels (python -m shadowkv info shows the build)");
}

}  // namespace

void launch_shadow_attention_fwd(const ShadowAttentionParams& p, const at::Device& device) {
  if (device.is_cpu()) return rethrow_as_value_error([&] { shadow_attention_fwd_cpu(p, torch_parallel_for); });
#ifdef SHADOWKV_WITH_CUDA
  if (device.is_cuda()) return rethrow_as_value_error([&] { launch_shadow_attention_fwd_cuda(p, device); });
#endif
  no_cuda(device);
}

void launch_shadow_attention_bwd(const ShadowAttentionBwdParams& p, const at::Device& device) {
  if (device.is_cpu()) return rethrow_as_value_error([&] { shadow_attention_bwd_cpu(p, torch_parallel_for); });
#ifdef SHADOWKV_WITH_CUDA
  if (device.is_cuda()) return rethrow_as_value_error([&] { launch_shadow_attention_bwd_cuda(p, device); });
#endif
  no_cuda(device);
}

}  // namespace shadowkv::bindings
