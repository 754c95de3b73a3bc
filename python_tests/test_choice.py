"""The one timed chooser (imaml_ext/batched/choice.py) and the tuning cache: the fastest wins, what
fails is left out with its cause, timing draws nothing, and with a tuning cache a run's choices (so
its numbers) are the machine's, not the moment's: the same seeded run beside busy processes gives
identical metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from imaml_ext.batched import IMAML, TaskBatchedModule
from test_train import data_root  # noqa: F401  (the fixture: Omniglot's folder, or a skip)
from imaml_ext.batched.choice import Chooser, NoCandidateRan, TuningCache, choose, machine_fingerprint, tuning_cache

CPU = torch.device("cpu")


def fake_measure(costs, calls):
    """measure(candidate): records the call and one draw from the RNG; returns its cost."""
    def measure(candidate):
        calls.append((candidate, torch.rand(()).item()))
        cost = costs[candidate]
        if isinstance(cost, Exception):
            raise cost
        return cost
    return measure


def test_choose_keeps_the_fastest_and_runs_again_only_those_within_the_margins():
    calls = []
    costs = {"a": 3.0, "b": 1.0, "c": 1.4, "d": 1.6}
    choice = choose("forward", list(costs), fake_measure(costs, calls), CPU)
    assert choice["forward"] == "b" and choice["ms"] == {"a": 3000.0, "b": 1000.0, "c": 1400.0, "d": 1600.0}
    # every candidate, then those within 1.5x (b, c), then within 1.1x of the fastest (b only: stop)
    assert [c for c, _ in calls] == ["a", "b", "c", "d", "b", "c"]


def test_choose_gives_every_candidate_the_same_draws_and_leaves_the_rng_as_asked():
    torch.manual_seed(0)
    expected_first = torch.rand(()).item()
    torch.manual_seed(0)
    calls = []
    choose("forward", ["a", "b"], fake_measure({"a": 2.0, "b": 1.0}, calls), CPU)
    assert {draw for _, draw in calls} == {expected_first}
    assert torch.rand(()).item() == expected_first  # restore: as before the timing
    torch.manual_seed(0)
    choose("forward", ["a", "b"], fake_measure({"a": 2.0, "b": 1.0}, []), CPU, restore=False)
    torch.manual_seed(0)
    torch.rand(())
    after_one_draw = torch.rand(()).item()
    torch.manual_seed(0)
    choose("forward", ["a", "b"], fake_measure({"a": 2.0, "b": 1.0}, []), CPU, restore=False)
    assert torch.rand(()).item() == after_one_draw  # as the winner's run left it


def test_choose_leaves_out_what_fails_and_names_it_and_raises_when_nothing_runs():
    costs = {"a": RuntimeError("out of memory (stand-in)\nmore"), "b": 1.0, "c": 2.0}
    choice = choose("forward", list(costs), fake_measure(costs, []), CPU)
    assert choice["forward"] == "b" and choice["refused"] == {"a": "out of memory (stand-in)"}
    with pytest.raises(NoCandidateRan, match=r'hvp="auto": every candidate failed here') as caught:
        choose("hvp", ["a", "b"], fake_measure({"a": RuntimeError("x"), "b": RuntimeError("y")}, []), CPU)
    assert set(caught.value.errors) == {"a", "b"}
    # one candidate: nothing to time
    assert choose("forward", ["only"], fake_measure({}, []), CPU) == {"forward": "only", "ms": {}}


def test_tuning_cache_keeps_choices_per_machine_across_instances(tmp_path):
    cache = TuningCache(tmp_path)
    assert cache.path.parent == tmp_path and cache.path.name.startswith("tuning-")
    key = ((16, 5, 1, 28, 28), "float32", "grad", 1, False)
    cache.put("forward", key, {"forward": "stacked", "ms": {"loop": 2.0, "stacked": 1.0}})
    again = TuningCache(tmp_path)  # another run on this machine
    assert again.get("forward", key, ["loop", "stacked"]) == {"forward": "stacked", "ms": {"loop": 2.0, "stacked": 1.0}}
    assert again.get("forward", key, ["loop"]) is None  # a choice not offered now is not used
    assert again.get("hvp", key, ["reverse"]) is None
    written = json.loads(cache.path.read_text())
    assert written["machine"] == machine_fingerprint() and "16, 5, 1, 28, 28" in next(iter(written["choices"]["forward"]))


def test_a_damaged_tuning_cache_is_said_and_timed_again_and_an_unwritable_one_is_said_once(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    cache = TuningCache(path)
    with pytest.warns(RuntimeWarning, match=r"tuning cache .*tuning.json' cannot be read .*timed again"):
        assert cache.get("forward", ("k",), ["loop"]) is None
    cache.put("forward", ("k",), {"forward": "loop", "ms": {}})
    assert TuningCache(path).get("forward", ("k",), ["loop"])["forward"] == "loop"  # rewritten
    blocked = TuningCache(tmp_path / "a-file" / "tuning.json")
    (tmp_path / "a-file").write_text("")
    with pytest.warns(RuntimeWarning, match=r"tuning cache: cannot write .*a-file.* is a file, not a folder.*memory only"):
        blocked.put("forward", ("k",), {"forward": "loop", "ms": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        blocked.put("forward", ("j",), {"forward": "stacked", "ms": {}})
    assert blocked.get("forward", ("j",), ["stacked"])["forward"] == "stacked"


def test_tuning_cache_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAML_TUNING_CACHE", str(tmp_path / "env.json"))
    assert tuning_cache().path == tmp_path / "env.json"
    assert tuning_cache(str(tmp_path / "given.json")).path == tmp_path / "given.json"
    monkeypatch.setenv("IMAML_TUNING_CACHE", "none")
    assert tuning_cache() is None
    with pytest.raises(TypeError, match="tuning_cache must be a TuningCache, a path or None; got int"):
        tuning_cache(3)


def test_chooser_reads_kept_choices_then_the_cache_then_times(tmp_path):
    cache, timed = TuningCache(tmp_path), []
    chooser = Chooser("hvp", {("kept",): {"hvp": "forward", "ms": {}}}, cache)
    assert chooser.get(("kept",), ["reverse", "forward"], lambda: timed.append(1))["hvp"] == "forward"
    cache.put("hvp", ("cached",), {"hvp": "reverse", "ms": {"reverse": 1.0}})
    got = chooser.get(("cached",), ["reverse", "forward"], lambda: timed.append(1))
    assert got == {"hvp": "reverse", "ms": {"reverse": 1.0}, "from": "tuning cache"} and not timed
    got = chooser.get(("new",), ["reverse", "forward"], lambda: {"hvp": "forward", "ms": {"forward": 2.0}})
    assert got["hvp"] == "forward" and cache.get("hvp", ("new",), ["forward"]) == {"hvp": "forward", "ms": {"forward": 2.0}}
    assert set(chooser.choices) == {("kept",), ("cached",), ("new",)}  # what a checkpoint keeps


def conv_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 13 * 13, 3)).double()


def test_imaml_with_a_tuning_cache_runs_the_cached_choice_whatever_the_timing_would_say(tmp_path, monkeypatch):
    """The first learner times and writes; a second one on this machine (another run) reads the same
    choices even where timing would now pick another forward, and its step equals the first's."""
    torch.manual_seed(0)
    model = conv_net()
    batch = (torch.randn(4, 3, 1, 28, 28, dtype=torch.float64), torch.randint(0, 3, (4, 3)),
             torch.randn(4, 3, 1, 28, 28, dtype=torch.float64), torch.randint(0, 3, (4, 3)))
    first = IMAML(model, inner_steps=2, cg_iterations=2, check_labels=False, tuning_cache=tmp_path)
    first.meta_step(*batch)
    grads = [p.grad.clone() for p in model.parameters()]
    cached = json.loads(first.tuning_cache.path.read_text())["choices"]
    assert set(cached) == {"forward", "hvp"}

    def timing_says_otherwise(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(TaskBatchedModule, "_time_forwards", timing_says_otherwise)
    monkeypatch.setattr("imaml_ext.batched.hvp.choose", timing_says_otherwise)
    model.zero_grad()
    second = IMAML(model, inner_steps=2, cg_iterations=2, check_labels=False, tuning_cache=tmp_path)
    second.meta_step(*batch)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert {c["forward"] for c in second.forward_choices.values()} == {c["forward"] for c in cached["forward"].values()}
    assert all(c.get("from") == "tuning cache" for c in second.forward_choices.values())


BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"
TIME_FIELDS = {"tasks_per_s", "seconds", "elapsed", "time"}


def metrics(folder: Path):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def test_the_same_seeded_run_beside_busy_processes_gives_identical_metrics(tmp_path, data_root):
    """forward and hvp "auto", one tuning cache: a quiet run, then the same run beside two busy
    processes (which can turn a close timing), give the same metrics.jsonl and test accuracy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--tuning_cache", str(tmp_path / "tuning.json"), "--hidden_size", "8", "--meta_batch_size", "3", "--inner_steps", "2", "--cg_iterations", "2", "--query", "2",
            "--steps", "4", "--log_every", "1", "--valid_every", "2", "--valid_tasks", "4", "--eval_tasks", "6",
            "--eval_batch", "3", "--no-progress", "--device", "cpu", "--forward", "auto", "--hvp", "auto",
            "--seed", "3", "--data", data_root]

    def train(name):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "imaml_ext.train", *args, "--out", str(out)], env=env, check=True,
                       capture_output=True, timeout=600)
        return out

    quiet = train("quiet")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        time.sleep(0.5)
        loaded = train("loaded")
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert metrics(quiet) == metrics(loaded) and len(metrics(quiet)) >= 4
    results = [json.loads((out / "results.json").read_text()) for out in (quiet, loaded)]
    assert results[0]["test"]["accuracy"] == results[1]["test"]["accuracy"]
    assert results[0]["timed_choices"] == results[1]["timed_choices"]


def test_imaml_train_keeps_its_choices_beside_the_image_cache_unless_told_otherwise(tmp_path, monkeypatch):
    from imaml_ext.training.learner import tuning_cache_of

    monkeypatch.delenv("IMAML_TUNING_CACHE")
    monkeypatch.setenv("IMAML_CACHE", str(tmp_path))
    assert tuning_cache_of(SimpleNamespace(tuning_cache=None)).path.parent == tmp_path / "tuning"
    monkeypatch.setenv("IMAML_TUNING_CACHE", str(tmp_path / "env.json"))
    assert tuning_cache_of(SimpleNamespace(tuning_cache=None)).path == tmp_path / "env.json"
    assert tuning_cache_of(SimpleNamespace(tuning_cache="none")) is None
    assert tuning_cache_of(SimpleNamespace(tuning_cache=str(tmp_path / "mine.json"))).path == tmp_path / "mine.json"


def test_a_tuning_cache_that_is_some_other_file_is_refused(tmp_path, capsys):
    from imaml_ext import train as train_cli

    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--tuning_cache", str(other), "--device", "cpu"])
    assert f"--tuning_cache must name a .json file or a folder (or none); got {str(other)!r}, a file" in capsys.readouterr().err
    assert other.read_text() == "mine"
