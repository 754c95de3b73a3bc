"""A model's parameters for T tasks at once: ``[T, *shape]`` tensors and a forward
over all T tasks (vmapped with torch.func, so convolutions run as grouped
convolutions, or a loop over tasks, or vmap with channel-stacked convolutions,
BatchNorm and pooling: the forwards of batched/forwards; see TaskBatchedModule), where every layer sees only its
own task's data (BatchNorm statistics included)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .fusion import (FusedBatchNormReLUMaxPool2d, count_fusable_runs, fuse_batch_norm_relu_max_pool,  # noqa: F401
                     fused_in_place)
from . import forwards
from .choice import Chooser, NoCandidateRan, TuningCache, choose, timer, tuning_cache
from .stacked import AutocastConvolutions, StackedLayers  # noqa: F401
from .stateful import warn_stateful_layers

# Leaf layers whose batching under vmap is known to be right (each task's
# slice of every input, parameter and buffer is used only by that task).
_SUPPORTED_WITH_PARAMS = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding, nn.PReLU,
)
_SUPPORTED_STATELESS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample,
)
_WHY_NOT = {
    nn.RNNBase: "recurrent layers run fused (cuDNN) kernels that torch.func.vmap cannot batch over tasks",
    nn.MultiheadAttention: "its fused attention path has no vmap batching rule for per-task weights",
    nn.SyncBatchNorm: "it reduces statistics across processes, which would pool tasks",
}


def check_batchable(model: nn.Module) -> None:
    """Raises ValueError naming the first layer the batched path cannot run, and why."""
    for name, module in model.named_modules():
        for kind, why in _WHY_NOT.items():
            if isinstance(module, kind):
                raise ValueError(
                    f"the batched path cannot run layer {name or '<root>'!r} ({type(module).__name__}): {why}"
                )
        if list(module.children()):
            continue  # a container: its leaves are checked
        if isinstance(module, _SUPPORTED_WITH_PARAMS + _SUPPORTED_STATELESS):
            continue
        has_state = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if has_state or type(module).forward is not nn.Module.forward:
            raise ValueError(
                f"the batched path cannot run layer {name or '<root>'!r} ({type(module).__name__}): it is not a "
                "standard torch.nn layer whose batching over tasks under torch.func.vmap is verified "
                "(supported: Linear, Conv*, BatchNorm*, LayerNorm, GroupNorm, InstanceNorm*, Embedding, PReLU, "
                "activations, pooling, Flatten, Dropout, padding); write its forward with functions of "
                "standard layers, or use the sequential path"
            )


class TaskBatchedModule:
    """T copies of ``model``'s parameters as ``[T, *shape]`` tensors and a
    forward over ``[T, B, ...]`` inputs. ``model`` itself holds theta (the
    meta-parameters); buffers (e.g. BatchNorm running statistics) are kept per
    task.

    ``forward``: a name registered in ``imaml_ext.batched.forwards`` (all compute the same values,
    up to float rounding): "loop", "vmap", "stacked", "im2col", "channels_last" and, for each but
    "channels_last", its "+fused" form (each ``nn.Sequential`` run BatchNorm2d (batch statistics) ->
    ReLU -> MaxPool2d(2) as one op, ``imaml_ext.ops.batch_norm_relu_max_pool2d``; a model with no
    such run is told so once and runs unfused); see ``forwards.describe()``. Or "auto": for each
    input shape (and dtype, grad mode, thread count, autocast, CUDA device), the fastest of what
    ``forwards.auto_plans`` lists for the device (on a CPU "loop", "stacked" and "stacked" over
    chunks of 8 or 4 tasks, each also "+fused" when the model has a run to fuse; on CUDA "vmap",
    "stacked", "im2col" and "channels_last"; elsewhere "vmap" untimed), by a timed forward and
    backward of each at the first call of that shape (``choice.choose``; never inside a CUDA-graph
    capture), kept in ``forward_choices`` and in ``tuning_cache`` when there is one (see
    ``batched/choice.py``). Pass the same ``choices`` dict to later instances of the same model to
    keep them (IMAML does, across meta-batch sizes). The first call of a shape pays the timing: two
    to three forwards and backwards of each.
    """

    def __init__(self, model: nn.Module, num_tasks: int, forward: str = "auto", choices: Optional[dict] = None,
                 tuning_cache: Optional[TuningCache] = None):
        forwards.check("forward", forward)
        self.forward_mode = forward
        self.forward_choices = {} if choices is None else choices
        self._chooser = Chooser("forward", self.forward_choices, tuning_cache)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_num_tasks(num_tasks)
        check_batchable(model)
        self.model = model
        self.num_tasks = num_tasks
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError(f"model ({type(model).__name__}) has no trainable parameters to adapt")
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self.buffers = self.fresh_buffers(num_tasks)
        self._fused_views: Dict[tuple, Tuple[nn.Module, int]] = {}
        if forward.endswith(forwards.FUSED) and self.fused_model()[1] == 0:
            warnings.warn(f"forward={forward!r}: {type(model).__name__} has no nn.Sequential run BatchNorm2d "
                          "(track_running_stats=False) -> ReLU -> MaxPool2d(2) to fuse; it runs as "
                          f"{forward[:-len(forwards.FUSED)]!r}", RuntimeWarning, stacklevel=2)

    def fused_model(self) -> Tuple[nn.Module, int]:
        """The model with its fusable runs fused (fuse_batch_norm_relu_max_pool), and how many, for the
        modules' current train / eval flags (kept per set of flags)."""
        key = tuple(m.training for m in self.model.modules())
        if key not in self._fused_views:
            self._fused_views[key] = fuse_batch_norm_relu_max_pool(self.model)
        return self._fused_views[key]

    def theta(self) -> List[Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def fresh_buffers(self, num_tasks: int) -> Dict[str, Tensor]:
        return {n: b.detach().unsqueeze(0).repeat(num_tasks, *([1] * b.dim())) for n, b in self.model.named_buffers()}

    def expand_theta(self, num_tasks: Optional[int] = None) -> List[Tensor]:
        """phi = theta for every task: one copy per tensor into fresh [T, *shape] storage."""
        t = self.num_tasks if num_tasks is None else num_tasks
        return [p.detach().unsqueeze(0).expand(t, *p.shape).clone() for p in self.theta()]

    def forward(self, phi: Sequence[Tensor], x: Tensor, buffers: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Outputs [T, B, ...] for inputs [T, B, ...] and parameters [T, *shape]."""
        buffers = self.buffers if buffers is None else buffers
        mode = self.forward_mode
        if mode == forwards.AUTO:
            mode = self.auto_forward(phi, x, buffers)
        return self._forward(mode, phi, x, buffers)

    __call__ = forward

    def _forward(self, label: str, phi: Sequence[Tensor], x: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        """The outputs under the forward ``label`` names (e.g. "stacked/8+fused", forwards.parse)."""
        plan = forwards.parse(label)
        if plan.chunk is not None:
            # split, not slices: one cat per tensor in the backward, no zero-filled [T, ...] gradients
            whole = replace(plan, chunk=None).label
            parts = list(zip(*[p.split(plan.chunk) for p in phi]))
            bufs = {k: b.split(plan.chunk) for k, b in buffers.items()}
            return torch.cat([self._forward(whole, list(parts[i]), xs, {k: b[i] for k, b in bufs.items()})
                              for i, xs in enumerate(x.split(plan.chunk))])
        model = self.fused_model()[0] if plan.fused else self.model
        names = self.names

        def one_task(params, bufs, inputs):
            return functional_call(model, ({**dict(zip(names, params)), **bufs}), (inputs,))

        if not plan.forward.vmapped:
            # unbind, not phi[t]: its backward is one stack per tensor, where T selects would
            # each write a zero-filled [T, *shape] gradient.
            per_task = list(zip(*[p.unbind(0) for p in phi]))
            bufs = {k: b.unbind(0) for k, b in buffers.items()}
            outs = [one_task(list(per_task[t]), {k: b[t] for k, b in bufs.items()}, xt)
                    for t, xt in enumerate(x.unbind(0))]
            return torch.stack(outs)
        autocast = AutocastConvolutions.under(x.device.type)

        def vmapped_task(params, bufs, inputs):
            with autocast, plan.forward.layers():
                return one_task(params, bufs, inputs)

        return vmap(vmapped_task, in_dims=(0, 0, 0), randomness="different")(list(phi), buffers, x)

    def auto_forward(self, phi: Sequence[Tensor], x: Tensor, buffers: Dict[str, Tensor]) -> str:
        """The forward "auto" runs for these inputs (a label ``forwards.parse`` reads): the one of
        ``forwards.auto_plans`` timed fastest for this shape (see the class), or kept; where nothing
        is timed, ``forwards.UNTIMED_DEFAULT``."""
        device = x.device.type
        if not forwards.timed_on(device):
            return forwards.UNTIMED_DEFAULT
        grad = torch.is_grad_enabled()
        key = (tuple(x.shape), str(x.dtype).replace("torch.", ""), "grad" if grad else "no_grad",
               torch.get_num_threads(), torch.is_autocast_enabled(device))
        if device == "cuda":  # a CPU's keys stay as checkpoints of CPU runs hold them
            key += (str(x.device),)
        kept = self.forward_choices.get(key)
        if kept is not None:  # every call after a shape's first
            return kept["forward"]
        plans = forwards.auto_plans(device, self.fused_model()[1] > 0, x.shape[0])
        if device == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                'forward="auto" times its choice at the first call of an input shape, which cannot run inside '
                "a CUDA-graph capture; run the step once eagerly first (IMAML.capture's warm-up does) or pass "
                'forward="vmap", "stacked", "im2col" or "channels_last"'
            )
        labels = [plan.label for plan in plans]
        choice = self._chooser.get(key, labels, lambda: self._time_forwards(phi, x, buffers, grad, labels))
        return choice["forward"]

    def _time_forwards(self, phi, x, buffers, grad: bool, modes: Sequence[str]) -> dict:
        """``choice.choose`` over ``modes``: each a forward (with its backward to phi when grad is on).
        Buffers are cloned and the caller's saved-tensor hooks (e.g. MAML's graph meter) shadowed by
        identity ones: the timing changes nothing. A mode that raises is left out, with a warning
        naming its cause (kept under "refused")."""
        probe = [p.detach().requires_grad_(grad) for p in phi]

        def run(mode: str) -> None:
            out = self._forward(mode, probe, x, {k: b.clone() for k, b in buffers.items()})
            if grad and out.requires_grad:
                torch.autograd.grad(out.sum(), probe, allow_unused=True)

        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            try:
                choice = choose("forward", modes, lambda mode: timer(x.device, lambda: run(mode)), x.device)
            except NoCandidateRan as error:
                causes = {mode: str(e).splitlines()[0] for mode, e in error.errors.items()}
                raise RuntimeError(f'forward="auto": every forward it times failed here ({causes})') from None
        if "refused" in choice:
            causes = "; ".join(f"{mode}: {cause}" for mode, cause in choice["refused"].items())
            warnings.warn(f'forward="auto" left out forwards that failed here ({causes}); it keeps '
                          f'"{choice["forward"]}" for input shape {tuple(x.shape)}', RuntimeWarning, stacklevel=6)
        return choice


def _same(tensor: Tensor) -> Tensor:
    return tensor


def check_num_tasks(num_tasks) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"the number of tasks T must be an integer >= 1; got {num_tasks!r}")


class BatchedModule(nn.Module):
    """An ``nn.Module`` holding T task copies of ``model``'s parameters as
    ``[T, *shape]`` Parameters, for the Betty-compatible API: a lower problem's
    module that adapts every task of a meta-batch at once.

    ``forward(x)`` maps ``[T, B, ...]`` to ``[T, B, ...]`` (task t's inputs
    through task t's parameters, BatchNorm statistics per task).
    ``load_state_dict(model.state_dict())`` with the single model's keys copies
    it into every task (the tutorial's ``on_inner_loop_start`` line works
    unchanged); a BatchedModule's own state dict loads as usual.
    """

    def __init__(self, model: nn.Module, num_tasks: int, forward: str = "auto"):
        super().__init__()
        self._batched = TaskBatchedModule(model, num_tasks, forward, tuning_cache=tuning_cache())
        warn_stateful_layers(model, "BatchedModule")
        self.num_tasks = num_tasks
        self._keys = {n: n.replace(".", "__") for n in self._batched.names}
        for name, phi in zip(self._batched.names, self._batched.expand_theta()):
            self.register_parameter(self._keys[name], nn.Parameter(phi))
        for name, buf in self._batched.buffers.items():
            self.register_buffer(name.replace(".", "__"), buf)

    def task_parameters(self) -> List[Tensor]:
        return [getattr(self, self._keys[n]) for n in self._batched.names]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] != self.num_tasks:
            raise ValueError(
                f"BatchedModule: inputs must be [T, B, ...] with T = {self.num_tasks} tasks; got shape {tuple(x.shape)}"
            )
        buffers = {n: getattr(self, n.replace(".", "__")) for n in self._batched.buffer_names}
        return self._batched.forward(self.task_parameters(), x, buffers)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        template_keys = set(self._batched.model.state_dict().keys())
        if template_keys and set(state_dict.keys()) == template_keys:
            params = self.task_parameters()
            with torch.no_grad():
                torch._foreach_copy_(
                    params, [state_dict[n].to(p.device, p.dtype).expand_as(p) for n, p in zip(self._batched.names, params)]
                )
                for name in self._batched.buffer_names:
                    mine = getattr(self, name.replace(".", "__"))
                    mine.copy_(state_dict[name].to(mine.device).expand_as(mine))
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each task: logits [T, B, C], labels [T, B] -> [T].
    Sum it for a batched lower problem's loss (each task's gradient is then its
    own), average it for the upper's (the meta-gradient's mean over tasks)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"task_cross_entropy: logits must be [T, B, C] and labels [T, B]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    t, b = labels.shape
    return F.cross_entropy(logits.reshape(t * b, -1), labels.reshape(-1), reduction="none").view(t, b).mean(1)


__all__ = ["TaskBatchedModule", "BatchedModule", "task_cross_entropy", "check_batchable", "FusedBatchNormReLUMaxPool2d",
           "fuse_batch_norm_relu_max_pool", "fused_in_place", "count_fusable_runs"]
