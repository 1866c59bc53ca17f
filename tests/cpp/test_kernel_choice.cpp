// The kernel settings' in-process overrides (shadowkv/kernel_choice.h): an override beats the
// environment, removing it hands the choice back, unknown settings are refused, and the CPU
// kernels' ISA choice reads it.
#include <cstdlib>
#include <string>

#include "harness.h"
#include "shadowkv/kernel_choice.h"
#include "shadowkv/shadow_attention.h"

TEST(kernel_choice_override_beats_the_environment_and_restores) {
  const char* name = "SHADOWKV_DECODE_KERNEL";
  ::setenv(name, "warp", 1);  // single-threaded here: the override exists for the threaded case
  CHECK(shadowkv::kernel_choice(name) == "warp");
  std::string previous = "untouched";
  CHECK(!shadowkv::set_kernel_choice(name, "pipelined", &previous));
  CHECK(previous == "untouched");  // no override was in place
  CHECK(shadowkv::kernel_choice(name) == "pipelined");
  CHECK(shadowkv::set_kernel_choice(name, "mma", &previous));
  CHECK(previous == "pipelined");
  CHECK(shadowkv::set_kernel_choice(name, nullptr, &previous));
  CHECK(previous == "mma");
  CHECK(shadowkv::kernel_choice(name) == "warp");  // the environment again
  ::unsetenv(name);
  CHECK(shadowkv::kernel_choice(name).empty());
  CHECK(!shadowkv::set_kernel_choice(name, nullptr));  // removing nothing is fine
}

TEST(kernel_choice_refuses_unknown_settings) {
  CHECK_THROWS(shadowkv::kernel_choice("SHADOWKV_ATTENTION_KERNELS"), "unknown kernel setting");
  CHECK_THROWS(shadowkv::set_kernel_choice("PATH", "x"), "unknown kernel setting");
  CHECK_THROWS(shadowkv::kernel_choice(nullptr), "unknown kernel setting");
}

TEST(kernel_choice_drives_the_cpu_isa) {
  shadowkv::set_kernel_choice("SHADOWKV_CPU_ISA", "baseline");
  CHECK(std::string(shadowkv::cpu_isa()) == "baseline");
  shadowkv::set_kernel_choice("SHADOWKV_CPU_ISA", "sse9");
  CHECK_THROWS(shadowkv::cpu_isa(), "SHADOWKV_CPU_ISA must be one of");
  shadowkv::set_kernel_choice("SHADOWKV_CPU_ISA", nullptr);
}
