"""benchmarks/demo_seeds.py: the mean and spread over seeds from run folders (made here, not trained)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_seeds  # noqa: E402


def fake_run(folder: Path, seed: int, accuracy: float, baseline: float, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "steps": 200, "device": "cpu", **config}))
    (folder / "results.json").write_text(json.dumps({
        "test": {"accuracy": accuracy, "ci95": 0.7, "tasks": 600},
        "baseline": {"accuracy": baseline, "ci95": 1.1, "tasks": 600}}))
    return folder


def test_collect_writes_each_seed_and_the_mean_and_spread(tmp_path):
    values = [87.1, 86.7, 85.7]
    folders = [fake_run(tmp_path / f"s{i}", i, v, 60.0 + i) for i, v in enumerate(values)]
    out = tmp_path / "out"
    demo_seeds.main(["--collect", *map(str, folders), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1, 2]
    assert result["test"]["mean"] == pytest.approx(statistics.fmean(values))
    assert result["test"]["std"] == pytest.approx(statistics.stdev(values))
    assert result["baseline"]["mean"] == pytest.approx(61.0)
    assert "86.50 %" in out.with_suffix(".md").read_text()


def test_runs_that_differ_in_more_than_their_seed_are_refused(tmp_path):
    a = fake_run(tmp_path / "a", 0, 87.0, 60.0)
    b = fake_run(tmp_path / "b", 1, 86.0, 60.0, steps=300)
    with pytest.raises(SystemExit, match="the runs differ in more than their seed: steps"):
        demo_seeds.main(["--collect", str(a), str(b), "--out", str(tmp_path / "out")])


def test_collect_takes_no_training_options(tmp_path):
    a = fake_run(tmp_path / "a", 0, 87.0, 60.0)
    with pytest.raises(SystemExit, match="--collect reads finished run folders"):
        demo_seeds.main(["--collect", str(a), "--", "--steps", "5"])


def test_collect_of_a_folder_that_is_not_a_finished_run_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty has no config.json; is it a finished imaml-train run folder"):
        demo_seeds.main(["--collect", str(tmp_path / "empty")])
    a = fake_run(tmp_path / "a", 0, 87.0, 60.0)
    with pytest.raises(SystemExit, match="--collect reads finished run folders"):
        demo_seeds.main(["--collect", str(a), "--seeds", "3"])
