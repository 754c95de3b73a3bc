"""Every ```python snippet of the README runs on the CPU, as written but for its marked
elisions: a line ``name = ...`` stands for a value the reader brings, which the test
supplies (and a new elision fails here until it is given one), and names the snippet uses
without defining (``model``, ``hvp``, ``b``) come from the same table. Long loops run with
fewer iterations, listed in SHORTER."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
T = 32

# What the reader brings, by name (built for the snippet that names them).
SUPPLIED = {
    "model": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
    "grads": lambda ns: [torch.randn(T, *p.shape) for p in ns["model"].parameters()],
    "hvp": lambda ns: (lambda v: [2.0 * t for t in v]),
    "b": lambda ns: [torch.randn(T, *p.shape) for p in ns["model"].parameters()],
}
# Iteration counts a CPU test shortens: (as written, as run).
SHORTER = [("range(100)", "range(2)"), ("sample(32)", "sample(4)"), ("sample(100)", "sample(8)")]


def snippets():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def prepare(code: str):
    """(code without its elided lines, the elided names, the names it uses but never binds)."""
    elided, kept = [], []
    for line in code.splitlines():
        match = re.match(r"\s*(\w+)\s*=\s*\.\.\.\s*(#.*)?$", line)
        if match:
            elided.append(match.group(1))
        else:
            kept.append(line)
    code = "\n".join(kept)
    for written, run in SHORTER:
        code = code.replace(written, run)
    return code, elided


def test_the_readme_has_python_snippets():
    assert len(snippets()) >= 2


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index):
    code, elided = prepare(snippets()[index])
    namespace = {}
    if "model" in code and not re.search(r"^\s*model\s*=", code, flags=re.M):
        namespace["model"] = SUPPLIED["model"]()
    for name in elided:
        assert name in SUPPLIED, f"README snippet {index} elides {name!r}: give the test a value for it"
        namespace[name] = SUPPLIED[name](namespace)
    for name in ("hvp", "b"):
        if re.search(rf"\b{name}\b", code) and not re.search(rf"^\s*{name}\s*=", code, flags=re.M):
            namespace[name] = SUPPLIED[name](namespace)
    if "omniglot_tasks" in code:
        from imaml_ext.data import find_data_root

        try:
            find_data_root()
        except FileNotFoundError as error:
            pytest.skip(str(error))
    exec(compile(code, f"README.md snippet {index}", "exec"), namespace)  # noqa: S102 (our own README)
