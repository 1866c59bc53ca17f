// Which kernels the ops run (internal to the library and its Python bindings): the settings
// SHADOWKV_ATTENTION_KERNEL (CUDA shadow_attention), SHADOWKV_DECODE_KERNEL (CUDA
// paged_decode_attention) and SHADOWKV_CPU_ISA (the CPU kernels' instruction set), read at
// every op call. Each comes from an in-process override when one is set, else from the
// environment variable of the same name (what C++ applications set).
//
// The override is for choosing within a running process: the Python ops' attention_kernel(),
// decode_kernel() and cpu_isa() blocks set and restore it. Setting the environment instead
// (setenv) while another thread's op reads it (getenv) is undefined behaviour in POSIX, as glibc
// may move the environment while it is read. Overrides are process-wide and thread-safe to set
// and read; like any process-wide setting, scopes restore correctly only when they nest (two
// threads' overlapping blocks may leave one's value behind).
#pragma once

#include <optional>
#include <string>

namespace shadowkv {
namespace core {

// The value in force for `setting` (one of the three names above): the override, else the
// environment variable, else "" (the default). Throws std::invalid_argument for another name.
std::string kernel_choice(const char* setting);

// Sets the override of `setting` to `value`, or removes it (nullopt: the environment variable
// decides again); returns the override it replaces (nullopt: none), so that a scope can restore
// it. Values are checked where they are used (an op call with a bad value throws
// std::invalid_argument naming the setting). Throws std::invalid_argument for an unknown setting.
std::optional<std::string> set_kernel_choice(const char* setting, std::optional<std::string> value);

}  // namespace core
}  // namespace shadowkv
