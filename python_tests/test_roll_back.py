"""EngineConfig(roll_back=True), Betty 0.2's warm start, against a float64 reference written
from Betty's rules (betty/problems/problem.py: step, step_normal, step_after_roll_back):

- a problem with parents caches its parameters, buffers and optimizer state when its inner
  loop starts (after on_inner_loop_start);
- its scheduler does not step with its local steps;
- after its parents' step it restores the cache, takes one step on its last batch with the
  updated parents (the count does not move), steps its scheduler, then its parents do the same.

The toy problems' losses are quadratics whose gradients are written out by hand below, so
the reference never calls the code under test. The upper problems take their lower problem's
weights as data (no u2l entry), so the order of the steps alone decides the numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from imaml_ext import Config, Engine, EngineConfig, ImplicitProblem, IterativeProblem

D = 3


class Vector(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = nn.Parameter(value.clone())


class Lower(ImplicitProblem):
    """0.5 ||w - theta - x||^2 on batch x: gradient w - theta - x."""

    def training_step(self, batch):
        return 0.5 * ((self.module.w - self.upper.module.w.detach() - batch) ** 2).sum()


class IterativeLower(IterativeProblem):
    def training_step(self, batch):
        return 0.5 * ((self.module.w - self.upper.module.w.detach() - batch) ** 2).sum()


class Upper(ImplicitProblem):
    """0.5 ||theta - y||^2 + theta . w (w the lower's, as data): gradient theta - y + w."""

    def training_step(self, batch):
        return 0.5 * ((self.module.w - batch) ** 2).sum() + (self.module.w * self.lower.module.w.detach()).sum()


def make_engine(lower_cls, lower_batches, upper_batches, unroll, momentum, gamma, iters, roll_back=True):
    torch.manual_seed(0)
    w0, theta0 = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    lower_module, upper_module = Vector(w0), Vector(theta0)
    lower_opt = torch.optim.SGD(lower_module.parameters(), lr=0.3, momentum=momentum)
    lower_sched = torch.optim.lr_scheduler.ExponentialLR(lower_opt, gamma=gamma)
    lower = lower_cls("lower", Config(unroll_steps=unroll, type="darts"), lower_module, lower_opt, lower_sched,
                      lower_batches)
    upper = Upper("upper", Config(), upper_module, torch.optim.SGD(upper_module.parameters(), lr=0.2),
                  None, upper_batches)
    engine = Engine([upper, lower], EngineConfig(train_iters=iters, roll_back=roll_back, task_batching="off"),
                    dependencies={"l2u": {lower: [upper]}, "u2l": {}})
    return engine, w0, theta0


def reference(w0, theta0, lower_batches, upper_batches, unroll, momentum, gamma, iters, roll_back=True,
              lower_cls=None):
    """Betty 0.2's stepping of the two problems above, in float64 by hand."""
    w, theta, buf = w0.clone(), theta0.clone(), None
    # an IterativeProblem's unrolled optimizer starts each inner loop with no state (torch's keeps its own)
    fresh_state = lower_cls is IterativeLower
    lr, count, upper_count = 0.3, 0, 0
    cache = None

    def lower_step(w, buf, x, lr):
        g = w - theta - x
        buf = g if buf is None else momentum * buf + g  # torch's SGD: the first step's buffer is the gradient
        return w - lr * buf, buf

    for step in range(iters):
        x = lower_batches[count % len(lower_batches)]
        if count % unroll == 0 and fresh_state:
            buf = None
        if count % unroll == 0 and roll_back:
            cache = (w.clone(), None if buf is None else buf.clone())
        w, buf = lower_step(w, buf, x, lr)
        count += 1
        if not roll_back:
            lr *= gamma
        if count % unroll == 0:
            y = upper_batches[upper_count % len(upper_batches)]
            theta = theta - 0.2 * (theta - y + w)
            upper_count += 1
            if roll_back:
                w, buf = cache
                w, buf = lower_step(w, buf, x, lr)
                lr *= gamma
    return w, theta


@pytest.mark.parametrize("lower_cls", [Lower, IterativeLower])
@pytest.mark.parametrize("unroll, momentum, gamma", [(1, 0.0, 1.0), (3, 0.9, 0.7), (2, 0.5, 0.9)])
def test_roll_back_equals_betty_rules(lower_cls, unroll, momentum, gamma):
    lower_batches = [torch.randn(D, dtype=torch.float64) for _ in range(5)]
    upper_batches = [torch.randn(D, dtype=torch.float64) for _ in range(3)]
    iters = 4 * unroll + 1  # ends inside an inner loop
    engine, w0, theta0 = make_engine(lower_cls, lower_batches, upper_batches, unroll, momentum, gamma, iters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an IterativeProblem's Config.type note
        engine.run()
    w, theta = reference(w0, theta0, lower_batches, upper_batches, unroll, momentum, gamma, iters, lower_cls=lower_cls)
    torch.testing.assert_close(engine.upper.module.w.detach(), theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(engine.lower.module.w.detach(), w, rtol=1e-12, atol=1e-12)
    assert engine.lower.count == iters  # the re-run step does not count


def test_without_roll_back_the_reference_differs():
    """The reference's two branches are distinguishable on these inputs (the test above can fail)."""
    lower_batches = [torch.randn(D, dtype=torch.float64) for _ in range(5)]
    upper_batches = [torch.randn(D, dtype=torch.float64) for _ in range(3)]
    engine, w0, theta0 = make_engine(Lower, lower_batches, upper_batches, 3, 0.9, 0.7, 9, roll_back=False)
    engine.run()
    w, theta = reference(w0, theta0, lower_batches, upper_batches, 3, 0.9, 0.7, 9, roll_back=False)
    torch.testing.assert_close(engine.upper.module.w.detach(), theta, rtol=1e-12, atol=1e-12)
    w_rb, theta_rb = reference(w0, theta0, lower_batches, upper_batches, 3, 0.9, 0.7, 9)
    assert (theta_rb - theta).abs().max() > 1e-3 and (w_rb - w).abs().max() > 1e-3


class Middle(ImplicitProblem):
    """0.5 ||m - t - y||^2 + m . b (t the top's, b the bottom's, as data)."""

    def training_step(self, batch):
        return (0.5 * ((self.module.w - self.top.module.w.detach() - batch) ** 2).sum()
                + (self.module.w * self.bottom.module.w.detach()).sum())


class Bottom(ImplicitProblem):
    def training_step(self, batch):
        return 0.5 * ((self.module.w - self.middle.module.w.detach() - batch) ** 2).sum()


class Top(ImplicitProblem):
    def training_step(self, batch):
        return 0.5 * ((self.module.w - batch) ** 2).sum() + (self.module.w * self.middle.module.w.detach()).sum()


def test_three_levels_roll_back_both_lower_problems():
    """Bottom (unroll 2) -> middle (unroll 1) -> top: after the top's step, the bottom, then the
    middle, go back to their inner loops' starts and step once more, in Betty's order."""
    torch.manual_seed(1)
    starts = [torch.randn(D, dtype=torch.float64) for _ in range(3)]
    data = {name: [torch.randn(D, dtype=torch.float64) for _ in range(4)] for name in ("b", "m", "t")}
    modules = [Vector(s) for s in starts]
    lrs = (0.3, 0.2, 0.1)
    bottom = Bottom("bottom", Config(unroll_steps=2), modules[0], torch.optim.SGD(modules[0].parameters(), lr=lrs[0]),
                    None, data["b"])
    middle = Middle("middle", Config(unroll_steps=1), modules[1], torch.optim.SGD(modules[1].parameters(), lr=lrs[1]),
                    None, data["m"])
    top = Top("top", Config(), modules[2], torch.optim.SGD(modules[2].parameters(), lr=lrs[2]), None, data["t"])
    iters = 7
    engine = Engine([top, middle, bottom], EngineConfig(train_iters=iters, roll_back=True),
                    dependencies={"l2u": {bottom: [middle], middle: [top]}, "u2l": {}})
    engine.run()

    b, m, t = (s.clone() for s in starts)
    nb = nm = nt = 0
    for _ in range(iters):
        x = data["b"][nb % 4]
        if nb % 2 == 0:
            cache_b = b.clone()
        b = b - lrs[0] * (b - m - x)
        nb += 1
        if nb % 2 == 0:
            cache_m, y = m.clone(), data["m"][nm % 4]
            m = m - lrs[1] * (m - t - y + b)
            nm += 1
            t = t - lrs[2] * (t - data["t"][nt % 4] + m)
            nt += 1
            b = cache_b - lrs[0] * (cache_b - m - x)  # the bottom's re-run, with the updated middle
            m = cache_m - lrs[1] * (cache_m - t - y + b)  # then the middle's, with the updated top
    for problem, expected in ((bottom, b), (middle, m), (top, t)):
        torch.testing.assert_close(problem.module.w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_roll_back_with_a_hypergradient_runs_darts_cg_neumann():
    """With u2l (the hypergradient through the lower), roll-back runs under each type and moves theta."""
    for kind in ("darts", "cg", "neumann"):
        torch.manual_seed(2)
        lower_m, upper_m = Vector(torch.randn(D)), Vector(torch.randn(D))

        class Coupled(ImplicitProblem):
            def training_step(self, batch):
                return 0.5 * ((self.module.w - self.upper.module.w - batch) ** 2).sum()

        class Outer(ImplicitProblem):
            def training_step(self, batch):
                return 0.5 * ((self.lower.module.w - batch) ** 2).sum()

        lower = Coupled("lower", Config(type=kind, unroll_steps=2), lower_m, torch.optim.SGD(lower_m.parameters(), lr=0.1),
                        None, [torch.randn(D) for _ in range(3)])
        upper = Outer("upper", Config(), upper_m, torch.optim.SGD(upper_m.parameters(), lr=0.1), None,
                      [torch.randn(D) for _ in range(3)])
        before = upper_m.w.detach().clone()
        engine = Engine([upper, lower], EngineConfig(train_iters=6, roll_back=True),
                        dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}})
        engine.run()
        assert torch.isfinite(upper_m.w).all() and not torch.equal(upper_m.w.detach(), before), kind
        assert lower.schedule.roll_back and not upper.schedule.roll_back  # only problems with parents


def test_roll_back_turns_task_batching_off_and_says_why():
    from dropin_programs import build

    with pytest.warns(RuntimeWarning, match=r"task batching: EngineConfig\(roll_back=True\).*running task by task"):
        engine = build("auto", roll_back=True)
    assert not engine.task_batching.active
    assert "roll_back=True" in engine.task_batching.reason


def test_iterative_problem_reads_the_learning_rate_after_load_state_dict():
    """The optimizer's load_state_dict (a checkpoint, a roll-back) makes new param groups: the
    unrolled updates must read the lr that a scheduler or the user sets there afterwards."""
    lower_batches = [torch.randn(D, dtype=torch.float64) for _ in range(5)]
    engine, _, _ = make_engine(IterativeLower, lower_batches, lower_batches, 3, 0.0, 1.0, 4, roll_back=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.run()
        lower = engine.lower
        lower.load_state_dict(lower.state_dict())
        lower.optimizer.param_groups[0]["lr"] = 0.0
        before = lower.module.w.detach().clone()
        lower.step(global_step=5)  # inside the inner loop: only the lower moves, by lr x gradient
    torch.testing.assert_close(lower.module.w.detach(), before, rtol=0, atol=0)
