"""The batched proximal inner step: kernels against the float64 reference,
the optimizer it must equal, opcheck, and every rejected input."""

import re

import pytest
import torch

import imaml_ext.ops as ops
from imaml_ext.ops import reference
from op_samples import CONV4_SHAPES, prox_sample_inputs, task_list

OP = torch.ops.imaml_ext.prox_sgd_step_


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m: f"tensor {i}: {m}", **tol)


@pytest.mark.parametrize("sample", list(prox_sample_inputs()), ids=lambda s: s.name)
def test_op_matches_reference_float64(sample):
    expected = sample.clone()
    before = [p.clone() for p in sample.params]
    OP(*sample.op_args())
    reference.prox_sgd_step_(*expected.op_args())
    assert_lists_close(sample.params, expected.params, rtol=1e-13, atol=1e-13)
    assert_lists_close(sample.momentum_buffers, expected.momentum_buffers, rtol=1e-13, atol=1e-13)
    assert any(not torch.equal(a, b) for a, b in zip(sample.params, before)), "the step changed nothing"


def test_reference_is_the_stated_formula():
    """Guards the oracle itself: one task, hand-written maths in float64."""
    phi = torch.randn(2, 7, dtype=torch.float64)
    g, theta = torch.randn_like(phi), torch.randn(7, dtype=torch.float64)
    buf = torch.randn_like(phi)
    lr, lam, mom = 0.3, 1.7, 0.8
    expected_buf = mom * buf + (g + lam * (phi - theta))
    expected_phi = phi - lr * expected_buf
    reference.prox_sgd_step_([phi], [g], [theta], [buf], lr, lam, mom, None, None)
    torch.testing.assert_close(phi, expected_phi, rtol=0, atol=1e-15)
    torch.testing.assert_close(buf, expected_buf, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wrapper_equals_torch_sgd_with_proximal_gradient(dtype):
    """T tasks through the fused step == torch.optim.SGD on each task with the
    gradient of L + lam/2 ||phi - theta||^2, momentum included."""
    num_tasks, lr, lam, mom = 4, 0.1, 0.7, 0.9
    params = task_list(num_tasks, CONV4_SHAPES[:6], dtype, "cpu")
    anchors = [torch.randn(p.shape[1:], dtype=dtype) for p in params]
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    expected = []
    for t in range(num_tasks):
        task_params = [torch.nn.Parameter(p[t].clone()) for p in params]
        opt = torch.optim.SGD(task_params, lr=lr, momentum=mom)
        for grads in grads_per_step:
            for q, g, a in zip(task_params, grads, anchors):
                q.grad = g[t] + lam * (q.detach() - a)
            opt.step()
        expected.append([q.detach() for q in task_params])
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        ops.prox_sgd_step_(params, grads, anchors, lr, lam, momentum=mom, momentum_buffers=buffers)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for t in range(num_tasks):
        assert_lists_close([p[t] for p in params], expected[t], **tol)


def test_per_task_lr_and_lam_equal_separate_calls():
    num_tasks = 5
    params = task_list(num_tasks, [(3, 4), (6,)], torch.float64, "cpu")
    grads = [torch.randn_like(p) for p in params]
    anchors = [torch.randn(p.shape[1:], dtype=torch.float64) for p in params]
    lr, lam = torch.rand(num_tasks, dtype=torch.float64), torch.rand(num_tasks, dtype=torch.float64)
    expected = [p.clone() for p in params]
    for t in range(num_tasks):
        one = [e[t : t + 1] for e in expected]
        ops.prox_sgd_step_(one, [g[t : t + 1] for g in grads], anchors, lr[t].item(), lam[t].item())
    ops.prox_sgd_step_(params, grads, anchors, lr, lam)
    assert_lists_close(params, expected, rtol=1e-14, atol=1e-14)


def test_lr_zero_leaves_params_unchanged():
    params = task_list(3, CONV4_SHAPES, torch.float64, "cpu")
    before = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    anchors = [torch.randn(p.shape[1:], dtype=torch.float64) for p in params]
    ops.prox_sgd_step_(params, grads, anchors, 0.0, 3.0)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_zero_dim_tensor_lr_broadcasts():
    params = task_list(3, [(4,)], torch.float64, "cpu")
    expected = [p.clone() for p in params]
    grads, anchors = [torch.randn_like(params[0])], [torch.randn(4, dtype=torch.float64)]
    ops.prox_sgd_step_(params, grads, anchors, torch.tensor(0.25, dtype=torch.float64), 0.5)
    ops.prox_sgd_step_(expected, grads, anchors, 0.25, 0.5)
    assert_lists_close(params, expected, rtol=0, atol=0)


def test_non_contiguous_inputs_are_handled():
    base = torch.randn(4, 6, 3, dtype=torch.float64)
    params = [base.transpose(1, 2)]  # [4, 3, 6], not contiguous
    grads = [torch.randn(4, 6, 3, dtype=torch.float64).transpose(1, 2)]
    anchors = [torch.randn(6, 3, dtype=torch.float64).t()]
    expected = [params[0].contiguous().clone()]
    reference.prox_sgd_step_(expected, [grads[0].contiguous()], [anchors[0].contiguous()], [], 0.3, 0.6, 0.0, None, None)
    ops.prox_sgd_step_(params, grads, anchors, 0.3, 0.6)
    torch.testing.assert_close(params[0], expected[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(base.transpose(1, 2), expected[0], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sample", list(prox_sample_inputs(layouts=["odd_sizes", "scalar_param"])), ids=lambda s: s.name)
def test_opcheck(sample):
    torch.library.opcheck(OP, sample.op_args())


def test_compiles_under_torch_compile():
    params = task_list(2, [(3,), (2, 2)], torch.float32, "cpu")
    grads = [torch.randn_like(p) for p in params]
    anchors = [torch.randn(p.shape[1:]) for p in params]
    expected = [p.clone() for p in params]
    ops.prox_sgd_step_(expected, grads, anchors, 0.1, 0.2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ans):
        OP(ps, gs, ans, [], 0.1, 0.2, 0.0, None, None)

    step(params, grads, anchors)
    assert_lists_close(params, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Rejected inputs: a clear message naming the argument, and nothing modified.

def _good(num_tasks=3, dtype=torch.float64):
    params = task_list(num_tasks, [(2, 3), (4,)], dtype, "cpu")
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        anchors=[torch.randn(p.shape[1:], dtype=dtype) for p in params],
        lr=0.1,
        lam=0.5,
    )


def _bad_cases():
    def with_(**changes):
        def make():
            args = _good()
            for key, fn in changes.items():
                args[key] = fn(args)
            return args
        return make

    f32 = lambda a: [g.float() for g in a["grads"]]
    return [
        ("grads dtype", with_(grads=f32), TypeError, r"grads\[0\] must have the dtype of params\[0\] \(torch.float64\); got Tensor\(shape=\(3, 2, 3\), dtype=torch.float32"),
        ("int params", with_(params=lambda a: [p.long() for p in a["params"]], grads=lambda a: [g.long() for g in a["grads"]]), TypeError, r"params\[0\] must be float32 or float64; got Tensor\(.*dtype=torch.int64"),
        ("list length", with_(grads=lambda a: a["grads"][:1]), ValueError, r"grads must hold one tensor per params tensor \(2\); got 1"),
        ("grads shape", with_(grads=lambda a: [torch.randn(3, 3, 2, dtype=torch.float64), a["grads"][1]]), ValueError, r"grads\[0\] must have the shape of params\[0\] \(3, 2, 3\); got Tensor\(shape=\(3, 3, 2\)"),
        ("T differs", with_(grads=lambda a: [torch.randn(2, 2, 3, dtype=torch.float64), a["grads"][1]]), ValueError, r"grads\[0\] must have the shape of params\[0\] \(3, 2, 3\); got Tensor\(shape=\(2, 2, 3\)"),
        ("T differs within params", with_(params=lambda a: [a["params"][0], torch.randn(2, 4, dtype=torch.float64)]), ValueError, r"params\[1\] must have T = 3 tasks in its first dimension"),
        ("anchor shape", with_(anchors=lambda a: [torch.randn(3, 2, 3, dtype=torch.float64), a["anchors"][1]]), ValueError, r"anchors\[0\] must have the shape of params\[0\] without its task dimension \(2, 3\); got Tensor\(shape=\(3, 2, 3\)"),
        ("anchor device", with_(anchors=lambda a: [a["anchors"][0].to("meta"), a["anchors"][1]]), ValueError, r"anchors\[0\] must be on the device of params\[0\] \(cpu\); got Tensor\(.*device=meta"),
        ("empty params", with_(params=lambda a: [], grads=lambda a: [], anchors=lambda a: []), ValueError, r"params must be a non-empty list"),
        ("zero tasks", with_(params=lambda a: [torch.randn(0, 4, dtype=torch.float64)], grads=lambda a: [torch.randn(0, 4, dtype=torch.float64)], anchors=lambda a: [torch.randn(4, dtype=torch.float64)]), ValueError, r"params\[0\] must have a leading task dimension T >= 1; got Tensor\(shape=\(0, 4\)"),
        ("tensor not list", with_(grads=lambda a: a["grads"][0]), TypeError, r"grads must be a list of tensors; got a single Tensor"),
        ("negative lr", with_(lr=lambda a: -0.1), ValueError, r"lr must be a finite number >= 0; got -0.1"),
        ("nan lam", with_(lam=lambda a: float("nan")), ValueError, r"lam must be a finite number >= 0; got nan"),
        ("inf lr", with_(lr=lambda a: float("inf")), ValueError, r"lr must be a finite number >= 0; got inf"),
        ("string lr", with_(lr=lambda a: "0.1"), TypeError, r"lr must be a finite number >= 0; got str '0.1'"),
        ("per-task lr negative", with_(lr=lambda a: torch.tensor([0.1, -2.0, 0.1], dtype=torch.float64)), ValueError, r"lr\[1\] must be a finite number >= 0; got -2.0"),
        ("per-task lam wrong T", with_(lam=lambda a: torch.rand(4, dtype=torch.float64)), ValueError, r"lam must be a number or a \[T\] = \[3\] tensor; got Tensor\(shape=\(4,\)"),
        ("per-task lam device", with_(lam=lambda a: torch.rand(3, device="meta")), ValueError, r"lam must be on the parameters' device \(cpu\); got Tensor\(.*device=meta"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_is_rejected_and_nothing_modified(case):
    _, make, error, pattern = case
    args = make()
    before = [p.clone() for p in args["params"] if isinstance(p, torch.Tensor)]
    with pytest.raises(error, match=pattern):
        ops.prox_sgd_step_(args["params"], args["grads"], args["anchors"], args["lr"], args["lam"])
    for p, b in zip(args["params"], before):
        assert torch.equal(p, b)


def test_momentum_without_buffers_is_rejected():
    args = _good()
    with pytest.raises(ValueError, match=r"momentum_buffers must be given when momentum != 0; got momentum = 0.9 and None"):
        ops.prox_sgd_step_(args["params"], args["grads"], args["anchors"], 0.1, 0.5, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum must be a finite number >= 0; got -0.5"):
        ops.prox_sgd_step_(args["params"], args["grads"], args["anchors"], 0.1, 0.5, momentum=-0.5,
                           momentum_buffers=[torch.zeros_like(p) for p in args["params"]])


def test_raw_op_rejects_bad_input_with_named_argument():
    """Direct callers of torch.ops.imaml_ext get the same kind of message, never a crash."""
    args = _good()
    before = [p.clone() for p in args["params"]]
    grads = [args["grads"][0].float(), args["grads"][1]]
    with pytest.raises(TypeError, match=re.escape("imaml_ext.prox_sgd_step_: grads[0] must have the dtype of params[0] (Double)")):
        OP(args["params"], grads, args["anchors"], [], 0.1, 0.5, 0.0, None, None)
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous; got strides"):
        OP([args["params"][0].transpose(1, 2), args["params"][1]], args["grads"], args["anchors"], [], 0.1, 0.5, 0.0, None, None)
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0; got -1"):
        OP(args["params"], args["grads"], args["anchors"], [], -1.0, 0.5, 0.0, None, None)
    for p, b in zip(args["params"], before):
        assert torch.equal(p, b)
