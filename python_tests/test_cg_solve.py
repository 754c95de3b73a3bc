"""The batched CG solve: exact solves of random SPD systems and of a small
network's (I + H/lam), breakdown and tolerance handling, each op against its
reference, opcheck, and every rejected input."""

import pytest
import torch
from torch.func import functional_call, grad, hessian, jvp, vmap

import imaml_ext.ops as ops
from imaml_ext.ops import _extension, reference
from op_samples import cg_sample_states

F64 = torch.float64


def dense_hvp(hessians, sizes):
    """hvp over a list of [T, n_i] tensors for per-task dense [T, N, N] Hessians."""
    def hvp(v):
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in v], dim=1)
        out = torch.einsum("tij,tj->ti", hessians, flat)
        return [o.reshape(t.shape) for o, t in zip(out.split(sizes, dim=1), v)]
    return hvp


def random_spd_hessians(num_tasks, n, dtype=F64):
    m = torch.randn(num_tasks, n, n, dtype=dtype)
    return m @ m.transpose(1, 2) / n


def exact_solution(hessians, b_flat, lam):
    n = hessians.shape[-1]
    lam = torch.as_tensor(lam, dtype=hessians.dtype).reshape(-1, 1, 1)
    system = torch.eye(n, dtype=hessians.dtype) + hessians / lam
    return torch.linalg.solve(system, b_flat)


@pytest.mark.parametrize("num_tasks", [1, 7, 64])
def test_solves_random_spd_systems_exactly(num_tasks):
    shapes = [(3, 2), (5,), (1,)]
    sizes = [6, 5, 1]
    hessians = random_spd_hessians(num_tasks, sum(sizes))
    b = [torch.randn((num_tasks,) + s, dtype=F64) for s in shapes]
    lam = 0.3 + torch.rand(()).item()
    x, info = ops.cg_solve(dense_hvp(hessians, sizes), b, lam, iters=2 * sum(sizes))
    flat = lambda v: torch.cat([t.reshape(num_tasks, -1) for t in v], dim=1)
    torch.testing.assert_close(flat(x), exact_solution(hessians, flat(b), lam), rtol=1e-9, atol=1e-9)
    assert not info.breakdown.any()
    assert torch.all(info.residual_norm < 1e-8 * flat(b).norm(dim=1))


@pytest.mark.parametrize("per_task", [False, True])
def test_diag_solves_the_damped_system(per_task):
    """diag * I + H / lam, the iMAML authors' damped system, against a dense solve."""
    num_tasks, sizes = 4, [6, 3]
    hessians = random_spd_hessians(num_tasks, sum(sizes)) - 0.5 * torch.eye(sum(sizes), dtype=F64)  # mildly indefinite H
    b = [torch.randn(num_tasks, n, dtype=F64) for n in sizes]
    diag = 1.0 + torch.rand(()).item()
    lam = 0.5 + torch.rand(num_tasks, dtype=F64) if per_task else 0.5 + torch.rand(()).item()
    x, info = ops.cg_solve(dense_hvp(hessians, sizes), b, lam, iters=3 * sum(sizes), diag=diag)
    lam_b = torch.as_tensor(lam, dtype=F64).reshape(-1, 1, 1)
    system = diag * torch.eye(sum(sizes), dtype=F64) + hessians / lam_b
    assert torch.linalg.eigvalsh(system).min() > 0
    flat = torch.cat(b, dim=1)
    torch.testing.assert_close(torch.cat(x, dim=1), torch.linalg.solve(system, flat), rtol=1e-9, atol=1e-9)
    # the residual reported after 2 iterations (far from converged) is that of the system as given
    x2, info2 = ops.cg_solve(dense_hvp(hessians, sizes), b, lam, iters=2, diag=diag)
    residual = flat - torch.einsum("tij,tj->ti", system, torch.cat(x2, dim=1))
    assert (residual.norm(dim=1) > 1e-3 * flat.norm(dim=1)).all()
    torch.testing.assert_close(info2.residual_norm, residual.norm(dim=1), rtol=1e-8, atol=0.0)
    with pytest.raises(ValueError, match=r"imaml_ext.ops.cg_solve: diag must be a finite number > 0; got 0.0"):
        ops.cg_solve(dense_hvp(hessians, sizes), b, lam, iters=1, diag=0.0)


