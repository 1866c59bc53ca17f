// wgmma_available(): whether this build's sm_90a wgmma kernels (shadow_attention_{fwd,bwd}_
// wgmma_cute.cu) run on the current device. Compiled for every arch of the build (they are
// compiled for sm_90a alone): the probe below answers 1 only from the sm_90a binary, the one a
// 9.0 device loads when the build has it, and it is asked only on such a device.
#include "shadow_attention_common.cuh"
#include "shadow_attention_kernels.h"
#ifdef SHADOWKV_HAS_SM90A  // SHADOWKV_WGMMA_BODY; without 9.0a the CuTe headers were ~16 s of compile for nothing
#include "shadow_attention_wgmma.cuh"
#endif

#include <mutex>
#include <vector>

namespace shadowkv {
namespace cuda_attn {
namespace {

#ifdef SHADOWKV_HAS_SM90A  // else wgmma_available() is false without asking
// 1 in the sm_90a build of this file, 0 in the others: what wgmma_available asks the loaded
// binary (the wgmma kernels' own files are compiled for sm_90a alone). The answer goes to a
// module global, not to memory allocated for it: a cudaMalloc fails when PyTorch's cache holds
// nearly all of the GPU, and that failure once read as "no" for the rest of the process (the
// slower CuTe kernels on an H100, silently).
__device__ int g_wgmma_probe_answer;
__global__ void wgmma_probe_kernel() { g_wgmma_probe_answer = SHADOWKV_WGMMA_BODY; }

enum class Probe { kNo, kYes, kFailed };

// Asks the binary the driver loaded for the current device whether it has the sm_90a body (a
// plain 9.0 build of this file would carry the trap). The probe runs on a stream of its own in
// relaxed capture mode, so a capture elsewhere in the process is not disturbed (callers do not
// probe while their own stream is capturing). kFailed: it could not run, ask again later.
Probe probe_wgmma_body() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) {
    (void)cudaGetLastError();
    return Probe::kFailed;
  }
  cudaStream_t stream = nullptr;
  int host = -1;
  bool ok = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess;
  if (ok) {
    wgmma_probe_kernel<<<1, 1, 0, stream>>>();
    ok = cudaGetLastError() == cudaSuccess &&
         cudaMemcpyFromSymbolAsync(&host, g_wgmma_probe_answer, sizeof(int), 0, cudaMemcpyDeviceToHost, stream) ==
             cudaSuccess &&
         cudaStreamSynchronize(stream) == cudaSuccess;
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
  (void)cudaGetLastError();
  cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
  if (!ok || (host != 0 && host != 1)) return Probe::kFailed;
  return host == 1 ? Probe::kYes : Probe::kNo;
}
#endif

}  // namespace

bool wgmma_available(cudaStream_t caller) {
#ifndef SHADOWKV_HAS_SM90A
  (void)caller;
  return false;  // no 9.0a in SHADOWKV_CUDA_ARCHS: the kernel body was never compiled
#else
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // no usable device: nothing runs here
    return false;
  }
  if (major != 9 || minor != 0) return false;
  static std::mutex lock;
  static std::vector<int> known;     // per device: -1 not answered yet, 0 no, 1 yes
  static std::vector<int> failures;  // per device: probes that could not run
  std::lock_guard<std::mutex> guard(lock);
  if (static_cast<int>(known.size()) <= dev) {
    known.resize(dev + 1, -1);
    failures.resize(dev + 1, 0);
  }
  if (known[dev] < 0) {
    // Not while the caller's stream is being captured: answer no this once (the cute kernel
    // runs) and ask at the next eager call.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (caller != nullptr && (cudaStreamIsCapturing(caller, &status) != cudaSuccess ||
                              status != cudaStreamCaptureStatusNone)) {
      (void)cudaGetLastError();
      return false;
    }
    // A probe that could not run answers no this once; after a few, no for good (a broken
    // context would otherwise pay a stream and a synchronisation per call).
    const Probe answer = probe_wgmma_body();
    if (answer != Probe::kFailed) {
      known[dev] = answer == Probe::kYes ? 1 : 0;
    } else if (++failures[dev] >= 3) {
      known[dev] = 0;
    }
  }
  return known[dev] == 1;
#endif
}

}  // namespace cuda_attn
}  // namespace shadowkv
