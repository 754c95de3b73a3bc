"""DARTS hypergradient: H^-1 ~ I, the mixed second derivative by central
differences (Liu et al., 2019), or analytically under proximal_lambda."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .utils import gradient_with_graph, meta_parameters, reduce_tasks, task_count, verify_proximal, zeros_for_none


def darts(vector: Sequence[Tensor], curr, prev) -> List[Tensor]:
    config = curr.config
    lam = config.proximal_lambda
    if lam is not None:
        if not curr.last_hypergradient_info.get(("proximal_verified", prev.name)):
            _, in_grad = gradient_with_graph(curr)
            verify_proximal(curr, prev, in_grad, lam)
        return reduce_tasks([lam * v.detach() for v in vector], task_count(curr))

    batch = getattr(curr, "task_batch", None)
    if batch is not None and batch.running:
        return _darts_per_task(vector, curr, prev, batch)
    params = meta_parameters(curr)
    prev_params = prev.trainable_parameters()
    norm = torch.sqrt(sum((v.detach().float() ** 2).sum() for v in vector))
    eps = config.darts_alpha / (norm.item() + 1e-12)

    # The probes go through .data: phi is restored bit for bit afterwards, and
    # graphs that saved phi (the upper loss's, for further paths) stay valid.
    def grad_at(shift: float) -> List[Tensor]:
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.data.add_(v.to(p.dtype), alpha=shift)
        loss = curr.loss_for_hypergradient()
        grads = torch.autograd.grad(loss, prev_params, allow_unused=True)
        return [g.detach() for g in zeros_for_none(grads, prev_params)]

    saved = [p.detach().clone() for p in params]
    try:
        grad_plus = grad_at(eps)
        grad_minus = grad_at(-2.0 * eps)
    finally:
        # phi back bit for bit as before the probes (Betty's code leaves it shifted).
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    return [(gm - gp) / (2.0 * eps) for gp, gm in zip(grad_plus, grad_minus)]


def _darts_per_task(vector: Sequence[Tensor], curr, prev, batch) -> List[Tensor]:
    """The Engine's task-batched lower problem: each task's step eps_t from its own ||v_t||,
    as the sequential engine takes it, and sum_t (g_t(phi_t - eps_t v_t) - g_t(phi_t + eps_t v_t)) / (2 eps_t)
    as two gradients of the tasks' losses weighted by 1 / (2 eps_t)."""
    params = curr.trainable_parameters()  # [T, *shape]
    prev_params = prev.trainable_parameters()
    norm = torch.sqrt(sum((v.detach().float() ** 2).flatten(1).sum(1) for v in vector))
    eps = curr.config.darts_alpha / (norm.double() + 1e-12)  # [T], in double as the sequential float

    def per_task(values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def weighted_grad_at(shift: float, sign: float) -> List[Tensor]:
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.data.add_(v.to(p.dtype) * per_task(shift * eps, p))
        losses = batch.lower_loss_vector(keep_dtype=True)
        weights = (sign / (2.0 * eps)).to(losses.dtype)
        grads = torch.autograd.grad((losses * weights).sum(), prev_params, allow_unused=True)
        return [g.detach() for g in zeros_for_none(grads, prev_params)]

    saved = [p.detach().clone() for p in params]
    try:
        grad_plus = weighted_grad_at(1.0, -1.0)
        grad_minus = weighted_grad_at(-2.0, 1.0)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    return [gm + gp for gp, gm in zip(grad_plus, grad_minus)]
