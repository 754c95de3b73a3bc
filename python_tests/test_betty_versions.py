"""Betty 0.1.1 and Betty 0.2 programs alike: hooks called as the user wrote them, the
constructor's seventh argument, one_step_descent(batch), and the loaders started when the
Engine sets the problems up (docs/betty-compat.md, Part 2). Expected values come from
Betty's documented calls (betty/problems/problem.py of each version), counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imaml_ext import Config, Engine, EngineConfig, ImplicitProblem

D = 3


def regression(name, calls, config=None, **hooks):
    """A problem on nn.Linear whose hooks append (hook name, arguments) to ``calls``."""

    class Regression(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return ((self.module(x) - y) ** 2).mean()

    for hook, fn in hooks.items():
        setattr(Regression, hook, fn)
    module = nn.Linear(D, 1)
    data = [(torch.randn(4, D), torch.randn(4, 1)) for _ in range(2)]
    return Regression(name, config or Config(), module, torch.optim.SGD(module.parameters(), lr=0.1), None, data)


def run(problem, iters):
    engine = Engine([problem], EngineConfig(train_iters=iters))
    engine.run()
    return engine


def test_param_callback_with_or_without_params():
    calls = []

    def betty_011(self, params):
        calls.append(("0.1.1", [p.shape for p in params]))

    def betty_02(self):
        calls.append(("0.2",))

    run(regression("a", calls, param_callback=betty_011), 2)
    run(regression("b", calls, param_callback=betty_02), 2)
    assert calls == [("0.1.1", [torch.Size([1, D]), torch.Size([1])])] * 2 + [("0.2",)] * 2


def test_grad_callback_without_params_runs_after_every_backward():
    """Betty 0.2 calls grad_callback() after each backward, also between accumulation boundaries,
    with the gradient accumulated so far; written with params it is ours: once per boundary."""
    calls = []

    def betty_02(self):
        calls.append(("0.2", self.module.weight.grad.clone()))

    def ours(self, params):
        calls.append(("ours", params[0].grad.clone()))

    run(regression("a", calls, Config(gradient_accumulation=2), grad_callback=betty_02), 4)
    assert [c[0] for c in calls] == ["0.2"] * 4
    # the second call of a window holds the sum of two halves, the first one half
    assert not torch.allclose(calls[0][1], calls[1][1])
    calls.clear()
    run(regression("b", calls, Config(gradient_accumulation=2), grad_callback=ours), 4)
    assert [c[0] for c in calls] == ["ours"] * 2


def test_epoch_callback_and_on_epoch_end_both_called():
    calls = []
    problem = regression("a", calls, epoch_callback=lambda self: calls.append("epoch_callback"),
                         on_epoch_end=lambda self: calls.append("on_epoch_end"))
    run(problem, 5)  # two batches a loader: epochs end before steps 3 and 5
    assert calls == ["on_epoch_end", "epoch_callback"] * 2


def test_seventh_positional_argument_by_type():
    module = nn.Linear(D, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    betty_02 = ImplicitProblem("a", Config(), module, optimizer, None, None, {"width": 3})
    assert betty_02.cfg == {"width": 3} and betty_02.extra_config == {"width": 3} and betty_02.device is None
    betty_011 = ImplicitProblem("b", Config(), module, optimizer, None, None, "cpu")
    assert betty_011.device == torch.device("cpu") and betty_011.cfg is None


def test_one_step_descent_takes_a_batch():
    calls = []
    problem = regression("a", calls)
    run(problem, 1)
    x, y = torch.randn(5, D), torch.randn(5, 1)
    w = problem.module.weight.detach().clone().double()
    b = problem.module.bias.detach().clone().double()
    problem.one_step_descent(batch=(x, y))
    r = x.double() @ w.T + b - y.double()
    expected = w - 0.1 * (2.0 / 5) * (r.T @ x.double())
    torch.testing.assert_close(problem.module.weight.detach().double(), expected, rtol=1e-6, atol=1e-6)
    assert problem.cur_batch[0] is x


def test_loaders_start_at_set_up_as_betty_does():
    """Betty starts each loader (iter()) when the Engine sets the problems up; a DataLoader's start
    draws from torch's RNG (its base seed), and its shuffle draws again at the first batch. So
    what a program draws between set-up and the first step moves the shuffle exactly as on Betty."""

    def dataset():
        return TensorDataset(torch.arange(12.0).reshape(12, 1).repeat(1, D), torch.zeros(12, 1))

    def program(disturb: bool):
        torch.manual_seed(0)
        loader = DataLoader(dataset(), batch_size=4, shuffle=True)
        seen = []

        class Recorder(ImplicitProblem):
            def training_step(self, batch):
                seen.append(batch[0][:, 0].tolist())
                return ((self.module(batch[0]) - batch[1]) ** 2).mean()

        module = nn.Linear(D, 1)
        problem = Recorder("a", Config(), module, torch.optim.SGD(module.parameters(), lr=0.0), None, loader)
        engine = Engine([problem], EngineConfig(train_iters=3))
        if disturb:
            torch.rand(10)  # e.g. the program initialises something after building the Engine
        engine.run()
        return seen

    def betty(disturb: bool):
        torch.manual_seed(0)
        loader = DataLoader(dataset(), batch_size=4, shuffle=True)
        nn.Linear(D, 1)
        started = iter(loader)  # the Engine's set-up
        if disturb:
            torch.rand(10)
        return [batch[0][:, 0].tolist() for batch in started]

    for disturb in (False, True):
        assert program(disturb) == betty(disturb)
    assert betty(True) != betty(False)  # the draw in between matters, so the test can fail


def two_levels(u2l: bool):
    class Lower(ImplicitProblem):
        def training_step(self, batch):
            return ((self.module(batch) - self.upper.module(batch)) ** 2).mean()

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return (self.lower.module(batch) ** 2).mean()

    lower_m, upper_m = nn.Linear(D, 1), nn.Linear(D, 1)
    data = [torch.randn(4, D) for _ in range(2)]
    lower = Lower("lower", Config(type="darts"), lower_m, torch.optim.SGD(lower_m.parameters(), lr=0.1), None, data)
    upper = Upper("upper", Config(), upper_m, torch.optim.SGD(upper_m.parameters(), lr=0.1), None, data)
    dependencies = {"l2u": {lower: [upper]}, **({"u2l": {upper: [lower]}} if u2l else {})}
    return Engine([upper, lower], EngineConfig(train_iters=2), dependencies=dependencies)


def test_an_upper_problem_without_its_u2l_entry_is_told_so():
    """Its loss reaches its parameters only through the lower's hypergradient, which u2l asks for:
    the warning names that cause (it used to speak of an IterativeProblem's start)."""
    with pytest.warns(RuntimeWarning, match=r'problem "upper": none of its parameters received a gradient.*no '
                                            r"dependencies\['u2l'\] entry .* \"lower\""):
        two_levels(u2l=False).run()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two_levels(u2l=True).run()


def test_a_hook_is_inspected_once_not_every_step(monkeypatch):
    """takes_argument runs at every local step: its signature is read once per function."""
    import inspect

    from imaml_ext.problems import hooks

    calls = []
    real = inspect.signature
    monkeypatch.setattr(hooks.inspect, "signature", lambda f: calls.append(f) or real(f))
    hooks._takes_argument.cache_clear()
    seen = []
    run(regression("a", seen, param_callback=lambda self: seen.append("cb")), 5)
    assert seen == ["cb"] * 5
    assert len([f for f in calls if getattr(f, "__name__", "") == "<lambda>"]) == 1


class Grouped(ImplicitProblem):
    """Betty 0.2's learning_by_ignoring shape: param_groups() with their own learning rates, the
    scheduler built in configure_scheduler() on self.optimizer."""

    def training_step(self, batch):
        x, y = batch
        return ((self.module(x) - y) ** 2).mean()

    def param_groups(self):
        return [{"params": [self.module.weight], "lr": 0.5}, {"params": [self.module.bias]}]

    def configure_scheduler(self):
        return torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.1)


