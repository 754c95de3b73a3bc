"""Task batching inside the Engine: the Betty tutorial's classes, unchanged, run
their meta-batch as one batch, and give the sequential engine's theta (float64)."""

import pytest
import torch
import torch.nn.functional as F

from dropin_programs import build, relative_difference, run_meta_steps, theta
from imaml_ext.configs import Config, EngineConfig
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


@pytest.mark.parametrize("forward", ["vmap", "stacked", "im2col", "channels_last", "loop+fused", "vmap+fused",
                                     "stacked+fused", "im2col+fused"])
def test_vmap_and_stacked_forwards_and_chunks_equal_the_loop(forward):
    sequential, _ = both(meta_steps=2, meta_batch=8, inner_steps=2)
    vmapped = build("on", meta_batch=8, inner_steps=2, forward=forward, max_tasks=3)
    run_meta_steps(vmapped, 2)
    info = vmapped.task_batching
    assert (info.forward, info.chunk, info.tasks) == (forward, 3, 8)
    assert info.upper_forward.startswith("loop")  # the tutorial's .item() does not vmap
    assert relative_difference(theta(sequential), theta(vmapped)) < TOL


def test_stacked_forward_runs_the_stacked_rules(monkeypatch):
    from test_forward_choice import stacked_rules_run

    kinds = stacked_rules_run(monkeypatch)
    stacked = build("on", meta_batch=4, inner_steps=1, forward="stacked")
    run_meta_steps(stacked, 1)
    assert {"conv2d", "batch_norm", "max_pool2d"} <= set(kinds)


def test_im2col_forward_runs_the_im2col_convolutions(monkeypatch):
    from test_forward_choice import stacked_rules_run

    kinds = stacked_rules_run(monkeypatch)
    run_meta_steps(build("on", meta_batch=4, inner_steps=1, forward="im2col"), 1)
    assert {"conv2d_im2col", "batch_norm", "max_pool2d"} <= set(kinds) and "conv2d" not in kinds


def test_auto_forward_on_a_cpu_is_timed_once():
    """"auto" on a CPU times the loop and stacked forwards on the first inner step (the CPU's candidates
    of forwards.auto_plans, IMAML's table: vmap is timed on CUDA), keeps the fastest, says which with
    the times, and gives the sequential engine's theta."""
    sequential, batched = both(meta_steps=2, meta_batch=4, inner_steps=2)
    info = batched.task_batching
    timed = ("loop", "stacked", "loop+fused", "stacked+fused")  # the tutorial's module has runs to fuse
    assert info.forward.split()[0] in timed and "timed on the first meta-step" in info.forward
    assert all(f"{forward} " in info.forward.split("step: ")[1] for forward in timed)
    # the tutorial's upper calls .item(): it runs per task whichever forward was kept
    assert info.upper_forward.startswith("loop")
    assert relative_difference(theta(sequential), theta(batched)) < TOL


def test_fused_forward_runs_the_fused_op_and_leaves_the_module_as_it_was(monkeypatch):
    from imaml_ext.ops import batch_norm_relu_max_pool as fused_op

    calls = []
    original = fused_op._BatchNormReLUMaxPool2d.forward
    monkeypatch.setattr(fused_op._BatchNormReLUMaxPool2d, "forward",
                        staticmethod(lambda *args: calls.append(args[0].shape) or original(*args)))
    engine = build("on", meta_batch=4, inner_steps=1, forward="stacked+fused")
    layers = [type(m) for m in engine.lower.module]
    run_meta_steps(engine, 1)
    assert calls and all(shape[1] == 4 * 4 for shape in calls[:1])  # the 4 tasks' 4 channels stacked
    assert [type(m) for m in engine.lower.module] == layers  # BatchNorm2d, ReLU, MaxPool2d back in place


