"""--time_budget SECONDS: end an invocation, with a checkpoint, before its time is up.

Before each meta-step the loop asks whether that step, the validation it would be followed
by, and the checkpoint written when stopping still fit in what is left of the budget (less a
margin); the costs are this invocation's own means so far. The final evaluation is asked for
the same way. A run is then a chain of invocations of the same command with ``--resume``,
each continuing bit for bit from the last one's checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Dict, Optional


def process_age() -> float:
    """Seconds since this process started (Python and torch loading included), 0 where unknown."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class TimeBudget:
    """``seconds``, of which ``spent`` have passed (the process's age: the budget counts from its
    start), by ``clock`` (``time.monotonic`` unless a test gives another), of which ``margin``
    (default 5 %, at least 2 s and at most 30 s) is never planned for."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, spent: float = 0.0,
                 margin: Optional[float] = None):
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock() - spent
        # Kept free for what the estimates miss: the steps a GPU still has queued, a step slower than
        # the mean on a shared machine, the curves and metrics written at the end, leaving the process.
        self.margin = min(30.0, max(2.0, 0.05 * self.seconds)) if margin is None else margin
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
        the step, so that on a GPU it counts the work done, not only the work queued.) The first
        meta-step of an invocation pays one-time costs (warm-up, a CUDA graph's capture): it stands
        for the others only until they are timed."""
        now = self.clock()
        if self._lap is not None:
            kind = "step" if self._count.get("first_step") else "first_step"
            self._add(kind, now - self._lap - self._measured_since_lap)
        self._lap, self._measured_since_lap = now, 0.0

    def step_seconds(self) -> float:
        """The expected seconds of the next meta-step; 0 before the first is timed."""
        return self.mean("step") or self.mean("first_step") or 0.0

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
            per_task = self.step_seconds() / meta_batch_size
        return per_task

    def allows_step(self, validation_tasks: int, meta_batch_size: int) -> bool:
        """Whether one more meta-step (followed by a validation of ``validation_tasks`` tasks, 0 for
        none) and the checkpoint after it fit. The first meta-step is unknown and counts as 0."""
        need = self.step_seconds() + validation_tasks * self._per_task(meta_batch_size)
        return need + (self.mean("checkpoint") or 0.0) + self.margin <= self.left()

    def allows_evaluation(self, tasks: int, meta_batch_size: int) -> bool:
        """Whether the final evaluation of ``tasks`` adaptations (model and baseline counted apart)
        fits after the last meta-step."""
        return tasks * self._per_task(meta_batch_size) + self.margin <= self.left()
