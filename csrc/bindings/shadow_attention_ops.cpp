#include "shadow_attention_ops.h"

#include <ATen/Parallel.h>

#include <limits>

#include "device_launch.h"
#include "tensor_params.h"

namespace shadowkv::bindings {
namespace {

constexpr const char* kQLayout = "[B, Hq, Lq, D]";
constexpr const char* kKvLayout = "[B, Hkv, Lk, D]";

// Validates the forward inputs and fills everything in the params but the outputs.
ShadowAttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& evicted_at, int64_t q_offset, std::optional<double> scale) {
  check_rank(q, 4, "q", kQLayout);
  check_rank(k, 4, "k", kKvLayout);
  check_rank(v, 4, "v", kKvLayout);
  check_rank(evicted_at, 3, "evicted_at", "[B, Hkv, Lk]");
  const DType dt = kernel_dtype(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  TORCH_CHECK_TYPE(evicted_at.scalar_type() == at::kInt, "shadowkv: `evicted_at` must be int32, got ",
                   dtype_str(evicted_at.scalar_type()));
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  check_same_device(evicted_at, "evicted_at", q, "q");

  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  check_shape(k, "k", {B, Hkv, Lk, D});
  check_shape(v, "v", {B, Hkv, Lk, D});
  check_shape(evicted_at, "evicted_at", {B, Hkv, Lk});
  TORCH_CHECK_VALUE(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "shadowkv: the head count of `q` (", Hq,
                    ") must be a multiple of the head count of `k` (", Hkv, ")");
  TORCH_CHECK_VALUE(q_offset >= 0, "shadowkv: `q_offset` must be >= 0, got ", q_offset);
  // Written so that nothing overflows: q_offset + Lq itself can pass INT64_MAX.
  TORCH_CHECK_VALUE(q_offset <= std::numeric_limits<int32_t>::max() - Lq, "shadowkv: `q_offset` (", q_offset,
                    ") + Lq (", Lq, ") exceeds the int32 positions of `evicted_at`");
  const double s = softmax_scale(scale, D);
  check_no_float64_on_cuda(q, "q");

  ShadowAttentionParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.q_len = Lq;
  p.kv_len = Lk;
  p.head_dim = D;
  p.q_offset = q_offset;
  p.scale = s;
  p.dtype = dt;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.evicted_at = evicted_at.data_ptr<int32_t>();
  copy_strides(q, p.q_stride, 3);
  copy_strides(k, p.k_stride, 3);
  copy_strides(v, p.v_stride, 3);
  copy_strides(evicted_at, p.ev_stride, 2);
  return p;
}

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> shadow_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& evicted_at_in,
                                                        int64_t q_offset, std::optional<double> scale) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor evicted_at = last_dim_contiguous(evicted_at_in);
  ShadowAttentionParams p = make_params(q, k, v, evicted_at, q_offset, scale);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({p.batch, p.num_q_heads, p.q_len}, q.options().dtype(lse_dtype(q)));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  copy_strides(out, p.o_stride, 3);
  copy_strides(lse, p.lse_stride, 2);
  launch_shadow_attention_fwd(p, q.device());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shadow_attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& evicted_at_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& grad_lse_in, int64_t q_offset, std::optional<double> scale) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor evicted_at = last_dim_contiguous(evicted_at_in);
  ShadowAttentionBwdParams bp;
  bp.fwd = make_params(q, k, v, evicted_at, q_offset, scale);
  bp.cpu_threads = at::get_num_threads();  // what at::parallel_for (torch_parallel_for) uses
  const ShadowAttentionParams& p = bp.fwd;

  const at::Tensor grad_out = last_dim_contiguous(grad_out_in), out = last_dim_contiguous(out_in);
  const at::Tensor lse = last_dim_contiguous(lse_in);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_rank(*t, 4, name, kQLayout);
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
    check_shape(*t, name, q.sizes());
  }
  const std::vector<int64_t> lse_shape{p.batch, p.num_q_heads, p.q_len};
  auto check_lse_like = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == lse_dtype(q), "shadowkv: `", name, "` must be ", dtype_str(lse_dtype(q)), ", got ",
                     dtype_str(t.scalar_type()));
    check_same_device(t, name, q, "q");
    check_shape(t, name, lse_shape);
  };
  check_lse_like(lse, "lse");
  at::Tensor grad_lse;
  if (grad_lse_in.has_value() && grad_lse_in->defined()) {
    grad_lse = last_dim_contiguous(*grad_lse_in);
    check_lse_like(grad_lse, "grad_lse");
  }

  bp.fwd.out = const_cast<void*>(out.data_ptr());
  bp.fwd.lse = const_cast<void*>(lse.data_ptr());
  copy_strides(out, bp.fwd.o_stride, 3);
  copy_strides(lse, bp.fwd.lse_stride, 2);
  bp.grad_out = grad_out.data_ptr();
  copy_strides(grad_out, bp.do_stride, 3);
  if (grad_lse.defined()) {
    bp.grad_lse = grad_lse.data_ptr();
    copy_strides(grad_lse, bp.glse_stride, 2);
  }
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(contiguous));
  bp.grad_q = dq.data_ptr();
  bp.grad_k = dk.data_ptr();
  bp.grad_v = dv.data_ptr();
  copy_strides(dq, bp.dq_stride, 3);
  copy_strides(dk, bp.dk_stride, 3);
  copy_strides(dv, bp.dv_stride, 3);
  launch_shadow_attention_bwd(bp, q.device());
  return {dq, dk, dv};
}

}  // namespace shadowkv::bindings
