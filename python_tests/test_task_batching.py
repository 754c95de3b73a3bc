"""Task batching inside the Engine: the Betty tutorial's classes, unchanged, run
their meta-batch as one batch, and give the sequential engine's theta (float64)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dropin_programs import build, relative_difference, run_meta_steps, theta
from imaml_ext.configs import EngineConfig
from imaml_ext.problems import Problem

TOL = 1e-10
META_STEPS = 3

CASES = {
    "darts (the tutorial as written)": {},
    "cg": {"lower_config": {"type": "cg", "cg_iterations": 3}, "reg": 1.0},
    "cg proximal_lambda, damped": {
        "lower_config": {"type": "cg", "cg_iterations": 3, "proximal_lambda": 0.5, "cg_damping": 1.0,
                         "lam_damping": 10.0}
    },
    "neumann": {"lower_config": {"type": "neumann", "neumann_iterations": 2, "neumann_alpha": 0.1}},
    "darts proximal_lambda": {"lower_config": {"type": "darts", "proximal_lambda": 0.5}},
    "IterativeProblem first order": {"kind": "iterative"},
    "IterativeProblem second order": {"kind": "iterative", "lower_config": {"first_order": False}},
}


def both(meta_steps=META_STEPS, **kwargs):
    sequential = build("off", **kwargs)
    run_meta_steps(sequential, meta_steps)
    batched = build("on", **kwargs)
    run_meta_steps(batched, meta_steps)
    return sequential, batched


def assert_same_state(sequential, batched, tol=TOL):
    assert relative_difference(theta(sequential), theta(batched)) < tol
    # the upper's optimizer and scheduler states, the counters, and the lower's module
    seq_state, bat_state = sequential.upper.optimizer.state_dict(), batched.upper.optimizer.state_dict()
    for name in ("exp_avg", "exp_avg_sq"):
        mine = [value[name] for _, value in sorted(seq_state["state"].items())]
        theirs = [value[name] for _, value in sorted(bat_state["state"].items())]
        assert relative_difference(mine, theirs) < tol
    if sequential.upper.scheduler is not None:
        assert sequential.upper.scheduler.state_dict() == batched.upper.scheduler.state_dict()
    assert (sequential.upper.count, sequential.lower.count) == (batched.upper.count, batched.lower.count)
    lower_seq = [p.detach() for p in sequential.lower.module.parameters()]
    lower_bat = [p.detach() for p in batched.lower.module.parameters()]
    assert relative_difference(lower_seq, lower_bat) < 1e-8  # the last task's adapted weights


@pytest.mark.parametrize("case", list(CASES))
def test_batched_theta_equals_sequential(case):
    sequential, batched = both(**CASES[case])
    assert batched.task_batching.active and batched.task_batching.tasks == 4
    assert not sequential.task_batching.active
    assert relative_difference(theta(build("off", **CASES[case])), theta(batched)) > 1e-4  # theta moved
    assert_same_state(sequential, batched)


@pytest.mark.parametrize("case", ["darts (the tutorial as written)", "cg"])
@pytest.mark.parametrize("meta_batch", [1, 16])
def test_meta_batch_sizes(case, meta_batch):
    kwargs = dict(CASES[case], meta_batch=meta_batch, inner_steps=2)
    sequential = build("off", **kwargs)
    run_meta_steps(sequential, META_STEPS)
    batched = build("auto", **kwargs)
    run_meta_steps(batched, META_STEPS)
    # one task per meta-step is nothing to batch: auto says so and runs it as is
    assert batched.task_batching.active == (meta_batch > 1)
    if meta_batch == 1:
        assert "gradient_accumulation=1" in batched.task_batching.reason
    assert_same_state(sequential, batched)


def test_vmap_forward_and_chunks_equal_the_loop():
    sequential, _ = both(meta_steps=2, meta_batch=8, inner_steps=2)
    vmapped = build("on", meta_batch=8, inner_steps=2, forward="vmap", max_tasks=3)
    run_meta_steps(vmapped, 2)
    info = vmapped.task_batching
    assert (info.forward, info.chunk, info.tasks) == ("vmap", 3, 8)
    assert info.upper_forward.startswith("loop")  # the tutorial's .item() does not vmap
    assert relative_difference(theta(sequential), theta(vmapped)) < TOL


def test_upper_step_without_item_runs_under_vmap():
    sequential, _ = both(meta_steps=2, meta_batch=4, inner_steps=2, accuracy_item=False)
    vmapped = build("on", meta_batch=4, inner_steps=2, forward="vmap", accuracy_item=False)
    run_meta_steps(vmapped, 2)
    assert vmapped.task_batching.upper_forward == "vmap"
    assert relative_difference(theta(sequential), theta(vmapped)) < TOL


def logged_lines(engine, meta_steps):
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("imaml_ext")
    logger.addHandler(handler)
    try:
        run_meta_steps(engine, meta_steps)
    finally:
        logger.removeHandler(handler)
    import re

    # the values to 10 digits: the batched arithmetic sums in another order
    rounded = (re.sub(r"\d+\.\d+", lambda m: f"{float(m.group()):.10g}", line) for line in lines)
    return sorted(line for line in rounded if line.startswith("[Problem"))


def test_logs_are_the_sequential_engines():
    """Each task's own loss and metrics at the counts where the sequential engine logs them."""
    kwargs = dict(meta_batch=4, inner_steps=2, upper_config={"log_step": 3}, lower_config={"log_step": 5})
    sequential = logged_lines(build("off", **kwargs), 2)
    batched = logged_lines(build("on", **kwargs), 2)
    assert len(sequential) == 2 + 3 and batched == sequential


