// What this build of shadowkv_core contains; the definitions come from CMake.
#include <algorithm>
#include <string>

#include "shadowkv/shadow_attention.h"

struct CUstream_st;  // the CUDA runtime's stream type (cudaStream_t = CUstream_st*)

#ifndef SHADOWKV_CUDA_ARCH_LIST
#define SHADOWKV_CUDA_ARCH_LIST ""
#endif

namespace shadowkv {

bool built_with_cuda() {
#ifdef SHADOWKV_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_cute() {
#ifdef SHADOWKV_HAS_CUTE
  return true;
#else
  return false;
#endif
}

#if defined(SHADOWKV_WITH_CUDA) && defined(SHADOWKV_HAS_CUTE)
namespace cuda_attn {
// csrc/cuda/shadow_attention_fwd_wgmma_cute.cu (a cudaStream_t is a ::CUstream_st*; this file
// is plain C++ without the CUDA headers).
bool wgmma_available(::CUstream_st* caller);
}
#endif

bool wgmma_runs_here() {
#if defined(SHADOWKV_WITH_CUDA) && defined(SHADOWKV_HAS_CUTE)
  return cuda_attn::wgmma_available(nullptr);
#else
  return false;
#endif
}

const char* cuda_archs() {
  // CMake passes the list ','-separated (a ';' would split its definition); callers get ';'.
  static const std::string archs = [] {
    std::string a = SHADOWKV_CUDA_ARCH_LIST;
    std::replace(a.begin(), a.end(), ',', ';');
    return a;
  }();
  return archs.c_str();
}

}  // namespace shadowkv
