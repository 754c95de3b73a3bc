"""IMAML's two HVP modes, "reverse" (double backward through one kept support-gradient graph) and
"forward" (torch.func.jvp of torch.func.grad), give the same meta-step in float64 with every
batched forward, keep buffers as one support forward would, and "auto" times them once per key,
keeps the faster, and changes no state while timing."""

import copy
import time

import pytest
import torch

from imaml_ext import IMAML
from imaml_ext.batched import hvp as support_hvp
from imaml_ext.batched.module import TaskBatchedModule
from test_batched import conv4, random_tasks as tasks
from test_forward_choice import Mixed, assert_all_close

f64 = torch.float64


def meta_step(model, batch, **options):
    """theta's meta-gradient, the losses, CG's residuals and the module's buffers after one step."""
    model = copy.deepcopy(model)
    imaml = IMAML(model, inner_steps=2, cg_iterations=3, check_labels=False, **options)
    result = imaml.meta_step(*batch)
    return imaml, [*(p.grad for p in model.parameters()), result.loss, result.support_loss,
                   result.cg.residual_norm, *imaml._batched.buffers.values()]


@pytest.mark.parametrize("forward", ["loop", "vmap", "stacked", "im2col", "channels_last"])
def test_forward_over_reverse_equals_double_backward_in_float64(forward):
    model, batch = conv4(), tasks(3)
    _, reverse = meta_step(model, batch, forward=forward, hvp="reverse")
    _, fwd = meta_step(model, batch, forward=forward, hvp="forward")
    assert_all_close(fwd, reverse)


def test_forward_over_reverse_updates_running_statistics_as_one_support_forward():
    model = Mixed(running=True).to(f64)
    x, y = torch.randn(3, 6, 2, 15, 15, dtype=f64), torch.randint(0, 3, (3, 6))
    batch = (x, y, torch.randn_like(x), y)
    with pytest.warns(UserWarning, match="keeps running statistics"):
        imaml, reverse = meta_step(model, batch, hvp="reverse")
        _, fwd = meta_step(model, batch, hvp="forward")
    assert any(name.endswith("num_batches_tracked") for name in imaml._batched.buffers)
    assert_all_close(fwd, reverse)  # buffers included: updated once, not once per product


@pytest.mark.parametrize("precision, forward", [("bf16", "vmap"), ("bf16", "im2col"), ("fp16", "loop"),
                                                  ("fp16", "stacked")])
def test_forward_over_reverse_under_mixed_precision_agrees_with_double_backward(precision, forward):
    model = conv4(dtype=torch.float32)
    batch = tuple(t.float() if t.is_floating_point() else t for t in tasks(3))
    # Damped as training is: undamped, CG at this random theta amplifies bf16's rounding of the two modes'
    # products (im2col's bmm runs in bfloat16) to 6 % apart over 16 seeds; damped, 0.1 %.
    options = dict(precision=precision, nonfinite="skip" if precision == "fp16" else "propagate", forward=forward,
                   cg_damping=1.0, lam_damping=10.0)
    _, reverse = meta_step(model, batch, hvp="reverse", **options)
    _, fwd = meta_step(model, batch, hvp="forward", **options)
    grads = len(list(model.parameters()))
    # The same autocast arithmetic in another op order, compared over the whole meta-gradient: the
    # convolution biases before BatchNorm have an exact gradient of 0, so each of theirs is rounding
    # alone (bf16: up to 1.3x apart per tensor, 2.5e-3 over the whole, 10 seeds).
    got, expected = (torch.cat([g.flatten() for g in side[:grads]]) for side in (fwd, reverse))
    assert (got - expected).norm() <= 2e-2 * expected.norm()


@pytest.mark.parametrize("forward", ["loop", "stacked"])
def test_forward_over_reverse_of_dense_convolutions_under_bf16_is_refused_and_auto_keeps_reverse(forward):
    """torch 2.14's forward-mode convolution derivative under autocast mixes float32 and bfloat16."""
    model = conv4(dtype=torch.float32)
    batch = tuple(t.float() if t.is_floating_point() else t for t in tasks(2))
    with pytest.raises(RuntimeError, match=r"hvp='forward' under autocast \(precision='bf16'\) .* use hvp='reverse'"):
        meta_step(model, batch, precision="bf16", forward=forward, hvp="forward")
    with pytest.warns(RuntimeWarning, match=r"hvp='auto' left out forward: .*precision='bf16'.*; it keeps 'reverse'"):
        imaml, auto = meta_step(model, batch, precision="bf16", forward=forward, hvp="auto")
    (choice,) = imaml.hvp_choices.values()
    assert choice["hvp"] == "reverse" and "precision='bf16'" in choice["refused"]["forward"]
    _, reverse = meta_step(model, batch, precision="bf16", forward=forward, hvp="reverse")
    assert_all_close(auto, reverse)


