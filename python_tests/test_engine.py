"""Engine, Problem stepping, configs, logging and bad-input errors of the
Betty-compatible API (imaml_ext.Engine / Problem / Config / EngineConfig / Env).

Toy problems are nn.Linear regressions on fresh random data (conftest seeds
every test and prints the seed); expected values are computed by hand in
float64 (the MSE gradient in closed form) or counted from Betty's stepping
rules, never read back from the code under test.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imaml_ext import Config, Engine, EngineConfig, Env, ImplicitProblem, IterativeProblem
from imaml_ext.problems.data import to_device

D = 4  # input size of the toy regressions
N_ROWS = 6  # rows per batch


# --------------------------------------------------------------------------- helpers


def rand_batch(n: int = N_ROWS, d: int = D):
    return torch.randn(n, d), torch.randn(n, 1)


def mse_grads(weight, bias, x, y):
    """Closed-form gradient of mean((x W^T + b - y)^2) for (W, b), in float64."""
    w, b = weight.detach().double(), bias.detach().double()
    x, y = x.double(), y.double()
    r = x @ w.T + b - y  # (n, 1)
    n = x.shape[0]
    return 2.0 / n * (r.T @ x), 2.0 / n * r.sum(0)


def params_of(problem):
    return [p.detach().clone() for p in problem.module.parameters()]


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


class CountingSGD(torch.optim.SGD):
    """SGD that counts its step() calls (and records them in a shared event list)."""

    def __init__(self, params, lr, events=None, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.calls = 0
        self.events = events

    def step(self, closure=None):
        self.calls += 1
        if self.events is not None:
            self.events.append("step")
        return super().step(closure)


class Regression(ImplicitProblem):
    """mean((Linear(x) - y)^2); batches from ``queue`` (in order) or fresh random ones."""

    def __init__(self, name, config=None, lr=0.1, dim=D, optimizer=None, scheduler_fn=None, batches=None,
                 metrics_fn=None, **kwargs):
        module = nn.Linear(dim, 1)
        optimizer = optimizer(module) if callable(optimizer) else CountingSGD(module.parameters(), lr=lr)
        scheduler = scheduler_fn(optimizer) if scheduler_fn is not None else None
        super().__init__(name, config, module, optimizer, scheduler, **kwargs)
        self.queue = list(batches or [])
        self.batches_used = []
        self.losses = []  # loss.item() of every training_step call
        self.inner_loop_starts = 0
        self.metrics_fn = metrics_fn
        self.dim = dim

    def get_batch(self):
        batch = self.queue.pop(0) if self.queue else rand_batch(d=self.dim)
        self.batches_used.append(batch)
        return batch

    def compute_loss(self, x, y):
        return ((self.module(x) - y) ** 2).mean()

    def training_step(self, batch):
        x, y = batch
        loss = self.compute_loss(x, y)
        self.losses.append(loss.item())
        if self.metrics_fn is not None:
            return {"loss": loss, **self.metrics_fn(self)}
        return loss

    def on_inner_loop_start(self):
        self.inner_loop_starts += 1


class ProxLower(Regression):
    """Lower level: regression plus reg * ||phi - theta||^2 to its (first) parent."""

    reg = 0.5

    def compute_loss(self, x, y):
        parent = self.parents[0]
        prox = sum(((p - q) ** 2).sum() for p, q in zip(self.module.parameters(), parent.module.parameters()))
        return super().compute_loss(x, y) + self.reg * prox


class MetaUpper(Regression):
    """Upper level: the regression loss of its children's modules (through the hypergradient)."""

    def compute_loss(self, x, y):
        pred = sum(child.module(x) for child in self.children)
        return ((pred - y) ** 2).mean()


def bilevel(lower_cfg=None, upper_cfg=None, engine_cfg=None, engine_cls=Engine, env=None, lower_kw=None,
            upper_kw=None):
    lower = ProxLower("lower", lower_cfg, **(lower_kw or {}))
    upper = MetaUpper("upper", upper_cfg, **(upper_kw or {}))
    engine = engine_cls(
        [lower, upper],
        engine_cfg or EngineConfig(train_iters=1, device="cpu"),
        dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}},
        env=env,
    )
    return engine, lower, upper


def single(config=None, engine_cfg=None, name="lower", engine_cls=Engine, cls=None, **kwargs):
    problem = (cls or Regression)(name, config, **kwargs)
    engine = engine_cls([problem], engine_cfg or EngineConfig(train_iters=1, device="cpu"))
    return engine, problem


def run_steps(engine, n):
    engine.train_iters = n
    engine.run()


@pytest.fixture
def stdout_log():
    """The package logger with its handlers removed for the test (the first
    get_logger() inside the test then binds a fresh handler to capsys's
    sys.stdout), and the old ones put back afterwards."""
    logger = logging.getLogger("imaml_ext")
    saved = list(logger.handlers)
    for handler in saved:
        logger.removeHandler(handler)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in saved:
        logger.addHandler(handler)


STAMP = r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[INFO\] "


def lines_matching(out: str, prefix: str):
    return [line for line in out.splitlines() if prefix in line]


# --------------------------------------------------------------------------- 1. wiring


class DataEnv(Env):
    def __init__(self):
        super().__init__()
        self.steps = 0
        self.batch = None
        self.history = []

    def step(self):
        self.steps += 1
        self.batch = rand_batch()
        self.history.append(self.batch)


class EnvEngine(Engine):
    def train_step(self):
        self.env.step()
        super().train_step()


class EnvLower(ProxLower):
    def get_batch(self):
        batch = self.env.batch
        self.batches_used.append(batch)
        return batch


def test_bilevel_wiring_attributes_env_and_device(monkeypatch):
    env = DataEnv()
    lower = EnvLower("lower", Config(unroll_steps=2))
    upper = MetaUpper("upper")
    moved = []
    for problem in (lower, upper):
        real_to = problem.module.to

        def spy(*args, _real=real_to, _name=problem.name, **kwargs):
            moved.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        problem.module.to = spy
    engine = EnvEngine(
        [lower, upper],
        EngineConfig(train_iters=4, device="cpu"),
        dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}},
        env=env,
    )
    assert lower.parents == [upper] and lower.children == []
    assert upper.children == [lower] and upper.parents == []
    assert upper.paths == [[upper, lower, upper]] and lower.paths == []
    assert engine.leaves == [lower]
    assert upper.ready == [False]
    # by name, from the engine, from every other problem and from the env
    assert engine.lower is lower and engine.upper is upper
    assert lower.upper is upper and upper.lower is lower
    assert env.lower is lower and env.upper is upper
    assert lower.env is env and upper.env is env and engine.env is env
    assert env.engine is engine and lower.engine is engine
    cpu = torch.device("cpu")
    assert engine.device == cpu and env.device == cpu and lower.device == cpu and upper.device == cpu
    assert sorted(name for name, _, _ in moved) == ["lower", "upper"]
    assert all(torch.device(*args, **kwargs) == cpu for _, args, kwargs in moved)

    engine.run()
    assert env.steps == 4 and lower.count == 4 and upper.count == 2
    assert len(lower.batches_used) == 4 and all(a is b for a, b in zip(lower.batches_used, env.history))


