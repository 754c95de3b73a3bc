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

}  // namespace imaml_ext
