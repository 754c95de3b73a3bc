"""Plain-PyTorch reference of every imaml_ext operator.

Each function here has the signature and the semantics of the operator of the
same name in ``torch.ops.imaml_ext`` (see ``csrc/imaml_ext.cpp`` for the
schemas and ``csrc/ops_math.h`` for the per-element arithmetic). It is the
specification, the oracle of the tests, and what the public wrappers run when
the compiled extension (or its CUDA kernels) is missing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# Per-task CG state layout, as in csrc/ops_math.h.
GAMMA, GAMMA_PREV, ALPHA, BETA, BNORM2 = range(5)
NUM_CG_SCALARS = 5
CONVERGED, BREAKDOWN = 1, 2


def _per_task(value: float, per_task: Optional[Tensor], like: Tensor) -> Tensor:
    """A [T] tensor of the per-task value (per_task if given, else value)."""
    if per_task is not None:
        return per_task.to(like.dtype)
    return torch.full((like.shape[0],), float(value), dtype=like.dtype, device=like.device)


def _broadcast(per_task: Tensor, like: Tensor) -> Tensor:
    """[T] -> [T, 1, ..., 1] to broadcast against a [T, *shape] tensor."""
    return per_task.reshape((-1,) + (1,) * (like.dim() - 1))


def task_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-task dot product over lists of [T, *shape] tensors: [T]."""
    total = None
    for x, y in zip(a, b):
        part = (x * y).reshape(x.shape[0], -1).sum(dim=1)
        total = part if total is None else total + part
    return total


def prox_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    anchors: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    lam: float,
    momentum: float,
    lr_per_task: Optional[Tensor],
    lam_per_task: Optional[Tensor],
) -> None:
    """phi <- phi - lr * d with d = g + lam * (phi - theta) (+ SGD momentum on d)."""
    use_momentum = len(momentum_buffers) > 0
    for i, (phi, g, theta) in enumerate(zip(params, grads, anchors)):
        lr_t = _broadcast(_per_task(lr, lr_per_task, phi), phi)
        lam_t = _broadcast(_per_task(lam, lam_per_task, phi), phi)
        d = g + lam_t * (phi - theta)
        if use_momentum:
            buf = momentum_buffers[i]
            buf.mul_(momentum).add_(d)
            d = buf
        phi.sub_(lr_t * d)


def cg_init_(r: Sequence[Tensor], scalars: Tensor, status: Tensor, counter: Tensor, tol: float) -> None:
    """State for x = 0, r = b: gamma = ||b||^2; converged where b = 0."""
    gamma = task_dot(r, r)
    scalars.zero_()
    scalars[:, GAMMA] = gamma
    scalars[:, GAMMA_PREV] = gamma
    scalars[:, BNORM2] = gamma
    finite = torch.isfinite(gamma)
    converged = finite & (gamma <= tol * tol * gamma)
    status.copy_(torch.where(finite, converged.to(status.dtype) * CONVERGED, torch.full_like(status, BREAKDOWN)))


def cg_alpha_(
    r: Sequence[Tensor],
    hr: Sequence[Tensor],
    scalars: Tensor,
    status: Tensor,
    counter: Tensor,
    lam: float,
    lam_per_task: Optional[Tensor],
) -> None:
    """Step length from r.(H r): alpha = gamma / p.(A p), A = I + H / lam."""
    inv_lam = 1.0 / _per_task(lam, lam_per_task, scalars)
    gamma = scalars[:, GAMMA]
    alpha_prev = scalars[:, ALPHA]
    first = alpha_prev == 0
    delta = gamma + task_dot(r, hr) * inv_lam
    beta = torch.where(first, torch.zeros_like(gamma), gamma / scalars[:, GAMMA_PREV])
    p_ap = torch.where(first, delta, delta - beta * gamma / alpha_prev)
    alpha = gamma / p_ap
    bad = ~(p_ap > 0) | ~torch.isfinite(p_ap) | ~torch.isfinite(alpha) | ~torch.isfinite(beta) | (alpha == 0)
    active = status == 0
    status.bitwise_or_(torch.where(active & bad, BREAKDOWN, 0).to(status.dtype))
    step = active & ~bad
    scalars[:, ALPHA] = torch.where(step, alpha, scalars[:, ALPHA])
    scalars[:, BETA] = torch.where(step, beta, scalars[:, BETA])


