// Stream-ordered device scratch memory for one op call, from the installed WorkspaceAllocator
// (shadowkv/workspace.h) or, by default, cudaMallocAsync; given back on the same stream when the
// object goes away, also while an exception unwinds.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "shadowkv/workspace.h"

namespace shadowkv {
namespace cuda_common {

class DeviceWorkspace {
 public:
  DeviceWorkspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    alloc_ = workspace_allocator();  // released with the pair it came from, whatever is installed later
    if (alloc_.allocate != nullptr) {
      ptr_ = alloc_.allocate(bytes, stream);
      if (ptr_ == nullptr) fail(bytes, "the installed workspace allocator returned null");
      return;
    }
    const cudaError_t err = cudaMallocAsync(&ptr_, bytes, stream);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      (void)cudaGetLastError();  // not left pending for the next op's launch check to report
      fail(bytes, std::string("cudaMallocAsync: ") + cudaGetErrorString(err));
    }
  }
  ~DeviceWorkspace() {
    if (ptr_ == nullptr) return;
    if (alloc_.release != nullptr) {
      // A destructor must not throw, and this one also runs while an op's error unwinds: with a
      // faulted context torch's release (raw_delete -> cudaFree when uncached) throws the sticky
      // error, which would end the process instead of reaching the caller. The block is lost.
      try {
        alloc_.release(ptr_, stream_);
      } catch (...) {
      }
    } else {
      cudaFreeAsync(ptr_, stream_);
    }
  }
  DeviceWorkspace(const DeviceWorkspace&) = delete;
  DeviceWorkspace& operator=(const DeviceWorkspace&) = delete;

  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }
  unsigned char* bytes() const { return as<unsigned char>(); }

 private:
  [[noreturn]] static void fail(size_t bytes, const std::string& why) {
    throw std::runtime_error("shadowkv: cannot allocate " + std::to_string(bytes) + " bytes of CUDA workspace (" +
                             why + ")");
  }

  void* ptr_ = nullptr;
  cudaStream_t stream_;
  WorkspaceAllocator alloc_;
};

}  // namespace cuda_common
}  // namespace shadowkv
