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
