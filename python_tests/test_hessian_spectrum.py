"""benchmarks/hessian_spectrum.py: its Lanczos and its per-task Hessian-vector product, against a
dense float64 Hessian and its exact eigenvalues."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hessian_spectrum  # noqa: E402
from imaml_ext.models import Conv4  # noqa: E402


def test_lanczos_run_to_the_dimension_gives_the_exact_extremes():
    dim = 40
    a = torch.randn(dim, dim, dtype=torch.float64)
    a = a + a.T - 3 * torch.eye(dim, dtype=torch.float64)  # indefinite, as H at phi can be
    exact = torch.linalg.eigvalsh(a)
    low, high = hessian_spectrum.lanczos_extremes(lambda v: a @ v, dim, dim, torch.Generator().manual_seed(0))
    assert abs(low - exact[0].item()) < 1e-8 and abs(high - exact[-1].item()) < 1e-8
    # fewer iterations: Ritz values stay inside the spectrum
    low, high = hessian_spectrum.lanczos_extremes(lambda v: a @ v, dim, 8, torch.Generator().manual_seed(1))
    assert exact[0].item() - 1e-10 <= low and high <= exact[-1].item() + 1e-10


def test_task_hvp_is_the_support_loss_hessian_and_its_extremes_are_found():
    model = Conv4(5, 2).double()
    x, y = torch.randn(5, 1, 28, 28, dtype=torch.float64), torch.randperm(5)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat = flat + 0.1 * torch.randn(flat.numel(), dtype=torch.float64)

    def loss(v):
        params = {n: p.view(s) for n, p, s in zip(names, v.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    hvp = hessian_spectrum.task_hvp(model, names, shapes, flat, x, y)
    v = torch.randn(flat.numel(), dtype=torch.float64)
    torch.testing.assert_close(hvp(v), dense @ v, rtol=1e-9, atol=1e-11)
    exact = torch.linalg.eigvalsh(dense)
    low, high = hessian_spectrum.lanczos_extremes(hvp, flat.numel(), flat.numel(), torch.Generator().manual_seed(0))
    assert abs(low - exact[0].item()) < 1e-7 and abs(high - exact[-1].item()) < 1e-7


@pytest.mark.parametrize("argv, named", [(["--tasks", "0"], "--tasks"), (["--lanczos", "-1"], "--lanczos"),
                                         (["--checkpoint", "no/such/checkpoint.pt"], "--checkpoint")])
def test_bad_arguments_end_in_one_line_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        hessian_spectrum.main(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err
