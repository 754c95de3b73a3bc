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

from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from . import hvp as support_hvp
from .choice import Chooser
from .base import BatchedMetaLearner, CapturedMetaStep, MetaStepResult, _check_positive
from .loss_scale import DynamicLossScale, scaled_grad
from .module import TaskBatchedModule


class IMAML(BatchedMetaLearner):
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
    - ``forward``: a forward of ``imaml_ext.batched.forwards`` (``forwards.describe()`` lists
      them) or "auto" (the fastest of ``forwards.auto_plans`` for the device, timed at the
      first call of each input shape and kept in ``forward_choices``; see TaskBatchedModule);
    - ``tuning_cache``: a ``TuningCache`` or a path where "auto"'s choices (forward and hvp)
      are kept for this machine, so a run's numbers do not depend on the load at its start
      (batched/choice.py); None: ``$IMAML_TUNING_CACHE`` if set, else timed in each process;
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

    PRECISIONS = ("fp32", "bf16", "fp16")

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
        tuning_cache=None,
    ):
        super().__init__(model, inner_steps, inner_lr, ways, check_labels, forward, tf32, nonfinite, tuning_cache)
        _check_positive("lam", lam)
        _check_positive("cg_iterations", cg_iterations, integer=True)
        _check_positive("cg_tol", cg_tol, allow_zero=True)
        _check_positive("cg_damping", cg_damping, allow_zero=True)
        _check_positive("lam_damping", lam_damping, allow_zero=True)
        self.lam = float(lam)
        self.cg_iterations = cg_iterations
        self.cg_tol = float(cg_tol)
        self.cg_damping = float(cg_damping)
        self.lam_damping = float(lam_damping)
        if hvp not in support_hvp.HVPS:
            raise ValueError(f"IMAML: hvp must be one of {', '.join(map(repr, support_hvp.HVPS))}; got {hvp!r}")
        self.hvp = hvp
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
        self._loss_scale = DynamicLossScale(loss_scale, loss_scale_growth_interval) if precision == "fp16" else None

    def loss_scale(self, device) -> Optional[Tensor]:
        """fp16's current loss scale (a 0-d float32 tensor on ``device``), else None."""
        return None if self._loss_scale is None else self._loss_scale.scale(device)

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
                grads = scaled_grad(loss, phi, scale)
            phi = [p.detach() for p in phi]
            with torch.no_grad():
                ops.prox_sgd_step_(phi, list(grads), theta, self.inner_lr, self.lam)
        return phi

    def _meta_gradient(self, module, support_x, support_y, query_x, query_y):
        """(mean over tasks of (I + H_t/lam)^-1 grad L_query(phi_t), per theta tensor; result)."""
        phi = self._inner_loop(module, support_x, support_y, self.inner_steps, check=False, scaled=True)
        phi = [p.requires_grad_(True) for p in phi]
        with torch.enable_grad():
            query_logits = self._logits(module, phi, query_x)
            query_losses = self.task_losses(query_logits, query_y)
            scale = self.loss_scale(query_x.device)
            scale_used = None if scale is None else scale.clone()
            v = scaled_grad(query_losses.sum(), phi, scale)

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
            self._loss_scale.update(bad.any())
        return meta_grads, result

    def _hvp_mode(self, module: TaskBatchedModule, losses_at, phi: List[Tensor], support_x: Tensor) -> str:
        """self.hvp, or for "auto" the mode timed faster for this device, support shape, forward and
        precision (and CPU thread count), timed at its first meta-step."""
        if self.hvp != "auto":
            return self.hvp
        device = support_x.device
        key = (str(device), tuple(support_x.shape), str(support_x.dtype).replace("torch.", ""), module.forward_mode,
               self.precision, torch.get_num_threads() if device.type == "cpu" else None)
        if key not in self.hvp_choices and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "IMAML: hvp='auto' times its choice at the first meta-step of a shape, which cannot run "
                "inside a CUDA-graph capture; run one eager meta_step first (IMAML.capture's warm-up does) "
                "or pass hvp='reverse' or 'forward'"
            )
        chooser = Chooser("hvp", self.hvp_choices, self.tuning_cache)
        choice = chooser.get(key, ("reverse", "forward"),
                             lambda: support_hvp.choose(losses_at, phi, self.cg_iterations))
        return choice["hvp"]


__all__ = ["IMAML", "MetaStepResult", "CapturedMetaStep"]  # the last two: base.py's, for callers that import them here
