// Every schema of the imaml_ext operator library, and the Python module that
// loading the shared object registers them through.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

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
}
