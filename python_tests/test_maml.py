"""imaml_ext.MAML, the batched twin of IMAML through the unrolled inner loop: equal to
learn2learn's MAML (second and first order) task by task, memory estimate refusal, and
its use from the training command line (--algo)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from imaml_ext import MAML
from imaml_ext.batched import maml as maml_module
from imaml_ext.batched.memory import GraphSizeMeter, available_bytes
from test_batched import conv4, random_tasks

f64 = torch.float64


def learn2learn_meta_gradient(model, tasks, steps, lr, first_order):
    l2l = pytest.importorskip("learn2learn")
    reference = copy.deepcopy(model)
    maml = l2l.algorithms.MAML(reference, lr=lr, first_order=first_order)
    T = tasks[0].shape[0]
    for t in range(T):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(tasks[0][t]), tasks[1][t]))
        (F.cross_entropy(learner(tasks[2][t]), tasks[3][t]) / T).backward()
    return [p.grad for p in reference.parameters()]


@pytest.mark.parametrize("forward", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_batched_maml_equals_learn2learn_on_conv4_with_batchnorm(first_order, forward):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = conv4(hidden=6)
    tasks = random_tasks(3, shots=2, query=3)
    steps, lr = 3, 0.4
    expected = learn2learn_meta_gradient(model, tasks, steps, lr, first_order)
    result = MAML(model, steps, lr, first_order=first_order, forward=forward).meta_step(*tasks)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    assert result.cg is None and 0.0 <= result.accuracy.item() <= 1.0
    assert result.support_loss.item() > 0


def test_first_and_second_order_differ_and_zero_steps_is_plain_query_gradient():
    torch.manual_seed(1)
    model = conv4(hidden=6)
    tasks = random_tasks(2, shots=2, query=3)
    grads = {}
    for fo in (False, True):
        m = copy.deepcopy(model)
        MAML(m, 2, 0.4, first_order=fo).meta_step(*tasks)
        grads[fo] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert (grads[False] - grads[True]).norm() > 1e-3 * grads[True].norm()

    m = copy.deepcopy(model)
    MAML(m, 0, 0.4).meta_step(*tasks)
    out = torch.stack([m(x) for x in tasks[2]])
    loss = torch.stack([F.cross_entropy(o, y) for o, y in zip(out, tasks[3])]).mean()
    expected = torch.autograd.grad(loss, list(m.parameters()))
    for p, e in zip(m.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_nonfinite_task_is_left_out_and_named(first_order):
    """MAML found no non-finite task: a NaN in one task's images reached theta's gradient (and,
    on the command line, theta), with --on_nonfinite saying nothing."""
    model = conv4(hidden=4)
    sx, sy, qx, qy = random_tasks(3, shots=1, query=2)
    sx[1, 0, 0, 2, 2] = float("nan")
    keep = torch.tensor([0, 2])
    clean = copy.deepcopy(model)
    expected = MAML(clean, 2, 0.4, first_order=first_order).meta_step(sx[keep], sy[keep], qx[keep], qy[keep])
    skipped = copy.deepcopy(model)
    result = MAML(skipped, 2, 0.4, first_order=first_order, nonfinite="skip").meta_step(sx, sy, qx, qy)
    assert result.nonfinite.tolist() == [False, True, False]
    for p, q in zip(skipped.parameters(), clean.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    propagated = copy.deepcopy(model)
    assert MAML(propagated, 2, 0.4, first_order=first_order).meta_step(sx, sy, qx, qy).nonfinite.tolist() == \
        [False, True, False]
    assert not all(torch.isfinite(p.grad).all() for p in propagated.parameters())
    # every task non-finite: NaN losses, no update
    nothing = MAML(model, 2, 0.4, first_order=first_order, nonfinite="skip").meta_step(sx[[1]], sy[[1]], qx[[1]],
                                                                                       qy[[1]])
    assert torch.isnan(nothing.loss) and torch.isnan(nothing.accuracy)
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_adapt_is_plain_sgd_without_proximal_term():
    torch.manual_seed(2)
    model = conv4(hidden=6)
    sx, sy, _, _ = random_tasks(2, shots=2, query=1)
    phi, module = MAML(model, 2, 0.3).adapt(sx, sy)
    for t in range(2):
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(ref.parameters(), lr=0.3)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ref(sx[t]), sy[t]).backward()
            opt.step()
        for a, b in zip(phi, ref.parameters()):
            torch.testing.assert_close(a[t], b.detach(), rtol=1e-10, atol=1e-12)


def test_graph_meter_counts_what_the_graph_keeps():
    x = torch.randn(64, 128, dtype=f64, requires_grad=True)
    w = torch.randn(128, 256, dtype=f64, requires_grad=True)
    with GraphSizeMeter() as meter:
        y = torch.tanh(x @ w)  # matmul saves x and w; tanh saves its output
    expected = (64 * 128 + 128 * 256 + 64 * 256) * 8
    assert meter.bytes == expected
    y.sum().backward()
    assert available_bytes(torch.device("cpu")) > 0


def test_unroll_that_will_not_fit_is_refused_before_running(monkeypatch):
    torch.manual_seed(3)
    model = conv4(hidden=6)
    tasks = random_tasks(2, shots=2, query=1)
    seen = []
    real_check = MAML._check_graph_fits

    def spy(self, step_bytes, device, num_tasks):
        seen.append(step_bytes)
        return real_check(self, step_bytes, device, num_tasks)

    monkeypatch.setattr(MAML, "_check_graph_fits", spy)
    # one forward for every instance: "auto" times its choice per instance, and two forwards keep
    # graphs of different sizes, so a later instance could choose one larger than the measured step
    forward = "loop"
    MAML(model, 2, 0.1, check_labels=False, forward=forward).meta_step(*tasks)
    step_bytes = seen[-1]
    # the measured first step holds at least the saved activations of one forward and backward
    assert step_bytes > 2 * 2 * 6 * 28 * 28 * 8
    model.zero_grad(set_to_none=True)
    # A device with room for about three steps' graphs: 50 steps are refused with the estimate...
    monkeypatch.setattr(maml_module, "available_bytes", lambda device: int(3 * step_bytes / 0.9))
    with pytest.raises(MemoryError, match=r"unrolling 50 inner steps for T = 2 tasks keeps about .* GiB of graph "
                                          r"\(\d+ MiB per step, measured on the first\), but cpu has .* GiB free"):
        MAML(model, 50, 0.1, forward=forward).meta_step(*tasks)
    assert all(p.grad is None for p in model.parameters()), "a refused step must not touch theta's grad"
    MAML(model, 3, 0.1, forward=forward).meta_step(*tasks)  # ...three fit
    # first order keeps no graph across steps: nothing to refuse
    model.zero_grad(set_to_none=True)
    MAML(model, 50, 0.1, first_order=True, forward=forward).meta_step(*tasks)


def test_bad_maml_arguments():
    model = conv4(hidden=4)
    with pytest.raises(TypeError, match=r"MAML: first_order must be a bool; got str 'yes'"):
        MAML(model, first_order="yes")
    with pytest.raises(ValueError, match=r"MAML: memory_fraction must be in \(0, 1\]; got 2"):
        MAML(model, memory_fraction=2)
    with pytest.raises(ValueError, match=r"MAML: inner_lr must be a finite number > 0; got -0.1"):
        MAML(model, inner_lr=-0.1)
