// Which kernels the ops run: the settings SHADOWKV_ATTENTION_KERNEL (CUDA shadow_attention),
// SHADOWKV_DECODE_KERNEL (CUDA paged_decode_attention) and SHADOWKV_CPU_ISA (the CPU kernels'
// instruction set), read at every op call. Each comes from an in-process override when one is
// set, else from the environment variable of the same name.
//
// The override is for choosing within a running process (the Python ops' attention_kernel(),
// decode_kernel() and cpu_isa() blocks use it): setting the environment instead (setenv) while
// another thread's op reads it (getenv) is undefined behaviour in POSIX, as glibc may move the
// environment while it is read. Overrides are process-wide and thread-safe.
#pragma once

#include <string>

namespace shadowkv {

// The value in force for `setting` (one of the three names above): the override, else the
// environment variable, else "" (the default). Throws std::invalid_argument for another name.
std::string kernel_choice(const char* setting);

// Sets the override of `setting` to `value`, or removes it when `value` is null (the
// environment variable decides again). Values are checked where they are used (an op call
// with a bad value throws std::invalid_argument naming the setting). Returns whether an
// override was in place, and its value in `*previous` when `previous` is not null, so that a
// scope can restore it. Throws std::invalid_argument for an unknown setting.
bool set_kernel_choice(const char* setting, const char* value, std::string* previous = nullptr);

}  // namespace shadowkv
