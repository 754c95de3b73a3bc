"""Hypergradient methods, keyed by the lower problem's ``Config.type``.

Every method maps v = dL_upper/dphi (phi = the lower problem's trainable
parameters) to dL_upper/dtheta through phi*(theta) (theta = the parent's
trainable parameters), by the implicit function theorem at the lower's
current parameters: -(d^2 L_lower / dtheta dphi) H^-1 v, H = d^2 L_lower / dphi^2.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .cg import cg
from .darts import darts
from .neumann import neumann
from .utils import meta_parameters

HYPERGRADIENTS: Dict[str, Callable] = {"cg": cg, "neumann": neumann, "darts": darts}


def get_hypergradient(name: str) -> Callable:
    try:
        return HYPERGRADIENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown hypergradient type {name!r}; valid choices are: {', '.join(sorted(HYPERGRADIENTS))}"
        ) from None


def _zeros_for_none(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> List[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def get_grads(loss: Tensor, path: list, retain_graph: bool = False) -> List[Tensor]:
    """The gradient of ``loss`` (path[0]'s) for path[0]'s parameters through
    path[1], path[2], ... (lower problems, each the child of the next): the
    chain of each hop's hypergradient."""
    params = meta_parameters(path[1])
    v = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    v = [g.detach() for g in _zeros_for_none(v, params)]
    for curr, prev in zip(path[1:-1], path[2:]):
        v = get_hypergradient(curr.config.type)(v, curr, prev)
        if prev is not path[-1]:  # v is over prev's trainable parameters; its own hop takes its meta ones
            where = {id(p): i for i, p in enumerate(prev.trainable_parameters())}
            v = [v[where[id(p)]] for p in meta_parameters(prev)]
    return v


__all__ = ["HYPERGRADIENTS", "get_hypergradient", "get_grads", "meta_parameters", "cg", "neumann", "darts"]
