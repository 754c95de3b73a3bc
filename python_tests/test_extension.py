"""The compiled extension is found, and its absence is said once, not hidden."""

import warnings

import pytest
import torch

import imaml_ext.ops as ops
from imaml_ext.ops import _extension, reference


def test_cpu_kernels_are_built():
    assert _extension.LOAD_ERROR is None, f"imaml_ext._C failed to load: {_extension.LOAD_ERROR}"
    assert ops.has_compiled_kernels("cpu")


def test_missing_extension_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_extension, "_warned", set())
    calls = []
    original = reference.prox_sgd_step_
    monkeypatch.setattr(reference, "prox_sgd_step_", lambda *a: (calls.append(1), original(*a)))
    params = [torch.randn(2, 3, dtype=torch.float64)]
    expected = [params[0].clone()]
    grads, anchors = [torch.randn(2, 3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.prox_sgd_step_(params, grads, anchors, 0.1, 0.2)
        ops.prox_sgd_step_(params, grads, anchors, 0.1, 0.2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "simulated" in messages[0] and "make build" in messages[0] and "pure-PyTorch reference" in messages[0]
    assert len(calls) == 2
    original(expected, grads, anchors, [], 0.1, 0.2, 0.0, None, None)
    original(expected, grads, anchors, [], 0.1, 0.2, 0.0, None, None)
    torch.testing.assert_close(params[0], expected[0], rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA-kernels message on CPU-only machines")
def test_cuda_kernels_registered_when_built_with_cuda():
    # The CI build forces the CUDA kernels (IMAML_EXT_FORCE_CUDA=1): they must
    # be registered even though they cannot run here.
    import os

    if os.environ.get("IMAML_EXT_EXPECT_CUDA_KERNELS") != "1":
        pytest.skip("set IMAML_EXT_EXPECT_CUDA_KERNELS=1 when the build forced the CUDA kernels")
    assert ops.has_compiled_kernels("cuda")


def test_unbuilt_extension_is_called_not_built_not_a_circular_import(tmp_path):
    """A source tree without the compiled _C: Python's ImportError blames a "circular import";
    the warning must say the extension is not built, and how to build it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(_extension.__file__).resolve().parents[1]
    shutil.copytree(package, tmp_path / "imaml_ext", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # The editable install (make) maps imaml_ext's submodules to the checkout: without its finder,
    # the copy's missing _C stays missing, as in a source tree that was never built.
    code = ("import sys\n"
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import warnings, torch, imaml_ext.ops as ops\n"
            "warnings.simplefilter('always')\n"
            "p = [torch.zeros(1, 2)]\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ops.prox_sgd_step_(p, [torch.ones(1, 2)], [torch.zeros(2)], 0.1, 0.2)\n"
            "print(ops._extension.__file__)\n"
            "print([str(x.message) for x in w])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(tmp_path) in proc.stdout  # the copy ran, not the built package
    assert "imaml_ext._C is not built (there is no _C." in proc.stdout and "make build" in proc.stdout
    assert "circular" not in proc.stdout and "partially initialized" not in proc.stdout