def slowed(monkeypatch, slow_mode):
    """SupportHVP's products in `slow_mode` made 500 ms slower: a candidate more than 1.5x the fastest in
    the first timing round is not timed again, and beside two busy processes on two cores the fast mode's
    single timing came out above the slowed one's with 150 ms (a CI run, 2026-12-08)."""
    original = support_hvp.SupportHVP.__call__

    def call(self, vectors):
        if self.mode == slow_mode:
            time.sleep(0.5)
        return original(self, vectors)

    monkeypatch.setattr(support_hvp.SupportHVP, "__call__", call)


@pytest.mark.parametrize("slow_mode", ["reverse", "forward"])
def test_auto_keeps_the_faster_mode_per_key_and_equals_it(monkeypatch, slow_mode):
    slowed(monkeypatch, slow_mode)
    fast = "forward" if slow_mode == "reverse" else "reverse"
    model, batch = conv4(), tasks(2)
    imaml, auto = meta_step(model, batch, hvp="auto", forward="loop")
    (key, choice), = imaml.hvp_choices.items()
    assert key[:2] == ("cpu", (2, 5, 1, 28, 28)) and key[3] == "loop"
    assert choice["hvp"] == fast and choice["ms"][slow_mode] > choice["ms"][fast]
    _, chosen = meta_step(model, batch, hvp=fast, forward="loop")
    assert_all_close(auto, chosen)
    # kept: a second step of the same shape times nothing; a new shape is timed once more
    imaml.meta_step(*tasks(2))
    assert len(imaml.hvp_choices) == 1
    imaml.meta_step(*tasks(2, shots=2))
    assert len(imaml.hvp_choices) == 2


def test_auto_timing_leaves_buffers_and_the_random_stream_as_they_were():
    model = Mixed(running=True).to(f64)
    x, y = torch.randn(2, 6, 2, 15, 15, dtype=f64), torch.randint(0, 3, (2, 6))
    batch = (x, y, torch.randn_like(x), y)
    results = {}
    with pytest.warns(UserWarning, match="keeps running statistics"):
        for mode in ("auto", "chosen"):
            hvp = mode if mode == "auto" else imaml.hvp_choices.popitem()[1]["hvp"]
            torch.manual_seed(3)
            imaml, out = meta_step(model, batch, hvp=hvp)
            results[mode] = [*out, torch.rand(3)]
    assert_all_close(results["auto"], results["chosen"])


def test_auto_under_saved_tensor_hooks_keeps_reverse_and_says_why():
    model, batch = conv4(), tasks(2)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        with pytest.warns(RuntimeWarning, match=r"hvp='auto' left out forward: .*saved-tensor hooks.*; it keeps 'reverse'"):
            imaml, auto = meta_step(model, batch, hvp="auto")
        with pytest.raises(RuntimeError, match="hvp='forward' .* saved-tensor hooks"):
            meta_step(model, batch, hvp="forward")
    (choice,) = imaml.hvp_choices.values()
    assert choice["hvp"] == "reverse" and "saved tensor hooks" in choice["refused"]["forward"]
    _, reverse = meta_step(model, batch, hvp="reverse")
    assert_all_close(auto, reverse)


def test_hvp_names_are_checked():
    with pytest.raises(ValueError, match=r"IMAML: hvp must be one of 'auto', 'reverse', 'forward'; got 'jvp'"):
        IMAML(conv4(), hvp="jvp")
    with pytest.raises(ValueError, match=r"SupportHVP: mode must be 'reverse' or 'forward'; got 'auto'"):
        support_hvp.SupportHVP("auto", lambda params, fresh: None, [])


