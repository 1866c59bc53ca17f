// Argument checks and Tensor -> plain-C++ params conversion shared by the op bindings.
// The only layer that knows torch; kernels see raw pointers and strides.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "shadowkv/dtypes.h"

namespace shadowkv::bindings {

// "[2, 3, 4]" for messages.
std::string shape_str(at::IntArrayRef s);

// A dtype as Python names it ("int32", "float32", "bfloat16"...; c10's own name for others), so
// that the C++ checks' messages read as the fake kernels' (shadowkv/ops.py) and torch's.
std::string dtype_str(at::ScalarType t);

// The kernel dtype of a floating tensor; TypeError naming `name` otherwise.
DType kernel_dtype(const at::Tensor& t, const char* name);

// Rank check: ValueError "`name` must be a <rank>-D tensor <layout>, got shape [...]".
void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout);

// Same device as `ref` (named ref_name); ValueError otherwise.
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

// Same dtype as `ref`; TypeError otherwise.
void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

// float64 runs on the CPU kernels only; TypeError for a float64 `name` on CUDA.
void check_no_float64_on_cuda(const at::Tensor& t, const char* name);

// Exact shape; ValueError naming both shapes otherwise.
void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected);

// The softmax scale: `scale` if given, else 1/sqrt(head_dim). ValueError unless positive and
// at most FLT_MAX: every kernel but the float64 CPU one computes it in float32, where a larger
// finite double becomes inf.
double softmax_scale(std::optional<double> scale, int64_t head_dim);

// The kernels need a unit stride in the last dimension; anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// Copies the strides of dims [0, n) into dst (elements).
inline void copy_strides(const at::Tensor& t, int64_t* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride(i);
}

}  // namespace shadowkv::bindings
