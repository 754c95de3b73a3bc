"""Hypergradients (cg, neumann, darts) against exact answers: a quadratic lower
problem with a closed-form implicit gradient, a small network whose
(I + H/lambda)^-1 v is solved densely, and a hyperparameter-optimisation run
that each method must improve."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext import Config, Engine, EngineConfig, ImplicitProblem
from imaml_ext.hypergradient import HYPERGRADIENTS, get_grads, get_hypergradient

f64 = torch.float64


class Vector(nn.Module):
    def __init__(self, n, init=None):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=f64) if init is None else init.clone())

    def forward(self, x):
        return self.w


def spd(n, cond=10.0):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=f64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=f64)
    return q @ torch.diag(eig) @ q.T


class QuadLower(ImplicitProblem):
    """L(phi, theta) = 1/2 phi^T A phi - phi^T B theta, so phi* = A^-1 B theta."""

    def training_step(self, batch):
        A, B = self.extra_config["A"], self.extra_config["B"]
        phi, theta = self.module.w, self.upper.module.w
        return 0.5 * phi @ A @ phi - phi @ B @ theta

    def get_batch(self):
        return ()


class QuadUpper(ImplicitProblem):
    """U(phi) = 1/2 ||phi - c||^2."""

    def training_step(self, batch):
        phi = self.lower.module.w
        return 0.5 * ((phi - self.extra_config["c"]) ** 2).sum()

    def get_batch(self):
        return ()


def quadratic_setup(lower_config, n=6, m=4):
    A, B, c = spd(n), torch.randn(n, m, dtype=f64), torch.randn(n, dtype=f64)
    upper = QuadUpper("upper", Config(), Vector(m), torch.optim.SGD([torch.zeros(1)], lr=0.0), extra_config={"c": c})
    upper.optimizer = torch.optim.SGD(upper.module.parameters(), lr=0.1)
    lower = QuadLower("lower", lower_config, Vector(n), None, extra_config={"A": A, "B": B})
    lower.optimizer = torch.optim.SGD(lower.module.parameters(), lr=0.1)
    engine = Engine([upper, lower], EngineConfig(device="cpu"), {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    theta = upper.module.w.detach()
    phi_star = torch.linalg.solve(A, B @ theta)
    with torch.no_grad():
        lower.module.w.copy_(phi_star)
    lower.cur_batch = ()
    exact = B.T @ torch.linalg.solve(A, phi_star - c)  # dU/dtheta through phi*(theta)
    return engine, upper, lower, dict(A=A, B=B, c=c, exact=exact, phi_star=phi_star)


def upper_hypergradient(upper):
    loss = upper.training_step(upper.get_batch())
    return get_grads(loss, upper.paths[0])


@pytest.mark.parametrize("cg_alpha", [0.05, 1.0, 7.0])
def test_cg_equals_closed_form_for_every_cg_alpha(cg_alpha):
    _, upper, _, q = quadratic_setup(Config(type="cg", cg_iterations=6, cg_alpha=cg_alpha))
    torch.testing.assert_close(upper_hypergradient(upper)[0], q["exact"], rtol=1e-9, atol=1e-10)


def test_cg_with_fewer_iterations_is_not_exact():
    """So the test above would catch a solve that stopped early."""
    _, upper, lower, q = quadratic_setup(Config(type="cg", cg_iterations=2))
    got = upper_hypergradient(upper)[0]
    assert (got - q["exact"]).norm() > 1e-6 * q["exact"].norm()
    info = lower.last_hypergradient_info["cg"]
    assert info.iterations.tolist() == [2] and not info.breakdown.any()


def test_neumann_converges_to_closed_form():
    # alpha < 2 / lambda_max (= 2 / 10) and enough terms: (1 - 0.15)^400 ~ 1e-28.
    _, upper, _, q = quadratic_setup(Config(type="neumann", neumann_iterations=400, neumann_alpha=0.15))
    torch.testing.assert_close(upper_hypergradient(upper)[0], q["exact"], rtol=1e-9, atol=1e-10)


def test_neumann_matches_its_truncated_series():
    _, upper, _, q = quadratic_setup(Config(type="neumann", neumann_iterations=3, neumann_alpha=0.05))
    A, B, c, phi = q["A"], q["B"], q["c"], q["phi_star"]
    v = phi - c
    term, total = v.clone(), v.clone()
    for _ in range(3):
        term = term - 0.05 * A @ term
        total = total + term
    torch.testing.assert_close(upper_hypergradient(upper)[0], B.T @ (0.05 * total), rtol=1e-10, atol=1e-12)


def test_darts_is_the_identity_hessian_approximation_and_restores_phi():
    _, upper, lower, q = quadratic_setup(Config(type="darts", darts_alpha=0.01))
    before = lower.module.w.detach().clone()
    got = upper_hypergradient(upper)[0]
    # -(d^2 L / dtheta dphi) v = B^T v; central differences are exact on a quadratic up to rounding.
    torch.testing.assert_close(got, q["B"].T @ (q["phi_star"] - q["c"]), rtol=1e-7, atol=1e-9)
    assert torch.equal(lower.module.w.detach(), before)


def test_registry_names_and_unknown_type():
    assert sorted(HYPERGRADIENTS) == ["cg", "darts", "neumann"]
    with pytest.raises(ValueError, match=r"unknown hypergradient type 'sama'; valid choices are: cg, darts, neumann"):
        get_hypergradient("sama")


# ----- a small network with a proximal term: (I + H/lambda)^-1 v solved densely -----

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4).double()
        self.fc2 = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ProxLower(ImplicitProblem):
    """Task loss + c ||phi - theta||^2 (the tutorial's reg_loss), c = extra_config["c"]."""

    def training_step(self, batch):
        x, y = batch
        task = F.cross_entropy(self.module(x), y)
        reg = sum(((p - q) ** 2).sum() for p, q in zip(self.parameters(), self.upper.parameters()))
        return task + self.extra_config["c"] * reg

    def get_batch(self):
        return self.extra_config["batch"]


class QueryUpper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)

    def get_batch(self):
        return self.extra_config["batch"]


