"""benchmarks/reproduce.py collects a finished run folder into the accuracy file, and
benchmarks/report.py reads that file back into the machine's report (synthetic run folders)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reproduce():
    return load("reproduce")


@pytest.fixture(scope="module")
def report():
    return load("report")


def run_folder(path: Path, finished: bool = True, invocations: bool = True) -> Path:
    """A run folder as imaml-train leaves it, with made-up numbers."""
    from imaml_ext import train as train_cli

    path.mkdir(parents=True)
    args = train_cli.parse_args(["--preset", "omniglot-5w1s", "--steps", "40", "--device", "cpu", "--out", str(path)])
    config = {**args.recorded(), "preset": "omniglot-5w1s", "imaml_ext": "0.1.0", "torch": "2.x"}
    (path / "config.json").write_text(json.dumps(config))
    rows = [{"split": "train", "step": 20, "loss": 1.0, "accuracy": 0.6, "tasks_per_s": 32.0},
            {"split": "validation", "step": 20, "loss": 0.9, "accuracy": 0.7, "best_accuracy": 0.7},
            {"split": "train", "step": 40, "loss": 0.5, "accuracy": 0.8, "tasks_per_s": 64.0},
            {"split": "validation", "step": 40, "loss": 0.4, "accuracy": 0.9, "best_accuracy": 0.9}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows if finished else rows[:2])))
    if invocations:
        (path / "invocations.jsonl").write_text(json.dumps({"from_step": 0, "to_step": 25, "seconds": 60.0}) + "\n"
                                                + json.dumps({"from_step": 25, "to_step": 40, "seconds": 30.0}) + "\n")
    if finished:
        results = {"out": str(path), "steps": 40, "machine": "CPU (x86_64, 2 cores), torch 2.x", "date": "2026-11-30",
                   "eval_lam": 2.0, "test": {"accuracy": 91.5, "ci95": 0.6, "tasks": 600, "seconds": 9.0},
                   "baseline": {"accuracy": 60.25, "ci95": 0.9, "tasks": 600}}
        (path / "results.json").write_text(json.dumps(results))
    return path


def test_collect_writes_the_accuracy_file_and_the_report_reads_it(tmp_path, reproduce, report, monkeypatch):
    run = run_folder(tmp_path / "runs" / "a")
    out = tmp_path / "results"
    assert reproduce.main(["--collect", str(run), "--results", str(out)]) == 0
    path = out / "accuracy-cpu-2cores-2026-11-30.json"
    data = json.loads(path.read_text())
    (entry,) = data["entries"]
    assert {k: entry[k] for k in ("task", "ways", "shots", "steps", "accuracy", "ci95", "tasks", "paper", "betty",
                                  "finished", "preset")} == {
        "task": "omniglot", "ways": 5, "shots": 1, "steps": 40, "accuracy": 91.5, "ci95": 0.6, "tasks": 600,
        "paper": 99.16, "betty": 98.68, "finished": True, "preset": "omniglot-5w1s"}
    assert entry["baseline"]["accuracy"] == 60.25 and entry["device"].startswith("CPU (x86_64, 2 cores)")
    assert entry["wall_seconds"] == 90.0 and entry["curve"] == [[20, 70.0], [40, 90.0]]
    assert entry["settings"]["inner_steps"] == 16 and entry["settings"]["eval_lam"] == 2.0
    md = path.with_suffix(".md").read_text()
    assert ("| 5-way 1-shot (omniglot-5w1s) | 40 | 91.50 ± 0.60 % (600 tasks) | 60.25 ± 0.90 % | not evaluated | "
            "99.16 % | 98.68 % |") in md
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.setattr(report, "RESULTS", out)
    assert "cpu-2cores" in report.machines()
    report.main(["--machine", "cpu-2cores"])
    text = (out / "cpu-2cores-2026-11-30.md").read_text()
    assert "Omniglot meta-test accuracy" in text and "91.50 ± 0.60 %" in text and "99.16 %" in text
    assert "accuracy-cpu-2cores-2026-11-30.json" in text
    assert json.loads((out / "cpu-2cores-2026-11-30.json").read_text())["accuracy"][0][2].startswith("91.50")
    assert (out / "cpu-2cores-2026-11-30-accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_the_authors_protocol_column_reads_the_matching_evaluation(tmp_path, reproduce, report):
    """An --evaluate of the final checkpoint with as many query images per class as shots and
    lambda 0 (the iMAML authors' measure_accuracy.py) fills its column; others do not."""
    run = run_folder(tmp_path / "runs" / "a")

    def evaluation(step, eval_lam, query, accuracy):
        return {"step": step, "steps": 40, "eval_lam": eval_lam, "eval_query": query, "shots": 1,
                "test": {"accuracy": accuracy, "ci95": 0.5, "tasks": 600},
                "baseline": {"accuracy": 70.0, "ci95": 1.0, "tasks": 600}}

    rows = [evaluation(40, 2.0, 1, 95.0), evaluation(40, 0.0, 5, 94.0), evaluation(20, 0.0, 1, 93.0),
            evaluation(40, 0.0, 1, 92.25)]
    (run / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = reproduce.collect(run)
    assert entry["authors_protocol"]["accuracy"] == 92.25 and entry["authors_protocol"]["query"] == 1
    row = report.accuracy_rows([entry])[0]
    assert row[4] == "92.25 ± 0.50 % (70.00 ± 1.00 %)"


def test_unfinished_run_and_run_without_invocations(tmp_path, reproduce):
    entry = reproduce.collect(run_folder(tmp_path / "b", finished=False, invocations=False))
    assert not entry["finished"] and entry["accuracy"] is None and entry["steps_done"] == 20
    assert entry["wall_seconds"] == pytest.approx(20 * 32 / 32.0)  # from the metrics' tasks/s
    assert entry["wall_time_source"].startswith("metrics.jsonl")


def test_collect_a_folder_that_is_not_a_run(tmp_path, reproduce, capsys):
    assert reproduce.main(["--collect", str(tmp_path), "--results", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_machine_tags(reproduce):
    assert reproduce.machine_tag("CPU (x86_64, 2 cores), torch 2.14.1") == "cpu-2cores"
    assert reproduce.machine_tag("NVIDIA H200, torch 2.14.1") == "NVIDIA-H200"
