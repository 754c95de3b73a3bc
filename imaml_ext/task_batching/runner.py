"""Runs the G inner loops of a meta-step as one batch, from the user's own code.

While the Engine steps as written (the user's ``train_step``, ``Env.step``,
``get_batch``), the lower problem's steps are only recorded: its batch, the
global step and the counters, as the sequential engine would leave them. When
the upper problem's accumulation window closes, the window runs at once:

- the lower's ``on_inner_loop_start`` sets the start, copied into [G, *shape];
- each inner step runs the user's ``training_step`` for every task with that
  task's weights (``functional_call``, under ``vmap`` or in a loop over tasks),
  so ``self.module(x)`` and ``self.parameters()`` keep their per-task meaning;
  the per-task gradients step all tasks in one SGD update;
- the upper's ``training_step`` runs the same way on the adapted weights, and its
  ``backward`` applies the lower's hypergradient (cg, neumann, darts) to all
  tasks at once, with per-task CG scalars;
- then the upper's optimizer, scheduler, callbacks and logs, task by task, as the
  sequential engine orders them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from ..batched import forwards
from ..batched.choice import Chooser, NoCandidateRan, choose, timer, tuning_cache
from ..batched.module import AutocastConvolutions, count_fusable_runs, fused_in_place
from ..logging import get_logger
from ..problems.hooks import call_hook
from .calls import (_Call, _copies, _copy_into, _first_line, _plain, _stack, _stack_dims, _tensors, log_as_of,
                    record_step)
from .checks import WindowChecks
from .plan import NotBatchable, TaskBatchingInfo
from .sgd import TaskSGD


class TaskBatcher(WindowChecks):
    """The Engine's task-batched execution of one upper and one lower problem."""

    # the share of the free memory a chunk of tasks may plan to take
    memory_fraction = 0.8

    def __init__(self, engine, upper, lower, info: TaskBatchingInfo, forward: str, max_tasks: Optional[int]):
        from ..problems.iterative_problem import IterativeProblem

        self.engine, self.upper, self.lower, self.info = engine, upper, lower, info
        self.iterative = isinstance(lower, IterativeProblem)
        self.target = lower.functional_module
        self.names = [n for n, p in self.target.named_parameters() if p.requires_grad]
        self.module_params = [p for p in self.target.parameters() if p.requires_grad]
        self.keys = [f"module.{n}" for n in self.names]
        self.sgd = None if self.iterative else TaskSGD(lower.optimizer, self.module_params)
        device = torch.device(engine.device if lower.device is None else lower.device)
        # "auto": none wins everywhere (grouped convolutions beat per-task ones for small task batches, not
        # for large), so the first meta-step times what forwards.auto_plans lists (_measured_gradients), with
        # no chunks (a window's tasks run whole or in max_tasks chunks).
        self.device = device
        self.fusable = count_fusable_runs(self.target) > 0
        self.auto_plans = [p.label for p in forwards.auto_plans(device.type, self.fusable, 0, chunks=False)]
        self.measure = forward == forwards.AUTO and bool(self.auto_plans) and not self.iterative
        self.chooser = Chooser("forward", cache=tuning_cache())
        if forward.endswith(forwards.FUSED) and not self.fusable:
            warnings.warn(f"task batching: forward {forward!r}: the lower's module ({type(self.target).__name__}) has no "
                          "nn.Sequential run BatchNorm2d (track_running_stats=False) -> ReLU -> MaxPool2d(2) to fuse; "
                          f"it runs as {forward[:-len(forwards.FUSED)]!r}", RuntimeWarning, stacklevel=2)
        if forward == forwards.AUTO:
            forward = "loop" if device.type == "cpu" else forwards.UNTIMED_DEFAULT
        self.forward = forward
        # The upper's training_step is tried under vmap; the tutorial's .item() sends it to the loop.
        self.upper_forward = self.forward
        self.max_tasks = max_tasks
        self.chunk: Optional[int] = max_tasks
        info.forward, info.upper_forward = self.forward, self.upper_forward
        self.pending: List[dict] = []
        self.current: Optional[dict] = None
        self.finishing_loop = False
        self.checked = False
        self.in_task_call = False
        self.phi: Optional[List[Tensor]] = None
        self.last_batches: Optional[list] = None
        self._warned_shapes = False
        self._logger = get_logger()

    # ----- what the lower problem shows while a window runs -----
    @property
    def running(self) -> bool:
        return self.phi is not None and not self.in_task_call

    @property
    def num_tasks(self) -> int:
        return self.phi[0].shape[0]

    def lower_loss_vector(self, keep_dtype: bool = False) -> Tensor:
        """Each task's lower loss on its last batch at its current weights: [n], float32 as
        ``loss_for_hypergradient`` gives it (or in the loss's own dtype)."""
        losses, _ = self.task_losses(self.lower, self.phi, self.last_batches, self.forward)
        return losses if keep_dtype else losses.float()

    # ----- recording -----
    def records(self, problem) -> bool:
        """Whether ``problem.step`` is recorded here instead of run."""
        return problem is self.lower

    def _runs_as_written(self, problem, global_step: Optional[int]) -> bool:
        """Steps ``problem`` as the sequential engine does, and says so, when this step is not
        recorded: in eval mode, with batching off, or in the rest of an inner loop that a flush
        (a validation inside it) left half run."""
        if not (problem.schedule.training and self.upper.schedule.training) or not self.info.active:
            self.flush()
        elif not self.finishing_loop:
            return False
        problem.step_normal(global_step=global_step)
        self.finishing_loop = self.finishing_loop and self._loop_half_run()
        return True

    def _loop_half_run(self) -> bool:
        return self.lower.schedule.loop_half_run()

    def lower_step(self, global_step: Optional[int], problem=None) -> None:
        lower, upper = self.lower, self.upper
        if self._runs_as_written(lower, global_step):
            return
        if self.current is None:
            self.current = {"lower": [], "upper": None}
        count = record_step(lower, global_step)
        self.current["lower"].append((global_step, count, lower.get_batch()))
        if lower.schedule.loop_half_run():
            return
        lower.schedule.end_inner_loop()
        count = upper.begin_local_step(global_step)
        self.current["upper"] = (global_step, count, upper.get_batch())
        self.pending.append(self.current)
        self.current = None
        if upper.schedule.accumulation_boundary():
            self.run_window()

    def flush(self) -> None:
        """Runs what is recorded but not yet run (a window cut by the end of training,
        a validation or a switch to eval) task by task, exactly as the sequential engine."""
        tasks = self.pending + ([self.current] if self.current else [])
        self.pending, self.current = [], None
        if tasks:
            self._replay(tasks)
        # A validation inside an inner loop: its remaining steps go on from the weights the replay
        # left, one by one, and recording starts again with the next inner loop.
        self.finishing_loop = self._loop_half_run()

    def _replay(self, tasks: List[dict]) -> None:
        lower, upper = self.lower, self.upper
        lower.schedule.rewind(sum(len(t["lower"]) for t in tasks))
        upper.schedule.rewind(sum(1 for t in tasks if t["upper"] is not None))
        for task in tasks:
            with upper.feeding(task["upper"][2]) if task["upper"] is not None else contextlib.nullcontext():
                for global_step, _, batch in task["lower"]:
                    with lower.feeding(batch):
                        lower.step_normal(global_step=global_step)

    # ----- one window -----
    def run_window(self) -> None:
        tasks, self.pending = self.pending, []
        try:
            if not self.checked:
                self._first_window_checks(tasks)
                self.checked = True
            self._check_shapes(tasks)
        except NotBatchable as cause:
            self._refuse(cause, lambda: self._replay(tasks))
            return
        n = len(tasks)
        chunk = min(self.chunk or n, n)
        for start in range(0, n, chunk):
            self._run_tasks(tasks[start:start + chunk])
        self._close_window(tasks)

    def _refuse(self, cause: NotBatchable, replay: Callable[[], None]) -> None:
        """The window runs task by task (``replay``), with the cause said once; "on" raises it."""
        message = f"task batching: {cause}"
        if self.info.mode == "on":
            raise ValueError(f"EngineConfig(task_batching='on'): {cause}") from None
        per_window = cause.per_window
        if not per_window:
            self.info.active, self.info.reason = False, str(cause)
        if not (per_window and self._warned_shapes):
            warnings.warn(message + ("; this meta-step runs task by task" if per_window else
                                     "; running task by task"), RuntimeWarning, stacklevel=5)
            self._warned_shapes = self._warned_shapes or per_window
        replay()

    # ----- running the user's training_step for every task -----
    def call_task(self, problem, g: int, weights: Sequence[Tensor], batch: Any):
        """(loss, metrics) of ``problem.training_step(batch)`` with the lower module holding task g's ``weights``."""
        call = _Call(self.target, lambda b: problem.parse_loss(problem.training_step_exec(b)))
        return functional_call(call, dict(zip(self.keys, weights)), (batch,))

    def fusing(self, forward: str):
        """The lower's module with its BatchNorm -> ReLU -> max-pool runs fused in place for a "+fused" forward."""
        return fused_in_place(self.target) if forwards.parse(forward).fused else contextlib.nullcontext()

    def task_losses(self, problem, phi: Sequence[Tensor], batches: Sequence[Any], forward: str):
        """(losses [n], metrics: a dict per task) of ``problem.training_step`` with the lower's
        weights of each task (phi [n, *shape]) and each task's batch."""
        self.in_task_call = True
        try:
            with self.fusing(forward):
                return self._task_losses(problem, phi, batches, forwards.parse(forward).forward)
        finally:
            self.in_task_call = False

    def _task_losses(self, problem, phi: Sequence[Tensor], batches: Sequence[Any], forward: forwards.Forward):
        if not forward.vmapped:
            # unbind: one backward (a stack) for all tasks, where T selects would each fill a [T, ...] zero
            slices = list(zip(*(p.unbind(0) for p in phi)))
            outs = [self.call_task(problem, g, slices[g], batch) for g, batch in enumerate(batches)]
            return torch.stack([loss for loss, _ in outs]), [metrics for _, metrics in outs]
        call = _Call(self.target, lambda b: problem.parse_loss(problem.training_step_exec(b)))
        stacked = _stack(batches)
        # e.g. "stacked": convolutions, BatchNorm and max-pooling on the tasks' stacked channels
        layers = forward.layers()
        # training_step's autocast (Config(precision=)) does not reach vmapped convolutions by itself
        autocast = AutocastConvolutions() if problem.config.precision in ("bf16", "fp16") else contextlib.nullcontext()
        with autocast, layers:
            losses, metrics = vmap(
                lambda weights, batch: functional_call(call, weights, (batch,)),
                in_dims=(0, _stack_dims(stacked)),
                randomness="different",
            )(dict(zip(self.keys, phi)), stacked)
        return losses, [{k: v[g] for k, v in metrics.items()} for g in range(len(batches))]

    def task_gradients(self, batches: Sequence[Any], forward: str = "loop"):
        """(losses [n], metrics per task, gradients [n, *shape]) of the lower's training_step at phi,
        one task at a time: the loop forward's inner step, whose working set is one task's graph
        (a CPU's caches hold it), where one backward over all tasks would keep all n graphs."""
        data = [p.detach() for p in self.phi]
        grads = [torch.empty_like(p) for p in data]
        losses, metrics = [], []
        self.in_task_call = True
        try:
            with self.fusing(forward):
                self._task_gradients(batches, data, grads, losses, metrics)
        finally:
            self.in_task_call = False
        return torch.stack(losses), metrics, grads

    def _task_gradients(self, batches, data, grads, losses, metrics) -> None:
        for g, batch in enumerate(batches):
            leaves = [p[g].requires_grad_(True) for p in data]
            loss, extra = self.call_task(self.task_problem(g), g, leaves, batch)
            task_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for out, grad in zip(grads, task_grads):
                if grad is None:
                    out[g].zero_()
                else:
                    out[g].copy_(grad)
            losses.append(loss.detach())
            metrics.append(extra)

    def _upper_losses(self, batches):
        if forwards.parse(self.upper_forward).forward.vmapped:
            try:
                return self.task_losses(self.upper, self.phi, batches, self.upper_forward)
            except Exception as error:  # noqa: BLE001 (the loop is the documented path for such steps)
                self.upper_forward = "loop" + (forwards.FUSED if forwards.parse(self.upper_forward).fused else "")
                self.info.upper_forward = f"{self.upper_forward} (its training_step does not vmap: {_first_line(error)})"
        return self.task_losses(self.upper, self.phi, batches, self.upper_forward)

    # ----- the batched meta-step -----
    def _start(self, n: int) -> List[Tensor]:
        lower = self.lower
        if self.iterative:
            return lower.batched_start(n)
        lower.on_inner_loop_start()
        phi = [p.detach().unsqueeze(0).repeat(n, *([1] * p.dim())).requires_grad_(True) for p in self.module_params]
        self.sgd.reset(phi)
        return phi

    def _run_tasks(self, tasks: List[dict]) -> None:
        lower, upper = self.lower, self.upper
        n = len(tasks)
        self.phi = self._start(n)
        lower.task_batch = self
        try:
            lower_losses = []
            for k in range(len(tasks[0]["lower"])):
                batches = [t["lower"][k][2] for t in tasks]
                if self.iterative:
                    losses, metrics = self.task_losses(lower, self.phi, batches, self.forward)
                    self.phi = lower.batched_descend(self.phi, losses.sum())
                else:
                    losses, metrics = self._sgd_step(batches)
                lower_losses.append((losses.detach(), metrics))
            self.last_batches = [t["lower"][-1][2] for t in tasks]
            self._lower_stats(tasks, lower_losses)

            losses, metrics = self._upper_losses([t["upper"][2] for t in tasks])
            upper_values = losses.detach().tolist()
            for g, (task, value) in enumerate(zip(tasks, upper_values)):
                if value != value or value in (float("inf"), float("-inf")):
                    global_step, count, _ = task["upper"]
                    raise FloatingPointError(
                        f'problem "{upper.name}": training_step returned a non-finite loss ({value}) at local step '
                        f"{count} (global step {global_step}; task {g + 1} of the batched meta-step)"
                    )
                task["upper_stats"] = {"loss": value, **_plain(metrics[g])}
            upper.backward(losses.sum() / upper.gas)
        finally:
            self._leave(tasks)

    def _sgd_step(self, batches: Sequence[Any]):
        """One inner SGD step of every task; (losses, metrics per task)."""
        if self.measure:
            losses, metrics, grads = self._measured_gradients(batches)
        else:
            losses, metrics, grads = self._gradients(batches, self.forward)
        # data parallel: task g's gradient averaged over the ranks, as the sequential steps' optimizer_step does
        self.engine.strategy.average(grads)
        self.sgd.step(self.phi, grads)
        return losses, metrics

    def _gradients(self, batches: Sequence[Any], forward: str):
        if not forwards.parse(forward).forward.vmapped:
            return self.task_gradients(batches, forward)
        losses, metrics = self.task_losses(self.lower, self.phi, batches, forward)
        grads = torch.autograd.grad(losses.sum(), self.phi, allow_unused=True)
        return losses, metrics, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.phi)]

    def _measured_gradients(self, batches: Sequence[Any]):
        """The first inner step of "auto": the forwards of forwards.auto_plans timed (choice.choose), or the
        one the tuning cache keeps for this program's shapes on this machine, as cudnn.benchmark keeps a
        convolution algorithm; the winner's step is the step. A forward that raises (e.g. out of memory) is
        left out, with a warning naming its cause; the lower's training_step already ran under vmap
        (_first_window_checks)."""
        results, buffers, start = {}, dict(self.target.named_buffers()), _copies(self.target.named_buffers())
        buffers_after = {}

        def measure(forward: str) -> float:
            # each run from the same buffers (a training BatchNorm updates its running statistics), the
            # winner's left after it, as the RNG is: the step is the winner's alone, whatever ran beside it
            _copy_into(buffers, start)
            took = timer(self.device, lambda: results.__setitem__(forward, self._gradients(batches, forward)))
            buffers_after.setdefault(forward, _copies(buffers.items()))
            return took

        def time() -> dict:
            try:
                return choose("forward", self.auto_plans, measure, self.device, restore=False, describe=_first_line)
            except NoCandidateRan as error:
                raise next(iter(error.errors.values()))

        choice = self.chooser.get(self._choice_key(batches), self.auto_plans, time)
        _copy_into(buffers, buffers_after.get(choice["forward"], start))
        self.measure = False
        self.forward = self.upper_forward = choice["forward"]
        if "from" in choice:
            how = f"auto, from the tuning cache {self.chooser.cache.path}"
        else:
            how = "auto, timed on the first meta-step's inner step: " + ", ".join(
                f"{forward} {ms:.1f} ms" for forward, ms in choice["ms"].items())
        if "refused" in choice:
            causes = "; ".join(f"{forward}: {cause}" for forward, cause in choice["refused"].items())
            how += f"; left out: {causes}"
            warnings.warn(f"task batching: \"auto\" left out forwards that failed on the first inner step ({causes})",
                          RuntimeWarning, stacklevel=2)
        self.info.forward = f"{self.forward} ({how})"
        self.info.upper_forward = self.upper_forward
        self._logger.info(f"task batching: the lower's training_step runs as {self.info.forward}")
        return results[self.forward] if self.forward in results else self._gradients(batches, self.forward)

    def _choice_key(self, batches: Sequence[Any]) -> tuple:
        """What the forward choice depends on: the module, the tasks, their batches' shapes, dtype, threads."""
        shapes = tuple(tuple(t.shape) for t in _tensors(batches[0]))
        dtype = str(self.module_params[0].dtype).replace("torch.", "")
        return ("task batching", type(self.target).__name__, len(batches), shapes, dtype, torch.get_num_threads(),
                str(self.device))

    def _lower_stats(self, tasks: List[dict], lower_losses: list) -> None:
        """Each task's logged values per inner step (task["lower_stats"]); a non-finite loss raises."""
        values = torch.stack([l for l, _ in lower_losses]).tolist()  # [K][n]: one sync per chunk
        for k, row in enumerate(values):
            for g, value in enumerate(row):
                if value != value or value in (float("inf"), float("-inf")):
                    global_step, count, _ = tasks[g]["lower"][k]
                    raise FloatingPointError(
                        f'problem "{self.task_problem(g).name}": training_step returned a non-finite loss ({value}) '
                        f"at local step {count} (global step {global_step}; task {g + 1} of the batched meta-step)"
                    )
        for g, task in enumerate(tasks):
            task["lower_stats"] = [
                {"loss": values[k][g], **_plain(lower_losses[k][1][g])} for k in range(len(values))
            ]

    def task_problem(self, g: int):
        """The lower problem that runs task g."""
        return self.lower

    def _leave(self, tasks: List[dict]) -> None:
        """The lower holds the last task's adapted weights, as after the sequential engine."""
        lower = self.lower
        phi, self.phi = self.phi, None
        lower.task_batch = None
        lower.cur_batch = tasks[-1]["lower"][-1][2]
        if self.iterative:
            lower.batched_finish(phi)
            return
        with torch.no_grad():
            for p, w in zip(self.module_params, phi):
                p.copy_(w[-1])
        if any(g.get("momentum", 0) for g in lower.optimizer.param_groups):
            for p, buf in zip(self.module_params, self.sgd.buffers):
                lower.optimizer.state[p]["momentum_buffer"] = buf[-1].clone()

    def _close_window(self, tasks: List[dict]) -> None:
        """The upper's optimizer, scheduler and logs task by task, in the sequential order."""
        lower = self.lower
        if lower.config.log_step > 0:
            for task in tasks:
                for (global_step, count, _), stats in zip(task["lower"], task["lower_stats"]):
                    log_as_of(lower, stats, global_step, count)
        self._upper_steps([(*task["upper"], task["upper_stats"]) for task in tasks])

    def _upper_steps(self, steps: List[tuple]) -> None:
        """The upper's local steps after its backward: (global step, count, batch, stats) each."""
        upper = self.upper
        for global_step, count, batch, stats in steps:
            upper.cur_batch = batch
            with upper.schedule.as_of(count):
                if upper.schedule.accumulation_boundary():
                    upper.optimizer_step()
                    call_hook(upper.param_callback, upper.trainable_parameters())
                    upper.zero_grad()
                upper.step_scheduler()
                if upper.schedule.logs():
                    upper.log(stats, global_step)
        upper.schedule.reset_ready(len(upper.children))


__all__ = ["TaskBatcher"]

