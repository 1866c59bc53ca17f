// Maps the runtime DType to a storage type for templated CPU kernels.
#pragma once

#include <stdexcept>
#include <string>

#include "shadowkv/dtypes.h"

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

}  // namespace shadowkv::cpu
