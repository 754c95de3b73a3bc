"""The tutorial's one-word switch (ImplicitProblem -> IterativeProblem), as written:
``on_inner_loop_start`` copies theta with ``load_state_dict`` (no graph), so theta reaches
phi only through the proximal term ``reg * ||phi - theta||^2``. The unrolled derivative is
then an estimate of the implicit meta-gradient (I + H/lam)^-1 grad L_query(phi*), lam = 2 reg,
that approaches it as the inner loop converges. And an unroll too long to fit is refused
with an estimate after its first step."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext import Config, EngineConfig, IterativeProblem
from imaml_ext.problems import iterative_problem
from meta_problems import QueryUpper, TaskEnv, per_task_engine

f64 = torch.float64
REG = 1.0  # lam = 2 * reg = 2


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(f64)


class Lower(IterativeProblem):
    """The tutorial's Lower, as written (with IterativeProblem)."""

    def training_step(self, batch):
        inputs, labels = batch
        loss = F.cross_entropy(self.module(inputs), labels)
        reg = sum(torch.sum((p1 - p2) ** 2) for p1, p2 in zip(self.parameters(), self.upper.parameters()))
        return loss + REG * reg

    def get_batch(self):
        return self.env.batch["train"]

    def on_inner_loop_start(self):
        self.module.load_state_dict(self.upper.module.state_dict())


def unrolled_meta_gradient(model, task, steps, lr, first_order=False):
    import copy

    theta, phi = copy.deepcopy(model), copy.deepcopy(model)
    upper = QueryUpper("upper", Config(), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
    lower = Lower("lower", Config(unroll_steps=steps, first_order=first_order), phi,
                  torch.optim.SGD(phi.parameters(), lr=lr))
    per_task_engine(steps)([upper, lower], EngineConfig(device="cpu", train_iters=steps),
                           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, env=TaskEnv(task)).run()
    return torch.cat([g.reshape(-1) for g in upper.captured]), torch.cat([p.detach().reshape(-1) for p in phi.parameters()])


def implicit_meta_gradient(model, task, phi_flat):
    """(I + H/lam)^-1 grad L_query at phi, dense, H the support loss's Hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i:i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    def loss(flat, x, y):
        return F.cross_entropy(torch.func.functional_call(model, unflat(flat), (x,)), y)

    sx, sy, qx, qy = (t[0] for t in task)
    H = torch.autograd.functional.hessian(lambda f: loss(f, sx, sy), phi_flat)
    g = torch.autograd.functional.jacobian(lambda f: loss(f, qx, qy), phi_flat)
    lam = 2 * REG
    return torch.linalg.solve(torch.eye(len(phi_flat), dtype=f64) + H / lam, g)


def test_tutorial_as_written_approaches_the_implicit_gradient():
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    model = mlp()
    task = (torch.randn(1, 10, 4, dtype=f64), torch.randint(0, 3, (1, 10)),
            torch.randn(1, 12, 4, dtype=f64), torch.randint(0, 3, (1, 12)))
    errors = {}
    for steps in (3, 30, 150):
        unrolled, phi = unrolled_meta_gradient(model, task, steps, lr=0.1)
        # the implicit gradient at the phi the loop reached (phi* once it has converged)
        implicit = implicit_meta_gradient(model, task, phi)
        errors[steps] = ((unrolled - implicit).norm() / implicit.norm()).item()
    print(f"seed {seed}: relative distance to the implicit gradient {errors}")
    assert errors[3] > 0.05, "3 steps from theta are far from the inner problem's minimum"
    assert errors[3] > errors[30] > errors[150]
    assert errors[150] < 1e-6


def test_first_order_copy_leaves_theta_without_gradient_and_says_so():
    """With first_order=True the proximal term's gradient is detached like every other, so the
    copied-start loop carries no path from theta to phi: the upper gets no gradient, and a
    warning says why instead of an optimizer silently stepping nothing."""
    torch.manual_seed(1)
    model = mlp()
    task = (torch.randn(1, 10, 4, dtype=f64), torch.randint(0, 3, (1, 10)),
            torch.randn(1, 12, 4, dtype=f64), torch.randint(0, 3, (1, 12)))
    with pytest.warns(RuntimeWarning, match=r'problem "upper": none of its parameters received a gradient.*'
                                            r"Config\(first_order=False\)"):
        with pytest.raises(AttributeError):  # QueryUpper.grad_callback finds p.grad None
            unrolled_meta_gradient(model, task, 4, 0.1, first_order=True)


def test_unroll_that_will_not_fit_is_refused_after_the_first_step(monkeypatch):
    torch.manual_seed(2)
    model = mlp()
    task = (torch.randn(1, 10, 4, dtype=f64), torch.randint(0, 3, (1, 10)),
            torch.randn(1, 12, 4, dtype=f64), torch.randint(0, 3, (1, 12)))
    monkeypatch.setattr(iterative_problem, "available_bytes", lambda device: 4096)
    with pytest.raises(MemoryError, match=r'problem "lower": unrolling 40 local steps \(unroll_steps x '
                                          r'gradient_accumulation\) keeps about .* GiB of graph .* but cpu has .* GiB free'):
        unrolled_meta_gradient(model, task, 40, lr=0.1)
    # first order keeps no graph across steps: nothing to refuse (and no gradient, as above)
    with pytest.warns(RuntimeWarning, match="none of its parameters received a gradient"):
        with pytest.raises(AttributeError):
            unrolled_meta_gradient(model, task, 40, lr=0.1, first_order=True)
