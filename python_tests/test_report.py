"""benchmarks/report.py: the goal verdicts are computed from the result files' own timings."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("imaml_bench_report", REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meta_step(*timings):
    """A meta_step result with one config per {variant: seconds} dict."""
    return {"configs": [{"tasks": 16, "inner_steps": 5, "cg_iters": 5,
                         "variants": {k: {"seconds": s} for k, s in t.items()}} for t in timings]}


def goal(rows, start):
    matches = [r for r in rows if r[0].startswith(start)]
    assert len(matches) == 1, (start, rows)
    return matches[0]


def test_parse_name_keeps_dashes_of_the_machine(report):
    assert report.parse_name("meta_step-20w5s-NVIDIA-H100-80GB-HBM3-2026-11-28.json") == {
        "kind": "meta_step-20w5s", "machine": "NVIDIA-H100-80GB-HBM3", "date": "2026-11-28"}
    assert report.parse_name("demo-omniglot-5w1s-cpu-2cores-2026-11-28.json") is None


def test_cpu_goal_counts_configurations(report):
    data = {"meta_step": meta_step({"ours_batched": 2.0, "plain_loop": 2.2},
                                   {"ours_batched": 1.0, "plain_loop": 1.7})}
    rows = report.goal_rows("cpu-2cores", data)
    five = goal(rows, "meta-step speed-up over the plain per-task loop ≥ 1.5x (5-way 1-shot)")
    assert five[1] == "1.10–1.70x over 2 configurations"
    assert five[2] == "met in 1 of 2"
    # The 20-way 5-shot row is there and says it was not measured, rather than missing.
    assert goal(rows, "meta-step speed-up over the plain per-task loop ≥ 1.5x (20-way 5-shot)")[1:] == [
        "not measured", "—"]
    assert not any("vmap" in r[0] or "copy" in r[0] for r in rows)


def test_gpu_goals_eager_and_replay_and_bandwidth(report):
    data = {"meta_step": meta_step({"ours_batched": 0.1, "ours_graph": 0.04, "plain_loop": 2.5, "plain_vmap": 0.15}),
            "ops": {"prox": [{"tasks": 32, "momentum": 0.0, "variants": {"ours": {"pct_of_copy": 99.0}}},
                             {"tasks": 512, "momentum": 0.0,
                              "variants": {"ours": {"pct_of_copy": 30.0}, "ours_op": {"pct_of_copy": 75.0}}}],
                    "cg_iteration": [{"tasks": 512, "variants": {"ours": {"pct_of_copy": 69.9}}}]}}
    rows = report.goal_rows("NVIDIA-H200", data)
    assert goal(rows, "meta-step speed-up over the plain per-task loop, eager ≥ 20x (5-way")[1:] == ["25.0x", "met"]
    assert goal(rows, "meta-step speed-up over plain torch.func vmap, eager ≥ 2x (5-way")[1:] == ["1.50x", "missed"]
    assert goal(rows, "meta-step speed-up over plain torch.func vmap, CUDA-graph replay ≥ 2x (5-way")[1:] == [
        "3.75x", "met"]
    # Bandwidth is judged at the largest T only, on the op itself.
    assert goal(rows, "fused prox step ≥ 70 % of copy bandwidth (T = 512")[1:] == ["75 %", "met"]
    assert goal(rows, "one CG iteration's vector work ≥ 70 % of copy bandwidth (T = 512)")[1:] == ["70 %", "missed"]
    assert not any("T = 32" in r[0] for r in rows)


def test_committed_gpu_report_matches_its_sources(report):
    machine = "NVIDIA-H200"
    if machine not in report.machines():
        pytest.skip("no H200 results committed")
    gathered = report.gather(machine)
    files = report.latest_files(machine)
    configs = json.loads(files["meta_step"].read_text())["configs"]
    ratios = [c["variants"]["plain_loop"]["seconds"] / c["variants"]["ours_graph"]["seconds"] for c in configs]
    row = goal(gathered["goals"], "meta-step speed-up over the plain per-task loop, CUDA-graph replay ≥ 20x (5-way")
    assert row[1].startswith(f"{report.ratio(min(ratios))[:-1]}–{report.ratio(max(ratios))}")
    assert row[2] == report.verdict(ratios, 20.0)


def test_ops_roofline_plot(report, tmp_path):
    ops = {"meta": {"copy": {"gbs": 50.0}, "date": "2026-11-28"},
           "prox": [{"tasks": t, "momentum": 0.0, "ours_min_bytes": 1e6 * t,
                     "variants": {"ours": {"median_ms": 0.03 * t}, "loop": {"median_ms": 0.1 * t}}} for t in (1, 16)],
           "cg_iteration": [{"tasks": t, "ours_min_bytes": 2e6 * t, "variants": {"ours": {"median_ms": 0.05 * t}}}
                            for t in (1, 16)]}
    path = tmp_path / "ops.png"
    assert report.plot_ops(ops, "cpu-test", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.plot_ops(None, "cpu-test", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_gpu_goals_without_ops_say_not_measured(report):
    """No ops file, or one whose run stopped before a section, leaves 'not measured' rows, not an error."""
    for data in ({}, {"ops": {"prox": [{"tasks": 32, "momentum": 0.0, "variants": {"ours": {"pct_of_copy": 80.0}}}]}}):
        rows = report.goal_rows("NVIDIA-H100-80GB-HBM3", data)
        assert goal(rows, "one CG iteration's vector work ≥ 70 % of copy bandwidth at large T")[1:] == [
            "not measured", "—"]
        assert sum(r[1] == "not measured" for r in rows) == (10 if not data else 9)
