"""torch.optim.SGD's update for a stack of tasks' parameters ([T, *shape]), on
the fused ``prox_sgd_step_`` when its maths covers the group (no dampening, no
nesterov) and in foreach tensor maths otherwise: the same numbers as the lower
problem's own SGD stepping each task in turn."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .. import ops


class TaskSGD:
    """One SGD step for every task; momentum buffers are per task and start
    afresh with each inner loop (the batched path requires it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, module_params: Sequence[Tensor]):
        self.groups = []
        for p in module_params:
            group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                raise ValueError("task batching: a trainable parameter of the lower module is not in its optimizer")
            self.groups.append(group)
        self.buffers: List[Tensor] = []

    def reset(self, phi: Sequence[Tensor]) -> None:
        """A new inner loop: fresh momentum buffers, and the groups' rules read once (no lower
        scheduler may change them within the loop), so each step is only the updates."""
        self.by_rule = {}
        for i, group in enumerate(self.groups):
            key = (float(group["lr"]), float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)),
                   float(group.get("weight_decay", 0.0)), bool(group.get("nesterov", False)))
            self.by_rule.setdefault(key, []).append(i)
        momentum = any(key[1] for key in self.by_rule)
        self.buffers = [torch.zeros_like(p) for p in phi] if momentum else [None] * len(phi)
        # weight decay is the fused op's proximal pull towards 0: d = g + wd * (phi - 0)
        self.zeros = [torch.zeros(p.shape[1:], dtype=p.dtype, device=p.device) for p in phi]
        self._first = True

    @torch.no_grad()
    def step(self, phi: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        first, self._first = self._first, False
        for (lr, momentum, dampening, weight_decay, nesterov), index in self.by_rule.items():
            params = [phi[i] for i in index]
            grad = [grads[i] for i in index]
            buffers = [self.buffers[i] for i in index]
            if dampening == 0.0 and not nesterov:
                # buf = m * buf + d (buf starts at 0: SGD's first buf = d); phi -= lr * d
                zeros = [self.zeros[i] for i in index]
                ops.prox_sgd_step_(params, grad, zeros, lr, weight_decay, momentum, buffers if momentum else None)
                continue
            d = torch._foreach_add(grad, params, alpha=weight_decay) if weight_decay else list(grad)
            if momentum:
                if first:
                    torch._foreach_copy_(buffers, d)
                else:
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, d, alpha=1.0 - dampening)
                d = torch._foreach_add(d, buffers, alpha=momentum) if nesterov else buffers
            torch._foreach_add_(params, d, alpha=-lr)


__all__ = ["TaskSGD"]
