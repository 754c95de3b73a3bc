"""Which Betty programs the Engine can run task-batched, and why not when it cannot.

The pattern (Betty's implicit-MAML tutorial): one upper problem that accumulates
its gradient over G > 1 inner loops of one lower problem
(``Config(gradient_accumulation=G)``), each inner loop starting afresh in
``on_inner_loop_start``. Those G inner loops are independent tasks. Every check
here names the problem, the hook, call or optimizer that breaks the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


class NotBatchable(Exception):
    """The cause, in words, that a program cannot run task-batched. ``structural``:
    the program is not a meta-batch of inner loops at all (nothing to warn about); ``per_window``:
    only this meta-step's batches are the cause; ``pattern``: the layout found, if any."""

    def __init__(self, cause: str, structural: bool = False, per_window: bool = False, pattern=None):
        super().__init__(cause)
        self.structural = structural
        self.per_window = per_window  # holds for this meta-step's batches only
        self.pattern = pattern


@dataclass
class TaskBatchingInfo:
    """``engine.task_batching``: whether the Engine runs the tasks of a meta-step
    as one batch (``active``), over how many (``tasks``, in chunks of
    ``chunk`` when memory asks for it), which ``pattern`` it found, and
    ``reason`` when it does not."""

    mode: str
    active: bool = False
    pattern: Optional[str] = None
    tasks: Optional[int] = None
    chunk: Optional[int] = None
    forward: Optional[str] = None
    upper_forward: Optional[str] = None
    reason: Optional[str] = None

    def __str__(self) -> str:
        if self.active:
            chunk = f", in chunks of {self.chunk}" if self.chunk and self.chunk < (self.tasks or 0) else ""
            return (f"task batching active: {self.tasks} tasks per meta-step as one batch{chunk} "
                    f"({self.pattern}; lower forward {self.forward})")
        return f"task batching off ({self.mode}): {self.reason}"


def _overrides(problem, hook: str) -> bool:
    """Whether the user's class overrides ``hook`` of the library class it derives from."""
    from ..problems.iterative_problem import IterativeProblem
    from ..problems.problem import Problem

    base = IterativeProblem if isinstance(problem, IterativeProblem) else Problem
    return getattr(type(problem), hook) is not getattr(base, hook)


def running_statistics(module: nn.Module) -> Optional[str]:
    """The first layer that keeps state across forwards (running BatchNorm
    statistics, any buffer), which tasks run one after another would share."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            return f"layer {name!r} ({type(sub).__name__}) keeps running statistics (track_running_stats=True)"
        for buffer_name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None:
                return f"layer {name or '<root>'!r} ({type(sub).__name__}) has buffer {buffer_name!r}"
    return None


def _siblings(problems):
    """(upper, lowers) when several leaf problems of one class share one parent and nothing else."""
    leaves = [p for p in problems if p.parents and not p.children]
    if len(leaves) < 2 or len(problems) != len(leaves) + 1:
        return None
    upper = next(p for p in problems if p not in leaves)
    if all(p.parents == [upper] and type(p) is type(leaves[0]) for p in leaves):
        return upper, leaves
    return None


@dataclass
class Plan:
    """What ``find_pattern`` found: ``gradient_accumulation`` (one lower, G inner loops per
    meta-step) or ``siblings`` (T lower problems of one class, one inner loop each)."""

    pattern: str
    upper: object
    lowers: list

    @property
    def tasks(self) -> int:
        return self.upper.gas if self.pattern == "gradient_accumulation" else len(self.lowers)


def find_pattern(engine) -> Plan:
    """The task pattern of the engine's problems, or NotBatchable."""
    plan = _find_pattern(engine)
    if engine.config.roll_back:
        raise NotBatchable(
            "EngineConfig(roll_back=True): after each upper step the lower goes back to its inner loop's start "
            "and steps once more (Betty's warm start), which the batched meta-step does not take",
            pattern=plan.pattern,
        )
    return plan


def _find_pattern(engine) -> Plan:
    problems = engine.problems
    siblings = _siblings(problems)
    if siblings:
        upper, lowers = siblings
        try:
            _check_siblings(upper, lowers)
        except NotBatchable as cause:
            cause.pattern = "siblings"
            raise
        return Plan("siblings", upper, lowers)
    if len(problems) != 2:
        raise NotBatchable(
            f"task batching runs one upper and one lower problem; this engine has {len(problems)} "
            f"({', '.join(p.name for p in problems)})",
            structural=True,
        )
    lowers = [p for p in problems if p.parents]
    if len(lowers) != 1 or len(lowers[0].parents) != 1 or lowers[0].children:
        raise NotBatchable("task batching needs one lower problem with one parent in dependencies['l2u']",
                           structural=True)
    lower = lowers[0]
    upper = lower.parents[0]
    if upper.gas < 2:
        raise NotBatchable(
            f'the upper problem "{upper.name}" has gradient_accumulation={upper.gas}: one inner loop per '
            "meta-step, so there are no tasks to batch",
            structural=True,
        )
    _check_lower(upper, lower, own_module=False)
    return Plan("gradient_accumulation", upper, [lower])


