"""The batched forwards ("loop", "vmap", "stacked", "im2col", "channels_last") compute the same values as the default
("auto") in float64, and "auto" times them once per input shape on a CPU, keeps the faster,
changes no state while timing, and stays "vmap" off the CPU."""

import copy
import time

import pytest
import torch
from torch import nn

from imaml_ext import IMAML, BatchedModule
from imaml_ext.batched import stacked as batched_module
from imaml_ext.batched import forwards
from imaml_ext.batched.module import TaskBatchedModule
from test_batched import conv4, random_tasks as tasks

f64 = torch.float64


class Mixed(nn.Module):
    """Every case the stacked rules take or leave to vmap: strides, dilation, string padding,
    groups, no bias, affine-free BatchNorm, pooling with ceil_mode and its own stride, a
    BatchNorm1d, and (``running``) BatchNorm with running statistics."""

    def __init__(self, running: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.b1 = nn.BatchNorm2d(6, track_running_stats=running)
        self.c2 = nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3, bias=False)
        self.b2 = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
        self.p = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.c3 = nn.Conv2d(6, 4, (2, 3), padding=(1, 0))
        self.b3 = nn.BatchNorm1d(4 * 2 * 1, track_running_stats=False)
        self.head = nn.Linear(4 * 2 * 1, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.p(torch.relu(self.b2(self.c2(x))))
        x = torch.nn.functional.max_pool2d(self.c3(x), 2)
        return self.head(torch.tanh(self.b3(x.flatten(1))))


def outputs_grads_hvps(module, phi, x):
    """The forward, the gradient to phi of a loss of it, and an HVP through that gradient."""
    phi = [p.detach().requires_grad_(True) for p in phi]
    out = module(phi, x)
    grads = torch.autograd.grad(out.square().sum() + out.sum(), phi, create_graph=True)
    vectors = [torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p) for p in phi]
    hvps = torch.autograd.grad(grads, phi, vectors)
    return [out.detach(), *[g.detach() for g in grads], *hvps]


def assert_all_close(got, expected):
    """float64 agreement: 1e-9 relative per element, and absolute 1e-12 of the largest entry of all the
    tensors (no less than 1e-10) for entries near 0, which are the rounding of larger terms: a convolution
    bias before BatchNorm has an exact gradient and HVP of 0, and the CPU's channels-last and im2col
    convolutions round more (1e-10 there at some seeds, beside HVP entries up to 1e2 and more)."""
    scale = max((e.abs().max().item() for e in expected if e.is_floating_point() and e.numel()), default=0.0)
    atol = max(1e-10, 1e-12 * scale)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=atol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("forward", ["loop", "vmap", "stacked", "im2col", "channels_last"])
def test_meta_step_of_each_forward_equals_the_default(forward):
    model, batch = conv4(), tasks(3)
    results = {}
    for mode in ("auto", forward):
        m = copy.deepcopy(model)
        result = IMAML(m, inner_steps=3, cg_iterations=3, forward=mode).meta_step(*batch)
        results[mode] = [p.grad for p in m.parameters()]
        results[mode] += [result.loss, result.support_loss, result.cg.iterations.double()]
    assert_all_close(results[forward], results["auto"])


class FixedForward:
    """A TaskBatchedModule whose forward is ``mode``, also one "auto" times but does not take by name
    ("stacked/2": stacked over chunks of 2 tasks)."""

    def __init__(self, model, num_tasks, mode):
        self.module, self.mode = TaskBatchedModule(model, num_tasks, "loop"), mode
        self.buffers = self.module.buffers

    def __call__(self, params, inputs):
        return self.module._forward(self.mode, params, inputs, self.buffers)


@pytest.mark.parametrize("mode", ["stacked", "stacked/2", "im2col", "channels_last"])
@pytest.mark.parametrize("running", [False, True])
def test_stacked_forward_gradient_and_hvp_equal_the_loop_on_every_layer_case(mode, running):
    T = 5  # "stacked/2": chunks of 2, 2 and 1
    model = Mixed(running).to(f64)
    loop, stacked = TaskBatchedModule(model, T, "loop"), FixedForward(model, T, mode)
    phi = [p + 0.1 * torch.randn_like(p) for p in loop.expand_theta()]
    x = torch.randn(T, 4, 2, 13, 15, dtype=f64)
    assert_all_close(outputs_grads_hvps(stacked, phi, x), outputs_grads_hvps(loop, phi, x))
    if running:  # the running statistics were updated per task alike
        assert_all_close(list(stacked.buffers.values()), list(loop.buffers.values()))
        model.eval()  # eval: normalised by each task's running statistics (a stacked rule again)
        assert_all_close(outputs_grads_hvps(stacked, phi, x), outputs_grads_hvps(loop, phi, x))


