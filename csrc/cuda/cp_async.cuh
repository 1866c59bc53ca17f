// 16- and 4-byte asynchronous global -> shared copies (cp.async, sm_80+) for kernels that do not
// use CuTe (and the attention kernels' log entries beside CuTe's copies). Older targets copy
// synchronously, so callers need no second code path: the waits are then no-ops. Under
// SHADOWKV_CUDA_EMULATION (the host-only emulation the C++ tests run the kernels in,
// tests/cpp/cuda_emulation.h) a copy lands only when a wait covers its group, the latest the
// hardware may deliver it, so a read that does not wait sees stale bytes.
#pragma once

#include <cuda_runtime.h>

namespace shadowkv {
namespace cuda_common {

// Copies kBytes (16 or 4) from `src` to shared memory at `dst` (both kBytes-aligned), or writes
// kBytes zero bytes when `valid` is false (then `src` is not read, but must still be a valid
// global address). 16 bytes go through L2 only (.cg); 4 through L1 (.ca, the only form for
// copies under 16 bytes). Both join the same commit groups.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  static_assert(kBytes == 16 || kBytes == 4, "cp.async of 16 or 4 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? kBytes : 0;
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
  }
#elif defined(SHADOWKV_CUDA_EMULATION)
  shadowkv_emu::cp_async(dst, src, valid, kBytes);
#else
  if constexpr (kBytes == 16) {
    *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
  } else {
    *static_cast<int*>(dst) = valid ? *static_cast<const int*>(src) : 0;
  }
#endif
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) { cp_async<16>(dst, src, valid); }
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) { cp_async<4>(dst, src, valid); }

// Closes the group of copies this thread issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(SHADOWKV_CUDA_EMULATION)
  shadowkv_emu::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies are visible only after a barrier that follows their waits.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(SHADOWKV_CUDA_EMULATION)
  shadowkv_emu::cp_async_wait(N);
#endif
}

}  // namespace cuda_common
}  // namespace shadowkv
