// The workspace allocator switch of workspace.h. Plain C++: the CUDA side
// (csrc/cuda/device_workspace.cuh) reads the pair once per workspace.
#include "shadowkv/workspace.h"

#include <mutex>
#include <stdexcept>

namespace shadowkv {
namespace {

// Constant-initialised (both have constexpr constructors), so a static initialiser of another
// translation unit may install an allocator before main.
std::mutex g_mutex;
WorkspaceAllocator g_allocator;

}  // namespace

WorkspaceAllocator set_workspace_allocator(WorkspaceAllocator allocator) {
  if ((allocator.allocate == nullptr) != (allocator.release == nullptr)) {
    throw std::invalid_argument(
        "set_workspace_allocator: allocate and release must both be set (an allocator) or both be null (the "
        "default cudaMallocAsync / cudaFreeAsync)");
  }
  const std::lock_guard<std::mutex> lock(g_mutex);
  const WorkspaceAllocator previous = g_allocator;
  g_allocator = allocator;
  return previous;
}

WorkspaceAllocator workspace_allocator() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  return g_allocator;
}

}  // namespace shadowkv
