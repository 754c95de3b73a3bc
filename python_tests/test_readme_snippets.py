"""Every fenced snippet of the README and of the pages under docs/ is checked here or says why not.

- A ```python snippet runs on the CPU as written, self-contained; only long loops run shorter
  and "auto" untimed (SHORTER lists each change).
- Any other block (bash, a diff, a file listing) is marked on the line before its fence with
  ``<!-- not run: REASON -->`` (a GPU, long training, a set-up; invisible on the page). A python
  snippet may carry the same mark, and is then skipped with that reason.
- Every ``imaml-train`` (or ``python -m imaml_ext.train``) and ``benchmarks/reproduce.py``
  command in any block, run or not, is parsed by that command's own parser, checks included.
"""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from imaml_ext.training import arguments

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
# What a CPU test shortens, (as written, as run): iteration counts, and "auto"'s timing of each
# forward and HVP at its first call (seconds per shape).
SHORTER = [("range(100)", "range(2)"), ("sample(32)", "sample(4)"), ("sample(100)", "sample(8)"),
           ("inner_steps=16", "inner_steps=2"), ('nonfinite="skip")', 'nonfinite="skip", forward="loop", hvp="reverse")')]


def blocks(page: Path):
    """(language, code, the not-run reason or None) of each fenced block of ``page``."""
    found, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = lines.index("```", index + 1)
        mark = NOT_RUN.match(lines[index - 1]) if index else None
        found.append((fence.group(1), "\n".join(lines[index + 1:end]) + "\n", mark and mark.group(1)))
        index = end + 1
    return found


def all_blocks():
    """(where: "README.md block 3", language, code, reason) for every page."""
    return [(f"{page.relative_to(ROOT)} block {number}", *block)
            for page in PAGES for number, block in enumerate(blocks(page))]


def python_snippets():
    return [(where, code, reason) for where, language, code, reason in all_blocks() if language == "python"]


def commands(program: str):
    """(where, argv) of each shell command of the pages that runs ``program``, continuation lines joined."""
    found = []
    for where, language, code, _ in all_blocks():
        if language not in ("bash", "sh", ""):
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for start, word in enumerate(words):
                if word.endswith(program) or words[start:start + 2] == ["-m", program]:
                    skip = 2 if word == "-m" else 1
                    found.append((where, words[start + skip:]))
                    break
    return found


def test_the_pages_have_snippets_and_commands():
    assert python_snippets() and any(where.startswith("docs/operators.md") for where, _, _ in python_snippets())
    assert commands("imaml-train") and commands("imaml_ext.train")


@pytest.mark.parametrize("where, language, code, reason", all_blocks(), ids=[b[0] for b in all_blocks()])
def test_every_block_runs_or_says_why_not(where, language, code, reason):
    assert language == "python" or reason, (
        f"{where} ({language or 'no language'}) is neither run by a test nor marked "
        f"'<!-- not run: REASON -->' on the line before its fence")


@pytest.mark.parametrize("where, snippet, reason", python_snippets(), ids=[s[0] for s in python_snippets()])
def test_python_snippet_runs(where, snippet, reason, scratch_registry):  # docs/batched-imaml.md registers a forward
    if reason:
        pytest.skip(f"{where}: not run: {reason}")
    for written, shorter in SHORTER:
        snippet = snippet.replace(written, shorter)
    if "omniglot_tasks" in snippet:
        from imaml_ext.data import find_data_root

        try:
            find_data_root()
        except FileNotFoundError as error:
            pytest.skip(str(error))
    if "mini_imagenet_tasks" in snippet:  # not freely redistributable: only where a user has put it
        from imaml_ext.data.mini_imagenet import find_mini_imagenet

        try:
            find_mini_imagenet()
        except FileNotFoundError as error:
            pytest.skip(str(error).splitlines()[0])
    exec(compile(snippet, where, "exec"), {"__name__": "snippet"})  # noqa: S102 (our own README and docs)


def on_this_machine(argv):
    """A documented GPU command, checked on a machine without one: --device cpu, no CUDA graph."""
    if torch.cuda.is_available():
        return list(argv)
    argv = [word for word in argv if word != "--cuda_graph"]
    return ["cpu" if before == "--device" and word.startswith("cuda") else word
            for before, word in zip(["", *argv], argv)]


@pytest.mark.parametrize("where, argv", commands("imaml-train") + commands("imaml_ext.train"),
                         ids=[w for w, _ in commands("imaml-train") + commands("imaml_ext.train")])
def test_documented_training_command_parses(where, argv):
    from imaml_ext import train as train_cli

    train_cli.parse_args(on_this_machine(argv))  # a refusal exits with its one-line message


def reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", module)
    spec.loader.exec_module(module)
    return module


def reproduce_commands():
    """Every reproduce.py command of the pages and of the script's own --help."""
    docstring = [("reproduce.py --help", shlex.split(line, comments=True)[2:])
                 for line in reproduce_module().__doc__.splitlines() if "python benchmarks/reproduce.py" in line]
    return commands("reproduce.py") + docstring


def test_documented_reproduce_commands_parse():
    module = reproduce_module()
    assert len(reproduce_commands()) >= 3
    for where, argv in reproduce_commands():
        own = argv[:argv.index("--")] if "--" in argv else argv
        module.build_parser().parse_args(own)  # an unrecognised argument exits, naming it
        if "--" in argv:
            arguments.build_parser().parse_args(argv[argv.index("--") + 1:])
