"""``IterativeProblem``: a level whose updates stay in the autograd graph, so
its parents differentiate through its whole unrolled trajectory (MAML)."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..batched.memory import GraphSizeMeter, available_bytes, check_unroll_fits
from .hooks import call_hook, takes_argument
from .problem import Problem

SUPPORTED_OPTIMIZERS = ("SGD", "Adam")


class _FastWeightsModule(nn.Module):
    """Calls the wrapped module with the problem's differentiable weights;
    state_dict / load_state_dict are the wrapped module's own (no prefix), so
    ``self.module.load_state_dict(self.upper.module.state_dict())`` works."""

    def __init__(self, module: nn.Module, problem: "IterativeProblem"):
        super().__init__()
        self.inner = module
        object.__setattr__(self, "_problem", problem)

    def forward(self, *args, **kwargs):
        weights = self._problem._named_weights()
        if weights is None:
            return self.inner(*args, **kwargs)
        return functional_call(self.inner, weights, args, kwargs, strict=False)

    def __getattr__(self, name: str):
        # The wrapped module's own attributes (self.module.w in a Betty program); during an
        # inner loop a parameter is its current differentiable weight, as the forward uses.
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        return _fast_attribute(self.inner, name, "", self._problem)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


def _fast_attribute(module: nn.Module, name: str, prefix: str, problem: "IterativeProblem"):
    """``module.name`` with the problem's differentiable weights: a parameter is its current
    weight, a submodule holding some is a view that does the same (``self.module.head.weight``)."""
    weights = problem._named_weights()
    full = prefix + name
    if weights is not None and full in weights:
        return weights[full]
    value = getattr(module, name)
    if weights is not None and isinstance(value, nn.Module) and any(k.startswith(full + ".") for k in weights):
        return _FastWeightsView(value, full + ".", problem)
    return value


class _FastWeightsView:
    """A submodule of an ``IterativeProblem``'s module, seen with the differentiable weights."""

    def __init__(self, module: nn.Module, prefix: str, problem: "IterativeProblem"):
        self._module, self._prefix, self._problem = module, prefix, problem

    def __getattr__(self, name: str):
        return _fast_attribute(self._module, name, self._prefix, self._problem)

    def __call__(self, *args, **kwargs):
        weights = self._problem._named_weights() or {}
        own = {k[len(self._prefix):]: v for k, v in weights.items() if k.startswith(self._prefix)}
        return functional_call(self._module, own, args, kwargs, strict=False)