def stacked_rules_run(monkeypatch) -> list:
    """The kinds of the stacked rules that run from now on, in order."""
    calls = []
    for kind, (rule, *rest) in list(batched_module._RULES.items()):
        def counted(*args, rule=rule, kind=kind):
            calls.append(kind)
            return rule(*args)
        monkeypatch.setitem(batched_module._RULES, kind, (counted, *rest))
    return calls


def test_stacked_forward_runs_its_rules_for_convolutions_batchnorm_and_pooling(monkeypatch):
    calls = stacked_rules_run(monkeypatch)
    module = TaskBatchedModule(conv4(), 2, "stacked")
    module(module.expand_theta(), torch.randn(2, 3, 1, 28, 28, dtype=f64))
    assert calls == ["conv2d", "batch_norm", "max_pool2d"] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("forward", ["loop", "vmap", "stacked", "im2col", "channels_last"])
def test_convolutions_run_in_the_autocast_dtype_with_every_forward(forward, dtype):
    """torch.func's vmapped convolutions escape autocast (torch 2.14): every forward must still run them,
    1-d and 2-d, in the autocast dtype, as a plain convolution under autocast runs."""

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c2, self.c1, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Conv1d(4, 3, 3), nn.Linear(3 * 6, 2)

        def forward(self, x):
            x = torch.relu(self.c2(x)).flatten(2)[..., :8]
            return self.head(self.c1(x).flatten(1))

    model, seen = Convs(), []
    for conv in (model.c2, model.c1):
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    module = TaskBatchedModule(model, 2, forward)
    with torch.autocast("cpu", dtype=dtype):
        module(module.expand_theta(), torch.randn(2, 3, 2, 5, 5))
    assert seen == [dtype, dtype] * (2 if forward == "loop" else 1)


def test_channels_last_forward_keeps_the_layout_from_each_convolution_to_the_next(monkeypatch):
    layouts = []
    for kind, (rule, *rest) in list(batched_module._RULES.items()):
        def recorded(T, dims, *args, rule=rule, kind=kind):
            out, dim = rule(T, dims, *args)
            stacked = out.reshape(out.shape[0], -1, *out.shape[3:])  # [B, T*C, H, W]: a view, or a copy
            layouts.append((kind, stacked.data_ptr() == out.data_ptr()
                            and stacked.is_contiguous(memory_format=torch.channels_last)))
            return out, dim
        monkeypatch.setitem(batched_module._RULES, kind, (recorded, *rest))
    module = TaskBatchedModule(conv4(), 2, "channels_last")
    module(module.expand_theta(), torch.randn(2, 3, 1, 28, 28, dtype=f64))
    assert layouts == [("conv2d_channels_last", True), ("batch_norm", True), ("max_pool2d", True)] * 4


def test_im2col_forward_runs_dense_convolutions_as_im2col_and_leaves_the_rest_grouped(monkeypatch):
    calls = stacked_rules_run(monkeypatch)
    module = TaskBatchedModule(Mixed().to(f64), 2, "im2col")
    module(module.expand_theta(), torch.randn(2, 4, 2, 13, 15, dtype=f64))
    # c2 (dilated, grouped, padding="same") has no im2col rule: the grouped one runs it
    assert calls == ["conv2d_im2col", "batch_norm", "conv2d", "batch_norm", "max_pool2d", "conv2d_im2col",
                     "max_pool2d", "batch_norm"]


def test_batched_module_with_the_stacked_forward_equals_the_loop():
    model, x = conv4(), torch.randn(2, 3, 1, 28, 28, dtype=f64)
    outs = []
    for mode in ("loop", "stacked"):
        batched = BatchedModule(model, 2, forward=mode)
        out = batched(x)
        outs += [out, *torch.autograd.grad(out.sum(), list(batched.parameters()))]
    half = len(outs) // 2
    assert_all_close(outs[half:], outs[:half])


CPU_AUTO = ["loop", "loop+fused", "stacked", "stacked+fused"]  # conv4 has runs to fuse


def slowed(monkeypatch, fast_mode):
    """TaskBatchedModule._forward with every mode but `fast_mode` made 500 ms slower; the modes it ran, in order.
    500 ms, not less: the first round's runs include each forward's one-off first-call cost, which
    beside busy processes reached 50 ms, then over 300 ms for "stacked+fused" (a CI run beside a training
    run, IMAML_TEST_SEED=1647057463), and dropped the fast forward at the 1.5x margin."""
    ran, original = [], TaskBatchedModule._forward

    def forward(self, mode, *args):
        ran.append(mode)
        if mode != fast_mode:
            time.sleep(0.5)
        return original(self, mode, *args)

    monkeypatch.setattr(TaskBatchedModule, "_forward", forward)
    return ran


