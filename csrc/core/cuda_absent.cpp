// The CUDA entry points of the public headers in a build without CUDA kernels (CMake compiles
// this file only when SHADOWKV_WITH_CUDA is off). Why: a server that supports both kinds of
// build calls them behind `if (shadowkv::built_with_cuda())`; without definitions the CPU-only
// library would fail its link on the reference alone. Each throws std::runtime_error naming the
// call, before touching anything.
#include <stdexcept>
#include <string>

#include "shadowkv/paged_kv.h"
#include "shadowkv/shadow_attention.h"

namespace shadowkv {
namespace {

[[noreturn]] void no_cuda(const char* fn) {
  throw std::runtime_error(std::string(fn) +
                           ": this shadowkv was built without CUDA kernels (built_with_cuda() is false); rebuild "
                           "with SHADOWKV_CUDA=ON and nvcc on PATH");
}

}  // namespace

void append_kv_cuda(const AppendKVParams&, void*) { no_cuda("shadowkv::append_kv_cuda"); }
void paged_decode_attention_cuda(const PagedDecodeParams&, void*) { no_cuda("shadowkv::paged_decode_attention_cuda"); }
void evict_compact_cuda(const EvictCompactParams&, void*) { no_cuda("shadowkv::evict_compact_cuda"); }
void shadow_attention_fwd_cuda(const ShadowAttentionParams&, void*) { no_cuda("shadowkv::shadow_attention_fwd_cuda"); }
void shadow_attention_bwd_cuda(const ShadowAttentionBwdParams&, void*) { no_cuda("shadowkv::shadow_attention_bwd_cuda"); }

}  // namespace shadowkv
