"""Shared pieces of the hypergradient methods: the lower loss's gradient with
its graph, Hessian-vector products, and the proximal declaration's check."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor


def zeros_for_none(grads, like: Sequence[Tensor]) -> List[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def meta_parameters(problem) -> List[Tensor]:
    """``problem.meta_trainable_parameters()`` (Betty 0.2's): ``trainable_parameters()`` unless
    overridden. A subset of them only under plain darts, which perturbs just those; cg and neumann
    solve over all of them, as Betty's do (there a subset fails on mismatched shapes)."""
    meta, trainable = list(problem.meta_trainable_parameters()), problem.trainable_parameters()
    if len(meta) == len(trainable) and all(a is b for a, b in zip(meta, trainable)):
        return trainable
    config, ids = problem.config, {id(p) for p in trainable}
    if not all(id(p) in ids for p in meta):
        raise ValueError(f'problem "{problem.name}": meta_trainable_parameters() must give some of its '
                         "trainable_parameters(); it gave another tensor")
    if config.type != "darts" or config.proximal_lambda is not None:
        raise ValueError(f'problem "{problem.name}": meta_trainable_parameters() gives a subset of its trainable '
                         f'parameters, which only Config(type="darts") without proximal_lambda can take; it has '
                         f'type="{config.type}", proximal_lambda={config.proximal_lambda}')
    return meta


def gradient_with_graph(curr):
    """(params, dL_curr/dparams with create_graph) at curr's current parameters."""
    params = curr.trainable_parameters()
    loss = curr.loss_for_hypergradient()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return params, zeros_for_none(grads, params)


def hvp_fn(in_grad: Sequence[Tensor], params: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], List[Tensor]]:
    """v -> H v by reverse-over-reverse on the retained gradient graph."""
    differentiable = [g.requires_grad for g in in_grad]

    def hvp(vectors: Sequence[Tensor]) -> List[Tensor]:
        outs = [g for g, d in zip(in_grad, differentiable) if d]
        grad_outputs = [v for v, d in zip(vectors, differentiable) if d]
        if not outs:
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad(outs, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        return [h.detach() for h in zeros_for_none(hv, params)]

    return hvp


def mixed_vjp(in_grad: Sequence[Tensor], prev_params: Sequence[Tensor], x: Sequence[Tensor]) -> List[Tensor]:
    """(d^2 L / dtheta dphi)^T x: the gradient of in_grad . x for theta."""
    pairs = [(g, v) for g, v in zip(in_grad, x) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in prev_params]
    outs, grad_outputs = zip(*pairs)
    grads = torch.autograd.grad(outs, prev_params, grad_outputs=grad_outputs, retain_graph=False, allow_unused=True)
    return [g.detach() for g in zeros_for_none(grads, prev_params)]


def task_count(curr):
    """T when curr's module is a BatchedModule (parameters [T, *shape], one
    independent task per slice: CG then runs per task), else None."""
    from ..batched.module import BatchedModule

    batch = getattr(curr, "task_batch", None)
    if batch is not None and batch.running:
        return batch.num_tasks
    return curr.module.num_tasks if isinstance(curr.module, BatchedModule) else None


def reduce_tasks(tensors: Sequence[Tensor], tasks) -> List[Tensor]:
    """theta is shared by the tasks: its gradient sums theirs."""
    return list(tensors) if tasks is None else [t.sum(0) for t in tensors]


def check_proximal_pairing(curr, prev) -> None:
    """proximal_lambda pairs curr's parameters with prev's, one to one (or
    each of curr's T task slices with prev's, for a BatchedModule)."""
    mine = [tuple(p.shape) for p in curr.trainable_parameters()]
    theirs = [tuple(p.shape) for p in prev.trainable_parameters()]
    tasks = task_count(curr)
    expected = theirs if tasks is None else [(tasks, *s) for s in theirs]
    if mine != expected:
        raise ValueError(
            f'problem "{curr.name}": Config.proximal_lambda declares a proximal term to "{prev.name}"\'s parameters, '
            f"so its parameter shapes must be {expected}; got {mine}"
        )


def verify_proximal(curr, prev, in_grad: Sequence[Tensor], lam: float) -> None:
    """Checks once, with a random probe u, that d^2 L / dtheta dphi u = -lam u,
    as (lam / 2) ||phi - theta||^2 in the loss makes it."""
    key = ("proximal_verified", prev.name)
    if curr.last_hypergradient_info.get(key):
        return
    check_proximal_pairing(curr, prev)
    prev_params = prev.trainable_parameters()
    u = [torch.randn_like(g) for g in in_grad]
    pairs = [(g, v) for g, v in zip(in_grad, u) if g.requires_grad]
    mixed = None
    if pairs:
        outs, grad_outputs = zip(*pairs)
        mixed = torch.autograd.grad(outs, prev_params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    if mixed is None or all(m is None for m in mixed):
        raise ValueError(
            f'problem "{curr.name}": Config.proximal_lambda={lam} declares that its loss holds '
            f'(lambda/2)||phi - theta||^2 to "{prev.name}"\'s parameters, but its loss does not depend on them. '
            "Add the term to training_step (the tutorial's reg_loss) or drop proximal_lambda."
        )
    mixed = zeros_for_none(mixed, prev_params)
    u = reduce_tasks(u, task_count(curr))
    uu = sum((v.double() * v.double()).sum() for v in u)
    um = sum((v.double() * m.double()).sum() for v, m in zip(u, mixed))
    measured = float(-um / uu)
    residual = sum(((m.double() + lam * v.double()) ** 2).sum() for m, v in zip(mixed, u)).sqrt()
    if float(residual) > 1e-3 * lam * float(uu.sqrt()):
        raise ValueError(
            f'problem "{curr.name}": Config.proximal_lambda={lam} does not match its loss: the mixed second '
            f'derivative to "{prev.name}" is not -{lam} I (measured {-measured:.6g} I along a random direction). '
            "A term c * ||phi - theta||^2 means proximal_lambda = 2 * c (the tutorial's reg_loss with reg=r is 2r)."
        )
    curr.last_hypergradient_info[key] = True
