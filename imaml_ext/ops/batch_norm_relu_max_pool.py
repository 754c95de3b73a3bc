"""``batch_norm_relu_max_pool2d``: training-mode BatchNorm, ReLU and a 2x2 max-pool of stride 2 in
one op (the block of Conv4 after each convolution), differentiable to any order.

The compiled kernels (``torch.ops.imaml_ext``, CPU and CUDA) run the forward and the first-order
backward, reading the input twice for its statistics and once for the pooled output, where the
three layers apart write and read back two full-size activations and keep their own saved copies.
A backward that will itself be differentiated (``create_graph``: iMAML's double-backward HVP, MAML's
second-order step) runs ATen's max-pool and BatchNorm backward ops instead, whose own derivatives
ATen has; forward-mode derivatives (``torch.func.jvp``) are written out in ``jvp``.
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
        out, mean, invstd, argmax = output
        ctx.mark_non_differentiable(mean, invstd, argmax)
        ctx.save_for_backward(input, weight, bias, out, mean, invstd, argmax)
        ctx.save_for_forward(input, weight, bias, out, mean, invstd, argmax)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_out, _mean, _invstd, _argmax):
        input, weight, bias, out, mean, invstd, argmax = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_differentiable_backward(grad_out, input, weight, out, mean, invstd, argmax, ctx.eps), None)
        grads = _backend(input.device).batch_norm_relu_max_pool2d_backward(
            grad_out.contiguous(), input, weight, bias, mean, invstd, argmax)
        return (*grads, None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _eps):
        input, weight, bias, _, mean, invstd, argmax = ctx.saved_tensors
        acc = mean.dtype
        x = input.to(acc)
        scale = weight.to(acc) * invstd
        y = x * scale[:, None, None] + (bias.to(acc) - mean * scale)[:, None, None]
        xhat = (x - mean[:, None, None]) * invstd[:, None, None]
        d_y = torch.zeros_like(x)
        if d_input is not None:
            dx = d_input.to(acc)
            d_xhat = invstd[:, None, None] * (dx - dx.mean((0, 2, 3))[:, None, None]
                                              - xhat * (dx * xhat).mean((0, 2, 3))[:, None, None])
            d_y = d_y + weight.to(acc)[:, None, None] * d_xhat
        if d_weight is not None:
            d_y = d_y + d_weight.to(acc)[:, None, None] * xhat
        if d_bias is not None:
            d_y = d_y + d_bias.to(acc)[:, None, None]
        windows = reference.pool_windows(d_y * (y > 0))
        d_out = windows.gather(-1, argmax.long().unsqueeze(-1)).squeeze(-1).to(input.dtype)
        return d_out, None, None, None


def _differentiable_backward(grad_out, input, weight, out, mean, invstd, argmax, eps):
    """The backward under create_graph (a backward that is differentiated again: iMAML's HVPs, MAML's
    second-order step) as ATen's ops, whose own derivatives, reverse and forward, ATen has: the window's
    gradient goes to its argmax where the output is > 0 (there ReLU's input is > 0), then training-mode
    BatchNorm's backward, whose double backward accounts for the statistics' dependence on input. The
    graph is then the one the three layers apart would build, without ReLU's full-size step."""
    n, c, h, w = input.shape
    ho, wo = h // 2, w // 2
    device = input.device
    corners = 2 * torch.arange(ho, device=device)[:, None] * w + 2 * torch.arange(wo, device=device)
    # window position k = 0..3 is (k // 2) rows and k % 2 columns from the corner; built on the device
    # (no host-to-device copy, which a CUDA-graph capture forbids)
    positions = torch.arange(4, device=device)
    offsets = (positions // 2) * w + positions % 2
    indices = corners + offsets[argmax.long()]  # each window's argmax as an index into its [H, W] plane
    grad_pooled = torch.where(out > 0, grad_out, 0)
    grad_relu = torch.ops.aten.max_pool2d_with_indices_backward(grad_pooled, input, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                 False, indices)
    acc = mean.dtype
    grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_relu, input, weight, None, None, mean.to(acc), invstd.to(acc), True, eps, [True, True, True])
    return grad_input, grad_weight, grad_bias


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
