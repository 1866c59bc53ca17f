// In-process overrides of the kernel settings (kernel_choice.h).
#include "kernel_choice.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <utility>

namespace shadowkv {
namespace core {
namespace {

constexpr const char* kSettings[] = {"SHADOWKV_ATTENTION_KERNEL", "SHADOWKV_DECODE_KERNEL", "SHADOWKV_CPU_ISA"};
constexpr int kNumSettings = sizeof(kSettings) / sizeof(kSettings[0]);

int setting_index(const char* setting) {
  if (setting != nullptr) {
    for (int i = 0; i < kNumSettings; ++i) {
      if (std::strcmp(setting, kSettings[i]) == 0) return i;
    }
  }
  throw std::invalid_argument(std::string("shadowkv: unknown kernel setting '") + (setting ? setting : "(null)") +
                              "'; one of SHADOWKV_ATTENTION_KERNEL, SHADOWKV_DECODE_KERNEL, SHADOWKV_CPU_ISA");
}

// One slot per setting: every op call reads one, so no lookup by string and no allocation
// beyond the copy it returns.
struct Overrides {
  std::mutex lock;
  std::optional<std::string> values[kNumSettings];
};

Overrides& overrides() {
  static Overrides o;
  return o;
}

}  // namespace

std::string kernel_choice(const char* setting) {
  const int i = setting_index(setting);
  {
    Overrides& o = overrides();
    const std::lock_guard<std::mutex> guard(o.lock);
    if (o.values[i]) return *o.values[i];
  }
  const char* env = std::getenv(kSettings[i]);
  return env == nullptr ? std::string() : std::string(env);
}

std::optional<std::string> set_kernel_choice(const char* setting, std::optional<std::string> value) {
  const int i = setting_index(setting);
  Overrides& o = overrides();
  const std::lock_guard<std::mutex> guard(o.lock);
  std::swap(o.values[i], value);
  return value;  // the previous override
}

}  // namespace core
}  // namespace shadowkv
