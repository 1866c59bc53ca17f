// Torch-facing paged KV cache ops (CPU kernels, CUDA twins in csrc/cuda/ where built).
// Shapes and semantics: csrc/include/shadowkv/paged_kv.h and shadowkv/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace shadowkv::bindings {

void append_kv(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
               const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& positions, const at::Tensor& num_new, bool check);

// Two ops, one kernel: without and with the per-slot scores. Why not one op with an optional
// `Tensor(a!)? scores_out`: torch.compile's inductor cannot lower a custom op whose only
// mutable argument is None (torch 2.14: "getitem is not an OpOverload"), i.e. the plain decode
// call, while an op without mutable arguments compiles as any functional op.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  std::optional<double> scale, bool check);
at::Tensor paged_decode_attention_scores(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         std::optional<double> scale, const at::Tensor& scores_out, bool check);

at::Tensor evict_compact(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& keep,
                         const at::Tensor& steps, const at::Tensor& evicted_at,
                         const std::optional<at::Tensor>& slot_scores, bool check, bool stable);

}  // namespace shadowkv::bindings
