"""Conjugate-gradient hypergradient on the fused batched CG of imaml_ext.ops."""

from __future__ import annotations

import warnings
from typing import List, Sequence

from torch import Tensor

from .. import ops
from .utils import gradient_with_graph, hvp_fn, mixed_vjp, reduce_tasks, task_count, verify_proximal


def cg(vector: Sequence[Tensor], curr, prev) -> List[Tensor]:
    """Without proximal_lambda: x solves (cg_alpha H) y = v, x = cg_alpha y
    (= H^-1 v for every cg_alpha), and the result is -(d^2 L/dtheta dphi)^T x.
    With it: (I + H_task / lambda) x = v is solved directly, H_task = H - lambda I,
    and x is the result ((-(-lambda I)) (H_task + lambda I)^-1 v)."""
    config = curr.config
    params, in_grad = gradient_with_graph(curr)
    hvp = hvp_fn(in_grad, params)
    tasks = task_count(curr)
    # cg_solve's layout is [T, ...]: a BatchedModule's tasks are solved each with
    # its own CG scalars; a plain module is one task.
    b = [v.detach().to(p.dtype) if tasks else v.detach().to(p.dtype).unsqueeze(0) for v, p in zip(vector, params)]
    lam = config.proximal_lambda
    pack = (lambda ts: list(ts)) if tasks else (lambda ts: [t.unsqueeze(0) for t in ts])
    unpack = (lambda ts: list(ts)) if tasks else (lambda ts: [t[0] for t in ts])

    if lam is not None:
        verify_proximal(curr, prev, in_grad, lam)

        def task_hvp(batch: Sequence[Tensor]) -> List[Tensor]:
            vectors = unpack(batch)
            return pack([h - lam * t for h, t in zip(hvp(vectors), vectors)])

        x, info = ops.cg_solve(task_hvp, b, lam + config.lam_damping, config.cg_iterations, config.cg_tol,
                               diag=1.0 + config.cg_damping)
        result = reduce_tasks(unpack(x), tasks)
    else:
        alpha = config.cg_alpha

        def scaled_shifted_hvp(batch: Sequence[Tensor]) -> List[Tensor]:
            # cg_solve solves (I + A / 1) y = b; A = alpha H - I gives (alpha H) y = b.
            vectors = unpack(batch)
            return pack([alpha * h - t for h, t in zip(hvp(vectors), vectors)])

        y, info = ops.cg_solve(scaled_shifted_hvp, b, 1.0, config.cg_iterations, config.cg_tol)
        x = [alpha * t for t in unpack(y)]
        result = [-g for g in mixed_vjp(in_grad, prev.trainable_parameters(), x)]
    curr.last_hypergradient_info["cg"] = info
    if bool(info.breakdown.any()):  # one sync per hypergradient, as the per-step loss.item()
        curr.cg_breakdowns = getattr(curr, "cg_breakdowns", 0) + 1
        if curr.cg_breakdowns == 1:
            if lam is not None and (config.cg_damping or config.lam_damping):  # damping is on: more of it
                remedy = (f"With the damping in force (Config(cg_damping={config.cg_damping:g}, "
                          f"lam_damping={config.lam_damping:g})) the system breaks down only where the Hessian has an "
                          f"eigenvalue below {-(1 + config.cg_damping) * (lam + config.lam_damping):g} or a product is "
                          f"not finite: more damping, a larger proximal_lambda (now {lam}), a smaller inner learning "
                          f"rate or more inner steps keep it positive definite")
            elif lam is not None:
                remedy = (f"Damping, Config(cg_damping=1, lam_damping=10) as the iMAML authors' code, keeps the system "
                          f"positive definite; so do a larger proximal_lambda (now {lam}) or more inner steps")
            else:
                remedy = ("A declared proximal term (Config(proximal_lambda=...), with cg_damping / lam_damping), "
                          "a loss that is convex near its minimum, or more inner steps avoid it")
            warnings.warn(
                f'problem "{curr.name}": CG broke down (p.Ap <= 0 or a non-finite value: the Hessian of its loss '
                "is not positive definite here); the hypergradient uses the last good iterate. "
                f"{remedy}. {curr.name}.cg_breakdowns counts the hypergradients where it happened.",
                stacklevel=3,
            )
    return result