def test_k_iterations_equal_textbook_cg():
    """Chronopoulos-Gear gives textbook CG's iterate after every k HVPs."""
    num_tasks, n, lam = 3, 12, 0.7
    hessians = random_spd_hessians(num_tasks, n)
    b = torch.randn(num_tasks, n, dtype=F64)
    system = torch.eye(n, dtype=F64) + hessians / lam
    for k in (1, 2, 5):
        x, info = ops.cg_solve(dense_hvp(hessians, [n]), b, lam, iters=k)
        for t in range(num_tasks):
            xt, r = torch.zeros(n, dtype=F64), b[t].clone()
            p, rr = r.clone(), r @ r
            for _ in range(k):
                ap = system[t] @ p
                alpha = rr / (p @ ap)
                xt, r = xt + alpha * p, r - alpha * ap
                rr, rr_old = r @ r, rr
                p = r + (rr / rr_old) * p
            torch.testing.assert_close(x[t], xt, rtol=1e-10, atol=1e-12)
        assert torch.equal(info.iterations, torch.full((num_tasks,), k))


def _tiny_net_problem(num_tasks=3, lam=4.0):
    """A small MLP per task: its support-loss HVP by forward-over-reverse AD,
    and its dense Hessian for the exact answer."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    names = [n for n, _ in net.named_parameters()]
    params = [torch.stack([p.detach() + 0.1 * torch.randn_like(p) for _ in range(num_tasks)]) for p in net.parameters()]
    xs = torch.randn(num_tasks, 6, 3, dtype=F64)
    ys = torch.randint(0, 2, (num_tasks, 6))

    def loss(task_params, x, y):
        out = functional_call(net, dict(zip(names, task_params)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    def task_hvp(task_params, v, x, y):
        return jvp(lambda q: grad(loss)(q, x, y), (task_params,), (v,))[1]

    def hvp(v):
        return list(vmap(task_hvp)(tuple(params), tuple(v), xs, ys))

    sizes = [p[0].numel() for p in params]

    def flat_loss(flat, x, y):
        chunks = flat.split(sizes)
        return loss(tuple(c.reshape(p.shape[1:]) for c, p in zip(chunks, params)), x, y)

    flat_params = torch.cat([p.reshape(num_tasks, -1) for p in params], dim=1)
    hessians = torch.stack([hessian(flat_loss)(flat_params[t], xs[t], ys[t]) for t in range(num_tasks)])
    return params, hvp, hessians, lam


def test_small_network_exact_implicit_system():
    params, hvp, hessians, lam = _tiny_net_problem()
    num_tasks = params[0].shape[0]
    eig = torch.linalg.eigvalsh(torch.eye(hessians.shape[-1], dtype=F64) + hessians / lam)
    assert eig.min() > 0, "the test's system must be SPD"
    b = [torch.randn_like(p) for p in params]
    x, info = ops.cg_solve(hvp, b, lam, iters=60)
    flat = lambda v: torch.cat([t.reshape(num_tasks, -1) for t in v], dim=1)
    torch.testing.assert_close(flat(x), exact_solution(hessians, flat(b), lam), rtol=1e-8, atol=1e-8)
    assert not info.breakdown.any()


def test_breakdown_flags_the_indefinite_task_only():
    n, lam = 4, 1.0
    hessians = torch.stack([torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0], dtype=F64)), random_spd_hessians(1, n)[0]])
    b = torch.stack([torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), torch.randn(n, dtype=F64)])
    x, info = ops.cg_solve(dense_hvp(hessians, [n]), b, lam, iters=8)
    assert info.breakdown.tolist() == [True, False]
    assert torch.equal(x[0], torch.zeros(n, dtype=F64)), "a broken-down task must not update"
    assert info.iterations.tolist() == [0, 8]
    torch.testing.assert_close(x[1], exact_solution(hessians[1:], b[1:], lam)[0], rtol=1e-9, atol=1e-9)


def test_nan_hvp_is_flagged_and_x_keeps_the_last_good_iterate():
    n, lam = 6, 1.0
    hessians = random_spd_hessians(2, n)
    b = torch.randn(2, n, dtype=F64)
    calls = {"n": 0}
    good = dense_hvp(hessians, [n])

    def hvp(v):
        calls["n"] += 1
        out = good(v)
        if calls["n"] == 3:
            out[0][0, 2] = float("nan")
        return out

    x, info = ops.cg_solve(hvp, b, lam, iters=5)
    x2, _ = ops.cg_solve(dense_hvp(hessians[:1], [n]), b[:1], lam, iters=2)
    assert info.breakdown.tolist() == [True, False]
    assert info.iterations.tolist() == [2, 5]
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x[0], x2[0], rtol=1e-13, atol=1e-13)


def test_tolerance_masks_converged_tasks_on_device():
    n, lam = 10, 0.5
    hessians = torch.stack([torch.zeros(n, n, dtype=F64), random_spd_hessians(1, n)[0] * 20])
    b = torch.randn(2, n, dtype=F64)
    x, info = ops.cg_solve(dense_hvp(hessians, [n]), b, lam, iters=30, tol=1e-6)
    # A = I for task 0: one step solves it exactly, and it stops there.
    assert info.iterations[0].item() == 1
    torch.testing.assert_close(x[0], b[0], rtol=1e-14, atol=1e-14)
    assert info.converged.tolist() == [True, True]
    assert 1 < info.iterations[1].item() <= n + 1
    assert torch.all(info.residual_norm <= 1e-6 * b.norm(dim=1))
    true_residual = b[1] - (torch.eye(n, dtype=F64) + hessians[1] / lam) @ x[1]
    assert true_residual.norm() <= 1e-5 * b[1].norm()


def test_zero_rhs_task_is_converged_from_the_start():
    hessians = random_spd_hessians(2, 5)
    b = torch.stack([torch.zeros(5, dtype=F64), torch.randn(5, dtype=F64)])
    x, info = ops.cg_solve(dense_hvp(hessians, [5]), b, 1.0, iters=3)
    assert torch.equal(x[0], torch.zeros(5, dtype=F64))
    assert info.converged.tolist() == [True, False]
    assert info.iterations.tolist() == [0, 3]
    assert not info.breakdown.any() and torch.isfinite(x).all()


def test_per_task_lam_equals_separate_solves():
    num_tasks, n = 4, 7
    hessians = random_spd_hessians(num_tasks, n)
    b = torch.randn(num_tasks, n, dtype=F64)
    lam = 0.2 + torch.rand(num_tasks, dtype=F64)
    x, _ = ops.cg_solve(dense_hvp(hessians, [n]), b, lam, iters=3)
    for t in range(num_tasks):
        xt, _ = ops.cg_solve(dense_hvp(hessians[t : t + 1], [n]), b[t : t + 1], lam[t].item(), iters=3)
        torch.testing.assert_close(x[t], xt[0], rtol=1e-13, atol=1e-13)


def test_hvp_returning_its_input_is_safe():
    """An identity H (hvp returns r itself) must not alias the in-place update."""
    b = [torch.randn(3, 4, dtype=F64), torch.randn(3, 2, 2, dtype=F64)]
    lam = 0.5
    x, info = ops.cg_solve(lambda v: v, b, lam, iters=2)
    for xi, bi in zip(x, b):
        torch.testing.assert_close(xi, bi * lam / (1 + lam), rtol=1e-14, atol=1e-14)
    # A = (1 + 1/lam) I: one step solves it, and the residual can round to exactly 0,
    # which (tol = 0) marks the task converged and stops its updates.
    assert bool(((info.iterations == 2) | (info.converged & (info.iterations >= 1))).all())


def test_float32_solve_is_close_to_float64_solution():
    num_tasks, n = 16, 40
    hessians = random_spd_hessians(num_tasks, n)
    b = torch.randn(num_tasks, n, dtype=F64)
    x, _ = ops.cg_solve(dense_hvp(hessians.float(), [n]), b.float(), 1.0, iters=40)
    expected = exact_solution(hessians, b, 1.0)
    torch.testing.assert_close(x.double(), expected, rtol=1e-3, atol=1e-3)


def test_reference_backend_gives_the_same_solve(monkeypatch):
    num_tasks, n = 5, 9
    hessians = random_spd_hessians(num_tasks, n)
    b = [torch.randn(num_tasks, 4, dtype=F64), torch.randn(num_tasks, 5, dtype=F64)]
    x, info = ops.cg_solve(dense_hvp(hessians, [4, 5]), b, 0.8, iters=6, tol=1e-4)
    monkeypatch.setattr(_extension, "use_compiled", lambda device: False)
    x_ref, info_ref = ops.cg_solve(dense_hvp(hessians, [4, 5]), b, 0.8, iters=6, tol=1e-4)
    for a, e in zip(x, x_ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.equal(info.iterations, info_ref.iterations)
    torch.testing.assert_close(info.residual_norm, info_ref.residual_norm, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------
# Each op against its reference, on states with fresh, mid-way and stopped tasks.

STATES = list(cg_sample_states())


def assert_states_close(actual, expected, tol=1e-12):
    for name in ("x", "r", "p", "s"):
        for a, e in zip(getattr(actual, name), getattr(expected, name)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(actual.scalars, expected.scalars, rtol=tol, atol=tol)
    assert torch.equal(actual.status, expected.status)
    assert torch.equal(actual.iterations, expected.iterations)
    assert actual.counter.item() == 0


@pytest.mark.parametrize("state", STATES, ids=lambda s: f"T{s.r[0].shape[0]}-{len(s.r)}tensors-{'per_task' if s.lam_per_task is not None else 'scalar'}")
def test_cg_ops_match_reference(state):
    for stage in ("init", "alpha", "update"):
        expected = state.clone()
        before = state.clone()
        getattr(torch.ops.imaml_ext, f"cg_{stage}_")(*getattr(state, f"{stage}_args")())
        getattr(reference, f"cg_{stage}_")(*getattr(expected, f"{stage}_args")())
        assert_states_close(state, expected)
        if stage != "init":
            stopped = before.status != 0
            for t in stopped.nonzero().flatten().tolist():
                for a, b in zip(state.x, before.x):
                    assert torch.equal(a[t], b[t]), "a stopped task must not change"
        state = before  # each stage from the same random state


@pytest.mark.parametrize("stage", ["init", "alpha", "update"])
def test_cg_opcheck(stage):
    state = next(iter(cg_sample_states(layouts=["odd_sizes"])))
    torch.library.opcheck(getattr(torch.ops.imaml_ext, f"cg_{stage}_"), getattr(state, f"{stage}_args")())


# --------------------------------------------------------------------------
# Rejected inputs.

def _identity(v):
    return [t * 2 for t in v]


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(iters=0), ValueError, r"iters must be an integer >= 1; got 0"),
        (dict(iters=2.5), TypeError, r"iters must be an integer >= 1; got float 2.5"),
        (dict(lam=0.0), ValueError, r"lam must be a finite number > 0; got 0.0"),
        (dict(lam=-1.0), ValueError, r"lam must be a finite number > 0; got -1.0"),
        (dict(lam=float("inf")), ValueError, r"lam must be a finite number > 0; got inf"),
        (dict(lam=torch.tensor([1.0, 0.0, 1.0], dtype=F64)), ValueError, r"lam\[1\] must be a finite number > 0; got 0.0"),
        (dict(tol=-1e-3), ValueError, r"tol must be a finite number >= 0; got -0.001"),
        (dict(tol=float("nan")), ValueError, r"tol must be a finite number >= 0; got nan"),
        (dict(hvp=None), TypeError, r"hvp must be a callable"),
        (dict(hvp=lambda v: v[:1]), ValueError, r"hvp\(v\) must hold one tensor per b tensor \(2\); got 1"),
        (dict(hvp=lambda v: [t.float() for t in v]), TypeError, r"hvp\(v\)\[0\] must have the dtype of b\[0\] \(torch.float64\); got Tensor\(shape=\(3, 4\), dtype=torch.float32"),
        (dict(hvp=lambda v: [t[:2] for t in v]), ValueError, r"hvp\(v\)\[0\] must have the shape of b\[0\] \(3, 4\); got Tensor\(shape=\(2, 4\)"),
        (dict(b=[torch.randn(3, 4, dtype=F64), torch.randn(2, 2, dtype=F64)]), ValueError, r"b\[1\] must have T = 3 tasks in its first dimension \(as b\[0\]\); got Tensor\(shape=\(2, 2\)"),
        (dict(b=[torch.randn(3, 4, dtype=F64), torch.randn(3, 2)]), TypeError, r"b\[1\] must have the dtype of b\[0\] \(torch.float64\)"),
        (dict(b=[torch.randn(3, 0, dtype=F64)]), ValueError, r"b must hold at least one element per task"),
        (dict(b=[]), ValueError, r"b must be a non-empty list of \[T, ...\] tensors; got an empty list"),
    ],
)
def test_bad_input_is_rejected(kwargs, error, pattern):
    b = kwargs.pop("b", [torch.randn(3, 4, dtype=F64), torch.randn(3, 2, dtype=F64)])
    before = [t.clone() for t in b]
    args = dict(hvp=_identity, b=b, lam=1.0, iters=3)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        ops.cg_solve(**args)
    for t, u in zip(b, before):
        assert torch.equal(t, u), "b must never be modified"


def test_raw_cg_ops_reject_bad_state():
    state = next(iter(cg_sample_states(layouts=["odd_sizes"])))
    with pytest.raises(ValueError, match=r"imaml_ext.cg_alpha_: scalars must be a contiguous Double tensor of shape \[3, 5\]"):
        torch.ops.imaml_ext.cg_alpha_(state.r, state.hr, state.scalars[:, :4], state.status, state.counter, 1.0, None)
    with pytest.raises(ValueError, match=r"imaml_ext.cg_update_: iterations must be a contiguous Long tensor of shape \[3\]"):
        torch.ops.imaml_ext.cg_update_(state.x, state.r, state.p, state.s, state.hr, state.scalars, state.status,
                                       state.iterations.int(), state.counter, 1.0, None, 0.0)
    with pytest.raises(ValueError, match=r"imaml_ext.cg_alpha_: lam must be a finite number > 0; got 0"):
        torch.ops.imaml_ext.cg_alpha_(state.r, state.hr, state.scalars, state.status, state.counter, 0.0, None)
