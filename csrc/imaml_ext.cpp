// Every schema of the imaml_ext operator library, and the Python module that
// loading the shared object registers them through.
#include <Python.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "op_args.h"
#include "ops_math.h"
#include "tensor_lists.h"

extern "C" {
// `import imaml_ext._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace imaml_ext {

int64_t validate_prox_sgd_step(
    at::TensorList params, at::TensorList grads, at::TensorList anchors,
    at::TensorList momentum_buffers, double lr, double lam, double momentum,
    const c10::optional<at::Tensor>& lr_per_task,
    const c10::optional<at::Tensor>& lam_per_task) {
  constexpr const char* op = "imaml_ext.prox_sgd_step_";
  const int64_t num_tasks = check_task_list(op, "params", params);
  check_same_list(op, "grads", grads, "params", params);
  check_anchor_list(op, "anchors", anchors, "params", params);
  if (!momentum_buffers.empty()) {
    check_same_list(op, "momentum_buffers", momentum_buffers, "params", params);
  }
  check_finite_nonnegative(op, "lr", lr);
  check_finite_nonnegative(op, "lam", lam);
  check_finite_nonnegative(op, "momentum", momentum);
  TORCH_CHECK_VALUE(momentum == 0.0 || !momentum_buffers.empty(), op,
                    ": momentum_buffers must be given when momentum != 0; got momentum = ",
                    momentum, " and no buffers");
  check_per_task(op, "lr_per_task", lr_per_task, num_tasks, params[0]);
  check_per_task(op, "lam_per_task", lam_per_task, num_tasks, params[0]);
  return num_tasks;
}

namespace {

int64_t validate_cg_state(
    const char* op, at::TensorList r, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter) {
  const int64_t num_tasks = check_task_list(op, "r", r);
  const at::Tensor& like = r[0];
  int64_t numel = 0;
  for (const at::Tensor& t : r) {
    numel += t.numel();
  }
  TORCH_CHECK_VALUE(numel > 0, op, ": r must hold at least one element per task; got only empty tensors");
  check_state(op, "scalars", scalars, {num_tasks, kCgNumScalars}, like.scalar_type(), like);
  check_state(op, "status", status, {num_tasks}, at::kInt, like);
  check_state(op, "counter", counter, {1}, at::kInt, like);
  return num_tasks;
}

void validate_cg_lam(
    const char* op, double lam, const c10::optional<at::Tensor>& lam_per_task,
    int64_t num_tasks, const at::Tensor& like) {
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam > 0.0, op,
                    ": lam must be a finite number > 0; got ", lam);
  check_per_task(op, "lam_per_task", lam_per_task, num_tasks, like);
}

}  // namespace

int64_t validate_cg_init(
    at::TensorList r, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double tol) {
  constexpr const char* op = "imaml_ext.cg_init_";
  const int64_t num_tasks = validate_cg_state(op, r, scalars, status, counter);
  check_finite_nonnegative(op, "tol", tol);
  return num_tasks;
}

int64_t validate_cg_alpha(
    at::TensorList r, at::TensorList hr, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task) {
  constexpr const char* op = "imaml_ext.cg_alpha_";
  const int64_t num_tasks = validate_cg_state(op, r, scalars, status, counter);
  check_same_list(op, "hr", hr, "r", r);
  validate_cg_lam(op, lam, lam_per_task, num_tasks, r[0]);
  return num_tasks;
}

int64_t validate_cg_update(
    at::TensorList x, at::TensorList r, at::TensorList p, at::TensorList s, at::TensorList hr,
    const at::Tensor& scalars, const at::Tensor& status, const at::Tensor& iterations,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task,
    double tol) {
  constexpr const char* op = "imaml_ext.cg_update_";
  const int64_t num_tasks = validate_cg_state(op, r, scalars, status, counter);
  check_same_list(op, "x", x, "r", r);
  check_same_list(op, "p", p, "r", r);
  check_same_list(op, "s", s, "r", r);
  check_same_list(op, "hr", hr, "r", r);
  check_state(op, "iterations", iterations, {num_tasks}, at::kLong, r[0]);
  validate_cg_lam(op, lam, lam_per_task, num_tasks, r[0]);
  check_finite_nonnegative(op, "tol", tol);
  return num_tasks;
}

