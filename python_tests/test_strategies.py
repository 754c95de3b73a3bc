"""Betty's scale-out strategies on torch.distributed (imaml_ext/strategies.py): two gloo
processes launched by torchrun learn what one process learns on the same global batch, in
float64; every combination that cannot run is one clear error and leaves no process group."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from imaml_ext import Config, Engine, EngineConfig, ImplicitProblem, IterativeProblem

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import strategy_program  # noqa: E402

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
@pytest.mark.parametrize("strategy, hypergradient, roll_back", [
    ("distributed", "cg", False), ("zero", "darts", False), ("fsdp", "cg", True), ("accelerate", "cg", True),
])
def test_two_processes_equal_one_on_the_global_batch(tmp_path, strategy, hypergradient, roll_back):
    if strategy == "accelerate":
        pytest.importorskip("accelerate")
    out = tmp_path / "result.pt"
    paths = [str(HERE.parent), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(HERE / "strategy_program.py"), strategy,
                    hypergradient, "4", str(out)] + ["roll_back"] * roll_back, check=True, env=env, timeout=240,
                   capture_output=True)
    ranks = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    # the same batches, two ranks' worth each
    single = strategy_program.run("default", hypergradient, 8, roll_back=roll_back)
    for name in ("lower", "upper"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # the ranks agree
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-10, atol=1e-12)
    # FSDP's ranks step their shards of the 3-vector (torch.chunk's 2 + 1) and keep Adam's moments for them
    shards = {"fsdp": ([2, 2], [1, 1])}.get(strategy, ([3, 3], [3, 3]))
    assert (ranks[0]["local"], ranks[1]["local"]) == shards
    # and the run moved: a rank on its own batches alone would learn something else
    alone = strategy_program.run("default", hypergradient, 4, roll_back=roll_back)
    assert (alone["upper"] - single["upper"]).abs().max() > 1e-4


def tiny(kind=ImplicitProblem):
    class Lower(kind):
        def training_step(self, batch):
            return ((self.module(batch) - self.upper.module.weight.sum()) ** 2).mean()

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return (self.lower.module(batch) ** 2).mean()

    lower_m, upper_m = nn.Linear(2, 1), nn.Linear(2, 1)
    data = [torch.randn(3, 2) for _ in range(2)]
    lower = Lower("lower", Config(type="darts"), lower_m, torch.optim.SGD(lower_m.parameters(), lr=0.1), None, data)
    upper = Upper("upper", Config(), upper_m, torch.optim.SGD(upper_m.parameters(), lr=0.1), None, data)
    return [upper, lower], {"l2u": {lower: [upper]}, "u2l": {upper: [lower]}}


@pytest.mark.parametrize("options, message", [
    ({"strategy": "distributed"}, r'EngineConfig\(strategy="distributed"\) runs one process per rank: launch the '
                                  r"program with torchrun"),
    ({"strategy": "zero"}, r'strategy="zero"\) runs one process per rank: launch the program with torchrun'),
    ({"distributed": True}, r"EngineConfig\(distributed=True\) runs one process per rank: launch the program with "
                            r"torchrun"),
    ({"strategy": "fsdp"}, r'strategy="fsdp"\) runs one process per rank: launch the program with torchrun'),
])
def test_a_strategy_that_cannot_run_is_one_error(monkeypatch, options, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    problems, dependencies = tiny()
    with pytest.raises(ValueError, match=message):
        Engine(problems, EngineConfig(train_iters=1, **options), dependencies=dependencies)
    assert not dist.is_initialized()


def test_accelerate_not_installed_is_one_error_naming_the_package(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    problems, dependencies = tiny()
    with pytest.raises(ValueError, match=r'EngineConfig\(strategy="accelerate"\) runs through Hugging Face\'s '
                                         r"package accelerate, which is not installed here: pip install accelerate"):
        Engine(problems, EngineConfig(train_iters=1, strategy="accelerate"), dependencies=dependencies)
    assert not dist.is_initialized()


def test_accelerate_prepares_the_optimizer_scheduler_and_loader_in_one_process(monkeypatch):
    pytest.importorskip("accelerate")
    from accelerate.data_loader import DataLoaderShard
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    single = strategy_program.run("default", "cg", 8)
    engines = []
    monkeypatch.setattr(strategy_program, "Engine", lambda *a, **k: engines.append(Engine(*a, **k)) or engines[-1])
    prepared = strategy_program.run("accelerate", "cg", 8)
    upper = engines[0].upper
    assert isinstance(upper.optimizer, AcceleratedOptimizer) and isinstance(upper.scheduler, AcceleratedScheduler)
    loaders = upper.train_data_loader if isinstance(upper.train_data_loader, tuple) else (upper.train_data_loader,)
    assert all(isinstance(loader, DataLoaderShard) for loader in loaders)
    for name in ("lower", "upper"):  # one process: the same run, the scheduler stepped once a step
        torch.testing.assert_close(prepared[name], single[name], rtol=0, atol=0)
    assert not dist.is_initialized()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """torchrun's variables for a world of one process (gloo, this machine)."""
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("a process group was left open")


def test_an_error_after_the_process_group_started_closes_it(one_rank):
    problems, dependencies = tiny()
    dependencies["u2l"] = {problems[1]: [problems[0]]}  # lower -> upper: no chain of parents that way
    with pytest.raises(ValueError, match="no chain of parents"):
        Engine(problems, EngineConfig(train_iters=1, strategy="distributed", backend="gloo", device="cpu"),
               dependencies=dependencies)
    assert not dist.is_initialized()


