// Calling our ops from C++ through the dispatcher (so that autograd, tracing and every backend see the call), and
// the bookkeeping shared by the C++ autograd Functions of csrc/ops/*/<op>_autograd.cpp.
//
// Why the autograd is C++ (torch::autograd::Function registered at the Autograd key) rather than
// torch.library.register_autograd: a Python autograd kernel costs tens of µs of host time per call and more per
// backward (a conv1d forward+backward of a tiny layer: 252 µs with it, 150 µs without, F.conv1d 145 µs), more than
// the kernels of a small layer take on a GPU.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace pyops {

// The typed handle of op `name` ("pyops::conv1d"); look it up once, e.g. `static const auto op = find_op<Sig>(...)`.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// torch::autograd::Function gives an input edge only to the tensor arguments that are defined, so
// ctx->needs_input_grad(i) counts those, not argument positions. InputEdges maps one to the other: saved from
// "is this tensor argument defined", in argument order, it answers needs(k) for the k-th tensor argument (false for
// an absent optional one).
class InputEdges {
 public:
  static void save(torch::autograd::AutogradContext* ctx, std::initializer_list<bool> defined) {
    int64_t mask = 0, bit = 0;
    for (bool d : defined) mask |= static_cast<int64_t>(d) << bit++;
    ctx->saved_data["pyops_defined_inputs"] = mask;
  }
  explicit InputEdges(torch::autograd::AutogradContext* ctx)
      : ctx_(ctx), mask_(ctx->saved_data["pyops_defined_inputs"].toInt()) {}
  bool needs(int tensor_arg) const {
    if (!((mask_ >> tensor_arg) & 1)) return false;
    const int64_t below = mask_ & ((int64_t{1} << tensor_arg) - 1);
    return ctx_->needs_input_grad(static_cast<size_t>(__builtin_popcountll(static_cast<uint64_t>(below))));
  }

 private:
  torch::autograd::AutogradContext* ctx_;
  int64_t mask_;
};

inline bool is_defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether autograd has anything to do with a call taking these tensor arguments: grad mode on and one of them
// requiring grad, or one of them carrying a forward-mode tangent (which must reach the op's derivative, where skipping
// it would drop the tangent silently).
inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && has_tangent(*t); }
inline bool autograd_sees(const at::Tensor& t, bool grad_mode) {
  return (grad_mode && t.defined() && t.requires_grad()) || has_tangent(t);
}
inline bool autograd_sees(const std::optional<at::Tensor>& t, bool grad_mode) {
  return t.has_value() && autograd_sees(*t, grad_mode);
}
// For the inference-only ops (no backward): refuses a call autograd would have to record, naming the argument
// (its element [index] where index >= 0), instead of returning a result cut off from the graph. The message is
// built only on failure.
inline void check_not_recorded(const at::Tensor& t, const char* op, const char* name, int64_t index, bool grad_mode) {
  TORCH_CHECK_NOT_IMPLEMENTED(!autograd_sees(t, grad_mode), op, " is inference only (no backward), but argument '",
                              name, index < 0 ? std::string() : "[" + std::to_string(index) + "]",
                              "' requires grad (or carries a forward-mode tangent): call it under torch.no_grad() ",
                              "or pass detached tensors");
}
inline void check_not_recorded(const std::optional<at::Tensor>& t, const char* op, const char* name, bool grad_mode) {
  if (t.has_value()) check_not_recorded(*t, op, name, -1, grad_mode);
}

template <typename... Tensors>
bool needs_autograd(const Tensors&... tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  return (autograd_sees(tensors, grad_mode) || ...);
}

// Where a call that autograd sees cannot go through a C++ autograd Function: inside torch.func transforms (grad, vjp,
// jacrev, jvp, vmap of grad: PyTorch refuses C++ Functions there) or with a forward-mode tangent (the Functions have
// no jvp). The Autograd kernels of the forward ops then compute the op as its composite of ATen ops (each op's
// `*_composite`, the same math; functorch and forward AD differentiate ATen's ops); our backward kernels are not used.
template <typename... Tensors>
bool needs_composite(const Tensors&... tensors) {
  // functorch includes its back-mode key in the thread's dispatch keys while any transform is active
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode) ||
         (has_tangent(tensors) || ...);
}

// call(args...) below the autograd keys, i.e. an op's backend kernel. An Autograd kernel takes this where
// needs_autograd is false (inference; every backward op called by a backward without create_graph): a Function's
// node, saved state and output wrapping are host time that no gradient needs.
template <typename Call, typename... Args>
auto below_autograd(Call&& call, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return call(std::forward<Args>(args)...);
}

}  // namespace pyops