@pytest.mark.cuda
def test_cuda_forward_over_reverse_equals_the_cpu_default_in_float64_and_replays_as_a_cuda_graph():
    """Not run where the tests were written (no GPU): jvp-of-grad products on CUDA and in a capture."""
    model, batch = conv4(), tasks(3)
    _, expected = meta_step(model, batch, hvp="reverse")
    model = model.cuda()
    cuda_batch = [t.cuda() for t in batch]
    imaml = IMAML(model, inner_steps=2, cg_iterations=3, check_labels=False, hvp="forward")
    imaml.meta_step(*cuda_batch)
    grads = len(list(model.parameters()))
    assert_all_close([p.grad.cpu() for p in model.parameters()], expected[:grads])
    captured = imaml.capture(*cuda_batch)
    model.zero_grad()
    captured.step(*cuda_batch)
    assert_all_close([p.grad.cpu() for p in model.parameters()], expected[:grads])
    auto = IMAML(model, inner_steps=2, cg_iterations=3, check_labels=False, hvp="auto")
    auto.meta_step(*cuda_batch)
    (choice,) = auto.hvp_choices.values()
    assert choice["hvp"] in ("reverse", "forward") and set(choice["ms"]) == {"reverse", "forward"}


# ----- tf32: set for the call, restored after, on CUDA only -----


def precision_flags():
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.mark.parametrize("tf32", [True, False, None])
def test_tf32_is_set_during_the_cuda_work_and_restored_after(monkeypatch, tf32):
    """The flags are read inside the meta-step: a CUDA device is faked for the context only."""
    seen, original = [], IMAML._meta_step
    monkeypatch.setattr(IMAML, "_meta_step", lambda self, *a: seen.append(precision_flags()) or original(self, *a))
    before = precision_flags()
    imaml = IMAML(conv4(), inner_steps=1, cg_iterations=1, tf32=tf32)
    with imaml._tf32(torch.device("cuda")):
        inside = precision_flags()
    imaml.meta_step(*tasks(2))  # on the CPU: nothing changes
    assert precision_flags() == before and seen == [before]
    expected = {True: ("tf32", "tf32"), False: ("ieee", "ieee"), None: before}[tf32]
    assert inside == expected and imaml.tf32 is tf32


def test_tf32_flags_are_restored_when_the_call_raises():
    imaml = IMAML(conv4(), tf32=False)
    before = precision_flags()
    with pytest.raises(ZeroDivisionError):
        with imaml._tf32(torch.device("cuda")):
            1 / 0
    assert precision_flags() == before


def test_tf32_on_a_cpu_says_once_that_it_does_not_apply():
    imaml = IMAML(conv4(), inner_steps=1, cg_iterations=1, tf32=True)
    with pytest.warns(UserWarning, match="IMAML: tf32=True applies to CUDA convolutions and matrix products only"):
        imaml.meta_step(*tasks(2))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imaml.meta_step(*tasks(2))


def test_tf32_is_checked():
    with pytest.raises(ValueError, match=r"IMAML: tf32 must be None \(torch's settings as they are\), True or False; "
                                         r"got 'on'"):
        IMAML(conv4(), tf32="on")


def test_timed_choices_survive_a_weights_only_checkpoint_and_are_used_instead_of_timing(tmp_path, monkeypatch):
    model, batch = conv4(), tasks(2)
    imaml, first = meta_step(model, batch)
    torch.save({"timed_choices": imaml.timed_choices()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["timed_choices"]
    assert saved == imaml.timed_choices() and saved["forward"] and saved["hvp"]

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(support_hvp, "choose", no_timing)
    monkeypatch.setattr(TaskBatchedModule, "_time_forwards", no_timing)
    again = IMAML(copy.deepcopy(model), inner_steps=2, cg_iterations=3, check_labels=False)
    again.keep_timed_choices(saved)
    again.keep_timed_choices(None)  # a checkpoint from before the choices were kept
    again.meta_step(*batch)
    assert_all_close([p.grad for p in again.model.parameters()], first[:len(list(model.parameters()))])
    with pytest.raises(ValueError, match=r"IMAML: choices must be a dict from timed_choices\(\); got \{'forwards': \{\}\}"):
        again.keep_timed_choices({"forwards": {}})


def test_forward_hvp_does_not_print_torchs_jit_script_deprecation():
    """torch scripts its forward-AD decompositions at the first jvp and warned, at every training
    run, that torch.jit.script is deprecated; a fresh interpreter sees the first jvp."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from imaml_ext.batched.hvp import SupportHVP\n"
            "hvp = SupportHVP('forward', lambda p, fresh: ((p[0] ** 4).sum(1), {}), [torch.ones(2, 3)])\n"
            "assert hvp([torch.ones(2, 3)])[0].eq(12).all()\n")
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "jit" not in proc.stderr
