"""A model's parameters for T tasks at once: ``[T, *shape]`` tensors and one
vmapped forward (torch.func), so convolutions run as grouped convolutions
and every layer sees only its own task's data (BatchNorm statistics included)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

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
    task."""

    FORWARDS = ("auto", "vmap", "loop")

    def __init__(self, model: nn.Module, num_tasks: int, forward: str = "auto"):
        if forward not in self.FORWARDS:
            raise ValueError(f"forward must be one of {', '.join(map(repr, self.FORWARDS))}; got {forward!r}")
        self.forward_mode = forward
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
        names = self.names

        def one_task(params, bufs, inputs):
            return functional_call(self.model, ({**dict(zip(names, params)), **bufs}), (inputs,))

        mode = self.forward_mode
        if mode == "auto":
            # Measured on the 2-core CPU: the per-task loop of dense convolutions
            # beats vmap's grouped ones (about 3x in a 75-image HVP, 1.35-1.4x
            # over a whole meta-step, benchmarks/results/meta_step-cpu-*); on a
            # GPU one vmapped launch per layer wins (13x on an H200).
            mode = "loop" if x.device.type == "cpu" else "vmap"
        if mode == "loop":
            outs = [one_task([p[t] for p in phi], {k: b[t] for k, b in buffers.items()}, x[t]) for t in range(x.shape[0])]
            return torch.stack(outs)
        return vmap(one_task, in_dims=(0, 0, 0), randomness="different")(list(phi), buffers, x)

    __call__ = forward


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
        self._batched = TaskBatchedModule(model, num_tasks, forward)
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


__all__ = ["TaskBatchedModule", "BatchedModule", "task_cross_entropy", "check_batchable"]
