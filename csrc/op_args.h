// Argument validation of each op, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace imaml_ext {

// Returns T.
int64_t validate_prox_sgd_step(
    at::TensorList params, at::TensorList grads, at::TensorList anchors,
    at::TensorList momentum_buffers, double lr, double lam, double momentum,
    const c10::optional<at::Tensor>& lr_per_task,
    const c10::optional<at::Tensor>& lam_per_task);

// The CG state of a solve: scalars [T, kCgNumScalars] (the vectors' dtype),
// status [T] int32, iterations [T] int64 and counter [1] int32 (the
// grid-completion counter, zero between launches). Each returns T.
int64_t validate_cg_init(
    at::TensorList r, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double tol);

int64_t validate_cg_alpha(
    at::TensorList r, at::TensorList hr, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task);

int64_t validate_cg_update(
    at::TensorList x, at::TensorList r, at::TensorList p, at::TensorList s, at::TensorList hr,
    const at::Tensor& scalars, const at::Tensor& status, const at::Tensor& iterations,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task,
    double tol);

// BatchNorm -> ReLU -> 2x2 max-pool: input [N, C, H, W] (H, W >= 2) contiguous,
// float / double / half / bfloat16; weight and bias [C] of input's dtype, or
// float32 for a half or bfloat16 input; eps finite and > 0 (as F.batch_norm's
// in training).
void validate_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps);

// The forward's checks, and grad_out / argmax [N, C, H / 2, W / 2] (input's dtype,
// uint8), mean / invstd [C] of the accumulation dtype (double for double, else float).
void validate_batch_norm_relu_max_pool2d_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& argmax);

// The backward's checks, and grad_grad_input of input's shape, dtype and device
// (contiguous), grad_grad_weight and grad_grad_bias [C] of weight's and bias's dtypes.
void validate_batch_norm_relu_max_pool2d_double_backward(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias, const at::Tensor& grad_out, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& argmax);

// double for a double input, float otherwise.
c10::ScalarType accumulation_dtype(c10::ScalarType input);

// The forward's and the backward's checks, and the tensors both backends fill: the
// outputs, and weight and bias in the accumulation dtype.
struct BatchNormPoolForward {
  at::Tensor out, mean, invstd, argmax, weight, bias;
};
BatchNormPoolForward prepare_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps);

struct BatchNormPoolBackward {
  at::Tensor grad_input, grad_weight, grad_bias, weight, bias;
};
BatchNormPoolBackward prepare_batch_norm_relu_max_pool2d_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& argmax);

struct BatchNormPoolDoubleBackward {
  at::Tensor grad_grad_out, grad_input, grad_weight, weight, bias, grad_grad_weight, grad_grad_bias;
};
BatchNormPoolDoubleBackward prepare_batch_norm_relu_max_pool2d_double_backward(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias, const at::Tensor& grad_out, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& argmax);

}  // namespace imaml_ext
