"""IterativeProblem: the upper differentiates through the lower's unrolled
updates. Standard MAML through it (start_from the upper's parameters) equals
learn2learn's MAML, second order and first order."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext import Config, EngineConfig, IterativeProblem
from meta_problems import QueryUpper, TaskEnv, per_task_engine

l2l = pytest.importorskip("learn2learn")
f64 = torch.float64


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(f64)


class Inner(IterativeProblem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y)

    def get_batch(self):
        return self.env.batch["train"]

    def on_inner_loop_start(self):
        self.start_from(self.upper.trainable_parameters())  # standard MAML: phi_0 = theta, in the graph


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_through_iterative_problem_equals_learn2learn(first_order):
    T, steps, lr = 3, 3, 0.4
    tasks = (torch.randn(T, 6, 4, dtype=f64), torch.randint(0, 3, (T, 6)),
             torch.randn(T, 9, 4, dtype=f64), torch.randint(0, 3, (T, 9)))
    model = mlp()

    theta = copy.deepcopy(model)
    outer = QueryUpper("upper", Config(gradient_accumulation=T), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
    phi = copy.deepcopy(model)
    inner = Inner("lower", Config(unroll_steps=steps, first_order=first_order), phi,
                  torch.optim.SGD(phi.parameters(), lr=lr))

    per_task_engine(steps)([outer, inner], EngineConfig(device="cpu", train_iters=T * steps),
               {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, env=TaskEnv(tasks)).run()

    reference = copy.deepcopy(model)
    maml = l2l.algorithms.MAML(reference, lr=lr, first_order=first_order)
    for t in range(T):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(tasks[0][t]), tasks[1][t]))
        (F.cross_entropy(learner(tasks[2][t]), tasks[3][t]) / T).backward()
    for got, expected in zip(outer.captured, [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_first_and_second_order_differ():
    """So the equality above would notice a dropped second-order term."""
    grads = {}
    for first_order in (False, True):
        torch.manual_seed(0)
        model = mlp()
        maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)
        x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
        learner = maml.clone()
        for _ in range(3):
            learner.adapt(F.cross_entropy(learner(x), y))
        F.cross_entropy(learner(x), y).backward()
        grads[first_order] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert (grads[False] - grads[True]).norm() > 1e-3 * grads[False].norm()


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6, dtype=f64))
        self.head = nn.Linear(6, 3).to(f64)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w))


class AttributeInner(Inner):
    """Betty code that reads the weights as attributes: self.module.w, self.module.head.weight."""

    def training_step(self, batch):
        x, y = batch
        m = self.module
        return F.cross_entropy(F.linear(torch.tanh(x @ m.w), m.head.weight, m.head.bias), y)


def test_module_attributes_are_the_current_differentiable_weights():
    """self.module.w inside training_step worked with ImplicitProblem but raised AttributeError
    with IterativeProblem; it must be the current weight, so the meta-gradient is the forward's."""
    T, steps = 2, 3
    tasks = (torch.randn(T, 6, 4, dtype=f64), torch.randint(0, 3, (T, 6)),
             torch.randn(T, 9, 4, dtype=f64), torch.randint(0, 3, (T, 9)))
    model = WithHead()
    captured = {}
    for kind in (Inner, AttributeInner):
        theta, phi = copy.deepcopy(model), copy.deepcopy(model)
        outer = QueryUpper("upper", Config(gradient_accumulation=T), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
        inner = kind("lower", Config(unroll_steps=steps, first_order=False), phi, torch.optim.SGD(phi.parameters(), lr=0.4))
        per_task_engine(steps)([outer, inner], EngineConfig(device="cpu", train_iters=T * steps),
                               {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, env=TaskEnv(tasks)).run()
        captured[kind] = outer.captured
        inner.start_inner_loop()  # in a loop: the attribute is the differentiable weight itself
        assert inner.module.w is inner.trainable_parameters()[0] and inner.module.head.weight.requires_grad
    for got, expected in zip(captured[AttributeInner], captured[Inner]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert any(g.abs().sum() > 0 for g in captured[Inner])