def test_a_fused_forward_on_a_module_with_nothing_to_fuse_says_so(monkeypatch):
    import dropin_programs

    original = dropin_programs.small_convnet

    def hooked(*args, **kwargs):  # a hook on the ReLU would see a fused run skip it: not fused
        model = original(*args, **kwargs)
        model[2].register_forward_hook(lambda *_: None)
        return model

    monkeypatch.setattr(dropin_programs, "small_convnet", hooked)
    with pytest.warns(RuntimeWarning, match=r"task batching: forward 'stacked\+fused': the lower's module \(Sequential\) "
                                            r"has no nn.Sequential run .* to fuse; it runs as 'stacked'"):
        run_meta_steps(build("on", meta_batch=4, inner_steps=1, forward="stacked+fused"), 1)


def test_auto_forward_leaves_out_a_forward_that_fails_and_says_why(monkeypatch):
    """A forward that raises while "auto" times it (on a GPU: out of memory) is left out with a warning
    naming it and its cause; the others are timed and the result is the sequential engine's."""
    from imaml_ext.batched import stacked as batched_module

    def out_of_memory(*args):
        raise RuntimeError("out of memory (stand-in)")

    sequential, _ = both(meta_steps=2, meta_batch=4, inner_steps=2)
    rule = batched_module._RULES["conv2d"]
    monkeypatch.setitem(batched_module._RULES, "conv2d", (out_of_memory, *rule[1:]))
    with pytest.warns(RuntimeWarning, match=r'"auto" left out .*stacked: RuntimeError: out of memory \(stand-in\)'):
        batched = build("on", meta_batch=4, inner_steps=2)
        run_meta_steps(batched, 2)
    info = batched.task_batching
    # which survivor wins is the machine's timing (a loaded CPU can pick the fused loop)
    assert info.forward.split()[0].removesuffix("+fused") in ("loop", "vmap")
    assert "left out: stacked: RuntimeError" in info.forward
    assert relative_difference(theta(sequential), theta(batched)) < TOL


@pytest.mark.parametrize("forward", ["vmap", "stacked"])
def test_upper_step_without_item_runs_under_vmap(forward):
    sequential, _ = both(meta_steps=2, meta_batch=4, inner_steps=2, accuracy_item=False)
    vmapped = build("on", meta_batch=4, inner_steps=2, forward=forward, accuracy_item=False)
    run_meta_steps(vmapped, 2)
    assert vmapped.task_batching.upper_forward == forward
    assert relative_difference(theta(sequential), theta(vmapped)) < TOL


def logged_lines(engine, meta_steps):
    engine.train_iters = meta_steps * engine.upper.gas * engine.lower.config.unroll_steps
    return sorted(logged_run(engine))


def logged_run(engine):
    """The problems' log lines of ``engine.run()``, values to 10 digits (the batched arithmetic
    sums in another order)."""
    import logging
    import re

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("imaml_ext")
    logger.addHandler(handler)
    try:
        engine.run()
    finally:
        logger.removeHandler(handler)
    rounded = [re.sub(r"\d+\.\d+", lambda m: f"{float(m.group()):.10g}", line) for line in lines]
    return [line for line in rounded if line.startswith("[Problem")]


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


# ----- Betty 0.1.1's own layout: T sibling lower problems under one upper -----

SIBLING_CASES = {
    "darts (Betty's example as written)": {},
    "cg": {"lower_config": {"type": "cg", "cg_iterations": 3}},
    "cg proximal_lambda, damped": {
        "lower_config": {"type": "cg", "cg_iterations": 3, "proximal_lambda": 1.0, "cg_damping": 1.0,
                         "lam_damping": 10.0}},
    "neumann": {"lower_config": {"type": "neumann", "neumann_iterations": 2, "neumann_alpha": 0.1}},
    "darts proximal_lambda": {"lower_config": {"type": "darts", "proximal_lambda": 1.0}},
}


def sibling_state(engine):
    """theta, the upper's Adam moments, and every sibling's module state (running statistics too)."""
    moments = [v[k] for _, v in sorted(engine.outer.optimizer.state_dict()["state"].items())
               for k in ("exp_avg", "exp_avg_sq")]
    siblings = [v.double() for c in engine.outer.children for v in c.module.state_dict().values()]
    return theta_of(engine), moments, siblings