c10::ScalarType accumulation_dtype(c10::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  const int64_t channels = input.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, op, ": ", name,
                    " must be a [C] tensor with C = ", channels, " (input's channels); got ", describe(t));
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " must be on input's device (",
                    input.device(), "); got ", describe(t));
}

// The checks of each op that reads these arguments, naming that op.
void check_batch_norm_pool_input(
    const char* op, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const c10::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op, ": input must be float32, float64, float16 or bfloat16; got ", describe(input));
  TORCH_CHECK_VALUE(input.dim() == 4 && input.size(0) >= 1 && input.size(1) >= 1 && input.size(2) >= 2 &&
                        input.size(3) >= 2,
                    op, ": input must be [N, C, H, W] with N, C >= 1 and H, W >= 2 (one 2x2 window); got ",
                    describe(input));
  TORCH_CHECK_VALUE(input.is_contiguous(), op, ": input must be contiguous; got strides ", input.strides());
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight}, {"bias", bias}}) {
    check_channel_vector(op, name, t, input);
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || (reduced && t.scalar_type() == at::kFloat), op, ": ", name,
                     " must have input's dtype (", dtype, reduced ? ") or float32" : ")", "; got ", describe(t));
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be a finite number > 0; got ", eps);
}

void check_batch_norm_pool_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& argmax) {
  check_batch_norm_pool_input(op, input, weight, bias, 1.0);
  const std::vector<int64_t> pooled{input.size(0), input.size(1), input.size(2) / 2, input.size(3) / 2};
  TORCH_CHECK_VALUE(grad_out.sizes() == c10::IntArrayRef(pooled) && grad_out.scalar_type() == input.scalar_type() &&
                        grad_out.device() == input.device() && grad_out.is_contiguous(),
                    op, ": grad_out must be a contiguous [N, C, H / 2, W / 2] = ", c10::IntArrayRef(pooled),
                    " tensor of input's dtype and device; got ", describe(grad_out));
  TORCH_CHECK_VALUE(argmax.sizes() == c10::IntArrayRef(pooled) && argmax.scalar_type() == at::kByte &&
                        argmax.device() == input.device() && argmax.is_contiguous(),
                    op, ": argmax must be the forward's contiguous uint8 ", c10::IntArrayRef(pooled),
                    " tensor; got ", describe(argmax));
  const c10::ScalarType acc = accumulation_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"invstd", invstd}}) {
    check_channel_vector(op, name, t, input);
    TORCH_CHECK_TYPE(t.scalar_type() == acc && t.is_contiguous(), op, ": ", name,
                     " must be the forward's contiguous ", acc, " tensor; got ", describe(t));
  }
}

}  // namespace

void validate_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_batch_norm_pool_input("imaml_ext.batch_norm_relu_max_pool2d", input, weight, bias, eps);
}

void validate_batch_norm_relu_max_pool2d_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& argmax) {
  check_batch_norm_pool_backward("imaml_ext.batch_norm_relu_max_pool2d_backward", grad_out, input, weight, bias,
                                 mean, invstd, argmax);
}

void validate_batch_norm_relu_max_pool2d_double_backward(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias, const at::Tensor& grad_out, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& argmax) {
  constexpr const char* op = "imaml_ext.batch_norm_relu_max_pool2d_double_backward";
  check_batch_norm_pool_backward(op, grad_out, input, weight, bias, mean, invstd, argmax);
  TORCH_CHECK_VALUE(grad_grad_input.sizes() == input.sizes() && grad_grad_input.scalar_type() == input.scalar_type() &&
                        grad_grad_input.device() == input.device() && grad_grad_input.is_contiguous(),
                    op, ": grad_grad_input must be a contiguous tensor of input's shape ", input.sizes(),
                    ", dtype and device; got ", describe(grad_grad_input));
  using Named = std::tuple<const char*, const at::Tensor&, const char*, const at::Tensor&>;
  for (const auto& [name, t, like_name, like] : {Named{"grad_grad_weight", grad_grad_weight, "weight", weight},
                                                 Named{"grad_grad_bias", grad_grad_bias, "bias", bias}}) {
    check_channel_vector(op, name, t, input);
    TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype (",
                     like.scalar_type(), "); got ", describe(t));
  }
}

