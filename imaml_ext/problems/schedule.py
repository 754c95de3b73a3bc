"""When a problem steps, as Betty decides it: one object per problem that holds its step
bookkeeping and answers every "is it time to ..." question.

A problem counts its local steps; every ``unroll_steps x gradient_accumulation`` of them (after
``warmup_steps``) it has unrolled an inner loop, its parents step, and the next local step starts
a new inner loop. Its optimizer steps on the gradient-accumulation boundary (every
``gradient_accumulation`` local steps). A parent steps only when every child has marked itself
ready. With ``EngineConfig(roll_back=True)`` a problem with parents caches its state at each
inner-loop start and, once its parents have stepped, restores it and takes one more step on the
same batch with the updated parents (``Problem.step_after_roll_back``).

``Problem.step``, ``IterativeProblem`` and the Engine's task batchers all drive a problem through
these methods, so the rules are written once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional


class StepSchedule:
    """One problem's step counters and readiness (``problem.schedule``)."""

    def __init__(self, config):
        self.config = config
        self.count = 0  # local steps taken in training mode
        self.global_step: Optional[int] = None
        self.inner_loop_start = True  # the next local step starts an inner loop
        self.training = True
        self.ready: List[bool] = []  # per child: it has unrolled and waits for this problem's step
        self.roll_back = False
        self.roll_back_cache: Optional[Any] = None  # what cache_states kept at the inner loop's start

    # ----- the rules -----
    @property
    def gas(self) -> int:
        return self.config.gradient_accumulation

    @property
    def unroll_length(self) -> int:
        """Local steps per inner loop."""
        return self.config.unroll_steps * self.gas

    def accumulation_boundary(self, count: Optional[int] = None) -> bool:
        """Whether local step ``count`` (default: the current one) steps the optimizer."""
        return (self.count if count is None else count) % self.gas == 0

    def unrolled(self, count: Optional[int] = None) -> bool:
        """Whether local step ``count`` ends an inner loop whose parents then step (training mode only)."""
        count = self.count if count is None else count
        return self.training and count % self.unroll_length == 0 and count > self.config.warmup_steps

    def loop_half_run(self) -> bool:
        """Whether the current inner loop has run some of its ``unroll_steps`` but not all."""
        return bool(self.count % self.config.unroll_steps)

    def logs(self, count: Optional[int] = None) -> bool:
        count = self.count if count is None else count
        return self.config.log_step > 0 and count % self.config.log_step == 0

    # ----- moving on -----
    def begin(self, global_step: Optional[int]) -> bool:
        """Starts a local step: records the global step; True when it starts an inner loop
        (the caller then runs the problem's ``start_inner_loop``)."""
        self.global_step = global_step
        starts, self.inner_loop_start = self.inner_loop_start, False
        return starts

    def advance(self) -> int:
        """Counts the local step (in training mode); returns the count."""
        if self.training:
            self.count += 1
        return self.count

    def end_inner_loop(self) -> None:
        self.inner_loop_start = True

    def rewind(self, steps: int) -> None:
        """Takes back ``steps`` counted local steps (recorded steps replayed one by one)."""
        self.count -= steps

    @contextlib.contextmanager
    def as_of(self, count: int) -> Iterator[None]:
        """The count as it was at local step ``count``, for what runs later on its behalf (its log,
        its optimizer step under the Engine's task batching)."""
        saved, self.count = self.count, count
        try:
            yield
        finally:
            self.count = saved

    # ----- readiness -----
    def reset_ready(self, children: int) -> None:
        self.ready = [False] * children

    def mark_ready(self, child: int) -> None:
        self.ready[child] = True

    def all_ready(self) -> bool:
        return all(self.ready)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state.get("count", self.count)


class BettyNames:
    """Betty's private names of the schedule's state, which Betty programs read
    (``self._global_step`` in its ImageNet pruning example) and ``ready``, which they may set."""

    @property
    def ready(self) -> List[bool]:
        return self.schedule.ready

    @ready.setter
    def ready(self, value: List[bool]) -> None:
        self.schedule.ready = list(value)

    @property
    def _count(self) -> int:
        return self.schedule.count

    @_count.setter
    def _count(self, value: int) -> None:
        self.schedule.count = value

    @property
    def _global_step(self) -> Optional[int]:
        return self.schedule.global_step

    @property
    def _training(self) -> bool:
        return self.schedule.training

    @property
    def _inner_loop_start(self) -> bool:
        return self.schedule.inner_loop_start


__all__ = ["BettyNames", "StepSchedule"]
