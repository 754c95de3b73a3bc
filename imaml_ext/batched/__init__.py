"""The batched fast path: every task of a meta-batch in one pass."""

from .imaml import IMAML, MetaStepResult
from .maml import MAML
from .module import BatchedModule, TaskBatchedModule, check_batchable, task_cross_entropy

__all__ = ["IMAML", "MAML", "MetaStepResult", "BatchedModule", "TaskBatchedModule", "check_batchable", "task_cross_entropy"]
