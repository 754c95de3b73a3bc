"""Programs written for Betty 0.1.x run with ``betty`` replaced by ``imaml_ext``
(issue 18): ``device=`` on a problem, problems that share a name, Betty's rule
for ``train_data_loader`` (a tuple is several loaders, anything else one),
``on_epoch_end``, a hyperparameter problem in the 0.1.x style learning with
cg, neumann and darts, and clear errors for configure_* hooks that return the
wrong kind of thing or loaders that yield nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imaml_ext.configs import Config, EngineConfig
from imaml_ext.engine import Engine
from imaml_ext.envs import Env
from imaml_ext.problems import HigherIterativeProblem, ImplicitProblem, IterativeProblem, MetaIterativeProblem

D = 3


class Fit(ImplicitProblem):
    """mean((Linear(x) - y)^2), recording every batch it trains on."""

    def training_step(self, batch):
        self.seen = getattr(self, "seen", []) + [batch]
        x, y = batch
        return ((self.module(x) - y) ** 2).mean()


def fit(name="lower", **kwargs):
    module = nn.Linear(D, 1)
    return Fit(name, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), **kwargs)


def xy(n=4):
    return torch.randn(n, D), torch.randn(n, 1)


# --------------------------------------------------------------------------- device=


def spy_on_to(problem, moved):
    real_to = problem.module.to

    def to(*args, **kwargs):
        moved.append((problem.name, torch.device(*args, **kwargs)))
        return real_to(*args, **kwargs)

    problem.module.to = to


def test_problem_device_takes_precedence_over_the_engine_config():
    # cpu:0 and cpu are two devices to torch.device, so the CPU alone shows which one won
    x, y = xy()
    own = fit("own", device="cpu:0", train_data_loader=[(x, y)])
    shared = fit("shared", train_data_loader=[(x, y)])
    moved = []
    spy_on_to(own, moved)
    spy_on_to(shared, moved)
    env = Env()
    engine = Engine([own, shared], EngineConfig(train_iters=1, device="cpu"), env=env)
    cpu, cpu0 = torch.device("cpu"), torch.device("cpu:0")
    assert own.device == cpu0 and shared.device == cpu and engine.device == cpu and env.device == cpu
    assert sorted(moved) == [("own", cpu0), ("shared", cpu)]

    # the other way round: the engine on cpu:0, the problem on cpu
    back = fit("back", device="cpu")
    moved.clear()
    spy_on_to(back, moved)
    Engine([back], EngineConfig(train_iters=1, device="cpu:0"))
    assert back.device == cpu and moved == [("back", cpu)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_problem_device_cpu_under_an_engine_on_cuda():
    x, y = xy()
    own = fit("own", device="cpu", train_data_loader=[(x, y)])
    shared = fit("shared", train_data_loader=[(x, y)])
    Engine([own, shared], EngineConfig(train_iters=1, device="cuda"))
    assert own.module.weight.device.type == "cpu" and own.get_batch()[0].device.type == "cpu"
    assert shared.module.weight.device.type == "cuda" and shared.get_batch()[0].device.type == "cuda"


def test_problem_device_without_an_engine_device_and_bad_devices():
    p = fit(device="cpu")
    assert p.device == torch.device("cpu")  # known before the Engine, as in Betty
    Engine([p], EngineConfig(train_iters=1))
    assert p.device == torch.device("cpu") and p.module.weight.device.type == "cpu"
    with pytest.raises(ValueError, match=r'problem "lower": device must be a device such as .*got \'gpu0\''):
        fit(device="gpu0")
    with pytest.raises(TypeError, match=r'problem "lower": device must be a str or a torch.device; got float'):
        fit(device=3.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r'problem "lower": device: got \'cuda\', but this torch sees no CUDA'):
            fit(device="cuda")


def test_device_is_the_seventh_positional_argument_as_in_betty():
    m = nn.Linear(D, 1)
    p = Fit("lower", Config(), m, torch.optim.SGD(m.parameters(), lr=0.1), None, None, "cpu:0")
    assert p.device == torch.device("cpu:0") and p.extra_config == {}


# --------------------------------------------------------------------------- shared names


class TaskEnv(Env):
    """T regression tasks; each step draws a fresh (support, query) for every task."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks
        self.batch = None

    def step(self):
        self.batch = [(xy(), xy()) for _ in range(self.tasks)]