def test_sgd_momentum_dampening_nesterov_weight_decay():
    def clears_state(Lower):
        class ClearsMomentum(Lower):
            def on_inner_loop_start(self):
                super().on_inner_loop_start()
                self.optimizer.state.clear()

        return ClearsMomentum

    for options in ({"momentum": 0.9, "weight_decay": 1e-2}, {"momentum": 0.9, "dampening": 0.3},
                    {"momentum": 0.5, "nesterov": True, "weight_decay": 1e-3}):
        kwargs = dict(lower_optimizer=lambda p, o=options: torch.optim.SGD(p, lr=0.05, **o),
                      lower_class=clears_state, inner_steps=3)
        sequential, batched = both(meta_steps=2, **kwargs)
        assert batched.task_batching.active
        assert_same_state(sequential, batched)
        # the lower's SGD holds the last task's momentum buffers, as after the sequential engine
        for p_seq, p_bat in zip(sequential.lower.module.parameters(), batched.lower.module.parameters()):
            a = sequential.lower.optimizer.state[p_seq]["momentum_buffer"]
            b = batched.lower.optimizer.state[p_bat]["momentum_buffer"]
            assert relative_difference([a], [b]) < 1e-8


def test_partial_meta_step_at_the_end_runs_task_by_task():
    sequential = build("off", meta_batch=4, inner_steps=2)
    batched = build("on", meta_batch=4, inner_steps=2)
    for engine in (sequential, batched):
        engine.train_iters = 2 * 4 * 2 + 5  # two meta-steps, two tasks and half a third one
        engine.run()
    assert_same_state(sequential, batched)
    grads_seq = [p.grad for p in sequential.upper.module.parameters()]
    grads_bat = [p.grad for p in batched.upper.module.parameters()]
    assert relative_difference(grads_seq, grads_bat) < TOL  # the open window's accumulated gradient


# ----- what cannot be batched: "auto" runs task by task and says why once, "on" raises it -----


def item_in_lower(Lower):
    class UsesItem(Lower):
        def training_step(self, batch):
            loss = super().training_step(batch)
            self.last = loss.item()
            return loss

    return UsesItem


def control_flow_in_lower(Lower):
    class Branches(Lower):
        def training_step(self, batch):
            loss = super().training_step(batch)
            if loss > 100.0:  # Python control flow on a tensor's value
                loss = loss * 0.5
            return loss

    return Branches


def no_hook(Lower):
    class NoHook(Lower):
        pass

    NoHook.on_inner_loop_start = Problem.on_inner_loop_start  # as if the tutorial had left it out
    return NoHook


def partial_hook(Lower):
    class CopiesTheHeadOnly(Lower):
        def on_inner_loop_start(self):
            with torch.no_grad():
                for mine, theirs in zip(list(self.module.parameters())[-2:], list(self.upper.module.parameters())[-2:]):
                    mine.copy_(theirs)

    return CopiesTheHeadOnly


def ragged_env(Env):
    class Ragged(Env):
        def step(self):
            super().step()
            if self.engine.global_step % 4 == 1:  # every other task has one support image fewer
                x, y = self.batch["train"]
                self.batch["train"] = (x[1:], y[1:])

    return Ragged


