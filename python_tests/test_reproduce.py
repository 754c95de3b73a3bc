"""benchmarks/reproduce.py collects a finished run folder into the accuracy file, and
benchmarks/report.py reads that file back into the machine's report (synthetic run folders)."""

from __future__ import annotations

import importlib.util
import json
import math
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


def evaluation(accuracy, eval_lam, query, step=40, baseline=70.0):
    """A row of evaluations.jsonl (imaml-train --evaluate) or the test part of results.json."""
    return {"step": step, "steps": 40, "eval_lam": eval_lam, "eval_query": query, "shots": 1,
            "test": {"accuracy": accuracy, "ci95": 0.5, "tasks": 600},
            "baseline": {"accuracy": baseline, "ci95": 1.0, "tasks": 600}}


def run_folder(path: Path, finished: bool = True, invocations: bool = True, seed: int = 0, steps: int = 40,
               results: tuple = (91.5, 2.0, 5, 60.25), evaluations: tuple = (), extra: tuple = ()) -> Path:
    """A run folder as imaml-train leaves it, with made-up numbers: 5-way 1-shot, 5 query images per
    class, lambda 2; ``results`` is results.json's (accuracy, eval_lam, eval_query, baseline),
    ``evaluations`` rows of evaluations.jsonl."""
    from imaml_ext import train as train_cli

    path.mkdir(parents=True)
    args = train_cli.parse_args(["--ways", "5", "--shots", "1", "--query", "5", "--steps", str(steps), "--seed",
                                 str(seed), "--device", "cpu", "--out", str(path), *extra])
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
        accuracy, eval_lam, query, baseline = results
        test = evaluation(accuracy, eval_lam, query, baseline=baseline)
        (path / "results.json").write_text(json.dumps({
            "out": str(path), "steps": steps, "machine": "CPU (x86_64, 2 cores), torch 2.x", "date": "2026-11-30",
            "eval_lam": eval_lam, "eval_query": query, "test": {**test["test"], "ci95": 0.6, "seconds": 9.0},
            "baseline": {**test["baseline"], "ci95": 0.9}}))
    if evaluations:
        (path / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    return path


def test_collect_writes_the_accuracy_file_and_the_report_reads_it(tmp_path, reproduce, report, monkeypatch):
    run = run_folder(tmp_path / "runs" / "a")
    out = tmp_path / "results"
    assert reproduce.main(["--collect", str(run), "--results", str(out)]) == 0
    path = out / "accuracy-cpu-2cores-2026-11-30.json"
    data = json.loads(path.read_text())
    (entry,) = data["entries"]
    assert {k: entry[k] for k in ("task", "ways", "shots", "steps", "paper", "betty", "preset", "seeds_run",
                                  "seeds_finished")} == {
        "task": "omniglot", "ways": 5, "shots": 1, "steps": 40, "paper": 99.16, "betty": 98.68,
        "preset": "omniglot-5w1s", "seeds_run": 1, "seeds_finished": 1}
    assert entry["ours"] == {"query": 5, "eval_lam": 2.0, "seeds": 1, "of": 1, "tasks": [600], "mean": 91.5,
                             "std": None, "ci95": 0.6,
                             "baseline": {"seeds": 1, "mean": 60.25, "std": None, "ci95": 0.9}}
    assert entry["authors"]["seeds"] == 0 and entry["authors"]["query"] == 1 and entry["authors"]["eval_lam"] == 0
    (seed,) = entry["seeds"]
    assert seed["seed"] == 0 and seed["run"] == str(run) and seed["ours"]["source"] == "results.json"
    assert seed["device"].startswith("CPU (x86_64, 2 cores)") and seed["authors"] is None
    assert seed["wall_seconds"] == 90.0 and seed["curve"] == [[20, 70.0], [40, 90.0]]
    assert entry["settings"]["inner_steps"] == 16 and entry["wall_seconds_per_seed"] == 90.0
    md = path.with_suffix(".md").read_text()
    assert ("| 5-way 1-shot (omniglot-5w1s) | 1: 0 | 40, Conv4-64, 2 min | 5, λ 2, 600 | "
            "91.50 ± 0.60 % (1 seed, 95 % CI) | 60.25 ± 0.90 % (1 seed, 95 % CI) | 1, λ 0, — | not evaluated | "
            "not evaluated | 99.16 % | 98.68 % |") in md
    assert (f"  - seed 0 (`{run}`, 2 min): ours 91.50 ± 0.60 % (60.25 ± 0.90 %), 600 tasks, from results.json; "
            "authors not evaluated") in md
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.setattr(report, "RESULTS", out)
    assert "cpu-2cores" in report.machines()
    report.main(["--machine", "cpu-2cores"])
    text = (out / "cpu-2cores-2026-11-30.md").read_text()
    assert "Omniglot meta-test accuracy" in text and "91.50 ± 0.60 %" in text and "99.16 %" in text
    assert "accuracy-cpu-2cores-2026-11-30.json" in text
    assert json.loads((out / "cpu-2cores-2026-11-30.json").read_text())["accuracy"][0][4].startswith("91.50")
    assert (out / "cpu-2cores-2026-11-30-accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_the_authors_protocol_reads_only_the_matching_evaluation(tmp_path, reproduce, report):
    """An --evaluate of the final checkpoint with as many query images per class as shots and
    lambda 0 (the iMAML authors' measure_accuracy.py) is the authors' protocol; others are not."""
    rows = [evaluation(95.0, 2.0, 1), evaluation(94.0, 0.0, 5), evaluation(93.0, 0.0, 1, step=20),
            evaluation(92.25, 0.0, 1)]
    run = run_folder(tmp_path / "runs" / "a", evaluations=rows)
    (entry,) = reproduce.group([reproduce.collect(run)])
    assert entry["authors"]["mean"] == 92.25 and entry["authors"]["ci95"] == 0.5
    assert entry["seeds"][0]["authors"]["source"] == "evaluations.jsonl"
    row = report.accuracy_rows([entry])[0]
    assert row[6:9] == ["1, λ 0, 600", "92.25 ± 0.50 % (1 seed, 95 % CI)", "70.00 ± 1.00 % (1 seed, 95 % CI)"]


def test_the_seeds_of_one_setting_make_one_row_with_their_mean_and_sample_std(tmp_path, reproduce, report):
    """Runs that differ only in --seed, the final evaluation's options and the logging cadence are one
    row: the mean and the sample standard deviation (n - 1) over the seeds, each seed's figure kept."""
    extras = [(), ("--eval_lam", "0", "--eval_tasks", "600"), ("--log_every", "5", "--valid_every", "20")]
    runs = [run_folder(tmp_path / f"s{seed}", seed=seed, results=(accuracy, 2.0, 5, baseline), extra=extra)
            for seed, accuracy, baseline, extra in zip((2, 0, 1), (97.0, 90.0, 92.0), (61.0, 60.0, 65.0), extras)]
    (entry,) = reproduce.group([reproduce.collect(r) for r in runs])
    assert [s["seed"] for s in entry["seeds"]] == [0, 1, 2] and entry["seeds_run"] == 3
    assert [s["ours"]["accuracy"] for s in entry["seeds"]] == [90.0, 92.0, 97.0]
    assert [s["ours"]["ci95"] for s in entry["seeds"]] == [0.6] * 3
    ours = entry["ours"]
    # by hand: deviations -3, -1, 4 from 93; baseline -2, 3, -1 from 62
    assert ours["mean"] == 93.0 and ours["std"] == pytest.approx(math.sqrt(26 / 2), rel=1e-14)
    assert ours["seeds"] == ours["of"] == 3 and ours["ci95"] is None
    assert ours["baseline"]["mean"] == 62.0 and ours["baseline"]["std"] == pytest.approx(math.sqrt(14 / 2), rel=1e-14)
    row = report.accuracy_rows([entry])[0]
    assert row[1] == "3: 0, 1, 2"
    assert row[4:6] == ["93.00 ± 3.61 % (3 seeds, mean ± s.d.)", "62.00 ± 2.65 % (3 seeds, mean ± s.d.)"]


def test_a_protocol_is_found_in_either_file(tmp_path, reproduce):
    """Seed 0 as our runs were made (results.json ours, the authors' --evaluate after), seed 1 the
    other way round (the preset's final evaluation the authors', ours --evaluate'd after)."""
    a = run_folder(tmp_path / "a", seed=0, results=(90.0, 2.0, 5, 60.0), evaluations=[evaluation(80.0, 0.0, 1)])
    b = run_folder(tmp_path / "b", seed=1, results=(84.0, 0.0, 1, 60.0), evaluations=[evaluation(94.0, 2.0, 5)],
                   extra=("--eval_lam", "0", "--eval_query", "1"))
    (entry,) = reproduce.group([reproduce.collect(a), reproduce.collect(b)])
    assert [(s["ours"]["accuracy"], s["ours"]["source"]) for s in entry["seeds"]] == [
        (90.0, "results.json"), (94.0, "evaluations.jsonl")]
    assert [(s["authors"]["accuracy"], s["authors"]["source"]) for s in entry["seeds"]] == [
        (80.0, "evaluations.jsonl"), (84.0, "results.json")]
    assert entry["ours"]["mean"] == 92.0 and entry["authors"]["mean"] == 82.0
    assert entry["ours"]["std"] == entry["authors"]["std"] == pytest.approx(math.sqrt(8), rel=1e-14)


def test_a_protocol_missing_for_some_seeds_is_said(tmp_path, reproduce, report):
    runs = [run_folder(tmp_path / "a", seed=0, evaluations=[evaluation(80.0, 0.0, 1)]),
            run_folder(tmp_path / "b", seed=1, evaluations=[evaluation(84.0, 0.0, 1)]),
            run_folder(tmp_path / "c", seed=2)]
    (entry,) = reproduce.group([reproduce.collect(r) for r in runs])
    assert (entry["authors"]["seeds"], entry["authors"]["of"], entry["authors"]["mean"]) == (2, 3, 82.0)
    row = report.accuracy_rows([entry])[0]
    assert row[7] == f"82.00 ± {math.sqrt(8):.2f} % (2 of 3 seeds, mean ± s.d.)"
    assert row[8] == "70.00 ± 0.00 % (2 of 3 seeds, mean ± s.d.)"
    assert report.per_seed_lines([entry])[3].endswith("authors not evaluated")


def test_an_unfinished_seed_is_said_and_not_averaged(tmp_path, reproduce, report):
    runs = [run_folder(tmp_path / "a", seed=0), run_folder(tmp_path / "b", seed=1, finished=False)]
    (entry,) = reproduce.group([reproduce.collect(r) for r in runs])
    assert entry["seeds_finished"] == 1 and entry["ours"]["of"] == 2 and entry["ours"]["mean"] == 91.5
    row = report.accuracy_rows([entry])[0]
    assert row[1] == "2: 0, 1; seed 1 at step 20 of 40"
    assert row[4] == "91.50 ± 0.60 % (1 of 2 seeds, 95 % CI)"


def test_runs_that_differ_in_more_than_the_seed_stay_apart(tmp_path, reproduce):
    runs = [run_folder(tmp_path / "a", seed=0), run_folder(tmp_path / "b", seed=1, steps=60),
            run_folder(tmp_path / "c", seed=2, extra=("--hidden_size", "32")), run_folder(tmp_path / "d", seed=3)]
    entries = reproduce.group([reproduce.collect(r) for r in runs])
    assert [[s["seed"] for s in e["seeds"]] for e in entries] == [[0, 3], [1], [2]]
    assert [e["steps"] for e in entries] == [40, 60, 40]


def test_two_runs_of_one_setting_and_seed_are_refused(tmp_path, reproduce, capsys):
    a, b = run_folder(tmp_path / "a"), run_folder(tmp_path / "b")
    assert reproduce.main(["--collect", str(a), str(b), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same --seed 0" in err and str(a) in err and not (tmp_path / "r").exists()


def test_unfinished_run_and_run_without_invocations(tmp_path, reproduce):
    entry = reproduce.collect(run_folder(tmp_path / "b", finished=False, invocations=False))
    assert not entry["finished"] and entry["ours"] is None and entry["steps_done"] == 20
    assert entry["wall_seconds"] == pytest.approx(20 * 32 / 32.0)  # from the metrics' tasks/s
    assert entry["wall_time_source"].startswith("metrics.jsonl")


def test_collect_a_folder_that_is_not_a_run(tmp_path, reproduce, capsys):
    assert reproduce.main(["--collect", str(tmp_path), "--results", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_machine_tags(reproduce):
    assert reproduce.machine_tag("CPU (x86_64, 2 cores), torch 2.14.1") == "cpu-2cores"
    assert reproduce.machine_tag("NVIDIA H200, torch 2.14.1") == "NVIDIA-H200"


def test_the_report_refuses_an_accuracy_file_from_before_the_rows_over_seeds(tmp_path, report, monkeypatch):
    old = {"meta": {"machine": "cpu-2cores", "date": "2026-11-30", "device_name": "CPU", "torch": "2.x"},
           "entries": [{"ways": 5, "shots": 1, "accuracy": 91.5, "ci95": 0.6}]}
    (tmp_path / "accuracy-cpu-2cores-2026-11-30.json").write_text(json.dumps(old))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match=r"accuracy-cpu-2cores-2026-11-30.json: an accuracy file from before"):
        report.main(["--machine", "cpu-2cores"])
