// shadowkv._C: importing it registers the torch ops (static initialisers in
// torch_bindings.cpp); the functions here describe the build for `python -m shadowkv info`.
#include <pybind11/pybind11.h>

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
}