class Outer(ImplicitProblem):
    def training_step(self, batch):
        loss = 0
        for idx in range(len(self.children)):
            inner = getattr(self, f"inner_{idx}")
            x, y = batch[idx]
            loss = loss + ((inner.module(x) - y) ** 2).mean() / len(self.children)
        return loss

    def get_batch(self):
        return [query for _, query in self.env.batch]


class Inner(ImplicitProblem):
    reg = 0.5

    def training_step(self, batch):
        idx = self.outer.children.index(self)
        self.tasks_seen.append(idx)
        x, y = batch[idx]
        prox = sum(((p - q) ** 2).sum() for p, q in zip(self.module.parameters(), self.outer.module.parameters()))
        return ((self.module(x) - y) ** 2).mean() + self.reg * prox

    def get_batch(self):
        return [support for support, _ in self.env.batch]

    def on_inner_loop_start(self):
        self.module.load_state_dict(self.outer.module.state_dict())

    def configure_module(self):
        return nn.Linear(D, 1)

    def configure_optimizer(self):
        return torch.optim.SGD(self.module.parameters(), lr=0.1)


class TaskEngine(Engine):
    def train_step(self):
        if self.global_step % 2 == 1:
            self.env.step()
        super().train_step()


@pytest.mark.parametrize("hypergradient", ["darts", "cg", "neumann"])
def test_problems_sharing_a_name_become_name_0_name_1_as_in_bettys_imaml(hypergradient):
    tasks = 3
    outer_module = nn.Linear(D, 1)
    outer = Outer("outer", Config(), outer_module, torch.optim.SGD(outer_module.parameters(), lr=0.1), device="cpu")
    inners = [Inner("inner", Config(type=hypergradient, unroll_steps=2), device="cpu") for _ in range(tasks)]
    for inner in inners:
        inner.tasks_seen = []
    before = [p.detach().clone() for p in outer_module.parameters()]
    engine = TaskEngine(inners + [outer], EngineConfig(train_iters=4), env=TaskEnv(tasks),
                        dependencies={"u2l": {outer: inners}, "l2u": {inner: [outer] for inner in inners}})
    assert [inner.name for inner in inners] == ["inner_0", "inner_1", "inner_2"]
    for i, inner in enumerate(inners):
        assert getattr(engine, f"inner_{i}") is inner and getattr(outer, f"inner_{i}") is inner
        assert getattr(engine.env, f"inner_{i}") is inner and inner.outer is outer
    assert not hasattr(engine, "inner") and not hasattr(outer, "inner")
    assert outer.name == "outer" and outer.children == inners

    engine.run()
    # each inner read its own task (the hypergradient re-evaluates its loss, so it reads it more often)
    assert [set(inner.tasks_seen) for inner in inners] == [{0}, {1}, {2}]
    assert [inner.count for inner in inners] == [4, 4, 4]
    assert outer.count == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, outer_module.parameters()))


def test_a_shared_name_keeps_the_order_of_problems_and_clashes_are_refused():
    a, b, c = fit("task"), fit("other"), fit("task")
    engine = Engine([a, b, c], EngineConfig(train_iters=1, device="cpu"))
    assert (a.name, b.name, c.name) == ("task_0", "other", "task_1")
    assert engine.task_0 is a and engine.task_1 is c and engine.other is b and b.task_1 is c

    first, second, third = fit("lower"), fit("lower"), fit("lower_1")
    with pytest.raises(ValueError, match=r'two problems are named "lower_1" \(problems\[1\] and problems\[2\]\) after '
                                         r"several problems that shared a name were numbered"):
        Engine([first, second, third], EngineConfig(device="cpu"))


