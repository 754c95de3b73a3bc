"""``batch_norm_relu_max_pool2d``: training-mode BatchNorm, ReLU and a 2x2 max-pool of stride 2 in
one op (the block of Conv4 after each convolution), differentiable to any order.

The compiled kernels (``torch.ops.imaml_ext``, CPU and CUDA) run the forward, the first-order
backward and that backward's own backward (the second order of iMAML's double-backward HVPs and of
MAML's second-order step), each in one or two reads of the input, where the three layers apart
write and read back full-size activations and ATen's BatchNorm double backward runs some twenty
full-size elementwise ops. Forward-mode derivatives (``torch.func.jvp``: the forward op's and the
backward's, for forward-over-reverse HVPs) and third and higher orders are written out in
``reference``'s differentiable ops.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _extension, reference
from ._checks import describe

_OP = "imaml_ext.ops.batch_norm_relu_max_pool2d"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _backend(device: torch.device):
    return torch.ops.imaml_ext if _extension.use_compiled(device) else reference


def check_inputs(input: object, weight: object, bias: object, eps: object) -> None:
    """The compiled op's checks, in Python, so that every backend rejects the same inputs with the same words."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{_OP}: input must be a tensor; got {describe(input)}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: input must be float32, float64, float16 or bfloat16; got {describe(input)}")
    if input.dim() != 4 or min(input.shape[:2]) < 1 or min(input.shape[2:]) < 2:
        raise ValueError(f"{_OP}: input must be [N, C, H, W] with N, C >= 1 and H, W >= 2 (one 2x2 window); "
                         f"got {describe(input)}")
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor; got {describe(t)}")
        if t.shape != input.shape[1:2] or t.device != input.device:
            raise ValueError(f"{_OP}: {name} must be a [C] tensor with C = {input.shape[1]} (input's channels) on "
                             f"input's device ({input.device}); got {describe(t)}")
        if t.dtype != input.dtype and not (reduced and t.dtype == torch.float32):
            expected = f"{input.dtype} or torch.float32" if reduced else str(input.dtype)
            raise TypeError(f"{_OP}: {name} must have input's dtype ({expected}); got {describe(t)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{_OP}: eps must be a finite number > 0; got {eps!r}")


class _BatchNormReLUMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(input, weight, bias, eps):
        return _backend(input.device).batch_norm_relu_max_pool2d(input, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, eps = inputs
        _, mean, invstd, argmax = output
        ctx.mark_non_differentiable(mean, invstd, argmax)
        ctx.save_for_backward(input, weight, bias, mean, invstd, argmax)
        ctx.save_for_forward(input, weight, bias, mean, invstd, argmax)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_out, _mean, _invstd, _argmax):
        args = (grad_out.contiguous(), *ctx.saved_tensors)
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated again
            grads = _BatchNormReLUMaxPool2dBackward.apply(*args, ctx.eps)
        else:
            grads = _backend(grad_out.device).batch_norm_relu_max_pool2d_backward(*args)
        return (*grads, None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _eps):
        return reference.batch_norm_relu_max_pool2d_jvp(*ctx.saved_tensors, d_input, d_weight, d_bias), None, None, None


class _BatchNormReLUMaxPool2dBackward(torch.autograd.Function):
    """The first-order backward as a function of (grad_out, input, weight, bias), differentiable: its
    backward is the compiled double backward (reverse HVPs, MAML's second order), its jvp forward-mode
    (forward-over-reverse HVPs). The argmax and ReLU's mask are piecewise constant in the inputs: their
    derivatives are 0 almost everywhere, as ATen's max-pool and ReLU take them."""

    @staticmethod
    def forward(grad_out, input, weight, bias, mean, invstd, argmax, eps):
        return _backend(input.device).batch_norm_relu_max_pool2d_backward(
            grad_out, input, weight, bias, mean, invstd, argmax)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, input, weight, bias, mean, invstd, argmax, eps = inputs
        ctx.save_for_backward(grad_out, input, weight, bias, mean, invstd, argmax)
        ctx.save_for_forward(grad_out, input, weight, bias, mean, invstd, argmax)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
        grad_out, input, weight, bias, mean, invstd, argmax = ctx.saved_tensors
        grads = (grad_grad_input.contiguous(), grad_grad_weight, grad_grad_bias)
        if torch.is_grad_enabled():
            # a third order: the reference's formulas, with the statistics recomputed from input in
            # differentiable ops, so that their dependence on input is differentiated too
            mean, invstd = reference.batch_statistics(input.to(mean.dtype), ctx.eps)
            result = reference.batch_norm_relu_max_pool2d_double_backward(
                *grads, grad_out, input, weight, bias, mean, invstd, argmax)
        else:
            result = _backend(input.device).batch_norm_relu_max_pool2d_double_backward(
                *grads, grad_out, input, weight, bias, mean, invstd, argmax)
        return (*result, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_grad_out, d_input, d_weight, _d_bias, _mean, _invstd, _argmax, _eps):
        grad_out, input, weight, bias, mean, invstd, argmax = ctx.saved_tensors
        return reference.batch_norm_relu_max_pool2d_backward_jvp(
            grad_out, input, weight, bias, mean, invstd, argmax, d_grad_out, d_input, d_weight)


def batch_norm_relu_max_pool2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                               eps: float = 1e-5) -> Tensor:
    """``F.max_pool2d(F.relu(F.batch_norm(input, None, None, weight, bias, training=True, eps=eps)), 2)``
    in one op: input [N, C, H, W] (H, W >= 2), weight and bias [C] (None: 1 and 0) -> [N, C, H // 2, W // 2].
    A window's maximum is the first one in row-major order, as ATen's."""
    if isinstance(input, Tensor) and input.dim() >= 2:
        channels, dtype = input.shape[1], torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        if weight is None:
            weight = torch.ones(channels, dtype=dtype, device=input.device)
        if bias is None:
            bias = torch.zeros(channels, dtype=dtype, device=input.device)
    check_inputs(input, weight, bias, eps)
    out, _, _, _ = _BatchNormReLUMaxPool2d.apply(input.contiguous(), weight, bias, float(eps))
    return out