def test_default_device_is_cuda_when_available_else_cpu():
    engine, problem = single(engine_cfg=EngineConfig(train_iters=1))
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.device == expected and problem.device == expected


class Top(Regression):
    def compute_loss(self, x, y):
        return ((self.mid.module(x) + self.low.module(x) - y) ** 2).mean()


def three_levels(low_cfg=None, mid_cfg=None, top_cfg=None, train_iters=1):
    low = ProxLower("low", low_cfg)
    mid = ProxLower("mid", mid_cfg)
    top = Top("top", top_cfg)
    engine = Engine(
        [top, mid, low],
        EngineConfig(train_iters=train_iters, device="cpu"),
        dependencies={"l2u": {low: [mid], mid: [top]}, "u2l": {mid: [low], top: [mid, low]}},
    )
    return engine, low, mid, top


def test_three_level_chain_wiring_and_steps():
    engine, low, mid, top = three_levels(mid_cfg=Config(unroll_steps=2), train_iters=6)
    assert low.parents == [mid] and mid.parents == [top] and top.parents == []
    assert top.children == [mid] and mid.children == [low] and low.children == []
    assert low.paths == []
    assert mid.paths == [[mid, low, mid]]
    assert top.paths == [[top, mid, top], [top, low, mid, top]]
    assert engine.leaves == [low]
    for a in (low, mid, top):
        for b in (low, mid, top):
            if a is not b:
                assert getattr(a, b.name) is b
        assert getattr(engine, a.name) is a

    before = params_of(top)
    engine.run()
    assert (low.count, mid.count, top.count) == (6, 6, 3)
    assert (low.optimizer.calls, mid.optimizer.calls, top.optimizer.calls) == (6, 6, 3)
    after = params_of(top)
    # the top's loss reaches its parameters only through the two hypergradient paths
    assert all(torch.isfinite(a).all() for a in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_parent_with_two_children_steps_when_both_are_ready():
    a = ProxLower("a", Config(unroll_steps=1))
    b = ProxLower("b", Config(unroll_steps=3))
    upper = MetaUpper("upper")
    engine = Engine(
        [a, b, upper],
        EngineConfig(train_iters=7, device="cpu"),
        dependencies={"l2u": {a: [upper], b: [upper]}, "u2l": {upper: [a, b]}},
    )
    assert engine.leaves == [a, b]
    assert upper.children == [a, b] and upper.paths == [[upper, a, upper], [upper, b, upper]]
    engine.run()
    assert (a.count, b.count, upper.count) == (7, 7, 2)  # b unrolls at 3 and 6
    assert upper.optimizer.calls == 2


# --------------------------------------------------------------------------- 2. step counts


@pytest.mark.parametrize(
    "unroll, gas_low, gas_up, warmup, n, low_opt, up_count, up_opt, low_loops, up_loops",
    [
        # lower optimizer: every G local steps; upper step: at counts c % (U*G) == 0, c > warmup;
        # upper optimizer: every A upper steps. An inner loop starts at local step 1 and again after
        # every unroll_steps * gradient_accumulation local steps (as in Betty, also for the top
        # problem, which has no parent to step): lower after each upper step, upper every A steps.
        (2, 3, 2, 0, 25, 8, 4, 2, 5, 2),
        (1, 2, 3, 5, 20, 10, 8, 2, 8, 3),
        (3, 1, 1, 0, 9, 9, 3, 3, 3, 3),
        (1, 1, 1, 4, 6, 6, 2, 2, 2, 2),
    ],
)
def test_step_counts(unroll, gas_low, gas_up, warmup, n, low_opt, up_count, up_opt, low_loops, up_loops):
    def constant_schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)

    engine, lower, upper = bilevel(
        Config(unroll_steps=unroll, gradient_accumulation=gas_low, warmup_steps=warmup),
        Config(gradient_accumulation=gas_up),
        EngineConfig(train_iters=n, device="cpu"),
        lower_kw={"scheduler_fn": constant_schedule},
        upper_kw={"scheduler_fn": constant_schedule},
    )
    engine.run()
    assert engine.global_step == n
    assert lower.count == n and lower.optimizer.calls == low_opt
    assert upper.count == up_count and upper.optimizer.calls == up_opt
    # the scheduler steps every local step, also between accumulation boundaries
    assert lower.scheduler.last_epoch == n and upper.scheduler.last_epoch == up_count
    assert lower.inner_loop_starts == low_loops
    assert upper.inner_loop_starts == up_loops


def test_warmup_delays_the_first_parent_step():
    engine, lower, upper = bilevel(Config(warmup_steps=3), None, EngineConfig(train_iters=3, device="cpu"))
    theta = params_of(upper)
    engine.run()
    assert upper.count == 0 and upper.optimizer.calls == 0 and upper.inner_loop_starts == 0
    assert all(torch.equal(a, b) for a, b in zip(params_of(upper), theta))
    run_steps(engine, 1)
    assert upper.count == 1 and upper.optimizer.calls == 1 and upper.inner_loop_starts == 1


# --------------------------------------------------------------------------- 3. loss / gradient_accumulation


def test_gradient_accumulation_averages_the_step_gradients():
    lr, gas = 0.3, 3
    batches = [rand_batch() for _ in range(2 * gas)]
    engine, p = single(Config(gradient_accumulation=gas), lr=lr, batches=batches)
    w0, b0 = params_of(p)

    run_steps(engine, gas - 1)
    # no update yet; the accumulated .grad is the sum of grad / gas
    assert torch.equal(p.module.weight, w0) and torch.equal(p.module.bias, b0)
    gw = [mse_grads(w0, b0, x, y) for x, y in batches[:gas]]
    close(p.module.weight.grad, sum(g[0] for g in gw[: gas - 1]) / gas)
    close(p.module.bias.grad, sum(g[1] for g in gw[: gas - 1]) / gas)
    assert p.optimizer.calls == 0

    run_steps(engine, 1)
    w1 = w0.double() - lr * sum(g[0] for g in gw) / gas
    b1 = b0.double() - lr * sum(g[1] for g in gw) / gas
    close(p.module.weight, w1)
    close(p.module.bias, b1)
    assert p.optimizer.calls == 1
    assert p.module.weight.grad is None and p.module.bias.grad is None

    # the next window starts from the updated parameters
    run_steps(engine, gas)
    gw = [mse_grads(w1, b1, x, y) for x, y in batches[gas:]]
    close(p.module.weight, w1 - lr * sum(g[0] for g in gw) / gas)
    close(p.module.bias, b1 - lr * sum(g[1] for g in gw) / gas)
    assert p.optimizer.calls == 2


