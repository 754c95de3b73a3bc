"""Fused operators of implicit MAML for a whole meta-batch of T tasks.

``prox_sgd_step_`` is the batched proximal inner step and ``cg_solve`` the
batched conjugate-gradient solve of ``(I + H_t / lam) x_t = b_t``;
``batch_norm_relu_max_pool2d`` fuses Conv4's BatchNorm, ReLU and max-pool. All run the
compiled kernels of ``torch.ops.imaml_ext`` (CPU, and CUDA when built with it)
and fall back, with a one-time warning, to ``imaml_ext.ops.reference``.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, _extension, reference
from ._extension import has_compiled_kernels
from .batch_norm_relu_max_pool import batch_norm_relu_max_pool2d

__all__ = ["prox_sgd_step_", "cg_solve", "CGInfo", "batch_norm_relu_max_pool2d", "has_compiled_kernels", "reference"]

if _extension._C is not None:
    from . import _fake  # noqa: F401  (fake kernels for torch.compile / FakeTensor)


def _backend(device: torch.device):
    return torch.ops.imaml_ext if _extension.use_compiled(device) else reference


def _mutable_contiguous(tensors: List[Tensor]) -> tuple:
    """Contiguous stand-ins for in-place outputs, and the copy-backs they need."""
    work, copy_back = [], []
    for t in tensors:
        if t.is_contiguous():
            work.append(t)
        else:
            c = t.contiguous()
            work.append(c)
            copy_back.append((t, c))
    return work, copy_back


def prox_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    anchors: Sequence[Tensor],
    lr: Union[float, Tensor],
    lam: Union[float, Tensor],
    momentum: float = 0.0,
    momentum_buffers: Optional[Sequence[Tensor]] = None,
) -> None:
    """One proximal SGD step for every task, in place.

    For each parameter tensor ``phi`` ([T, *shape], one slice per task), its
    gradient ``g`` ([T, *shape]) and the shared meta-parameter ``theta``
    ([*shape], broadcast over tasks)::

        d = g + lam * (phi - theta)
        buf = momentum * buf + d; d = buf      # only when momentum != 0
        phi -= lr * d

    ``lr`` and ``lam`` are numbers >= 0 or per-task [T] tensors on the
    parameters' device. Momentum follows ``torch.optim.SGD`` (dampening 0) with
    ``momentum_buffers`` ([T, *shape], start them at zero); with momentum 0 the
    buffers are not used. On CUDA every tensor of every task is updated by one
    kernel launch (up to 48 tensors; longer lists take one launch per 48).
    """
    op = "imaml_ext.ops.prox_sgd_step_"
    params = _checks.as_tensor_list(op, "params", params)
    grads = _checks.as_tensor_list(op, "grads", grads)
    anchors = _checks.as_tensor_list(op, "anchors", anchors)
    num_tasks = _checks.check_task_list(op, "params", params)
    _checks.check_same_list(op, "grads", grads, "params", params)
    _checks.check_anchor_list(op, "anchors", anchors, "params", params)
    like = params[0]
    lr, lr_per_task = _checks.number_or_per_task(op, "lr", lr, num_tasks, like)
    lam, lam_per_task = _checks.number_or_per_task(op, "lam", lam, num_tasks, like)
    momentum = _checks.check_number(op, "momentum", momentum)
    buffers: List[Tensor] = []
    if momentum != 0.0:
        if momentum_buffers is None:
            raise ValueError(f"{op}: momentum_buffers must be given when momentum != 0; got momentum = {momentum!r} and None")
        buffers = _checks.as_tensor_list(op, "momentum_buffers", momentum_buffers)
        _checks.check_same_list(op, "momentum_buffers", buffers, "params", params)

    work_params, params_back = _mutable_contiguous(params)
    work_buffers, buffers_back = _mutable_contiguous(buffers)
    grads = [g.contiguous() for g in grads]
    anchors = [a.contiguous() for a in anchors]
    _backend(like.device).prox_sgd_step_(
        work_params, grads, anchors, work_buffers, lr, lam, momentum, lr_per_task, lam_per_task
    )
    for original, work in params_back + buffers_back:
        original.copy_(work)


class CGInfo(NamedTuple):
    """What a batched CG solve did, per task (all [T] tensors on the device)."""

    residual_norm: Tensor  # ||b - A x|| by the CG recurrence, at the end
    iterations: Tensor  # int64: updates applied to the task
    breakdown: Tensor  # bool: p.(A p) <= 0, NaN or Inf met; x is the last good iterate
    converged: Tensor  # bool: ||r|| <= tol * ||b|| reached (b = 0 included)


HVP = Callable[[List[Tensor]], Sequence[Tensor]]


def cg_solve(
    hvp: HVP,
    b: Union[Tensor, Sequence[Tensor]],
    lam: Union[float, Tensor],
    iters: int,
    tol: float = 0.0,
    diag: float = 1.0,
):
    """Solves ``(diag * I + H_t / lam) x_t = b_t`` for every task t independently
    (``diag`` 1 by default: the implicit-MAML system).

    ``b`` is a list of [T, *shape] tensors (or one such tensor) and
    ``hvp(v)`` returns ``H v`` for such a list: the Hessian-vector product of
    every task at once. Runs exactly ``iters`` iterations, each one call of
    ``hvp`` and two fused launches (Chronopoulos-Gear CG: the same iterates as
    textbook CG, one reduction per iteration); per-task step lengths, residuals
    and flags stay on the device, so there is no host synchronisation and the
    whole solve can be captured in a CUDA graph. A task stops updating once
    ``||r_t|| <= tol * ||b_t||`` or on breakdown (``p.(A p) <= 0``, NaN or Inf),
    which ``info.breakdown`` flags. ``lam`` is a number > 0 or a [T] tensor.
    ``diag`` > 0 damps the system, as the iMAML authors' ``(1 + c) I + H / (lam + l)``:
    it is solved as ``(I + H / (diag * lam)) x = b / diag``, the same CG iterates.

    Returns ``(x, info)``: x in the form of b, and a :class:`CGInfo`.
    """
    op = "imaml_ext.ops.cg_solve"
    if not callable(hvp):
        raise TypeError(f"{op}: hvp must be a callable mapping a list of [T, ...] tensors to H times them; got {_checks.describe(hvp)}")
    single = isinstance(b, Tensor)
    b_list = [b] if single else _checks.as_tensor_list(op, "b", b)
    num_tasks = _checks.check_task_list(op, "b", b_list)
    if all(t.numel() == 0 for t in b_list):
        raise ValueError(f"{op}: b must hold at least one element per task; got only empty tensors")
    like = b_list[0]
    lam, lam_per_task = _checks.number_or_per_task(op, "lam", lam, num_tasks, like, positive=True)
    iters = _checks.check_iters(op, "iters", iters)
    tol = _checks.check_number(op, "tol", tol)
    diag = _checks.check_number(op, "diag", diag, positive=True)
    if diag != 1.0:
        b_list = [t / diag for t in b_list]
        lam = lam * diag
        lam_per_task = lam_per_task * diag if lam_per_task is not None else None

    ops = _backend(like.device)
    r = [t.clone(memory_format=torch.contiguous_format) for t in b_list]
    x = [torch.zeros_like(t) for t in r]
    p = [torch.zeros_like(t) for t in r]
    s = [torch.zeros_like(t) for t in r]
    scalars = like.new_zeros((num_tasks, reference.NUM_CG_SCALARS))
    status = torch.zeros(num_tasks, dtype=torch.int32, device=like.device)
    iterations = torch.zeros(num_tasks, dtype=torch.int64, device=like.device)
    counter = torch.zeros(1, dtype=torch.int32, device=like.device)
    own = {t.untyped_storage().data_ptr() for t in (*x, *r, *p, *s)}

    ops.cg_init_(r, scalars, status, counter, tol)
    for _ in range(iters):
        hr = _checked_hvp_output(op, hvp(r), r, own)
        ops.cg_alpha_(r, hr, scalars, status, counter, lam, lam_per_task)
        ops.cg_update_(x, r, p, s, hr, scalars, status, iterations, counter, lam, lam_per_task, tol)

    info = CGInfo(
        residual_norm=scalars[:, reference.GAMMA].sqrt() * diag,  # of the system as given
        iterations=iterations,
        breakdown=(status & reference.BREAKDOWN) != 0,
        converged=(status & reference.CONVERGED) != 0,
    )
    return (x[0] if single else x), info


def _checked_hvp_output(op: str, out: object, r: List[Tensor], own: set) -> List[Tensor]:
    if isinstance(out, Tensor) and len(r) == 1:
        out = [out]
    out = _checks.as_tensor_list(op, "hvp(v)", out)
    _checks.check_same_list(op, "hvp(v)", out, "b", r)
    # The solve updates r in place after reading H r: an output that aliases
    # the solver's own vectors (e.g. an identity hvp) must be copied first.
    return [
        h.clone(memory_format=torch.contiguous_format)
        if h.untyped_storage().data_ptr() in own
        else h.contiguous()
        for h in out
    ]
