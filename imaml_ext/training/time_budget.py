"""--time_budget SECONDS: end an invocation, with a checkpoint, before its time is up.

Before each meta-step the loop asks whether that step, the validation it would be followed
by, and the checkpoint written when stopping still fit in what is left of the budget (less a
margin); the costs are this invocation's own means so far. The final evaluation is asked for
the same way. A run is then a chain of invocations of the same command with ``--resume``,
each continuing bit for bit from the last one's checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional


class TimeBudget:
    """``seconds`` from now (by ``clock``, ``time.monotonic`` unless a test gives another)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock()
        # Kept free for what the estimates miss (the steps a GPU still has queued, a slow write).
        self.margin = min(10.0, 0.02 * self.seconds)
        self._total: Dict[str, float] = {}
        self._count: Dict[str, int] = {}
        self._lap: Optional[float] = None
        self._measured_since_lap = 0.0

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def _add(self, kind: str, seconds: float, count: int = 1) -> None:
        self._total[kind] = self._total.get(kind, 0.0) + max(seconds, 0.0)
        self._count[kind] = self._count.get(kind, 0) + count

    def mean(self, kind: str) -> Optional[float]:
        """Mean seconds of one ``kind`` (per task for "validation"); None before the first."""
        return self._total[kind] / self._count[kind] if self._count.get(kind) else None

    def lap(self) -> None:
        """Called before each meta-step: the time since the previous call, less the validations and
        checkpoints measured in between, was one meta-step. (Timed between calls rather than around
        the step, so that on a GPU it counts the work done, not only the work queued.)"""
        now = self.clock()
        if self._lap is not None:
            self._add("step", now - self._lap - self._measured_since_lap)
        self._lap, self._measured_since_lap = now, 0.0

    @contextlib.contextmanager
    def measure(self, kind: str, count: int = 1):
        """Times the block as ``count`` of ``kind`` (e.g. one validation of 200 tasks: count 200)."""
        start = self.clock()
        try:
            yield
        finally:
            seconds = self.clock() - start
            self._add(kind, seconds, count)
            self._measured_since_lap += seconds

    def _per_task(self, meta_batch_size: int) -> float:
        """Seconds to adapt and score one task: from the validations, else a meta-step's share."""
        per_task = self.mean("validation")
        if per_task is None:
            per_task = (self.mean("step") or 0.0) / meta_batch_size
        return per_task

    def allows_step(self, validation_tasks: int, meta_batch_size: int) -> bool:
        """Whether one more meta-step (followed by a validation of ``validation_tasks`` tasks, 0 for
        none) and the checkpoint after it fit. The first meta-step is unknown and counts as 0."""
        need = (self.mean("step") or 0.0) + validation_tasks * self._per_task(meta_batch_size)
        return need + (self.mean("checkpoint") or 0.0) + self.margin <= self.left()

    def allows_evaluation(self, tasks: int, meta_batch_size: int) -> bool:
        """Whether the final evaluation of ``tasks`` adaptations (model and baseline counted apart)
        fits after the last meta-step."""
        return tasks * self._per_task(meta_batch_size) + self.margin <= self.left()
