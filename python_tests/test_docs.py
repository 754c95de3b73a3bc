"""The README, docs/ and --help say one thing: the defaults are not the paper's setting, the
preset is; the README's batched snippet writes out the command line's defaults; its list of a run
folder's files is complete; the evaluation protocol is linked. (test_readme_snippets.py runs the
snippets themselves.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from imaml_ext import train as train_cli
from imaml_ext.training import arguments, presets
from imaml_ext.training.run_folder import RunFolder
from imaml_ext.training.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TRAINING = (ROOT / "docs" / "training.md").read_text()
TEXTS = {"README.md": README, "--help": arguments.DESCRIPTION, "presets.py": presets.__doc__,
         **{f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}}


@pytest.mark.parametrize("where", TEXTS)
def test_no_text_calls_the_defaults_the_papers_setting(where):
    claim = re.search(r"defaults\s+are\s+(the\s+)?(iMAML\s+)?paper's", TEXTS[where], flags=re.I)
    assert claim is None, f"{where}: {claim.group(0)!r}: the paper's setting is --preset, not the defaults"


def test_the_paper_scale_command_is_the_preset():
    section = TRAINING.split("## Paper scale", 1)[1]
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ").split()
    argv = [w for w in command[command.index("imaml_ext.train") + 1:] if w != "--cuda_graph"]
    argv = ["cpu" if before == "--device" else w for before, w in zip(["", *argv], argv)]
    documented = train_cli.parse_args(argv).recorded()
    preset = train_cli.parse_args(["--preset", "omniglot-5w1s", "--device", "cpu"]).recorded()
    assert documented == preset


def test_the_readme_batched_snippet_writes_out_the_command_lines_defaults():
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "imaml_ext.IMAML(" in s)
    written = {name: ast.literal_eval(value) for name, value in re.findall(r"(\w+)=([\w.\"'-]+)", snippet)
               if name not in ("device", "model")}
    written["meta_batch_size"] = int(re.search(r"train\.sample\((\d+)\)", snippet).group(1))
    cli = vars(train_cli.parse_args(["--device", "cpu"]))
    spelling = {"inner_lr": "base_lr", "lr": "meta_lr", "protocol": "split"}
    for name, value in written.items():
        if name != "nonfinite":  # the command line always leaves a non-finite task out
            assert cli[spelling.get(name, name)] == value, f"README snippet: {name}={value!r}, imaml-train: {cli}"
    assert written["inner_steps"] == cli["inner_steps"] and written["nonfinite"] == "skip"


def test_the_readme_lists_every_file_of_a_run_folder():
    section = README.split("A run folder (`--out`) can hold:", 1)[1].split("\n\n", 1)[0]
    folder = RunFolder("run")
    names = [p.name for p in vars(folder).values() if p != folder.path]
    names += ["evaluations.jsonl", "results-<N>-steps.json", "checkpoint.new.pt", LOCK_NAME]  # named elsewhere
    for name in names:
        assert f"`{name}" in section, f"the README's run-folder list omits {name}"
        assert f"`{name}" in TRAINING, f"docs/training.md's run-folder list omits {name}"


def test_the_accuracy_protocol_is_linked():
    assert (ROOT / "docs" / "accuracy-protocol.md").exists()
    assert "(docs/accuracy-protocol.md)" in README and "(accuracy-protocol.md)" in TRAINING