def cg_update_(
    x: Sequence[Tensor],
    r: Sequence[Tensor],
    p: Sequence[Tensor],
    s: Sequence[Tensor],
    hr: Sequence[Tensor],
    scalars: Tensor,
    status: Tensor,
    iterations: Tensor,
    counter: Tensor,
    lam: float,
    lam_per_task: Optional[Tensor],
    tol: float,
) -> None:
    """p = r + beta p, s = A r + beta s, x += alpha p, r -= alpha s for active tasks."""
    active = status == 0
    inv_lam = 1.0 / _per_task(lam, lam_per_task, scalars)
    alpha, beta = scalars[:, ALPHA], scalars[:, BETA]
    for xi, ri, pi, si, hi in zip(x, r, p, s, hr):
        a = _broadcast(alpha, ri)
        b = _broadcast(beta, ri)
        fresh = b == 0
        ar = ri + hi * _broadcast(inv_lam, ri)
        p_new = torch.where(fresh, ri, ri + b * pi)
        s_new = torch.where(fresh, ar, ar + b * si)
        keep = _broadcast(active, ri)
        xi.copy_(torch.where(keep, xi + a * p_new, xi))
        ri.copy_(torch.where(keep, ri - a * s_new, ri))
        pi.copy_(torch.where(keep, p_new, pi))
        si.copy_(torch.where(keep, s_new, si))
    gamma_new = task_dot(r, r)
    iterations.add_(active.to(iterations.dtype))
    scalars[:, GAMMA_PREV] = torch.where(active, scalars[:, GAMMA], scalars[:, GAMMA_PREV])
    scalars[:, GAMMA] = torch.where(active, gamma_new, scalars[:, GAMMA])
    finite = torch.isfinite(gamma_new)
    newly = torch.where(
        finite,
        torch.where(gamma_new <= tol * tol * scalars[:, BNORM2], CONVERGED, 0),
        BREAKDOWN,
    )
    status.bitwise_or_(torch.where(active, newly, 0).to(status.dtype))


# ----- BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool of stride 2, fused -----


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused BatchNorm op accumulates and keeps its statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels(v: Tensor) -> Tensor:
    """[C] -> [C, 1, 1], to broadcast against [N, C, H, W]."""
    return v[:, None, None]


