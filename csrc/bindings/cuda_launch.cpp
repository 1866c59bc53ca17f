// CUDA side of device_launch.h: device guard, current stream, arch coverage check.
// Only c10/cuda and the CUDA runtime: ATen/cuda/CUDAContext.h would drag in cuBLAS and
// cuSPARSE headers that a minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <sstream>
#include <string>

#include "device_launch.h"
#include "shadowkv/workspace.h"

namespace shadowkv::bindings {
namespace {

// A clear error instead of "no kernel image is available" when the GPU's arch was not built.
void check_arch_built(const at::Device& device) {
  int major = 0, minor = 0;  // attribute queries are cheap, unlike cudaGetDeviceProperties
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index());
  TORCH_CHECK(err == cudaSuccess, "shadowkv: cannot query ", device, ": ", cudaGetErrorString(err));
  const int cc = major * 10 + minor;
  std::stringstream archs(cuda_archs());
  std::string a;
  while (std::getline(archs, a, ';')) {
    // "90a" runs only on sm_90; "100f" (family-specific) and "80" (SASS) run on the same major
    // with an equal or newer minor (as shadowkv.info.gpu_covered says).
    const bool arch_specific = !a.empty() && a.back() == 'a';
    const bool suffixed = !a.empty() && (a.back() == 'a' || a.back() == 'f');
    const int built = std::stoi(suffixed ? a.substr(0, a.size() - 1) : a);
    if (arch_specific ? built == cc : (built / 10 == cc / 10 && built <= cc)) return;
  }
  TORCH_CHECK(false, "shadowkv: GPU ", device, " is sm_", cc, " but this build has kernels for [", cuda_archs(),
              "]; rebuild with SHADOWKV_CUDA_ARCHS including ", major, ".", minor);
}

// The ops' scratch memory comes from PyTorch's caching allocator: what torch has cached is
// reused (cudaMallocAsync's own pool cannot see it, so a large workspace such as the fused
// backward's dQ accumulator could fail while torch holds free blocks), the scratch shows in
// torch.cuda.memory_stats and counts against set_per_process_memory_fraction, running out
// raises torch.OutOfMemoryError after torch has freed its cache and retried, and CUDA graph
// capture takes it from the graph's private pool like any tensor. The ops run under a device
// guard on the tensors' device, which is the device the caching allocator allocates on.
void* torch_workspace_allocate(size_t bytes, void* stream) {
  return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, static_cast<cudaStream_t>(stream));
}
void torch_workspace_release(void* ptr, void* /*stream: the block remembers it*/) {
  c10::cuda::CUDACachingAllocator::raw_delete(ptr);
}
// Installed when the extension loads (shadowkv_core's switch is constant-initialised).
const bool g_torch_workspace = [] {
  set_workspace_allocator({&torch_workspace_allocate, &torch_workspace_release});
  return true;
}();

// A checked paged op (check_values, the Python ops' check=True) copies index values to the
// host and synchronises, which a stream being captured into a CUDA graph does not allow: CUDA
// answered "operation not permitted when stream is capturing" from inside the op and
// invalidated the caller's capture. Refused before the op's own work is queued, saying what to
// do. On the legacy default stream (torch's default) CUDA answers
// cudaErrorStreamCaptureImplicit while a blocking stream of the device captures: the op could
// not synchronise then either. Errors are cleared, not left for the next launch check to
// report against another kernel.
void refuse_checked_capture(bool check_values, cudaStream_t stream, const char* op) {
  if (!check_values) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  if (err != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK_VALUE(err != cudaErrorStreamCaptureImplicit, "shadowkv::", op,
                    ": check=True reads index values back to the host, which the default stream cannot "
                    "do while another stream of the device is captured into a CUDA graph; pass "
                    "check=False (the kernels then check on the device) or use a non-default stream");
  TORCH_CHECK(err == cudaSuccess, "shadowkv::", op, ": cudaStreamIsCapturing: ", cudaGetErrorString(err));
  TORCH_CHECK_VALUE(status == cudaStreamCaptureStatusNone, "shadowkv::", op,
                    ": check=True reads index values back to the host, which is not allowed while the "
                    "stream is captured into a CUDA graph; pass check=False (the kernels then check "
                    "on the device)");
}

}  // namespace

void launch_shadow_attention_fwd_cuda(const ShadowAttentionParams& p, const at::Device& device) {
  check_arch_built(device);
  const c10::cuda::CUDAGuard guard(device);
  shadow_attention_fwd_cuda(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
}

void launch_shadow_attention_bwd_cuda(const ShadowAttentionBwdParams& p, const at::Device& device) {
  check_arch_built(device);
  const c10::cuda::CUDAGuard guard(device);
  shadow_attention_bwd_cuda(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
}

// The paged ops synchronise the current stream once per call (they check index values on the
// host), except append_kv and paged_decode_attention with check_values = false.
void launch_append_kv_cuda(const AppendKVParams& p, const at::Device& device) {
  check_arch_built(device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  refuse_checked_capture(p.check_values, stream, "append_kv");
  append_kv_cuda(p, stream);
}

void launch_paged_decode_attention_cuda(const PagedDecodeParams& p, const at::Device& device) {
  check_arch_built(device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  refuse_checked_capture(p.check_values, stream, "paged_decode_attention");
  paged_decode_attention_cuda(p, stream);
}

void launch_evict_compact_cuda(const EvictCompactParams& p, const at::Device& device) {
  check_arch_built(device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  refuse_checked_capture(p.check_values, stream, "evict_compact");
  evict_compact_cuda(p, stream);
}

}  // namespace shadowkv::bindings