def prox_setup(lower_config, c=0.4):
    support = (torch.randn(8, 3, dtype=f64), torch.randint(0, 3, (8,)))
    query = (torch.randn(8, 3, dtype=f64), torch.randint(0, 3, (8,)))
    theta_net, phi_net = TinyNet(), TinyNet()
    with torch.no_grad():  # phi somewhere near theta, as after a few inner steps
        for p, q in zip(phi_net.parameters(), theta_net.parameters()):
            p.copy_(q + 0.3 * torch.randn_like(q))
    upper = QueryUpper("upper", Config(), theta_net, torch.optim.SGD(theta_net.parameters(), lr=0.1),
                       extra_config={"batch": query})
    lower = ProxLower("lower", lower_config, phi_net, torch.optim.SGD(phi_net.parameters(), lr=0.1),
                      extra_config={"batch": support, "c": c})
    Engine([upper, lower], EngineConfig(device="cpu"), {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    lower.cur_batch = support
    return upper, lower, support, query


def dense_prox_answer(lower, support, query, lam):
    """(I + H_task / lam)^-1 v with the task Hessian formed densely."""
    names = [n for n, _ in lower.module.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in lower.module.parameters()])
    shapes = [p.shape for p in lower.module.parameters()]

    def unflatten(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = flat[i:i + k].reshape(s)
            i += k
        return out

    def task_loss(flat):
        return F.cross_entropy(torch.func.functional_call(lower.module, unflatten(flat), (support[0],)), support[1])

    def query_loss(flat):
        return F.cross_entropy(torch.func.functional_call(lower.module, unflatten(flat), (query[0],)), query[1])

    H = torch.autograd.functional.hessian(task_loss, flat0)
    v = torch.autograd.functional.jacobian(query_loss, flat0)
    x = torch.linalg.solve(torch.eye(len(flat0), dtype=f64) + H / lam, v)
    return x, v, H


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("declared", [True, False], ids=["proximal_lambda", "autograd"])
def test_cg_on_network_equals_dense_implicit_maml_solve(declared):
    c = 1.0  # reg * ||phi - theta||^2 with reg = c: lambda = 2c, the iMAML paper's 2
    lam = 2 * c
    config = Config(type="cg", cg_iterations=60, proximal_lambda=lam if declared else None)
    # Exact CG needs I + H/lambda positive definite. A random phi near theta gives that
    # almost always; draw again (from this test's seed) in the rare case it does not.
    for _ in range(20):
        upper, lower, support, query = prox_setup(config, c)
        expected, _, H = dense_prox_answer(lower, support, query, lam)
        if torch.linalg.eigvalsh(H).min() > -0.5 * lam:
            break
    else:
        pytest.fail("no positive definite I + H/lambda in 20 random set-ups")
    got = flat(upper_hypergradient(upper))
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    assert not lower.last_hypergradient_info["cg"].breakdown.any()


def test_damped_cg_equals_dense_damped_solve():
    """Config(cg_damping=c, lam_damping=l): ((1 + c) I + H_task / (lambda + l)) x = v, as the
    iMAML authors' code; H_task is the Hessian without the proximal term."""
    reg, damping, lam_damping = 0.25, 1.0, 10.0
    lam = 2 * reg
    config = Config(type="cg", cg_iterations=60, proximal_lambda=lam, cg_damping=damping, lam_damping=lam_damping)
    upper, lower, support, query = prox_setup(config, reg)
    _, v, H = dense_prox_answer(lower, support, query, lam)  # H: the task loss's Hessian (no proximal term)
    A = (1 + damping) * torch.eye(len(v), dtype=f64) + H / (lam + lam_damping)
    assert torch.linalg.eigvalsh(A).min() > 0
    got = flat(upper_hypergradient(upper))
    torch.testing.assert_close(got, torch.linalg.solve(A, v), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match=r"Config: cg_damping and lam_damping .* need proximal_lambda"):
        Config(type="cg", cg_damping=1.0)
    with pytest.raises(ValueError, match=r"Config.lam_damping must be a finite number >= 0.0; got -1"):
        Config(type="cg", proximal_lambda=1.0, lam_damping=-1)


def test_declared_proximal_matches_autograd_for_neumann_and_darts():
    c = 0.4
    for kind, extra in (("neumann", dict(neumann_iterations=5, neumann_alpha=0.3)), ("darts", {})):
        upper_a, lower_a, *_ = prox_setup(Config(type=kind, **extra), c)
        torch.manual_seed(0)
        upper_b, lower_b, *_ = prox_setup(Config(type=kind, proximal_lambda=2 * c, **extra), c)
        # Same networks and data in both set-ups:
        lower_b.module.load_state_dict(lower_a.module.state_dict())
        upper_b.module.load_state_dict(upper_a.module.state_dict())
        lower_b.extra_config["batch"] = lower_b.cur_batch = lower_a.extra_config["batch"]
        upper_b.extra_config["batch"] = upper_a.extra_config["batch"]
        autograd_result = flat(upper_hypergradient(upper_a))
        analytic = flat(upper_hypergradient(upper_b))
        tol = 1e-10 if kind == "neumann" else 1e-6  # darts: central differences vs exact
        torch.testing.assert_close(analytic, autograd_result, rtol=tol, atol=tol)


def test_declared_proximal_lambda_that_does_not_match_the_loss_is_rejected():
    """The tutorial's reg * ||.||^2 is lambda = 2 * reg; declaring lambda = reg is caught."""
    upper, *_ = prox_setup(Config(type="cg", cg_iterations=3, proximal_lambda=0.4), c=0.4)
    with pytest.raises(ValueError, match=r"proximal_lambda=0.4 does not match its loss.*measured -0.8 I.*2 \* c"):
        upper_hypergradient(upper)


def test_proximal_mismatch_error_shows_the_measured_derivative_with_one_sign():
    """A term -0.1 ||phi - theta||^2 has mixed derivative +0.2 I: the message said "--0.2 I"."""
    upper, *_ = prox_setup(Config(type="cg", cg_iterations=3, proximal_lambda=0.4), c=-0.1)
    with pytest.raises(ValueError, match=r"is not -0.4 I \(measured 0.2 I along") as info:
        upper_hypergradient(upper)
    assert "--" not in str(info.value)


def test_cg_breakdowns_is_zero_before_any_breakdown_and_the_warning_fits_the_config(monkeypatch):
    engine, upper, lower, _ = quadratic_setup(Config(type="cg", cg_iterations=6))
    assert lower.cg_breakdowns == 0  # before any hypergradient
    upper_hypergradient(upper)
    assert not lower.last_hypergradient_info["cg"].breakdown.any() and lower.cg_breakdowns == 0
    # An indefinite lower Hessian breaks CG down: counted, and the warning suggests what applies.
    lower.extra_config["A"] = -lower.extra_config["A"]
    with pytest.warns(UserWarning, match="CG broke down") as caught:
        upper_hypergradient(upper)
    assert lower.cg_breakdowns == 1
    message = str(caught[0].message)
    assert "larger proximal_lambda" not in message and "proximal_lambda=" in message
    # With a declared proximal term, the warning names damping (the solver's flag is forced here).
    import imaml_ext.ops as ops

    real = ops.cg_solve

    def broken(*args, **kwargs):
        x, info = real(*args, **kwargs)
        return x, info._replace(breakdown=torch.ones_like(info.breakdown))

    monkeypatch.setattr(ops, "cg_solve", broken)
    upper, lower, *_ = prox_setup(Config(type="cg", cg_iterations=3, proximal_lambda=0.8), c=0.4)
    assert lower.cg_breakdowns == 0
    with pytest.warns(UserWarning, match="CG broke down") as caught:
        upper_hypergradient(upper)
    message = str(caught[0].message)
    assert lower.cg_breakdowns == 1
    assert "cg_damping=1, lam_damping=10" in message and "larger proximal_lambda (now 0.8)" in message
    # With damping already on, it advised the same damping; it now says what that damping allows.
    upper, lower, *_ = prox_setup(Config(type="cg", cg_iterations=3, proximal_lambda=0.8, cg_damping=1.0,
                                         lam_damping=10.0), c=0.4)
    with pytest.warns(UserWarning, match="CG broke down") as caught:
        upper_hypergradient(upper)
    message = str(caught[0].message)
    assert "Damping, Config(" not in message and "authors" not in message
    assert "damping in force (Config(cg_damping=1, lam_damping=10))" in message and "below -21.6" in message


def test_declared_proximal_on_a_loss_without_the_term_is_rejected():
    upper, lower, *_ = prox_setup(Config(type="darts", proximal_lambda=1.0), c=0.0)
    lower.training_step = lambda batch: F.cross_entropy(lower.module(batch[0]), batch[1])
    with pytest.raises(ValueError, match=r'its loss does not depend on them'):
        upper_hypergradient(upper)


def test_cg_hypergradient_runs_on_the_fused_solver(monkeypatch):
    import imaml_ext.ops as ops

    calls = []
    real = ops.cg_solve

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "cg_solve", spy)
    upper, *_ = prox_setup(Config(type="cg", cg_iterations=4, proximal_lambda=0.8), c=0.4)
    upper_hypergradient(upper)
    assert calls == [4]


# ----- hyperparameter optimisation: per-feature L2 weights of a logistic regression -----

class Weights(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=f64))


