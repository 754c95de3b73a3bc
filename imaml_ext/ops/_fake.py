"""Fake (meta) kernels, so torch.compile and FakeTensor tracing see the ops.

The in-place ops (the inner step, CG) return nothing: their fake kernel only has
to exist. batch_norm_relu_max_pool2d and its backward and double backward return new tensors, whose
shapes and dtypes the fake kernels give.
"""

import torch


@torch.library.register_fake("imaml_ext::prox_sgd_step_")
def _prox_sgd_step_fake(params, grads, anchors, momentum_buffers, lr, lam, momentum, lr_per_task, lam_per_task):
    return None


@torch.library.register_fake("imaml_ext::cg_init_")
def _cg_init_fake(r, scalars, status, counter, tol):
    return None


@torch.library.register_fake("imaml_ext::cg_alpha_")
def _cg_alpha_fake(r, hr, scalars, status, counter, lam, lam_per_task):
    return None


@torch.library.register_fake("imaml_ext::cg_update_")
def _cg_update_fake(x, r, p, s, hr, scalars, status, iterations, counter, lam, lam_per_task, tol):
    return None


@torch.library.register_fake("imaml_ext::batch_norm_relu_max_pool2d")
def _batch_norm_relu_max_pool2d_fake(input, weight, bias, eps):
    n, c, h, w = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    pooled = (n, c, h // 2, w // 2)
    return (input.new_empty(pooled), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc),
            input.new_empty(pooled, dtype=torch.uint8))


@torch.library.register_fake("imaml_ext::batch_norm_relu_max_pool2d_backward")
def _batch_norm_relu_max_pool2d_backward_fake(grad_out, input, weight, bias, mean, invstd, argmax):
    return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(bias)


@torch.library.register_fake("imaml_ext::batch_norm_relu_max_pool2d_double_backward")
def _batch_norm_relu_max_pool2d_double_backward_fake(grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out,
                                                      input, weight, bias, mean, invstd, argmax):
    return torch.empty_like(grad_out), torch.empty_like(input), torch.empty_like(weight)
