// The one registration point of every shadowkv op (schemas and device kernels).
// Fake (meta) kernels and autograd are registered in Python (shadowkv/ops.py).
#include <torch/library.h>

#include "cache_op_guards.h"
#include "paged_kv_ops.h"
#include "shadow_attention_ops.h"

TORCH_LIBRARY(shadowkv, m) {
  m.def(
      "shadow_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor evicted_at, int q_offset=0, float? scale=None)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "shadow_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor evicted_at, Tensor out, "
      "Tensor lse, Tensor? grad_lse, int q_offset, float? scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "append_kv(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos_pages, Tensor block_tables, "
      "Tensor(d!) seq_lens, Tensor k, Tensor v, Tensor positions, Tensor num_new, bool check=True) -> ()");
  // Two decode ops (paged_kv_ops.h says why not one with an optional scores_out).
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_tables, Tensor seq_lens, "
      "float? scale=None, bool check=True) -> Tensor");
  m.def(
      "paged_decode_attention_scores(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_tables, "
      "Tensor seq_lens, float? scale, Tensor(a!) scores_out, bool check=True) -> Tensor");
  m.def(
      "evict_compact(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos_pages, Tensor(d!) block_tables, "
      "Tensor(e!) seq_lens, Tensor keep, Tensor steps, Tensor(f!) evicted_at, Tensor(g!)? slot_scores=None, "
      "bool check=True, bool stable=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(shadowkv, CPU, m) {
  m.impl("shadow_attention_fwd", &shadowkv::bindings::shadow_attention_fwd);
  m.impl("shadow_attention_bwd", &shadowkv::bindings::shadow_attention_bwd);
  m.impl("append_kv", &shadowkv::bindings::append_kv);
  m.impl("paged_decode_attention", &shadowkv::bindings::paged_decode_attention);
  m.impl("paged_decode_attention_scores", &shadowkv::bindings::paged_decode_attention_scores);
  m.impl("evict_compact", &shadowkv::bindings::evict_compact);
}

#ifdef SHADOWKV_WITH_CUDA
TORCH_LIBRARY_IMPL(shadowkv, CUDA, m) {
  m.impl("shadow_attention_fwd", &shadowkv::bindings::shadow_attention_fwd);
  m.impl("shadow_attention_bwd", &shadowkv::bindings::shadow_attention_bwd);
  // The paged ops dispatch on the device inside their bindings (CUDA twins in csrc/cuda/).
  m.impl("append_kv", &shadowkv::bindings::append_kv);
  m.impl("paged_decode_attention", &shadowkv::bindings::paged_decode_attention);
  m.impl("paged_decode_attention_scores", &shadowkv::bindings::paged_decode_attention_scores);
  m.impl("evict_compact", &shadowkv::bindings::evict_compact);
}
#endif

// The cache ops have no derivative and write in place: refuse gradients, bump versions
// (cache_op_guards.h). shadow_attention's autograd is registered in shadowkv/ops.py.
TORCH_LIBRARY_IMPL(shadowkv, Autograd, m) {
  for (const char* op : {"append_kv", "paged_decode_attention", "paged_decode_attention_scores", "evict_compact"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&shadowkv::bindings::refuse_grad>());
  }
}

// Tensors with the conj/neg bit set (cache_op_guards.h: torch's fallback would corrupt memory).
TORCH_LIBRARY_IMPL(shadowkv, Conjugate, m) {
  for (const char* op : {"append_kv", "paged_decode_attention", "paged_decode_attention_scores", "evict_compact"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<
                   &shadowkv::bindings::resolve_math_bits<c10::DispatchKey::Conjugate>>());
  }
}

TORCH_LIBRARY_IMPL(shadowkv, Negative, m) {
  for (const char* op : {"append_kv", "paged_decode_attention", "paged_decode_attention_scores", "evict_compact"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<
                   &shadowkv::bindings::resolve_math_bits<c10::DispatchKey::Negative>>());
  }
}

TORCH_LIBRARY_IMPL(shadowkv, ADInplaceOrView, m) {
  for (const char* op : {"append_kv", "paged_decode_attention", "paged_decode_attention_scores", "evict_compact"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&shadowkv::bindings::bump_written_versions>());
  }
}
