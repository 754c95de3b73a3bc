"""The run's lifecycle (issue 28): a run killed before its first checkpoint starts again, one run
per folder (the default --out and the lock), Ctrl-C outside the meta-steps, a damaged checkpoint,
config.json on --resume --preset, and what a stop inside a log window logs. Runs needing Omniglot
skip when it is absent."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from datetime import datetime
from pathlib import Path

import pytest
import torch

from imaml_ext import train as train_cli
from imaml_ext.training import learner
from imaml_ext.training import run_lock
from imaml_ext.training.run_lock import LOCK_NAME, default_out

from test_train import TINY, checkpoint, data_root, run, snapshot  # noqa: F401  (data_root: a fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# Long enough to be alive when signalled, with no checkpoint before it is killed.
LONG = ["--steps", "1000", "--checkpoint_every", "1000", "--log_every", "1", "--valid_every", "0"]


def train_process(*argv, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imaml_ext.train", *TINY, *argv], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def has_rows(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() and bool((out / "metrics.jsonl").read_text().strip())


def main_output(*argv):
    """train_cli.main's exit code, stdout and stderr (for a module-scoped fixture, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_cli.main([*TINY, *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, data_root):  # noqa: F811
    """A run SIGKILLed after its first rows, before its first checkpoint. While it was alive, a
    second run and a --resume in its folder were refused: their (code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("killed") / "k9"
    proc = train_process("--out", str(out), "--data", data_root, *LONG)
    try:
        wait_for(lambda: has_rows(out))
        refused = [main_output("--out", str(out), "--data", data_root, *LONG),
                   main_output("--out", str(out), "--data", data_root, "--resume", *LONG)]
        assert proc.poll() is None, "the first run ended before it was killed"
    finally:
        proc.kill()
        proc.communicate()
    return out, proc.pid, refused


# --------------------------------------------------------------------------- killed before a checkpoint


def test_a_live_run_holds_its_folder(killed_run):
    out, pid, refused = killed_run
    for code, _, err in refused:
        assert code == 2 and err.count("\n") == 1, err
        assert f"--out {out} is in use by another run (process {pid}, which holds {LOCK_NAME})" in err


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, killed_run, data_root, capsys, resume):
    out = tmp_path / "k9"
    shutil.copytree(killed_run[0], out)
    assert not (out / "checkpoint.pt").exists() and (out / LOCK_NAME).exists()  # the dead run's lock
    assert run(out, *LONG, "--stop_after", "2", *(["--resume"] if resume else []), data=data_root) == 0
    said = capsys.readouterr().out
    prefix = "--resume: " if resume else ""
    assert f"{prefix}{out} holds a run that stopped before its first checkpoint (config.json, metrics.csv, " \
           f"metrics.jsonl): starting it from step 0" in said
    assert checkpoint(out)["step"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the killed run's rows are gone
    assert not (out / LOCK_NAME).exists()


def test_a_killed_run_beside_other_files_is_refused_untouched(tmp_path, killed_run, capsys):
    out = tmp_path / "k9"
    shutil.copytree(killed_run[0], out)
    (out / "log.txt").write_text("mine")
    before = {k: v for k, v in snapshot(out).items() if k != LOCK_NAME}
    assert run(out, *LONG) == 2
    err = capsys.readouterr().err
    assert "beside files that are not a run's (log.txt): move those away" in err and err.count("\n") == 1
    assert {k: v for k, v in snapshot(out).items() if k != LOCK_NAME} == before


@pytest.mark.parametrize("files", [{"photo.jpg": "x"}, {"config.json": '{"name": "another program"}'}])
def test_a_folder_of_other_files_is_refused_untouched(tmp_path, capsys, files):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    for extra in ([], ["--resume", "--time_budget", "60"]):
        assert run(out, *extra) == 2
        err = capsys.readouterr().err
        assert f"holds files that are not a run's ({', '.join(files)}); choose a new or empty folder" in err
        assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_resume_of_a_missing_folder_is_refused_and_leaves_nothing(tmp_path, capsys):
    assert run(tmp_path / "typo", "--resume") == 2
    assert "checkpoint.pt does not exist; start the run without --resume" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


# --------------------------------------------------------------------------- one run per folder


def test_the_default_out_is_distinct_per_process(tmp_path, data_root):  # noqa: F811
    """Two runs started at once with the default --out get folders of their own."""
    procs = [train_process("--steps", "1", "--valid_every", "0", "--eval_tasks", "0", "--seed", str(seed),
                           "--data", data_root, cwd=tmp_path) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    seeds = sorted(json.loads((f / "config.json").read_text())["seed"] for f in folders)
    assert seeds == [1, 2]
    for folder in folders:
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1


def test_default_out_takes_the_next_free_name(tmp_path, monkeypatch):
    class SameSecond(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 7, 15, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_lock, "datetime", SameSecond)
    args = Namespace(task="omniglot", ways=5, shots=1)
    names = [default_out(args) for _ in range(3)]
    first = os.path.join("runs", "omniglot-5w1s-20261207-150000")
    assert names == [first, first + "-2", first + "-3"] and all(Path(n).is_dir() for n in names)


def test_a_folder_that_cannot_be_locked_runs_and_says_so(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with run_lock.RunLock(tmp_path / "nfs"):
        assert (tmp_path / "nfs" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot lock" in err and "would not be refused" in err
    assert not (tmp_path / "nfs").exists()


# --------------------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "--out must name a folder; got ''"),
    (["--seed", "-1"], "--seed must be >= 0; got -1"),
    (["--precision", "bf16", "--hvp", "forward", "--forward", "loop"],
     "--precision bf16 --hvp forward needs --forward vmap, im2col"),
    (["--precision", "bf16", "--hvp", "forward"], "got --forward auto"),
])
def test_refused_up_front_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_args([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_bf16_with_forward_hvp_runs_where_it_is_accepted():
    args = train_cli.parse_args(["--precision", "bf16", "--hvp", "forward", "--forward", "vmap", "--hidden_size", "4",
                                 "--inner_steps", "1", "--cg_iterations", "1", "--device", "cpu"])
    imaml = learner.build_imaml(learner.build_model(args), args)
    x = torch.randn(2, 5, 1, 28, 28)
    y = torch.arange(5).repeat(2, 1)
    assert torch.isfinite(imaml.meta_step(x, y, x, y).loss)


def test_a_damaged_checkpoint_without_a_previous_one_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "damaged"
    out.mkdir()
    buffer = io.BytesIO()
    torch.save({"format": 1, "step": 2, "model": {"w": torch.zeros(5000)}}, buffer)
    data = bytearray(buffer.getvalue())
    data[100:5100] = b"\x07" * 5000  # overwritten in part, the same size
    (out / "checkpoint.pt").write_bytes(bytes(data))
    for argv, advice in ((["--out", str(out), "--resume"], "or start the run again without --resume in a new --out."),
                         (["--evaluate", str(out)], "Restore checkpoint.pt from a copy.")):
        assert train_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot read {out / 'checkpoint.pt'}" in err and err.count("\n") == 1, err
        assert "is damaged (truncated, or overwritten in part) and no readable earlier checkpoint is kept" in err
        assert err.rstrip().endswith(advice) and "weights_only" not in err
    assert (out / "checkpoint.pt").read_bytes() == bytes(data)


# --------------------------------------------------------------------------- Ctrl-C outside the meta-steps

# Runs imaml-train with one function made to wait (after writing a marker file) for the test's SIGINT.
DRIVER = textwrap.dedent("""
    import pathlib, signal, sys, time
    # a shell's background job starts with SIGINT ignored, and Python then raises no KeyboardInterrupt:
    # what Ctrl-C does is tested however the test runner was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from imaml_ext import IMAML, train
    from imaml_ext.training import evaluation, loop
    marker, phase = pathlib.Path(sys.argv[1]), sys.argv[2]
    module, name = {"start-up": (loop, "make_tasks"), "evaluation": (loop, "final_evaluation"),
                    "evaluate": (evaluation, "final_evaluation"), "training": (IMAML, "meta_step")}[phase]
    real = getattr(module, name)
    def wait_for_sigint(*args, **kwargs):
        marker.touch()
        time.sleep(120)
        return real(*args, **kwargs)
    setattr(module, name, wait_for_sigint)
    sys.exit(train.main(sys.argv[3:]))
