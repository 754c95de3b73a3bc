"""Every ```python snippet of the README and of the pages under docs/ runs on the CPU, as
written but for its marked elisions: a line ``name = ...`` stands for a value the reader
brings, which the test supplies (and a new elision fails here until it is given one), and
names the snippet uses without defining (``model``, ``hvp``, ``b``) come from the same table.
Long loops run with fewer iterations, listed in SHORTER."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The pages whose ```python snippets run: the README and every page under docs/.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
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


def page_snippets(page: Path):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def snippets():
    """(where: "README.md snippet 0", "docs/operators.md snippet 0", ..., code) for every page."""
    return [(f"{page.relative_to(ROOT)} snippet {index}", code)
            for page in PAGES for index, code in enumerate(page_snippets(page))]


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
    assert page_snippets(README)
    assert len(snippets()) >= 2


@pytest.mark.parametrize("where, snippet", snippets(), ids=[where for where, _ in snippets()])
def test_readme_snippet_runs(where, snippet):
    code, elided = prepare(snippet)
    namespace = {}
    if "model" in code and not re.search(r"^\s*model\s*=", code, flags=re.M):
        namespace["model"] = SUPPLIED["model"]()
    for name in elided:
        assert name in SUPPLIED, f"{where} elides {name!r}: give the test a value for it"
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
    if "mini_imagenet_tasks" in code:  # not freely redistributable: only where a user has put it
        from imaml_ext.data.mini_imagenet import find_mini_imagenet

        try:
            find_mini_imagenet()
        except FileNotFoundError as error:
            pytest.skip(str(error).splitlines()[0])
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 (our own README and docs)