def pool_windows(t: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, H // 2, W // 2, 4]: each 2x2 window's elements in row-major order (a
    last odd row or column, which no window covers, is dropped)."""
    n, c, h, w = t.shape
    ho, wo = h // 2, w // 2
    t = t[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2)
    return t.permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)


def unpool_windows(windows: Tensor, h: int, w: int) -> Tensor:
    """pool_windows' inverse: [N, C, Ho, Wo, 4] -> [N, C, h, w], zeros where no window covers."""
    n, c, ho, wo, _ = windows.shape
    t = windows.reshape(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
    return torch.nn.functional.pad(t, (0, w - 2 * wo, 0, h - 2 * ho))


def batch_statistics(x: Tensor, eps: float):
    """Each channel's mean and 1 / sqrt(biased variance + eps) over N, H, W (x in the accumulation dtype)."""
    mean = x.mean((0, 2, 3))
    var = (x - _channels(mean)).square().mean((0, 2, 3))
    return mean, 1.0 / torch.sqrt(var + eps)


def batch_norm_relu_max_pool2d(input: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """out = max over each 2x2 window (stride 2) of relu(y), y = x * scale + shift per channel,
    scale = weight * invstd, shift = bias - mean * scale, mean and invstd the channel's batch
    statistics over N, H, W. Returns (out, mean, invstd, argmax): argmax (uint8) is the window
    position 0..3 (row-major) of the first maximum, or of the last NaN, as ATen's max_pool2d."""
    acc = accumulation_dtype(input.dtype)
    x = input.to(acc)
    mean, invstd = batch_statistics(x, eps)
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - mean * scale
    windows = pool_windows(torch.relu(x * _channels(scale) + _channels(shift)))
    best, argmax = windows[..., 0], torch.zeros(windows.shape[:-1], dtype=torch.uint8, device=x.device)
    for k in range(1, 4):
        value = windows[..., k]
        take = (value > best) | torch.isnan(value)
        best = torch.where(take, value, best)
        argmax = torch.where(take, torch.full_like(argmax, k), argmax)
    return best.to(input.dtype), mean, invstd, argmax


class _Normalised:
    """A channel-wise BatchNorm's pieces in the accumulation dtype (mean's): x, w, scale and shift (y =
    x * scale + shift), xhat, y, and the element count per channel."""

    def __init__(self, input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor):
        acc = mean.dtype
        self.x, self.w, self.invstd = input.to(acc), weight.to(acc), invstd
        self.scale = self.w * invstd
        self.shift = bias.to(acc) - mean * self.scale
        self.xhat = (self.x - _channels(mean)) * _channels(invstd)
        self.y = self.x * _channels(self.scale) + _channels(self.shift)
        self.count = self.x.numel() // self.x.shape[1]


_DIMS = (0, 2, 3)


def _centred(t: Tensor, xhat: Tensor) -> Tensor:
    """t - mean(t) - xhat * mean(t * xhat) per channel: BatchNorm's input gradient of t, before the
    factor weight * invstd (and, with invstd, the tangent of xhat for a tangent t of x)."""
    return t - _channels(t.mean(_DIMS)) - xhat * _channels((t * xhat).mean(_DIMS))


def _argmax_mask(n: _Normalised, argmax: Tensor) -> Tensor:
    """1 at each window's argmax where y > 0 (where a window's gradient reaches y), else 0; full size."""
    h, w = n.x.shape[2:]
    one_hot = torch.nn.functional.one_hot(argmax.long(), 4).to(n.x.dtype)
    return unpool_windows(one_hot, h, w) * (n.y > 0)


def _to_argmax(pooled: Tensor, mask: Tensor) -> Tensor:
    """A pooled tensor's values at their windows' argmax (where the mask has them), 0 elsewhere; full size."""
    h, w = mask.shape[2:]
    return unpool_windows(pooled.to(mask.dtype).unsqueeze(-1).expand(*pooled.shape, 4), h, w) * mask


def _at_argmax(t: Tensor, argmax: Tensor) -> Tensor:
    """Each window's element of a full-size t at the window's argmax; pooled size."""
    return pool_windows(t).gather(-1, argmax.long().unsqueeze(-1)).squeeze(-1)


def batch_norm_relu_max_pool2d_jvp(input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                                   argmax: Tensor, tangent_input: Optional[Tensor], tangent_weight: Optional[Tensor],
                                   tangent_bias: Optional[Tensor]) -> Tensor:
    """The forward-mode derivative of batch_norm_relu_max_pool2d's out for tangents of input, weight and
    bias (None: zero), through the statistics' dependence on input; in input's dtype."""
    n = _Normalised(input, weight, bias, mean, invstd)
    tangent_y = torch.zeros_like(n.x)
    if tangent_input is not None:
        tangent_y = tangent_y + _channels(n.scale) * _centred(tangent_input.to(n.x.dtype), n.xhat)
    if tangent_weight is not None:
        tangent_y = tangent_y + _channels(tangent_weight.to(n.x.dtype)) * n.xhat
    if tangent_bias is not None:
        tangent_y = tangent_y + _channels(tangent_bias.to(n.x.dtype))
    return _at_argmax(tangent_y * (n.y > 0), argmax).to(input.dtype)


def batch_norm_relu_max_pool2d_backward(grad_out: Tensor, input: Tensor, weight: Tensor, bias: Tensor,
                                        mean: Tensor, invstd: Tensor, argmax: Tensor):
    """The gradients (input, weight, bias) of batch_norm_relu_max_pool2d's out for grad_out: the window's
    gradient goes to its argmax where y > 0; then training-mode BatchNorm's backward. Written in
    differentiable ops: with mean and invstd computed from input (batch_statistics) it is
    differentiable again in every argument, in reverse and forward mode."""
    n = _Normalised(input, weight, bias, mean, invstd)
    gy = _to_argmax(grad_out, _argmax_mask(n, argmax))
    grad_input = _channels(n.scale) * _centred(gy, n.xhat)
    return (grad_input.to(input.dtype), (gy * n.xhat).sum(_DIMS).to(weight.dtype),
            gy.sum(_DIMS).to(bias.dtype))


def batch_norm_relu_max_pool2d_double_backward(grad_grad_input: Tensor, grad_grad_weight: Tensor,
                                               grad_grad_bias: Tensor, grad_out: Tensor, input: Tensor,
                                               weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                                               argmax: Tensor):
    """The gradients (grad_out, input, weight) of <grad_grad_input, grad_input> + <grad_grad_weight,
    grad_weight> + <grad_grad_bias, grad_bias>, where (grad_input, grad_weight, grad_bias) =
    batch_norm_relu_max_pool2d_backward(grad_out, input, ...): the backward's own backward, through the
    statistics' dependence on input (bias and the argmax only move the masks, whose derivatives are 0).
    With mean and invstd from batch_statistics it is differentiable again. ops_math.h derives it."""
    n = _Normalised(input, weight, bias, mean, invstd)
    mask = _argmax_mask(n, argmax)
    d = _to_argmax(grad_out, mask)
    gg = grad_grad_input.to(n.x.dtype)
    mean_d, mean_d_xhat = d.mean(_DIMS), (d * n.xhat).mean(_DIMS)
    mean_gg, mean_gg_xhat = gg.mean(_DIMS), (gg * n.xhat).mean(_DIMS)
    k = (gg * d).sum(_DIMS) - n.count * (mean_d * mean_gg + mean_d_xhat * mean_gg_xhat)
    c1 = grad_grad_weight.to(n.x.dtype) - n.scale * mean_gg_xhat
    # the gradient reaching d, where d can be nonzero (an argmax with y > 0)
    e = _channels(n.scale) * gg + _channels(c1) * n.xhat + _channels(grad_grad_bias.to(n.x.dtype) - n.scale * mean_gg)
    u = _channels(c1) * d - _channels(n.scale * mean_d_xhat) * gg
    grad_input = (_channels(invstd) * _centred(u, n.xhat)
                  - _channels(n.w * k * invstd.square() / n.count) * n.xhat)
    return (_at_argmax(e * mask, argmax).to(grad_out.dtype), grad_input.to(input.dtype),
            (invstd * k).to(weight.dtype))


def batch_norm_relu_max_pool2d_backward_jvp(grad_out: Tensor, input: Tensor, weight: Tensor, bias: Tensor,
                                            mean: Tensor, invstd: Tensor, argmax: Tensor,
                                            tangent_grad_out: Optional[Tensor], tangent_input: Optional[Tensor],
                                            tangent_weight: Optional[Tensor]):
    """The forward-mode derivative of batch_norm_relu_max_pool2d_backward: the tangents of (grad_input,
    grad_weight, grad_bias) for tangents of grad_out, input and weight (None: zero; bias's is 0 almost
    everywhere), through the statistics' dependence on input."""
    n = _Normalised(input, weight, bias, mean, invstd)
    mask = _argmax_mask(n, argmax)
    d = _to_argmax(grad_out, mask)
    core = _centred(d, n.xhat)  # grad_input = scale * core
    mean_d_xhat = (d * n.xhat).mean(_DIMS)
    zero = torch.zeros_like(mean)
    dd = _to_argmax(tangent_grad_out, mask) if tangent_grad_out is not None else torch.zeros_like(n.x)
    if tangent_input is not None:
        dx = tangent_input.to(n.x.dtype)
        d_xhat = _channels(invstd) * _centred(dx, n.xhat)
        d_invstd = -invstd.square() * (n.xhat * dx).mean(_DIMS)
    else:
        d_xhat, d_invstd = torch.zeros_like(n.x), zero
    tangent_grad_bias = dd.sum(_DIMS)
    tangent_grad_weight = (dd * n.xhat + d * d_xhat).sum(_DIMS)
    d_scale = (tangent_weight.to(n.x.dtype) if tangent_weight is not None else zero) * invstd + n.w * d_invstd
    tangent_grad_input = (_channels(d_scale) * core
                          + _channels(n.scale) * (dd - _channels(dd.mean(_DIMS)) - d_xhat * _channels(mean_d_xhat)
                                                  - n.xhat * _channels(tangent_grad_weight / n.count)))
    return (tangent_grad_input.to(input.dtype), tangent_grad_weight.to(weight.dtype),
            tangent_grad_bias.to(bias.dtype))
