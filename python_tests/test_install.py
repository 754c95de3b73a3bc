"""`make` installs imaml_ext into .venv (editable): the imaml-train command and `import imaml_ext`
work from any folder. Skipped where the tests do not run from the checkout's .venv that `make`
built (CI runs them through `make test`, where they run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"


@pytest.fixture(scope="module")
def venv():
    if Path(sys.prefix).resolve() != VENV.resolve() or not (VENV / ".extension-built").exists():
        pytest.skip(f"not running from {VENV} built by make (sys.prefix is {sys.prefix})")
    return VENV


def outside_env():
    """The environment without anything that would find the checkout other than the install."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_console_script_runs_from_another_folder(venv, tmp_path):
    script = venv / "bin" / "imaml-train"
    assert script.exists(), f"{script} is missing: make should have installed imaml_ext into {venv}"
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, env=outside_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: imaml-train") and "--preset" in done.stdout


def test_package_imports_from_another_folder(venv, tmp_path):
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import imaml_ext, imaml_ext._C; print(imaml_ext.__file__)"],
                          cwd=tmp_path, env=outside_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (ROOT / "imaml_ext" / "__init__.py").resolve()
