"""The batched fast path: every task of a meta-batch in one pass."""

from .imaml import IMAML, MetaStepResult
from .module import TaskBatchedModule, check_batchable

__all__ = ["IMAML", "MetaStepResult", "TaskBatchedModule", "check_batchable"]
