#include "cache_op_guards.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

namespace shadowkv::bindings {
namespace {

bool written(const c10::Argument& a) { return a.alias_info() != nullptr && a.alias_info()->isWrite(); }

// f(argument, tensor) for every defined tensor argument of the call on `stack` (the op's
// arguments are its last entries).
template <class F>
void for_each_tensor(const c10::OperatorHandle& op, const torch::jit::Stack* stack, F&& f) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor() && value.toTensor().defined()) f(args[i], value.toTensor());
  }
}

}  // namespace

void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const std::string& full = op.schema().name();  // "shadowkv::append_kv"
    const std::string name = full.substr(full.rfind(':') + 1);
    for_each_tensor(op, stack, [&](const c10::Argument& a, const at::Tensor& t) {
      TORCH_CHECK_VALUE(!t.requires_grad() || !written(a), "shadowkv: `", a.name(), "` requires grad, and ", name,
                        " writes it in place (cache tensors are not differentiable); call it under "
                        "torch.no_grad() or pass a tensor that does not require grad");
      TORCH_CHECK_VALUE(!t.requires_grad(), "shadowkv: ", name, " is not differentiable, and `", a.name(),
                        "` requires grad (no gradient would reach it); call it under torch.no_grad() or pass `",
                        a.name(), "`.detach()");
    });
  }
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

template <c10::DispatchKey key>
void resolve_math_bits(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    c10::IValue& value = (*stack)[first + i];
    if (!value.isTensor()) continue;
    const at::Tensor& t = value.toTensor();
    if (!t.defined() || !(t.is_neg() || t.is_conj())) continue;
    TORCH_CHECK_VALUE(!written(args[i]), "shadowkv: `", args[i].name(), "` is written in place, so it cannot be a ",
                      t.is_neg() ? "negated" : "conjugated", " view (its ", t.is_neg() ? "neg" : "conj",
                      " bit is set, e.g. x.conj().imag); pass a materialized tensor (.resolve_neg() / .resolve_conj())");
    value = t.resolve_conj().resolve_neg();
  }
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, key), stack);
}

template void resolve_math_bits<c10::DispatchKey::Conjugate>(const c10::OperatorHandle&, c10::DispatchKeySet,
                                                             torch::jit::Stack*);
template void resolve_math_bits<c10::DispatchKey::Negative>(const c10::OperatorHandle&, c10::DispatchKeySet,
                                                            torch::jit::Stack*);

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  for_each_tensor(op, stack, [](const c10::Argument& a, const at::Tensor& t) {
    if (written(a)) t.unsafeGetTensorImpl()->bump_version();
  });
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace shadowkv::bindings
