"""Mini-ImageNet (``imaml-train --task mini-imagenet``): the restricted reading of learn2learn's
cache pickles and its errors, the task sampler, Conv4 on 84x84 RGB and ResNet-12, and short
command-line runs on small generated files of the real format (84x84x3 uint8)."""

from __future__ import annotations

import json
import os
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from imaml_ext import IMAML, TaskBatchedModule
from imaml_ext import train as train_cli
from imaml_ext.training import learner
from imaml_ext.data import (
    MiniImagenetSampler,
    find_mini_imagenet,
    load_mini_imagenet,
    mini_imagenet_tasks,
    read_mini_imagenet,
)
from imaml_ext.data.mini_imagenet import FILES
from imaml_ext.models import Conv4, ResNet12

CLASSES, PER_CLASS = 10, 25
# A few meta-steps of a tiny learner; every output path of a run still runs.
TINY = ["--task", "mini-imagenet", "--hidden_size", "4", "--meta_batch_size", "2", "--inner_steps", "2",
        "--cg_iterations", "2", "--query", "2", "--log_every", "2", "--valid_every", "0", "--no-progress",
        "--device", "cpu", "--forward", "loop", "--hvp", "reverse"]  # fixed: "auto" times, see test_train's TINY


def split_contents(rng, classes=CLASSES, per_class=PER_CLASS, shuffle=False):
    """learn2learn's dict: uint8 [N, 84, 84, 3] images, each class around its own colour (of a
    3-level grid, so the classes are learnable), and class name -> rows."""
    levels = np.array([40, 128, 215])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    colours = grid[rng.permutation(len(grid))[:classes]]
    images = colours[:, None, None, None, :] + rng.normal(0, 25, (classes, per_class, 84, 84, 3))
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(-1, 84, 84, 3)
    rows = rng.permutation(classes * per_class) if shuffle else np.arange(classes * per_class)
    class_dict = {f"n{c:08d}": [int(r) for r in rows[c * per_class:(c + 1) * per_class]] for c in range(classes)}
    return {"image_data": images, "class_dict": class_dict}


