// The one registration point of every shadowkv op (schemas and device kernels).
// Fake (meta) kernels and autograd are registered in Python (shadowkv/ops.py).
#include <torch/library.h>

#include "shadow_attention_ops.h"

TORCH_LIBRARY(shadowkv, m) {
  m.def(
      "shadow_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor evicted_at, int q_offset=0, float? scale=None)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "shadow_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor evicted_at, Tensor out, "
      "Tensor lse, Tensor? grad_lse, int q_offset, float? scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(shadowkv, CPU, m) {
  m.impl("shadow_attention_fwd", &shadowkv::bindings::shadow_attention_fwd);
  m.impl("shadow_attention_bwd", &shadowkv::bindings::shadow_attention_bwd);
}

#ifdef SHADOWKV_WITH_CUDA
TORCH_LIBRARY_IMPL(shadowkv, CUDA, m) {
  m.impl("shadow_attention_fwd", &shadowkv::bindings::shadow_attention_fwd);
  m.impl("shadow_attention_bwd", &shadowkv::bindings::shadow_attention_bwd);
}
#endif
