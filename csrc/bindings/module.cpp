// shadowkv._C: importing it registers the torch ops (static initialisers in
// torch_bindings.cpp); the functions here describe the build for `python -m shadowkv info`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>

#include "../core/kernel_choice.h"
#include "shadowkv/shadowkv.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "shadowkv native extension: torch ops under torch.ops.shadowkv";
  m.def("version", [] { return SHADOWKV_VERSION_STRING; }, "Version of the native library.");
  m.def("built_with_cuda", &shadowkv::built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("built_with_cute", &shadowkv::built_with_cute,
        "True when the CuTe forward kernel was compiled in (run it with SHADOWKV_ATTENTION_KERNEL=cute).");
  m.def("wgmma_runs_here", &shadowkv::wgmma_runs_here,
        "True when the current CUDA device runs the sm_90a wgmma kernels (SHADOWKV_ATTENTION_KERNEL=wgmma).");
  m.def("cpu_isa", &shadowkv::cpu_isa,
        "Instruction set the CPU kernels run now: 'avx512', 'avx2' or 'baseline' (the SHADOWKV_CPU_ISA setting "
        "overrides: set_kernel_choice, else the environment variable).");
  m.def("cuda_archs", &shadowkv::cuda_archs, "';'-separated compute capabilities built, e.g. '90a;80'.");
  // Settings and values as Python str: a NUL inside would cut them short in C++.
  const auto c_string = [](const std::string& s, const char* what) {
    if (s.find('\0') != std::string::npos) throw pybind11::value_error(std::string(what) + " must not contain NUL");
    return s.c_str();
  };
  m.def(
      "kernel_choice",
      [c_string](const std::string& setting) { return shadowkv::core::kernel_choice(c_string(setting, "setting")); },
      pybind11::arg("setting"),
      "The value in force for SHADOWKV_ATTENTION_KERNEL, SHADOWKV_DECODE_KERNEL or SHADOWKV_CPU_ISA: the "
      "in-process override, else the environment variable, else ''.");
  m.def(
      "set_kernel_choice",
      [c_string](const std::string& setting, std::optional<std::string> value) {
        if (value) c_string(*value, "value");
        return shadowkv::core::set_kernel_choice(c_string(setting, "setting"), std::move(value));
      },
      pybind11::arg("setting"), pybind11::arg("value"),
      "Sets the in-process override of a kernel setting (None removes it: the environment variable decides "
      "again); returns the override it replaces, or None. Process-wide; the ops read it at every call, also "
      "while another thread sets it (unlike the environment). Scopes restore correctly when they nest. Child "
      "processes do not inherit it.");
}
