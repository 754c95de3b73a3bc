"""Input checks of the public op wrappers.

Every message names the argument, says what was expected and shows what came.
They run before anything is modified, whichever backend then runs, so the CPU,
CUDA and reference paths reject the same inputs with the same words.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)


def describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__} {t!r}"


def as_tensor_list(op: str, name: str, value: object) -> List[Tensor]:
    if isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors; got a single {describe(value)}")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors; got {describe(value)}")
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor; got {describe(t)}")
    return list(value)


def check_task_list(op: str, name: str, tensors: Sequence[Tensor]) -> int:
    """[T, *shape] tensors of one float dtype on one device, T >= 1 and equal. Returns T."""
    if len(tensors) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty list of [T, ...] tensors; got an empty list")
    first = tensors[0]
    if first.dim() < 1 or first.shape[0] < 1:
        raise ValueError(f"{op}: {name}[0] must have a leading task dimension T >= 1; got {describe(first)}")
    num_tasks = first.shape[0]
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name}[{i}] must be float32 or float64; got {describe(t)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name}[{i}] must have the dtype of {name}[0] ({first.dtype}); got {describe(t)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name}[{i}] must be on the device of {name}[0] ({first.device}); got {describe(t)}")
        if t.dim() < 1 or t.shape[0] != num_tasks:
            raise ValueError(
                f"{op}: {name}[{i}] must have T = {num_tasks} tasks in its first dimension "
                f"(as {name}[0]); got {describe(t)}"
            )
    return num_tasks


def _check_length(op: str, name: str, tensors: Sequence[Tensor], like_name: str, like: Sequence[Tensor]) -> None:
    if len(tensors) != len(like):
        raise ValueError(
            f"{op}: {name} must hold one tensor per {like_name} tensor ({len(like)}); got {len(tensors)}"
        )


def _check_matches(op: str, name: str, t: Tensor, like_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {like_name} ({ref.dtype}); got {describe(t)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {like_name} ({ref.device}); got {describe(t)}")


def check_same_list(op: str, name: str, tensors: Sequence[Tensor], like_name: str, like: Sequence[Tensor]) -> None:
    _check_length(op, name, tensors, like_name, like)
    for i, (t, ref) in enumerate(zip(tensors, like)):
        if t.shape != ref.shape:
            raise ValueError(
                f"{op}: {name}[{i}] must have the shape of {like_name}[{i}] {tuple(ref.shape)}; got {describe(t)}"
            )
        _check_matches(op, f"{name}[{i}]", t, f"{like_name}[{i}]", ref)


def check_anchor_list(op: str, name: str, anchors: Sequence[Tensor], like_name: str, like: Sequence[Tensor]) -> None:
    _check_length(op, name, anchors, like_name, like)
    for i, (t, ref) in enumerate(zip(anchors, like)):
        if t.shape != ref.shape[1:]:
            raise ValueError(
                f"{op}: {name}[{i}] must have the shape of {like_name}[{i}] without its task dimension "
                f"{tuple(ref.shape[1:])}; got {describe(t)}"
            )
        _check_matches(op, f"{name}[{i}]", t, f"{like_name}[{i}]", ref)


def check_number(op: str, name: str, value: object, *, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 when positive)."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a finite number {bound}; got {describe(value)}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{op}: {name} must be a finite number {bound}; got {value!r}")
    return value


def number_or_per_task(
    op: str, name: str, value: Union[float, Tensor], num_tasks: int, like: Tensor, *, positive: bool = False
) -> Tuple[float, Optional[Tensor]]:
    """A Python number, or a [T] (or 0-d) tensor of per-task values on the parameters' device.

    Returns (number, None) or (1.0, contiguous [T] tensor of like's dtype). Values
    of a tensor on the CPU are checked; on a GPU they are not, since reading
    them would cost a host synchronisation.
    """
    if not isinstance(value, Tensor):
        return check_number(op, name, value, positive=positive), None
    bound = "> 0" if positive else ">= 0"
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != num_tasks):
        raise ValueError(f"{op}: {name} must be a number or a [T] = [{num_tasks}] tensor; got {describe(value)}")
    if not (value.is_floating_point()):
        raise TypeError(f"{op}: {name} must be a floating-point tensor; got {describe(value)}")
    if value.device != like.device:
        raise ValueError(f"{op}: {name} must be on the parameters' device ({like.device}); got {describe(value)}")
    if value.device.type == "cpu":
        bad = ~torch.isfinite(value) | (value <= 0 if positive else value < 0)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0]) if value.dim() == 1 else 0
            shown = value.reshape(-1)[first].item()
            where = f"[{first}]" if value.dim() == 1 else ""
            raise ValueError(f"{op}: {name}{where} must be a finite number {bound}; got {shown!r}")
    per_task = value.to(like.dtype).expand(num_tasks).contiguous()
    return 1.0, per_task


def check_iters(op: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer >= 1; got {describe(value)}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be an integer >= 1; got {value!r}")
    return int(value)