""")


def interrupted(tmp_path, phase, *argv, signals=1):
    """Exit code and stderr of imaml-train sent SIGINT (``signals`` times) during ``phase``."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), phase, *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None)
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.startswith("imaml-train:") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return proc.returncode, lines[0]


def test_ctrl_c_during_start_up(tmp_path, data_root):  # noqa: F811
    out = tmp_path / "run"
    code, line = interrupted(tmp_path, "start-up", *TINY, "--out", str(out), "--data", data_root)
    assert code == 130
    assert line == ("imaml-train: interrupted (SIGINT) during start-up, before the first meta-step; nothing to "
                    "resume: the same command starts the run again")
    assert not out.exists()


def test_ctrl_c_during_the_final_evaluation_keeps_the_checkpoint(tmp_path, data_root):  # noqa: F811
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "2", "--valid_every", "0", "--eval_tasks", "4", "--out", str(out), "--data", data_root]
    code, line = interrupted(tmp_path, "evaluation", *argv)
    assert code == 130
    assert line == (f"imaml-train: interrupted (SIGINT) during the final evaluation; the checkpoint at meta-step 2 "
                    f"is in {out / 'checkpoint.pt'}: the same command with --resume evaluates it")
    assert checkpoint(out)["step"] == 2 and not (out / "results.json").exists()
    assert train_cli.main([*argv, "--resume"]) == 0 and (out / "results.json").exists()


def test_ctrl_c_during_evaluate(tmp_path, data_root):  # noqa: F811
    out = tmp_path / "run"
    assert run(out, "--steps", "2", "--eval_tasks", "0", data=data_root) == 0
    code, line = interrupted(tmp_path, "evaluate", "--evaluate", str(out), "--eval_tasks", "4", "--data", data_root)
    assert code == 130
    assert line == f"imaml-train: interrupted (SIGINT) during --evaluate {out}; nothing was written"
    assert not (out / "evaluations.jsonl").exists()


def test_a_second_ctrl_c_stops_at_once(tmp_path, data_root):  # noqa: F811
    """The first ends the run after the current meta-step; a second, during it, at once."""
    out = tmp_path / "run"
    code, line = interrupted(tmp_path, "training", *TINY, "--out", str(out), "--data", data_root, signals=2)
    assert code == 130
    assert line == ("imaml-train: interrupted (SIGINT) before the run's first checkpoint; nothing to resume: the same "
                    "command starts it again")
    assert not (out / "checkpoint.pt").exists() and (out / "config.json").exists()


# --------------------------------------------------------------------------- config.json and the log


def test_resume_with_a_preset_keeps_config_json_true(tmp_path, data_root):  # noqa: F811
    """The run started without --preset; --resume --preset omniglot-5w1s names the same values
    (TINY's win over it, eval_lam may differ): config.json must not claim the preset."""
    out = tmp_path / "plain"
    assert run(out, "--stop_after", "2", data=data_root) == 0
    assert run(out, "--resume", "--preset", "omniglot-5w1s", data=data_root) == 0
    config = json.loads((out / "config.json").read_text())
    assert "preset" not in config and config["eval_lam"] == 0.0