def test_scheduler_steps_between_accumulation_boundaries():
    lr, gas = 0.2, 2
    batches = [rand_batch() for _ in range(4)]
    engine, p = single(
        Config(gradient_accumulation=gas), lr=lr, batches=batches,
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e),
    )
    w0, b0 = params_of(p)
    run_steps(engine, 2)
    # the first update happens after one scheduler step: lr * 0.5
    g = [mse_grads(w0, b0, x, y) for x, y in batches[:2]]
    w1 = w0.double() - lr * 0.5 * (g[0][0] + g[1][0]) / 2
    b1 = b0.double() - lr * 0.5 * (g[0][1] + g[1][1]) / 2
    close(p.module.weight, w1)
    close(p.module.bias, b1)
    run_steps(engine, 2)
    # the second after three: lr * 0.125
    g = [mse_grads(w1, b1, x, y) for x, y in batches[2:]]
    close(p.module.weight, w1 - lr * 0.125 * (g[0][0] + g[1][0]) / 2)
    close(p.module.bias, b1 - lr * 0.125 * (g[0][1] + g[1][1]) / 2)
    assert p.scheduler.last_epoch == 4


# --------------------------------------------------------------------------- 4. callbacks and clipping


class Hooked(Regression):
    def __init__(self, *args, events, lr, grad_scale=1.0, **kwargs):
        super().__init__(*args, lr=lr, optimizer=lambda m: CountingSGD(m.parameters(), lr=lr, events=events),
                         **kwargs)
        self.events = events
        self.grad_scale = grad_scale
        self.seen_in_grad_callback = []
        self.seen_in_param_callback = []

    def grad_callback(self, params):
        self.events.append("grad_callback")
        self.seen_in_grad_callback.append([p.grad.detach().clone() for p in params])
        for p in params:
            p.grad.mul_(self.grad_scale)

    def param_callback(self, params):
        self.events.append("param_callback")
        self.seen_in_param_callback.append(
            ([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params])
        )


@pytest.mark.parametrize("clipped", [True, False])
def test_grad_callback_clipping_step_param_callback(clipped):
    lr, gas, scale = 0.1, 2, 10.0
    batches = [rand_batch() for _ in range(gas)]
    module_seed = torch.initial_seed() + 1
    torch.manual_seed(module_seed)
    probe = nn.Linear(D, 1)
    g = [mse_grads(probe.weight, probe.bias, x, y) for x, y in batches]
    gw, gb = (g[0][0] + g[1][0]) / 2, (g[0][1] + g[1][1]) / 2
    norm = math.sqrt(float((gw**2).sum() + (gb**2).sum())) * scale
    clip = 0.25 * norm if clipped else 4.0 * norm

    events = []
    torch.manual_seed(module_seed)  # the same initial parameters as the probe
    p = Hooked("lower", Config(gradient_accumulation=gas, gradient_clipping=clip), lr=lr, batches=batches,
               events=events, grad_scale=scale)
    engine = Engine([p], EngineConfig(train_iters=gas, device="cpu"))
    w0, b0 = params_of(p)
    assert torch.equal(w0, probe.weight) and torch.equal(b0, probe.bias)
    engine.run()

    # hooks run once, on the accumulation boundary, in Betty's order
    assert events == ["grad_callback", "step", "param_callback"]
    # grad_callback sees the full accumulated gradient, before clipping
    (seen_w, seen_b), = p.seen_in_grad_callback
    close(seen_w, gw)
    close(seen_b, gb)
    # clipping acts after grad_callback (which scaled the gradient by 10)
    factor = min(1.0, clip / (norm + 1e-6))
    (params_seen, grads_seen), = p.seen_in_param_callback
    close(grads_seen[0], scale * factor * gw)
    close(grads_seen[1], scale * factor * gb)
    step_norm = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(params_seen, (w0, b0))))
    assert step_norm == pytest.approx(lr * min(clip, norm), rel=1e-4)
    # param_callback sees the updated parameters
    close(params_seen[0], w0.double() - lr * scale * factor * gw)
    close(params_seen[1], b0.double() - lr * scale * factor * gb)
    assert torch.equal(params_seen[0], p.module.weight) and torch.equal(params_seen[1], p.module.bias)
    # and the gradients are cleared after the step
    assert p.module.weight.grad is None and p.module.bias.grad is None


# --------------------------------------------------------------------------- 5. logging


def acc_metric(problem):
    return {"acc": torch.rand(()) * 100}


class RecordingRegression(Regression):
    """Records (loss, acc) of each training_step call, as logged."""

    def training_step(self, batch):
        out = super().training_step(batch)
        self.logged = getattr(self, "logged", []) + [(self.losses[-1], out["acc"].item())]
        return out


class RecordingProx(RecordingRegression, ProxLower):
    pass


def test_problem_log_lines_in_betty_format(capsys, stdout_log):
    engine, p = single(Config(log_step=2, gradient_accumulation=2), EngineConfig(train_iters=5, device="cpu"),
                       metrics_fn=acc_metric, cls=RecordingRegression)
    engine.run()
    out = capsys.readouterr().out
    lines = lines_matching(out, '[Problem "lower"]')
    assert len(lines) == 2, out
    for line, step in zip(lines, (2, 4)):
        loss, acc = p.logged[step - 1]
        # the logged loss is the training_step loss itself, not loss / gradient_accumulation
        expected = f'[Problem "lower"] [Global Step {step}] [Local Step {step}] loss: {loss} || acc: {acc}'
        assert re.fullmatch(STAMP + re.escape(expected), line), (line, expected)


def test_upper_log_lines_use_the_global_and_its_local_step(capsys, stdout_log):
    engine, lower, upper = bilevel(Config(unroll_steps=2), Config(log_step=1),
                                   EngineConfig(train_iters=6, device="cpu"))
    engine.run()
    lines = lines_matching(capsys.readouterr().out, "[Problem ")
    assert len(lines) == 3 and len(upper.losses) == 3
    for local, (line, loss) in enumerate(zip(lines, upper.losses), start=1):
        expected = f'[Problem "upper"] [Global Step {2 * local}] [Local Step {local}] loss: {loss}'
        assert re.fullmatch(STAMP + re.escape(expected), line), (line, expected)


class ValidatingEngine(Engine):
    metrics = ()

    def validation(self):
        self.calls = getattr(self, "calls", []) + [self.global_step]
        self.modes = getattr(self, "modes", []) + [(self.lower._training, self.lower.module.training)]
        return self.metrics[len(self.calls) - 1]


def test_validation_logged_every_valid_step(capsys, stdout_log):
    engine, p = single(engine_cfg=EngineConfig(train_iters=5, valid_step=2, device="cpu"),
                       engine_cls=ValidatingEngine)
    engine.metrics = [{"acc": torch.rand(()).item()}, {"acc": torch.rand(()), "loss": torch.rand(()).item()}]
    training_modes = []
    p.compute_loss = lambda x, y: (training_modes.append(p.module.training), Regression.compute_loss(p, x, y))[1]
    engine.run()
    assert engine.calls == [2, 4]
    assert engine.modes == [(False, False), (False, False)]  # eval() during validation
    assert training_modes == [True] * 5  # train() again afterwards
    lines = lines_matching(capsys.readouterr().out, "[Validation]")
    m0, m1 = engine.metrics
    expected = [
        f"[Validation] [Global Step 2] acc: {m0['acc']}",
        f"[Validation] [Global Step 4] acc: {m1['acc'].item()} || loss: {m1['loss']}",
    ]
    assert len(lines) == 2
    for line, exp in zip(lines, expected):
        assert re.fullmatch(STAMP + re.escape(exp), line), (line, exp)


