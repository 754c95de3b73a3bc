"""The presets (imaml_ext/training/presets.py): the Omniglot ones evaluate as the iMAML authors'
measure_accuracy.py does (lambda 0 at test time), and a preset run resumes across that change."""

from __future__ import annotations

import json

import pytest

from imaml_ext import train as train_cli
from imaml_ext.data import find_data_root
from imaml_ext.training import presets

OMNIGLOT = [name for name in presets.PRESETS if name.startswith("omniglot-")]
TINY = ["--hidden_size", "8", "--meta_batch_size", "2", "--inner_steps", "2", "--cg_iterations", "2", "--steps", "2",
        "--eval_tasks", "4", "--valid_every", "0", "--no-progress", "--device", "cpu", "--forward", "loop",
        "--hvp", "reverse"]


@pytest.mark.parametrize("name", OMNIGLOT)
def test_omniglot_presets_evaluate_with_lambda_0(name):
    assert train_cli.parse_args(["--preset", name, "--device", "cpu"]).eval_lam == 0.0
    given = train_cli.parse_args(["--preset", name, "--eval_lam", "2", "--device", "cpu"])
    assert given.eval_lam == 2.0  # an option given beside the preset wins
    assert train_cli.parse_args(["--preset", name, "--algo", "maml", "--device", "cpu"]).eval_lam == 0.0


def test_without_a_preset_the_evaluation_adapts_as_training():
    assert train_cli.parse_args(["--device", "cpu"]).eval_lam is None


def test_a_preset_run_from_before_eval_lam_resumes_and_evaluates_with_lambda_0(tmp_path, monkeypatch):
    """A run started when the preset had no eval_lam (so the checkpoint holds None) resumes with
    today's preset, since eval_lam is an evaluation option, and its final evaluation uses lambda 0."""
    try:
        data = str(find_data_root())
    except FileNotFoundError as error:
        pytest.skip(f"Omniglot not found: {error}")
    out = tmp_path / "run"
    common = ["--preset", "omniglot-5w1s", *TINY, "--data", data, "--out", str(out)]
    before = {k: v for k, v in presets.PRESETS["omniglot-5w1s"].items() if k != "eval_lam"}
    with monkeypatch.context() as patch:
        patch.setitem(presets.PRESETS, "omniglot-5w1s", before)
        assert train_cli.main([*common, "--stop_after", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["eval_lam"] is None
    assert train_cli.main([*common, "--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["eval_lam"] == 0.0 and results["test"]["tasks"] == 4