def _check_siblings(upper, lowers) -> None:
    """Betty 0.1.1's implicit-MAML layout: each sibling one task of the upper's meta-step."""
    from ..problems.iterative_problem import IterativeProblem

    first = lowers[0]
    if upper.gas != 1:
        raise NotBatchable(
            f'the upper problem "{upper.name}" accumulates its gradient over {upper.gas} rounds of its '
            f"{len(lowers)} sibling lower problems; task batching of siblings needs gradient_accumulation=1"
        )
    if isinstance(first, IterativeProblem):
        raise NotBatchable(
            f"the sibling lower problems ({type(first).__name__}) are IterativeProblems; task batching of "
            "siblings is built for ImplicitProblem (one lower problem with gradient_accumulation batches both)"
        )
    for lower in lowers:
        _check_lower(upper, lower, own_module=True)
    shapes = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in first.module.named_parameters()]
    for lower in lowers[1:]:
        mine, theirs = vars(lower.config), vars(first.config)
        if mine != theirs:
            differ = sorted(k for k in theirs if theirs[k] != mine.get(k))
            raise NotBatchable(
                f'the sibling lower problems "{first.name}" and "{lower.name}" have different Configs '
                f"({', '.join(differ)}), so they are not one task run T times"
            )
        mine = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in lower.module.named_parameters()]
        if mine != shapes:
            raise NotBatchable(
                f'the modules of the sibling lower problems "{first.name}" and "{lower.name}" differ in their '
                "parameters (names, shapes, dtypes or requires_grad)"
            )
        if _sgd_rules(lower.optimizer) != _sgd_rules(first.optimizer):
            raise NotBatchable(
                f'the SGD settings of the sibling lower problems "{first.name}" and "{lower.name}" differ '
                f"({_sgd_rules(first.optimizer)} against {_sgd_rules(lower.optimizer)})"
            )
    extra = [p for p in upper.paths if not (len(p) == 3 and p[1] in lowers)]
    if extra:
        raise NotBatchable(
            f'the upper problem "{upper.name}" differentiates through '
            f"{' -> '.join(q.name for q in extra[0])}, which is not one of its siblings' inner loops"
        )


def _sgd_rules(optimizer):
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    return [tuple(float(g.get(k, 0)) for k in keys) + (len(g["params"]),) for g in optimizer.param_groups]


def _check_lower(upper, lower, own_module: bool) -> None:
    """What a lower problem must be for its inner loops to run as tasks of one batch.
    ``own_module``: each task has a module of its own (siblings), so running statistics
    stay per task; one module stepped for every task would share them."""
    from ..problems.iterative_problem import IterativeProblem

    if not any(len(path) == 3 and path[1] is lower for path in upper.paths):  # [upper, lower, upper]
        raise NotBatchable(
            f'the upper problem "{upper.name}" does not differentiate through "{lower.name}" '
            "(no dependencies['u2l'] entry)"
        )
    if lower.gas != 1:
        raise NotBatchable(
            f'the lower problem "{lower.name}" has gradient_accumulation={lower.gas}; task batching needs 1'
        )
    if not _overrides(lower, "on_inner_loop_start"):
        raise NotBatchable(
            f'the lower problem "{lower.name}" defines no on_inner_loop_start: each inner loop continues from '
            "the last one's parameters, so its inner loops are not independent tasks"
        )
    for hook in ("grad_callback", "param_callback", "one_step_descent", "step", "step_normal", "get_loss",
                 "backward", "optimizer_step"):
        if _overrides(lower, hook):
            raise NotBatchable(
                f'the lower problem "{lower.name}" overrides {hook}, which the batched path would not call per task'
            )
    for problem in (upper, lower):
        if problem.config.precision == "fp16":
            raise NotBatchable(
                f'problem "{problem.name}" uses precision="fp16": its dynamic loss scale changes from one task '
                "to the next"
            )
    if lower.config.warmup_steps:
        raise NotBatchable(f'the lower problem "{lower.name}" has warmup_steps={lower.config.warmup_steps}')
    if lower.config.gradient_clipping > 0:
        raise NotBatchable(
            f'the lower problem "{lower.name}" clips its gradients (gradient_clipping='
            f"{lower.config.gradient_clipping}), a norm over each task that the batched update does not take"
        )
    if lower.scheduler is not None:
        raise NotBatchable(
            f'the lower problem "{lower.name}" has a scheduler ({type(lower.scheduler).__name__}): its learning '
            "rate changes from one task to the next"
        )
    optimizer = lower.optimizer
    if isinstance(lower, IterativeProblem):
        pass  # its updates are tensor maths, elementwise and so per task
    elif type(optimizer) is not torch.optim.SGD:
        raise NotBatchable(
            f'the lower problem "{lower.name}" steps {type(optimizer).__name__}; the batched inner step is '
            "torch.optim.SGD's (momentum, dampening, weight decay, nesterov)"
        )
    else:
        for group in optimizer.param_groups:
            if group.get("maximize"):
                raise NotBatchable(f'the lower problem "{lower.name}" uses SGD(maximize=True)')
    stateful = None if own_module else running_statistics(lower.module)
    if stateful:
        raise NotBatchable(
            f'the lower problem "{lower.name}"\'s module: {stateful}; tasks run one after another would '
            "share them"
        )


__all__ = ["Plan", "TaskBatchingInfo", "NotBatchable", "find_pattern", "running_statistics"]
