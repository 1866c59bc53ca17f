// Maps the runtime DType to a storage type for templated CPU kernels, and the checks the CPU
// entry points share.
#pragma once

#include <stdexcept>
#include <string>

#include "shadowkv/dtypes.h"
#include "shadowkv/shadow_attention.h"  // ParallelFor

namespace shadowkv::cpu {

template <typename T>
struct type_tag {
  using type = T;
};

template <typename F>
decltype(auto) dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(type_tag<float>{});
    case DType::kFloat64: return f(type_tag<double>{});
    case DType::kBFloat16: return f(type_tag<bf16_t>{});
    case DType::kFloat16: return f(type_tag<fp16_t>{});
  }
  throw std::invalid_argument("shadowkv: unsupported dtype code " + std::to_string(static_cast<int>(dt)));
}

// An empty ParallelFor (a default-constructed std::function) would throw bad_function_call
// from inside a kernel; name the argument instead, before anything is written.
inline void check_parallel_for(const ParallelFor& pf, const char* fn) {
  if (!pf) throw std::invalid_argument(std::string(fn) + ": `pf` is an empty ParallelFor (pass shadowkv::serial_for to run serially)");
}

}  // namespace shadowkv::cpu
