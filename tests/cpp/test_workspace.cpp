// The workspace allocator switch (shadowkv/workspace.h): install, restore, reject half a pair.
// How the CUDA ops use it (DeviceWorkspace) is tested in test_device_workspace.cpp.
#include <cstdlib>

#include "harness.h"
#include "shadowkv/workspace.h"

namespace {

void* alloc_a(size_t bytes, void*) { return std::malloc(bytes); }
void release_a(void* ptr, void*) { std::free(ptr); }
void* alloc_b(size_t bytes, void*) { return std::malloc(bytes); }
void release_b(void* ptr, void*) { std::free(ptr); }

}  // namespace

TEST(workspace_allocator_install_and_restore) {
  using shadowkv::WorkspaceAllocator;
  const WorkspaceAllocator none = shadowkv::workspace_allocator();
  CHECK(none.allocate == nullptr && none.release == nullptr);  // the default: cudaMallocAsync
  WorkspaceAllocator prev = shadowkv::set_workspace_allocator({&alloc_a, &release_a});
  CHECK(prev.allocate == nullptr && prev.release == nullptr);
  CHECK(shadowkv::workspace_allocator().allocate == &alloc_a);
  prev = shadowkv::set_workspace_allocator({&alloc_b, &release_b});
  CHECK(prev.allocate == &alloc_a && prev.release == &release_a);
  CHECK(shadowkv::workspace_allocator().release == &release_b);
  prev = shadowkv::set_workspace_allocator({});
  CHECK(prev.allocate == &alloc_b);
  CHECK(shadowkv::workspace_allocator().allocate == nullptr);
}

TEST(workspace_allocator_rejects_half_a_pair) {
  CHECK_THROWS(shadowkv::set_workspace_allocator({&alloc_a, nullptr}), "both be set");
  CHECK_THROWS(shadowkv::set_workspace_allocator({nullptr, &release_a}), "both be null");
  CHECK(shadowkv::workspace_allocator().allocate == nullptr);  // unchanged
}