# --------------------------------------------------------------------------- the loader rule


def test_a_list_holding_one_batch_is_one_loader_and_get_batch_returns_the_batch():
    x, y = xy()
    p = fit(train_data_loader=[(x, y)])
    Engine([p], EngineConfig(train_iters=3, device="cpu")).run()
    assert len(p.seen) == 3
    for batch in p.seen:
        assert isinstance(batch, tuple) and len(batch) == 2  # Betty's `inputs, targets = batch`
        assert torch.equal(batch[0], x) and torch.equal(batch[1], y)


def test_a_list_of_several_batches_is_one_loader_cycled_in_order():
    batches = [xy(), xy(), xy()]
    p = fit(train_data_loader=batches)
    Engine([p], EngineConfig(train_iters=7, device="cpu")).run()
    order = [0, 1, 2, 0, 1, 2, 0]
    for got, i in zip(p.seen, order):
        assert torch.equal(got[0], batches[i][0]) and torch.equal(got[1], batches[i][1])


def test_a_tuple_is_several_loaders_and_get_batch_returns_a_tuple_of_their_batches():
    xa, ya = torch.randn(6, D), torch.randn(6, 1)
    dl = DataLoader(TensorDataset(xa, ya), batch_size=2)  # 3 batches an epoch
    listed = [xy(), xy()]  # 2 batches an epoch

    class Two(Fit):
        def configure_train_data_loader(self):
            return dl, listed

    m = nn.Linear(D, 1)
    p = Two("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    Engine([p], EngineConfig(train_iters=1, device="cpu"))
    for i in range(5):
        batch = p.get_batch()
        assert isinstance(batch, tuple) and len(batch) == 2
        (bxa, bya), (bxb, byb) = batch
        lo = 2 * (i % 3)
        assert torch.equal(bxa, xa[lo:lo + 2]) and torch.equal(bya, ya[lo:lo + 2])
        assert torch.equal(bxb, listed[i % 2][0]) and torch.equal(byb, listed[i % 2][1])


def test_on_epoch_end_follows_the_first_loader():
    first = [xy(), xy(), xy()]  # 3 batches an epoch
    second = [xy(), xy()]  # 2: its epoch ends do not call the hook

    class Epochs(Fit):
        def training_step(self, batch):
            return super().training_step(batch[0])

        def on_epoch_end(self):
            self.events.append(("epoch_end", len(self.seen)))

    m = nn.Linear(D, 1)
    p = Epochs("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), train_data_loader=(first, second))
    p.events = []
    Engine([p], EngineConfig(train_iters=8, device="cpu")).run()
    # called when the 4th and the 7th batch are fetched, i.e. after 3 and 6 training steps
    assert p.events == [("epoch_end", 3), ("epoch_end", 6)]

    single = fit(train_data_loader=[xy(), xy()])
    calls = []
    single.on_epoch_end = lambda: calls.append(len(single.seen))
    Engine([single], EngineConfig(train_iters=5, device="cpu")).run()
    assert calls == [2, 4]


# --------------------------------------------------------------------------- a 0.1.x-style program


def hpo(cls, hypergradient, outer_steps=8, unroll=10):
    """Betty's logistic-regression HPO in the 0.1.x style: configure_* hooks, device=,
    a list holding one batch as the loader; the upper learns one L2 weight per feature."""
    gen = torch.Generator().manual_seed(0)
    d, n = 10, 200
    w_gt = torch.randn(d, generator=gen)
    x = torch.randn(2 * n, d, generator=gen)
    y = ((x @ w_gt + 0.1 * torch.randn(2 * n, generator=gen)) > 0).float()

    class Weights(nn.Module):
        def __init__(self, init):
            super().__init__()
            self.w = nn.Parameter(torch.full((d,), init))

        def forward(self, inputs=None):
            return self.w if inputs is None else inputs @ self.w

    class Hyper(ImplicitProblem):
        def training_step(self, batch):
            inputs, targets = batch
            loss = F.binary_cross_entropy_with_logits(self.model(inputs), targets)
            self.losses.append(loss.item())
            return loss

        def configure_module(self):
            return Weights(1.0)

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=1.0, momentum=0.9)

        def configure_train_data_loader(self):
            return [(x[n:], y[n:])]

        def param_callback(self, params):
            for p in params:
                p.data.clamp_(min=1e-8)

    class Model(cls):
        def training_step(self, batch):
            inputs, targets = batch
            w = self.module.w
            return F.binary_cross_entropy_with_logits(self.module(inputs), targets) + 0.5 * (w * self.hyper() * w).sum()

        def configure_module(self):
            return Weights(0.0)

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.5)

        def configure_train_data_loader(self):
            return [(x[:n], y[:n])]

        def on_inner_loop_start(self):
            self.module.w.data.zero_()

    settings = {"cg": {"type": "cg", "cg_iterations": 3}, "neumann": {"type": "neumann", "neumann_iterations": 3,
                "neumann_alpha": 0.5}, "darts": {"type": "darts"}, None: {}}[hypergradient]
    # Betty's rule: the parent's first_order=False makes an iterative child keep its graph.
    hyper = Hyper("hyper", Config(first_order=hypergradient is not None, retain_graph=True), device="cpu")
    hyper.losses = []
    model = Model("model", Config(unroll_steps=unroll, **settings), device="cpu")
    Engine([hyper, model], EngineConfig(train_iters=unroll * outer_steps),
           dependencies={"l2u": {model: [hyper]}, "u2l": {hyper: [model]}}).run()
    return hyper.losses, hyper.module.w.detach().clone()


