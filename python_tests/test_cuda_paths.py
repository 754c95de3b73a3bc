"""What the CPU suite cannot reach, on a CUDA device (skipped without one; `make gpu-check`
runs it): MAML's unroll, damped and masked iMAML, the Betty-API engine, CUDA-graph capture
of those, and the training command line, each against float64 CPU results or eager runs."""

import copy
import json

import pytest
import torch

from imaml_ext import IMAML, MAML
from imaml_ext import train as train_cli
from imaml_ext.data import find_data_root
from test_batched import conv4, random_tasks, sequential_meta_gradient

pytestmark = pytest.mark.cuda


def cuda(tensors):
    return [t.cuda() for t in tensors]


def assert_grads_close(a, b, rtol, atol):
    for name, p, q in zip([n for n, _ in a.named_parameters()], a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_on_cuda_equals_cpu_float64(first_order):
    model = conv4(hidden=6)
    tasks = random_tasks(3, shots=2, query=3)
    on_cpu, on_gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    expected = MAML(on_cpu, 3, 0.4, first_order=first_order, forward="loop").meta_step(*tasks)
    got = MAML(on_gpu, 3, 0.4, first_order=first_order, forward="vmap").meta_step(*cuda(tasks))
    assert_grads_close(on_gpu, on_cpu, rtol=1e-8, atol=1e-11)
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-10)


def test_damped_and_masked_imaml_on_cuda_equals_cpu_float64():
    model = conv4(hidden=6)
    sx, sy, qx, qy = random_tasks(4, shots=1, query=2)
    sx[1, 0, 0, 3, 3] = float("nan")  # task 1 is masked on the device, the others solved with damping
    options = dict(cg_damping=1.0, lam_damping=10.0, nonfinite="skip")
    on_cpu, on_gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    expected = IMAML(on_cpu, 3, 0.1, 2.0, 4, forward="loop", **options).meta_step(sx, sy, qx, qy)
    got = IMAML(on_gpu, 3, 0.1, 2.0, 4, forward="vmap", **options).meta_step(*cuda((sx, sy, qx, qy)))
    assert expected.nonfinite.tolist() == got.nonfinite.cpu().tolist() == [False, True, False, False]
    assert torch.equal(got.cg.iterations.cpu(), expected.cg.iterations)
    assert_grads_close(on_gpu, on_cpu, rtol=1e-8, atol=1e-11)


def test_betty_api_engine_on_cuda_equals_cpu_float64():
    model = conv4(hidden=6)
    tasks = random_tasks(2)
    expected = sequential_meta_gradient(model, tasks, 3, 0.1, 2.0, 3)
    got = sequential_meta_gradient(copy.deepcopy(model).cuda(), cuda(tasks), 3, 0.1, 2.0, 3, device="cuda")
    for g, e in zip(got, expected):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), e, rtol=1e-8, atol=1e-11)


def test_capture_of_damped_and_masked_meta_step_equals_eager():
    """A host synchronisation anywhere in the masked, damped step would make capture fail."""
    torch.manual_seed(0)
    model = conv4(hidden=16, dtype=torch.float32).cuda()
    imaml = IMAML(model, 3, 0.1, 2.0, 3, forward="vmap", cg_damping=1.0, lam_damping=10.0, nonfinite="skip")
    poisoned = cuda(random_tasks(4, dtype=torch.float32))
    poisoned[0][2, 0, 0, 7, 7] = float("nan")
    clean = cuda(random_tasks(4, dtype=torch.float32))
    captured = imaml.capture(*clean)
    for batch in (poisoned, clean):
        model.zero_grad()
        eager = imaml.meta_step(*batch)
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        replayed = captured.step(*batch)
        assert torch.equal(replayed.nonfinite, eager.nonfinite)
        for g, e in zip([p.grad for p in model.parameters()], expected):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert eager.nonfinite.tolist() == [False] * 4 and replayed.nonfinite.tolist() == [False] * 4


@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_training_command_line_on_cuda(tmp_path, algo):
    try:
        data = str(find_data_root())
    except FileNotFoundError as error:
        pytest.skip(f"Omniglot not found: {error}")
    tiny = ["--hidden_size", "8", "--meta_batch_size", "4", "--inner_steps", "2",
            "--query", "2", "--steps", "4", "--log_every", "2", "--valid_every", "4", "--valid_tasks", "4",
            "--eval_tasks", "8", "--eval_batch", "4", "--no-progress", "--device", "cuda", "--data", data,
            "--algo", algo] + (["--cg_iterations", "2"] if algo == "imaml" else [])  # maml refuses it
    runs = {"eager": []} if algo == "maml" else {"eager": [], "graph": ["--cuda_graph"]}
    first_rows = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert train_cli.main([*tiny, "--out", str(out), *extra]) == 0
        assert json.loads((out / "config.json").read_text())["device"] == "cuda"
        assert 0.0 <= json.loads((out / "results.json").read_text())["test"]["accuracy"] <= 100.0
        first_rows[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    if "graph" in first_rows:
        # The first log window: the replayed step's loss equals eager's to float32 rounding.
        assert first_rows["graph"]["loss"] == pytest.approx(first_rows["eager"]["loss"], rel=1e-3)


def test_bf16_capture_equals_eager_and_runs_in_bf16():
    torch.manual_seed(0)
    model = conv4(hidden=16, dtype=torch.float32).cuda()
    options = dict(forward="vmap", cg_damping=1.0, lam_damping=10.0)
    batch = cuda(random_tasks(4, dtype=torch.float32))
    fp32 = copy.deepcopy(model)
    IMAML(fp32, 3, 0.1, 2.0, 3, **options).meta_step(*batch)
    imaml = IMAML(model, 3, 0.1, 2.0, 3, precision="bf16", **options)
    captured = imaml.capture(*batch)
    imaml.meta_step(*batch)
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    captured.step(*batch)
    for g, e in zip([p.grad for p in model.parameters()], eager):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)
    flat = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])  # noqa: E731
    assert 1e-4 < float((flat(model) - flat(fp32)).norm() / flat(fp32).norm()) < 1.5  # bf16 ran, and nothing wild


def test_fp16_capture_carries_the_loss_scale_across_replays():
    """The scale lives on the device and is updated in place, so replays go on backing off."""
    model = conv4(hidden=8, dtype=torch.float32).cuda()
    imaml = IMAML(model, 1, 0.1, 2.0, 2, forward="vmap", precision="fp16", nonfinite="skip", loss_scale=2.0**40,
                  cg_damping=1.0, lam_damping=10.0)
    batch = cuda(random_tasks(2, dtype=torch.float32))
    captured = imaml.capture(*batch)  # its warm-up steps already halved the scale
    scales, overflowed = [], []
    for _ in range(4):
        result = captured.step(*batch)  # the graph's own tensors: read before the next replay
        scales.append(result.loss_scale.item())
        overflowed.append(bool(result.nonfinite.all()))
    assert all(overflowed)
    assert scales == [scales[0] / 2**k for k in range(4)] and scales[0] < 2.0**40
    assert imaml.loss_scale("cuda").item() == scales[-1] / 2