def test_param_groups_rebuild_the_optimizer_as_betty_02_does():
    """Betty 0.2's patch_optimizer: the optimizer's class and defaults over param_groups(); a group
    without "lr" takes the default; the scheduler steps the rebuilt optimizer. Two steps by hand."""
    f64 = torch.float64
    torch.manual_seed(0)
    module = nn.Linear(D, 1).double()
    x, y = torch.randn(4, D, dtype=f64), torch.randn(4, 1, dtype=f64)
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    problem = Grouped("grouped", Config(), module, torch.optim.SGD(module.parameters(), lr=0.1), None, [(x, y)])
    engine = Engine([problem], EngineConfig(train_iters=2))
    assert type(problem.optimizer) is torch.optim.SGD
    assert [g["lr"] for g in problem.optimizer.param_groups] == [0.5, 0.1]
    assert problem.scheduler.optimizer is problem.optimizer
    engine.run()
    for lr_w, lr_b in ((0.5, 0.1), (0.05, 0.01)):  # StepLR(1, 0.1) after the first step
        w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        gw, gb = torch.autograd.grad(((x @ w_.T + b_ - y) ** 2).mean(), (w_, b_))
        w, b = w - lr_w * gw, b - lr_b * gb
    torch.testing.assert_close(module.weight.detach(), w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(module.bias.detach(), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("groups, message", [
    (None, r'problem "grouped": param_groups\(\) rebuilds the optimizer, and the scheduler= argument was built'),
    ([{"lr": 0.5}], r'problem "grouped": param_groups\(\) must give what SGD takes as its params .*KeyError'),
])
def test_param_groups_that_cannot_rebuild_the_optimizer_are_one_error(monkeypatch, groups, message):
    module = nn.Linear(D, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1) if groups is None else None
    if groups is not None:
        monkeypatch.setattr(Grouped, "param_groups", lambda self: groups)
    problem = Grouped("grouped", Config(), module, optimizer, scheduler, [(torch.randn(4, D), torch.randn(4, 1))])
    with pytest.raises(ValueError, match=message):
        Engine([problem], EngineConfig(train_iters=1))


def test_penalty_problem_is_an_implicit_problem_at_bettys_path():
    """Betty 0.2's betty.problems.penalty_problem.PenaltyProblem, ImplicitProblem's code less "sama"."""
    from imaml_ext.problems.penalty_problem import PenaltyProblem

    weights = []
    for base in (ImplicitProblem, PenaltyProblem):
        class Fit(base):
            def training_step(self, batch):
                x, y = batch
                return ((self.module(x) - y) ** 2).mean()

        torch.manual_seed(0)
        module = nn.Linear(D, 1)
        data = [(torch.randn(4, D), torch.randn(4, 1)) for _ in range(2)]
        run(Fit("fit", Config(), module, torch.optim.SGD(module.parameters(), lr=0.1), None, data), 3)
        weights.append(module.weight.detach())
    assert torch.equal(*weights)


class Pair(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.a = nn.Parameter(torch.randn(n, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(n, dtype=torch.float64))


def meta_pair(config, subset):
    """L(a, b, theta) = 1/2 a^T A a + 1/2 b^T A b - a^T B theta - b^T C theta below,
    U = 1/2 ||a - c||^2 + 1/2 ||b - d||^2 above; the lower's meta parameters: a, or a and b."""
    n, m = 4, 3
    A = torch.eye(n, dtype=torch.float64) * 2
    B, C = torch.randn(n, m, dtype=torch.float64), torch.randn(n, m, dtype=torch.float64)
    c, d = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            a, b, theta = self.module.a, self.module.b, self.upper.module.weight.view(-1)
            return 0.5 * a @ A @ a + 0.5 * b @ A @ b - a @ B @ theta - b @ C @ theta

        if subset:
            def meta_trainable_parameters(self):
                return [self.module.a]

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return 0.5 * ((self.lower.module.a - c) ** 2).sum() + 0.5 * ((self.lower.module.b - d) ** 2).sum()

    lower_m, upper_m = Pair(n), nn.Linear(m, 1, bias=False).double()
    lower = Lower("lower", config, lower_m, torch.optim.SGD(lower_m.parameters(), lr=0.1), None, [()])
    upper = Upper("upper", Config(), upper_m, torch.optim.SGD(upper_m.parameters(), lr=0.1), None, [()])
    Engine([upper, lower], EngineConfig(train_iters=1), dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    lower.cur_batch = ()
    return upper, lower, (B.T @ (lower_m.a - c) + C.T @ (lower_m.b - d)).detach(), (B.T @ (lower_m.a - c)).detach()


def test_meta_trainable_parameters_are_what_darts_differentiates_and_perturbs():
    """Betty 0.2 (hypergradient/__init__.py:24-31, darts.py:37-62): the upper's gradient taken
    against the lower's meta_trainable_parameters(), darts' probes on those alone."""
    from imaml_ext.hypergradient import get_grads

    torch.manual_seed(0)
    for subset in (False, True):
        upper, lower, both, a_only = meta_pair(Config(type="darts"), subset)
        before = [p.detach().clone() for p in lower.module.parameters()]
        (got,) = get_grads(upper.training_step(()), upper.paths[0])
        torch.testing.assert_close(got.view(-1), a_only if subset else both, rtol=1e-7, atol=1e-9)
        assert all(torch.equal(p, q) for p, q in zip(lower.module.parameters(), before))
    assert (both - a_only).norm() > 1e-2  # the subset changes the answer


@pytest.mark.parametrize("config, message", [
    (Config(type="cg"), r'meta_trainable_parameters\(\) gives a subset .* only Config\(type="darts"\) without '
                        r'proximal_lambda can take; it has type="cg"'),
    (Config(type="neumann"), r'meta_trainable_parameters\(\) gives a subset .* it has type="neumann", '
                             r"proximal_lambda=None"),
])
def test_meta_trainable_parameters_a_method_cannot_take_is_one_error(config, message):
    from imaml_ext.hypergradient import get_grads

    upper, _, _, _ = meta_pair(config, subset=True)
    with pytest.raises(ValueError, match=r'problem "lower": ' + message):
        get_grads(upper.training_step(()), upper.paths[0])


def test_meta_trainable_parameters_turn_task_batching_off_by_name():
    from dropin_programs import build

    def subset(Lower):
        return type("Lower", (Lower,), {"meta_trainable_parameters": lambda self: self.trainable_parameters()[:2]})

    with pytest.warns(RuntimeWarning, match=r'problem "lower" overrides meta_trainable_parameters\(\)'):
        engine = build("auto", meta_batch=2, inner_steps=1, lower_class=subset)
    assert not engine.task_batching.active
