// DeviceWorkspace (csrc/cuda/device_workspace.cuh), the scratch memory of every CUDA op, with an
// installed allocator: nothing here calls the CUDA runtime, so it runs without a GPU. Zero bytes
// allocate nothing; the pair a workspace came from releases it, whatever is installed later; a
// null from the allocator is an error naming the size; an exception from it propagates (the
// Python package's allocator raises torch.OutOfMemoryError that way); one from the release is
// swallowed by the destructor.
#include <stdexcept>
#include <string>
#include <vector>

#include "device_workspace.cuh"
#include "harness.h"

namespace {

struct Event {
  char what;  // 'a' allocate, 'r' release
  char pair;  // which allocator
  size_t bytes;
  void* ptr;
  void* stream;
};
std::vector<Event> g_events;
alignas(16) unsigned char g_arena[256];

void* alloc_a(size_t bytes, void* stream) {
  g_events.push_back({'a', 'A', bytes, g_arena, stream});
  return g_arena;
}
void release_a(void* ptr, void* stream) { g_events.push_back({'r', 'A', 0, ptr, stream}); }
void* alloc_b(size_t bytes, void* stream) {
  g_events.push_back({'a', 'B', bytes, g_arena + 128, stream});
  return g_arena + 128;
}
void release_b(void* ptr, void* stream) { g_events.push_back({'r', 'B', 0, ptr, stream}); }
void* alloc_null(size_t, void*) { return nullptr; }
void* alloc_throw(size_t, void*) { throw std::bad_alloc(); }
void release_throw(void* ptr, void* stream) {
  g_events.push_back({'r', 'T', 0, ptr, stream});
  throw std::runtime_error("release failed");
}

// Restores the default when a test ends, also when a check throws.
struct Installed {
  explicit Installed(shadowkv::WorkspaceAllocator a) { shadowkv::set_workspace_allocator(a); }
  ~Installed() { shadowkv::set_workspace_allocator({}); }
};

}  // namespace

TEST(emulated_workspace_uses_the_installed_allocator) {
  using shadowkv::cuda_common::DeviceWorkspace;
  g_events.clear();
  const Installed a({&alloc_a, &release_a});
  const auto stream = reinterpret_cast<cudaStream_t>(0x1234);
  {
    const DeviceWorkspace none(0, stream);  // nothing to allocate
    CHECK(none.bytes() == nullptr);
    const DeviceWorkspace w(100, stream);
    CHECK(w.bytes() == g_arena);
    CHECK(w.as<float>() == reinterpret_cast<float*>(g_arena));
    shadowkv::set_workspace_allocator({&alloc_b, &release_b});
    const DeviceWorkspace v(7, stream);
    CHECK(v.bytes() == g_arena + 128);
  }  // v then w go away: each released by its own pair
  CHECK(g_events.size() == 4);
  if (g_events.size() != 4) return;
  CHECK(g_events[0].what == 'a' && g_events[0].pair == 'A' && g_events[0].bytes == 100);
  CHECK(g_events[0].stream == reinterpret_cast<void*>(stream));
  CHECK(g_events[1].what == 'a' && g_events[1].pair == 'B' && g_events[1].bytes == 7);
  CHECK(g_events[2].what == 'r' && g_events[2].pair == 'B' && g_events[2].ptr == g_arena + 128);
  CHECK(g_events[3].what == 'r' && g_events[3].pair == 'A' && g_events[3].ptr == g_arena);
  CHECK(g_events[3].stream == reinterpret_cast<void*>(stream));
}

TEST(emulated_workspace_allocator_failures) {
  using shadowkv::cuda_common::DeviceWorkspace;
  {
    const Installed null_pair({&alloc_null, &release_a});
    bool threw = false;
    try {
      const DeviceWorkspace w(4096, nullptr);
    } catch (const std::runtime_error& e) {
      threw = std::string(e.what()).find("4096 bytes of CUDA workspace") != std::string::npos;
    }
    CHECK(threw);
  }
  g_events.clear();
  const Installed throwing({&alloc_throw, &release_a});
  bool threw = false;
  try {
    const DeviceWorkspace w(64, nullptr);
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(g_events.empty());  // nothing released that was never allocated
}

TEST(emulated_workspace_release_errors_stay_in_the_destructor) {
  // A throwing release (torch's raw_delete after a kernel fault) must not escape the destructor,
  // which may run while the op's own error unwinds: that would terminate the process.
  using shadowkv::cuda_common::DeviceWorkspace;
  g_events.clear();
  const Installed throwing({&alloc_a, &release_throw});
  bool reached = false;
  try {
    const DeviceWorkspace w(32, nullptr);
    throw std::invalid_argument("the op's own error");
  } catch (const std::invalid_argument&) {
    reached = true;
  }
  CHECK(reached);
  CHECK(g_events.size() == 2 && g_events[1].what == 'r' && g_events[1].pair == 'T');
}