MAX_PENALTY = 4.0  # with the lower's SGD lr of 0.4 the inner problem stays stable (lr * curvature < 2)


def penalty_weights(h):
    return MAX_PENALTY * torch.sigmoid(h)


class RegLogistic(ImplicitProblem):
    def training_step(self, batch):
        x, y = self.extra_config["train"]
        w = self.module.w
        penalty = 0.5 * (penalty_weights(self.upper.module.w) * w * w).sum()
        return F.binary_cross_entropy_with_logits(x @ w, y) + penalty

    def get_batch(self):
        return ()


class ValidationLoss(ImplicitProblem):
    def training_step(self, batch):
        x, y = self.extra_config["valid"]
        return F.binary_cross_entropy_with_logits(x @ self.lower.module.w, y)

    def get_batch(self):
        return ()


def logistic_data(n_train=30, n_valid=300, d=25, informative=3):
    w_true = torch.zeros(d, dtype=f64)
    w_true[:informative] = 3.0
    x = torch.randn(n_train + n_valid, d, dtype=f64)
    y = (torch.rand(n_train + n_valid, dtype=f64) < torch.sigmoid(x @ w_true)).to(f64)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@pytest.mark.parametrize(
    "config",
    [
        Config(type="cg", unroll_steps=30, cg_iterations=10),
        Config(type="neumann", unroll_steps=30, neumann_iterations=10, neumann_alpha=0.3),
        Config(type="darts", unroll_steps=30),
    ],
    ids=["cg", "neumann", "darts"],
)
def test_hyperparameter_optimisation_lowers_validation_loss(config):
    train, valid = logistic_data()
    d = train[0].shape[1]
    hyper = Weights(d)
    with torch.no_grad():
        hyper.w.fill_(-6.0)  # weak regularisation (0.01): the 30-example fit overfits 25 features
    model = Weights(d)
    upper = ValidationLoss("upper", Config(), hyper, torch.optim.Adam(hyper.parameters(), lr=0.1),
                           extra_config={"valid": valid})
    lower = RegLogistic("lower", config, model, torch.optim.SGD(model.parameters(), lr=0.4),
                        extra_config={"train": train})
    engine = Engine([upper, lower], EngineConfig(device="cpu", train_iters=30 * 80),
                    {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})

    def validation_loss():
        # Refit the lower problem to convergence for the current hyperparameters.
        fit = Weights(d)
        opt = torch.optim.LBFGS(fit.parameters(), max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
        lam = penalty_weights(hyper.w.detach())

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(train[0] @ fit.w, train[1]) + 0.5 * (lam * fit.w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return F.binary_cross_entropy_with_logits(valid[0] @ fit.w.detach(), valid[1]).item()

    start = validation_loss()
    engine.run()
    end = validation_loss()
    assert upper.count == 80
    assert end < 0.75 * start, f"{config.type}: validation loss {start:.4f} -> {end:.4f}"
