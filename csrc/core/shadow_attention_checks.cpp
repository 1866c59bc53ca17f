// The parameter checks every shadow-attention kernel runs first (shadow_attention.h), one copy
// for the CPU and CUDA entry points.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "shadowkv/shadow_attention.h"

namespace shadowkv {
namespace {

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

}  // namespace

namespace {

void check_common(const ShadowAttentionParams& p, const char* fn) {
  if (p.batch < 0 || p.num_q_heads < 0 || p.num_kv_heads < 0 || p.q_len < 0 || p.kv_len < 0 || p.head_dim < 0)
    fail(fn, "negative shape");
  if (!product_fits_int64({p.batch, p.num_q_heads, p.q_len, p.head_dim}) ||
      !product_fits_int64({p.batch, p.num_kv_heads, p.kv_len, p.head_dim}))
    fail(fn, "shape too large: an element count overflows int64");
  if (p.num_kv_heads == 0 ? p.num_q_heads != 0 : p.num_q_heads % p.num_kv_heads != 0)
    fail(fn, "num_q_heads (" + std::to_string(p.num_q_heads) + ") must be a multiple of num_kv_heads (" +
                 std::to_string(p.num_kv_heads) + ")");
  if (p.q_offset < 0) fail(fn, "q_offset must be >= 0, got " + std::to_string(p.q_offset));
  if (p.q_offset > INT32_MAX - p.q_len || p.kv_len > INT32_MAX)  // q_len > INT32_MAX fails the first
    fail(fn, "q_offset + q_len (" + std::to_string(p.q_offset) + " + " + std::to_string(p.q_len) + ") and kv_len (" +
                 std::to_string(p.kv_len) + ") must fit the int32 positions of evicted_at");
  if (!valid_softmax_scale(p.scale))
    fail(fn, "scale must be positive and finite, at most FLT_MAX / log2(e) (the kernels compute in float32), got " +
                 std::to_string(p.scale));
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64 && p.dtype != DType::kBFloat16 &&
      p.dtype != DType::kFloat16)
    fail(fn, "unsupported dtype code " + std::to_string(static_cast<int>(p.dtype)));
  const bool q_rows = p.batch * p.num_q_heads * p.q_len > 0, kv_rows = p.batch * p.num_kv_heads * p.kv_len > 0;
  if (q_rows && p.head_dim > 0 && (p.q == nullptr || p.out == nullptr)) fail(fn, "q/out must not be null");
  if (q_rows && p.lse == nullptr) fail(fn, "lse must not be null");
  if (kv_rows && p.head_dim > 0 && (p.k == nullptr || p.v == nullptr)) fail(fn, "k/v must not be null");
  if (kv_rows && p.evicted_at == nullptr) fail(fn, "evicted_at must not be null");
}

}  // namespace

void check_shadow_attention_params(const ShadowAttentionParams& p, const char* fn) {
  check_common(p, fn);
  check_written_layouts(p, fn);  // out and lse (strides left at 0 wrote every row to one place)
}

void check_shadow_attention_bwd_params(const ShadowAttentionBwdParams& bp, const char* fn) {
  const ShadowAttentionParams& p = bp.fwd;
  check_common(p, fn);  // out and lse are read here: their layout is the caller's business
  if (bp.cpu_threads < 0) fail(fn, "cpu_threads must be >= 0 (0: the hardware's), got " + std::to_string(bp.cpu_threads));
  const bool q_rows = p.batch * p.num_q_heads * p.q_len > 0, kv_rows = p.batch * p.num_kv_heads * p.kv_len > 0;
  if (q_rows && p.head_dim > 0 && (bp.grad_out == nullptr || bp.grad_q == nullptr))
    fail(fn, "grad_out/grad_q must not be null");
  if (kv_rows && p.head_dim > 0 && (bp.grad_k == nullptr || bp.grad_v == nullptr))
    fail(fn, "grad_k/grad_v must not be null");
  check_written_layouts(bp, fn);
}

}  // namespace shadowkv
