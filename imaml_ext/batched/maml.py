"""``MAML``: the batched twin of ``IMAML`` that differentiates through the unrolled inner loop.

Per task t, phi_t starts at theta *inside the graph* and takes ``inner_steps`` plain SGD
steps phi <- phi - inner_lr * grad L_support(phi) (L = mean cross-entropy, no proximal
term). The meta-gradient is the mean over tasks of d L_query(phi_t) / d theta through that
trajectory (second order), or of grad L_query(phi_t) with the inner gradients held
constant (``first_order=True``: FOMAML). This is learn2learn's ``MAML`` with every task of a
meta-batch at once. Unlike iMAML, memory grows with ``inner_steps``: the graph of every
step is kept, so the meta-step estimates its size after the first step and stops with a
``MemoryError`` before the device runs out.
"""

from __future__ import annotations

import contextlib

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import BatchedMetaLearner, MetaStepResult, _check_positive
from .memory import GraphSizeMeter, available_bytes, check_unroll_fits


class MAML(BatchedMetaLearner):
    """Batched MAML / first-order MAML for a classification ``model`` (theta).

    ``meta_step(support_x, support_y, query_x, query_y)`` takes ``[T, ...]`` batches and
    adds the meta-gradient to theta's ``.grad``; ``adapt``/``evaluate`` run the same SGD
    inner loop without a graph. ``memory_fraction``: the share of the device's free memory
    the unrolled graph may take before the step is refused. ``nonfinite``: as IMAML's, "propagate"
    or "skip" (a task whose losses or meta-gradient are not finite is left out of the mean);
    either way ``MetaStepResult.nonfinite`` names such tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 5,
        inner_lr: float = 0.4,
        first_order: bool = False,
        ways: Optional[int] = None,
        check_labels: bool = True,
        forward: str = "auto",
        memory_fraction: float = 0.9,
        tf32: Optional[bool] = None,
        nonfinite: str = "propagate",
        tuning_cache=None,
    ):
        super().__init__(model, inner_steps, inner_lr, ways, check_labels, forward, tf32, nonfinite, tuning_cache)
        if not isinstance(first_order, bool):
            raise TypeError(f"MAML: first_order must be a bool; got {type(first_order).__name__} {first_order!r}")
        _check_positive("memory_fraction", memory_fraction, owner="MAML")
        if memory_fraction > 1:
            raise ValueError(f"MAML: memory_fraction must be in (0, 1]; got {memory_fraction!r}")
        self.first_order = first_order
        self.memory_fraction = float(memory_fraction)

    def _inner_loop(self, module, support_x, support_y, steps, check):
        """SGD without the proximal term, no graph (evaluation)."""
        phi = module.expand_theta()
        if check:
            self._check_label_range(module, support_x, ("support_y", support_y))
        for _ in range(steps):
            phi = [p.requires_grad_(True) for p in phi]
            with torch.enable_grad():
                grads = torch.autograd.grad(self.task_losses(module(phi, support_x), support_y).sum(), phi)
            with torch.no_grad():
                phi = [p.detach() - self.inner_lr * g for p, g in zip(phi, grads)]
        return phi

    def _meta_gradient(self, module, support_x, support_y, query_x, query_y) -> Tuple[List[Tensor], MetaStepResult]:
        theta = module.theta()
        num_tasks = support_x.shape[0]
        with torch.enable_grad():
            # phi_0 = theta for every task, in the graph. Tasks never mix, so task t's meta-gradient is
            # its query loss's gradient at its own phi_0: per task, a non-finite one can be left out.
            phi_0 = [p.unsqueeze(0).expand(num_tasks, *p.shape) for p in theta]
            phi = phi_0
            support_losses = None
            for step in range(self.inner_steps):
                meter = GraphSizeMeter() if step == 0 and not self.first_order else None
                with meter if meter is not None else contextlib.nullcontext():
                    support_losses = self.task_losses(module(phi, support_x), support_y)
                    grads = torch.autograd.grad(support_losses.sum(), phi, create_graph=not self.first_order)
                    phi = [p - self.inner_lr * g for p, g in zip(phi, grads)]
                if meter is not None:
                    self._check_graph_fits(meter.bytes, theta[0].device, num_tasks)
            query_logits = module(phi, query_x)
            query_losses = self.task_losses(query_logits, query_y)
            task_grads = torch.autograd.grad(query_losses.sum(), phi_0)
        with torch.no_grad():
            accuracy = (query_logits.argmax(-1) == query_y).float().mean(1)
            if support_losses is None:  # zero inner steps: report the loss at theta
                support_losses = self.task_losses(module(phi, support_x), support_y)
            query_losses, support_losses = query_losses.detach(), support_losses.detach()
            bad = ~(torch.isfinite(query_losses) & torch.isfinite(support_losses))
            for g in task_grads:
                bad |= ~torch.isfinite(g).flatten(1).all(1)
            mean, reported = self._task_means(bad)
            meta_grads = [mean(g) for g in task_grads]
        result = MetaStepResult(loss=reported(query_losses), accuracy=reported(accuracy),
                                support_loss=reported(support_losses), cg=None, nonfinite=bad)
        return meta_grads, result

    def _check_graph_fits(self, step_bytes: int, device: torch.device, num_tasks: int) -> None:
        """After the first unrolled step: will ``inner_steps`` such steps fit?"""
        check_unroll_fits("MAML", f"inner steps for T = {num_tasks} tasks", self.inner_steps, step_bytes, device,
                          self.memory_fraction, "use fewer inner steps, a smaller meta-batch, first_order=True, or "
                          "iMAML (memory flat in inner steps)", available_bytes(device))


__all__ = ["MAML"]
