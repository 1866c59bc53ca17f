// In-process overrides of the kernel settings (shadowkv/kernel_choice.h).
#include "shadowkv/kernel_choice.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

namespace shadowkv {
namespace {

const char* const kSettings[] = {"SHADOWKV_ATTENTION_KERNEL", "SHADOWKV_DECODE_KERNEL", "SHADOWKV_CPU_ISA"};

void check_setting(const char* setting) {
  if (setting != nullptr) {
    for (const char* known : kSettings) {
      if (std::strcmp(setting, known) == 0) return;
    }
  }
  throw std::invalid_argument(std::string("shadowkv: unknown kernel setting '") + (setting ? setting : "(null)") +
                              "'; one of SHADOWKV_ATTENTION_KERNEL, SHADOWKV_DECODE_KERNEL, SHADOWKV_CPU_ISA");
}

struct Overrides {
  std::mutex lock;
  std::map<std::string, std::string> values;
};

Overrides& overrides() {
  static Overrides o;
  return o;
}

}  // namespace

std::string kernel_choice(const char* setting) {
  check_setting(setting);
  {
    Overrides& o = overrides();
    const std::lock_guard<std::mutex> guard(o.lock);
    const auto it = o.values.find(setting);
    if (it != o.values.end()) return it->second;
  }
  const char* env = std::getenv(setting);
  return env == nullptr ? std::string() : std::string(env);
}

bool set_kernel_choice(const char* setting, const char* value, std::string* previous) {
  check_setting(setting);
  Overrides& o = overrides();
  const std::lock_guard<std::mutex> guard(o.lock);
  const auto it = o.values.find(setting);
  const bool had = it != o.values.end();
  if (had && previous != nullptr) *previous = it->second;
  if (value == nullptr) {
    if (had) o.values.erase(it);
  } else {
    o.values[setting] = value;
  }
  return had;
}

}  // namespace shadowkv
