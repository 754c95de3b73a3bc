"""Task batching inside the Engine: a Betty program's meta-batch of inner loops,
unchanged, run as one batch (see ``runner`` for how, ``plan`` for when)."""

from .plan import NotBatchable, Plan, TaskBatchingInfo, find_pattern
from .runner import TaskBatcher
from .siblings import SiblingBatcher

__all__ = ["NotBatchable", "Plan", "SiblingBatcher", "TaskBatchingInfo", "TaskBatcher", "find_pattern"]