def write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_data(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in FILES.values():
        write_pickle(folder / name, split_contents(rng))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data folder holding mini-imagenet/ with the three files (fixed contents: the learning run
    below is then the same on every run)."""
    root = tmp_path_factory.mktemp("data")
    write_data(root / "mini-imagenet")
    return root


def run(out, *extra, data):
    return train_cli.main([*TINY, "--out", str(out), "--data", str(data), *extra])


# --------------------------------------------------------------------------- reading the files


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_reads_each_file_grouped_by_class(tmp_path, fresh_seed, protocol, shuffle):
    """Protocol 2 pickles bytes through _codecs.encode, 5 arrays through _frombuffer; NumPy int
    indices pickle as NumPy scalars: all load."""
    data = split_contents(np.random.default_rng(fresh_seed), shuffle=shuffle)
    data["class_dict"] = {k: [np.int64(r) for r in v] if i % 2 else v
                          for i, (k, v) in enumerate(data["class_dict"].items())}
    split = read_mini_imagenet(write_pickle(tmp_path / "f.pkl", data, protocol))
    assert split.images.shape == (CLASSES, PER_CLASS, 84, 84, 3) and split.images.dtype == np.uint8
    assert split.classes == tuple(data["class_dict"])
    for c, rows in enumerate(data["class_dict"].values()):
        assert np.array_equal(split.images[c], data["image_data"][np.array(rows, dtype=np.int64)])


def test_the_files_may_be_in_the_folder_itself(tmp_path, data_root):
    assert find_mini_imagenet(data_root) == data_root / "mini-imagenet"
    flat = write_data(tmp_path / "flat")
    assert find_mini_imagenet(flat) == flat
    splits = load_mini_imagenet(flat)
    assert list(splits) == ["train", "validation", "test"]
    assert all(s.path == flat / FILES[name] for name, s in splits.items())


class RunsCode:
    """What a malicious pickle holds: unpickling calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    data = split_contents(np.random.default_rng(0))
    data["class_dict"]["n00000000"] = RunsCode(marker)
    path = write_pickle(tmp_path / "evil" / FILES["train"], data)
    with pytest.raises(pickle.UnpicklingError) as error:
        read_mini_imagenet(path)
    assert str(path) in str(error.value) and f"global {os.system.__module__}.system" in str(error.value)
    assert not marker.exists()
    # The command line refuses it too, before training and naming the file.
    for split in ("validation", "test"):
        write_pickle(tmp_path / "evil" / FILES[split], split_contents(np.random.default_rng(1)))
    assert run(tmp_path / "out", "--steps", "1", data=tmp_path / "evil") == 2
    err = capsys.readouterr().err
    assert err.startswith("imaml-train: error: ") and str(path) in err and "refused to load global" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_of_any_other_class_is_refused(tmp_path):
    data = split_contents(np.random.default_rng(0))
    data["class_dict"]["n00000001"] = [Fraction(1, 3)]
    path = write_pickle(tmp_path / "f.pkl", data)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load global fractions\.Fraction"):
        read_mini_imagenet(path)


@pytest.mark.parametrize("keep", [lambda n: 10, lambda n: n // 2, lambda n: n - 1],
                         ids=["head", "half", "no-stop"])
def test_a_truncated_file_names_it(tmp_path, keep):
    path = write_pickle(tmp_path / "cut.pkl", split_contents(np.random.default_rng(0), classes=2, per_class=3))
    whole = path.read_bytes()
    path.write_bytes(whole[: keep(len(whole))])
    with pytest.raises(ValueError, match="truncated or damaged") as error:
        read_mini_imagenet(path)
    assert str(path) in str(error.value)


def _with(**changes):
    data = split_contents(np.random.default_rng(0), classes=3, per_class=4)
    for key, value in changes.items():
        data[key] = value(data) if callable(value) else value
    return data


@pytest.mark.parametrize("contents, expected, got", [
    ([1, 2], "expected a dict with 'image_data' (uint8 [N, 84, 84, 3])", "got list"),
    ({"image_data": np.zeros((1, 84, 84, 3), np.uint8)}, "expected a dict", "without 'class_dict'"),
    (_with(image_data=np.zeros((12, 32, 32, 3), np.uint8)), "'image_data' must be uint8 [N, 84, 84, 3]",
     "got uint8 [12, 32, 32, 3]"),
    (_with(image_data=np.zeros((12, 84, 84, 3), np.float32)), "'image_data' must be uint8",
     "got float32 [12, 84, 84, 3]"),
    (_with(image_data=[[0]]), "'image_data' must be a NumPy array", "got list"),
    (_with(class_dict={"a": [0, 12]}), "'class_dict'['a'] must index rows 0..11", "got indices from 0 to 12"),
    (_with(class_dict={"a": [0, 1], "b": [2]}), "every class must have as many images", "got 2 for 'a' and 1 for 'b'"),
    (_with(class_dict={"a": [0, 1], "b": [1, 2]}), "in more than one class", "each image must belong to one class"),
    (_with(class_dict={"a": [0.0, 1.0]}), "must be a non-empty list of int row indices", "got float64"),
    (_with(class_dict={}), "'class_dict' must be a non-empty dict", "got dict (empty)"),
])
def test_wrong_contents_say_what_was_expected_and_what_came(tmp_path, contents, expected, got):
    path = write_pickle(tmp_path / "wrong.pkl", contents)
    with pytest.raises(ValueError) as error:
        read_mini_imagenet(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and got in message, message


def test_missing_files_name_the_folder_and_the_files(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        find_mini_imagenet(empty)
    message = str(error.value)
    assert str(empty / "mini-imagenet") in message and all(name in message for name in FILES.values())
    assert "not downloaded" in message and "not freely redistributable" in message
    write_pickle(empty / "mini-imagenet" / FILES["train"], [])  # some of them: the rest are named
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-validation.pkl, mini-imagenet-cache-test.pkl "
                                                "missing"):
        find_mini_imagenet(empty)
    # The command line: the flag, the folder and the files, before any run folder is made.
    assert run(tmp_path / "out", "--steps", "1", data=tmp_path / "nothing") == 2
    err = capsys.readouterr().err
    assert f"--data is {str(tmp_path / 'nothing')!r}" in err and FILES["test"] in err and "root=" not in err
    assert not (tmp_path / "out").exists()
    # Without --data: $IMAML_DATA, else the search paths, named.
    monkeypatch.setenv("IMAML_DATA", str(empty / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"\$IMAML_DATA is "):
        find_mini_imagenet()


# --------------------------------------------------------------------------- the sampler


def test_sampler_batches(data_root, fresh_seed):
    splits = load_mini_imagenet(data_root)
    tasks = mini_imagenet_tasks(5, 2, 3, splits=splits, seed=fresh_seed)
    assert isinstance(tasks.train, MiniImagenetSampler) and "image_shape=[3, 84, 84]" in repr(tasks.train)
    indices = tasks.test.sample_indices(4)
    sx, sy, qx, qy = tasks.test.gather(indices)
    assert sx.shape == (4, 10, 3, 84, 84) and qx.shape == (4, 15, 3, 84, 84)
    assert sx.dtype == qx.dtype == torch.float32 and sx.is_contiguous()
    assert sy.shape == (4, 10) and qy.shape == (4, 15)
    for t in range(4):
        assert sorted(sy[t].tolist()) == sorted(list(range(5)) * 2)
        assert sorted(qy[t].tolist()) == sorted(list(range(5)) * 3)
    # Each image is its source pixel for pixel, uint8 / 255, channels first; support and query distinct.
    source = torch.from_numpy(splits["test"].images).permute(0, 1, 4, 2, 3).float() / 255
    for t in range(4):
        for w in range(5):
            c, drawers = indices.classes[t, w], indices.drawers[t, w]
            label = indices.labels[t, w]
            assert torch.equal(sx[t, sy[t] == label], source[c, drawers[:2]])
            assert torch.equal(qx[t, qy[t] == label], source[c, drawers[2:]])
            assert len(set(drawers.tolist())) == 5


def test_sampler_is_seeded_and_replays_from_its_state(data_root, fresh_seed):
    splits = load_mini_imagenet(data_root)
    a = mini_imagenet_tasks(5, 1, 2, splits=splits, seed=fresh_seed)
    b = mini_imagenet_tasks(5, 1, 2, splits=splits, seed=fresh_seed)
    for x, y in zip(a.train.sample(3), b.train.sample(3)):
        assert torch.equal(x, y)
    state = a.train.generator.get_state()  # what a checkpoint keeps
    first = a.train.sample(3)
    a.train.generator.set_state(state)
    for x, y in zip(first, a.train.sample(3)):
        assert torch.equal(x, y)
    # The three splits draw from their own streams (omniglot_tasks' seeding).
    assert not torch.equal(a.validation.sample_indices(3).drawers, a.test.sample_indices(3).drawers)


# --------------------------------------------------------------------------- the models


def test_conv4_on_84x84_rgb_and_unchanged_on_omniglot():
    conv = Conv4(5, 32, in_channels=3, image_size=84)
    assert conv.head.in_features == 32 * 5 * 5  # MAML's Mini-ImageNet network: 800 features
    assert conv(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    torch.manual_seed(0)
    default = Conv4(5, 8)
    torch.manual_seed(0)
    omniglot = Conv4(5, 8, in_channels=1, image_size=28)
    assert default.head.in_features == 8
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), omniglot.parameters()))
    with pytest.raises(ValueError, match="Conv4: image_size must be >= 16"):
        Conv4(5, 8, image_size=8)


def test_resnet12_widths_and_inputs():
    net = ResNet12(5)
    widths = [block.conv1.out_channels for block in net.features[:4]]
    assert widths == [64, 160, 320, 640] and net.head.in_features == 640
    assert all(not m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert [block.conv1.out_channels for block in ResNet12(5, hidden_size=4).features[:4]] == [4, 10, 20, 40]
    assert ResNet12(5, 2, in_channels=1)(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    with pytest.raises(ValueError, match="ResNet12: hidden_size must be an int >= 1; got 0"):
        ResNet12(5, 0)


@pytest.mark.parametrize("forward", ["vmap", "loop"])
def test_resnet12_task_batched_forward_is_each_tasks_own(forward):
    """Each task's parameters and batch statistics: the task-batched forward equals one plain
    forward per task (float64)."""
    model = ResNet12(5, 2).double()
    T = 3
    batched = TaskBatchedModule(model, T, forward)
    phi = [p + 0.1 * torch.randn_like(p) for p in batched.expand_theta()]
    x = torch.rand(T, 4, 3, 84, 84, dtype=torch.float64)
    out = batched(phi, x)
    for t in range(T):
        expected = functional_call(model, dict(zip(batched.names, (p[t] for p in phi))), (x[t],))
        torch.testing.assert_close(out[t], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("task, model", [("mini-imagenet", "conv4"), ("mini-imagenet", "resnet12"),
                                         ("omniglot", "resnet12")])
def test_each_model_runs_the_meta_step(task, model):
    """--model resnet12 works with either task: the input (channels, side) comes from --task."""
    args = train_cli.parse_args(["--task", task, "--model", model, "--hidden_size", "2", "--inner_steps", "2",
                                 "--cg_iterations", "2", "--device", "cpu"])
    net = learner.build_model(args)
    assert isinstance(net, ResNet12 if model == "resnet12" else Conv4)
    channels, side = (3, 84) if task == "mini-imagenet" else (1, 28)
    imaml = learner.build_imaml(net, args)
    assert isinstance(imaml, IMAML)
    labels = torch.arange(5).repeat(2, 1)
    result = imaml.meta_step(torch.rand(2, 5, channels, side, side), labels, torch.rand(2, 5, channels, side, side),
                             labels)
    assert torch.isfinite(result.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- the command line


def test_presets_and_refusals(capsys):
    args = train_cli.parse_args(["--preset", "mini-imagenet-5w1s", "--device", "cpu"])
    assert (args.task, args.model, args.hidden_size, args.ways, args.shots, args.query) == \
           ("mini-imagenet", "conv4", 32, 5, 1, 15)
    assert (args.lam, args.inner_steps, args.cg_iterations, args.meta_batch_size) == (2.0, 16, 5, 4)
    five = train_cli.parse_args(["--preset", "mini-imagenet-5w5s", "--model", "resnet12", "--device", "cpu"])
    assert (five.shots, five.meta_batch_size, five.model) == (5, 2, "resnet12")
    assert train_cli.parse_args(["--task", "mini-imagenet", "--shots", "5", "--query", "30"]).query == 30  # no 20 cap
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--task", "mini-imagenet", "--download"])
    assert "Mini-ImageNet is never downloaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--model", "resnet18"])
    assert "invalid choice: 'resnet18'" in capsys.readouterr().err


def test_counts_beyond_the_files_are_refused_naming_them(tmp_path, data_root, capsys):
    assert run(tmp_path / "a", "--ways", "11", data=data_root) == 2
    assert "--ways 11 is more than the 10 classes of the Mini-ImageNet train split" in capsys.readouterr().err
    assert run(tmp_path / "b", "--shots", "5", "--query", "21", data=data_root) == 2
    assert "--shots + --query must be <= 25" in capsys.readouterr().err


def test_a_short_run_learns_above_chance(tmp_path, data_root):
    """24 meta-steps on the generated classes: the meta-learned init, adapted to 30 tasks of the
    test file's classes, is well above 5-way chance (20 %) and above the same adaptation from the
    random init (62.7 % against 47.3 % on the 2-core CPU; 63-75 % against 47-56 % over seeds 0-2)."""
    out = tmp_path / "learn"
    assert run(out, "--steps", "24", "--hidden_size", "8", "--meta_lr", "0.003", "--inner_steps", "4",
               "--log_every", "8", "--eval_tasks", "30", "--eval_batch", "15", data=data_root) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["tasks"] == 30
    assert results["test"]["accuracy"] > 40.0 and results["test"]["accuracy"] > results["baseline"]["accuracy"], results
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "mini-imagenet" and config["model"] == "conv4"


def test_resume_is_bit_exact(tmp_path, data_root):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--steps", "4", "--inner_steps", "1", "--checkpoint_every", "2", "--eval_tasks", "0"]
    assert run(whole, *common, data=data_root) == 0
    assert run(parts, *common, "--stop_after", "2", data=data_root) == 0
    assert run(parts, *common, "--resume", data=data_root) == 0
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (whole, parts))
    assert a["step"] == b["step"] == 4 and torch.equal(a["sampler"], b["sampler"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resnet12_trains_from_the_command_line(tmp_path, data_root):
    out = tmp_path / "resnet"
    assert run(out, "--model", "resnet12", "--hidden_size", "2", "--steps", "2", "--inner_steps", "1",
               "--eval_tasks", "2", data=data_root) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "resnet12"
    assert "features.3.conv3.weight" in torch.load(out / "checkpoint.pt", weights_only=True)["model"]