def test_a_hyperparameter_problem_in_the_betty_0_1_style_learns_with_cg_neumann_darts_and_unrolling():
    results = {kind: hpo(ImplicitProblem, kind) for kind in ("cg", "neumann", "darts")}
    results["unrolled"] = hpo(HigherIterativeProblem, None)
    for kind, (losses, weights) in results.items():
        assert len(losses) == 8, kind
        assert losses[-1] < 0.9 * losses[0], (kind, losses)
        assert not torch.allclose(weights, torch.ones_like(weights)), kind
    reference = results["cg"][1]
    for kind in ("neumann", "darts", "unrolled"):
        # four ways to one hypergradient: the learned L2 weights agree
        assert (results[kind][1] - reference).abs().max() < 0.15, (kind, results[kind][1], reference)


def test_bettys_other_iterative_problem_names_are_iterative_problems():
    assert issubclass(HigherIterativeProblem, IterativeProblem) and issubclass(MetaIterativeProblem, IterativeProblem)


def test_engine_config_takes_bettys_distributed_switch():
    """Betty 0.1.1's distributed=True is data parallel under torchrun (test_strategies.py); a value
    that is not a bool is refused by name."""
    assert EngineConfig(distributed=False).distributed is False
    assert EngineConfig(distributed=True).distributed is True
    with pytest.raises(ValueError, match=r"EngineConfig\.distributed must be one of False, True; got 'yes'"):
        EngineConfig(distributed="yes")


# --------------------------------------------------------------------------- bad input


def hooked(**hooks):
    class Hooked(Fit):
        pass

    for name, value in hooks.items():
        setattr(Hooked, f"configure_{name}", lambda self, _value=value: _value(self) if callable(_value) else _value)
    return Hooked("lower")


