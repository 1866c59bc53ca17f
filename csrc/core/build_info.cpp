// What this build of shadowkv_core contains; the definitions come from CMake.
#include "shadowkv/shadow_attention.h"

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

const char* cuda_archs() { return SHADOWKV_CUDA_ARCH_LIST; }

}  // namespace shadowkv
