// Opting a kernel in to more than 48 KB of dynamic shared memory, with a readable error.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace shadowkv {
namespace cuda_common {

// What the process has opted each kernel in to, per device, and each device's opt-in limit.
// One instance for the library (an inline function's static).
struct SmemOptIns {
  std::mutex lock;
  std::map<std::pair<const void*, int>, size_t> granted;  // (kernel, device) -> bytes
  std::map<int, int> limit;                                 // device -> MaxSharedMemoryPerBlockOptin
};
inline SmemOptIns& smem_opt_ins() {
  static SmemOptIns s;
  return s;
}

// Opts `kernel` in to `bytes` of dynamic shared memory (nothing to do up to the 48 KB every
// GPU gives). The opt-in limit is per device: sm_75 has 64 KB, sm_86/89 99 KB, sm_80 163 KB,
// sm_90 227 KB, and an "8.0" build also runs on sm_86. A GPU with less gets a runtime_error
// naming both sizes and `hint` (what the caller can change) instead of CUDA's "invalid
// argument" at the launch; `op` and `kernel_name` say whose kernel it was.
//
// The kernel's opt-in only ever grows, under a lock: it is one attribute per kernel and device
// for the whole process, and the decode kernels need a different size per call (their part
// size follows the batch and the lengths). Set to each call's own size, a thread launching a
// smaller call between another thread's opt-in and its launch lowered it under that launch,
// which failed with "invalid argument". A larger opt-in than a launch uses costs that launch
// nothing (the launch's own size is what is reserved), and once a size was granted no driver
// call is made again.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t bytes, const char* op, const char* kernel_name, const char* hint) {
  if (bytes <= 48 * 1024) return;
  const auto check = [&](cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error(std::string(op) + ": CUDA error in " + what + " (" + kernel_name +
                               "): " + cudaGetErrorString(err));
    }
  };
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  SmemOptIns& s = smem_opt_ins();
  const std::lock_guard<std::mutex> guard(s.lock);
  size_t& granted = s.granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= granted) return;
  auto known = s.limit.find(device);
  if (known == s.limit.end()) {
    int limit = 0;
    check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    known = s.limit.emplace(device, limit).first;
  }
  if (bytes > static_cast<size_t>(known->second)) {
    throw std::runtime_error(std::string(op) + ": " + kernel_name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, but GPU " + std::to_string(device) +
                             " allows " + std::to_string(known->second) + "; " + hint);
  }
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  granted = bytes;
}

}  // namespace cuda_common
}  // namespace shadowkv