@pytest.mark.parametrize(
    "hooks, match",
    [
        ({"module": lambda self: nn.Linear(D, 1).parameters()},
         r'problem "lower": configure_module\(\) must give a torch.nn.Module; got generator <generator object'),
        ({"module": lambda self: nn.Linear(D, 1), "optimizer": lambda self: self.module},
         r'problem "lower": configure_optimizer\(\) must give a torch optimizer .*; got Linear Linear\(in_features=3'),
        ({"module": lambda self: nn.Linear(D, 1),
          "optimizer": lambda self: torch.optim.SGD(self.module.parameters(), lr=0.1),
          "scheduler": lambda self: self.optimizer},
         r'problem "lower": configure_scheduler\(\) must give a learning-rate scheduler .*; got SGD'),
        ({"module": lambda self: nn.Linear(D, 1),
          "optimizer": lambda self: torch.optim.SGD(self.module.parameters(), lr=0.1),
          "train_data_loader": lambda self: torch.zeros(2, D)},
         r'problem "lower": configure_train_data_loader\(\) must give an iterable of batches .*; got Tensor tensor'),
        ({"module": lambda self: nn.Linear(D, 1),
          "optimizer": lambda self: torch.optim.SGD(self.module.parameters(), lr=0.1),
          "train_data_loader": lambda self: 5},
         r'problem "lower": configure_train_data_loader\(\) must give an iterable .*; got int 5'),
        ({"module": lambda self: nn.Linear(D, 1),
          "optimizer": lambda self: torch.optim.SGD(self.module.parameters(), lr=0.1),
          "train_data_loader": lambda self: ()},
         r'problem "lower": configure_train_data_loader\(\) must give an iterable .*; got tuple \(\)'),
        ({"module": lambda self: nn.Linear(D, 1),
          "optimizer": lambda self: torch.optim.SGD(self.module.parameters(), lr=0.1),
          "train_data_loader": lambda self: ([xy()], 7)},
         r'problem "lower": configure_train_data_loader\(\) must give .*or a tuple of them; got tuple \(\[\(tensor'),
    ],
    ids=["module", "optimizer", "scheduler", "loader-tensor", "loader-int", "loader-empty-tuple", "loader-in-tuple"],
)
def test_configure_hooks_returning_the_wrong_kind_are_named(hooks, match):
    with pytest.raises(TypeError, match=match):
        Engine([hooked(**hooks)], EngineConfig(train_iters=1, device="cpu"))


def test_constructor_arguments_of_the_wrong_kind_are_named():
    with pytest.raises(TypeError, match=r'problem "lower": the module= argument must give a torch.nn.Module; got Tensor'):
        Engine([Fit("lower", module=torch.zeros(3))], EngineConfig(device="cpu"))
    m = nn.Linear(D, 1)
    with pytest.raises(TypeError, match=r'problem "lower": the optimizer= argument must give a torch optimizer .*got list'):
        Engine([Fit("lower", module=m, optimizer=list(m.parameters()))], EngineConfig(device="cpu"))


def test_a_loader_that_yields_nothing_is_named():
    class Empty(Fit):
        def configure_train_data_loader(self):
            return []

    m = nn.Linear(D, 1)
    engine = Engine([Empty("lower", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))],
                    EngineConfig(train_iters=1, device="cpu"))
    with pytest.raises(ValueError, match=r'problem "lower": train_data_loader \(from configure_train_data_loader\(\): '
                                         r"list \[\]\) yielded no batch$"):
        engine.run()

    empty = DataLoader(TensorDataset(torch.zeros(0, D), torch.zeros(0, 1)), batch_size=2)
    p = fit(train_data_loader=([xy()], empty))
    with pytest.raises(ValueError, match=r'problem "lower": train_data_loader\[1\] \(from the train_data_loader= '
                                         r"argument: DataLoader .*\) yielded no batch"):
        Engine([p], EngineConfig(train_iters=1, device="cpu")).run()


def test_a_one_shot_generator_is_named_when_its_second_epoch_is_empty():
    batches = [xy(), xy()]
    p = fit(train_data_loader=(b for b in batches))
    engine = Engine([p], EngineConfig(train_iters=3, device="cpu"))
    with pytest.raises(ValueError, match=r'problem "lower": train_data_loader \(from the train_data_loader= argument: '
                                         r"generator .*\) yielded no batch in epoch 2, after batches in the ones "
                                         r"before: a one-shot iterator or generator cannot start again"):
        engine.run()
    assert len(p.seen) == 2
