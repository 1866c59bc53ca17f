// Shared-memory barriers for warp-specialised kernels (sm_90): mbarriers (a phase that completes
// when a set number of arrivals is in, waited for by parity), cp.async copies that arrive on an
// mbarrier when they land, named barriers (bar.sync / bar.arrive over part of a block) and the
// register reallocation between warpgroups (setmaxnreg). Used by the warp-specialised attention
// forward (shadow_attention_fwd_ws.cuh): one producer warpgroup copies, two consumer warpgroups
// compute, and nothing synchronises the whole block inside the loop.
//
// Under SHADOWKV_CUDA_EMULATION (tests/cpp/cuda_emulation.h) each call is the emulation's: an
// mbarrier is a counter with a phase, and the cp.async copies a thread hands to one land only
// when its phase completes (the latest the hardware may deliver them), so a consumer that reads a
// stage without waiting for its phase sees stale bytes; named barriers count threads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace shadowkv {
namespace cuda_common {

#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
#define SHADOWKV_MBARRIER_EMULATED 1
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SHADOWKV_MBARRIER_EMULATED 0
#define SHADOWKV_MBARRIER_SM90 1
#endif

#if defined(SHADOWKV_MBARRIER_SM90)
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// One thread initialises `bar` to complete a phase after `count` arrivals; a block-wide barrier
// must follow before any other thread uses it.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::mbar_init(bar, count);
#elif defined(SHADOWKV_MBARRIER_SM90)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
#endif
}

// One arrival (release: this thread's earlier shared-memory writes are visible to the threads
// that see the phase complete).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::mbar_arrive(bar);
#elif defined(SHADOWKV_MBARRIER_SM90)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}

// Waits until the phase of parity `parity` (0 for the first phase, then 1, 0, ...) completed.
// Waiting for parity 1 before the first phase completed returns at once: a producer's first
// wait for an empty stage.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::mbar_wait(bar, parity);
#elif defined(SHADOWKV_MBARRIER_SM90)
  const uint32_t addr = smem_address(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

// One arrival on `bar` once every cp.async this thread issued so far has landed (.noinc: it
// counts as one of the phase's arrivals). Replaces the commit/wait of a cp.async group. It
// orders nothing but those copies: the thread's ordinary shared-memory stores need an
// mbar_arrive of their own.
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::cp_async_mbar_arrive(bar);
#elif defined(SHADOWKV_MBARRIER_SM90)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}

// A position in a ring of kStages stages, each guarded by a "full" and an "empty" mbarrier
// (producer and consumers walk it in the same order): the stage, and the round (how many times
// the ring wrapped), whose parity is the phase a consumer waits for on the stage's full barrier.
// The producer waits for the other parity on its empty barrier: the release of the stage's
// previous round, which in round 0 returns at once.
template <int kStages>
struct RingCursor {
  int stage = 0, round = 0;
  __device__ __forceinline__ uint32_t full_parity() const { return static_cast<uint32_t>(round & 1); }
  __device__ __forceinline__ uint32_t empty_parity() const { return full_parity() ^ 1u; }
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      ++round;
    }
  }
};

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (whole warps): sync
// arrives and waits for the others, arrive only arrives.
__device__ __forceinline__ void named_sync(int id, int threads) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::named_barrier(id, threads, true);
#elif defined(SHADOWKV_MBARRIER_SM90)
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
#if SHADOWKV_MBARRIER_EMULATED
  shadowkv_emu::named_barrier(id, threads, false);
#elif defined(SHADOWKV_MBARRIER_SM90)
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

// This warpgroup's registers per thread become N (sm_90a; every warp of the warpgroup calls it):
// the producer gives registers back (dec), the consumers take them (inc).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

}  // namespace cuda_common
}  // namespace shadowkv