def test_validation_not_called_unless_overridden(capsys, stdout_log, monkeypatch):
    calls = []
    monkeypatch.setattr(Engine, "validation", lambda self: calls.append(1) or {"acc": 1.0})
    engine, p = single(engine_cfg=EngineConfig(train_iters=4, valid_step=1, device="cpu"))
    engine.run()
    assert calls == [] and p.count == 4
    assert "[Validation]" not in capsys.readouterr().out


def test_log_step_off_prints_nothing(capsys, stdout_log):
    engine, lower, upper = bilevel(Config(log_step=-1), Config(log_step=-1), EngineConfig(train_iters=3, device="cpu"))
    engine.run()
    assert "[Problem" not in capsys.readouterr().out and upper.count == 3


def test_tensorboard_event_file(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    lower = RecordingProx("lower", Config(log_step=1, unroll_steps=2), metrics_fn=acc_metric)
    upper = MetaUpper("upper", Config(log_step=1, log_local_step=True))
    engine = ValidatingEngine(
        [lower, upper],
        EngineConfig(train_iters=4, valid_step=2, device="cpu", logger_type="tensorboard", log_dir=str(tmp_path)),
        dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}},
    )
    engine.metrics = [{"acc": 0.25 + torch.rand(()).item()}, {"acc": 0.5 + torch.rand(()).item()}]
    engine.run()

    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lower/loss", "lower/acc", "upper/loss", "validation/acc"} <= tags

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # lower logs at its local steps 1..4 (= global steps); its values are checked on a single
    # problem below (here the darts hypergradient calls training_step too)
    assert [s for s, _ in series("lower/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in series("lower/acc")] == [1, 2, 3, 4]
    # upper with log_local_step: its local steps 1, 2 (global steps 2, 4)
    assert [s for s, _ in series("upper/loss")] == [1, 2]
    for (_, value), loss in zip(series("upper/loss"), upper.losses):
        assert value == pytest.approx(loss, rel=1e-6)
    assert series("validation/acc") == [
        (2, pytest.approx(engine.metrics[0]["acc"], rel=1e-6)),
        (4, pytest.approx(engine.metrics[1]["acc"], rel=1e-6)),
    ]


def test_tensorboard_lower_loss_values(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    engine, p = single(Config(log_step=1), metrics_fn=acc_metric, cls=RecordingRegression,
                       engine_cfg=EngineConfig(train_iters=3, device="cpu", logger_type="tensorboard",
                                               log_dir=str(tmp_path)))
    engine.run()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("lower/loss")]
    accs = [(e.step, e.value) for e in acc.Scalars("lower/acc")]
    assert [s for s, _ in losses] == [1, 2, 3] and [s for s, _ in accs] == [1, 2, 3]
    for (_, lv), (_, av), (loss, a) in zip(losses, accs, p.logged):
        assert lv == pytest.approx(loss, rel=1e-6) and av == pytest.approx(a, rel=1e-6)


# --------------------------------------------------------------------------- 6. early stopping


@pytest.mark.parametrize(
    "mode, tolerance, values, stop_at",
    [
        # max, tolerance 2: 0.05 is bad (1), 0.2 resets, 0.2 bad (1), 0.1 bad (2) -> stop at the 5th
        ("max", 2, [0.1, 0.05, 0.2, 0.2, 0.1, 0.9, 0.9, 0.9], 5),
        ("min", 1, [3.0, 2.0, 2.5, 1.0, 0.5, 0.1], 3),
        ("min", 3, [3.0, 2.0, 1.0, 0.5, 0.4, 0.3], None),  # always improving: runs to the end
    ],
)
def test_early_stopping(capsys, stdout_log, mode, tolerance, values, stop_at):
    valid_step, train_iters = 2, 2 * len(values)
    engine, p = single(
        engine_cfg=EngineConfig(train_iters=train_iters, valid_step=valid_step, device="cpu", early_stopping=True,
                                early_stopping_metric="acc", early_stopping_mode=mode,
                                early_stopping_tolerance=tolerance),
        engine_cls=ValidatingEngine,
    )
    engine.metrics = [{"acc": v, "loss": 1.0} for v in values]
    engine.run()
    out = capsys.readouterr().out
    if stop_at is None:
        assert engine.global_step == train_iters and len(engine.calls) == len(values)
        assert "[Early Stopping]" not in out
    else:
        assert engine.global_step == valid_step * stop_at < train_iters
        assert p.count == engine.global_step and len(engine.calls) == stop_at
        assert f"[Early Stopping] [Global Step {valid_step * stop_at}]" in out


def test_no_early_stopping_unless_enabled():
    engine, p = single(engine_cfg=EngineConfig(train_iters=6, valid_step=1, device="cpu",
                                               early_stopping_metric="acc", early_stopping_tolerance=1),
                       engine_cls=ValidatingEngine)
    engine.metrics = [{"acc": 1.0}] * 6
    engine.run()
    assert engine.global_step == 6 and p.count == 6


def test_early_stopping_metric_missing_is_named():
    engine, p = single(engine_cfg=EngineConfig(train_iters=2, valid_step=1, device="cpu", early_stopping=True,
                                               early_stopping_metric="acc"),
                       engine_cls=ValidatingEngine)
    engine.metrics = [{"loss": 1.0}]
    with pytest.raises(KeyError, match=r"early_stopping_metric='acc' is not among the validation metrics \['loss'\]"):
        engine.run()


# --------------------------------------------------------------------------- 7. precision


class DtypeProbe(Regression):
    def training_step(self, batch):
        x, y = batch
        out = self.module(x)
        self.dtypes = getattr(self, "dtypes", []) + [(out.dtype, (x @ self.module.weight.T).dtype)]
        loss = ((out.float() - y) ** 2).mean()
        self.losses.append(loss.item())
        return loss


def one_step_update(precision_cfg, lr=0.05, scale=1.0):
    batch = rand_batch(n=32)
    engine, p = single(precision_cfg, lr=lr, batches=[batch], cls=DtypeProbe)
    w0, b0 = params_of(p)
    seen = []
    p.grad_callback = lambda params: seen.append([q.grad.detach().clone() for q in params])
    run_steps(engine, 1)
    gw, gb = mse_grads(w0, b0, *batch)
    return p, (w0, b0), (gw, gb), seen


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| over all the given tensors together."""
    a = torch.cat([t.detach().double().flatten() for t in actual])
    b = torch.cat([t.detach().double().flatten() for t in expected])
    return float((a - b).norm() / b.norm())


def test_bf16_autocast_on_cpu():
    lr = 0.05
    p, (w0, b0), (gw, gb), seen = one_step_update(Config(precision="bf16"), lr=lr)
    assert p.dtypes == [(torch.bfloat16, torch.bfloat16)]
    assert p.scaler is None
    assert p.module.weight.dtype == torch.float32
    # the update is the fp32 one up to bf16 rounding
    assert rel_err([p.module.weight - w0, p.module.bias - b0], [-lr * gw, -lr * gb]) < 0.03
    # and it trains: the loss on a realisable regression goes down
    x = torch.randn(32, D)
    y = x @ torch.randn(D, 1) + torch.randn(())
    engine, q = single(Config(precision="bf16"), lr=0.1, batches=[(x, y)] * 30)
    run_steps(engine, 30)
    assert q.losses[-1] < 0.2 * q.losses[0]


def _fp16_autocast_on_cpu_works():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.randn(3, 2)).dtype == torch.float16
    except Exception:
        return False


@pytest.mark.skipif(not _fp16_autocast_on_cpu_works(), reason="fp16 autocast on CPU is unsupported in this torch")
@pytest.mark.parametrize("cfg", [dict(precision="fp16"), dict(fp16=True)])
def test_fp16_autocast_and_grad_scaler(cfg):
    lr = 0.05
    cfg = Config(initial_dynamic_scale=256.0, scale_factor=3.0, **cfg)
    assert cfg.precision == "fp16" and cfg.fp16 is True
    p, (w0, b0), (gw, gb), seen = one_step_update(cfg, lr=lr)
    assert isinstance(p.scaler, torch.amp.GradScaler)
    assert p.scaler.get_scale() == 256.0 and p.scaler.get_growth_factor() == 3.0
    assert p.dtypes == [(torch.float16, torch.float16)]
    # grad_callback sees unscaled gradients and the update is the fp32 one (not 256x)
    assert rel_err(seen[0], [gw, gb]) < 0.01
    assert rel_err([p.module.weight - w0, p.module.bias - b0], [-lr * gw, -lr * gb]) < 0.01
    assert "scaler" in p.state_dict()


def test_fp16_flag_and_precision_are_one_setting():
    assert Config(fp16=True).precision == "fp16"
    assert Config(precision="fp16").fp16 is True
    assert Config(precision="bf16").fp16 is False and Config().precision == "fp32"
    with pytest.raises(ValueError, match=r"Config\.fp16=True contradicts Config\.precision='bf16'"):
        Config(fp16=True, precision="bf16")


def test_config_replace_changes_precision_away_from_fp16():
    cfg = Config(precision="fp16")
    assert cfg.replace(precision="fp32").precision == "fp32"  # today: silently "fp16"
    assert cfg.replace(precision="bf16").precision == "bf16"  # today: ValueError "contradicts"


def test_config_replace_validates_and_keeps_other_fields():
    cfg = Config(type="neumann", unroll_steps=3, neumann_iterations=4)
    new = cfg.replace(unroll_steps=5)
    assert (new.type, new.unroll_steps, new.neumann_iterations) == ("neumann", 5, 4) and cfg.unroll_steps == 3
    with pytest.raises(ValueError, match=r"Config\.unroll_steps must be an integer >= 1; got 0"):
        cfg.replace(unroll_steps=0)


# --------------------------------------------------------------------------- 8. state_dict


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def adam_problem(batches):
    return Regression(
        "lower", lr=0.05, batches=batches,
        optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )


def test_state_dict_round_trip():
    batches = [rand_batch() for _ in range(8)]
    p = adam_problem(batches[:6])
    engine = Engine([p], EngineConfig(train_iters=3, device="cpu"))
    engine.run()
    snapshot = copy.deepcopy(p.state_dict())
    assert snapshot["count"] == 3 and snapshot["optimizer"]["state"] and snapshot["scheduler"]["last_epoch"] == 3

    run_steps(engine, 2)  # moves module, Adam moments, scheduler, count
    assert not torch.equal(p.module.weight, snapshot["module"]["weight"])
    p.load_state_dict(copy.deepcopy(snapshot))
    assert_same_state(p.module.state_dict(), snapshot["module"])
    assert_same_state(p.optimizer.state_dict(), snapshot["optimizer"])
    assert_same_state(p.scheduler.state_dict(), snapshot["scheduler"])
    assert p.count == 3 and p.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)

    # a fresh problem loaded from the snapshot continues exactly as the original
    q = adam_problem([batches[5]])
    engine_q = Engine([q], EngineConfig(train_iters=1, device="cpu"))
    q.load_state_dict(copy.deepcopy(snapshot))
    run_steps(engine, 1)
    run_steps(engine_q, 1)
    assert torch.equal(p.module.weight, q.module.weight) and torch.equal(p.module.bias, q.module.bias)
    assert_same_state(p.optimizer.state_dict(), q.optimizer.state_dict())
    assert p.count == q.count == 4


# --------------------------------------------------------------------------- 9. bad inputs: configs


def test_unknown_config_field_lists_valid_fields():
    with pytest.raises(TypeError, match=r"Config: unknown field 'unrol_steps'; valid fields are: type, unroll_steps, "
                                        r"first_order, .*gradient_accumulation, .*cg_alpha"):
        Config(unrol_steps=2)


def test_unknown_hypergradient_type():
    with pytest.raises(ValueError, match=r"Config\.type must be one of 'cg', 'darts', 'neumann'; got 'implicit'"):
        Config(type="implicit")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"unroll_steps": 0}, r"Config\.unroll_steps must be an integer >= 1; got 0"),
        ({"unroll_steps": 2.0}, r"Config\.unroll_steps must be an integer >= 1; got 2\.0"),
        ({"unroll_steps": True}, r"Config\.unroll_steps must be an integer >= 1; got True"),
        ({"gradient_accumulation": 0}, r"Config\.gradient_accumulation must be an integer >= 1"),
        ({"warmup_steps": -1}, r"Config\.warmup_steps must be an integer >= 0; got -1"),
        ({"precision": "fp8"}, r"Config\.precision must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'"),
        ({"cg_alpha": 0}, r"Config\.cg_alpha must be a finite number > 0\.0; got 0"),
        ({"cg_alpha": float("nan")}, r"Config\.cg_alpha must be a finite number > 0\.0; got nan"),
        ({"cg_iterations": 0}, r"Config\.cg_iterations must be an integer >= 1"),
        ({"cg_tol": -1e-3}, r"Config\.cg_tol must be a finite number >= 0\.0"),
        ({"neumann_iterations": -1}, r"Config\.neumann_iterations must be an integer >= 0"),
        ({"neumann_alpha": 0.0}, r"Config\.neumann_alpha must be a finite number > 0\.0"),
        ({"darts_alpha": -0.1}, r"Config\.darts_alpha must be a finite number > 0\.0"),
        ({"gradient_clipping": -1.0}, r"Config\.gradient_clipping must be a finite number >= 0\.0"),
        ({"gradient_clipping": float("inf")}, r"Config\.gradient_clipping must be a finite number"),
        ({"log_step": 2.0}, r"Config\.log_step must be an integer"),
        ({"log_step": 0}, r"Config\.log_step must be an integer >= 1 \(log every log_step steps\) or < 0 \(no logging, "
                          r"Betty's default -1\); got 0"),
        ({"initial_dynamic_scale": 0.0}, r"Config\.initial_dynamic_scale must be a finite number > 0\.0"),
        ({"scale_factor": 1.0}, r"Config\.scale_factor must be a finite number > 1\.0"),
        ({"proximal_lambda": 0.0}, r"Config\.proximal_lambda must be a finite number > 0\.0"),
        ({"proximal_lambda": -2.0}, r"Config\.proximal_lambda must be a finite number > 0\.0"),
    ],
)
@pytest.mark.parametrize("how", ["constructor", "assignment"])
def test_invalid_config_values(kwargs, match, how):
    if how == "constructor":
        with pytest.raises(ValueError, match=match):
            Config(**kwargs)
        return
    cfg = Config()  # Betty programs set fields after construction: the same check, nothing changed
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=match):
        setattr(cfg, name, value)
    assert cfg == Config()


def test_too_many_positional_config_values():
    with pytest.raises(TypeError, match=r"Config takes at most \d+ fields"):
        Config(*(["darts"] + [1] * 40))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"train_iter": 5}, TypeError, r"EngineConfig: unknown field 'train_iter'; valid fields are: train_iters, "
                                       r"valid_step, .*early_stopping"),
        ({"strategy": "ddp"}, ValueError,
         r"EngineConfig\.strategy must be one of 'default', 'distributed', 'zero', 'fsdp', 'accelerate', 'cpu', "
         r"'gpu'; got 'ddp'"),
        ({"train_iters": -1}, ValueError, r"EngineConfig\.train_iters must be an integer >= 1; got -1"),
        ({"train_iters": 0}, ValueError, r"EngineConfig\.train_iters must be an integer >= 1; got 0"),
        ({"device": "gpu"}, ValueError, r"EngineConfig\.device must be a device such as 'cpu', 'cuda' or 'cuda:1'; "
                                        r"got 'gpu'"),
        ({"device": "mps"}, ValueError, r"EngineConfig\.device: got 'mps', but this torch has no usable mps backend"),
        ({"device": 0}, TypeError, r"EngineConfig\.device must be a str or a torch\.device; got int"),
        ({"valid_step": 2.5}, ValueError, r"EngineConfig\.valid_step must be an integer"),
        ({"logger_type": "wandb"}, ValueError, r"EngineConfig\.logger_type must be one of 'none', 'tensorboard'; "
                                               r"got 'wandb'"),
        ({"early_stopping_mode": "avg"}, ValueError, r"EngineConfig\.early_stopping_mode must be one of 'min', 'max'"),
        ({"early_stopping_tolerance": 0}, ValueError, r"EngineConfig\.early_stopping_tolerance must be an integer >= 1"),
    ],
)
@pytest.mark.parametrize("how", ["constructor", "assignment"])
def test_invalid_engine_config(kwargs, exc, match, how):
    if kwargs.get("device") == "mps" and torch.backends.mps.is_available():
        pytest.skip("this torch has MPS")
    if how == "constructor":
        with pytest.raises(exc, match=match):
            EngineConfig(**kwargs)
        return
    ecfg = EngineConfig()
    ((name, value),) = kwargs.items()
    with pytest.raises(AttributeError if name == "train_iter" else exc, match=match):
        setattr(ecfg, name, value)
    assert ecfg == EngineConfig()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_engine_config_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match=r"EngineConfig\.device: got 'cuda', but this torch sees no CUDA device"):
        EngineConfig(device="cuda")
    ecfg = EngineConfig(device="cpu")
    with pytest.raises(ValueError, match=r"EngineConfig\.device: got 'cuda', but this torch sees no CUDA device"):
        ecfg.device = "cuda"  # was torch's RuntimeError from deep inside the Engine
    assert ecfg.device == "cpu"


def test_config_fields_set_after_construction_are_checked_and_kept_consistent():
    cfg, ecfg = Config(), EngineConfig()
    cfg.type, cfg.cg_iterations, cfg.log_step, cfg.unroll_steps = "cg", 3, -1, 2  # Betty's values pass
    ecfg.train_iters, ecfg.valid_step, ecfg.device = 10, 0, None
    assert (cfg.type, cfg.cg_iterations, cfg.unroll_steps, ecfg.train_iters) == ("cg", 3, 2, 10)
    with pytest.raises(ValueError, match=r"Config\.unroll_steps must be an integer >= 1; got 0"):
        cfg.unroll_steps = 0  # was a ZeroDivisionError at the first step
    with pytest.raises(ValueError, match=r"Config\.log_step must be an integer >= 1 .* got 0"):
        cfg.log_step = 0  # logged nothing, silently
    with pytest.raises(ValueError, match=r"EngineConfig\.train_iters must be an integer >= 1; got 0"):
        ecfg.train_iters = 0  # ran nothing and exited 0
    assert (cfg.unroll_steps, cfg.log_step, ecfg.train_iters) == (2, -1, 10)
    cfg.fp16 = True
    assert cfg.precision == "fp16"
    cfg.precision = "bf16"
    assert cfg.fp16 is False
    with pytest.raises(ValueError, match=r"Config\.fp16=True contradicts Config\.precision='bf16'"):
        cfg.fp16 = True
    assert (cfg.fp16, cfg.precision) == (False, "bf16")
    with pytest.raises(ValueError, match=r"cg_damping and lam_damping .* need proximal_lambda"):
        cfg.cg_damping = 1.0
    cfg.proximal_lambda = 2.0
    cfg.cg_damping = 1.0
    with pytest.raises(ValueError, match=r"need proximal_lambda; got cg_damping=1\.0"):
        cfg.proximal_lambda = None
    with pytest.raises(AttributeError, match=r"Config: unknown field 'unrol_steps'; valid fields are: type, "):
        cfg.unrol_steps = 3  # a misspelt field was a new attribute, silently
    assert copy.deepcopy(cfg) == cfg and cfg.replace(unroll_steps=4).cg_damping == 1.0


# --------------------------------------------------------------------------- 9. bad inputs: Engine


def two():
    return ProxLower("lower"), MetaUpper("upper")


def test_dependency_on_problem_not_passed_to_engine():
    lower, upper = two()
    with pytest.raises(ValueError, match=r'dependencies\[\'l2u\'\] names problem "upper", which is not in problems '
                                         r"\(lower\); pass it to the Engine"):
        Engine([lower], EngineConfig(device="cpu"), dependencies={"l2u": {lower: [upper]}})


def test_cycle_in_l2u():
    a, b, c = ProxLower("a"), ProxLower("b"), ProxLower("c")
    with pytest.raises(ValueError, match=r"dependencies\['l2u'\] has a cycle: a -> b -> c -> a"):
        Engine([a, b, c], EngineConfig(device="cpu"), dependencies={"l2u": {a: [b], b: [c], c: [a]}})
    a, b = ProxLower("a"), ProxLower("b")
    with pytest.raises(ValueError, match=r"dependencies\['l2u'\] has a cycle: a -> a"):
        Engine([a, b], EngineConfig(device="cpu"), dependencies={"l2u": {a: [a]}})


def test_two_problems_with_one_name_are_numbered_and_a_clash_after_is_refused():
    a, b = ProxLower("lower"), MetaUpper("lower")
    engine = Engine([a, b], EngineConfig(device="cpu"))
    assert (a.name, b.name) == ("lower_0", "lower_1") and engine.lower_0 is a and b.lower_0 is a
    a, b, c = ProxLower("lower"), MetaUpper("lower"), MetaUpper("lower_0")
    with pytest.raises(ValueError, match=r'two problems are named "lower_0" \(problems\[0\] and problems\[2\]\)'):
        Engine([a, b, c], EngineConfig(device="cpu"))


@pytest.mark.parametrize("name", ["run", "config", "leaves", "train_step", "global_step", "validation", "problems"])
def test_problem_name_clashing_with_engine_attribute(name):
    p = Regression(name)
    with pytest.raises(ValueError, match=rf'problem name "{name}" clashes with the Engine attribute'):
        Engine([p], EngineConfig(device="cpu"))


@pytest.mark.parametrize("name", ["optimizer", "module", "step", "name", "scheduler"])
def test_problem_name_clashing_with_problem_or_env_attribute(name):
    lower = ProxLower("lower")
    other = MetaUpper(name)
    with pytest.raises(ValueError, match=rf'"{name}".*clash'):
        Engine([lower, other], EngineConfig(device="cpu"), env=DataEnv(),
               dependencies={"l2u": {lower: [other]}, "u2l": {other: [lower]}})


def test_problems_must_be_a_list_of_problems():
    lower, upper = two()
    with pytest.raises(TypeError, match=r"problems must be a list of Problem; got ProxLower"):
        Engine(lower, EngineConfig(device="cpu"))
    with pytest.raises(TypeError, match=r"problems\[1\] must be a Problem; got str"):
        Engine([lower, "upper"], EngineConfig(device="cpu"))
    with pytest.raises(ValueError, match=r"problems must hold at least one Problem"):
        Engine([], EngineConfig(device="cpu"))
    with pytest.raises(TypeError, match=r"config must be an imaml_ext EngineConfig; got Config"):
        Engine([lower], Config())
    with pytest.raises(TypeError, match=r"env must be an imaml_ext Env \(or None\); got dict"):
        Engine([lower], EngineConfig(device="cpu"), env={})


def test_bad_dependencies():
    lower, upper = two()
    with pytest.raises(ValueError, match=r"dependencies has unknown key 'lu2'; valid keys are \"u2l\" and \"l2u\""):
        Engine([lower, upper], EngineConfig(device="cpu"), dependencies={"l2u": {lower: [upper]}, "lu2": {}})
    with pytest.raises(TypeError, match=r"dependencies\['l2u'\]\['lower'\] must be a list of problems; got MetaUpper"):
        Engine([lower, upper], EngineConfig(device="cpu"), dependencies={"l2u": {lower: upper}})
    with pytest.raises(TypeError, match=r"dependencies\['l2u'\] holds 'upper', which is not a Problem"):
        Engine([lower, upper], EngineConfig(device="cpu"), dependencies={"l2u": {lower: ["upper"]}})


def test_u2l_without_l2u_route():
    lower, upper = two()
    with pytest.raises(ValueError, match=r'dependencies\["u2l"\] says "upper" depends on "lower", but '
                                         r'dependencies\["l2u"\] has no chain of parents from "lower" up to "upper"'):
        Engine([lower, upper], EngineConfig(device="cpu"), dependencies={"u2l": {upper: [lower]}})
    lower, upper = two()  # reversed direction
    with pytest.raises(ValueError, match=r'says "lower" depends on "upper"'):
        Engine([lower, upper], EngineConfig(device="cpu"),
               dependencies={"l2u": {lower: [upper]}, "u2l": {lower: [upper]}})


# --------------------------------------------------------------------------- 9. bad inputs: problems


class Returns(Regression):
    def __init__(self, name, make, **kwargs):
        super().__init__(name, **kwargs)
        self.make = make

    def training_step(self, batch):
        x, y = batch
        return self.make(self.module(x), y)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda out, y: ((out - y) ** 2).mean().item(), TypeError,
         r'problem "bad": training_step must return a scalar loss tensor or a dict with "loss"; got a float'),
        (lambda out, y: {"acc": ((out - y) ** 2).mean()}, TypeError,
         r"problem \"bad\": training_step must return .*; got a dict with keys \['acc'\]"),
        (lambda out, y: {"loss": 1.5}, TypeError, r'problem "bad": training_step returned a dict whose "loss" is a '
                                                  r"float"),
        (lambda out, y: (out - y) ** 2, ValueError,
         rf'problem "bad": training_step must return a scalar loss; got a tensor of shape \({N_ROWS}, 1\)'),
    ],
)
def test_training_step_bad_returns(make, exc, match):
    p = Returns("bad", make)
    engine = Engine([p], EngineConfig(train_iters=1, device="cpu"))
    with pytest.raises(exc, match=match):
        engine.run()


def test_cg_on_a_problem_with_children():
    with pytest.raises(ValueError, match=r'problem "mid": Config\.type="cg" needs a lowest-level problem .* '
                                         r"has lower problems \['low'\]"):
        three_levels(mid_cfg=Config(type="cg"))
    engine, low, mid, top = three_levels(low_cfg=Config(type="cg"), train_iters=2)  # fine at the bottom
    engine.run()
    assert top.count == 2


class NonFinite(Regression):
    def __init__(self, *args, bad_at, value, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_at, self.value = bad_at, value

    def compute_loss(self, x, y):
        loss = super().compute_loss(x, y)
        return loss * self.value if self.count == self.bad_at else loss


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_non_finite_loss(value, shown):
    p = NonFinite("lower", bad_at=3, value=value)
    engine = Engine([p], EngineConfig(train_iters=5, device="cpu"))
    with pytest.raises(FloatingPointError, match=rf'problem "lower": training_step returned a non-finite loss '
                                                 rf"\({shown}\) at local step 3 \(global step 3\)"):
        engine.run()
    assert all(torch.isfinite(q).all() for q in p.module.parameters())  # the bad step updated nothing


class NonFiniteUpper(MetaUpper):
    def compute_loss(self, x, y):
        loss = super().compute_loss(x, y)
        return loss * float("nan") if self.count == 2 else loss


def test_non_finite_loss_in_an_upper_names_the_global_step():
    lower, upper = ProxLower("lower", Config(unroll_steps=2)), NonFiniteUpper("upper")
    engine = Engine([lower, upper], EngineConfig(train_iters=6, device="cpu"),
                    dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}})
    with pytest.raises(FloatingPointError, match=r'problem "upper": .*non-finite loss \(nan\) at local step 2 '
                                                 r"\(global step 4\)"):
        engine.run()


def test_no_data_and_no_get_batch():
    class NoData(ImplicitProblem):
        def training_step(self, batch):
            return batch.sum()

    m = nn.Linear(2, 1)
    p = NoData("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    engine = Engine([p], EngineConfig(train_iters=1, device="cpu"))
    with pytest.raises(ValueError, match=r'problem "lower" has no train_data_loader: pass one \(or a tuple of them\) '
                                         r"or override get_batch\(\)"):
        engine.run()


def test_problem_construction_errors():
    with pytest.raises(ValueError, match=r"Problem name must be a Python identifier .*got 'my lower'"):
        Regression("my lower")
    with pytest.raises(TypeError, match=r'problem "lower": config must be an imaml_ext Config; got EngineConfig'):
        Regression("lower", EngineConfig())

    class NoModule(ImplicitProblem):
        pass

    with pytest.raises(ValueError, match=r'problem "lower" has no module: pass module= or override configure_module'):
        Engine([NoModule("lower")], EngineConfig(device="cpu"))
    m = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r'problem "lower" has no optimizer'):
        Engine([NoModule("lower", module=m)], EngineConfig(device="cpu"))


def test_proximal_lambda_needs_a_parent_with_the_same_shapes():
    p = Regression("lower", Config(proximal_lambda=1.0))
    with pytest.raises(ValueError, match=r'problem "lower": Config\.proximal_lambda declares a proximal term to a '
                                         r"parent, but it has no parent"):
        Engine([p], EngineConfig(device="cpu"))
    lower, upper = ProxLower("lower", Config(proximal_lambda=1.0), dim=D), MetaUpper("upper", dim=D + 1)
    with pytest.raises(ValueError, match=rf'problem "lower": Config\.proximal_lambda declares a proximal term to '
                                         rf'"upper"\'s parameters, so its parameter shapes must be \[\(1, {D + 1}\), \(1,\)\]; '
                                         rf'got \[\(1, {D}\), \(1,\)\]'):
        Engine([lower, upper], EngineConfig(device="cpu"),
               dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}})


class Inner(IterativeProblem):
    def get_batch(self):
        return rand_batch()

    def training_step(self, batch):
        x, y = batch
        return ((self.module(x) - y) ** 2).mean()


def inner(config=None, optimizer=torch.optim.SGD):
    m = nn.Linear(D, 1)
    return Inner("inner", config, m, optimizer(m.parameters(), lr=0.1))


def under_a_parent(problem):
    """An engine where ``problem`` has a parent, which differentiates through its updates."""
    upper = MetaUpper("upper")
    return Engine([problem, upper], EngineConfig(device="cpu"),
                  dependencies={"l2u": {problem: [upper]}, "u2l": {upper: [problem]}})


def test_iterative_problem_with_an_optimizer_it_cannot_unroll():
    with pytest.raises(ValueError, match=r'problem "inner": an IterativeProblem unrolls its optimizer .*written for '
                                         r"SGD, Adam; got RMSprop"):
        under_a_parent(inner(optimizer=torch.optim.RMSprop))
    m = nn.Linear(D, 1)
    p = Inner("inner", None, m, torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True))
    with pytest.raises(ValueError, match=r'problem "inner": Adam\(amsgrad=True\) cannot be unrolled'):
        under_a_parent(p)
    with pytest.raises(ValueError, match=r'problem "inner": precision="fp16" needs a GradScaler'):
        under_a_parent(inner(Config(precision="fp16")))


def test_iterative_problem_with_no_parent_steps_any_optimizer():
    """Nobody differentiates through a top-level problem's updates: it steps its optimizer
    (AdamW, RMSprop) as an ImplicitProblem does, as the tutorial's one-word switch needs."""
    problem = inner(optimizer=torch.optim.RMSprop)
    before = [p.detach().clone() for p in problem.module.parameters()]
    Engine([problem], EngineConfig(train_iters=2, device="cpu")).run()
    assert problem.count == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, problem.module.parameters()))