FALLBACKS = {
    ".item() in the lower's training_step": (dict(lower_class=item_in_lower), "cannot run for all tasks at once"),
    "control flow on a tensor": (dict(lower_class=control_flow_in_lower), "cannot run for all tasks at once"),
    "Adam in the lower": (dict(lower_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)), "steps Adam"),
    "running BatchNorm statistics": (dict(running_stats=True), "keeps running statistics"),
    "no on_inner_loop_start": (dict(lower_class=no_hook), "defines no on_inner_loop_start"),
    "a hook that resets part of the module": (dict(lower_class=partial_hook), "does not set all of its parameters"),
    "momentum carried between inner loops": (
        dict(lower_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)), "momentum buffers"),
    "batches that differ in shape": (dict(env_class=ragged_env), "batches differ within one meta-batch"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_names_the_cause(case):
    kwargs, cause = FALLBACKS[case]
    kwargs = dict(kwargs, meta_batch=2, inner_steps=2)
    sequential = build("off", **kwargs)
    run_meta_steps(sequential, 2)
    with pytest.warns(RuntimeWarning, match=cause) as record:
        auto = build("auto", **kwargs)
        run_meta_steps(auto, 2)
    assert sum("task batching" in str(w.message) for w in record) == 1  # said once
    if case != "batches that differ in shape":  # a per-meta-step cause leaves batching on for the others
        assert not auto.task_batching.active and cause in auto.task_batching.reason
    assert relative_difference(theta(sequential), theta(auto)) < TOL
    with pytest.raises(ValueError, match=f"task_batching='on'.*{cause}"):
        on = build("on", **kwargs)
        run_meta_steps(on, 2)


def test_off_and_bad_config():
    engine = build("off")
    assert not engine.task_batching.active and "off" in engine.task_batching.reason
    assert "task batching off" in str(engine.task_batching)
    for field, value in (("task_batching", "yes"), ("task_batching_forward", "grouped"),
                         ("task_batching_max_tasks", 0)):
        with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
            EngineConfig(**{field: value})


# ----- the tutorial's one-word switch: IterativeProblem everywhere is MAML -----


def l2l_meta_gradient(theta0, batches, inner_steps, lr, reg, first_order, meta_batch):
    import learn2learn as l2l

    from dropin_programs import small_convnet

    model = small_convnet().double()
    model.load_state_dict(theta0)
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    thetas = list(maml.parameters())
    for support, query in batches:
        learner = maml.clone()
        for _ in range(inner_steps):
            loss = F.cross_entropy(learner(support[0]), support[1])
            loss = loss + reg * sum(((p - q) ** 2).sum() for p, q in zip(learner.parameters(), thetas))
            learner.adapt(loss)
        (F.cross_entropy(learner(query[0]), query[1]) / meta_batch).backward()
    return [p.grad.clone() for p in thetas]


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("order", ["first", "second"])
def test_iterative_switch_is_maml(mode, order):
    pytest.importorskip("learn2learn")
    config = {"first_order": order == "first"}
    engine = build(mode, kind="iterative", lower_config=config, meta_batch=3, inner_steps=2, scheduler=False)
    theta0 = {k: v.clone() for k, v in engine.upper.module.state_dict().items()}
    batches, grads = [], []
    env_step = engine.env.step

    def recording_step():
        env_step()
        batches.append((engine.env.batch["train"], engine.env.batch["test"]))

    engine.env.step = recording_step
    engine.upper.grad_callback = lambda params: grads.append([p.grad.clone() for p in params])
    run_meta_steps(engine, 1)
    expected = l2l_meta_gradient(theta0, batches, 2, 0.1, 0.25, order == "first", 3)
    assert relative_difference(expected, grads[0]) < TOL
    assert relative_difference([v for v in theta0.values()], theta(engine)) > 1e-4  # theta trains
    assert engine.task_batching.active == (mode == "on")


def test_sibling_lower_problems_are_found_and_said_not_batched():
    """Betty 0.1.1's implicit-MAML layout: T lower problems named "inner" under one upper."""
    from torch import nn

    from imaml_ext import Config, Engine, ImplicitProblem

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return self.module(batch).pow(2).mean()

        def get_batch(self):
            return torch.randn(2, 3)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return sum(getattr(self, f"inner_{i}")(batch).pow(2).mean() for i in range(len(self.children)))

        def get_batch(self):
            return torch.randn(2, 3)

    def problem(cls, name):
        module = nn.Linear(3, 1)
        return cls(name=name, module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                   config=Config(unroll_steps=2))

    children = [problem(Inner, "inner") for _ in range(3)]
    outer = problem(Outer, "outer")
    engine = Engine(children + [outer], EngineConfig(device="cpu", train_iters=4),
                    dependencies={"u2l": {outer: children}, "l2u": {c: [outer] for c in children}})
    info = engine.task_batching
    assert not info.active and info.pattern == "siblings" and "3 sibling lower problems" in info.reason
    engine.run()  # one by one, as Betty
    assert [c.count for c in children] == [4, 4, 4] and outer.count == 2
