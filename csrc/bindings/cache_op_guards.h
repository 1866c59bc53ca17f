// Autograd-side kernels of the paged cache ops (append_kv, paged_decode_attention,
// evict_compact), registered in torch_bindings.cpp. The ops write their caches in place and
// have no derivative; without these, torch's fallback lets a call in grad mode drop gradients
// with a warning at most, and leaves version counters alone, so autograd would silently use
// values the op overwrote.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace shadowkv::bindings {

// Autograd key: with grad mode on, an argument that requires grad is a ValueError naming it
// (a written one: "writes it in place"; any other: "not differentiable"); then redispatches.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

// ADInplaceOrView key: bumps the version counter of every tensor the schema marks as written
// (Tensor(a!)), as torch's own in-place ops do, then redispatches.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

// Conjugate and Negative keys (a tensor with its conj or neg bit set: x.conj().imag is a neg view
// of a real tensor). torch's math-bit fallback assumes an in-place op returns its written
// argument first; for these ops (returning () or a new tensor) it reads past the stack and
// corrupts reference counts (an INTERNAL ASSERT, then an abort at exit). Instead: a written
// argument with a bit set is a ValueError naming it; read-only ones are resolved (copied), as
// the fallback does; then redispatches past `key`.
template <c10::DispatchKey key>
void resolve_math_bits(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

}  // namespace shadowkv::bindings
