"""Seconds per implicit-MAML meta-step: imaml_ext against plain PyTorch.

Workload: Omniglot 5-way 1-shot, 15 query images per class, the tutorial's
Conv4 (64 channels, BatchNorm without running statistics), float32; proximal
inner loop of ``inner_steps`` SGD steps (lr 0.1, lam 2), then the implicit
meta-gradient mean_t (I + H_t / lam)^-1 grad L_query(phi_t) by ``cg_iters`` CG
iterations, added to theta's .grad. Every variant computes that same
meta-gradient from the same theta and the same tasks:

- ours_batched (_vmap, _loop, _stacked, _im2col, _channels_last, _loop_fused, _stacked_fused,
  _im2col_fused): ``imaml_ext.IMAML.meta_step`` over all T tasks at once, forward="auto" (and
  "vmap", "loop", "stacked", "im2col", "channels_last", "loop+fused", ... forced);
- ours_sequential: the Betty tutorial's recipe on imaml_ext's Betty API (a
  Lower ImplicitProblem with Config(type="cg", proximal_lambda=lam), an Upper
  accumulating T tasks, an Env feeding one task at a time, run by the Engine);
- plain_loop: a hand-written per-task loop in plain PyTorch (double-backward
  HVPs, Betty-style CG on torch.cat-flattened vectors);
- plain_vmap: plain torch.func, vmapped over tasks (HVP = vmap of jvp of grad,
  batched CG in torch ops), none of imaml_ext's kernels.

Before timing, every variant's theta.grad is compared with ours_batched's: a
benchmark of different maths would be meaningless. Prints a markdown table and
writes it, with every figure, to benchmarks/results/meta_step-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import importlib.util
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `import imaml_ext` of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import imaml_ext  # noqa: E402
from imaml_ext import IMAML, Config, Engine, EngineConfig, Env, ImplicitProblem  # noqa: E402
from _timing import (  # noqa: E402
    run_metadata,
    write_results,
    Variant,
    compare,
    cpu_model,
    keep_freed_cpu_memory,
    sync,
)

WAYS, SHOTS, QUERY = 5, 1, 15
HIDDEN = 64
INNER_LR, LAM = 0.1, 2.0
ALL_VARIANTS = ("ours_batched", "ours_batched_vmap", "ours_batched_loop", "ours_batched_stacked",
                "ours_batched_im2col", "ours_batched_channels_last", "ours_batched_loop_fused",
                "ours_batched_stacked_fused", "ours_batched_im2col_fused", "ours_graph",
                "ours_hvp_reverse", "ours_hvp_forward", "ours_tf32_on", "ours_tf32_off",
                "ours_bf16", "ours_fp16", "ours_sequential", "plain_loop", "plain_vmap")
CUDA_ONLY = ("ours_graph", "ours_tf32_on", "ours_tf32_off")
# other arithmetic: not checked against the float64 step, not flagged by --rtol
OPT_IN = ("ours_bf16", "ours_fp16", "ours_tf32_on", "ours_tf32_off")
# Whose float32 (or bf16 / fp16 / TF32) meta-gradient is also compared with ours_batched's in float64: what the
# arithmetic costs in accuracy.
PRECISION_CHECKED = ("ours_batched", "ours_tf32_on", "ours_tf32_off", "ours_bf16", "ours_fp16")
REFERENCE = "ours_batched"
BASELINES = ("plain_loop", "plain_vmap", "ours_sequential")

Batch = Tuple[Tensor, Tensor, Tensor, Tensor]  # support_x, support_y, query_x, query_y: [T, ...]


def tutorial_convnet() -> type:
    """The tutorial's ConvNet class itself, so the benchmark runs exactly its model."""
    path = ROOT / "examples" / "implicit_maml" / "tutorial.py"
    spec = importlib.util.spec_from_file_location("imaml_tutorial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ConvNet


# --------------------------------------------------------------------------- data


class TaskSource:
    """Omniglot task batches, or random tensors of the same shapes when the data are absent."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.seed = seed
        try:
            from imaml_ext.data import omniglot_tasks

            self.tasks = omniglot_tasks(WAYS, SHOTS, QUERY, seed=seed, device=device)
            self.kind = "omniglot"
            self.note = "Omniglot (imaml_ext.data.omniglot_tasks, train split)"
        except FileNotFoundError as error:
            self.tasks = None
            self.kind = "random"
            self.note = ("RANDOM TENSORS of Omniglot's shapes: the Omniglot data were not found "
                         f"({str(error).splitlines()[0][:160]})")
            print(f"warning: {self.note}", file=sys.stderr)

    def sample(self, num_tasks: int) -> Batch:
        if self.tasks is not None:
            return tuple(self.tasks.train.sample(num_tasks))
        g = torch.Generator().manual_seed(self.seed + num_tasks)

        def labels(per_class: int) -> Tensor:  # every class present, shuffled per task
            y = torch.arange(WAYS).repeat_interleave(per_class)
            return torch.stack([y[torch.randperm(y.numel(), generator=g)] for _ in range(num_tasks)])

        sx = torch.rand(num_tasks, WAYS * SHOTS, 1, 28, 28, generator=g)
        qx = torch.rand(num_tasks, WAYS * QUERY, 1, 28, 28, generator=g)
        return tuple(t.to(self.device) for t in (sx, labels(SHOTS), qx, labels(QUERY)))


# --------------------------------------------------------------------------- variants
#
# Each variant owns a copy of the same model (theta) and exposes run() (one
# meta-step that leaves the meta-gradient in its theta's .grad, or its
# equivalent), reset() (untimed: clear that gradient) and meta_grad().


class OursBatched:
    """imaml_ext's batched meta-step; the tasks come as the [T, ...] batch of run()."""

    def __init__(self, model: nn.Module, inner_steps: int, cg_iters: int, forward: str, precision: str = "fp32",
                 hvp: str = "auto", tf32: Optional[bool] = None):
        self.model = copy.deepcopy(model)
        # check_labels stays at its default (one host sync per step): what a user gets.
        self.imaml = IMAML(self.model, inner_steps=inner_steps, inner_lr=INNER_LR, lam=LAM,
                           cg_iterations=cg_iters, ways=WAYS, forward=forward, precision=precision,
                           nonfinite="skip" if precision == "fp16" else "propagate", hvp=hvp, tf32=tf32)

    def run(self, batch: Batch) -> None:
        self.last = self.imaml.meta_step(*batch)

    def cg_summary(self) -> dict:
        """How the last meta-step's CG solves went (tasks that broke down stop at their last good iterate)."""
        info = self.last.cg
        return {"tasks_broken_down": int(info.breakdown.sum()),
                "mean_cg_updates": float(info.iterations.float().mean()),
                "query_loss": float(self.last.loss), "support_loss": float(self.last.support_loss)}

    def reset(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def meta_grad(self) -> List[Tensor]:
        return [p.grad.detach().clone() for p in self.model.parameters()]


class OursGraph(OursBatched):
    """The same meta-step captured once as a CUDA graph (IMAML.capture) and replayed: no launch overhead."""

    def __init__(self, model: nn.Module, inner_steps: int, cg_iters: int, batch: Batch):
        super().__init__(model, inner_steps, cg_iters, "auto")
        self.captured = self.imaml.capture(*batch)

    def run(self, batch: Batch) -> None:
        self.last = self.captured.step(*batch)


class OursSequential:
    """The tutorial's classes, with its reg * ||phi - theta||^2 declared as proximal_lambda = 2 * reg,
    Config(type="cg") instead of "darts", and the Env feeding the benchmark's tasks in order."""

    def __init__(self, model: nn.Module, inner_steps: int, cg_iters: int, batch: Batch, device: torch.device):
        num_tasks = batch[0].shape[0]
        captured: List[Tensor] = []
        self.captured = captured

        class TaskEnv(Env):
            def __init__(self):
                super().__init__()
                self.index = 0
                self.batch = {"train": None, "test": None}

            def step(self):
                # One task per inner loop, cycling over the T tasks of the meta-batch:
                # a meta-step consumes exactly T of them, so every call sees the same tasks.
                sx, sy, qx, qy = batch
                t = self.index % num_tasks
                self.index += 1
                self.batch["train"] = (sx[t], sy[t])
                self.batch["test"] = (qx[t], qy[t])

        class Upper(ImplicitProblem):
            def training_step(self, batch):
                inputs, labels = batch
                out = self.lower(inputs)
                loss = F.cross_entropy(out, labels)
                acc = 100.0 * (out.argmax(dim=1) == labels).float().mean().item()  # as the tutorial logs it
                return {"loss": loss, "acc": acc}

            def get_batch(self):
                return self.env.batch["test"]

            def grad_callback(self, params):
                # The accumulated meta-gradient, just before the optimizer step and zero_grad.
                captured[:] = [p.grad.detach().clone() for p in params]

        class Lower(ImplicitProblem):
            def training_step(self, batch):
                inputs, labels = batch
                loss = F.cross_entropy(self.module(inputs), labels)
                reg = sum(torch.sum((p1 - p2) ** 2) for p1, p2 in zip(self.parameters(), self.upper.parameters()))
                return loss + (LAM / 2) * reg

            def get_batch(self):
                return self.env.batch["train"]

            def on_inner_loop_start(self):
                self.module.load_state_dict(self.upper.module.state_dict())

        class MAMLEngine(Engine):
            def train_step(self):
                if self.global_step % inner_steps == 1 or inner_steps == 1:
                    self.env.step()
                for leaf in self.leaves:
                    leaf.step(global_step=self.global_step)

        upper_module, lower_module = copy.deepcopy(model), copy.deepcopy(model)
        # lr 0 keeps theta fixed from call to call; the optimizer step itself is still paid.
        upper = Upper(name="upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.0),
                      config=Config(retain_graph=True, gradient_accumulation=num_tasks))
        lower = Lower(name="lower", module=lower_module,
                      optimizer=torch.optim.SGD(lower_module.parameters(), lr=INNER_LR),
                      config=Config(type="cg", unroll_steps=inner_steps, cg_iterations=cg_iters, proximal_lambda=LAM))
        self.engine = MAMLEngine(
            # task by task, as Betty runs it: the drop-in batching is timed by bench_dropin.py
            config=EngineConfig(train_iters=num_tasks * inner_steps, valid_step=0, device=str(device),
                                task_batching="off"),
            problems=[upper, lower],
            dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
            env=TaskEnv(),
        )

    def run(self, batch: Batch) -> None:  # the tasks were given to the Env
        self.engine.run()  # T * inner_steps global steps: one meta-step

    def reset(self) -> None:
        self.captured.clear()

    def meta_grad(self) -> List[Tensor]:
        return list(self.captured)


def _ce(model: nn.Module, names: Sequence[str], params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _guarded_step(rr: Tensor, p_ap: Tensor, active: Tensor) -> Tuple[Tensor, Tensor]:
    """CG step length alpha = rr / p.Ap, zero for a task that has broken down, and the new active mask.

    At a random theta, (I + H / lam) is often not positive definite for a
    1-shot task (H, the support loss's Hessian, has eigenvalues below -lam),
    and CG then meets p.Ap <= 0. imaml_ext.ops.cg_solve stops such a task at
    its last good iterate; an unguarded CG walks on along negative curvature
    to a different x. The baselines take the same guard (a few scalar ops,
    no host sync) so that all variants compute the same function.
    """
    alpha = rr / p_ap
    active = active & (p_ap > 0) & torch.isfinite(alpha) & (alpha != 0)
    return torch.where(active, alpha, torch.zeros_like(alpha)), active


class PlainLoop:
    """What one writes by hand without imaml_ext: a Python loop over tasks."""

    def __init__(self, model: nn.Module, inner_steps: int, cg_iters: int):
        self.model = copy.deepcopy(model)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.theta = list(self.model.parameters())
        self.inner_steps, self.cg_iters = inner_steps, cg_iters

    def run(self, batch: Batch) -> None:
        sx, sy, qx, qy = batch
        num_tasks = sx.shape[0]
        theta = [p.detach() for p in self.theta]
        for t in range(num_tasks):
            phi = [p.clone().requires_grad_(True) for p in theta]
            for _ in range(self.inner_steps):
                g = torch.autograd.grad(_ce(self.model, self.names, phi, sx[t], sy[t]), phi)
                with torch.no_grad():
                    phi = [p - INNER_LR * (gi + LAM * (p - th)) for p, gi, th in zip(phi, g, theta)]
                phi = [p.requires_grad_(True) for p in phi]
            v = torch.autograd.grad(_ce(self.model, self.names, phi, qx[t], qy[t]), phi)
            # One double-backward graph at phi, reused by every HVP of the solve.
            support_grad = torch.autograd.grad(_ce(self.model, self.names, phi, sx[t], sy[t]), phi, create_graph=True)

            def a_times(p: List[Tensor]) -> List[Tensor]:  # (I + H / lam) p
                hp = torch.autograd.grad(support_grad, phi, grad_outputs=p, retain_graph=True)
                return [pi + hi / LAM for pi, hi in zip(p, hp)]

            # Betty's cg.py: torch.cat-flattened vectors, torch.dot, 0-d tensor step lengths
            # (here with the textbook p <- r_new + beta p, which Betty's code gets wrong),
            # plus cg_solve's breakdown guard (see _guarded_step), without a host sync.
            x = [torch.zeros_like(vi) for vi in v]
            r = [vi.clone() for vi in v]
            p = [vi.clone() for vi in v]
            active = torch.ones((), dtype=torch.bool, device=v[0].device)
            for _ in range(self.cg_iters):
                ap = a_times(p)
                r_vec = _flat(r)
                rr = torch.dot(r_vec, r_vec)
                alpha, active = _guarded_step(rr, torch.dot(_flat(p), _flat(ap)), active)
                x = [xi + alpha * pi for xi, pi in zip(x, p)]
                r = [ri - alpha * api for ri, api in zip(r, ap)]
                r_vec = _flat(r)
                beta = torch.dot(r_vec, r_vec) / rr
                p = [ri + beta * pi for ri, pi in zip(r, p)]
            with torch.no_grad():
                for th, xi in zip(self.theta, x):
                    contribution = xi / num_tasks
                    if th.grad is None:
                        th.grad = contribution
                    else:
                        th.grad.add_(contribution)

    def reset(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def meta_grad(self) -> List[Tensor]:
        return [p.grad.detach().clone() for p in self.theta]


class PlainVmap:
    """Plain torch.func over the task dimension: the obvious batched version without custom kernels."""

    def __init__(self, model: nn.Module, inner_steps: int, cg_iters: int):
        self.model = copy.deepcopy(model)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.theta = list(self.model.parameters())
        self.inner_steps, self.cg_iters = inner_steps, cg_iters
        loss = lambda params, x, y: _ce(self.model, self.names, params, x, y)  # noqa: E731
        self.task_grad = grad(loss)
        self.batched_grad = vmap(self.task_grad, randomness="different")

        def task_hvp(params, vec, x, y):
            # Forward-over-reverse: one pass per product, no graph kept between CG iterations.
            return jvp(lambda p: self.task_grad(p, x, y), (params,), (vec,))[1]

        self.batched_hvp = vmap(task_hvp, randomness="different")

    def run(self, batch: Batch) -> None:
        sx, sy, qx, qy = batch
        num_tasks = sx.shape[0]
        theta = [p.detach() for p in self.theta]
        phi = [p.unsqueeze(0).expand(num_tasks, *p.shape).clone() for p in theta]
        for _ in range(self.inner_steps):
            g = self.batched_grad(phi, sx, sy)
            phi = [p - INNER_LR * (gi + LAM * (p - th)) for p, gi, th in zip(phi, g, theta)]
        v = self.batched_grad(phi, qx, qy)

        def dot(a: List[Tensor], b: List[Tensor]) -> Tensor:  # per-task dot products: [T]
            return sum((ai * bi).flatten(1).sum(1) for ai, bi in zip(a, b))

        def per_task(s: Tensor, like: Tensor) -> Tensor:
            return s.view(-1, *([1] * (like.dim() - 1)))

        x = [torch.zeros_like(vi) for vi in v]
        r = [vi.clone() for vi in v]
        p = [vi.clone() for vi in v]
        rr = dot(r, r)
        active = torch.ones(num_tasks, dtype=torch.bool, device=sx.device)
        for _ in range(self.cg_iters):
            hp = self.batched_hvp(phi, p, sx, sy)
            ap = [pi + hi / LAM for pi, hi in zip(p, hp)]
            alpha, active = _guarded_step(rr, dot(p, ap), active)
            x = [xi + per_task(alpha, xi) * pi for xi, pi in zip(x, p)]
            r = [ri - per_task(alpha, ri) * api for ri, api in zip(r, ap)]
            rr_new = dot(r, r)
            beta = rr_new / rr
            p = [ri + per_task(beta, ri) * pi for ri, pi in zip(r, p)]
            rr = rr_new
        with torch.no_grad():
            for th, xi in zip(self.theta, x):
                if th.grad is None:
                    th.grad = xi.mean(0)
                else:
                    th.grad.add_(xi.mean(0))

    def reset(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def meta_grad(self) -> List[Tensor]:
        return [p.grad.detach().clone() for p in self.theta]


def make_variant(name: str, model: nn.Module, inner_steps: int, cg_iters: int, batch: Batch, device: torch.device):
    if name == "ours_graph":
        return OursGraph(model, inner_steps, cg_iters, batch)
    if name in ("ours_bf16", "ours_fp16"):
        return OursBatched(model, inner_steps, cg_iters, "auto", precision=name[len("ours_"):])
    if name.startswith("ours_hvp_"):
        return OursBatched(model, inner_steps, cg_iters, "auto", hvp=name[len("ours_hvp_"):])
    if name.startswith("ours_tf32_"):
        return OursBatched(model, inner_steps, cg_iters, "auto", tf32=name.endswith("_on"))
    if name.startswith("ours_batched"):
        forward = name[len("ours_batched_"):].replace("_fused", "+fused") or "auto"
        return OursBatched(model, inner_steps, cg_iters, forward)
    if name == "ours_sequential":
        return OursSequential(model, inner_steps, cg_iters, batch, device)
    if name == "plain_loop":
        return PlainLoop(model, inner_steps, cg_iters)
    if name == "plain_vmap":
        return PlainVmap(model, inner_steps, cg_iters)
    raise ValueError(name)


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory one call adds, in MiB.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before.
    CPU (approximate): the peak resident set size above the one before, with the
    kernel's high-water mark reset first (/proc/self/clear_refs) and glibc's free
    memory returned to the OS (malloc_trim), so that pages kept from earlier
    variants do not hide this one's. It counts everything resident (allocator
    slack, first-call caches), not only tensors. Where clear_refs cannot be
    written it falls back to the ru_maxrss delta, which is only non-zero for a
    call that raises the whole process's peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated"
        if device.type == "cpu":
            try:
                self._reset_hwm()
                self.method = "CPU peak RSS delta (VmHWM reset via /proc/self/clear_refs; approximate)"
            except OSError:
                self.method = "CPU ru_maxrss delta (approximate: 0 unless the call raises the process peak)"
            try:
                self._trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
            except (OSError, AttributeError, TypeError):
                self._trim = None

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    def measure(self, fn: Callable[[], object]) -> float:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self._trim is not None:
            self._trim(0)
        if self.method.startswith("CPU peak RSS"):
            self._reset_hwm()
            base = self._status_kib("VmRSS")
            fn()
            return (self._status_kib("VmHWM") - base) / 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


# --------------------------------------------------------------------------- one configuration


def max_rel_diff(a: List[Tensor], ref: List[Tensor]) -> float:
    """max |a - ref| over all entries, relative to max |ref|."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((x.double() - r.double()).abs().max()) for x, r in zip(a, ref)) / scale


def same_kernels_reference(name: str, names: Sequence[str]) -> Optional[str]:
    """The ours_batched variant that runs the same convolution kernels as `name`, to compare float32 results with.

    vmap runs grouped convolutions, the others dense per-task ones: different
    rounding, which an ill-conditioned CG solve amplifies (see check_float64).
    """
    ref = "ours_batched_vmap" if name.endswith("vmap") else "ours_batched_loop"
    if name.startswith("ours_batched") or ref not in names:
        return None
    return ref


def check_float64(args, device: torch.device, model: nn.Module, batch: Batch, inner_steps: int,
                  cg_iters: int) -> Dict[str, float]:
    """Max relative difference of each variant's float64 meta-gradient from ours_batched's, on the first tasks.

    The guard that all variants compute the same maths. In float32 they differ
    by up to ~1e-2 here: at a random theta many tasks' (I + H / lam) is
    indefinite or nearly singular, so CG amplifies rounding differences (and a
    near-zero p.Ap can break down in one variant and not in another). In
    float64 the same maths agree to ~1e-14, different maths by O(1).
    """
    num = min(args.check_tasks, batch[0].shape[0])
    sub = tuple(t[:num] for t in batch)
    sub = tuple(t.double() if t.is_floating_point() else t for t in sub)
    model64 = copy.deepcopy(model).double()
    grads = {}
    for name in args.variants:
        if name in OPT_IN:
            continue
        v = make_variant(name, model64, inner_steps, cg_iters, sub, device)
        v.reset()
        v.run(sub)
        grads[name] = v.meta_grad()
    ref = REFERENCE if REFERENCE in grads else next(iter(grads))
    diffs = {name: max_rel_diff(g, grads[ref]) for name, g in grads.items()}
    # The arithmetic's own error: float32 (TF32, bf16, fp16) steps on the same tasks against the float64 one.
    low = tuple(t.float() if t.is_floating_point() else t for t in sub)
    for name in args.variants:
        if name in PRECISION_CHECKED and ref in grads:
            v = make_variant(name, model, inner_steps, cg_iters, low, device)
            v.reset()
            v.run(low)
            diffs[f"{name} vs float64"] = max_rel_diff(v.meta_grad(), grads[ref])
    return diffs


def bench_config(args, device: torch.device, model: nn.Module, batch: Batch, inner_steps: int, cg_iters: int,
                 memory: PeakMemory) -> dict:
    num_tasks = batch[0].shape[0]
    diffs64 = check_float64(args, device, model, batch, inner_steps, cg_iters) if args.check_tasks > 0 else {}
    variants = {name: make_variant(name, model, inner_steps, cg_iters, batch, device) for name in args.variants}

    # Warm-up call of each variant, which also gives its meta-gradient and peak memory.
    grads, peak_mib = {}, {}
    for name, v in variants.items():
        v.reset()
        peak_mib[name] = memory.measure(lambda: v.run(batch))
        grads[name] = v.meta_grad()
    # The first call's peak includes one-off work ("auto"'s timing, a CUDA graph's capture); a second
    # call's is what every later step takes.
    steady_mib = {}
    for name, v in variants.items():
        v.reset()
        steady_mib[name] = memory.measure(lambda: v.run(batch))
    ref_name = REFERENCE if REFERENCE in grads else next(iter(grads))
    ours = next((v for v in variants.values() if isinstance(v, OursBatched)), None)
    cg_summary = ours.cg_summary() if ours is not None else None
    diffs = {name: max_rel_diff(g, grads[ref_name]) for name, g in grads.items()}
    paired = {}
    for name in grads:
        twin = same_kernels_reference(name, list(grads))
        if twin is not None:
            paired[name] = {"reference": twin, "max_rel_diff": max_rel_diff(grads[name], grads[twin])}

    # NaN counts as disagreeing.
    disagree = {f"{name} (float64)": d for name, d in diffs64.items()
                if not d <= args.rtol64 and not name.endswith(" vs float64")}
    disagree.update({f"{name} (float32)": d for name, d in diffs.items() if not d <= args.rtol and name not in OPT_IN})
    if disagree:
        print(f"WARNING: meta-gradients disagree with {ref_name}: {disagree}", file=sys.stderr)

    timed = {name: Variant(lambda v=v: v.run(batch), v.reset) for name, v in variants.items()}
    stats = compare(timed, device, args.repeats, warmup=0, max_seconds=args.max_seconds)
    records = {}
    for name in variants:
        rec = stats[name].summary()
        seconds = rec["median_ms"] / 1e3
        rec.update(seconds=seconds, tasks_per_s=num_tasks / seconds, peak_mib=peak_mib[name],
                   steady_peak_mib=steady_mib[name],
                   max_rel_diff_vs_reference=diffs[name],
                   max_rel_diff_vs_reference_float64=diffs64.get(name),
                   max_rel_diff_of_its_arithmetic_vs_float64=diffs64.get(f"{name} vs float64"),
                   same_kernels=paired.get(name))
        records[name] = rec
    reference = variants.get(REFERENCE)
    auto_choices = None if reference is None else [
        {"input": list(k[0]), "mode": k[2], "threads": k[3], "forward": v["forward"], "ms": v["ms"]}
        for k, v in reference.imaml.forward_choices.items()]
    hvp_choices = None if reference is None else [
        {"support": list(k[1]), "forward": k[3], "hvp": v["hvp"], "solve_ms": v["ms"], "refused": v.get("refused")}
        for k, v in reference.imaml.hvp_choices.items()]
    speedups = {ours: {other: records[other]["seconds"] / records[ours]["seconds"]
                       for other in BASELINES if other in records}
                for ours in (REFERENCE, "ours_graph") if ours in records}
    return {"tasks": num_tasks, "inner_steps": inner_steps, "cg_iters": cg_iters, "reference": ref_name,
            "float64_check_tasks": min(args.check_tasks, num_tasks), "variants": records,
            "speedup_of_ours_batched": speedups.get(REFERENCE, {}),
            "speedup_of_ours_graph": speedups.get("ours_graph", {}), "disagree": disagree, "cg": cg_summary,
            "auto_choices": auto_choices, "hvp_choices": hvp_choices}


# --------------------------------------------------------------------------- report


def md_table(headers: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def fmt_load(load: Optional[List[float]]) -> str:
    return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def render(result: dict) -> str:
    meta = result["meta"]
    names = meta["variants"]
    lines = [
        f"# imaml_ext meta-step benchmark: {meta['machine']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, device {meta['device']} ({meta['device_name']}), {meta['cores']} cores "
        f"({meta['torch_threads']} torch threads), float32. Omniglot {WAYS}-way {SHOTS}-shot, {QUERY} query "
        f"images per class; the tutorial's Conv4 ({HIDDEN} channels, {meta['num_params']} parameters); "
        f"inner lr {INNER_LR}, lam {LAM}.",
        "",
        f"Data: {meta['data']}.",
        "",
    ]
    if not meta.get("complete", True):
        lines += ["**Cut off: only the configurations below finished.**", ""]
    lines += [
        f"Load average (1/5/15 min) before the run: {fmt_load(meta['loadavg_at_start'])}, after it: "
        f"{fmt_load(meta['loadavg_at_end'])} (this run's own process included after).",
        "",
        f"Median seconds per meta-step over {meta['repeats']} calls (timed round-robin) after 1 warm-up call; "
        "(tasks/s) = T / seconds. Speed-ups are of ours_batched (forward=\"auto\", which picks "
        f"{meta['auto_forward']} here) over the baseline.",
        "",
    ]
    if meta["cpu_malloc_keeps_freed_memory"]:
        lines += ["glibc keeps freed memory (mallopt; --os-malloc to disable), as the CUDA caching allocator does, "
                  "so the allocating variants do not pay fresh page faults for every temporary.", ""]
    headers = ["T", "inner steps", "CG its", *names]
    speed_names = [n for n in BASELINES if n in names]
    headers += [f"speed-up vs {n}" for n in speed_names] if REFERENCE in names else []
    graph_names = speed_names if "ours_graph" in names else []
    headers += [f"ours_graph vs {n}" for n in graph_names]
    rows = []
    for r in result["configs"]:
        row = [str(r["tasks"]), str(r["inner_steps"]), str(r["cg_iters"])]
        for n in names:
            rec = r["variants"][n]
            row.append(f"{fmt_s(rec['seconds'])} ({rec['tasks_per_s']:.1f})")
        row += [f"{r['speedup_of_ours_batched'][n]:.1f}x" for n in speed_names] if REFERENCE in names else []
        row += [f"{r['speedup_of_ours_graph'][n]:.1f}x" for n in graph_names]
        rows.append(row)
    lines += md_table(headers, rows)
    chosen = [r for r in result["configs"] if r.get("auto_choices")]
    if chosen and meta["device"] == "cpu":
        lines += ["", "forward=\"auto\"'s choices (timed forward and backward at the first call of each input shape):"]
        lines += [f"- T={r['tasks']} K={r['inner_steps']} CG={r['cg_iters']}: " + "; ".join(
            f"{c['input'][:2]} {c['mode']}: {c['forward']} ({', '.join(f'{m} {ms:.0f} ms' for m, ms in c['ms'].items())})"
            for c in r["auto_choices"]) for r in chosen]

    hvp_chosen = [r for r in result["configs"] if r.get("hvp_choices")]
    if hvp_chosen:
        lines += ["", "hvp=\"auto\"'s choices (a solve's HVP work predicted from one timed product of each, and "
                      "the reverse mode's graph build):"]
        lines += [f"- T={r['tasks']} K={r['inner_steps']} CG={r['cg_iters']}: " + "; ".join(
            f"{c['hvp']} ({', '.join(f'{m} {ms:.0f} ms' for m, ms in c['solve_ms'].items())})"
            for c in r["hvp_choices"]) for r in hvp_chosen]
    arithmetic = [(r, n) for r in result["configs"] for n in names
                  if r["variants"][n].get("max_rel_diff_of_its_arithmetic_vs_float64") is not None]
    if arithmetic:
        lines += ["", "The arithmetic's own error: max |theta.grad - the float64 step's| / max |the float64 step's| "
                      f"on the first {meta['float64_check_tasks']} tasks:"]
        lines += [f"- T={r['tasks']} K={r['inner_steps']} CG={r['cg_iters']} {n}: "
                  f"{r['variants'][n]['max_rel_diff_of_its_arithmetic_vs_float64']:.1e}" for r, n in arithmetic]

    ref = result["configs"][0]["reference"] if result["configs"] else REFERENCE
    lines += [
        "",
        "## Agreement",
        "",
        f"max |theta.grad - {ref}'s| / max |{ref}'s| after one meta-step from zero. float64: the "
        f"same step in float64 on the first {meta['float64_check_tasks']} tasks (tolerance {meta['rtol64']:g}), the "
        "check that all variants compute the same maths. float32: the timed runs (tolerance "
        f"{meta['rtol']:g}); in brackets, against the ours_batched variant with the same convolution kernels "
        "(vmap: grouped, otherwise dense). CG amplifies float32 rounding here: at this random theta many tasks' "
        "(I + H/lam) is indefinite, CG breaks down (p.Ap <= 0) and stops them at the last good iterate, as "
        "cg_solve does and the plain baselines are made to do.",
        "",
    ]
    rows = []
    for r in result["configs"]:
        row = [str(r["tasks"]), str(r["inner_steps"]), str(r["cg_iters"])]
        cg = r.get("cg")
        row.append("-" if cg is None else f"{cg['tasks_broken_down']}/{r['tasks']}, {cg['mean_cg_updates']:.1f}")
        for n in names:
            rec = r["variants"][n]
            d64 = rec["max_rel_diff_vs_reference_float64"]
            cell = ("-" if d64 is None else f"{d64:.0e}") + f" / {rec['max_rel_diff_vs_reference']:.0e}"
            if rec["same_kernels"] is not None:
                cell += f" ({rec['same_kernels']['max_rel_diff']:.0e})"
            row.append(cell)
        rows.append(row)
    lines += md_table(["T", "inner steps", "CG its", "CG breakdowns, mean updates (ours)",
                       *[f"{n} f64 / f32" for n in names]], rows)
    lines += ["", "## Peak memory", "", f"MiB that one meta-step adds at its peak: {meta['memory_method']}. "
              "First call / second call: the first includes one-off work (\"auto\"'s timing, a CUDA graph's "
              "capture), the second is what every later step takes.", ""]
    rows = [[str(r["tasks"]), str(r["inner_steps"]), str(r["cg_iters"]),
             *[f"{r['variants'][n]['peak_mib']:.0f} / " + (f"{r['variants'][n]['steady_peak_mib']:.0f}"
                                                             if "steady_peak_mib" in r["variants"][n] else "-")
               for n in names]] for r in result["configs"]]
    lines += md_table(["T", "inner steps", "CG its", *names], rows)
    bad = [r for r in result["configs"] if r["disagree"]]
    if bad:
        lines += ["", "**WARNING: some variants' meta-gradients disagree beyond the tolerance:** "
                  + "; ".join(f"T={r['tasks']} K={r['inner_steps']} CG={r['cg_iters']}: {r['disagree']}" for r in bad)]
    lines += ["", "Variants: " + "; ".join(f"{n}: {VARIANT_NOTES[n]}" for n in names) + ".",
              "", f"Total run time: {meta['run_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


VARIANT_NOTES = {
    "ours_batched": 'imaml_ext.IMAML(forward="auto").meta_step, all tasks at once',
    "ours_batched_vmap": 'the same with forward="vmap" (grouped convolutions)',
    "ours_batched_loop": 'the same with forward="loop" (per-task dense layers)',
    "ours_batched_stacked": 'the same with forward="stacked" (vmap, convolutions, BatchNorm and max-pooling '
                            "on the tasks' stacked channels)",
    "ours_batched_im2col": 'the same with forward="im2col" (as "stacked", the convolutions as im2col and one '
                           "batched matrix product over tasks)",
    "ours_batched_channels_last": 'the same with forward="channels_last" (as "stacked", in channels-last memory '
                                  "layout)",
    "ours_batched_loop_fused": 'the same with forward="loop+fused" (per-task dense layers, each BatchNorm -> ReLU '
                               "-> max-pool as one fused op, imaml_ext.ops.batch_norm_relu_max_pool2d)",
    "ours_batched_stacked_fused": 'the same with forward="stacked+fused" (stacked, the fused op on the stacked '
                                  "channels)",
    "ours_batched_im2col_fused": 'the same with forward="im2col+fused"',
    "ours_sequential": "the Betty tutorial on imaml_ext's Engine, Config(type=\"cg\", proximal_lambda=2), "
                       "one task per inner loop, Upper accumulating T tasks",
    "plain_loop": "plain PyTorch, Python loop over tasks, double-backward HVPs, Betty-style torch.cat/torch.dot CG",
    "plain_vmap": "plain torch.func: vmap over tasks, HVP = vmap(jvp(grad)), batched CG in torch ops",
    "ours_bf16": 'ours_batched with precision="bf16" (bfloat16 autocast forwards, float32 weights and CG); '
                 "not in the float64 check, and its float32 difference is bfloat16's",
    "ours_fp16": 'the same with precision="fp16" (float16 inner loop and query loss, dynamic loss scale, '
                 "float32 HVPs)",
    "ours_graph": "ours_batched captured once as a CUDA graph (IMAML.capture) and replayed; its peak memory "
                  "excludes the graph's private pool, allocated at capture",
    "ours_hvp_reverse": 'ours_batched with hvp="reverse" (double backward through one kept support-gradient graph)',
    "ours_hvp_forward": 'ours_batched with hvp="forward" (jvp of grad per product, no graph kept)',
    "ours_tf32_on": "ours_batched with tf32=True (CUDA convolutions and matrix products in TensorFloat-32)",
    "ours_tf32_off": "ours_batched with tf32=False (both in IEEE float32)",
}


# --------------------------------------------------------------------------- main


def load_average() -> Optional[List[float]]:
    """1, 5 and 15-minute load averages (runnable processes), where /proc has them."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def int_list(text: str) -> List[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int_list, default=None, help="comma-separated meta-batch sizes T (default 16,32)")
    parser.add_argument("--inner-steps", type=int_list, default=None,
                        help="comma-separated inner steps (default 5 on CPU, 5,16 on CUDA)")
    parser.add_argument("--cg-iters", type=int_list, default=None,
                        help="comma-separated CG iterations (default 5 on CPU, 3,5 on CUDA)")
    parser.add_argument("--full", action="store_true", help="the whole grid: T 16,32 x inner steps 5,16 x CG 3,5")
    parser.add_argument("--configs", default=None,
                        help="comma-separated TxKxCG triples (e.g. 16x5x5,32x16x5) instead of the grid of --tasks, "
                             "--inner-steps and --cg-iters")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: all but "
                             f"{','.join(OPT_IN)} and the ours_hvp_ pair; {','.join(CUDA_ONLY)} on CUDA only)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 3 on CPU, 5 on CUDA)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop sampling a configuration after this long, but not before 3 rounds (default: none)")
    parser.add_argument("--rtol", type=float, default=1e-2,
                        help="float32 meta-gradients differing from ours_batched's by more (relative) are flagged "
                             "(loose: CG amplifies rounding here, see check_float64)")
    parser.add_argument("--rtol64", type=float, default=1e-8,
                        help="the same for the float64 check, the real guard of same maths")
    parser.add_argument("--check-tasks", type=int, default=4,
                        help="tasks of the float64 agreement check per configuration (0: skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ways", type=int, default=WAYS)
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--query", type=int, default=QUERY, help="query images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--os-malloc", action="store_true",
                        help="on CPU, let glibc return freed memory to the OS (default: keep it, see _timing)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/meta_step-<machine>-<date>.json); .md beside it")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.full:
        args.tasks = args.tasks or [16, 32]
        args.inner_steps = args.inner_steps or [5, 16]
        args.cg_iters = args.cg_iters or [3, 5]
    if args.configs is not None:
        try:
            args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",") if c.strip()]
        except ValueError:
            args.configs = None
        if not args.configs or any(len(c) != 3 for c in args.configs):
            parser.error("--configs: comma-separated TxKxCG triples of integers, e.g. 16x5x5,32x16x5")
        args.tasks, args.inner_steps, args.cg_iters = (sorted({c[i] for c in args.configs}) for i in range(3))
    args.tasks = args.tasks or [16, 32]
    args.inner_steps = args.inner_steps or ([5] if cpu else [5, 16])
    args.cg_iters = args.cg_iters or ([5] if cpu else [3, 5])
    if args.variants is None:
        args.variants = [v for v in ALL_VARIANTS if not (cpu and v in CUDA_ONLY) and v not in OPT_IN
                         and not v.startswith("ours_hvp_")]
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    if cpu and any(v in CUDA_ONLY for v in args.variants):
        parser.error(f"--variants: {', '.join(v for v in args.variants if v in CUDA_ONLY)} need --device cuda "
                     "(CUDA graphs, TF32); got --device cpu")
    for name in ("ways", "shots", "query"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if args.repeats is None:
        args.repeats = 3 if cpu else 5
    return args


def main(argv=None) -> None:
    global WAYS, SHOTS, QUERY
    args = parse_args(argv)
    WAYS, SHOTS, QUERY = args.ways, args.shots, args.query
    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if not imaml_ext.ops.has_compiled_kernels(device.type):
        print(f"warning: imaml_ext has no compiled {device.type} kernels: ours_* run the reference ops",
              file=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_at_start = load_average()
    if device.type == "cpu" and load_at_start is not None and load_at_start[0] > 0.5:
        # Seen here: with the cores oversubscribed, OpenMP's spin-waiting barriers made every variant
        # 10-25x slower, and unevenly so; the figures of such a run are not worth keeping.
        print(f"warning: load average {load_at_start[0]:.2f} before the run: other processes compete for the "
              "cores, and OpenMP's spinning barriers can make CPU timings 10x off and erratic "
              "(rerun on a quiet machine; OMP_WAIT_POLICY=passive or --threads 1 soften it)", file=sys.stderr)
    # The sequential variant warns once per engine that CG broke down; the benchmark counts breakdowns itself.
    warnings.filterwarnings("ignore", message=r'problem "lower": CG broke down')
    malloc_cache = device.type == "cpu" and not args.os_malloc and keep_freed_cpu_memory()
    memory = PeakMemory(device)

    torch.manual_seed(args.seed)
    model = tutorial_convnet()(WAYS, HIDDEN).to(device)
    source = TaskSource(device, args.seed)
    batches = {t: source.sample(t) for t in args.tasks}

    def save(configs: List[dict], complete: bool) -> None:
        meta = run_metadata(device)
        date, machine = meta["date"], meta["machine"]
        result = {
            "meta": {
                **meta,
                "cpu_model": cpu_model(),
                "compiled_kernels": imaml_ext.ops.has_compiled_kernels(device.type),
                "dtype": "float32",
                "data": source.note,
                "data_kind": source.kind,
                "ways": WAYS, "shots": SHOTS, "query_per_class": QUERY, "hidden": HIDDEN,
                "inner_lr": INNER_LR, "lam": LAM,
                "num_params": sum(p.numel() for p in model.parameters()),
                "auto_forward": ('the fastest of "loop", "stacked" and stacked chunks of tasks, each also with BatchNorm, '
                                 'ReLU and max-pool fused ("+fused"), timed per input shape'
                                 if device.type == "cpu" else
                                 'the fastest of "vmap", "stacked", "im2col" and "channels_last", timed per input shape'),
                "variants": args.variants,
                "tasks": args.tasks, "inner_steps": args.inner_steps, "cg_iters": args.cg_iters,
                "repeats": args.repeats,
                "warmup": 1,
                "max_seconds_per_config": args.max_seconds,
                "rtol": args.rtol,
                "rtol64": args.rtol64,
                "float64_check_tasks": args.check_tasks,
                "loadavg_at_start": load_at_start,
                "loadavg_at_end": load_average(),
                "memory_method": memory.method,
                "cpu_malloc_keeps_freed_memory": malloc_cache,
                "seed": args.seed,
                "argv": sys.argv[1:] if argv is None else list(argv),
                "complete": complete,
            },
            "configs": configs,
        }
        result["meta"]["run_seconds"] = time.perf_counter() - began
        task = "" if (WAYS, SHOTS) == (5, 1) else f"{WAYS}w{SHOTS}s-"
        write_results(result, args.out, ROOT / "benchmarks" / "results" / f"meta_step-{task}{machine}-{date}.json", render)

    configs = []
    grid = args.configs or [(t, k, c) for t in args.tasks for k in args.inner_steps for c in args.cg_iters]
    for tasks, inner_steps, cg_iters in grid:
        print(f"T={tasks} inner_steps={inner_steps} cg_iters={cg_iters}", file=sys.stderr)
        r = bench_config(args, device, model, batches[tasks], inner_steps, cg_iters, memory)
        print("  " + ", ".join(f"{n} {rec['seconds']:.3f} s (rel diff {rec['max_rel_diff_vs_reference']:.1e})"
                               for n, rec in r["variants"].items()), file=sys.stderr)
        configs.append(r)
        save(configs, complete=False)  # a run cut off later keeps what it finished

    save(configs, complete=True)


if __name__ == "__main__":
    main()
