"""``IMAML``: the batched implicit-MAML meta-step, every task of a meta-batch at once.

The maths, per task t: phi_t starts at theta and takes ``inner_steps`` steps
phi <- phi - inner_lr * (grad L_support(phi) + lam * (phi - theta)) (L = mean
cross-entropy). The meta-gradient is mean_t (I + H_t / lam)^-1 grad L_query(phi_t),
H_t the Hessian of L_support at phi_t, added to theta's ``.grad``. (The
tutorial's reg * ||phi - theta||^2 is lam = 2 * reg.)

``cg_damping`` and ``lam_damping`` (both 0 by default: the maths above) solve
the damped system ((1 + cg_damping) I + H_t / (lam + lam_damping)) x = grad L_query
instead, as the iMAML authors' code does (there 1 and 10). Away from the inner
problem's minimum H_t can have eigenvalues below -lam, where I + H_t/lam is
indefinite and CG breaks down; damping keeps the system positive definite.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import CGInfo
from . import hvp as support_hvp
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


def _check_positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (integer and not isinstance(value, int)) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"IMAML: {name} must be {kind} {'>= 0' if allow_zero else '> 0'}; got {value!r}")


class IMAML:
    """Batched implicit MAML for a classification ``model`` (any nn.Module of
    standard layers; its parameters are theta).

    ``meta_step(support_x, support_y, query_x, query_y)`` takes ``[T, ...]``
    batches, adds the meta-gradient to theta's ``.grad`` (as ``backward()``
    would, so any torch optimizer steps it) and returns a
    :class:`MetaStepResult`. ``adapt`` returns phi for evaluation.

    - inner loop: one fused ``imaml_ext.ops.prox_sgd_step_`` per step for all
      tasks; no graph is kept across steps, so memory is flat in ``inner_steps``;
    - ``hvp``: how the Hessian-vector products of the solve are computed: "reverse"
      (double backward through one support-gradient graph built once per solve and
      reused by every CG iteration), "forward" (``torch.func.jvp`` of ``torch.func.grad``,
      forward-over-reverse: a forward and a backward pass per product, no graph kept)
      or "auto" (the faster of the two over a solve, timed once per device, input shape,
      forward and precision and kept in ``hvp_choices``);
    - ``tf32``: None (torch's settings as they are: by default cuDNN convolutions in
      TensorFloat-32, matrix products in IEEE float32), True (both in TF32) or False (both
      in IEEE float32) for the CUDA work of ``meta_step``, ``adapt``, ``evaluate`` and
      ``capture``, restored after each call; nothing changes off CUDA;
    - CG: ``imaml_ext.ops.cg_solve``, per-task scalars on the device;
    - ``forward``: "vmap" (grouped convolutions, one launch per layer), "loop"
      (dense per-task layers), "stacked" (vmap with the convolutions, BatchNorm and
      max-pooling on the tasks' stacked channels), "im2col" ("stacked" with the dense
      convolutions as im2col and one batched matrix product over tasks), "channels_last"
      ("stacked" in channels-last memory layout) or "auto" (on a CPU the fastest of "loop"
      and "stacked", on CUDA of "vmap", "stacked", "im2col" and "channels_last", timed at
      the first call of each input shape and kept in ``forward_choices``);
    - ``check_labels``: one host sync per call to check the labels' range
      (out-of-range labels would give an unreadable device assert on CUDA);
      turn it off for sync-free steps and CUDA-graph capture.
    - ``nonfinite``: "propagate" (a NaN in one task reaches theta's gradient, as
      autograd would) or "skip" (tasks whose support or query loss, an HVP, or the
      meta-gradient is not finite are left out of the mean, found by masks on the device, no
      sync); either way ``MetaStepResult.nonfinite`` names them. With "skip", a meta-batch
      whose tasks are all non-finite adds a zero meta-gradient and reports NaN losses and
      accuracy (there is nothing to average), with ``nonfinite`` all True.
    - ``precision``: "fp32", "bf16" or "fp16", with float32 master weights, phi,
      gradients, CG vectors and scalars. bf16: every forward (inner loop, query loss, the
      support-gradient graph behind the HVPs) under bfloat16 autocast. fp16: the inner
      loop's and the query loss's under float16 autocast, the HVPs' graph in float32 (see
      ``_logits``), and their losses scaled by a dynamic loss scale kept on the device
      (torch.amp.GradScaler's policy: start at ``loss_scale``, halve after a step with a
      non-finite task, double after ``loss_scale_growth_interval`` clean steps). fp16
      needs ``nonfinite="skip"``: a task whose scaled gradients overflow is left out of
      that step's mean, as GradScaler skips a step.
    """

    NONFINITE = ("propagate", "skip")
    PRECISIONS = ("fp32", "bf16", "fp16")
    AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        lam: float = 2.0,
        cg_iterations: int = 5,
        cg_tol: float = 0.0,
        ways: Optional[int] = None,
        check_labels: bool = True,
        forward: str = "auto",
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        nonfinite: str = "propagate",
        precision: str = "fp32",
        loss_scale: float = 2.0**10,
        loss_scale_growth_interval: int = 2000,
        hvp: str = "auto",
        tf32: Optional[bool] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"IMAML: model must be a torch.nn.Module; got {type(model).__name__}")
        _check_positive("inner_steps", inner_steps, integer=True, allow_zero=True)
        _check_positive("inner_lr", inner_lr)
        _check_positive("lam", lam)
        _check_positive("cg_iterations", cg_iterations, integer=True)
        _check_positive("cg_tol", cg_tol, allow_zero=True)
        _check_positive("cg_damping", cg_damping, allow_zero=True)
        _check_positive("lam_damping", lam_damping, allow_zero=True)
        if ways is not None:
            _check_positive("ways", ways, integer=True)
        self.model = model
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.lam = float(lam)
        self.cg_iterations = cg_iterations
        self.cg_tol = float(cg_tol)
        self.cg_damping = float(cg_damping)
        self.lam_damping = float(lam_damping)
        self.ways = ways
        self.check_labels = check_labels
        if forward not in TaskBatchedModule.FORWARDS:
            raise ValueError(f"IMAML: forward must be one of {', '.join(map(repr, TaskBatchedModule.FORWARDS))}; got {forward!r}")
        self.forward = forward
        # forward="auto" on a CPU: the forward timed fastest per input shape (TaskBatchedModule.auto_forward),
        # kept across meta-batch sizes.
        self.forward_choices: dict = {}
        if hvp not in support_hvp.HVPS:
            raise ValueError(f"IMAML: hvp must be one of {', '.join(map(repr, support_hvp.HVPS))}; got {hvp!r}")
        self.hvp = hvp
        # hvp="auto": {key: {"hvp": the mode, "ms": predicted solve time of each}} (see _hvp_mode).
        self.hvp_choices: dict = {}
        self._tf32 = TF32(type(self).__name__, tf32)
        self.tf32 = tf32
        if nonfinite not in self.NONFINITE:
            raise ValueError(f"IMAML: nonfinite must be one of {', '.join(map(repr, self.NONFINITE))}; got {nonfinite!r}")
        self.nonfinite = nonfinite
        if precision not in self.PRECISIONS:
            raise ValueError(f"IMAML: precision must be one of {', '.join(map(repr, self.PRECISIONS))}; got {precision!r}")
        _check_positive("loss_scale", loss_scale)
        _check_positive("loss_scale_growth_interval", loss_scale_growth_interval, integer=True)
        if precision == "fp16" and nonfinite != "skip":
            raise ValueError(
                "IMAML: precision='fp16' leaves out of the mean a task whose scaled gradients overflow (as "
                f"GradScaler skips a step), so it needs nonfinite='skip'; got nonfinite={nonfinite!r}"
            )
        if precision != "fp32":
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            if dtypes != ["torch.float32"]:
                raise ValueError(
                    f"IMAML: precision={precision!r} runs a float32 model's forward in {precision} (float32 master "
                    f"weights); got a model with parameters of dtype {', '.join(dtypes)}"
                )
        self.precision = precision
        self.loss_scale_init = float(loss_scale)
        self.loss_scale_growth_interval = loss_scale_growth_interval
        # fp16's scale and its count of clean steps: device tensors, updated in place (no sync,
        # and a CUDA-graph replay carries them on).
        self._scale: Optional[Tensor] = None
        self._clean_steps: Optional[Tensor] = None
        self._batched: Optional[TaskBatchedModule] = None
        self._classes: Optional[int] = None
        warn_stateful_layers(model, type(self).__name__)

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
            self._batched = TaskBatchedModule(self.model, num_tasks, self.forward, self.forward_choices)
        else:
            self._batched.buffers = self._batched.fresh_buffers(num_tasks)
        return self._batched

    def _check_batch(self, support_x, support_y, query_x=None, query_y=None) -> int:
        named = [("support_x", support_x), ("support_y", support_y)]
        if query_x is not None:
            named += [("query_x", query_x), ("query_y", query_y)]
        for name, t in named:
            if not isinstance(t, Tensor):
                raise TypeError(f"IMAML: {name} must be a tensor; got {type(t).__name__}")
            if t.dim() < (2 if name.endswith("y") else 3):
                want = "[T, N]" if name.endswith("y") else "[T, N, ...]"
                raise ValueError(f"IMAML: {name} must be {want} (tasks first); got shape {tuple(t.shape)}")
        num_tasks = support_x.shape[0]
        if num_tasks == 0:
            raise ValueError("IMAML: the meta-batch must hold at least one task; got T = 0")
        for name, t in named[1:]:
            if t.shape[0] != num_tasks:
                raise ValueError(
                    f"IMAML: {name} must have the T = {num_tasks} tasks of support_x; got shape {tuple(t.shape)}"
                )
        theta = next(self.model.parameters())
        for name, t in named:
            if t.device != theta.device:
                raise ValueError(f"IMAML: {name} must be on the model's device ({theta.device}); got {t.device}")
        pairs = [(named[0], named[1])] + ([(named[2], named[3])] if len(named) == 4 else [])
        for (x_name, x), (y_name, y) in pairs:
            if x.dtype != theta.dtype:
                raise TypeError(f"IMAML: {x_name} must have the model's dtype ({theta.dtype}); got {x.dtype}")
            if y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"IMAML: {y_name} must have one label per example of {x_name} {tuple(x.shape[:2])}; "
                    f"got shape {tuple(y.shape)}"
                )
            if y.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"IMAML: {y_name} must hold integer class labels; got dtype {y.dtype}")
        return num_tasks

    def _num_classes(self, module: TaskBatchedModule, x: Tensor) -> int:
        """ways, or the model's output width (one example through theta, once)."""
        if self._classes is None:
            with torch.no_grad():
                out = module.forward([p.detach().unsqueeze(0) for p in module.theta()], x[:1, :1],
                                     {k: b[:1] for k, b in module.buffers.items()})
            self._classes = out.shape[-1]
        if self.ways is not None and self._classes != self.ways:
            raise ValueError(f"IMAML: the model outputs {self._classes} classes but ways = {self.ways}")
        return self._classes

    def _check_label_range(self, module: TaskBatchedModule, x: Tensor, *labels: Tuple[str, Tensor]) -> None:
        ways = self._num_classes(module, x)
        bounds = torch.stack([v for _, y in labels for v in (y.min(), y.max())]).tolist()  # the one host sync
        for (name, _), low, high in zip(labels, bounds[0::2], bounds[1::2]):
            if low < 0 or high >= ways:
                raise ValueError(
                    f"IMAML: {name} must hold labels in [0, {ways - 1}] ({ways} ways); got labels in [{low}, {high}]"
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

    def loss_scale(self, device) -> Optional[Tensor]:
        """fp16's current loss scale (a 0-d float32 tensor on ``device``), else None."""
        if self.precision != "fp16":
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU, as tensors say
            device = torch.device("cuda", torch.cuda.current_device())
        if self._scale is None or self._scale.device != device:
            self._scale = torch.full((), self.loss_scale_init, dtype=torch.float32, device=device)
            self._clean_steps = torch.zeros((), dtype=torch.int64, device=device)
        return self._scale

    def _update_loss_scale(self, found_nonfinite: Tensor) -> None:
        """GradScaler's policy, on the device: halve after a step with a non-finite task, double
        after loss_scale_growth_interval clean steps in a row."""
        scale, clean = self._scale, self._clean_steps
        clean.copy_(torch.where(found_nonfinite, torch.zeros_like(clean), clean + 1))
        grow = clean >= self.loss_scale_growth_interval
        scale.copy_(torch.where(found_nonfinite, scale * 0.5, torch.where(grow, scale * 2.0, scale)))
        clean.copy_(torch.where(grow, torch.zeros_like(clean), clean))

    @staticmethod
    def _scaled_grad(loss: Tensor, inputs: Sequence[Tensor], scale: Optional[Tensor]) -> List[Tensor]:
        """d loss / d inputs, through loss * scale when there is a scale, then unscaled."""
        if scale is None:
            return list(torch.autograd.grad(loss, inputs))
        grads = list(torch.autograd.grad(loss * scale, inputs))
        torch._foreach_div_(grads, scale)
        return grads

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

    def _inner_loop(self, module, support_x, support_y, steps, check, scaled=False):
        theta = [p.detach() for p in module.theta()]
        try:
            phi = module.expand_theta()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            raise self._too_big(error, module.num_tasks, theta) from error
        # adapt() runs unscaled: it has no step to back off from an overflow, and float16
        # underflow only drops gradient entries below 6e-8.
        scale = self.loss_scale(theta[0].device) if scaled else None
        if check:
            self._check_label_range(module, support_x, ("support_y", support_y))
        for _ in range(steps):
            phi = [p.requires_grad_(True) for p in phi]
            with torch.enable_grad():
                loss = self.task_losses(self._logits(module, phi, support_x), support_y).sum()
                grads = self._scaled_grad(loss, phi, scale)
            phi = [p.detach() for p in phi]
            with torch.no_grad():
                ops.prox_sgd_step_(phi, list(grads), theta, self.inner_lr, self.lam)
        return phi

    @staticmethod
    def _too_big(error: Exception, num_tasks: int, theta: Sequence[Tensor]) -> Exception:
        if isinstance(error, torch.OutOfMemoryError) or "allocate" in str(error) or "out of memory" in str(error):
            per_task = sum(p.numel() * p.element_size() for p in theta)
            device = theta[0].device
            return MemoryError(
                f"IMAML: a meta-batch of T = {num_tasks} tasks does not fit on {device}: each task holds "
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

    def _meta_gradient(self, module, support_x, support_y, query_x, query_y):
        """(mean over tasks of (I + H_t/lam)^-1 grad L_query(phi_t), per theta tensor; result)."""
        phi = self._inner_loop(module, support_x, support_y, self.inner_steps, check=False, scaled=True)
        phi = [p.requires_grad_(True) for p in phi]
        with torch.enable_grad():
            query_logits = self._logits(module, phi, query_x)
            query_losses = self.task_losses(query_logits, query_y)
            scale = self.loss_scale(query_x.device)
            scale_used = None if scale is None else scale.clone()
            v = self._scaled_grad(query_losses.sum(), phi, scale)

        def losses_at(params: List[Tensor], fresh_buffers: bool):
            buffers = {k: b.clone() for k, b in module.buffers.items()} if fresh_buffers else module.buffers
            logits = self._logits(module, params, support_x, for_hvp=True, buffers=buffers)
            return self.task_losses(logits, support_y), buffers

        def keep_buffers(buffers) -> None:
            with torch.no_grad():
                for name, value in buffers.items():
                    module.buffers[name].copy_(value)

        phi = [p.detach() for p in phi]
        products = support_hvp.SupportHVP(self._hvp_mode(module, losses_at, phi, support_x), losses_at, phi,
                                          keep_buffers)

        # CG stops a task at a non-finite HVP (its last good iterate) and freezes its p, so the
        # solve's last HVP is non-finite too: checked once below, the task is named (and in fp16
        # the scale backs off) without a check per CG iteration.
        last_hvp: List[List[Tensor]] = []

        def hvp(vectors: List[Tensor]) -> List[Tensor]:
            last_hvp[:] = [products(vectors)]
            return last_hvp[0]

        x, info = ops.cg_solve(hvp, [g.detach() for g in v], self.lam + self.lam_damping, self.cg_iterations,
                               self.cg_tol, diag=1.0 + self.cg_damping)
        with torch.no_grad():
            query_losses, support_losses = query_losses.detach(), products.losses
            bad = ~(torch.isfinite(query_losses) & torch.isfinite(support_losses))
            for t in [*x, *last_hvp[0]]:
                bad |= ~torch.isfinite(t).flatten(1).all(1)
            task_accuracy = (query_logits.argmax(-1) == query_y).float().mean(1)
            mean, reported = self._task_means(bad)
            meta_grads = [mean(xt) for xt in x]
        result = MetaStepResult(
            loss=reported(query_losses),
            accuracy=reported(task_accuracy),
            support_loss=reported(support_losses),
            cg=info,
            nonfinite=bad,
            loss_scale=scale_used,
        )
        if scale is not None:
            self._update_loss_scale(bad.any())
        return meta_grads, result

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

    def _hvp_mode(self, module: TaskBatchedModule, losses_at, phi: List[Tensor], support_x: Tensor) -> str:
        """self.hvp, or for "auto" the mode timed faster for this device, support shape, forward and
        precision (and CPU thread count), timed at its first meta-step."""
        if self.hvp != "auto":
            return self.hvp
        device = support_x.device
        key = (str(device), tuple(support_x.shape), str(support_x.dtype).replace("torch.", ""), module.forward_mode,
               self.precision, torch.get_num_threads() if device.type == "cpu" else None)
        choice = self.hvp_choices.get(key)
        if choice is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "IMAML: hvp='auto' times its choice at the first meta-step of a shape, which cannot run "
                    "inside a CUDA-graph capture; run one eager meta_step first (IMAML.capture's warm-up does) "
                    "or pass hvp='reverse' or 'forward'"
                )
            choice = self.hvp_choices[key] = support_hvp.choose(losses_at, phi, self.cg_iterations)
        return choice["hvp"]

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

    def __init__(self, imaml: IMAML, support_x, support_y, query_x, query_y, warmup: int = 3):
        inputs = (support_x, support_y, query_x, query_y)
        num_tasks = imaml._check_batch(*inputs)
        if support_x.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"IMAML.capture needs CUDA tensors (CUDA graphs); got tensors on {support_x.device}")
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


__all__ = ["IMAML", "MetaStepResult", "CapturedMetaStep"]
