"""Task batching of sibling lower problems: Betty 0.1.1's implicit-MAML layout.

T lower problems of one class under one upper, each one task: its own module,
optimizer and inner loop, reading its slice of one batch
(``idx = self.outer.children.index(self)``). The Engine records their steps, then
runs the window at once:

- every sibling's ``on_inner_loop_start`` sets its start; the T starts are
  stacked into [T, *shape];
- each inner step runs each sibling's own ``training_step`` with its slice of
  the stack (``functional_call`` on that sibling's module, so its index, its
  module's running statistics and ``self.parameters()`` keep their meaning),
  and one SGD update steps all T;
- the upper's ``training_step`` runs once, with every sibling's module holding
  its slice, and its ``backward`` takes the T hypergradients as one (cg with
  per-task scalars, darts with per-task steps, neumann);
- then each sibling keeps its own adapted weights, and the upper steps, as the
  sequential engine leaves them.

The training steps run in a Python loop over the siblings: a sibling's step
reads its own index, which one vmapped function cannot.
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .plan import NotBatchable, TaskBatchingInfo
from ..batched import forwards
from .calls import _Call, _plain, _structure, log_as_of, record_step
from .runner import TaskBatcher


class SiblingBatcher(TaskBatcher):
    """The Engine's task-batched execution of T sibling lower problems under one upper."""

    def __init__(self, engine, upper, lowers, info: TaskBatchingInfo, forward: str, max_tasks: Optional[int]):
        super().__init__(engine, upper, lowers[0], info, "loop", max_tasks)
        self.lowers = list(lowers)
        self._slot = {id(p): g for g, p in enumerate(self.lowers)}
        self.targets = [lower.module for lower in self.lowers]
        self.sibling_params = [[p for p in m.parameters() if p.requires_grad] for m in self.targets]
        self._all = nn.ModuleList(self.targets)  # the upper's training_step sees every sibling's module
        self.window: List[tuple] = []  # (sibling, global step, count, batch) in the sequential order
        if forward.endswith(forwards.FUSED):
            info.forward = "loop, unfused (the siblings' path runs each sibling's own module as it is)"
        elif forward != forwards.AUTO and forwards.parse(forward).forward.vmapped:
            info.forward = "loop (each sibling's training_step reads its own index, so it runs as its own call)"
        info.upper_forward = "one call (the upper's training_step reads every sibling)"

    # ----- recording -----
    def records(self, problem) -> bool:
        return id(problem) in self._slot

    def task_problem(self, g: int):
        return self.lowers[g]

    def lower_step(self, global_step: Optional[int], problem=None) -> None:
        upper = self.upper
        if self._runs_as_written(problem, global_step):
            return
        count = record_step(problem, global_step)
        self.window.append((self._slot[id(problem)], global_step, count, problem.get_batch()))
        if problem.schedule.loop_half_run():
            return
        problem.schedule.end_inner_loop()
        upper.schedule.mark_ready(upper.children.index(problem))
        if not upper.check_ready():
            return
        count = upper.begin_local_step(global_step)
        window, self.window = self.window, []
        self._run_window(window, (global_step, count, upper.get_batch()))

    def flush(self) -> None:
        window, self.window = self.window, []
        if window:
            self._replay_window(window, None)
        self.finishing_loop = self._loop_half_run()

    def _loop_half_run(self) -> bool:
        return any(s.schedule.loop_half_run() for s in self.lowers)

    def _replay_window(self, window: List[tuple], upper_step: Optional[tuple]) -> None:
        """The recorded steps, run one by one by the sequential engine."""
        upper = self.upper
        for g, *_ in window:
            self.lowers[g].schedule.rewind(1)
        upper.schedule.reset_ready(len(upper.children))
        if upper_step is not None:
            upper.schedule.rewind(1)
        with upper.feeding(upper_step[2]) if upper_step is not None else contextlib.nullcontext():
            for g, global_step, _, batch in window:
                with self.lowers[g].feeding(batch):
                    self.lowers[g].step_normal(global_step=global_step)

    # ----- one window -----
    def _run_window(self, window: List[tuple], upper_step: tuple) -> None:
        tasks = [{"lower": []} for _ in self.lowers]
        for g, global_step, count, batch in window:
            tasks[g]["lower"].append((global_step, count, batch))
        try:
            if not self.checked:
                for lower, params in zip(self.lowers, self.sibling_params):
                    self._check_reset(lower, params)
                self._plan_memory(tasks)
                if self.chunk < len(tasks):
                    raise NotBatchable(
                        f"the {len(tasks)} siblings' graphs do not fit in memory at once (about {self.chunk} "
                        "would), and the upper's training_step reads all of them in one call"
                    )
                self.checked = True
            self._check_sibling_shapes(tasks)
        except NotBatchable as cause:
            self._refuse(cause, lambda: self._replay_window(window, upper_step))
            return
        upper_stats = self._run_siblings(tasks, upper_step)
        self._log_lower(window, tasks)
        self._upper_steps([(*upper_step, upper_stats)])

    def _check_sibling_shapes(self, tasks: List[dict]) -> None:
        first = tasks[0]["lower"]
        for g, task in enumerate(tasks[1:], start=1):
            if len(task["lower"]) != len(first):
                raise NotBatchable(
                    f'the sibling "{self.lowers[g].name}" took {len(task["lower"])} inner steps this meta-step, '
                    f'"{self.lowers[0].name}" {len(first)}', per_window=True)
            for k, ((_, _, a), (_, _, b)) in enumerate(zip(first, task["lower"])):
                if _structure(a) != _structure(b):
                    raise NotBatchable(
                        f'the batches of the siblings "{self.lowers[0].name}" and "{self.lowers[g].name}" differ at '
                        f"inner step {k + 1}: {_structure(a)} against {_structure(b)}", per_window=True)

    def _run_siblings(self, tasks: List[dict], upper_step: tuple) -> dict:
        lower, upper = self.lower, self.upper
        for sibling in self.lowers:
            sibling.on_inner_loop_start()
        self.phi = [torch.stack([params[i].detach() for params in self.sibling_params]).requires_grad_(True)
                    for i in range(len(self.module_params))]
        self.sgd.reset(self.phi)
        lower.task_batch = self
        try:
            lower_losses = []
            for k in range(len(tasks[0]["lower"])):
                losses, metrics = self._sgd_step([t["lower"][k][2] for t in tasks])
                lower_losses.append((losses, metrics))
            self.last_batches = [t["lower"][-1][2] for t in tasks]
            self._lower_stats(tasks, lower_losses)

            global_step, count, batch = upper_step
            loss, metrics = self._upper_loss(batch)
            value = loss.item()
            if value != value or value in (float("inf"), float("-inf")):
                raise FloatingPointError(
                    f'problem "{upper.name}": training_step returned a non-finite loss ({value}) at local step '
                    f"{count} (global step {global_step}; the batched siblings' meta-step)"
                )
            # The T paths upper -> sibling -> upper as one, through the stacked weights.
            with upper.using_paths([[upper, lower, upper]]):
                upper.backward(loss / upper.gas)
            return {"loss": value, **_plain(metrics)}
        finally:
            self._leave_siblings(tasks)

    def _upper_loss(self, batch: Any):
        upper = self.upper
        weights = {f"module.{g}.{name}": task for name, p in zip(self.names, self.phi) for g, task in enumerate(p.unbind(0))}
        call = _Call(self._all, lambda b: upper.parse_loss(upper.training_step_exec(b)))
        self.in_task_call = True
        try:
            return functional_call(call, weights, (batch,))
        finally:
            self.in_task_call = False

    def call_task(self, problem, g: int, weights: Sequence[Tensor], batch: Any):
        """Sibling g's own training_step, its module holding ``weights`` (``problem`` is the representative)."""
        sibling = self.lowers[g]
        call = _Call(self.targets[g], lambda b: sibling.parse_loss(sibling.training_step_exec(b)))
        return functional_call(call, dict(zip(self.keys, weights)), (batch,))

    def _leave_siblings(self, tasks: List[dict]) -> None:
        """Each sibling holds its own adapted weights (and momentum), as after the sequential engine."""
        phi, self.phi = self.phi, None
        self.lower.task_batch = None
        momentum = any(group.get("momentum", 0) for group in self.lower.optimizer.param_groups)
        with torch.no_grad():
            for g, (sibling, params) in enumerate(zip(self.lowers, self.sibling_params)):
                sibling.cur_batch = tasks[g]["lower"][-1][2]
                for p, w in zip(params, phi):
                    p.copy_(w[g])
                if momentum:
                    for p, buf in zip(params, self.sgd.buffers):
                        sibling.optimizer.state[p]["momentum_buffer"] = buf[g].clone()

    def _log_lower(self, window: List[tuple], tasks: List[dict]) -> None:
        """The siblings' logs in the order the sequential engine writes them."""
        if self.lower.config.log_step <= 0:
            return
        step_of = [0] * len(self.lowers)
        for g, global_step, count, _ in window:
            stats = tasks[g]["lower_stats"][step_of[g]]
            step_of[g] += 1
            log_as_of(self.lowers[g], stats, global_step, count)


__all__ = ["SiblingBatcher"]
