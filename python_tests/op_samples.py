"""Sample inputs of every imaml_ext op: one generator per op feeds the
reference comparison, torch.library.opcheck and the CUDA tests alike."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from imaml_ext.ops import reference

# Omniglot Conv4 (64 channels, 5 ways): 18 tensors, 112,005 parameters.
CONV4_SHAPES: List[Tuple[int, ...]] = (
    [(64, 1, 3, 3), (64,), (64,), (64,)]
    + [(64, 64, 3, 3), (64,), (64,), (64,)] * 3
    + [(5, 64), (5,)]
)

# name -> (T, shapes)
LAYOUTS = {
    "scalar_param": (3, [()]),
    "one_element": (1, [(1,)]),
    "odd_sizes": (3, [(3,), (5, 7), (13,), (1, 1, 9)]),
    "many_small": (5, [(1 + i % 9,) for i in range(40)]),
    "more_than_one_launch": (2, [(1 + i % 7, 3) for i in range(101)]),
    "large": (2, [(2_000_003,)]),
    "conv4_T1": (1, CONV4_SHAPES),
    "conv4_T64": (64, CONV4_SHAPES),
}


def deep_clone(sample):
    """A copy of a sample dataclass with every tensor (and list of tensors) cloned."""
    def copy(v):
        if isinstance(v, list):
            return [t.clone() for t in v]
        return v.clone() if isinstance(v, Tensor) else v
    return type(sample)(**{f.name: copy(getattr(sample, f.name)) for f in dataclasses.fields(sample)})


def task_list(num_tasks: int, shapes, dtype, device) -> List[Tensor]:
    return [torch.randn((num_tasks,) + tuple(s), dtype=dtype, device=device) for s in shapes]


@dataclasses.dataclass
class ProxSample:
    name: str
    params: List[Tensor]
    grads: List[Tensor]
    anchors: List[Tensor]
    momentum_buffers: List[Tensor]
    lr: float
    lam: float
    momentum: float
    lr_per_task: Optional[Tensor]
    lam_per_task: Optional[Tensor]

    def op_args(self):
        return (self.params, self.grads, self.anchors, self.momentum_buffers, self.lr, self.lam,
                self.momentum, self.lr_per_task, self.lam_per_task)

    def clone(self) -> "ProxSample":
        return deep_clone(self)


def prox_sample_inputs(device="cpu", dtype=torch.float64, layouts=None):
    for layout in layouts or LAYOUTS:
        num_tasks, shapes = LAYOUTS[layout]
        for variant in ("scalars", "per_task", "momentum"):
            params = task_list(num_tasks, shapes, dtype, device)
            per_task = variant == "per_task"
            momentum = 0.9 if variant == "momentum" else 0.0
            yield ProxSample(
                name=f"{layout}-{variant}",
                params=params,
                grads=[torch.randn_like(p) for p in params],
                anchors=[torch.randn(p.shape[1:], dtype=dtype, device=device) for p in params],
                momentum_buffers=[torch.randn_like(p) for p in params] if momentum else [],
                lr=0.05 + torch.rand(()).item(),
                lam=0.1 + 2 * torch.rand(()).item(),
                momentum=momentum,
                lr_per_task=torch.rand(num_tasks, dtype=dtype, device=device) if per_task else None,
                lam_per_task=(torch.rand(num_tasks, dtype=dtype, device=device) * 3) if per_task else None,
            )


@dataclasses.dataclass
class CGState:
    """Mid-solve CG state with random vectors: some tasks fresh (alpha = 0),
    some mid-way, some stopped, to exercise every branch of the ops."""

    x: List[Tensor]
    r: List[Tensor]
    p: List[Tensor]
    s: List[Tensor]
    hr: List[Tensor]
    scalars: Tensor
    status: Tensor
    iterations: Tensor
    counter: Tensor
    lam: float
    lam_per_task: Optional[Tensor]
    tol: float

    def clone(self) -> "CGState":
        return deep_clone(self)

    def init_args(self):
        return (self.r, self.scalars, self.status, self.counter, self.tol)

    def alpha_args(self):
        return (self.r, self.hr, self.scalars, self.status, self.counter, self.lam, self.lam_per_task)

    def update_args(self):
        return (self.x, self.r, self.p, self.s, self.hr, self.scalars, self.status, self.iterations,
                self.counter, self.lam, self.lam_per_task, self.tol)


def cg_sample_states(device="cpu", dtype=torch.float64, layouts=None):
    for layout in layouts or LAYOUTS:
        num_tasks, shapes = LAYOUTS[layout]
        for per_task in (False, True):
            r = task_list(num_tasks, shapes, dtype, device)
            # hr close to a PSD action on r keeps p.(A p) > 0 for most tasks.
            hr = [ri * (0.5 + torch.rand_like(ri)) for ri in r]
            scalars = torch.zeros(num_tasks, reference.NUM_CG_SCALARS, dtype=dtype, device=device)
            gamma = reference.task_dot(r, r)
            scalars[:, reference.GAMMA] = gamma
            scalars[:, reference.GAMMA_PREV] = gamma * (1 + torch.rand_like(gamma))
            scalars[:, reference.BNORM2] = gamma * 10
            mid_way = torch.arange(num_tasks, device=device) % 2 == 1
            scalars[:, reference.ALPHA] = torch.where(mid_way, 0.1 + torch.rand_like(gamma), 0.0)
            scalars[:, reference.BETA] = torch.where(mid_way, torch.rand_like(gamma), 0.0)
            status = torch.zeros(num_tasks, dtype=torch.int32, device=device)
            if num_tasks >= 3:
                status[2] = reference.CONVERGED
            yield CGState(
                x=task_list(num_tasks, shapes, dtype, device),
                r=r,
                p=task_list(num_tasks, shapes, dtype, device),
                s=task_list(num_tasks, shapes, dtype, device),
                hr=hr,
                scalars=scalars,
                status=status,
                iterations=torch.randint(0, 5, (num_tasks,), device=device),
                counter=torch.zeros(1, dtype=torch.int32, device=device),
                lam=0.5 + torch.rand(()).item(),
                lam_per_task=(0.5 + torch.rand(num_tasks, dtype=dtype, device=device)) if per_task else None,
                tol=1e-3,
            )


@dataclasses.dataclass
class BatchNormPoolSample:
    """Inputs of batch_norm_relu_max_pool2d, a gradient for its output, and upstream gradients of the
    backward's outputs (input, weight, bias) for the double backward."""

    name: str
    input: Tensor
    weight: Tensor
    bias: Tensor
    eps: float
    grad_out: Tensor
    grad_grad_input: Tensor
    grad_grad_weight: Tensor
    grad_grad_bias: Tensor

    def op_args(self):
        return (self.input, self.weight, self.bias, self.eps)

    def double_backward_args(self, mean, invstd, argmax, weight=None, bias=None):
        """The double backward's arguments, given the forward's statistics and argmax (weight and bias:
        the forward's, when not the sample's own, e.g. float32 ones for a bf16 input)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        return (self.grad_grad_input, self.grad_grad_weight.to(weight.dtype), self.grad_grad_bias.to(bias.dtype),
                self.grad_out, self.input, weight, bias, mean, invstd, argmax)


# name -> [N, C, H, W]: Conv4's blocks (28x28 Omniglot, 3x3 before the last pool), T = 4 tasks stacked,
# odd sides (a row and a column no window covers), the smallest input, one channel.
BATCH_NORM_POOL_SHAPES = {
    "conv4_first": (5, 8, 28, 28),
    "conv4_last": (5, 8, 3, 3),
    "stacked_T4": (3, 4 * 6, 14, 14),
    "odd_sides": (3, 5, 7, 9),
    "smallest": (1, 1, 2, 2),
    "one_channel_many_images": (40, 1, 6, 4),
}


def batch_norm_pool_sample_inputs(device="cpu", dtype=torch.float64):
    """Random inputs of every shape above, and "ties": small integers, so that windows hold equal
    maxima (positive and zero) and the first one must win."""
    for name, shape in BATCH_NORM_POOL_SHAPES.items():
        for kind in ("random", "ties"):
            n, c, h, w = shape
            if kind == "random":
                x = torch.randn(shape, dtype=torch.float64) * (0.5 + torch.rand(1, c, 1, 1, dtype=torch.float64))
                x = x + torch.randn(1, c, 1, 1, dtype=torch.float64)
            else:
                x = torch.randint(-2, 3, shape).to(torch.float64)
            weight = torch.randn(c, dtype=torch.float64)  # some negative: the max is not BatchNorm's argmax
            yield BatchNormPoolSample(
                name=f"{name}-{kind}",
                input=x.to(dtype=dtype, device=device),
                weight=weight.to(dtype=dtype, device=device),
                bias=torch.randn(c, dtype=torch.float64).to(dtype=dtype, device=device),
                eps=float(10 ** torch.empty(()).uniform_(-5, -2)),
                grad_out=torch.randn(n, c, h // 2, w // 2, dtype=torch.float64).to(dtype=dtype, device=device),
                grad_grad_input=torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device),
                grad_grad_weight=torch.randn(c, dtype=torch.float64).to(dtype=dtype, device=device),
                grad_grad_bias=torch.randn(c, dtype=torch.float64).to(dtype=dtype, device=device),
            )
