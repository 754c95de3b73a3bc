"""benchmarks/compare_trees.py alternates one benchmark between two source trees: each round runs
both trees, the order swapped every round, and the figure per tree is the median over rounds.
Here the two trees are temporary folders whose benchmark writes a known figure and records the
order it ran in; bad arguments and failing benchmarks give one line each, and nothing is overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_trees.py"

# A benchmark as bench_meta_step.py writes its JSON: --out PATH, "configs" with per-variant medians.
# Each tree's figures come from its file figures.json (one per run, in order); each run appends the
# tree's name to the shared order.log.
BENCH = '''
import json, sys
from pathlib import Path
tree = Path.cwd()
out = Path(sys.argv[sys.argv.index("--out") + 1])
with open(tree.parent / "order.log", "a") as f:
    f.write(tree.name + "\\n")
runs = (tree.parent / "order.log").read_text().split().count(tree.name)
figure = json.loads((tree / "figures.json").read_text())[runs - 1]
if figure is None:
    sys.exit("boom: the benchmark failed")
if figure == "no file":
    sys.exit(0)
if figure == "other variant":
    out.write_text(json.dumps({"configs": [{"tasks": 16, "inner_steps": 5, "variants": {"theirs": {"median_ms": 1.0}}}]}))
    sys.exit(0)
if figure == "no figures":
    out.write_text(json.dumps({"configs": []}))
    sys.exit(0)
out.write_text(json.dumps({"configs": [{"tasks": 16, "inner_steps": 5, "cg_iters": 3,
                                        "variants": {"ours": {"median_ms": figure, "min_ms": figure - 1}}}]}))
'''


def tree(root: Path, name: str, figures) -> Path:
    path = root / name
    (path / "benchmarks").mkdir(parents=True)
    (path / "benchmarks" / "bench_fake.py").write_text(BENCH)
    (path / "figures.json").write_text(json.dumps(figures))
    return path


def compare(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=root, capture_output=True, text=True, timeout=120)


def test_rounds_alternate_the_trees_and_the_figure_is_the_median_over_rounds(tmp_path):
    before = tree(tmp_path, "old", [100.0, 300.0, 110.0])  # medians 110 and 60
    after = tree(tmp_path, "new", [50.0, 60.0, 90.0])
    out = tmp_path / "results" / "cmp.json"
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--rounds", "3", "--out", str(out),
                   "--", "bench_fake.py")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "order.log").read_text().split() == ["old", "new", "new", "old", "old", "new"]
    row, = json.loads(out.read_text())["rows"]
    assert row["config"] == "T 16, 5 inner, 3 CG" and row["variant"] == "ours"
    assert row["before_median_ms"] == 110.0 and row["after_median_ms"] == 60.0
    assert row["after_over_before"] == pytest.approx(60 / 110)
    assert row["paired_after_over_before"] == pytest.approx([0.5, 0.2, 90 / 110])
    assert "| T 16, 5 inner, 3 CG | ours | 110 | 60 | 0.545 |" in out.with_suffix(".md").read_text()


def test_min_statistic_reads_each_runs_fastest_sample(tmp_path):
    before, after = tree(tmp_path, "old", [100.0]), tree(tmp_path, "new", [50.0])
    out = tmp_path / "cmp.json"
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--rounds", "1", "--statistic", "min",
                   "--out", str(out), "--", "bench_fake.py")
    assert done.returncode == 0, done.stderr
    row, = json.loads(out.read_text())["rows"]
    assert (row["before_median_ms"], row["after_median_ms"]) == (99.0, 49.0)


@pytest.mark.parametrize("args, message", [
    (["--rounds", "2"], "name the benchmark after --"),
    (["--rounds", "0", "--", "bench_fake.py"], "--rounds must be >= 1; got 0"),
    (["--", "bench_missing.py"], "has no benchmarks/bench_missing.py"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    before, after = tree(tmp_path, "old", [1.0]), tree(tmp_path, "new", [1.0])
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--out", str(tmp_path / "c.json"), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "order.log").exists()


@pytest.mark.parametrize("existing", ["c.json", "c.md"])
def test_an_existing_result_is_refused_and_kept(tmp_path, existing):
    before, after = tree(tmp_path, "old", [1.0]), tree(tmp_path, "new", [1.0])
    out = tmp_path / "c.json"
    (tmp_path / existing).write_text("earlier results")
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--out", str(out), "--", "bench_fake.py")
    assert done.returncode == 2 and f"--out {out}: {tmp_path / existing} exists" in done.stderr
    assert (tmp_path / existing).read_text() == "earlier results" and not (tmp_path / "order.log").exists()


def test_a_failing_benchmark_names_the_tree_and_its_last_error_line(tmp_path):
    before, after = tree(tmp_path, "old", [100.0, 100.0]), tree(tmp_path, "new", [None])
    out = tmp_path / "c.json"
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--rounds", "2", "--out", str(out),
                   "--", "bench_fake.py")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"--after: bench_fake.py in {after} exited with 1: boom: the benchmark failed" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("figure, message", [("no file", "wrote no readable result JSON to --out"),
                                              ("no figures", "wrote no median_ms figures")])
def test_a_benchmark_without_figures_is_an_error(tmp_path, figure, message):
    before, after = tree(tmp_path, "old", [figure]), tree(tmp_path, "new", [1.0])
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--rounds", "1",
                   "--out", str(tmp_path / "c.json"), "--", "bench_fake.py")
    assert done.returncode == 1 and f"--before: bench_fake.py in {before} {message}" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "c.json").exists()


def test_trees_without_a_common_row_are_an_error(tmp_path):
    before, after = tree(tmp_path, "old", [100.0]), tree(tmp_path, "new", ["other variant"])
    out = tmp_path / "c.json"
    done = compare(tmp_path, "--before", str(before), "--after", str(after), "--rounds", "1", "--out", str(out),
                   "--", "bench_fake.py")
    assert done.returncode == 1 and "no (configuration, variant) ran in every round of both trees" in done.stderr
    assert "('T 16, 5 inner, 3 CG', 'ours')" in done.stderr and "('T 16, 5 inner', 'theirs')" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
