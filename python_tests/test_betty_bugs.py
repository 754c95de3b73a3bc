"""The Betty bugs behind the final-loss differences of Betty's example programs
(benchmarks/results/betty-examples-*.md, "Where the losses differ"; docs/betty-compat.md,
"Why Betty's example programs end at other losses"). Each Betty rule is written out by hand in
float64 from Betty's source, so these tests run without Betty (as in CI); where Betty 0.1.1's
package is here (.betty/betty011, or importable), its own function runs too and must give the
hand-written result.

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