@pytest.mark.parametrize("fast", ["loop", "stacked", "stacked+fused"])
def test_auto_keeps_the_faster_forward_per_input_shape_and_times_each_shape_once(monkeypatch, fast):
    ran = slowed(monkeypatch, fast)
    module = TaskBatchedModule(conv4(), 2, "auto")
    phi = [p.requires_grad_(True) for p in module.expand_theta()]
    x = torch.randn(2, 3, 1, 28, 28, dtype=f64)
    module(phi, x)
    assert ran[-1] == fast and sorted(set(ran[:-1])) == CPU_AUTO
    (key, choice), = module.forward_choices.items()
    assert key[0] == (2, 3, 1, 28, 28) and key[2] == "grad" and choice["forward"] == fast
    assert all(choice["ms"][slow] > choice["ms"][fast] for slow in choice["ms"] if slow != fast)
    ran.clear()
    module(phi, x)
    assert ran == [fast]  # kept: no second timing
    with torch.no_grad():
        module(phi, torch.randn(2, 5, 1, 28, 28, dtype=f64))  # a new shape (and no grad): timed once more
    assert len(module.forward_choices) == 2 and ran[-1] == fast and len(ran) > 2


def test_imaml_keeps_the_choices_across_meta_batch_sizes(monkeypatch):
    ran = slowed(monkeypatch, "loop")
    model = conv4()
    imaml = IMAML(model, inner_steps=1, cg_iterations=1)
    imaml.meta_step(*tasks(2))
    imaml.meta_step(*tasks(3))
    timed = len(imaml.forward_choices)
    ran.clear()
    imaml.meta_step(*tasks(2))  # a new TaskBatchedModule for T = 2, the same choices
    assert len(imaml.forward_choices) == timed and set(ran) == {"loop"}


def test_auto_timing_leaves_buffers_and_the_random_stream_as_they_were():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 3)).to(f64)
    x = torch.randn(2, 3, 1, 28, 28, dtype=f64)
    auto = TaskBatchedModule(model, 2, "auto")
    phi = auto.expand_theta()
    torch.manual_seed(1)
    out = auto(phi, x)
    after = torch.rand(3)
    chosen = TaskBatchedModule(model, 2, auto.forward_choices.popitem()[1]["forward"])
    torch.manual_seed(1)
    assert_all_close([chosen(phi, x), *chosen.buffers.values(), torch.rand(3)], [out, *auto.buffers.values(), after])


def test_auto_off_the_cpu_and_cuda_is_vmap_without_timing():
    module = TaskBatchedModule(conv4(), 2, "auto")
    x = torch.empty(2, 3, 1, 28, 28, dtype=f64, device="meta")
    assert module.auto_forward(module.expand_theta(), x, module.buffers) == "vmap"
    assert module.forward_choices == {}


def test_auto_leaves_out_a_forward_that_fails_and_says_why(monkeypatch):
    original = TaskBatchedModule._forward

    def forward(self, mode, *args):
        if mode == "stacked":
            raise RuntimeError("no stacked rule for this layer\nsecond line")
        return original(self, mode, *args)

    monkeypatch.setattr(TaskBatchedModule, "_forward", forward)
    module = TaskBatchedModule(conv4(), 2, "auto")
    phi = [p.requires_grad_(True) for p in module.expand_theta()]
    x = torch.randn(2, 3, 1, 28, 28, dtype=f64)
    # which survivor wins is the machine's timing (a loaded CPU can pick a fused form)
    with pytest.warns(RuntimeWarning, match=r'forward="auto" left out forwards that failed here \(stacked: no '
                                            r'stacked rule for this layer\); it keeps "(loop|loop\+fused|'
                                            r'stacked\+fused)" for input shape'):
        module(phi, x)
    (choice,) = module.forward_choices.values()
    assert choice["forward"] != "stacked" and choice["refused"] == {"stacked": "no stacked rule for this layer"}
    monkeypatch.setattr(TaskBatchedModule, "_forward", lambda *args: (_ for _ in ()).throw(RuntimeError("none")))
    with pytest.raises(RuntimeError, match='forward="auto": every forward it times failed here'):
        module(phi, torch.randn(2, 4, 1, 28, 28, dtype=f64))


def test_forward_names_are_checked():
    with pytest.raises(ValueError, match="'auto', 'vmap', 'loop', 'stacked', 'im2col', 'channels_last'"):
        IMAML(conv4(), forward="grouped")
    with pytest.raises(ValueError, match=r"'channels_last', 'loop\+fused', 'vmap\+fused', 'stacked\+fused', 'im2col\+fused'; got 'gemm'"):
        TaskBatchedModule(conv4(), 2, "gemm")


