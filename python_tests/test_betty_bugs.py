"""The Betty bugs behind the final-loss differences of Betty's example programs
(benchmarks/results/betty-examples-*.md, "Where the losses differ"; docs/betty-compat.md,
"Why Betty's example programs end at other losses"). Each Betty rule is written out by hand in
float64 from Betty's source, so these tests run without Betty (as in CI); where Betty 0.1.1's
package is here (.betty/betty011, or importable), its own function runs too and must give the
hand-written result. 0.1.1/implicit_maml/main differs by float32 rounding alone: in float64 ours is
Betty's rule for it.

On the quadratic lower problem of test_hypergradient.py, L(phi, theta) = 1/2 phi^T A phi -
phi^T B theta with U(phi) = 1/2 ||phi - c||^2, the hypergradient is B^T x with x the solve of
A x = v, v = phi - c (darts: x = v)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import imaml_ext
from test_hypergradient import quadratic_setup, upper_hypergradient

BETTY011 = Path(__file__).resolve().parent.parent / ".betty" / "betty011"


@pytest.fixture
def betty011(monkeypatch):
    """Betty 0.1.1's package (skips where it is not here); sys.path and sys.modules as they were after."""
    if BETTY011.is_dir():
        monkeypatch.syspath_prepend(str(BETTY011))
    before = set(sys.modules)
    try:
        yield pytest.importorskip("betty", reason="Betty 0.1.1 is not installed (CI): the hand-written rules ran")
    finally:
        for name in set(sys.modules) - before:
            if name == "betty" or name.startswith("betty."):
                del sys.modules[name]


def quadratic(hypergradient: dict, n=6, m=4):
    torch.manual_seed(0)
    _, upper, lower, q = quadratic_setup(imaml_ext.Config(**hypergradient), n=n, m=m)
    q["v"] = q["phi_star"] - q["c"]  # dU/dphi
    return upper, lower, q


def betty_curr_prev(q, phi, theta, config):
    """Duck-typed problems for Betty's hypergradient functions: curr is the lower (phi), prev the upper."""
    A, B = q["A"], q["B"]
    curr = SimpleNamespace(config=config, paths=[], cur_batch=None,
                           training_step_exec=lambda batch: 0.5 * phi @ A @ phi - phi @ B @ theta,
                           trainable_parameters=lambda: [phi], parameters=lambda: [phi])
    return curr, SimpleNamespace(trainable_parameters=lambda: [theta])


# ----- darts: Betty 0.1.1 leaves the lower's parameters at phi - eps v -----
def betty_011_darts(phi, v, grad_wrt_upper, darts_alpha):
    """Betty 0.1.1's hypergradient/darts.py:26-45, as written."""
    eps = darts_alpha / v.norm()
    phi.data.add_(v, alpha=eps)
    grad_p = grad_wrt_upper(phi)
    phi.data.add_(v, alpha=-2 * eps)
    grad_n = grad_wrt_upper(phi)
    phi.data.add(v, alpha=eps)  # "reverse weight change": not in place, so phi stays at phi - eps v
    return (grad_n - grad_p) / (2 * eps)


def test_betty_011_darts_leaves_the_lower_shifted_where_ours_restores_it():
    """0.1.1/tutorial/2_validation and 3_logging part from their second classifier call: after
    each hypergradient Betty 0.1.1's classifier steps on from phi - eps v, ||eps v|| = darts_alpha."""
    alpha = 0.01  # Betty's default darts_alpha, the tutorials'
    upper, lower, q = quadratic({"type": "darts", "darts_alpha": alpha})
    phi0 = lower.module.w.detach().clone()
    ours = upper_hypergradient(upper)[0]
    correct = q["B"].T @ q["v"]  # -(d2L / dtheta dphi) v, exact for central differences on a quadratic
    torch.testing.assert_close(ours, correct, rtol=1e-7, atol=1e-9)
    assert torch.equal(lower.module.w.detach(), phi0)  # ours: phi as it was, bit for bit

    theta = upper.module.w.detach().clone().requires_grad_(True)
    phi = phi0.clone()

    def grad_wrt_upper(at):
        return torch.autograd.grad(0.5 * at @ q["A"] @ at - at @ q["B"] @ theta, theta)[0]

    betty = betty_011_darts(phi, q["v"], grad_wrt_upper, alpha)
    torch.testing.assert_close(betty, correct, rtol=1e-7, atol=1e-9)  # the same hypergradient ...
    shift = phi - phi0  # ... but the lower left at phi - eps v
    torch.testing.assert_close(shift, -alpha * q["v"] / q["v"].norm(), rtol=1e-9, atol=1e-15)
    assert abs(shift.norm().item() - alpha) < 1e-12


