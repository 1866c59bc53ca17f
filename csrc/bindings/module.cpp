// shadowkv._C: importing it registers the torch ops (static initialisers in
// torch_bindings.cpp); the functions here describe the build for `python -m shadowkv info`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

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
        "Instruction set the CPU kernels run now: 'avx512', 'avx2' or 'baseline' (SHADOWKV_CPU_ISA overrides).");
  m.def("cuda_archs", &shadowkv::cuda_archs, "';'-separated compute capabilities built, e.g. '90a;80'.");
  m.def("kernel_choice", [](const std::string& setting) { return shadowkv::kernel_choice(setting.c_str()); },
        pybind11::arg("setting"),
        "The value in force for SHADOWKV_ATTENTION_KERNEL, SHADOWKV_DECODE_KERNEL or SHADOWKV_CPU_ISA: the "
        "in-process override, else the environment variable, else ''.");
  m.def(
      "set_kernel_choice",
      [](const std::string& setting, std::optional<std::string> value) -> std::optional<std::string> {
        std::string previous;
        const bool had = shadowkv::set_kernel_choice(setting.c_str(), value ? value->c_str() : nullptr, &previous);
        return had ? std::optional<std::string>(previous) : std::nullopt;
      },
      pybind11::arg("setting"), pybind11::arg("value"),
      "Sets the in-process override of a kernel setting (None removes it: the environment decides again); "
      "returns the override it replaces, or None. Process-wide and thread-safe, unlike setting the "
      "environment while another thread's op reads it.");
}
