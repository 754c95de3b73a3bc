"""What the task batchers run the user's code with: ``functional_call`` targets, batches
stacked over tasks, the structure that says whether tasks' batches stack, and the counts and
logs of steps recorded now and run later."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

class _Call(nn.Module):
    """A ``functional_call`` target: ``fn(*args)`` with ``module``'s parameters swapped."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        object.__setattr__(self, "fn", fn)

    def forward(self, *args):
        return self.fn(*args)


def _structure(batch: Any):
    """The shape of a batch: nesting, tensor shapes and dtypes, other leaves as they are."""
    if isinstance(batch, Tensor):
        return ("tensor", tuple(batch.shape), batch.dtype, batch.device)
    if isinstance(batch, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, tuple(_structure(v) for v in batch))
    return ("value", batch)


def _stack(batches: Sequence[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.stack(list(batches))
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))
    return first


def _stack_dims(batch: Any) -> Any:
    """vmap's in_dims for a stacked batch: 0 for tensors, None for other leaves."""
    if isinstance(batch, Tensor):
        return 0
    if isinstance(batch, dict):
        return {k: _stack_dims(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_stack_dims(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_stack_dims(v) for v in batch)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def record_step(problem, global_step: Optional[int]) -> int:
    """A lower local step recorded, not run: its global step and count as the sequential engine leaves them."""
    problem.schedule.global_step = global_step
    return problem.schedule.advance()


def log_as_of(problem, stats: dict, global_step: Optional[int], count: int) -> None:
    """A recorded local step's log line, written later with the count it had."""
    if problem.schedule.logs(count):
        with problem.schedule.as_of(count):
            problem.log(stats, global_step)


def _plain(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Logged values as numbers (a per-task tensor metric becomes its value)."""
    return {k: (v.item() if isinstance(v, Tensor) and v.numel() == 1 else v) for k, v in metrics.items()}


def _tensors(batch: Any) -> List[Tensor]:
    """The tensors in a batch (a tensor, or lists, tuples and dicts of them)."""
    return [leaf for leaf in tree_leaves(batch) if isinstance(leaf, Tensor)]


def _copies(named) -> dict:
    return {name: tensor.detach().clone() for name, tensor in named}


def _copy_into(buffers: dict, values: dict) -> None:
    with torch.no_grad():
        for name, tensor in buffers.items():
            tensor.copy_(values[name])
