"""What ``IMAML`` and ``MAML`` share: a classification model's meta-batch of tasks at once,
checked (shapes, devices, dtypes, labels), its batched forward (with "auto"'s timed choices), the
per-task means that leave non-finite tasks out, ``adapt``/``evaluate``, the meta-step that adds
the meta-gradient to theta's ``.grad``, and its CUDA-graph capture. Each subclass brings its
inner loop (``_inner_loop``) and meta-gradient (``_meta_gradient``)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import CGInfo
from . import forwards
from .choice import tuning_cache as tuning_cache_for
from .module import TaskBatchedModule
from .stateful import warn_stateful_layers
from .tf32 import TF32


class MetaStepResult(NamedTuple):
    """Tensors on the device: reading them (``.item()``) is the only host sync."""

    loss: Tensor  # mean query loss over tasks, after adaptation
    accuracy: Tensor  # mean query accuracy over tasks, in [0, 1]
    support_loss: Tensor  # mean support loss at the end of the inner loop
    cg: Optional[CGInfo]  # per-task CG diagnostics (None for MAML, which solves nothing)
    nonfinite: Optional[Tensor] = None  # [T] bool: tasks whose losses or meta-gradient were not finite
    loss_scale: Optional[Tensor] = None  # precision="fp16": the loss scale this step used


def _check_positive(name: str, value, integer: bool = False, allow_zero: bool = False, owner: str = "IMAML") -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (integer and not isinstance(value, int)) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{owner}: {name} must be {kind} {'>= 0' if allow_zero else '> 0'}; got {value!r}")


class BatchedMetaLearner:
    """The shared half of ``IMAML`` and ``MAML`` (see the module's docstring)."""

    NONFINITE = ("propagate", "skip")
    AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
    precision = "fp32"  # IMAML's bf16 / fp16 set their own

    def __init__(self, model: nn.Module, inner_steps: int, inner_lr: float, ways: Optional[int], check_labels: bool,
                 forward: str, tf32: Optional[bool], nonfinite: str, tuning_cache=None):
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module; got {type(model).__name__}")
        _check_positive("inner_steps", inner_steps, integer=True, allow_zero=True, owner=owner)
        _check_positive("inner_lr", inner_lr, owner=owner)
        if ways is not None:
            _check_positive("ways", ways, integer=True, owner=owner)
        self.model = model
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.ways = ways
        self.check_labels = check_labels
        self.forward = forwards.check(f"{owner}: forward", forward)
        # forward="auto": the forward timed fastest per input shape (TaskBatchedModule.auto_forward), kept across
        # meta-batch sizes; hvp="auto" (IMAML): {key: {"hvp": the mode, "ms": predicted solve time of each}}.
        # Both also in the machine's tuning cache when there is one (batched/choice.py).
        self.forward_choices: dict = {}
        self.hvp_choices: dict = {}
        self.tuning_cache = tuning_cache_for(tuning_cache)
        self._tf32 = TF32(owner, tf32)
        self.tf32 = tf32
        if nonfinite not in self.NONFINITE:
            raise ValueError(f"{owner}: nonfinite must be one of {', '.join(map(repr, self.NONFINITE))}; "
                             f"got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._batched: Optional[TaskBatchedModule] = None
        self._classes: Optional[int] = None
        warn_stateful_layers(model, owner)

    def _inner_loop(self, module, support_x, support_y, steps, check):
        """phi, [T, *shape] per parameter, after ``steps`` inner steps from theta, without a graph."""
        raise NotImplementedError

    def _meta_gradient(self, module, support_x, support_y, query_x, query_y):
        """(the mean meta-gradient per theta tensor, MetaStepResult)."""
        raise NotImplementedError

    # ----- timed choices -----
    def timed_choices(self) -> dict:
        """What forward="auto" and hvp="auto" chose so far, per key: plain dicts, tuples, strings and
        numbers (a checkpoint keeps them, so a resumed run computes as the uninterrupted one)."""
        return {"forward": dict(self.forward_choices), "hvp": dict(self.hvp_choices)}

    def keep_timed_choices(self, choices: Optional[dict]) -> None:
        """Uses ``choices`` (from ``timed_choices``) instead of timing those keys again."""
        if choices is None:
            return
        if not isinstance(choices, dict) or not set(choices) <= {"forward", "hvp"}:
            raise ValueError(f"{type(self).__name__}: choices must be a dict from timed_choices(); got {choices!r}")
        self.forward_choices.update(choices.get("forward", {}))
        self.hvp_choices.update(choices.get("hvp", {}))

    # ----- helpers -----
    def batched(self, num_tasks: int) -> TaskBatchedModule:
        if self._batched is None or self._batched.num_tasks != num_tasks:
            self._batched = TaskBatchedModule(self.model, num_tasks, self.forward, self.forward_choices,
                                              self.tuning_cache)
        else:
            self._batched.buffers = self._batched.fresh_buffers(num_tasks)
        return self._batched

    def _check_batch(self, support_x, support_y, query_x=None, query_y=None) -> int:
        named = [("support_x", support_x), ("support_y", support_y)]
        if query_x is not None:
            named += [("query_x", query_x), ("query_y", query_y)]
        for name, t in named:
            if not isinstance(t, Tensor):
                raise TypeError(f"{type(self).__name__}: {name} must be a tensor; got {type(t).__name__}")
            if t.dim() < (2 if name.endswith("y") else 3):
                want = "[T, N]" if name.endswith("y") else "[T, N, ...]"
                raise ValueError(f"{type(self).__name__}: {name} must be {want} (tasks first); got shape {tuple(t.shape)}")
        num_tasks = support_x.shape[0]
        if num_tasks == 0:
            raise ValueError(f"{type(self).__name__}: the meta-batch must hold at least one task; got T = 0")
        for name, t in named[1:]:
            if t.shape[0] != num_tasks:
                raise ValueError(
                    f"{type(self).__name__}: {name} must have the T = {num_tasks} tasks of support_x; got shape {tuple(t.shape)}"
                )
        theta = next(self.model.parameters())
        for name, t in named:
            if t.device != theta.device:
                raise ValueError(f"{type(self).__name__}: {name} must be on the model's device ({theta.device}); got {t.device}")
        pairs = [(named[0], named[1])] + ([(named[2], named[3])] if len(named) == 4 else [])
        for (x_name, x), (y_name, y) in pairs:
            if x.dtype != theta.dtype:
                raise TypeError(f"{type(self).__name__}: {x_name} must have the model's dtype ({theta.dtype}); got {x.dtype}")
            if y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"{type(self).__name__}: {y_name} must have one label per example of {x_name} {tuple(x.shape[:2])}; "
                    f"got shape {tuple(y.shape)}"
                )
            if y.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{type(self).__name__}: {y_name} must hold integer class labels; got dtype {y.dtype}")
        return num_tasks

    def _num_classes(self, module: TaskBatchedModule, x: Tensor) -> int:
        """ways, or the model's output width (one example through theta, once)."""
        if self._classes is None:
            with torch.no_grad():
                out = module.forward([p.detach().unsqueeze(0) for p in module.theta()], x[:1, :1],
                                     {k: b[:1] for k, b in module.buffers.items()})
            self._classes = out.shape[-1]
        if self.ways is not None and self._classes != self.ways:
            raise ValueError(f"{type(self).__name__}: the model outputs {self._classes} classes but ways = {self.ways}")
        return self._classes

    def _check_label_range(self, module: TaskBatchedModule, x: Tensor, *labels: Tuple[str, Tensor]) -> None:
        ways = self._num_classes(module, x)
        bounds = torch.stack([v for _, y in labels for v in (y.min(), y.max())]).tolist()  # the one host sync
        for (name, _), low, high in zip(labels, bounds[0::2], bounds[1::2]):
            if low < 0 or high >= ways:
                raise ValueError(
                    f"{type(self).__name__}: {name} must hold labels in [0, {ways - 1}] ({ways} ways); got labels in [{low}, {high}]"
                )

    def _logits(self, module: TaskBatchedModule, phi: Sequence[Tensor], x: Tensor, for_hvp: bool = False,
                buffers: Optional[dict] = None) -> Tensor:
        """module(phi, x), under bfloat16 / float16 autocast with precision "bf16" / "fp16": phi,
        its gradients, the HVPs and CG stay float32, and the logits come back float32.

        fp16 builds the HVPs' graph in float32: their double backward through BatchNorm left
        float16's range (65504) at a trained theta for every loss scale above 2**-12, where the
        first-order gradients underflow (measured on Conv4-32, Omniglot, 2026-11-28)."""
        if self.precision == "fp32" or (for_hvp and self.precision == "fp16"):
            return module(phi, x, buffers)
        # No cast cache: phi changes every step, and a cache would outlive a CUDA-graph capture.
        with torch.autocast(x.device.type, dtype=self.AUTOCAST_DTYPES[self.precision], cache_enabled=False):
            return module(phi, x, buffers).float()

    @staticmethod
    def task_losses(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy per task: [T]."""
        t, n = labels.shape[:2]
        return F.cross_entropy(logits.reshape(t * n, -1), labels.reshape(-1), reduction="none").view(t, n).mean(1)

    # ----- the inner loop -----
    def adapt(self, support_x: Tensor, support_y: Tensor, inner_steps: Optional[int] = None):
        """phi for every task after the proximal inner loop: a list of [T, *shape] tensors
        (and the batched module whose forward runs them)."""
        num_tasks = self._check_batch(support_x, support_y)
        module = self.batched(num_tasks)
        steps = self.inner_steps if inner_steps is None else inner_steps
        with self._tf32(support_x.device):
            phi = self._inner_loop(module, support_x, support_y, steps, check=self.check_labels)
        return phi, module

    def _too_big(self, error: Exception, num_tasks: int, theta: Sequence[Tensor]) -> Exception:
        if isinstance(error, torch.OutOfMemoryError) or "allocate" in str(error) or "out of memory" in str(error):
            per_task = sum(p.numel() * p.element_size() for p in theta)
            device = theta[0].device
            return MemoryError(
                f"{type(self).__name__}: a meta-batch of T = {num_tasks} tasks does not fit on {device}: each task holds "
                f"{per_task / 2**20:.1f} MiB of parameters (x ~6 for phi, gradients and the CG vectors) plus "
                f"its activations; use a smaller meta-batch (or split it over steps or devices). ({error})"
            )
        return error

    # ----- the meta-step -----
    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaStepResult:
        """One meta-step over a batch of T tasks: each task's proximal inner loop from theta, then
        the implicit meta-gradient, whose mean over the tasks is added to theta's ``.grad`` (as
        ``backward()`` would; zero it before and step an optimizer after).

        ``support_x`` / ``query_x`` are ``[T, n, *input]``, ``support_y`` / ``query_y`` the
        ``[T, n]`` labels in ``[0, ways)``, all on the model's device (what
        ``TaskSampler.sample(T)`` returns). The returned :class:`MetaStepResult` holds device
        tensors (the query loss and accuracy, the support loss, the CG info, the non-finite
        mask); the step itself syncs with the host only to check the labels' range
        (``check_labels=False`` turns that off)."""
        num_tasks = self._check_batch(support_x, support_y, query_x, query_y)
        module = self.batched(num_tasks)
        theta = module.theta()
        try:
            with self._tf32(support_x.device):
                return self._meta_step(module, theta, num_tasks, support_x, support_y, query_x, query_y)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            raised = self._too_big(error, num_tasks, theta)
            if raised is error:
                raise
            raise raised from error

    def _meta_step(self, module, theta, num_tasks, support_x, support_y, query_x, query_y) -> MetaStepResult:
        if self.check_labels:
            self._check_label_range(module, support_x, ("support_y", support_y), ("query_y", query_y))
        meta_grads, result = self._meta_gradient(module, support_x, support_y, query_x, query_y)
        with torch.no_grad():
            for p, g in zip(theta, meta_grads):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))
        return result

    def _task_means(self, bad: Tensor):
        """(mean, reported): means over the tasks of [T, ...] values, given the [T] mask of non-finite
        tasks. "skip": over the finite tasks only, a zero gradient when there is none, and the
        reported losses NaN then (nothing to average), never 0. "propagate": a non-finite task
        poisons both, as plain autograd would (CG stops such a task at its last good iterate, so
        its NaN is put back here)."""
        if self.nonfinite == "skip":
            kept = (~bad).sum()

            def mean(values: Tensor) -> Tensor:
                return torch.where(bad.view(-1, *[1] * (values.dim() - 1)), 0, values).sum(0) / kept.clamp(min=1)

            return mean, lambda values: torch.where(kept > 0, mean(values), float("nan"))

        def poisoned(values: Tensor) -> Tensor:
            return torch.where(bad.view(-1, *[1] * (values.dim() - 1)), float("nan"), values).mean(0)

        return poisoned, poisoned

    def capture(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                warmup: int = 3) -> "CapturedMetaStep":
        """The whole meta-step (inner loop, HVPs, CG) as one CUDA graph for batches
        of these shapes: calling the result replays it with new batches and gives
        the same numbers as ``meta_step``, without launch or Python overhead."""
        return CapturedMetaStep(self, support_x, support_y, query_x, query_y, warmup)

    @torch.no_grad()
    def evaluate(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                 inner_steps: Optional[int] = None, per_task: bool = False) -> Tuple[Tensor, Tensor]:
        """(query loss, query accuracy) after adapting every task: tensors, their means over
        tasks, or with ``per_task`` one value per task ([T] each)."""
        self._check_batch(support_x, support_y, query_x, query_y)
        phi, module = self.adapt(support_x, support_y, inner_steps)
        with self._tf32(query_x.device):
            logits = self._logits(module, phi, query_x)
        losses, accuracies = self.task_losses(logits, query_y), (logits.argmax(-1) == query_y).float().mean(1)
        return (losses, accuracies) if per_task else (losses.mean(), accuracies.mean())


class CapturedMetaStep:
    """``IMAML.meta_step`` captured as a CUDA graph for fixed shapes.

    ``step(support_x, support_y, query_x, query_y)`` copies the batches into the
    graph's static inputs, replays it, and adds the meta-gradient to theta's
    ``.grad`` (outside the graph, so ``optimizer.zero_grad()`` may free .grad).
    The returned MetaStepResult's tensors are the graph's: the next replay
    overwrites them. Labels are checked once, at capture.
    """

    def __init__(self, imaml: BatchedMetaLearner, support_x, support_y, query_x, query_y, warmup: int = 3):
        inputs = (support_x, support_y, query_x, query_y)
        num_tasks = imaml._check_batch(*inputs)
        if support_x.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"{type(imaml).__name__}.capture needs CUDA tensors (CUDA graphs); got tensors on {support_x.device}")
        self.imaml = imaml
        self.module = imaml.batched(num_tasks)
        self.theta = self.module.theta()
        if imaml.check_labels:
            imaml._check_label_range(self.module, support_x, ("support_y", support_y), ("query_y", query_y))
        self.static = [t.clone() for t in inputs]
        self.names = ("support_x", "support_y", "query_x", "query_y")

        def run():
            with imaml._tf32(support_x.device):  # the kernels a replay runs are chosen here
                grads, result = imaml._meta_gradient(self.module, *self.static)
            return grads, result

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch requires
            for _ in range(max(1, warmup)):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.meta_grads, self.result = run()

    def step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaStepResult:
        for name, static, new in zip(self.names, self.static, (support_x, support_y, query_x, query_y)):
            if not isinstance(new, Tensor) or new.shape != static.shape or new.dtype != static.dtype:
                got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"CapturedMetaStep: {name} must match the captured batch ({tuple(static.shape)} {static.dtype}); "
                    f"got {got}: capture again for new shapes"
                )
            static.copy_(new)
        self.graph.replay()
        with torch.no_grad():
            for p, g in zip(self.theta, self.meta_grads):
                if p.grad is None:
                    p.grad = g.to(p.dtype).clone()
                else:
                    p.grad.add_(g.to(p.grad.dtype))
        return self.result

    __call__ = step


__all__ = ["BatchedMetaLearner", "CapturedMetaStep", "MetaStepResult"]