def test_betty_011_own_darts_leaves_the_same_shift(betty011):
    from betty.hypergradient.darts import darts

    alpha = 0.01
    upper, lower, q = quadratic({"type": "darts", "darts_alpha": alpha})
    phi0 = lower.module.w.detach().clone()
    phi = phi0.clone().requires_grad_(True)
    theta = upper.module.w.detach().clone().requires_grad_(True)
    curr, prev = betty_curr_prev(q, phi, theta, SimpleNamespace(darts_alpha=alpha))
    (got,) = darts([q["v"]], curr, prev)
    torch.testing.assert_close(got, q["B"].T @ q["v"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(phi.detach() - phi0, -alpha * q["v"] / q["v"].norm(), rtol=1e-9, atol=1e-15)


def test_betty_02_darts_restores_the_lower_to_rounding_where_ours_is_exact():
    """0.2/tutorial/2_validation (57 of 100 calls agree), 0.2/neural_architecture_search and
    0.2/imagenet_pruning drift apart after agreeing to 5 digits: Betty 0.2's darts.py:37-63 takes
    phi back by + eps v, - 2 eps v, + eps v, which in float32 (the programs' dtype) is phi only to
    rounding; ours copies phi back, so a run on imaml_ext is one of the roundings Betty's could take."""
    torch.manual_seed(0)
    phi0, v = torch.randn(10_000), torch.randn(10_000)
    eps = 0.01 / (v.norm().item() + 1e-15)
    phi = phi0.clone()
    phi.add_(v, alpha=eps)
    phi.sub_(v, alpha=2 * eps)
    phi.add_(v, alpha=eps)
    assert (phi != phi0).sum().item() > 100  # many entries off, each by rounding only
    assert ((phi - phi0).abs() <= 4 * torch.finfo(torch.float32).eps * (phi0.abs() + 2 * eps * v.abs())).all()
    # ours: phi bit for bit (test_betty_011_darts_leaves_the_lower_shifted_where_ours_restores_it)


# ----- cg: Betty's loop is not conjugate gradient -----
def textbook_cg(A, v, iterations):
    x, r = torch.zeros_like(v), v.clone()
    p = r.clone()
    for _ in range(iterations):
        Ap = A @ p
        step = (r @ r) / (p @ Ap)
        x, r_new = x + step * p, r - step * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def betty_cg(A, v, iterations, cg_alpha, version):
    """Betty's hypergradient/cg.py loop: 0.1.1's lines 36-55 build the next direction from the
    residual before the step; 0.2's (after its "cg bug fix", 25bcb02) from the one after. Both
    take the step length from cg_alpha * H p and the residual from H p, then scale x by cg_alpha."""
    x, r = torch.zeros_like(v), v.clone()
    p = r.clone()
    for _ in range(iterations):
        hvp = A @ p
        step = (r @ r) / ((cg_alpha * hvp) @ p)
        x_new, r_new = x + step * p, r - step * hvp
        beta = (r_new @ r_new) / (r @ r)
        p = (r if version == "0.1.1" else r_new) + beta * p
        x, r = x_new, r_new
    return cg_alpha * x


@pytest.mark.parametrize("cg_alpha, iterations", [(0.1, 3), (1.0, 3), (1.0, 6)])
def test_cg_is_textbook_cg_where_bettys_is_not(cg_alpha, iterations):
    """test_install (both versions) and 0.1.1/logistic_regression_implicit part at their first
    hypergradient: cg_alpha = 0.1 with 3 iterations (test_install), and 0.1.1's loop at any cg_alpha
    (logistic_regression_implicit: cg_alpha = 1, 3 iterations, where 0.2 agrees with ours)."""
    upper, _, q = quadratic({"type": "cg", "cg_iterations": iterations, "cg_alpha": cg_alpha})
    A, B, v = q["A"], q["B"], q["v"]
    ours = upper_hypergradient(upper)[0]
    torch.testing.assert_close(ours, B.T @ textbook_cg(A, v, iterations), rtol=1e-9, atol=1e-11)
    if iterations == A.shape[0]:  # n iterations of CG solve an n x n system
        torch.testing.assert_close(ours, q["exact"], rtol=1e-9, atol=1e-11)
    for version in ("0.1.1", "0.2"):
        betty = B.T @ betty_cg(A, v, iterations, cg_alpha, version)
        apart = ((betty - ours).norm() / ours.norm()).item()
        if version == "0.2" and cg_alpha == 1.0:  # 0.2's fixed loop is CG when cg_alpha is 1
            assert apart < 1e-9
        else:
            assert apart > 1e-3, (version, apart)


def test_betty_011_own_cg_is_the_hand_written_loop(betty011):
    from betty.hypergradient.cg import cg

    upper, lower, q = quadratic({"type": "cg"})
    phi = lower.module.w.detach().clone().requires_grad_(True)
    theta = upper.module.w.detach().clone().requires_grad_(True)
    for cg_alpha, iterations in ((0.1, 3), (1.0, 6)):
        curr, prev = betty_curr_prev(q, phi, theta, SimpleNamespace(cg_iterations=iterations, cg_alpha=cg_alpha))
        (got,) = cg([q["v"]], curr, prev)
        expected = q["B"].T @ betty_cg(q["A"], q["v"], iterations, cg_alpha, "0.1.1")
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


# ----- set-up: Betty 0.1.1 builds the module twice, after starting the loaders -----
def first_weight_and_batch(library):
    """A seeded program with configure_module and a shuffled loader: the module's weight and the
    first batch it trains on."""
    data = TensorDataset(torch.arange(8.0, dtype=torch.float64).view(8, 1))
    seen = {}

    class Problem(library.ImplicitProblem):
        def configure_train_data_loader(self):
            return DataLoader(data, batch_size=2, shuffle=True)

        def configure_module(self):
            module = nn.Linear(1, 1).double()
            seen["weight"] = module.weight.detach().clone()  # the last one built is the one that trains
            return module

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

        def training_step(self, batch):
            seen.setdefault("batch", batch[0].detach().view(-1).clone())
            return (self.module(batch[0]) ** 2).mean()

    torch.manual_seed(0)
    problem = Problem(name="problem", config=library.Config())
    library.Engine(problems=[problem], config=library.EngineConfig(train_iters=1),
                   dependencies={"u2l": {}, "l2u": {}}).run()
    return seen["weight"], seen["batch"]


def by_hand(version):
    """The draws from torch's generator in each version's set-up order: 0.2 (problem.py:139-186)
    builds the module once, then starts the loader; 0.1.1 (problem.py:160-187) starts the loader
    (iter() draws its seed), then calls configure_module twice and keeps the second module."""
    data = TensorDataset(torch.arange(8.0, dtype=torch.float64).view(8, 1))
    torch.manual_seed(0)
    if version == "0.1.1":
        batches = iter(DataLoader(data, batch_size=2, shuffle=True))
        nn.Linear(1, 1)
    module = nn.Linear(1, 1).double()
    if version == "0.2":
        batches = iter(DataLoader(data, batch_size=2, shuffle=True))
    return module.weight.detach(), next(batches)[0].view(-1)


def test_the_set_up_draws_as_betty_02_where_betty_011_builds_the_module_twice():
    """0.1.1/learning_to_reweight (both) and 0.1.1/neural_architecture_search differ from their
    first call (their 0.2 versions agree): they build their modules in configure_module."""
    weight, batch = first_weight_and_batch(imaml_ext)
    weight_02, batch_02 = by_hand("0.2")
    assert torch.equal(weight, weight_02) and torch.equal(batch, batch_02)
    weight_011, batch_011 = by_hand("0.1.1")
    assert not torch.equal(weight, weight_011)  # another initial weight ...
    assert not torch.equal(batch, batch_011)  # ... and another first batch


def test_betty_011_own_set_up_is_the_hand_written_order(betty011):
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    library = SimpleNamespace(ImplicitProblem=ImplicitProblem, Config=Config, EngineConfig=EngineConfig, Engine=Engine)
    weight, batch = first_weight_and_batch(library)
    weight_011, batch_011 = by_hand("0.1.1")
    assert torch.equal(weight, weight_011) and torch.equal(batch, batch_011)


# ----- 0.1.1/implicit_maml/main: no bug behind its difference, float32 rounding -----
def maml_net():
    # the program's Net, shrunk: a conv into BatchNorm2d(momentum=1) in training mode, so the loss
    # does not depend on the conv's bias (its hypergradient is 0, and rounding noise in float32)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2)).double()


def maml_batches(steps, tasks=2):
    g = torch.Generator().manual_seed(1)

    def images_labels(n):
        images = torch.randn(tasks, n, 1, 6, 6, generator=g, dtype=torch.float64)
        return images, torch.randint(0, 2, (tasks, n), generator=g)

    return [images_labels(6) + images_labels(4) for _ in range(steps)]


def implicit_maml_program(library, theta0, batches, engine_options):
    """0.1.1/implicit_maml/main.py's problems, Env and Engine (two sibling lowers, darts, each lower
    reloading the upper's state in on_inner_loop_start), 2 inner steps an upper step, in float64."""

    class Outer(library.ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            return sum(nn.functional.cross_entropy(getattr(self, f"inner_{i}")(inputs[i]), labels[i])
                       for i in range(len(self._children))) / len(self._children)

        def get_batch(self):
            return self.env.batch[2:]

    class Inner(library.ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            idx = self.outer.children.index(self)
            reg = sum((p1 - p2).pow(2).sum() for p1, p2 in zip(self.trainable_parameters(),
                                                                self.outer.trainable_parameters()))
            return nn.functional.cross_entropy(self.module(inputs[idx]), labels[idx]) + 0.5 * reg

        def get_batch(self):
            return self.env.batch[:2]

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.outer.module.state_dict())

        def configure_module(self):
            return maml_net()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

    class MAMLEnv(library.Env):
        def __init__(self):
            super().__init__()
            self.data_loader, self.batch = iter(batches), None

        def step(self):
            self.batch = next(self.data_loader)

    class MAMLEngine(library.Engine):
        def train_step(self):
            if self.global_step % 2 == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

    module = maml_net()
    module.load_state_dict(theta0)
    parent = Outer(name="outer", module=module, optimizer=torch.optim.Adam(module.parameters(), lr=0.001),
                   config=library.Config(retain_graph=True), device="cpu")
    children = [Inner(name="inner", config=library.Config(type="darts", unroll_steps=2), device="cpu")
                for _ in range(2)]
    MAMLEngine(config=library.EngineConfig(train_iters=2 * len(batches), **engine_options),
               problems=children + [parent], env=MAMLEnv(),
               dependencies={"u2l": {parent: children}, "l2u": {c: [parent] for c in children}}).run()
    return {k: v.detach() for k, v in module.state_dict().items()}


def implicit_maml_by_hand(theta0, batches, alpha=0.01):
    """Betty 0.1.1's rule for that program: each upper step the lowers start from the upper's state
    (which undoes the last darts shift), take 2 SGD steps on cross-entropy + 1/2 ||phi - theta||^2,
    and the upper's gradient is sum_t darts_t, darts_t = (g(phi_t - eps v_t) - g(phi_t + eps v_t)) / (2 eps),
    v_t = dU/dphi_t, eps = darts_alpha / ||v_t||, g = d lower / d theta (darts.py:26-45); Adam on it."""
    net, upper = maml_net(), maml_net()
    upper.load_state_dict(theta0)
    names = [n for n, _ in upper.named_parameters()]
    theta = dict(upper.named_parameters())
    adam = torch.optim.Adam(upper.parameters(), lr=0.001)

    def lower_loss(phi, x, y):
        reg = sum((phi[n] - theta[n]).pow(2).sum() for n in names)
        return nn.functional.cross_entropy(torch.func.functional_call(net, phi, (x,)), y) + 0.5 * reg

    for x_s, y_s, x_q, y_q in batches:
        phis = []
        for t in range(2):
            phi = {n: theta[n].detach().clone().requires_grad_(True) for n in names}
            for _ in range(2):
                grads = torch.autograd.grad(lower_loss(phi, x_s[t], y_s[t]), [phi[n] for n in names])
                phi = {n: (phi[n] - 0.1 * g).detach().requires_grad_(True) for n, g in zip(names, grads)}
            phis.append(phi)
        upper_loss = sum(nn.functional.cross_entropy(torch.func.functional_call(net, phis[t], (x_q[t],)), y_q[t])
                         for t in range(2)) / 2
        vs = torch.autograd.grad(upper_loss, [phi[n] for phi in phis for n in names])
        total = [torch.zeros_like(theta[n]) for n in names]
        for t in range(2):
            v = vs[t * len(names):(t + 1) * len(names)]
            eps = alpha / torch.cat([u.reshape(-1) for u in v]).norm()
            at = [{n: (phis[t][n] + s * eps * u).detach() for n, u in zip(names, v)} for s in (1, -1)]
            g_p, g_n = (torch.autograd.grad(lower_loss(phi, x_s[t], y_s[t]), [theta[n] for n in names]) for phi in at)
            total = [a + (n_ - p_) / (2 * eps) for a, p_, n_ in zip(total, g_p, g_n)]
        adam.zero_grad()
        for n, g in zip(names, total):
            theta[n].grad = g
        adam.step()
    return {k: v.detach() for k, v in upper.state_dict().items()}


@pytest.mark.parametrize("task_batching", ["off", "auto"])
def test_implicit_maml_follows_betty_011_in_float64(task_batching):
    """0.1.1/implicit_maml/main agrees for 6 of 20 upper calls in float32 but at all 20 in float64
    (docs/betty-compat.md): its lowers reload the upper's state, so 0.1.1's darts shift leaves no
    trace, and the rest is rounding. Ours, sequential and with the siblings batched, is Betty's rule."""
    torch.manual_seed(0)
    theta0, batches = maml_net().state_dict(), maml_batches(3)
    expected = implicit_maml_by_hand(theta0, batches)
    got = implicit_maml_program(imaml_ext, theta0, batches, {"task_batching": task_batching})
    moved = max((expected[k] - theta0[k]).abs().max().item() for k in expected if k.endswith("weight"))
    assert moved > 1e-3  # three Adam steps of lr 1e-3 happened
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
    # the conv bias's hypergradient is 0 in exact maths, so Adam leaves it where it was (to rounding)
    torch.testing.assert_close(expected["0.bias"], theta0["0.bias"], rtol=0, atol=1e-9)


def test_betty_011_own_implicit_maml_is_the_hand_written_rule(betty011):
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.envs import Env
    from betty.problems import ImplicitProblem

    library = SimpleNamespace(ImplicitProblem=ImplicitProblem, Config=Config, EngineConfig=EngineConfig,
                              Engine=Engine, Env=Env)
    torch.manual_seed(0)
    theta0, batches = maml_net().state_dict(), maml_batches(3)
    got = implicit_maml_program(library, theta0, batches, {})
    expected = implicit_maml_by_hand(theta0, batches)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
