// Torch-facing shadow_attention forward/backward (device-generic; dispatch on q's device).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace shadowkv::bindings {

std::tuple<at::Tensor, at::Tensor> shadow_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& evicted_at,
                                                        int64_t q_offset, std::optional<double> scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> shadow_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& evicted_at, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, int64_t q_offset, std::optional<double> scale);

}  // namespace shadowkv::bindings
