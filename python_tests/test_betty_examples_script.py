"""scripts/betty_examples.py's own parts (no Betty program runs here: the script is not part of CI)."""

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "betty_examples.py"
spec = importlib.util.spec_from_file_location("betty_examples_script", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_rewrite_swaps_the_imports_and_moves_cuda_strings_to_the_cpu():
    source = ('import betty\nfrom betty.engine import Engine\n    from betty.problems import X\n'
              'import bettyx\nname = "betty.engine"\ndevice = torch.device("cuda:0")\nd = \'cuda\'\n'
              'x = x.cuda()\nif torch.cuda.is_available(): pass\n')
    ours = script.rewrite(source, imaml=True)
    assert ours.splitlines()[:5] == ["import imaml_ext", "from imaml_ext.engine import Engine",
                                     "    from imaml_ext.problems import X", "import bettyx", 'name = "betty.engine"']
    assert 'torch.device("cpu")' in ours and "d = 'cpu'" in ours and "x.cuda()" in ours
    assert "torch.cuda.is_available()" in ours
    theirs = script.rewrite(source, imaml=False)
    assert "from betty.engine import Engine" in theirs and 'torch.device("cpu")' in theirs


def test_labels_are_unique_and_selected_by_name_or_folder():
    labels = [script.label(v, p) for v, p, *_ in script.PROGRAMS]
    assert len(labels) == len(set(labels))
    assert script.label("0.2", "examples/robust_nas/dsrna_search.py") == "0.2/robust_nas/dsrna_search"
    assert script.label("0.1.1", "betty/test_install.py") == "0.1.1/test_install"
    assert script.label("0.2", "tutorial/1_quick_start.py") == "0.2/tutorial/1_quick_start"
    assert script.select(None, labels) == labels
    assert script.select("0.2/test_install, 0.1.1/tutorial/", labels) == [
        "0.1.1/tutorial/1_quick_start", "0.1.1/tutorial/2_validation", "0.1.1/tutorial/3_logging",
        "0.1.1/tutorial/4_memory_optimization", "0.2/test_install"]
    with pytest.raises(ValueError, match=r"--only: no program '0.3/test_install', 'tutorial'; the programs are: "):
        script.select("0.3/test_install,tutorial,0.2/test_install", labels)


def test_every_program_is_run_or_listed_with_its_reason():
    """Each version's programs: run, a byte-for-byte copy, or listed as not run (with a reason)."""
    run = {(v, p) for v, p, *_ in script.PROGRAMS}
    listed = {(v, p) for versions, p, why in script.NOT_RUN for v in versions.split(", ") if why}
    copies = {(v, p) for v, p, _ in script.SAME_AS}
    assert not run & listed and not run & copies
    assert ("0.2", "examples/logistic_regression_hpo/test.py") in run  # unlike 0.1.1's, not test_install's copy


@pytest.mark.parametrize("argv, message", [
    ([], "give --sdist (Betty 0.1.1's programs), --source (Betty 0.2's) or both"),
    (["--sdist", "{tmp}"], "--betty None: no betty/ package there"),
    (["--source", "{tmp}/nowhere"], "--source {tmp}/nowhere: no such file or folder"),
    (["--source", "{tmp}", "--backends", "betty,jax"], "--backends betty,jax: expected betty, imaml_ext or both"),
    (["--source", "{tmp}", "--only", "0.1.1/test_install"], "--only: no program '0.1.1/test_install'"),
])
def test_argument_errors_name_the_argument(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        script.parse([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_unpack_takes_a_folder_a_tarball_or_a_bare_repository(tmp_path):
    tree = tmp_path / "betty-ml-0.1.1"
    (tree / "betty").mkdir(parents=True)
    (tree / "betty" / "test_install.py").write_text("print('hello')\n")
    assert script.unpack(str(tree), tmp_path / "a") == tree
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    assert (script.unpack(str(tmp_path / "b.tar.gz"), tmp_path / "b") / "betty" / "test_install.py").is_file()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(git + command, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(tree), str(tmp_path / "c.git")], check=True)
    assert (script.unpack(str(tmp_path / "c.git"), tmp_path / "c") / "betty" / "test_install.py").is_file()
    with pytest.raises(ValueError, match="not a folder holding betty/, a .tar.gz, or a bare git repository"):
        script.unpack(str(tmp_path / "a"), tmp_path / "d")


def test_agreement_counts_the_calls_that_return_the_same_loss():
    a = {"history": {"inner": [1.0, 2.0, 3.0], "outer": [0.5, 0.25]}}
    assert script.agreement(a, a) == "outer: all 2"
    b = {"history": {"inner": [1.0, 2.00001, 3.5, 4.0], "outer": [0.5, 0.25]}}
    assert script.agreement(a, b) == "inner: 2 of 3 / 4"
    assert script.agreement(a, {"history": {"other": [1.0]}}) == ""


def test_launch_torchrun_runs_the_scale_out_programs_with_their_strategy(tmp_path):
    assert script.launcher("python") == [sys.executable]
    assert script.launcher("torchrun:2") == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2"]
    (tmp_path / "betty").mkdir()
    args = script.parse(["--source", str(tmp_path), "--sdist", str(tmp_path), "--betty", str(tmp_path),
                         "--launch", "torchrun:2"])
    assert args.processes == 2 and args.argv[-2:] == ["--launch", "torchrun:2"]
    plan = {name: (strategy, flags, dict(replacements))
            for name, strategy, _, _, flags, replacements, _ in script.programs(2)}
    assert args.only == list(plan)
    assert plan["0.2/tutorial/5_distributed_training:zero"][:2] == ("zero", ["--strategy", "zero"])
    assert {name.split(":")[1] for name in plan} == {"distributed", "zero", "fsdp"}
    memory = plan["0.1.1/tutorial/4_memory_optimization:distributed"]
    assert memory[0] == "distributed=True" and "distributed = True" not in memory[2]  # kept, as fp16 is
    assert not any("fp16" in old or "precision" in old for _, _, replacements in plan.values() for old in replacements)
    one = [name for name, *_ in script.programs(1)]
    assert one == [script.label(v, p) for v, p, *_ in script.PROGRAMS] and not set(one) & set(plan)
    assert script.parse(["--source", str(tmp_path), "--launch", "torchrun:2", "--only",
                         "0.2/tutorial/5_distributed_training:fsdp"]).only == ["0.2/tutorial/5_distributed_training:fsdp"]


@pytest.mark.parametrize("launch", ["torchrun:1", "torchrun", "mpirun:2", "torchrun:two"])
def test_launch_errors_name_the_option(tmp_path, capsys, launch):
    with pytest.raises(SystemExit) as exit_:
        script.parse(["--source", str(tmp_path), "--launch", launch])
    assert exit_.value.code == 2
    assert f"--launch {launch}: expected python or torchrun:N with N >= 2 processes" in capsys.readouterr().err


def test_ranks_outputs_are_read_apart_and_their_parameters_compared():
    out = "\n".join([
        "RANK1 FINAL_LOSS inner 0.5", "RANK0 FINAL_LOSS inner 0.25", "RANK0 LOSSES inner 1,0.25",
        "RANK0 PARAMS inner 0123abcd 1.5", "RANK1 PARAMS inner 0123abcd 1.5", "RANK1 LOSSES inner 2,0.5",
        "RANK0 PARAMS outer 99 -2", "RANK1 PARAMS outer 98 -2.000001", "RANK1 RAISED ValueError: no ranks"])
    ranks = script.outcome(out)
    assert ranks[0]["losses"] == {"inner": 0.25} and ranks[1]["history"] == {"inner": [2.0, 0.5]}
    assert ranks[1]["raised"] == "ValueError: no ranks" and ranks[0]["raised"] == ""
    result = {"rc": 0, "ranks": ranks}
    assert script.rank_parameters(result, 2) == ("inner: same on 2 ranks (sum 1.5); "
                                                 "outer: differ (sums -2 / -2.000001)")
    assert script.rank_parameters(result, 3) == "-" and script.rank_parameters({**result, "rc": 1}, 2) == "-"
    assert script.rank_losses(result) == "rank 0: inner 0.25; rank 1: inner 0.5"
    assert script.outcome("FINAL_LOSS x 1.5\nRAISED AssertionError")[0] == {
        "losses": {"x": 1.5}, "history": {}, "params": {}, "raised": "AssertionError"}
    summary = "ValueError: boom\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \nexit"
    assert script.failure(1, summary + "\nRANK1 RAISED ValueError: boom", ranks) == "ValueError: no ranks"
    assert script.failure(1, summary, {}) == "ValueError: boom"
    assert script.failure("timeout", "RuntimeError: x\ntimed out after 9 s", {}) == "timed out after 9 s"
