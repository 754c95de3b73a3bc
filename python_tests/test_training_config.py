"""The typed run configuration (imaml_ext/training/config.py): one field per option, the same
recorded configuration as the argparse namespace it replaced, and runs written before it still
resume and evaluate. Runs needing Omniglot skip when it is absent."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from imaml_ext import train as train_cli
from imaml_ext.training import arguments
from imaml_ext.training.config import RunConfig
from imaml_ext.training.errors import RunError
from imaml_ext.training.run_folder import CONFIG_METADATA

from test_train import checkpoint, data_root, rows_without_timing  # noqa: F401  (data_root: a fixture)

ROOT = Path(__file__).resolve().parents[1]
# Written by imaml-train at 3cd93c2, before RunConfig, with FIXTURE_ARGV and --stop_after 2: the
# checkpoint at step 2 of 4, its config.json and metrics.jsonl.
FIXTURE = ROOT / "python_tests" / "fixtures" / "run-before-runconfig"
FIXTURE_ARGV = ["--hidden_size", "8", "--meta_batch_size", "2", "--inner_steps", "2", "--cg_iterations", "2",
                "--steps", "4", "--log_every", "2", "--checkpoint_every", "2", "--eval_tasks", "4", "--valid_every",
                "0", "--query", "2", "--no-progress", "--forward", "loop", "--hvp", "reverse", "--device", "cpu"]


def test_one_typed_field_per_option():
    parser = arguments.build_parser()
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = typing.get_type_hints(RunConfig)
    assert list(fields) == [f.name for f in dataclasses.fields(RunConfig)]
    assert set(fields) == set(options)
    for name, action in options.items():
        if action.type in (int, float):  # Optional[int] where the option's default is None
            assert fields[name] in (action.type, typing.Optional[action.type]), name
        elif isinstance(action.default, bool):
            assert fields[name] is bool, name
    assert type(train_cli.parse_args(["--device", "cpu"])) is RunConfig


def test_a_committed_run_records_the_keys_a_run_records_now():
    """config.json of a run of the 5-way 5-shot preset (library code d281875): the same keys as a run
    started now records, but --eval_query, added since (an evaluation option, never compared)."""
    saved = json.loads((ROOT / "benchmarks/results/runs/repro-5w5s-cpu-h32-800/config.json").read_text())
    saved = {k: v for k, v in saved.items() if k not in CONFIG_METADATA}
    now = train_cli.parse_args(["--preset", "omniglot-5w5s", "--device", "cpu"]).recorded()
    assert set(saved) | {"eval_query"} == set(now)
    loaded = arguments.recorded_run(saved, "the checkpoint").recorded()
    assert loaded == {**saved, "eval_query": None}


def test_an_older_run_gets_the_values_of_the_options_added_since():
    saved = json.loads((ROOT / "benchmarks/results/runs/repro-5w1s-cpu-h32-3k/config.json").read_text())
    saved = {k: v for k, v in saved.items() if k not in CONFIG_METADATA}
    assert not {"hvp", "model", "tf32"} & set(saved)  # from before those options
    loaded = arguments.recorded_run(saved, "the checkpoint").recorded()
    assert loaded == {**saved, "precision": "fp32", "model": "conv4", "hvp": "auto", "tf32": "torch",
                      "eval_query": None}


def test_a_recorded_option_this_command_line_lacks_is_named():
    with pytest.raises(RunError, match=r"^--evaluate: x/checkpoint.pt records --warp, which is no option of this "
                                       r"imaml-train$"):
        arguments.recorded_run({"warp": 9, "ways": 5}, "--evaluate: x/checkpoint.pt")


def test_a_run_checkpointed_before_the_run_config_resumes_and_evaluates(tmp_path, data_root, capsys):
    """The fixture's checkpoint resumes to the uninterrupted run's rows and results, and --evaluate
    reads it. The fixture's first two steps ran on the machine that wrote it: another CPU or thread
    count rounds them differently (bit-for-bit resume within one machine is test_train's), so the
    rows are compared to float32 rounding, the rows it kept exactly."""
    resumed = tmp_path / "resumed"
    shutil.copytree(FIXTURE, resumed)
    kept = rows_without_timing(resumed)
    assert checkpoint(resumed)["config"] == train_cli.parse_args(FIXTURE_ARGV).recorded()
    assert train_cli.main([*FIXTURE_ARGV, "--data", data_root, "--out", str(resumed), "--resume"]) == 0
    fresh = tmp_path / "fresh"
    assert train_cli.main([*FIXTURE_ARGV, "--data", data_root, "--out", str(fresh)]) == 0
    rows, expected = rows_without_timing(resumed), rows_without_timing(fresh)
    assert rows[:len(kept)] == kept and [r["step"] for r in rows] == [r["step"] for r in expected] == [2, 4]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        assert all(row[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v) for k, v in want.items())
    a, b = (json.loads((out / "results.json").read_text()) for out in (resumed, fresh))
    assert a["test"]["accuracy"] == pytest.approx(b["test"]["accuracy"], abs=1e-6) and a["baseline"] == b["baseline"]
    evaluated = tmp_path / "evaluated"
    shutil.copytree(FIXTURE, evaluated)
    assert train_cli.main(["--evaluate", str(evaluated), "--eval_tasks", "4", "--data", data_root,
                           "--device", "cpu", "--no-progress"]) == 0
    assert "checkpoint at meta-step 2 of" in capsys.readouterr().out