def test_iterative_problem_warns_on_a_hypergradient_type():
    with pytest.warns(UserWarning, match=r'problem "inner": Config\.type=\'cg\' is ignored for an IterativeProblem'):
        under_a_parent(inner(Config(type="cg")))


# --------------------------------------------------------------------------- 10. get_batch


def loader(n, batch_size, d=D):
    x = torch.randn(n, d)
    y = torch.randn(n, 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False), x, y


class LoaderProblem(ImplicitProblem):
    def training_step(self, batch):
        self.seen = getattr(self, "seen", []) + [batch]
        x, y = batch
        return ((self.module(x) - y) ** 2).mean()


def test_get_batch_cycles_a_data_loader_across_epochs():
    dl, x, y = loader(5, 2)  # 3 batches an epoch: rows 0-1, 2-3, 4
    m = nn.Linear(D, 1)
    p = LoaderProblem("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), train_data_loader=dl)
    Engine([p], EngineConfig(train_iters=7, device="cpu")).run()
    rows = [(0, 2), (2, 4), (4, 5)] * 3
    assert len(p.seen) == 7
    for (bx, by), (lo, hi) in zip(p.seen, rows):
        assert torch.equal(bx, x[lo:hi]) and torch.equal(by, y[lo:hi])


def test_get_batch_moves_tensors_to_the_device():
    dl, x, y = loader(3, 2)
    m = nn.Linear(D, 1)
    p = LoaderProblem("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), train_data_loader=dl)
    p.device = torch.device("meta")  # a device the batch is not on, without an Engine
    bx, by = p.get_batch()
    assert bx.device.type == "meta" and by.device.type == "meta"
    assert bx.shape == (2, D) and by.shape == (2, 1)

    Pair = collections.namedtuple("Pair", "a b")
    t = torch.randn(2)
    moved = to_device({"x": t, "rest": [t, (t, 3)], "pair": Pair(t, "s")}, "meta")
    assert moved["x"].device.type == "meta"
    assert isinstance(moved["rest"], list) and moved["rest"][0].device.type == "meta"
    assert isinstance(moved["rest"][1], tuple) and moved["rest"][1][1] == 3
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device.type == "meta" and moved["pair"].b == "s"


def test_get_batch_with_a_tuple_of_loaders():
    dl_a, xa, ya = loader(6, 2)  # 3 batches an epoch
    dl_b, xb, yb = loader(4, 3, d=2)  # 2 batches an epoch: rows 0-2, 3
    m = nn.Linear(D, 1)
    p = LoaderProblem("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                      train_data_loader=(dl_a, dl_b))
    Engine([p], EngineConfig(train_iters=1, device="cpu"))
    rows_a = [(0, 2), (2, 4), (4, 6)] * 2
    rows_b = [(0, 3), (3, 4)] * 3
    for i in range(5):
        batch = p.get_batch()
        assert isinstance(batch, tuple) and len(batch) == 2
        (bxa, bya), (bxb, byb) = batch
        assert torch.equal(bxa, xa[slice(*rows_a[i])]) and torch.equal(bya, ya[slice(*rows_a[i])])
        assert torch.equal(bxb, xb[slice(*rows_b[i])]) and torch.equal(byb, yb[slice(*rows_b[i])])


# --------------------------------------------------------------------------- Betty's logging without a global step


def test_step_without_global_step_logs_like_betty(capsys, stdout_log):
    p = Regression("lower", Config(log_step=1))
    Engine([p], EngineConfig(train_iters=1, device="cpu"))
    p.step()
    p.step()
    lines = lines_matching(capsys.readouterr().out, '[Problem "lower"]')
    assert len(lines) == 2
    for local, (line, loss) in enumerate(zip(lines, p.losses), start=1):
        expected = f'[Problem "lower"] [Local Step {local}] loss: {loss}'
        assert re.fullmatch(STAMP + re.escape(expected), line), (line, expected)
