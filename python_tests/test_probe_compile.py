"""benchmarks/probe_compile.py refuses bad arguments by name before it builds or compiles anything."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_compile.py"


@pytest.mark.parametrize("args, said", [
    (["--tasks", "0"], "--tasks must be >= 1; got 0"),
    (["--repeats", "0"], "--repeats must be >= 1; got 0"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_are_refused_by_name(args, said, tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and said in proc.stderr
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cuda: no CUDA device here" in proc.stderr