def test_auto_timing_is_invisible_to_the_callers_saved_tensor_hooks():
    """MAML's graph meter counts what the first step saves: the timing's graphs must not count."""
    model, x = conv4(), torch.randn(2, 3, 1, 28, 28, dtype=f64)
    packed = {}
    for mode in ("auto", "chosen"):
        forward = mode if mode == "auto" else module.forward_choices.popitem()[1]["forward"]
        module = TaskBatchedModule(model, 2, forward)
        phi = [p.requires_grad_(True) for p in module.expand_theta()]
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(1) or t, lambda t: t):
            module(phi, x)
        packed[mode] = len(count)
    assert packed["auto"] == packed["chosen"] > 0


def cpu_step_then_cuda():
    """A float64 Conv4's meta-gradient on the CPU (the default forward), then the model and the
    tasks moved to CUDA: (model, the CUDA batch, the CPU meta-gradient)."""
    model, batch = conv4(), tasks(3)
    IMAML(model, 3, 0.1, 2.0, 3).meta_step(*batch)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return model.cuda(), [t.cuda() for t in batch], expected


@pytest.mark.cuda
def test_cuda_auto_times_vmap_stacked_im2col_and_channels_last_before_a_capture_and_equals_the_cpu_default():
    """Not run where the tests were written (no GPU)."""
    model, cuda_batch, expected = cpu_step_then_cuda()
    imaml = IMAML(model, 3, 0.1, 2.0, 3, check_labels=False)
    captured = imaml.capture(*cuda_batch)  # its eager warm-up times every shape first
    timed = {"vmap", "stacked", "im2col", "channels_last"}
    assert {c["forward"] for c in imaml.forward_choices.values()} <= timed
    assert all(set(c["ms"]) == timed for c in imaml.forward_choices.values())
    model.zero_grad()
    captured.step(*cuda_batch)
    assert_all_close([p.grad.cpu() for p in model.parameters()], expected)


@pytest.mark.cuda
@pytest.mark.parametrize("forward", ["stacked", "im2col", "channels_last", "stacked+fused", "im2col+fused"])
def test_cuda_stacked_forward_equals_the_cpu_default_in_float64_and_replays_as_a_cuda_graph(forward):
    """Not run where the tests were written (no GPU): the stacked rules and the fused CUDA kernels on
    CUDA, and inside a capture."""
    model, cuda_batch, expected = cpu_step_then_cuda()
    imaml = IMAML(model, 3, 0.1, 2.0, 3, forward=forward, check_labels=False)
    imaml.meta_step(*cuda_batch)
    assert_all_close([p.grad.cpu() for p in model.parameters()], expected)
    captured = imaml.capture(*cuda_batch)
    model.zero_grad()
    captured.step(*cuda_batch)
    assert_all_close([p.grad.cpu() for p in model.parameters()], expected)



def test_auto_on_a_cpu_times_stacked_chunks_smaller_than_the_meta_batch(monkeypatch):
    monkeypatch.setattr(forwards, "CHUNKS", (8, 2))
    timed, original = [], TaskBatchedModule._time_forwards

    def record(self, phi, x, buffers, grad, modes):
        timed.append(list(modes))
        return original(self, phi, x, buffers, grad, modes)

    monkeypatch.setattr(TaskBatchedModule, "_time_forwards", record)
    module = TaskBatchedModule(conv4(), 3, "auto")
    out = module(module.expand_theta(), torch.randn(3, 2, 1, 28, 28, dtype=f64))
    # 8 tasks would be all 3: "stacked" itself
    assert timed == [["loop", "stacked", "loop+fused", "stacked+fused", "stacked/2", "stacked/2+fused"]]
    (choice,) = module.forward_choices.values()
    assert choice["forward"] in timed[0] and out.shape == (3, 2, 5)


def test_auto_times_fused_forwards_only_for_a_model_with_a_run_to_fuse(monkeypatch):
    timed, original = [], TaskBatchedModule._time_forwards

    def record(self, phi, x, buffers, grad, modes):
        timed.append(list(modes))
        return original(self, phi, x, buffers, grad, modes)

    monkeypatch.setattr(TaskBatchedModule, "_time_forwards", record)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2 * 13 * 13, 5)).to(f64)  # running statistics: not fusable
    module = TaskBatchedModule(model, 2, "auto")
    module(module.expand_theta(), torch.randn(2, 2, 1, 28, 28, dtype=f64))
    assert timed == [["loop", "stacked"]]
