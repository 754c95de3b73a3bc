"""The "+fused" forwards: a model's nn.Sequential runs BatchNorm2d (batch statistics) -> ReLU ->
MaxPool2d(2) as one op (``ops.batch_norm_relu_max_pool2d``), through a view of the model that
keeps its parameter names, or swapped in place for a call."""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.batch_norm_relu_max_pool import batch_norm_relu_max_pool2d
from .stacked import _pair, _StackedRule

class FusedBatchNormReLUMaxPool2d(nn.Module):
    """A BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2) run as one op, in the BatchNorm's place
    and under its parameter names ("weight", "bias"), so that functional_call's names still apply.
    Under vmap (a TaskBatchedModule's forwards) it runs on the tasks' stacked channels."""

    def __init__(self, batch_norm: nn.BatchNorm2d):
        super().__init__()
        self.eps = batch_norm.eps
        self.weight = batch_norm.weight
        self.bias = batch_norm.bias

    def forward(self, x: Tensor) -> Tensor:
        if torch._C._functorch.is_batchedtensor(x):
            return _StackedRule.apply("batch_norm_relu_max_pool2d", x, self.weight, self.bias, self.eps)
        return batch_norm_relu_max_pool2d(x, self.weight, self.bias, self.eps)


def _fusable(batch_norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether the three layers compute exactly batch_norm_relu_max_pool2d (and no hook sees them apart)."""
    if not (type(batch_norm) is nn.BatchNorm2d and type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d):
        return False
    if batch_norm.running_mean is not None or batch_norm.running_var is not None:
        return False  # running statistics: updated in training, used in eval
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in (batch_norm, relu, pool)):
        return False
    return (_pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _fusable_runs(children: Dict[str, Optional[nn.Module]]) -> List[List[str]]:
    """The names of each run of a Sequential's children that fuses, in order, none overlapping."""
    names, runs, i = list(children), [], 0
    while i + 2 < len(names):
        run = [children[n] for n in names[i:i + 3]]
        if all(m is not None for m in run) and _fusable(*run):
            runs.append(names[i:i + 3])
            i += 3
        else:
            i += 1
    return runs


def count_fusable_runs(model: nn.Module) -> int:
    """How many runs fuse_batch_norm_relu_max_pool would fuse in ``model``, changing nothing."""
    return sum(len(_fusable_runs(m._modules)) for m in model.modules() if isinstance(m, nn.Sequential))


def _fuse_run(children: Dict[str, Optional[nn.Module]], run: List[str]) -> None:
    children[run[0]] = FusedBatchNormReLUMaxPool2d(children[run[0]])
    children[run[1]], children[run[2]] = nn.Identity(), nn.Identity()


def fuse_batch_norm_relu_max_pool(model: nn.Module) -> Tuple[nn.Module, int]:
    """A view of ``model`` in which every ``nn.Sequential`` run BatchNorm2d (``track_running_stats=False``)
    -> ReLU -> MaxPool2d(2) (stride 2, no padding, no hooks) is one FusedBatchNormReLUMaxPool2d in the
    BatchNorm's place (ReLU and pooling become Identity), and the number of runs fused. The view shares
    every layer and parameter with ``model`` (containers on the way to a fused run are shallow copies),
    so its parameter and buffer names are the model's."""
    fused_runs = 0

    def fuse(module: nn.Module) -> nn.Module:
        nonlocal fused_runs
        children = {name: fuse(child) if child is not None else None for name, child in module._modules.items()}
        changed = any(children[name] is not child for name, child in module._modules.items())
        if isinstance(module, nn.Sequential):
            for run in _fusable_runs(children):
                _fuse_run(children, run)
                fused_runs += 1
                changed = True
        if not changed:
            return module
        view = copy.copy(module)
        view._modules = type(module._modules)(children)
        return view

    return fuse(model), fused_runs


@contextlib.contextmanager
def fused_in_place(*models: nn.Module):
    """Within the block, ``models``' fusable runs (as fuse_batch_norm_relu_max_pool's) are replaced in
    their Sequentials themselves, for code that calls the model object it holds (the Engine's task
    batching runs the user's training_step); the original layers are back on exit, even on an error."""
    swapped = []
    try:
        for model in models:
            for module in list(model.modules()):
                if isinstance(module, nn.Sequential):
                    for run in _fusable_runs(module._modules):
                        swapped.append((module, {n: module._modules[n] for n in run}))
                        _fuse_run(module._modules, run)
        yield len(swapped)
    finally:
        for module, originals in reversed(swapped):
            module._modules.update(originals)
