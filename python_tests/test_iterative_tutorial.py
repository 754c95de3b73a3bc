"""The tutorial's one-word switch (ImplicitProblem -> IterativeProblem), as written:
``on_inner_loop_start`` copies theta with ``load_state_dict``, which leaves phi equal to theta,
so the unroll starts from theta with its graph kept: MAML. A start that differs from theta
keeps only the proximal path, whose unrolled derivative approaches the implicit meta-gradient.
And an unroll too long to fit is refused with an estimate after its first step."""

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


def unrolled_meta_gradient(model, task, steps, lr, first_order=False, lower_class=None):
    import copy

    theta, phi = copy.deepcopy(model), copy.deepcopy(model)
    upper = QueryUpper("upper", Config(), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
    lower = (lower_class or Lower)("lower", Config(unroll_steps=steps, first_order=first_order), phi,
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


class StartFromTheta(Lower):
    """Standard MAML written out: the unroll starts from theta with its graph kept."""

    def on_inner_loop_start(self):
        self.start_from(self.upper.trainable_parameters())


def random_task(seed):
    torch.manual_seed(seed)
    return mlp(), (torch.randn(1, 10, 4, dtype=f64), torch.randint(0, 3, (1, 10)),
                   torch.randn(1, 12, 4, dtype=f64), torch.randint(0, 3, (1, 12)))


@pytest.mark.parametrize("first_order", [False, True])
def test_tutorial_copy_starts_the_unroll_from_theta_as_maml(first_order):
    """The tutorial's load_state_dict copy leaves phi equal to theta: the unroll starts from
    theta with the graph kept (and says so once), so the switch gives MAML's meta-gradient."""
    import logging

    model, task = random_task(int(torch.randint(0, 2**31, ())))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("imaml_ext")
    logger.addHandler(handler)
    try:
        as_written, phi = unrolled_meta_gradient(model, task, 4, 0.1, first_order=first_order)
    finally:
        logger.removeHandler(handler)
    said = [r.getMessage() for r in records if "starts from them with their graph kept" in r.getMessage()]
    assert len(said) == 1
    maml, phi_maml = unrolled_meta_gradient(model, task, 4, 0.1, first_order, StartFromTheta)
    assert torch.equal(phi, phi_maml)
    assert ((as_written - maml).norm() / maml.norm()).item() < 1e-12
    if first_order:  # first-order MAML: d phi / d theta = I, so the query gradient at phi
        names = [n for n, _ in model.named_parameters()]
        sizes = [p.numel() for p in model.parameters()]
        flat = phi.clone().requires_grad_(True)
        params = dict(zip(names, (t.view_as(p) for t, p in zip(flat.split(sizes), model.parameters()))))
        query = F.cross_entropy(torch.func.functional_call(model, params, (task[2][0],)), task[3][0])
        (expected,) = torch.autograd.grad(query, flat)
        assert ((as_written - expected).norm() / expected.norm()).item() < 1e-12


def test_copy_that_differs_from_theta_keeps_the_proximal_path_only():
    """A hook that leaves phi unequal to theta (here: a shifted copy) starts a fresh leaf, as
    before: theta reaches phi only through the proximal term; its second-order unrolled
    derivative approaches the implicit gradient (I + H/lam)^-1 grad L_query(phi*) as the loop
    converges."""

    class ShiftedCopy(Lower):
        def on_inner_loop_start(self):
            super().on_inner_loop_start()
            with torch.no_grad():
                for p in self.module.parameters():
                    p.add_(1e-3)

    seed = int(torch.randint(0, 2**31, ()))
    model, task = random_task(seed)
    errors = {}
    for steps in (3, 30, 150):
        unrolled, phi = unrolled_meta_gradient(model, task, steps, 0.1, False, ShiftedCopy)
        implicit = implicit_meta_gradient(model, task, phi)
        errors[steps] = ((unrolled - implicit).norm() / implicit.norm()).item()
    print(f"seed {seed}: relative distance to the implicit gradient {errors}")
    assert errors[3] > 0.05, "3 steps from theta are far from the inner problem's minimum"
    assert errors[3] > errors[30] > errors[150]
    assert errors[150] < 1e-6


def test_unroll_that_will_not_fit_is_refused_after_the_first_step(monkeypatch):
    torch.manual_seed(2)
    model = mlp()
    task = (torch.randn(1, 10, 4, dtype=f64), torch.randint(0, 3, (1, 10)),
            torch.randn(1, 12, 4, dtype=f64), torch.randint(0, 3, (1, 12)))
    monkeypatch.setattr(iterative_problem, "available_bytes", lambda device: 4096)
    with pytest.raises(MemoryError, match=r'problem "lower": unrolling 40 local steps \(unroll_steps x '
                                          r'gradient_accumulation\) keeps about .* GiB of graph .* but cpu has .* GiB free'):
        unrolled_meta_gradient(model, task, 40, lr=0.1)
    # first order keeps no graph across steps: nothing to refuse
    gradient, _ = unrolled_meta_gradient(model, task, 40, lr=0.1, first_order=True)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
