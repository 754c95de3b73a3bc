"""The task batcher's checks before its first batched window: the lower's training_step
vmaps, on_inner_loop_start makes the inner loops independent tasks, the tasks' batches stack,
and how many tasks a chunk may hold in memory."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from ..batched.memory import GraphSizeMeter, available_bytes
from ..batched.timing import rng_kept
from .calls import _copies, _copy_into, _first_line, _structure
from .plan import NotBatchable


class WindowChecks:
    """``TaskBatcher``'s checks (a mixin: they read the batcher's lower problem and weights)."""

    def _first_window_checks(self, tasks: List[dict]) -> None:
        """The checks of the first window. They call the lower's training_step (under vmap, and once
        to measure its graph) with the RNG states and the module's buffers put back after, so the
        run draws and normalises as if they had not run."""
        buffers = dict(self.target.named_buffers())
        saved = _copies(buffers.items())
        with rng_kept(self.device):
            try:
                self._run_first_window_checks(tasks)
            finally:
                _copy_into(buffers, saved)

    def _run_first_window_checks(self, tasks: List[dict]) -> None:
        self._check_reset(self.lower, self.module_params)
        lower = self.lower
        # The lower's training_step must be a function of its batch and weights alone: vmap says so.
        phi = [p.detach().unsqueeze(0).expand(2, *p.shape).clone() for p in self.module_params]
        pair = [tasks[0]["lower"][0][2], tasks[min(1, len(tasks) - 1)]["lower"][0][2]]
        if _structure(pair[0]) == _structure(pair[1]):
            try:
                self.task_losses(lower, phi, pair, "vmap")
            except Exception as error:  # noqa: BLE001 (any failure under vmap is the cause to report)
                raise NotBatchable(
                    f'"{lower.name}".training_step cannot run for all tasks at once under torch.func.vmap '
                    f"({_first_line(error)}): e.g. .item(), or Python control flow on a tensor's value"
                ) from None
        self._plan_memory(tasks)

    def _check_reset(self, lower, module_params: Sequence[Tensor]) -> None:
        """on_inner_loop_start must set every parameter (and leave no momentum behind), or the
        inner loops are not independent tasks: run it twice from different states and compare."""
        params = [p for p in lower.module.parameters()]
        saved = [p.detach().clone() for p in params]
        optimizer = lower.optimizer
        momentum = any(g.get("momentum", 0) for g in optimizer.param_groups) if not self.iterative else False
        saved_state = {k: dict(v) for k, v in optimizer.state.items()}
        try:
            lower.on_inner_loop_start()
            first = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn_like(p))
            if momentum:
                for p in module_params:
                    optimizer.state[p]["momentum_buffer"] = torch.ones_like(p)
            lower.on_inner_loop_start()
            moved = [n for (n, _), a, b in zip(lower.module.named_parameters(), first, params) if not torch.equal(a, b)]
            kept_buffers = momentum and any("momentum_buffer" in optimizer.state.get(p, {}) for p in module_params)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            optimizer.state.clear()
            optimizer.state.update(saved_state)
        if moved:
            raise NotBatchable(
                f'on_inner_loop_start of "{lower.name}" does not set all of its parameters ({", ".join(moved[:3])} '
                "keep the last inner loop's values), so its inner loops are not independent tasks"
            )
        if kept_buffers:
            raise NotBatchable(
                f'the SGD momentum buffers of "{lower.name}" carry from one inner loop into the next (as the '
                "sequential engine runs them); clear them in on_inner_loop_start (self.optimizer.state.clear()) "
                "to make the inner loops independent tasks"
            )

    def _check_shapes(self, tasks: List[dict]) -> None:
        def refuse(what, g, a, b):
            raise NotBatchable(
                f"the tasks' batches differ within one meta-batch: {what} of task 0 is {a}, of task {g} {b}",
                per_window=True,
            )

        steps = [len(t["lower"]) for t in tasks]
        for g, t in enumerate(tasks):
            if steps[g] != steps[0]:
                refuse("the number of inner steps", g, steps[0], steps[g])
            for k in range(steps[0]):
                a, b = _structure(tasks[0]["lower"][k][2]), _structure(t["lower"][k][2])
                if a != b:
                    refuse(f'the "{self.lower.name}" batch of inner step {k + 1}', g, a, b)
            a, b = _structure(tasks[0]["upper"][2]), _structure(t["upper"][2])
            if a != b:
                refuse(f'the "{self.upper.name}" batch', g, a, b)

    def _plan_memory(self, tasks: List[dict]) -> None:
        """Measures one task's graph and splits the window into chunks that fit."""
        n = len(tasks)
        if self.max_tasks is not None:
            self.chunk = min(self.max_tasks, n)
        else:
            phi = [p.detach().unsqueeze(0).clone().requires_grad_(True) for p in self.module_params]
            with GraphSizeMeter() as meter:
                self.task_losses(self.lower, phi, [tasks[0]["lower"][0][2]], "loop")
            # the loss graph, its gradient graph kept for the HVPs, and the upper's: about 3x
            per_task = 3 * meter.bytes + sum(4 * p.numel() * p.element_size() for p in phi)
            free = available_bytes(phi[0].device)
            fits = n if free is None else max(1, int(self.memory_fraction * free // max(per_task, 1)))
            self.chunk = min(n, fits)
            if self.chunk < n:
                self._logger.info(
                    f"task batching: the {n} tasks of a meta-step run in chunks of {self.chunk} (about "
                    f"{per_task * n / 2**30:.2f} GiB for all at once, {free / 2**30:.2f} GiB free on {phi[0].device})"
                )
        self.info.chunk = self.chunk
