// The kernel settings' in-process overrides (csrc/core/kernel_choice.h): an override beats the
// environment, removing it hands the choice back, unknown settings are refused, the CPU
// kernels' ISA choice reads it, and readers in other threads race no writer (under
// ThreadSanitizer too).
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../core/kernel_choice.h"
#include "harness.h"
#include "shadowkv/shadow_attention.h"

namespace kc = shadowkv::core;

namespace {

// Removes the override of `setting` when the test ends, also when a check throws.
struct ClearOverride {
  const char* setting;
  ~ClearOverride() { kc::set_kernel_choice(setting, std::nullopt); }
};

}  // namespace

TEST(kernel_choice_override_beats_the_environment_and_restores) {
  const char* name = "SHADOWKV_DECODE_KERNEL";
  const ClearOverride clear{name};
  ::setenv(name, "warp", 1);  // single-threaded here: the override exists for the threaded case
  CHECK(kc::kernel_choice(name) == "warp");
  CHECK(!kc::set_kernel_choice(name, "pipelined"));  // no override was in place
  CHECK(kc::kernel_choice(name) == "pipelined");
  CHECK(kc::set_kernel_choice(name, "mma") == std::optional<std::string>("pipelined"));
  CHECK(kc::set_kernel_choice(name, std::nullopt) == std::optional<std::string>("mma"));
  CHECK(kc::kernel_choice(name) == "warp");  // the environment again
  ::unsetenv(name);
  CHECK(kc::kernel_choice(name).empty());
  CHECK(kc::set_kernel_choice(name, "") == std::nullopt);
  CHECK(kc::kernel_choice(name).empty());  // an empty override is the default, whatever the environment
  CHECK(kc::set_kernel_choice(name, std::nullopt) == std::optional<std::string>(""));
}

TEST(kernel_choice_refuses_unknown_settings) {
  CHECK_THROWS(kc::kernel_choice("SHADOWKV_ATTENTION_KERNELS"), "unknown kernel setting");
  CHECK_THROWS(kc::set_kernel_choice("PATH", "x"), "unknown kernel setting");
  CHECK_THROWS(kc::kernel_choice(nullptr), "unknown kernel setting");
}

TEST(kernel_choice_drives_the_cpu_isa) {
  const ClearOverride clear{"SHADOWKV_CPU_ISA"};
  kc::set_kernel_choice("SHADOWKV_CPU_ISA", "baseline");
  CHECK(std::string(shadowkv::cpu_isa()) == "baseline");
  kc::set_kernel_choice("SHADOWKV_CPU_ISA", "sse9");
  CHECK_THROWS(shadowkv::cpu_isa(), "SHADOWKV_CPU_ISA must be one of");
}

TEST(kernel_choice_threads_read_while_one_sets) {
  const char* name = "SHADOWKV_ATTENTION_KERNEL";
  const ClearOverride clear{name};
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        const std::string v = kc::kernel_choice(name);
        if (v != "simt" && v != "wmma" && v != (std::getenv(name) ? std::getenv(name) : "")) ++bad;
      }
    });
  }
  for (int i = 0; i < 2000; ++i) {
    kc::set_kernel_choice(name, i % 2 ? "simt" : "wmma");
    if (i % 7 == 0) kc::set_kernel_choice(name, std::nullopt);
  }
  stop = true;
  for (std::thread& t : readers) t.join();
  CHECK(bad.load() == 0);
}