def theta_of(engine):
    return [p.detach().clone() for p in engine.outer.module.parameters()]


def assert_same_sibling_state(sequential, batched, tol=TOL):
    for mine, theirs in zip(sibling_state(sequential), sibling_state(batched)):
        assert relative_difference(mine, theirs) < tol
    assert sequential.outer.scheduler.state_dict() == batched.outer.scheduler.state_dict()
    assert [c.count for c in sequential.outer.children] == [c.count for c in batched.outer.children]
    assert sequential.outer.count == batched.outer.count


@pytest.mark.parametrize("case", list(SIBLING_CASES))
def test_siblings_batched_equal_sequential(case):
    from dropin_programs import build_siblings, run_sibling_meta_steps

    sequential = build_siblings("off", **SIBLING_CASES[case])
    run_sibling_meta_steps(sequential, META_STEPS)
    batched = build_siblings("on", **SIBLING_CASES[case])
    run_sibling_meta_steps(batched, META_STEPS)
    info = batched.task_batching
    assert info.active and info.pattern == "siblings" and info.tasks == 4
    assert relative_difference(theta_of(build_siblings("off", **SIBLING_CASES[case])), theta_of(batched)) > 1e-4
    assert_same_sibling_state(sequential, batched)


def test_siblings_logs_momentum_and_a_cut_window():
    """Logs line by line, each sibling's momentum buffers, and a meta-step cut by train_iters
    (replayed one by one) as the sequential engine leaves them."""
    from dropin_programs import build_siblings

    # momentum carried from one inner loop into the next makes the inner loops dependent
    with pytest.warns(RuntimeWarning, match="momentum buffers"):
        engine = build_siblings("auto", tasks=3, inner_steps=2,
                                lower_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        engine.train_iters = 4
        engine.run()
    assert not engine.task_batching.active

    sequential, seq_lines = run_clearing("off", 2 * 2 + 1)
    batched, bat_lines = run_clearing("on", 2 * 2 + 1)  # two meta-steps and the first step of a third
    assert batched.task_batching.active
    assert_same_sibling_state(sequential, batched)
    assert len(seq_lines) == 3 * 5 + 2 and bat_lines == seq_lines
    for c_seq, c_bat in zip(sequential.outer.children, batched.outer.children):
        # each sibling's buffers together: the conv bias before BatchNorm has a gradient of rounding noise
        a = [c_seq.optimizer.state[p]["momentum_buffer"] for p in c_seq.module.parameters()]
        b = [c_bat.optimizer.state[p]["momentum_buffer"] for p in c_bat.module.parameters()]
        assert relative_difference(a, b) < 1e-8


def run_clearing(mode, iters):
    """Siblings with SGD momentum whose hook clears it, logging every local step."""
    from dropin_programs import build_siblings

    engine = build_siblings(mode, tasks=3, inner_steps=2, lower_config={"log_step": 1},
                            lower_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    for child in engine.outer.children:
        hook = child.on_inner_loop_start
        child.on_inner_loop_start = lambda hook=hook, child=child: (hook(), child.optimizer.state.clear())
    engine.train_iters = iters
    return engine, logged_run(engine)


SIBLING_FALLBACKS = {
    "siblings with different SGD settings": ("lr", "SGD settings of the sibling lower problems"),
    "Adam in the siblings": ("adam", "steps Adam"),
    "an upper that accumulates": ("gas", "needs gradient_accumulation=1"),
}


def sibling_program(kind, mode):
    from dropin_programs import build_siblings

    if kind == "lr":
        made = []

        def alternating(params):
            made.append(params)
            return torch.optim.SGD(params, lr=0.1 if len(made) % 2 else 0.05)

        return build_siblings(mode, lower_optimizer=alternating)
    if kind == "adam":
        return build_siblings(mode, lower_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))

    def accumulating(Outer):
        class Accumulating(Outer):
            def __init__(self, **kwargs):
                kwargs["config"] = Config(log_step=1, retain_graph=True, gradient_accumulation=2)
                super().__init__(**kwargs)

        return Accumulating

    return build_siblings(mode, outer_class=accumulating)


@pytest.mark.parametrize("case", list(SIBLING_FALLBACKS))
def test_sibling_fallback_names_the_cause(case):
    from dropin_programs import run_sibling_meta_steps

    kind, cause = SIBLING_FALLBACKS[case]
    sequential = sibling_program(kind, "off")
    run_sibling_meta_steps(sequential, 2)
    with pytest.warns(RuntimeWarning, match=cause) as record:
        auto = sibling_program(kind, "auto")
        run_sibling_meta_steps(auto, 2)
    assert sum("task batching" in str(w.message) for w in record) == 1
    assert not auto.task_batching.active and auto.task_batching.pattern == "siblings"
    assert relative_difference(theta_of(sequential), theta_of(auto)) < TOL
    with pytest.raises(ValueError, match=f"task_batching='on'.*{cause}"):
        on = sibling_program(kind, "on")
        run_sibling_meta_steps(on, 2)


def test_siblings_without_a_hook_run_one_by_one():
    """Siblings whose inner loops continue from the last one: run one by one, as Betty, and said."""
    from torch import nn

    from imaml_ext import Engine, ImplicitProblem

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

    cause = "defines no on_inner_loop_start"

    def engine(mode):
        children = [problem(Inner, "inner") for _ in range(3)]
        outer = problem(Outer, "outer")
        return Engine(children + [outer], EngineConfig(device="cpu", train_iters=4, task_batching=mode),
                      dependencies={"u2l": {outer: children}, "l2u": {c: [outer] for c in children}})

    with pytest.warns(RuntimeWarning, match=cause):
        auto = engine("auto")
    info = auto.task_batching
    assert not info.active and info.pattern == "siblings" and cause in info.reason
    auto.run()  # one by one, as Betty
    assert [c.count for c in auto.outer.children] == [4, 4, 4] and auto.outer.count == 2
    with pytest.raises(ValueError, match=f"task_batching='on'.*{cause}"):
        engine("on")


# ----- Betty's semantics around the batched window -----


def test_upper_callbacks_clipping_and_a_validation_inside_a_meta_step():
    """The upper's grad_callback (after unscaling, before clipping), param_callback, gradient
    clipping, and a validation that falls inside a meta-step (its recorded tasks run one by one,
    the rest of the window batched): all as the sequential engine runs them."""

    def program(mode):
        engine = build(mode, meta_batch=4, inner_steps=2, upper_config={"gradient_clipping": 0.05})
        seen = []
        engine.upper.grad_callback = lambda params: seen.append(
            ("grad", float(sum((p.grad ** 2).sum() for p in params))))
        engine.upper.param_callback = lambda params: seen.append(
            ("param", float(sum((p.detach() ** 2).sum() for p in params))))

        class Validating(type(engine)):
            def validation(self):
                seen.append(("validation", self.global_step, float(sum(p.detach().sum() for p in self.upper.module.parameters()))))
                return {"theta_sum": seen[-1][2]}

        engine.__class__ = Validating
        engine.valid_step = 4 * 2 + 3  # global step 11: task 2 of the second meta-step
        run_meta_steps(engine, 3)
        return engine, seen

    sequential, seen_seq = program("off")
    batched, seen_bat = program("on")
    assert batched.task_batching.active
    def events(seen):
        return [s[:-1] for s in seen]

    assert events(seen_seq) == events(seen_bat) and len(seen_seq) == 3 * 2 + 2
    for a, b in zip(seen_seq, seen_bat):
        assert abs(a[-1] - b[-1]) <= 1e-10 * abs(a[-1])
    assert seen_seq[0][1] > 0.05 ** 2  # clipping had something to clip
    assert_same_state(sequential, batched)


def test_bf16_autocast_is_the_sequential_engines():
    """precision="bf16" on both problems (float32 weights): each task's forward runs under the same
    autocast, so only the summation order differs."""
    # cg: darts' finite differences of size 0.01 / ||v|| drown in bf16's rounding
    cg = {"type": "cg", "cg_iterations": 3}
    kwargs = dict(meta_batch=4, inner_steps=2, dtype=torch.float32, upper_config={"precision": "bf16"},
                  lower_config={"precision": "bf16", **cg}, reg=1.0, forward="loop")
    sequential, batched = both(meta_steps=2, **kwargs)
    assert batched.task_batching.active
    fp32 = build("off", meta_batch=4, inner_steps=2, dtype=torch.float32, lower_config=cg, reg=1.0)
    run_meta_steps(fp32, 2)
    moved = relative_difference(theta(fp32), theta(sequential))
    assert moved > 1e-5  # bf16 changes the numbers: the autocast is on
    assert relative_difference(theta(sequential), theta(batched)) < moved / 10


@pytest.mark.parametrize("forward", ["vmap", "stacked", "im2col", "channels_last"])
def test_bf16_autocast_reaches_the_vmapped_convolutions(forward):
    """torch.func's vmapped convolutions escape autocast by themselves (torch 2.14): under the lower's
    precision="bf16" every forward still runs the user's convolution in bfloat16, as the sequential
    engine does."""
    engine = build("on", meta_batch=4, inner_steps=1, dtype=torch.float32, lower_config={"precision": "bf16"},
                   upper_config={"precision": "bf16"}, forward=forward)
    seen = []
    conv = engine.lower.module[0]
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    run_meta_steps(engine, 1)
    assert engine.task_batching.forward == forward and seen and set(seen) == {torch.bfloat16}


def test_siblings_with_a_validation_inside_a_meta_step():
    """A validation after the first inner step of a meta-step: the siblings' recorded step runs one
    by one, the rest of that inner loop too, and the next meta-step is batched again."""
    from dropin_programs import build_siblings, run_sibling_meta_steps

    def program(mode):
        engine = build_siblings(mode, inner_steps=3)
        validations = []

        class Validating(type(engine)):
            def validation(self):
                validations.append(float(sum(p.detach().sum() for p in self.outer.module.parameters())))
                return {"theta_sum": validations[-1]}

        engine.__class__ = Validating
        engine.valid_step = 3 + 1
        run_sibling_meta_steps(engine, 3)
        return engine, validations

    (sequential, seen_seq), (batched, seen_bat) = program("off"), program("on")
    assert batched.task_batching.active and len(seen_seq) == len(seen_bat) == 2
    assert relative_difference([torch.tensor(seen_seq)], [torch.tensor(seen_bat)]) < TOL
    assert_same_sibling_state(sequential, batched)


def test_the_first_window_checks_leave_the_rng_and_the_buffers_as_they_were(monkeypatch):
    """The checks call the user's training_step (under vmap; once to measure its graph): whatever it
    draws or changes in the module's buffers is put back, so the run goes on as if they had not run."""
    from imaml_ext.task_batching.runner import TaskBatcher

    before, after = {}, {}
    checks, first = TaskBatcher._run_first_window_checks, TaskBatcher._first_window_checks

    def drawing_checks(self, tasks):
        before.update(rng=torch.get_rng_state(), buffers={n: b.clone() for n, b in self.target.named_buffers()})
        checks(self, tasks)
        torch.rand(5)  # as a training_step with dropout would
        with torch.no_grad():
            for buffer in self.target.buffers():
                buffer.add_(1.0)

    def recording(self, tasks):
        first(self, tasks)
        after.update(rng=torch.get_rng_state(), buffers=dict(self.target.named_buffers()))

    monkeypatch.setattr(TaskBatcher, "_run_first_window_checks", drawing_checks)
    monkeypatch.setattr(TaskBatcher, "_first_window_checks", recording)
    engine = build("on", meta_batch=4, inner_steps=1)
    engine.lower.module.register_buffer("count", torch.zeros(3), persistent=False)  # a buffer of the lower's module
    run_meta_steps(engine, 1)
    assert torch.equal(after["rng"], before["rng"])
    assert after["buffers"].keys() == before["buffers"].keys() and "count" in str(list(after["buffers"]))
    assert all(torch.equal(after["buffers"][n], b) for n, b in before["buffers"].items())
