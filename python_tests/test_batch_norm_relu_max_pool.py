"""batch_norm_relu_max_pool2d: the compiled CPU kernels against the reference and against ATen's three
layers in float64 (forward, first-order backward, double backward, third order, forward-over-reverse,
jvp), ties
and NaN, opcheck, reduced precision, every rejected input; then the fused view of a model and the
"+fused" forwards of TaskBatchedModule and IMAML against the unfused loop."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp

import imaml_ext.ops as ops
from imaml_ext import IMAML
from imaml_ext.batched.module import (FusedBatchNormReLUMaxPool2d, TaskBatchedModule, count_fusable_runs,
                                      fuse_batch_norm_relu_max_pool)
from imaml_ext.ops import _extension, reference
from op_samples import batch_norm_pool_sample_inputs
from test_batched import conv4, random_tasks
from test_forward_choice import FixedForward, assert_all_close, outputs_grads_hvps

f64 = torch.float64
SAMPLES = list(batch_norm_pool_sample_inputs())


def aten_layers(x, weight, bias, eps):
    """What the op fuses: PyTorch's own three layers."""
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.1, eps)), 2)


def composite_layers(x, weight, bias, eps):
    """The same in elementwise ops and reductions, which autograd differentiates to any order (ATen's
    batch_norm stops at the second)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = (x - mean).square().mean((0, 2, 3), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]
    return F.max_pool2d(F.relu(y), 2)


def grads_of(f, sample, create_graph=False):
    args = [t.detach().clone().requires_grad_(True) for t in (sample.input, sample.weight, sample.bias)]
    out = f(*args, sample.eps)
    return out, args, torch.autograd.grad(out, args, sample.grad_out, create_graph=create_graph)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_compiled_op_equals_the_reference_and_atens_layers(sample):
    out, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*sample.op_args())
    expected = reference.batch_norm_relu_max_pool2d(*sample.op_args())
    for got, want in zip((out, mean, invstd, argmax), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, aten_layers(*sample.op_args()), rtol=1e-12, atol=1e-12)
    backward = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_backward(
        sample.grad_out, sample.input, sample.weight, sample.bias, mean, invstd, argmax)
    expected_backward = reference.batch_norm_relu_max_pool2d_backward(
        sample.grad_out, sample.input, sample.weight, sample.bias, mean, invstd, argmax)
    _, _, aten = grads_of(aten_layers, sample)
    for got, want, from_aten in zip(backward, expected_backward, aten):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(got, from_aten, rtol=1e-10, atol=1e-11)


def aten_double_backward(sample):
    """The gradients (grad_out, input, weight) of <grad_grad_*, the first-order gradients> through ATen's
    three layers, by autograd: what the double backward computes."""
    grad_out, x, w, b = [t.detach().clone().requires_grad_(True)
                         for t in (sample.grad_out, sample.input, sample.weight, sample.bias)]
    first = torch.autograd.grad(aten_layers(x, w, b, sample.eps), (x, w, b), grad_out, create_graph=True)
    upstream = (sample.grad_grad_input, sample.grad_grad_weight, sample.grad_grad_bias)
    total = sum((g * u).sum() for g, u in zip(first, upstream))
    return torch.autograd.grad(total, (grad_out, x, w))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_compiled_double_backward_equals_the_reference_and_atens_layers(sample):
    _, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*sample.op_args())
    args = sample.double_backward_args(mean, invstd, argmax)
    got = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward(*args)
    expected = reference.batch_norm_relu_max_pool2d_double_backward(*args)
    from_aten = aten_double_backward(sample)
    for name, g, want, aten in zip(("grad_grad_out", "grad_input", "grad_weight"), got, expected, from_aten):
        assert g.shape == want.shape and g.dtype == want.dtype, name
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(g, aten, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name} against ATen: {m}")


def test_first_maximum_wins_and_nan_propagates():
    x = torch.tensor([[[[3.0, 3.0, 1.0, 2.0], [3.0, 0.0, 2.0, 2.0]]]], dtype=f64)  # windows [3,3,3,0], [1,2,2,2]
    one, ten = torch.ones(1, dtype=f64), torch.full((1,), 10.0, dtype=f64)  # bias 10: every y > 0
    out, _, _, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(x, one, ten, 1e-5)
    assert argmax.flatten().tolist() == [0, 1]
    x[0, 0, 1, 3] = float("nan")  # NaN: the whole channel's statistics are NaN, every output NaN, as ATen's
    for op in (torch.ops.imaml_ext.batch_norm_relu_max_pool2d, reference.batch_norm_relu_max_pool2d):
        out, _, _, argmax = op(x, one, ten, 1e-5)
        assert torch.isnan(out).all() and argmax.flatten().tolist() == [3, 3]  # the last NaN, as ATen's
    assert torch.isnan(aten_layers(x, one, ten, 1e-5)).all()


@pytest.mark.parametrize("sample", SAMPLES[:6], ids=lambda s: s.name)
def test_gradients_of_every_order_equal_atens_layers(sample):
    """First order (the compiled backward), double backward (the compiled one, behind a create_graph
    backward), forward-over-reverse (the backward's jvp), as iMAML's two HVPs use them, the third order
    (the reference's double backward, differentiated) and jvp of the forward."""
    fused = ops.batch_norm_relu_max_pool2d
    out, args, first = grads_of(fused, sample)
    out_aten, args_aten, first_aten = grads_of(aten_layers, sample)
    assert_all_close([out.detach(), *first], [out_aten.detach(), *first_aten])

    def loss(f):  # a loss whose output gradient depends on the input, as a network's does
        return lambda x, w, b: (f(x, w, b, sample.eps).square() * sample.grad_out).sum()

    vectors = [torch.randn_like(t) for t in args]
    reverse = {}
    for name, f in (("fused", fused), ("aten", aten_layers)):
        leaves = [t.detach().clone().requires_grad_(True) for t in args]
        grads = torch.autograd.grad(loss(f)(*leaves), leaves, create_graph=True)
        reverse[name] = torch.autograd.grad(grads, leaves, vectors)
    assert_all_close(reverse["fused"], reverse["aten"])
    third = {}
    for name, f in (("fused", fused), ("composite", composite_layers)):
        leaves = [t.detach().clone().requires_grad_(True) for t in args]
        grads = torch.autograd.grad(loss(f)(*leaves), leaves, create_graph=True)
        hvps = torch.autograd.grad(grads, leaves, vectors, create_graph=True)
        third[name] = torch.autograd.grad(sum((h * h).sum() for h in hvps), leaves)
    assert_all_close(third["fused"], third["composite"])
    primals = tuple(t.detach() for t in args)
    forward_over_reverse = [jvp(grad(loss(f), argnums=(0, 1, 2)), primals, tuple(vectors))[1]
                            for f in (fused, aten_layers)]
    assert_all_close(*forward_over_reverse)
    tangents = [jvp(lambda x, w, b, f=f: f(x, w, b, sample.eps), primals, tuple(vectors))[1]
                for f in (fused, aten_layers)]
    assert_all_close(*tangents)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=f64, requires_grad=True)
    w = torch.randn(3, dtype=f64, requires_grad=True)
    b = torch.randn(3, dtype=f64, requires_grad=True)
    f = ops.batch_norm_relu_max_pool2d
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))

    def hvp(x, w, b):  # second derivatives, whose gradient is the third order
        first = torch.autograd.grad((f(x, w, b) ** 2).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(g.sin().sum() for g in first), (x, w, b), create_graph=True)

    assert torch.autograd.gradcheck(hvp, (x, w, b))
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("sample", SAMPLES[::3], ids=lambda s: s.name)
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.imaml_ext.batch_norm_relu_max_pool2d, sample.op_args())
    out, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*sample.op_args())
    torch.library.opcheck(torch.ops.imaml_ext.batch_norm_relu_max_pool2d_backward,
                          (sample.grad_out, sample.input, sample.weight, sample.bias, mean, invstd, argmax))
    torch.library.opcheck(torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward,
                          sample.double_backward_args(mean, invstd, argmax))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_float32(dtype):
    """The compiled op in float32 / bf16 / fp16 (weights float32, as under autocast) against the float64
    reference of the same rounded inputs: within the output dtype's rounding."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for sample in batch_norm_pool_sample_inputs(dtype=dtype):
        if sample.name.endswith("ties"):
            continue  # equal maxima: rounding may pick another (equally right) window element
        weight, bias = sample.weight.float(), sample.bias.float()
        out, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(sample.input, weight, bias,
                                                                                   sample.eps)
        assert out.dtype == dtype and mean.dtype == invstd.dtype == torch.float32
        want = reference.batch_norm_relu_max_pool2d(sample.input.double(), weight.double(), bias.double(), sample.eps)
        torch.testing.assert_close(out.double(), want[0], rtol=tol, atol=tol)
        grads = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_backward(
            sample.grad_out, sample.input, weight, bias, mean, invstd, argmax)
        assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
        want = reference.batch_norm_relu_max_pool2d_backward(
            sample.grad_out.double(), sample.input.double(), weight.double(), bias.double(), mean.double(),
            invstd.double(), argmax)
        scale = max(w.abs().max().item() for w in want)
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * scale)
        args = sample.double_backward_args(mean, invstd, argmax, weight, bias)
        grads = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward(*args)
        assert [g.dtype for g in grads] == [dtype, dtype, torch.float32]
        want = reference.batch_norm_relu_max_pool2d_double_backward(*[a.double() if a.is_floating_point() else a
                                                                      for a in args])
        for got, expected in zip(grads, want):
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * scale)


def test_reference_fallback_runs_when_the_kernels_are_missing(monkeypatch):
    monkeypatch.setattr(_extension, "use_compiled", lambda device: False)
    sample = SAMPLES[0]
    out, _, first = grads_of(ops.batch_norm_relu_max_pool2d, sample)
    out_aten, _, first_aten = grads_of(aten_layers, sample)
    assert_all_close([out.detach(), *first], [out_aten.detach(), *first_aten])


def test_affine_free_defaults_are_one_and_zero():
    x = torch.randn(3, 4, 6, 6, dtype=f64)
    torch.testing.assert_close(ops.batch_norm_relu_max_pool2d(x, eps=1e-3), aten_layers(x, None, None, 1e-3))


BAD_INPUTS = [
    (dict(input=[1.0]), TypeError, r"input must be a tensor; got list \[1.0\]"),
    (dict(input=torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError,
     r"input must be float32, float64, float16 or bfloat16; got Tensor\(shape=\(2, 3, 4, 4\), dtype=torch.int64"),
    (dict(input=torch.zeros(3, 4, 4, dtype=f64)), ValueError,
     r"input must be \[N, C, H, W\] with N, C >= 1 and H, W >= 2 \(one 2x2 window\); got Tensor\(shape=\(3, 4, 4\)"),
    (dict(input=torch.zeros(2, 3, 1, 4, dtype=f64)), ValueError, r"input must be \[N, C, H, W\] .*shape=\(2, 3, 1, 4\)"),
    (dict(weight=torch.ones(4, dtype=f64)), ValueError,
     r"weight must be a \[C\] tensor with C = 3 \(input's channels\) on input's device \(cpu\); got Tensor\(shape=\(4,\)"),
    (dict(bias=torch.ones(3)), TypeError, r"bias must have input's dtype \(torch.float64\); got .*dtype=torch.float32"),
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0; got 0.0"),
    (dict(eps=float("nan")), ValueError, r"eps must be a finite number > 0; got nan"),
    (dict(eps=True), ValueError, r"eps must be a finite number > 0; got True"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS)
def test_bad_inputs_are_rejected_with_clear_errors(change, error, message):
    args = dict(input=torch.randn(2, 3, 4, 4, dtype=f64), weight=torch.ones(3, dtype=f64),
                bias=torch.zeros(3, dtype=f64), eps=1e-5, **{})
    args.update(change)
    with pytest.raises(error, match="imaml_ext.ops.batch_norm_relu_max_pool2d: " + message):
        ops.batch_norm_relu_max_pool2d(**args)


def test_compiled_op_rejects_bad_inputs_itself():
    x, one = torch.randn(2, 3, 4, 4, dtype=f64), torch.ones(3, dtype=f64)
    op = torch.ops.imaml_ext
    with pytest.raises(ValueError, match=r"imaml_ext.batch_norm_relu_max_pool2d: input must be \[N, C, H, W\] .*"
                                         r"got Tensor\(shape=\[2, 3, 1, 4\]"):
        op.batch_norm_relu_max_pool2d(x[:, :, :1], one, one, 1e-5)
    with pytest.raises(ValueError, match=r"input must be contiguous; got strides"):
        op.batch_norm_relu_max_pool2d(x.transpose(2, 3), one, one, 1e-5)
    with pytest.raises(TypeError, match=r"weight must have input's dtype \(Double\); got Tensor\(shape=\[3\], dtype=Float"):
        op.batch_norm_relu_max_pool2d(x, one.float(), one, 1e-5)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0; got -1"):
        op.batch_norm_relu_max_pool2d(x, one, one, -1.0)
    out, mean, invstd, argmax = op.batch_norm_relu_max_pool2d(x, one, one, 1e-5)
    with pytest.raises(ValueError, match=r"_backward: grad_out must be a contiguous \[N, C, H / 2, W / 2\] = \[2, 3, 2, 2\]"):
        op.batch_norm_relu_max_pool2d_backward(out[:, :, :1].contiguous(), x, one, one, mean, invstd, argmax)
    with pytest.raises(ValueError, match=r"_backward: argmax must be the forward's contiguous uint8"):
        op.batch_norm_relu_max_pool2d_backward(out, x, one, one, mean, invstd, argmax.long())
    with pytest.raises(TypeError, match=r"_backward: invstd must be the forward's contiguous Double tensor"):
        op.batch_norm_relu_max_pool2d_backward(out, x, one, one, mean, invstd.float(), argmax)
    double_backward = op.batch_norm_relu_max_pool2d_double_backward
    with pytest.raises(ValueError, match=r"_double_backward: grad_grad_input must be a contiguous tensor of input's "
                                         r"shape \[2, 3, 4, 4\], dtype and device; got Tensor\(shape=\[2, 3, 4, 2\]"):
        double_backward(x[..., :2].contiguous(), one, one, out, x, one, one, mean, invstd, argmax)
    with pytest.raises(TypeError, match=r"_double_backward: grad_grad_bias must have bias's dtype \(Double\); "
                                        r"got Tensor\(shape=\[3\], dtype=Float"):
        double_backward(x, one, one.float(), out, x, one, one, mean, invstd, argmax)
    with pytest.raises(ValueError, match=r"_double_backward: grad_grad_weight must be a \[C\] tensor with C = 3"):
        double_backward(x, one[:2], one, out, x, one, one, mean, invstd, argmax)
    with pytest.raises(ValueError, match=r"_double_backward: argmax must be the forward's contiguous uint8"):
        double_backward(x, one, one, out, x, one, one, mean, invstd, argmax.long())


# ----- the fused view of a model, and the "+fused" forwards -----


def test_fused_view_replaces_each_run_keeps_names_and_leaves_the_model_alone():
    model = conv4()
    before = copy.deepcopy(model)
    view, runs = fuse_batch_norm_relu_max_pool(model)
    assert runs == count_fusable_runs(model) == 4
    assert [type(m).__name__ for m in view[:4]] == ["Conv2d", "FusedBatchNormReLUMaxPool2d", "Identity", "Identity"]
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    assert [type(m) for m in model] == [type(m) for m in before]  # the model's own layers are unchanged
    x = torch.randn(3, 1, 28, 28, dtype=f64)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", ["running_stats", "hook", "kernel_3", "ceil_mode", "leaky_relu", "order"])
def test_runs_that_are_not_exactly_the_fused_op_are_left_alone(change):
    bn, relu, pool = nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)
    if change == "running_stats":
        bn = nn.BatchNorm2d(4)
    elif change == "hook":
        relu.register_forward_hook(lambda *a: None)
    elif change == "kernel_3":
        pool = nn.MaxPool2d(3, 2)
    elif change == "ceil_mode":
        pool = nn.MaxPool2d(2, ceil_mode=True)
    elif change == "leaky_relu":
        relu = nn.LeakyReLU()
    layers = [relu, bn, pool] if change == "order" else [bn, relu, pool]
    model = nn.Sequential(nn.Conv2d(1, 4, 3), *layers)
    view, runs = fuse_batch_norm_relu_max_pool(model)
    assert runs == count_fusable_runs(model) == 0 and view is model


def test_nested_runs_are_fused_and_containers_copied():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False),
                                                    nn.ReLU(), nn.MaxPool2d(2)))
            self.head = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    model = Net().double()
    view, runs = fuse_batch_norm_relu_max_pool(model)
    assert runs == 1 and isinstance(view.body[0][1], FusedBatchNormReLUMaxPool2d)
    assert view.head is model.head and view.body is not model.body
    assert isinstance(model.body[0][1], nn.BatchNorm2d)
    x = torch.randn(2, 1, 8, 8, dtype=f64)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["loop+fused", "vmap+fused", "stacked+fused", "stacked/2+fused", "im2col+fused"])
def test_fused_forwards_equal_the_loop_in_value_gradient_and_hvp(mode):
    T = 3
    model = conv4()
    loop, fused = TaskBatchedModule(model, T, "loop"), FixedForward(model, T, mode)
    phi = [p + 0.1 * torch.randn_like(p) for p in loop.expand_theta()]
    x = torch.randn(T, 4, 1, 28, 28, dtype=f64)
    assert_all_close(outputs_grads_hvps(fused, phi, x), outputs_grads_hvps(loop, phi, x))


@pytest.mark.parametrize("forward", ["loop+fused", "stacked+fused"])
@pytest.mark.parametrize("hvp", ["reverse", "forward"])
def test_meta_step_with_a_fused_forward_equals_the_unfused_loop(forward, hvp):
    model, batch = conv4(), random_tasks(3)
    results = {}
    for mode in ("loop", forward):
        m = copy.deepcopy(model)
        result = IMAML(m, inner_steps=3, cg_iterations=3, forward=mode, hvp=hvp).meta_step(*batch)
        results[mode] = [p.grad for p in m.parameters()] + [result.loss, result.support_loss]
    assert_all_close(results[forward], results["loop"])


def test_a_fused_forward_on_a_model_with_nothing_to_fuse_says_so_once():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 5)).double()
    with pytest.warns(RuntimeWarning, match=r"forward='stacked\+fused': Sequential has no nn.Sequential run "
                                            r"BatchNorm2d \(track_running_stats=False\) -> ReLU -> MaxPool2d\(2\) "
                                            r"to fuse; it runs as 'stacked'"):
        module = TaskBatchedModule(model, 2, "stacked+fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(module.expand_theta(), torch.randn(2, 3, 1, 28, 28, dtype=f64))


# ----- CUDA (not run where these tests were written: no GPU) -----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_kernels_equal_the_reference(dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for sample in batch_norm_pool_sample_inputs(device="cuda", dtype=dtype):
        weight, bias = (sample.weight, sample.bias) if dtype != torch.bfloat16 else (sample.weight.float(),
                                                                                    sample.bias.float())
        args = (sample.input, weight, bias, sample.eps)
        out, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*args)
        want = reference.batch_norm_relu_max_pool2d(*[a.cpu().double() if torch.is_tensor(a) else a for a in args])
        torch.testing.assert_close(out.cpu().double(), want[0], rtol=tol, atol=tol, msg=lambda m: f"{sample.name}: {m}")
        if dtype == torch.float64 or not sample.name.endswith("ties"):  # rounding may pick another equal maximum
            assert torch.equal(argmax.cpu(), want[3]), sample.name
        grads = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_backward(
            sample.grad_out, sample.input, weight, bias, mean, invstd, argmax)
        want = reference.batch_norm_relu_max_pool2d_backward(
            sample.grad_out.cpu().double(), sample.input.cpu().double(), weight.cpu().double(), bias.cpu().double(),
            mean.cpu().double(), invstd.cpu().double(), argmax.cpu())
        scale = max(w.abs().max().item() for w in want)
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{sample.name}: {m}")
        args = sample.double_backward_args(mean, invstd, argmax, weight, bias)
        grads = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward(*args)
        want = reference.batch_norm_relu_max_pool2d_double_backward(
            *[a.cpu().double() if a.is_floating_point() else a.cpu() for a in args])
        for got, expected in zip(grads, want):
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{sample.name} double backward: {m}")


@pytest.mark.cuda
def test_cuda_kernels_run_on_a_side_stream_and_in_a_graph():
    sample = SAMPLES[0]
    args = [t.cuda() if torch.is_tensor(t) else t for t in sample.op_args()]
    expected = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*args)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*args)[0]
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out, mean, invstd, argmax = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*args)
    double_args = [t.cuda() for t in sample.double_backward_args(mean.cpu(), invstd.cpu(), argmax.cpu())]
    expected_double = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward(*double_args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.imaml_ext.batch_norm_relu_max_pool2d(*args)[0]
        captured_double = torch.ops.imaml_ext.batch_norm_relu_max_pool2d_double_backward(*double_args)
    graph.replay()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)
    for got, want in zip(captured_double, expected_double):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