BatchNormPoolForward prepare_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  validate_batch_norm_relu_max_pool2d(input, weight, bias, eps);
  const c10::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t c = input.size(1);
  const std::vector<int64_t> pooled{input.size(0), c, input.size(2) / 2, input.size(3) / 2};
  return {at::empty(pooled, input.options()), at::empty({c}, input.options().dtype(acc)),
          at::empty({c}, input.options().dtype(acc)), at::empty(pooled, input.options().dtype(at::kByte)),
          weight.to(acc).contiguous(), bias.to(acc).contiguous()};
}

BatchNormPoolBackward prepare_batch_norm_relu_max_pool2d_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& argmax) {
  validate_batch_norm_relu_max_pool2d_backward(grad_out, input, weight, bias, mean, invstd, argmax);
  const c10::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t c = input.size(1);
  return {at::empty_like(input), at::empty({c}, input.options().dtype(acc)), at::empty({c}, input.options().dtype(acc)),
          weight.to(acc).contiguous(), bias.to(acc).contiguous()};
}

BatchNormPoolDoubleBackward prepare_batch_norm_relu_max_pool2d_double_backward(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias, const at::Tensor& grad_out, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& argmax) {
  validate_batch_norm_relu_max_pool2d_double_backward(grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out,
                                                      input, weight, bias, mean, invstd, argmax);
  const c10::ScalarType acc = accumulation_dtype(input.scalar_type());
  return {at::empty_like(grad_out), at::empty_like(input), at::empty({input.size(1)}, input.options().dtype(acc)),
          weight.to(acc).contiguous(), bias.to(acc).contiguous(), grad_grad_weight.to(acc).contiguous(),
          grad_grad_bias.to(acc).contiguous()};
}

}  // namespace imaml_ext

TORCH_LIBRARY(imaml_ext, m) {
  // phi <- phi - lr * (g + lam * (phi - theta)) for every task of every
  // tensor, with SGD momentum when momentum_buffers is non-empty.
  // lr_per_task / lam_per_task ([T]), when given, replace lr / lam.
  m.def(
      "prox_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, "
      "Tensor(b!)[] momentum_buffers, float lr, float lam, float momentum, "
      "Tensor? lr_per_task, Tensor? lam_per_task) -> ()");
  // Batched CG (see ops_math.h): cg_init_ once with r = b, then per iteration
  // hr = H r (the caller's HVP), cg_alpha_ and cg_update_.
  m.def(
      "cg_init_(Tensor[] r, Tensor(a!) scalars, Tensor(b!) status, Tensor(c!) counter, "
      "float tol) -> ()");
  m.def(
      "cg_alpha_(Tensor[] r, Tensor[] hr, Tensor(a!) scalars, Tensor(b!) status, "
      "Tensor(c!) counter, float lam, Tensor? lam_per_task) -> ()");
  m.def(
      "cg_update_(Tensor(a!)[] x, Tensor(b!)[] r, Tensor(c!)[] p, Tensor(d!)[] s, Tensor[] hr, "
      "Tensor(e!) scalars, Tensor(f!) status, Tensor(g!) iterations, Tensor(h!) counter, "
      "float lam, Tensor? lam_per_task, float tol) -> ()");
  // Training-mode BatchNorm (each channel normalised by its batch statistics,
  // nothing running updated), ReLU and a 2x2 max-pool of stride 2 in one pass,
  // on [N, C, H, W]: out [N, C, H / 2, W / 2], the channels' mean and 1 / std
  // ([C], float64 for a float64 input, else float32) and each window's argmax
  // (uint8, 0..3 in row-major order). The backward gives the gradients of
  // input, weight and bias for grad_out.
  m.def(
      "batch_norm_relu_max_pool2d(Tensor input, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor out, Tensor mean, Tensor invstd, Tensor argmax)");
  m.def(
      "batch_norm_relu_max_pool2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor invstd, Tensor argmax) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The backward's backward: for upstream gradients of (grad_input, grad_weight,
  // grad_bias), the gradients of grad_out, input (through the statistics too) and
  // weight; bias's is 0 (it only moves ReLU's mask).
  m.def(
      "batch_norm_relu_max_pool2d_double_backward(Tensor grad_grad_input, Tensor grad_grad_weight, "
      "Tensor grad_grad_bias, Tensor grad_out, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor invstd, Tensor argmax) -> (Tensor grad_grad_out, Tensor grad_input, Tensor grad_weight)");
}
