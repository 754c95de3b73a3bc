"""The training command line (``python -m imaml_ext.train``): outputs, bit-exact resume,
interruption, and every bad-input path. Runs needing Omniglot skip when it is absent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imaml_ext import train as train_cli
from imaml_ext import batched
from imaml_ext.training import arguments
from imaml_ext.training import distributed
from imaml_ext.training import evaluation, learner
from imaml_ext.data import find_data_root
from imaml_ext.training.config import IMAML_ONLY

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for seconds on two cores; every output path still runs. The forward and the
# HVP mode are fixed: "auto" times them, and two fresh runs may choose differently and so round
# differently (test_resume_keeps_the_timed_choices covers "auto").
TINY = ["--hidden_size", "8", "--meta_batch_size", "3", "--inner_steps", "2", "--cg_iterations", "2",
        "--query", "2", "--steps", "6", "--log_every", "2", "--valid_every", "3", "--valid_tasks", "4",
        "--checkpoint_every", "2", "--eval_tasks", "12", "--eval_batch", "5", "--no-progress", "--device", "cpu",
        "--forward", "loop", "--hvp", "reverse"]


@pytest.fixture(scope="module")
def data_root():
    try:
        return str(find_data_root())
    except FileNotFoundError as error:
        pytest.skip(f"Omniglot not found: {error}")


def run(out, *extra, data=None):
    tiny = TINY if "maml" not in extra and "fomaml" not in extra else maml_args(TINY)
    argv = [*tiny, "--out", str(out), *extra]
    if data is not None:
        argv += ["--data", data]
    return train_cli.main(argv)


def maml_args(argv):
    """argv without iMAML's options, which --algo maml / fomaml refuses."""
    out, skip = [], False
    for arg in argv:
        if not skip and arg.lstrip("-") not in IMAML_ONLY:
            out.append(arg)
        skip = not skip and arg.lstrip("-") in IMAML_ONLY
    return out


