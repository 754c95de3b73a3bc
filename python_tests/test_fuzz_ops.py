"""Property tests (hypothesis): every op through its public wrapper, compiled kernels
against the plain-PyTorch reference and a float64 oracle, over random tensor lists,
task counts, dtypes, strides and scalars, magnitudes up to 1e32 included."""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from imaml_ext import ops
from imaml_ext.ops import _extension, reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not _extension.has_compiled_kernels("cpu"),
                                reason="the compiled CPU kernels are not built: nothing to compare with the reference")

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)
dtypes = st.sampled_from([torch.float32, torch.float64])


@contextmanager
def reference_backend():
    with mock.patch.object(_extension, "use_compiled", lambda device: False):
        yield


def make_list(seed, T, shape_list, dtype, scale, strided):
    """[T, *shape] tensors; strided ones are views with non-unit strides (every other row
    of a twice-as-long tensor), so the wrappers' copy-in / copy-back paths run too."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shape_list:
        if strided:
            base = torch.randn((2 * T,) + shape, generator=g, dtype=torch.float64) * scale
            out.append(base[::2].to(dtype))
        else:
            out.append((torch.randn((T,) + shape, generator=g, dtype=torch.float64) * scale).to(dtype))
    return out


def copy_keeping_layout(t):
    """A copy of t with t's strides (a strided view stays a strided view)."""
    if t.is_contiguous():
        return t.clone()
    out = torch.empty((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)[::2]
    return out.copy_(t)


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 6), shape_list=shapes, dtype=dtypes,
       exponent=st.integers(-20, 20), lr=st.floats(1e-6, 1e6), lam=st.floats(0.0, 1e6),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), per_task=st.booleans(), strided=st.booleans())
def test_prox_step_kernel_equals_reference(seed, T, shape_list, dtype, exponent, lr, lam, momentum, per_task, strided):
    scale = 10.0 ** exponent
    if dtype == torch.float32:
        scale = min(scale, 1e20)  # lr * lam * |phi| stays below 1e32, inside float32's range
    params = make_list(seed, T, shape_list, dtype, scale, strided)
    grads = make_list(seed + 1, T, shape_list, dtype, scale, False)
    anchors = [t[0].clone() for t in make_list(seed + 2, T, shape_list, dtype, scale, False)]
    buffers = make_list(seed + 3, T, shape_list, dtype, scale, strided) if momentum else None
    if per_task:
        g = torch.Generator().manual_seed(seed + 4)
        lr_arg = (torch.rand(T, generator=g, dtype=torch.float64) * lr).to(dtype)
        lam_arg = (torch.rand(T, generator=g, dtype=torch.float64) * lam).to(dtype)
    else:
        lr_arg, lam_arg = lr, lam

    def run(backend_ctx):
        p = [copy_keeping_layout(t) for t in params]
        b = [copy_keeping_layout(t) for t in buffers] if buffers is not None else None
        with backend_ctx():
            ops.prox_sgd_step_(p, grads, anchors, lr_arg, lam_arg, momentum, b)
        return p, b

    got_p, got_b = run(contextmanager(lambda: (yield)))
    ref_p, ref_b = run(reference_backend)
    # float64 oracle of the same arithmetic
    lr64 = lr_arg.double() if per_task else lr
    lam64 = lam_arg.double() if per_task else lam
    oracle = [t.double() for t in params]
    oracle_b = [t.double() for t in buffers] if buffers is not None else []
    reference.prox_sgd_step_(oracle, [g.double() for g in grads], [a.double() for a in anchors], oracle_b,
                             lr64 if not per_task else 0.0, lam64 if not per_task else 0.0, momentum,
                             lr64 if per_task else None, lam64 if per_task else None)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, ref, exact in zip(got_p, ref_p, oracle):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)
        # the update's own scale: cancellation in phi - lr * d can leave a small phi
        bound = rtol * (exact.abs() + scale * (1 + lr * (1 + lam)) * (1 + lr)).max()
        assert (got.double() - exact).abs().max() <= 10 * bound
    if buffers is not None:
        for got, ref in zip(got_b, ref_b):
            torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


def test_prox_step_overflow_is_inf_in_both():
    params = [torch.full((2, 3), 3e38, dtype=torch.float32)]
    grads = [torch.full((2, 3), 3e38, dtype=torch.float32)]
    anchors = [torch.full((3,), -3e38, dtype=torch.float32)]
    got = [params[0].clone()]
    ops.prox_sgd_step_(got, grads, anchors, 10.0, 10.0)
    ref = [params[0].clone()]
    with reference_backend():
        ops.prox_sgd_step_(ref, grads, anchors, 10.0, 10.0)
    assert torch.isinf(got[0]).all() and torch.equal(got[0], ref[0])


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 5), shape_list=shapes, dtype=dtypes,
       exponent=st.integers(-15, 15), lam=st.floats(1e-3, 1e3), iters=st.integers(1, 8),
       tol=st.sampled_from([0.0, 1e-3, 0.5]), per_task=st.booleans())
def test_cg_solve_kernels_equal_reference_and_solve_the_system(seed, T, shape_list, dtype, exponent, lam, iters, tol,
                                                               per_task):
    """A diagonal SPD H (per task and element): the solution is b / (1 + d / lam) exactly."""
    scale = 10.0 ** exponent
    b = make_list(seed, T, shape_list, dtype, scale, False)
    g = torch.Generator().manual_seed(seed + 1)
    diag = [(torch.rand(t.shape, generator=g, dtype=torch.float64) * 10).to(dtype) for t in b]
    lam_arg = (torch.rand(T, generator=g, dtype=torch.float64) * lam + 1e-3).to(dtype) if per_task else lam

    def hvp(v):
        return [d * t for d, t in zip(diag, v)]

    x, info = ops.cg_solve(hvp, b, lam_arg, iters, tol)
    with reference_backend():
        x_ref, info_ref = ops.cg_solve(hvp, b, lam_arg, iters, tol)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, ref in zip(x, x_ref):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)
    assert torch.equal(info.iterations, info_ref.iterations) or dtype == torch.float32
    assert not info.breakdown.any()
    # Enough iterations for every distinct eigenvalue: the exact solution.
    if iters >= sum(t[0].numel() for t in b) and tol == 0.0:
        lam64 = lam_arg.double() if per_task else lam
        for got, bi, d in zip(x, b, diag):
            lam_b = lam64.reshape((-1,) + (1,) * (bi.dim() - 1)) if per_task else lam64
            exact = bi.double() / (1 + d.double() / lam_b)
            torch.testing.assert_close(got.double(), exact, rtol=1e-3 if dtype == torch.float32 else 1e-8,
                                       atol=1e-3 * scale if dtype == torch.float32 else 1e-8 * scale)
