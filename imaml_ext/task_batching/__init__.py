"""Task batching inside the Engine: a Betty program's meta-batch of inner loops,
unchanged, run as one batch (see ``runner`` for how, ``plan`` for when)."""

from .plan import NotBatchable, TaskBatchingInfo, find_pattern
from .runner import TaskBatcher

__all__ = ["NotBatchable", "TaskBatchingInfo", "TaskBatcher", "find_pattern"]