def checkpoint(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def rows_without_timing(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tasks_per_s", None)
    return rows


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        for name in state_a[k]:
            assert torch.equal(torch.as_tensor(state_a[k][name]), torch.as_tensor(state_b[k][name])), (k, name)
    assert torch.equal(a["sampler"], b["sampler"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert run(out, "--scheduler", "cosine", data=data_root) == 0
    return out


# --------------------------------------------------------------------------- outputs


def test_run_writes_every_output(reference_run, capsys):
    out = reference_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "curves.png", "checkpoint.pt", "results.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 8 and config["lam"] == 2.0 and config["torch"] == torch.__version__

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    valid_steps = [r["step"] for r in rows if r["split"] == "validation"]
    assert train_steps == [2, 4, 6] and valid_steps == [3, 6]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"]) and r["loss"] > 0
    # cosine schedule over 6 steps: the learning rate logged falls
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    assert lrs[0] > lrs[1] > lrs[2]

    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("split,step,") and len(csv_lines) == 1 + len(rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["test"]["tasks"] == 12 and results["baseline"]["tasks"] == 12
    for part in ("test", "baseline"):
        assert 0 < results[part]["accuracy"] <= 100 and results[part]["ci95"] > 0
    assert "CPU" in results["machine"] and results["date"]


def test_summarise_is_mean_with_normal_95_interval():
    acc = torch.rand(600, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    got = evaluation.summarise(acc)
    values = acc.double().numpy() * 100
    assert got["tasks"] == 600
    assert got["accuracy"] == pytest.approx(values.mean(), rel=1e-12)
    assert got["ci95"] == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(600), rel=1e-12)


def test_evaluation_uses_the_same_tasks_for_model_and_baseline(tmp_path, data_root):
    """With a meta learning rate below float32's resolution the trained model stays the random
    initialisation, so the test and baseline rows agree exactly only if both saw the same tasks."""
    out = tmp_path / "frozen"
    assert run(out, "--steps", "1", "--meta_lr", "1e-12", "--valid_every", "0", "--eval_tasks", "40",
               data=data_root) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["accuracy"] == results["baseline"]["accuracy"]
    assert results["test"]["ci95"] == results["baseline"]["ci95"]


def test_evaluation_does_not_depend_on_its_batch_size(data_root):
    """Tasks evaluated 4 or 10 at a time give the same per-task numbers (BatchNorm is per task)."""
    args = train_cli.parse_args([*TINY, "--steps", "1", "--eval_tasks", "10", "--data", data_root])
    from imaml_ext.data import omniglot_tasks

    tasks = omniglot_tasks(5, 1, 2, root=data_root, protocol="finn", seed=3)
    indices = tasks.test.sample_indices(10)
    a = evaluation.evaluate(learner.build_imaml(learner.build_model(args), args), tasks.test, indices, 4)
    b = evaluation.evaluate(learner.build_imaml(learner.build_model(args), args), tasks.test, indices, 10)
    assert torch.allclose(a["accuracy"], b["accuracy"]) and torch.allclose(a["loss"], b["loss"], atol=1e-5)


# --------------------------------------------------------------------------- resume


def assert_same_run(reference_run, out):
    """The same model, optimizer, scheduler, logged rows and results as the uninterrupted run."""
    assert_same_state(checkpoint(reference_run), checkpoint(out))
    assert checkpoint(reference_run)["scheduler"] == checkpoint(out)["scheduler"]
    assert rows_without_timing(out) == rows_without_timing(reference_run)
    a = json.loads((reference_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["baseline"] == b["baseline"]


def test_stop_and_resume_is_bit_exact(tmp_path, reference_run, data_root):
    out = tmp_path / "split"
    assert run(out, "--scheduler", "cosine", "--stop_after", "3", data=data_root) == 0
    assert checkpoint(out)["step"] == 3 and not (out / "results.json").exists()
    assert run(out, "--scheduler", "cosine", "--resume", data=data_root) == 0
    assert_same_run(reference_run, out)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run(tmp_path, data_root, precision):
    out = tmp_path / precision
    assert run(out, "--precision", precision, "--on_nonfinite", "skip-task", data=data_root) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == precision
    results = json.loads((out / "results.json").read_text())
    assert 0.0 < results["test"]["accuracy"] <= 100.0


def test_checkpoint_from_before_an_option_existed_resumes_with_its_default(tmp_path, reference_run, data_root):
    out = tmp_path / "older"
    assert run(out, "--scheduler", "cosine", "--stop_after", "3", data=data_root) == 0
    older = checkpoint(out)
    del older["config"]["precision"]  # as written before --precision existed
    torch.save(older, out / "checkpoint.pt")
    assert run(out, "--scheduler", "cosine", "--resume", data=data_root) == 0
    assert_same_state(checkpoint(reference_run), checkpoint(out))


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path, reference_run, data_root):
    out = tmp_path / "crashed"
    assert run(out, "--scheduler", "cosine", "--stop_after", "4", data=data_root) == 0
    # as if the process died after logging step 6 but before checkpointing it
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train", "step": 6, "loss": 9.0, "accuracy": 0.0}) + "\n")
    assert run(out, "--scheduler", "cosine", "--resume", data=data_root) == 0
    assert rows_without_timing(out) == rows_without_timing(reference_run)


def signal_after_step(monkeypatch, n, signum):
    """The process sends itself ``signum`` during meta-step ``n``: handled, the run ends after it.
    Returns the real meta_step."""
    real_step = batched.IMAML.meta_step
    calls = {"n": 0}

    def step_then_signal(self, *batch):
        calls["n"] += 1
        result = real_step(self, *batch)
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(batched.IMAML, "meta_step", step_then_signal)
    return real_step


def test_sigterm_checkpoints_and_resume_matches(tmp_path, reference_run, data_root, monkeypatch, capsys):
    real_step = signal_after_step(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "killed"
    assert run(out, "--scheduler", "cosine", data=data_root) == 0
    assert "stopped at meta-step 2" in capsys.readouterr().out
    assert checkpoint(out)["step"] == 2
    monkeypatch.setattr(batched.IMAML, "meta_step", real_step)
    assert run(out, "--scheduler", "cosine", "--resume", data=data_root) == 0
    assert_same_state(checkpoint(reference_run), checkpoint(out))


# --------------------------------------------------------------------------- bad input


def test_run_folder_with_another_run_is_refused_untouched(tmp_path, reference_run, data_root, capsys):
    before = snapshot(reference_run)
    assert run(reference_run, data=data_root) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and str(reference_run) in err
    assert snapshot(reference_run) == before


@pytest.mark.parametrize("other, named", [(["--lam", "0.5"], "--lam: checkpoint 2.0, now 0.5"),
                                          (["--preset", "omniglot-5w5s"], "--shots: checkpoint 1, --preset omniglot-5w5s 5")])
def test_resume_with_another_config_is_refused_untouched(tmp_path, data_root, capsys, other, named):
    out = tmp_path / "r"
    assert run(out, "--stop_after", "2", data=data_root) == 0
    before = snapshot(out)
    assert run(out, "--resume", *other, data=data_root) == 2
    err = capsys.readouterr().err
    assert named in err and "another configuration" in err
    assert snapshot(out) == before


def test_resume_without_checkpoint(tmp_path, capsys):
    assert run(tmp_path / "empty", "--resume") == 2
    assert "checkpoint.pt does not exist" in capsys.readouterr().err


def test_truncated_checkpoint_is_a_clear_error(tmp_path, data_root, capsys):
    out = tmp_path / "t"
    assert run(out, "--stop_after", "4", data=data_root) == 0  # checkpoints at steps 2 and 4
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    previous = (out / "checkpoint.prev.pt").read_bytes()  # the last two are kept
    assert run(out, "--resume", data=data_root) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "checkpoint.pt" in err
    assert "move checkpoint.prev.pt to checkpoint.pt to resume from step 2" in err
    assert (out / "checkpoint.prev.pt").read_bytes() == previous
    (out / "checkpoint.prev.pt").replace(out / "checkpoint.pt")
    assert run(out, "--resume", data=data_root) == 0  # resumes from the previous one


def test_missing_data_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-omniglot-here"
    assert run(tmp_path / "out", data=str(missing)) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Omniglot" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shots", "5", "--query", "16"], "--shots + --query must be <= 20"),
        (["--ways", "200", "--split", "finn"], "--ways 200 is more than the 100 classes of the finn validation split"),
        (["--ways", "1200"], "is more than the"),
        (["--task", "cifar"], "--task must be one of omniglot, mini-imagenet; got 'cifar'"),
        (["--lam", "1", "--reg", "0.5"], "not allowed with argument"),
        (["--lam", "-1"], "--lam must be a finite number > 0; got -1.0"),
        (["--reg", "0"], "--reg must be a finite number > 0; got 0.0"),
        (["--meta_batch_size", "0"], "--meta_batch_size must be >= 1; got 0"),
        (["--inner_steps", "-2"], "--inner_steps must be >= 1; got -2"),
        (["--inner_steps", "0"], "--inner_steps must be >= 1; got 0"),  # accepted, where --cg_iterations 0 was not
        (["--cg_iterations", "0"], "--cg_iterations must be >= 1; got 0"),
        (["--cuda_graph", "--device", "cpu"], "--cuda_graph needs a CUDA --device; got cpu"),
        (["--device", "tpu:0"], "--device"),
        (["--split", "random"], "invalid choice: 'random'"),
        (["--algo", "reptile"], "invalid choice: 'reptile'"),
        (["--cg_damping", "-1"], "--cg_damping must be a finite number >= 0; got -1.0"),
        (["--precision", "bf16", "--algo", "maml"], "--precision bf16 is built for --algo imaml only; got --algo maml"),
        (["--precision", "fp16"], "--precision fp16 leaves out a task whose scaled gradients overflow (as GradScaler "
                                  "skips a step) and lowers the loss scale: it needs --on_nonfinite skip-task; got error"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--hvp", "jvp"], "argument --hvp: invalid choice: 'jvp'"),
        (["--tf32", "yes"], "argument --tf32: invalid choice: 'yes'"),
        (["--forward", "grouped"], "argument --forward: invalid choice: 'grouped'"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_keeps_the_timed_choices(tmp_path, data_root, monkeypatch):
    """With "auto", a run times the training shapes at its first meta-step and the evaluation shapes
    at its start, before any checkpoint: a resumed run, its final evaluation and --evaluate time nothing."""
    from imaml_ext.batched import hvp as support_hvp
    from imaml_ext.batched.module import TaskBatchedModule

    out, auto = tmp_path / "auto", ["--forward", "auto", "--hvp", "auto"]
    assert run(out, *auto, "--stop_after", "2", data=data_root) == 0
    choices = checkpoint(out)["timed_choices"]
    shapes = {(key[0][0], key[2]) for key in choices["forward"]}
    # training: T 3 with grad; validation (4 tasks) and the final evaluation (12 = 5 + 5 + 2): the inner
    # loop with grad, the query without
    assert {(3, "grad"), (4, "grad"), (4, "no_grad"), (5, "grad"), (5, "no_grad"), (2, "grad"), (2, "no_grad")} <= shapes
    assert [key[1] for key in choices["hvp"]] == [(3, 5, 1, 28, 28)]

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(TaskBatchedModule, "_time_forwards", no_timing)
    monkeypatch.setattr(support_hvp, "choose", no_timing)
    assert run(out, *auto, "--resume", data=data_root) == 0
    assert checkpoint(out)["timed_choices"] == choices
    # results.json says which forward and HVP ran for every shape
    said = json.loads((out / "results.json").read_text())["timed_choices"]
    assert len(said["forward"]) == len(choices["forward"]) and len(said["hvp"]) == len(choices["hvp"])
    assert set(said["forward"].values()) <= {f"{mode}{fused}" for mode in ("loop", "stacked", "stacked/8", "stacked/4")
                                             for fused in ("", "+fused")}
    assert set(said["hvp"].values()) <= {"reverse", "forward"} and any("3, 5, 1, 28, 28" in k for k in said["hvp"])
    assert train_cli.main(["--evaluate", str(out), "--eval_tasks", "12", "--eval_batch", "5", "--device", "cpu",
                           "--data", data_root, "--no-progress"]) == 0


@pytest.mark.parametrize("forward, hvp, tf32, expected_tf32",
                         [("stacked", "forward", "on", True), ("loop", "reverse", "off", False),
                          ("im2col", "reverse", "on", True), ("channels_last", "forward", "off", False),
                          ("auto", "auto", "torch", None)])
def test_forward_hvp_and_tf32_reach_the_learner(forward, hvp, tf32, expected_tf32, monkeypatch):
    from imaml_ext.training import learner

    args = train_cli.parse_args(["--forward", forward, "--hvp", hvp, "--tf32", tf32, "--device", "cpu"])
    imaml = learner.build_imaml(learner.build_model(args), args)
    assert (imaml.forward, imaml.hvp, imaml.tf32) == (forward, hvp, None)  # off CUDA there is nothing to set
    maml_args = train_cli.parse_args(["--algo", "maml", "--tf32", tf32, "--device", "cpu"])
    assert learner.build_imaml(learner.build_model(args), maml_args).tf32 is None
    monkeypatch.setattr(args, "device", "cuda")
    assert learner._tf32(args) is expected_tf32


def test_tf32_on_a_cpu_is_said_once_in_our_words(tmp_path, data_root, capsys):
    """It was torch-style UserWarnings, one from the training learner and one from the evaluator."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(tmp_path / "tf32", "--tf32", "on", "--steps", "2", "--valid_every", "0", "--eval_tasks", "2",
                   data=data_root) == 0
    assert not [w for w in caught if "tf32" in str(w.message).lower()]
    err = capsys.readouterr().err
    assert err.count("--tf32 on has no effect on cpu") == 1 and "IEEE float32" in err


def test_progress_bar_only_on_a_terminal(tmp_path, data_root, capsys):
    """Output to a file or pipe (as under pytest) gets the rows as lines, not the bar's frames."""
    pytest.importorskip("tqdm")
    assert run(tmp_path / "bar", "--progress", "--steps", "2", "--valid_every", "2", "--eval_tasks", "0",
               data=data_root) == 0
    said = capsys.readouterr()
    assert "\r" not in said.err and "meta-train" not in said.err
    assert "step 2: query loss" in said.out and "step 2: validation accuracy" in said.out


def test_stacked_forward_and_forward_hvp_run(tmp_path, data_root):
    out = tmp_path / "stacked"
    assert run(out, "--forward", "stacked", "--hvp", "forward", "--steps", "2", "--eval_tasks", "10",
               data=data_root) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["forward"], config["hvp"]) == ("stacked", "forward")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--device", "cuda"])
    assert "sees no CUDA device" in capsys.readouterr().err


def test_reg_is_half_lambda():
    assert train_cli.parse_args(["--reg", "0.25"]).lam == 0.5
    assert train_cli.parse_args([]).lam == 2.0
    # the tutorial's underscore spelling and the dashed one are the same option
    assert train_cli.parse_args(["--inner-steps", "7"]).inner_steps == 7


def test_tensorboard_scalars(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert run(out, "--tensorboard", "--steps", "2", "--eval_tasks", "0", data=data_root) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "imaml_ext.train", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "--meta_batch_size" in proc.stdout and "--resume" in proc.stdout


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_maml_algorithms_train_and_evaluate(tmp_path, data_root, algo):
    out = tmp_path / algo
    assert run(out, "--algo", algo, "--steps", "2", "--valid_every", "0", data=data_root) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    assert "cg_residual" not in rows[0] and 0 <= rows[0]["accuracy"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["tasks"] == 12
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == algo and not set(config) & set(IMAML_ONLY)  # it recorded them, unread


@pytest.mark.parametrize("option", [["--cg_iterations", "3"], ["--undamped"], ["--hvp", "forward"],
                                    ["--cg_damping", "1"], ["--lam_damping", "10"], ["--lam", "1"], ["--reg", "1"]])
def test_maml_refuses_imaml_options_given(option, capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--algo", "fomaml", *option])
    err = capsys.readouterr().err
    assert f"--{option[0][2:]} is an option of --algo imaml (its proximal term and CG solve); --algo fomaml" in err
    # a preset's values are not given: they apply to iMAML only
    assert train_cli.parse_args(["--algo", "maml", "--preset", "omniglot-5w1s"]).algo == "maml"


def test_maml_checkpoint_that_recorded_imaml_options_resumes(tmp_path, data_root):
    out = tmp_path / "old-maml"
    assert run(out, "--algo", "maml", "--steps", "4", "--stop_after", "2", "--valid_every", "0", "--eval_tasks", "0",
               data=data_root) == 0
    state = checkpoint(out)
    state["config"].update(lam=2.0, reg=None, cg_iterations=5, cg_damping=1.0, lam_damping=10.0)
    torch.save(state, out / "checkpoint.pt")
    assert run(out, "--algo", "maml", "--steps", "4", "--valid_every", "0", "--eval_tasks", "0", "--resume",
               data=data_root) == 0
    assert not set(json.loads((out / "config.json").read_text())) & set(IMAML_ONLY)


def test_maml_run_differs_from_imaml_run(tmp_path, data_root):
    """--algo really switches the meta-gradient: same seed and tasks, different theta after 2 steps."""
    a, b = tmp_path / "imaml", tmp_path / "maml"
    for out, algo in ((a, "imaml"), (b, "maml")):
        assert run(out, "--algo", algo, "--steps", "2", "--valid_every", "0", "--eval_tasks", "0", data=data_root) == 0
    ma, mb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert any(not torch.equal(ma[k], mb[k]) for k in ma)


def test_two_gloo_processes_equal_one_process(tmp_path, data_root):
    """torchrun --nproc_per_node 2: each process runs half of the meta-batch and theta's
    gradient is averaged in one all-reduce, so the run equals one process with all tasks.
    Compared after one step through Adam's first moment (0.1 x the meta-gradient): later
    parameters differ by Adam's sign-like first steps on gradient entries at rounding level."""
    common = ["--meta_batch_size", "4", "--steps", "1", "--valid_every", "0", "--eval_tasks", "8",
              "--cg_damping", "1", "--lam_damping", "10", "--data", data_root]
    one = tmp_path / "one"
    assert train_cli.main([*TINY, *common, "--out", str(one)]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "imaml_ext.train", *TINY, *common, "--out", str(two)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meta-test accuracy" in proc.stdout and proc.stdout.count("run folder:") == 1  # rank 0 reports
    a, b = checkpoint(one), checkpoint(two)
    assert a["step"] == b["step"] == 1
    moments = [(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"]) for k in a["optimizer"]["state"]]
    assert sum(m.abs().sum() for m, _ in moments) > 0
    for expected, got in moments:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    rows_a, rows_b = rows_without_timing(one), rows_without_timing(two)
    assert len(rows_a) == len(rows_b) == 1
    assert rows_b[0]["loss"] == pytest.approx(rows_a[0]["loss"], rel=1e-5)
    assert rows_b[0]["accuracy"] == pytest.approx(rows_a[0]["accuracy"])


def test_meta_batch_not_divisible_by_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run(tmp_path / "x", "--meta_batch_size", "4") == 2
    assert "--meta_batch_size 4 must be divisible by the 3 processes" in capsys.readouterr().err


def poison_second_batch(monkeypatch):
    """The second training batch gets a NaN pixel in task 1's support images."""
    from imaml_ext.data import TaskSampler

    real_gather = TaskSampler.gather
    calls = {"n": 0}

    def gather(self, idx):
        batch = real_gather(self, idx)
        calls["n"] += 1
        if calls["n"] == 2:
            batch.support_x[1, 0, 0, 3, 3] = float("nan")
        return batch

    monkeypatch.setattr(TaskSampler, "gather", gather)


def test_nonfinite_task_stops_the_run_naming_step_and_task(tmp_path, data_root, monkeypatch, capsys):
    poison_second_batch(monkeypatch)
    out = tmp_path / "nan"
    assert run(out, "--steps", "4", "--valid_every", "0", "--eval_tasks", "0", data=data_root) == 2
    err = capsys.readouterr().err
    assert "non-finite support or query loss, or meta-gradient, in 1 task(s) of steps 1-2" in err
    assert "(the first: step 2, task 1 of its meta-batch)" in err and "--on_nonfinite skip-task" in err
    state = checkpoint(out)  # written at the stop, with the bad task left out of theta's update
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.undo()
    assert run(out, "--steps", "4", "--valid_every", "0", "--eval_tasks", "0", "--resume",
               "--on_nonfinite", "skip-task", data=data_root) == 0
    assert checkpoint(out)["step"] == 4


def test_nonfinite_task_skipped_and_counted(tmp_path, data_root, monkeypatch, capsys):
    poison_second_batch(monkeypatch)
    out = tmp_path / "skip"
    assert run(out, "--steps", "4", "--valid_every", "0", "--eval_tasks", "0", "--on_nonfinite", "skip-task",
               data=data_root) == 0
    assert "in 1 task(s) of steps 1-2" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_tasks"] for r in rows] == [1, 0]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in checkpoint(out)["model"].values())


def test_maml_leaves_nonfinite_tasks_out_of_theta(tmp_path, data_root, capsys):
    """--algo maml counted none and its theta became NaN, --on_nonfinite notwithstanding."""
    out = tmp_path / "maml-nan"
    assert run(out, "--algo", "maml", "--steps", "2", "--valid_every", "0", "--eval_tasks", "0", "--base_lr", "1e30",
               "--on_nonfinite", "skip-task", data=data_root) == 0
    assert "all 6 tasks left out (non-finite)" in capsys.readouterr().out
    assert [r["nonfinite_tasks"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [6]
    assert all(torch.isfinite(v).all() for v in checkpoint(out)["model"].values())


def test_cg_breakdown_warning_without_damping_advises_it():
    from argparse import Namespace

    from imaml_ext.training.window import breakdown_message

    message = breakdown_message(Namespace(cg_damping=0.0, lam_damping=0.0, lam=2.0), 0.75, 1, 10)
    assert "75% of the tasks of steps 1-10" in message and "below -lam = -2" in message
    assert "damping (--cg_damping 1 --lam_damping 10" in message


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_steps_of_only_nonfinite_tasks_log_null_not_zero_in_strict_json(tmp_path, data_root, capsys):
    """--base_lr 1e8 makes every task non-finite: the rows logged loss 0.0 and accuracy 0, and
    metrics.jsonl held bare NaN; results.json's interval over one task was NaN too."""
    out = tmp_path / "all-bad"
    assert run(out, "--steps", "4", "--valid_every", "0", "--eval_tasks", "1", "--base_lr", "1e8",
               "--on_nonfinite", "skip-task", data=data_root) == 0
    said = capsys.readouterr()
    assert "step 2: no loss, all 6 tasks left out (non-finite)" in said.out
    # CG broke down under the default damping, which the warning advised turning on
    assert "the iMAML authors' values" not in said.err
    assert "damping in force (--cg_damping 1 --lam_damping 10)" in said.err and "below -24" in said.err
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    said = [(r["loss"], r["accuracy"], r["support_loss"], r["nonfinite_tasks"]) for r in rows]
    assert said == [(None, None, None, 6)] * 2
    for name in ("config.json", "results.json"):
        strict_json((out / name).read_text())
    assert strict_json((out / "results.json").read_text())["test"]["ci95"] is None
    for line in (out / "invocations.jsonl").read_text().splitlines():
        strict_json(line)
    assert (out / "metrics.csv").read_text().splitlines()[1].startswith("train,2,,,,")


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_sigterm_to_one_of_two_processes_stops_both_and_resume_matches(tmp_path, data_root):
    """A signal that reaches only rank 1 must stop rank 0 too (no rank left waiting in an
    all-reduce), with a checkpoint; resuming gives the uninterrupted run bit for bit."""
    import time

    common = [*TINY, "--meta_batch_size", "4", "--steps", "40", "--valid_every", "0", "--eval_tasks", "0",
              "--checkpoint_every", "2", "--cg_damping", "1", "--lam_damping", "10", "--data", data_root]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "imaml_ext.train", *common, "--out", str(out), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    reference = tmp_path / "reference"
    proc = torchrun(reference)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    out = tmp_path / "signalled"
    proc = torchrun(out)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = [c for agent in _children(proc.pid) for c in [agent] + _children(agent)]
    ranks = {}
    for pid in workers:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = pid
    assert 1 in ranks, f"rank 1 not found among {workers}"
    os.kill(ranks[1], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("stopped at meta-step") == 1  # rank 0 reports
    stopped = checkpoint(out)["step"]
    assert 2 <= stopped < 40

    proc = torchrun(out, "--resume")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert_same_state(checkpoint(reference), checkpoint(out))


def test_gradient_average_weights_each_process_by_its_finite_tasks(monkeypatch):
    """Rank 0 kept 3 finite tasks (mean gradient a), rank 1 kept 1 (mean b): theta's gradient
    must be (3a + b) / 4, the mean over all finite tasks, not (a + b) / 2."""
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    extra = torch.tensor([0.2, 1.0], dtype=torch.float64)
    other = torch.cat([b * 1.0, torch.tensor([0.4, 0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)])

    def all_reduce(flat):  # rank 1's contribution, as gloo would add it
        flat += other

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    param.grad = a.clone()
    got = distributed.Distributed(2, 0, 0).average_gradients_and([param], extra, torch.tensor(3))
    torch.testing.assert_close(param.grad, (3 * a + b) / 4, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(got, torch.tensor([0.3, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("world, local_rank, name, expected", [
    (1, 0, "cuda", "cuda:3"),  # one process: the current GPU (found on an H200: set_device("cuda") raised)
    (2, 1, "cuda", "cuda:1"),  # torchrun: one GPU per process
    (1, 0, "cuda:2", "cuda:2"),
    (1, 0, "cpu", "cpu"),
])
def test_device_gets_an_index_before_set_device(monkeypatch, world, local_rank, name, expected):
    chosen = []

    def set_device(device):  # torch's own refuses an index-less device
        assert device.index is not None, device
        chosen.append(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    device = distributed.Distributed(world, 0, local_rank).device(name)
    assert str(device) == expected
    assert chosen == ([] if expected == "cpu" else [device])


# --------------------------------------------------------------------------- the first hour (issue 19)


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, capsys, where):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = {"file": afile, "under_file": afile / "sub", "proc": Path("/proc/imaml-train-x")}[where]
    if where == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    assert run(out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imaml-train: error: --out {out}") and err.count("\n") == 1, err
    assert "Traceback" not in err and afile.read_text() == "not a folder"


def test_run_folder_files_get_the_mode_open_gives(tmp_path, data_root):
    """Under umask 0022 every file of the run folder is 0644, as open() makes it (mkstemp gave 0600)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        assert run(out, "--steps", "4", "--stop_after", "2", data=data_root) == 0
        assert run(out, "--steps", "4", "--resume", data=data_root) == 0  # checkpoint.prev.pt too
    finally:
        os.umask(old)
    files = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "results.json", "curves.png", "checkpoint.pt",
            "checkpoint.prev.pt"} <= set(files)
    assert files == {name: 0o644 for name in files}


def test_a_stop_inside_a_log_window_logs_a_partial_row_that_resume_replaces(tmp_path, reference_run, data_root):
    """A stop before the first row (--log_every 2) logs its step, marked partial; the resumed run
    logs every window whole, as the uninterrupted run does."""
    out = tmp_path / "early"
    assert run(out, "--scheduler", "cosine", "--stop_after", "1", data=data_root) == 0
    rows = rows_without_timing(out)
    assert [(r["step"], r.get("partial")) for r in rows] == [(1, True)] and 0 < rows[0]["loss"] < 10
    header, row = (out / "metrics.csv").read_text().splitlines()
    assert header.endswith(",partial") and row.startswith("train,1,") and row.endswith(",True")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run(out, "--scheduler", "cosine", "--resume", data=data_root) == 0
    assert rows_without_timing(out) == rows_without_timing(reference_run)


def test_data_errors_name_the_flags(tmp_path, capsys):
    missing = tmp_path / "no-omniglot-here"
    assert run(tmp_path / "out", data=str(missing)) == 2
    err = capsys.readouterr().err
    assert f"--data is {str(missing)!r}" in err and "Pass --download to download" in err
    assert "download=True" not in err and "root=" not in err


def test_unusable_data_or_cache_folder_is_one_line(tmp_path, data_root, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert run(tmp_path / "out", "--download", data=str(afile)) == 2  # was a FileExistsError traceback
    err = capsys.readouterr().err
    assert err.startswith(f"imaml-train: error: --data is {str(afile)!r}, a file, not a folder") and err.count("\n") == 1
    monkeypatch.setenv("IMAML_CACHE", str(afile))  # was a FileExistsError traceback
    assert run(tmp_path / "out", data=data_root) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imaml-train: error: cannot write the image cache in {str(afile)!r}") and err.count("\n") == 1
    assert "set IMAML_CACHE to a writable folder" in err and afile.read_text() == "mine"


def test_sigint_checkpoints_and_exits_130(tmp_path, data_root, monkeypatch, capsys):
    signal_after_step(monkeypatch, 1, signal.SIGINT)  # Ctrl-C
    out = tmp_path / "interrupted"
    assert run(out, data=data_root) == 130
    assert "stopped at meta-step 1 of 6 (SIGINT)" in capsys.readouterr().out
    assert checkpoint(out)["step"] == 1


def test_help_shows_every_default():
    text = arguments.build_parser().format_help()
    for shown in ("classes per task (default: 5)", "(default: 10000)", "proximal inner-loop steps per task (default: 16)",
                  "(default: 1, the iMAML authors' code)", "(default: on)", "(default: 600)", "lambda (default: 2)"):
        assert shown in " ".join(text.split()), shown


@pytest.mark.parametrize("argv", [["--split", "random"], ["--lam", "-1"], ["--steps", "x"], ["--nonsense"]])
def test_every_refusal_is_one_line_without_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("imaml-train: error: ") and err.count("\n") == 1, err


def test_no_progress_prints_the_rows(tmp_path, data_root, capsys):
    assert run(tmp_path / "quiet", "--steps", "4", "--eval_tasks", "0", data=data_root) == 0
    out = capsys.readouterr().out
    assert "step 2: query loss " in out and "step 4: query loss " in out
    assert "step 3: validation accuracy " in out


def test_curves_mark_the_final_meta_test_accuracy(tmp_path, data_root, monkeypatch):
    from matplotlib.axes import Axes

    marks = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, *a, **k: (marks.append((x, y, k.get("label"))),
                                                                        real(self, x, y, *a, **k))[1])
    out = tmp_path / "marked"
    assert run(out, "--steps", "2", data=data_root) == 0
    test = json.loads((out / "results.json").read_text())["test"]
    assert marks == [([2], [test["accuracy"]], f"meta-test, 12 tasks: {test['accuracy']:.2f} ± {test['ci95']:.2f} %")]


def test_help_is_plain_text_and_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text and ":class:" not in text  # RST markup
    assert "(both IEEE float32) (default: torch)" in text  # --tf32's help said "by default" and so no default
    # --data: every place imaml_ext.data searches, in its order (it named $IMAML_DATA, ./data, ../shared/data)
    said = text[text.index("--data DATA"):text.index("--download download")]
    places = ["$IMAML_DATA", "./data", "../shared/data", "the checkout's ../shared/data", "CACHE/data",
              "$IMAML_CACHE or ~/.cache/imaml_ext"]
    assert [said.index(p) for p in places] == sorted(said.index(p) for p in places)


def test_without_matplotlib_the_missing_curves_are_said_once(tmp_path, data_root, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "no-plot"
    assert run(out, "--steps", "2", "--valid_every", "0", "--eval_tasks", "2", data=data_root) == 0
    assert not (out / "curves.png").exists()
    err = capsys.readouterr().err
    assert err.count("curves.png was not written: it needs matplotlib") == 1 and "pip install matplotlib" in err


def test_defaults_are_the_authors_damping_and_undamped_is_one_flag():
    args = train_cli.parse_args([])
    assert (args.cg_damping, args.lam_damping) == (1.0, 10.0)
    args = train_cli.parse_args(["--undamped"])
    assert (args.cg_damping, args.lam_damping) == (0.0, 0.0)
    assert learner.build_imaml(learner.build_model(args), args).cg_damping == 0.0
    assert train_cli.parse_args(["--cg_damping", "0.5"]).lam_damping == 10.0


def test_undamped_with_a_damping_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--undamped", "--lam_damping", "3"])
    assert "--undamped sets --lam_damping 0; got --lam_damping 3.0 as well" in capsys.readouterr().err


def test_evaluate_a_run_folder_with_other_evaluation_options(tmp_path, reference_run, data_root, capsys):
    import shutil

    out = tmp_path / "evaluated"
    shutil.copytree(reference_run, out)
    common = ["--evaluate", str(out), "--device", "cpu", "--data", data_root, "--no-progress"]
    assert train_cli.main([*common, "--eval_tasks", "12", "--eval_batch", "5"]) == 0
    assert train_cli.main([*common, "--eval_tasks", "7", "--no-baseline"]) == 0
    first, second = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert first["test"]["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=1e-9)  # the same 12 tasks
    assert first["baseline"]["accuracy"] == pytest.approx(results["baseline"]["accuracy"], abs=1e-9)
    assert first["step"] == 6 and second["test"]["tasks"] == 7 and "baseline" not in second
    assert "checkpoint at meta-step 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_cli.parse_args([*common, "--ways", "3"])
    assert "only --eval_tasks, --eval_batch, --baseline, --eval_lam, --eval_query, --device, --data, --download, " \
           "--progress may be given " \
           "with it; got --ways" in capsys.readouterr().err
    assert train_cli.main(["--evaluate", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "checkpoint.pt does not exist" in capsys.readouterr().err


def test_resume_extends_a_finished_run_and_may_change_evaluation_options(tmp_path, reference_run, data_root, capsys):
    import math
    import shutil

    out = tmp_path / "extended"
    shutil.copytree(reference_run, out)
    assert run(out, "--scheduler", "cosine", "--resume", "--steps", "10", "--eval_tasks", "7", "--no-baseline",
               data=data_root) == 0
    assert "from --steps 6 to 10, at step 6; the cosine schedule now ends at step 10" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10]
    assert rows_without_timing(out)[:5] == rows_without_timing(reference_run)  # the first 6 steps unchanged
    # From step 6 on, the learning rate follows the cosine over 10 steps.
    for r in train_rows[3:]:
        assert r["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * r["step"] / 10)) / 2, rel=1e-9, abs=1e-15)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10 and results["test"]["tasks"] == 7 and "baseline" not in results
    assert json.loads((out / "results-6-steps.json").read_text()) == json.loads((reference_run / "results.json").read_text())
    assert checkpoint(out)["step"] == 10 and json.loads((out / "config.json").read_text())["steps"] == 10
    assert run(out, "--scheduler", "cosine", "--resume", "--steps", "8", data=data_root) == 2
    assert "--steps 8 is below the checkpoint's step 10" in capsys.readouterr().err


# --------------------------------------------------------------------------- presets


PAPER_5WAY = {"task": "omniglot", "split": "finn", "algo": "imaml", "ways": 5, "inner_steps": 16, "base_lr": 0.1,
              "lam": 2.0, "cg_iterations": 5, "cg_damping": 1.0, "lam_damping": 10.0, "meta_batch_size": 32,
              "hidden_size": 64, "meta_lr": 1e-3, "optimizer": "adam", "scheduler": "none", "steps": 20000,
              "eval_tasks": 600}


@pytest.mark.parametrize("name, ways, shots", [("omniglot-5w1s", 5, 1), ("omniglot-5w5s", 5, 5),
                                               ("omniglot-20w1s", 20, 1), ("omniglot-20w5s", 20, 5)])
def test_each_preset_resolves_to_the_papers_values(name, ways, shots):
    config = train_cli.parse_args(["--preset", name, "--device", "cpu"]).recorded()
    expected = {**PAPER_5WAY, "ways": ways, "shots": shots, "query": shots}
    if ways == 20:  # the paper's Table 3: 25 inner steps for 20-way; MAML's 20-way meta-batch
        expected.update(inner_steps=25, meta_batch_size=16)
    assert {k: config[k] for k in expected} == expected


def test_an_option_given_beside_a_preset_wins():
    args = train_cli.parse_args(["--steps", "50", "--preset", "omniglot-5w5s", "--inner_steps", "3", "--query", "7",
                                 "--device", "cpu"])
    assert (args.steps, args.inner_steps, args.query, args.shots, args.meta_batch_size) == (50, 3, 7, 5, 32)
    assert train_cli.parse_args(["--preset", "omniglot-5w1s", "--reg", "0.25", "--device", "cpu"]).lam == 0.5
    undamped = train_cli.parse_args(["--preset", "omniglot-5w1s", "--undamped", "--device", "cpu"])
    assert (undamped.cg_damping, undamped.lam_damping) == (0.0, 0.0)


def test_preset_goes_into_config_json(tmp_path, data_root):
    out = tmp_path / "preset"
    assert run(out, "--preset", "omniglot-5w1s", "--steps", "1", "--eval_tasks", "0", data=data_root) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "omniglot-5w1s" and config["inner_steps"] == 2 and config["cg_damping"] == 1.0
    assert "preset" not in checkpoint(out)["config"]  # the values it resolved to are what a resume compares


def test_unknown_preset_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--preset", "omniglot-5w2s"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--preset must be one of omniglot-5w1s, omniglot-5w5s, omniglot-20w1s, " \
                                      "omniglot-20w5s, mini-imagenet-5w1s, mini-imagenet-5w5s; got 'omniglot-5w2s'" in err


# --------------------------------------------------------------------------- --time_budget


def test_time_budget_chain_equals_one_run(tmp_path, reference_run, data_root, monkeypatch, capsys):
    """Each meta-step takes one second of a fake clock, and an invocation's first meta-step is free
    of estimates: with --time_budget 2.5 the first invocation (starting the run, through --resume)
    stops before step 3 (step 3 and its validation, estimated from a meta-step's time per task,
    would not fit), the next after step 4 (validated at step 3 in no time), then before step 6 (its
    validation not yet timed in that invocation), and the last one finishes with the final
    evaluation. The result is the uninterrupted run's, bit for bit."""
    from imaml_ext.training import loop
    from imaml_ext.training.time_budget import TimeBudget

    now = {"t": 0.0}
    real_step = batched.IMAML.meta_step

    def one_second_step(self, *batch):
        now["t"] += 1.0
        return real_step(self, *batch)

    monkeypatch.setattr(batched.IMAML, "meta_step", one_second_step)
    monkeypatch.setattr(loop, "TimeBudget", lambda seconds, spent: TimeBudget(seconds, clock=lambda: now["t"], margin=0.1))
    out = tmp_path / "chain"
    stops = []
    for _ in range(5):
        assert run(out, "--scheduler", "cosine", "--resume", "--time_budget", "2.5", data=data_root) == 0
        stops.append(checkpoint(out)["step"])
        if (out / "results.json").exists():
            break
        assert "--time_budget 2.5 s: the next meta-step would not fit" in capsys.readouterr().out
    assert stops == [2, 4, 5, 6]
    assert_same_run(reference_run, out)
    invocations = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert [(i["from_step"], i["to_step"]) for i in invocations] == [(0, 2), (2, 4), (4, 5), (5, 6)]


def test_time_budget_leaves_the_final_evaluation_for_the_next_invocation(tmp_path, reference_run, data_root,
                                                                          monkeypatch, capsys):
    """A fake clock: meta-steps take 1 s, validation 1 s a task. After step 6 the final evaluation
    (2 x 12 tasks, about 24 s) does not fit in what is left of 30 s: the invocation stops with the
    checkpoint at step 6 and no results; the next one only evaluates, as the uninterrupted run did."""
    from imaml_ext.training import loop
    from imaml_ext.training.time_budget import TimeBudget

    now = {"t": 0.0}
    real_step, real_evaluate = batched.IMAML.meta_step, loop.evaluate

    def one_second_step(self, *batch):
        now["t"] += 1.0
        return real_step(self, *batch)

    def validation(imaml, sampler, indices, batch):
        now["t"] += float(indices.classes.shape[0])
        return real_evaluate(imaml, sampler, indices, batch)

    monkeypatch.setattr(batched.IMAML, "meta_step", one_second_step)
    monkeypatch.setattr(loop, "evaluate", validation)
    monkeypatch.setattr(loop, "TimeBudget", lambda seconds, spent: TimeBudget(seconds, clock=lambda: now["t"], margin=0.1))
    out = tmp_path / "late"
    assert run(out, "--scheduler", "cosine", "--time_budget", "30", data=data_root) == 0
    assert "stopped at meta-step 6 of 6 (--time_budget 30 s: the final evaluation would not fit" in capsys.readouterr().out
    assert checkpoint(out)["step"] == 6 and not (out / "results.json").exists()
    assert run(out, "--scheduler", "cosine", "--resume", "--time_budget", "30", data=data_root) == 0
    a = json.loads((reference_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["baseline"] == b["baseline"]


def test_real_time_budget_run_completes(tmp_path, data_root):
    out = tmp_path / "budget"
    assert run(out, "--time_budget", "3600", "--steps", "2", data=data_root) == 0
    assert json.loads((out / "results.json").read_text())["test"]["tasks"] == 12


def test_resume_with_time_budget_refuses_a_config_json_of_another_run(tmp_path, capsys):
    out = tmp_path / "started"
    out.mkdir()
    config = train_cli.parse_args([*TINY, "--out", str(out)]).recorded()
    (out / "config.json").write_text(json.dumps({**config, "torch": torch.__version__}))
    before = snapshot(out)
    assert run(out, "--resume", "--time_budget", "60", "--lam", "0.5") == 2
    assert "config.json in" in (err := capsys.readouterr().err) and "--lam: run 2.0, now 0.5" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_time_budget_must_be_positive(value, capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--time_budget", value, "--device", "cpu"])
    assert "--time_budget must be a number of seconds > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- --eval_lam


def test_eval_lam_zero_fine_tunes_without_the_proximal_term(tmp_path, reference_run, data_root):
    import shutil

    args = train_cli.parse_args(["--eval_lam", "0", "--device", "cpu"])
    assert isinstance(learner.build_evaluator(learner.build_model(args), args), batched.MAML)
    args = train_cli.parse_args(["--eval_lam", "0.5", "--device", "cpu"])
    assert learner.build_evaluator(learner.build_model(args), args).lam == 0.5
    out = tmp_path / "sgd"
    shutil.copytree(reference_run, out)
    assert train_cli.main(["--evaluate", str(out), "--device", "cpu", "--data", data_root, "--eval_tasks", "12",
                           "--eval_batch", "5", "--eval_lam", "0"]) == 0
    sgd = json.loads((out / "evaluations.jsonl").read_text())
    proximal = json.loads((out / "results.json").read_text())
    assert sgd["eval_lam"] == 0.0 and proximal["eval_lam"] == 2.0
    assert sgd["test"]["accuracy"] != proximal["test"]["accuracy"]


# --------------------------------------------------------------------------- --eval_query


def test_eval_query_sets_the_query_images_of_the_final_evaluation_and_evaluate(tmp_path, data_root, monkeypatch):
    """The iMAML authors' protocol evaluates with as many query images per class as shots: the
    same test tasks, with --eval_query query images; training and validation keep --query."""
    from imaml_ext.batched import IMAML

    seen = []
    real = IMAML.evaluate
    monkeypatch.setattr(IMAML, "evaluate", lambda self, sx, sy, qx, qy, *a, **k: (
        seen.append((sx.shape[1], qx.shape[1])), real(self, sx, sy, qx, qy, *a, **k))[1])
    out = tmp_path / "q3"
    assert run(out, "--steps", "2", "--valid_every", "2", "--eval_tasks", "5", "--eval_query", "3",
               "--forward", "loop", data=data_root) == 0
    ways = 5
    # validation: 2 query images per class (--query); the final evaluation: 3 (--eval_query)
    assert {q for _, q in seen[:1]} == {ways * 2} and {q for _, q in seen[-2:]} == {ways * 3}
    results = json.loads((out / "results.json").read_text())
    assert results["eval_query"] == 3 and json.loads((out / "config.json").read_text())["eval_query"] == 3
    seen.clear()
    assert train_cli.main(["--evaluate", str(out), "--eval_query", "1", "--eval_tasks", "5", "--no-baseline",
                           "--device", "cpu", "--data", data_root, "--no-progress"]) == 0
    assert {q for _, q in seen} == {ways * 1}
    evaluation = json.loads((out / "evaluations.jsonl").read_text())
    assert evaluation["eval_query"] == 1 and evaluation["eval_lam"] == 2.0


def test_eval_query_is_checked_and_old_checkpoints_without_it_still_evaluate(tmp_path, reference_run, data_root,
                                                                             capsys):
    import shutil

    for argv, said in ((["--eval_query", "0"], "--eval_query must be >= 1; got 0"),
                       (["--shots", "5", "--eval_query", "16"], "--shots + --eval_query must be <= 20")):
        with pytest.raises(SystemExit):
            train_cli.parse_args(argv)
        assert said in capsys.readouterr().err
    out = tmp_path / "old"
    shutil.copytree(reference_run, out)
    state = checkpoint(out)
    del state["config"]["eval_query"]  # a checkpoint from before the option
    torch.save(state, out / "checkpoint.pt")
    common = ["--evaluate", str(out), "--eval_tasks", "4", "--device", "cpu", "--data", data_root, "--no-progress"]
    assert train_cli.main([*common, "--eval_query", "20"]) == 2
    assert "the run's --shots is 1; got --eval_query 20" in capsys.readouterr().err
    assert train_cli.main(common) == 0
    assert json.loads((out / "evaluations.jsonl").read_text())["eval_query"] == 2  # the run's --query
    assert run(out, "--scheduler", "cosine", "--steps", "7", "--resume", "--eval_query", "4", data=data_root) == 0
    assert json.loads((out / "results.json").read_text())["eval_query"] == 4
