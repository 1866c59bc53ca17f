// Conversions between double and the element types of the CUDA kernels (float, __nv_bfloat16,
// __half), rounding to nearest, for the emulated-kernel tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace shadowkv_test {

template <typename T>
T from_double(double x) {
  if constexpr (std::is_same<T, float>::value) {
    return static_cast<float>(x);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return __float2half_rn(static_cast<float>(x));
  }
}

template <typename T>
double to_double(T x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

}  // namespace shadowkv_test
