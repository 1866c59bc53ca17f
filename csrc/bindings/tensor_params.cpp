#include "tensor_params.h"

#include <cfloat>
#include <cmath>
#include <sstream>

namespace shadowkv::bindings {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "shadowkv: `", name, "` must be float32, float64, bfloat16 or float16, got ",
                       dtype_str(t.scalar_type()));
  }
}

void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "shadowkv: `", name, "` must be a ", rank, "-D tensor ", layout, ", got shape ",
                    shape_str(t.sizes()));
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "shadowkv: `", name, "` must be on the device of `", ref_name, "` (",
                    ref.device(), "), got ", t.device());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "shadowkv: `", name, "` must have the dtype of `", ref_name,
                   "` (", dtype_str(ref.scalar_type()), "), got ", dtype_str(t.scalar_type()));
}

void check_no_float64_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(!t.is_cuda() || t.scalar_type() != at::kDouble, "shadowkv: `", name,
                   "` float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "shadowkv: `", name, "` must have shape ", shape_str(expected), ", got ",
                    shape_str(t.sizes()));
}

double softmax_scale(std::optional<double> scale, int64_t head_dim) {
  const double s = scale.has_value() ? *scale : (head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0);
  TORCH_CHECK_VALUE(valid_softmax_scale(s), "shadowkv: `scale` must be positive and finite, at most FLT_MAX / log2(e) (",
                    kMaxSoftmaxScale, ": the kernels compute in float32), got ", s);
  return s;
}

}  // namespace shadowkv::bindings
