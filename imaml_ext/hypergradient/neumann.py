"""Neumann-series hypergradient: H^-1 v ~ alpha sum_{k=0..K} (I - alpha H)^k v."""

from __future__ import annotations

from typing import List, Sequence

from torch import Tensor

from .utils import gradient_with_graph, hvp_fn, mixed_vjp, reduce_tasks, task_count, verify_proximal


def neumann(vector: Sequence[Tensor], curr, prev) -> List[Tensor]:
    config = curr.config
    params, in_grad = gradient_with_graph(curr)
    hvp = hvp_fn(in_grad, params)
    alpha = config.neumann_alpha
    term = [v.detach() for v in vector]
    total = list(term)
    for _ in range(config.neumann_iterations):
        hv = hvp(term)
        term = [t - alpha * h for t, h in zip(term, hv)]
        total = [s + t for s, t in zip(total, term)]
    x = [alpha * s for s in total]
    lam = config.proximal_lambda
    if lam is not None:
        verify_proximal(curr, prev, in_grad, lam)
        return reduce_tasks([lam * t for t in x], task_count(curr))
    return [-g for g in mixed_vjp(in_grad, prev.trainable_parameters(), x)]
