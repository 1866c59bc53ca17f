// Opting a kernel in to more than 48 KB of dynamic shared memory, with a readable error.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace shadowkv {
namespace cuda_common {

// Opts `kernel` in to `bytes` of dynamic shared memory (nothing to do up to the 48 KB every
// GPU gives). The opt-in limit is per device: sm_75 has 64 KB, sm_86/89 99 KB, sm_80 163 KB,
// sm_90 227 KB, and an "8.0" build also runs on sm_86. A GPU with less gets a runtime_error
// naming both sizes and `hint` (what the caller can change) instead of CUDA's "invalid
// argument" at the launch; `op` and `kernel_name` say whose kernel it was.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t bytes, const char* op, const char* kernel_name, const char* hint) {
  if (bytes <= 48 * 1024) return;
  const auto check = [&](cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string(op) + ": CUDA error in " + what + " (" + kernel_name +
                               "): " + cudaGetErrorString(err));
    }
  };
  int device = 0, limit = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (bytes > static_cast<size_t>(limit)) {
    throw std::runtime_error(std::string(op) + ": " + kernel_name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, but GPU " + std::to_string(device) +
                             " allows " + std::to_string(limit) + "; " + hint);
  }
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

}  // namespace cuda_common
}  // namespace shadowkv