class IterativeProblem(Problem):
    """A Betty ``IterativeProblem``.

    Its parameters during an inner loop are tensors in the graph: each local
    step computes phi <- update(phi, dL/dphi) with the optimizer's rule
    written in differentiable form (torch.optim.SGD with momentum, dampening,
    nesterov and weight decay; torch.optim.Adam). With
    ``Config(first_order=False)`` the gradients keep their graph (second
    order); with the default ``first_order=True`` they are detached (first-order
    MAML). As in Betty, a parent with ``Config(first_order=False)`` also makes
    them second order (Betty reads the setting off the parents). The parent's
    loss is then differentiated through the trajectory.

    An inner loop starts from this problem's module parameters (after
    ``on_inner_loop_start``, e.g. a ``load_state_dict`` copy of the upper's,
    which carries no graph), or, for standard MAML, from the upper's
    parameters themselves with the graph kept: call
    ``self.start_from(self.upper.trainable_parameters())`` in
    ``on_inner_loop_start``. ``Config.type`` means nothing here.
    """

    differentiable_updates = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._weights: Optional[List[Tensor]] = None
        self._opt_state: List[Dict[str, Tensor]] = []
        self._grad_sum: Optional[List[Tensor]] = None
        self._started_from: Optional[List[Tensor]] = None
        self._steps_in_loop = 0
        self._unrolls = True

    def initialize(self, engine) -> None:
        super().initialize(engine)
        # A problem with no parents has nobody to differentiate through its updates: it
        # steps its optimizer (any optimizer) as an ImplicitProblem does.
        self._unrolls = bool(self.parents)
        if not self._unrolls:
            return
        if self.config.type != "darts":
            warnings.warn(
                f'problem "{self.name}": Config.type={self.config.type!r} is ignored for an IterativeProblem '
                "(its parents differentiate through its unrolled updates)",
                stacklevel=2,
            )
        if self.config.precision == "fp16":
            raise ValueError(
                f'problem "{self.name}": precision="fp16" needs a GradScaler, which cannot scale a differentiable '
                'update; use precision="bf16" or "fp32" for an IterativeProblem'
            )
        name = type(self.optimizer).__name__
        if type(self.optimizer) not in (torch.optim.SGD, torch.optim.Adam):
            raise ValueError(
                f'problem "{self.name}": an IterativeProblem unrolls its optimizer as differentiable tensor maths, '
                f"which is written for {', '.join(SUPPORTED_OPTIMIZERS)}; got {name}"
            )
        for group in self.optimizer.param_groups:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f'problem "{self.name}": {name}({flag}=True) cannot be unrolled here; set {flag}=False')
        self._param_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self._module_params = [p for p in self.module.parameters() if p.requires_grad]
        self._bind_groups()
        self.module = _FastWeightsModule(self.module, self)

    def _bind_groups(self) -> None:
        """Each weight's optimizer param group, whose lr the updates read (a scheduler sets it there)."""
        self._groups = []
        for p in self._module_params:
            group = next((g for g in self.optimizer.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                raise ValueError(f'problem "{self.name}": a trainable parameter of its module is not in its optimizer')
            self._groups.append(group)

    @property
    def second_order(self) -> bool:
        """Whether the updates keep the gradients' graph: this problem's own
        Config(first_order=False), or Betty's rule, a parent's."""
        return not self.config.first_order or any(not parent.config.first_order for parent in self.parents)

    # ----- the differentiable weights -----
    def _named_weights(self) -> Optional[Dict[str, Tensor]]:
        if self._weights is None:
            return None
        return dict(zip(self._param_names, self._weights))

    def parameters(self) -> List[Tensor]:
        return list(self._weights) if self._weights is not None else list(self.module.parameters())

    @property
    def functional_module(self) -> nn.Module:
        return self.module.inner if isinstance(self.module, _FastWeightsModule) else self.module

    def trainable_parameters(self) -> List[Tensor]:
        if self.task_batch is not None and self.task_batch.running:
            return list(self.task_batch.phi)
        if self._weights is not None:
            return list(self._weights)
        return [p for p in self.module.parameters() if p.requires_grad]

    def start_from(self, params: Sequence[Tensor]) -> None:
        """Start this inner loop at ``params`` (e.g. the upper's parameters) with
        their graph: the parent's gradient then includes d phi_0 / d theta = I."""
        params = list(params)
        shapes = [tuple(p.shape) for p in self._module_params]
        if [tuple(p.shape) for p in params] != shapes:
            raise ValueError(
                f'problem "{self.name}": start_from needs tensors of its parameters\' shapes {shapes}; '
                f"got {[tuple(p.shape) for p in params]}"
            )
        self._started_from = params

    def _parent_start(self) -> Optional[List[Tensor]]:
        """The parent's parameters, when on_inner_loop_start left this problem's equal to them
        (the tutorial's ``load_state_dict`` copy): the unroll then starts from them with the
        graph kept, as ``start_from`` does, so the parent gets MAML's gradient."""
        if self._started_from is not None or len(self.parents) != 1:
            return None
        theirs = self.parents[0].trainable_parameters()
        mine = self._module_params
        if [tuple(p.shape) for p in theirs] != [tuple(p.shape) for p in mine]:
            return None
        if not all(a.dtype == b.dtype and a.device == b.device and torch.equal(a, b) for a, b in zip(mine, theirs)):
            return None
        if not getattr(self, "_logged_parent_start", False):
            self._logged_parent_start = True
            self._logger.info(
                f'[Problem "{self.name}"] on_inner_loop_start copied "{self.parents[0].name}"\'s parameters: the '
                "unroll starts from them with their graph kept (as start_from does), so the parent's gradient is MAML's"
            )
        return list(theirs)

    def start_inner_loop(self) -> None:
        if not self._unrolls:
            return super().start_inner_loop()
        self._started_from = None
        self.on_inner_loop_start()
        start = self._started_from if self._started_from is not None else self._parent_start()
        if start is not None:
            self._weights = list(start)
        else:
            self._weights = [p.detach().clone().requires_grad_(True) for p in self._module_params]
        self._opt_state = [{} for _ in self._weights]
        self._grad_sum = None
        self._steps_in_loop = 0

    # ----- the Engine's task batching: G inner loops of this problem at once -----
    def batched_start(self, num_tasks: int) -> List[Tensor]:
        """Every task's start, [G, *shape]: on_inner_loop_start's, with the graph to the parent kept."""
        self._started_from = None
        self.on_inner_loop_start()
        start = self._started_from if self._started_from is not None else self._parent_start()
        self._weights = None
        self._opt_state = [{} for _ in self._module_params]
        if start is not None:
            return [p.unsqueeze(0).expand(num_tasks, *p.shape) for p in start]
        return [p.detach().unsqueeze(0).repeat(num_tasks, *([1] * p.dim())).requires_grad_(True)
                for p in self._module_params]

    def batched_descend(self, weights: List[Tensor], loss: Tensor) -> List[Tensor]:
        """One differentiable update of every task (the optimizer's maths is elementwise)."""
        create_graph = self.second_order
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
        if not create_graph:
            grads = [g.detach() for g in grads]
        return self._update(weights, grads)

    def batched_finish(self, weights: List[Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(self._module_params, weights):
                p.copy_(w[-1])
        self._weights = None
        self._opt_state = []

    # ----- one local step -----
    def one_step_descent(self, batch=None) -> dict:
        if not self._unrolls:
            return super().one_step_descent(batch)
        if self._weights is None:
            self.start_inner_loop()
        first = self._steps_in_loop == 0
        create_graph = self.second_order
        meter = GraphSizeMeter() if first and create_graph else None
        if meter is not None:
            with meter:
                stats = self._descend(create_graph, batch)
            self._check_unroll_fits(meter.bytes)
            return stats
        return self._descend(create_graph, batch)

    # the share of the free device memory an unrolled graph may take before it is refused
    memory_fraction = 0.9

    def _check_unroll_fits(self, step_bytes: int) -> None:
        """After the first local step of a second-order loop: will the whole unroll fit?"""
        device = self._weights[0].device
        check_unroll_fits(f'problem "{self.name}"', "local steps (unroll_steps x gradient_accumulation)",
                          self.config.unroll_steps * self.gas, step_bytes, device, self.memory_fraction,
                          "use fewer unroll_steps, a smaller batch, Config(first_order=True), or an ImplicitProblem "
                          "(memory flat in steps)", available_bytes(device))

    def _descend(self, create_graph: bool, batch=None) -> dict:
        self._steps_in_loop += 1
        self.cur_batch = self.get_batch() if batch is None else batch
        loss, stats = self.get_loss(self.cur_batch)
        grads = torch.autograd.grad(loss, self._weights, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, self._weights)]
        if not create_graph:
            grads = [g.detach() for g in grads]
        self._grad_sum = grads if self._grad_sum is None else [a + g for a, g in zip(self._grad_sum, grads)]
        if not takes_argument(self.grad_callback):
            self.grad_callback()
        if self.schedule.accumulation_boundary():
            grads, self._grad_sum = self._grad_sum, None
            if takes_argument(self.grad_callback):
                self.grad_callback(grads)
            if self.config.gradient_clipping > 0:
                norm = torch.sqrt(sum((g * g).sum() for g in grads))
                scale = torch.clamp(self.config.gradient_clipping / (norm + 1e-6), max=1.0)
                grads = [g * scale for g in grads]
            self._weights = self._update(self._weights, grads)
            call_hook(self.param_callback, self._weights)
            with torch.no_grad():  # the module shows the current weights (eval, state_dict)
                for p, w in zip(self._module_params, self._weights):
                    p.copy_(w)
        return stats

    def _update(self, weights: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        out = []
        adam = isinstance(self.optimizer, torch.optim.Adam)
        for w, g, group, state in zip(weights, grads, self._groups, self._opt_state):
            lr = float(group["lr"])
            if group.get("weight_decay", 0):
                g = g + group["weight_decay"] * w
            if adam:
                beta1, beta2 = group["betas"]
                step = state.get("step", 0) + 1
                state["step"] = step
                m = state.get("m", torch.zeros_like(w)) * beta1 + (1 - beta1) * g
                v = state.get("v", torch.zeros_like(w)) * beta2 + (1 - beta2) * g * g
                state["m"], state["v"] = m, v
                # sqrt has an infinite slope at 0: a tiny floor keeps the graph finite.
                denom = torch.sqrt(v + 1e-30) / math.sqrt(1 - beta2**step) + group["eps"]
                out.append(w - (lr / (1 - beta1**step)) * m / denom)
            else:
                momentum = group.get("momentum", 0)
                if momentum:
                    buf = state.get("buf")
                    buf = g if buf is None else momentum * buf + (1 - group.get("dampening", 0)) * g
                    state["buf"] = buf
                    g = g + momentum * buf if group.get("nesterov") else buf
                out.append(w - lr * g)
        return out

    def step_normal(self, global_step: Optional[int] = None) -> None:
        if not self._unrolls:
            return super().step_normal(global_step)
        will_finish = self.check_ready() and self.schedule.unrolled(self.schedule.count + 1)
        super().step_normal(global_step)
        if will_finish and self.schedule.inner_loop_start:
            # The parents have differentiated through this loop: drop its graph.
            self._weights = None
            self._opt_state = []


    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._unrolls and hasattr(self, "_module_params"):
            self._bind_groups()  # the optimizer's load_state_dict made new param groups

    # ----- roll-back: the unrolled weights and the differentiable optimizer's state too -----
    def cache_states(self) -> None:
        super().cache_states()
        if self._unrolls:
            weights = None if self._weights is None else [w.detach().clone() for w in self._weights]
            state = [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in self._opt_state]
            self._unroll_cache = (weights, state)

    def recover_states(self) -> None:
        super().recover_states()
        if self._unrolls:
            self._bind_groups()  # load_state_dict made new param groups
            weights, self._opt_state = self._unroll_cache
            self._weights = None if weights is None else [w.requires_grad_(True) for w in weights]
            self._grad_sum, self._unroll_cache = None, None


__all__ = ["IterativeProblem"]