def test_an_iterative_lower_problem_is_refused_by_name(one_rank, monkeypatch):
    """Refused before any process group starts: in a world of 2 with no second process, starting
    one would wait for the other rank (here it fails the test instead of hanging the suite)."""
    monkeypatch.setenv("WORLD_SIZE", "2")

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the refusal")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    problems, dependencies = tiny(IterativeProblem)
    with pytest.raises(ValueError, match=r'problem "lower" is an IterativeProblem under a parent'):
        Engine(problems, EngineConfig(train_iters=1, strategy="distributed", backend="gloo", device="cpu"),
               dependencies=dependencies)


def test_one_rank_runs_and_ends_its_process_group(one_rank):
    problems, dependencies = tiny()
    engine = Engine(problems, EngineConfig(train_iters=2, strategy="distributed", backend="gloo", device="cpu"),
                    dependencies=dependencies)
    assert dist.is_initialized() and engine.is_rank_zero()
    engine.run()
    assert not dist.is_initialized()


def test_an_error_during_the_run_ends_its_process_group(one_rank):
    problems, dependencies = tiny()

    def broken(batch):
        raise RuntimeError("from the user's training_step")

    problems[1].training_step = broken
    engine = Engine(problems, EngineConfig(train_iters=2, strategy="distributed", backend="gloo", device="cpu"),
                    dependencies=dependencies)
    with pytest.raises(RuntimeError, match="from the user's training_step"):
        engine.run()
    assert not dist.is_initialized()


def test_fsdp_runs_the_tutorial_task_by_task_as_one_process_does(one_rank):
    """Betty's tutorial under FSDP in a world of one: its state_dict() / load_state_dict() reset of
    the lower module (FSDP's shards, the whole parameters back after each) and the convolutions'
    forwards (FSDP's hooks) give the sequential engine's theta; task batching falls back, named."""
    from dropin_programs import build, run_meta_steps, theta

    sequential = build("off", meta_batch=2, inner_steps=2)
    run_meta_steps(sequential, 2)
    with pytest.warns(RuntimeWarning, match=r'task batching: EngineConfig\(strategy="fsdp"\): the batched inner '
                                            r"step reads the lower optimizer's settings"):
        sharded = build("auto", meta_batch=2, inner_steps=2, strategy="fsdp")
    assert not sharded.task_batching.active
    assert all(type(p).__name__ == "DTensor" for p in sharded.upper.optimizer.param_groups[0]["params"])
    run_meta_steps(sharded, 2)
    for a, b in zip(theta(sequential), theta(sharded)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("change, message", [
    ("iterative", r'problem "alone" is an IterativeProblem, whose steps update its own copies of the weights'),
    ("fp16", r'problem "lower" has Config\(precision="fp16"\), whose loss scaler unscales the gradients before'),
])
def test_fsdp_refuses_what_its_shards_cannot_hold(one_rank, monkeypatch, change, message):
    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the refusal")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    if change == "iterative":  # alone at the top, where "distributed" runs it
        class Alone(IterativeProblem):
            def training_step(self, batch):
                return (self.module(batch) ** 2).mean()

        module = nn.Linear(2, 1)
        problems = [Alone("alone", Config(), module, torch.optim.SGD(module.parameters(), lr=0.1), None,
                          [torch.randn(3, 2)])]
        dependencies = None
    else:
        problems, dependencies = tiny()
        problems[1].config.precision = "fp16"
    with pytest.raises(ValueError, match=r'EngineConfig\(strategy="fsdp"\): ' + message):
        Engine(problems, EngineConfig(train_iters=1, strategy="fsdp", backend="gloo", device="cpu"),
               dependencies=dependencies)


def test_fsdp_keeps_what_param_callback_changed_through_state_dict(one_rank):
    """FSDP's state_dict() reshards the module and gathers the whole parameters back from the shards,
    so what param_callback changed in place (Betty's test_install clamps) must reach the shards."""
    problems, dependencies = tiny()
    lower, seen = problems[1], []

    def halve(self):
        for p in self.trainable_parameters():
            p.data.mul_(0.5)

    def on_inner_loop_start(self):
        before = [p.detach().clone() for p in self.trainable_parameters()]
        self.module.state_dict()
        seen.append(all(torch.equal(a, p) for a, p in zip(before, self.trainable_parameters())))

    type(lower).param_callback, type(lower).on_inner_loop_start = halve, on_inner_loop_start
    Engine(problems, EngineConfig(train_iters=3, strategy="fsdp", backend="gloo", device="cpu"),
           dependencies=dependencies).run()
    assert seen == [True] * 3


def test_fsdp_refuses_an_optimizer_with_state_and_closes_its_process_group(one_rank):
    problems, dependencies = tiny()
    lower = problems[1]
    lower.optimizer = torch.optim.SGD(lower.module.parameters(), lr=0.1, momentum=0.9)
    lower.module(torch.randn(3, 2)).sum().backward()
    lower.optimizer.step()  # a momentum buffer: state that cannot follow the parameters into their shards
    with pytest.raises(ValueError, match=r'EngineConfig\(strategy="fsdp"\): problem "lower"\'s optimizer already '
                                         r"has state"):
        Engine(problems, EngineConfig(train_iters=1, strategy="fsdp", backend="gloo", device="cpu"),
               dependencies=dependencies)
    assert not dist.is_initialized()
