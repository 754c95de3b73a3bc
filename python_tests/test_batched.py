"""The batched iMAML meta-step: equal to the Betty-API sequential path and to a
dense solve, flat in memory over inner steps, rejecting bad input clearly,
and learning on Omniglot."""

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_ext
from imaml_ext import IMAML, Config, Engine, EngineConfig, Env, ImplicitProblem
from meta_problems import QueryUpper, TaskEnv, per_task_engine

ROOT = pathlib.Path(__file__).resolve().parents[1]
f64 = torch.float64


def conv4(ways=5, hidden=8, dtype=f64):
    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways)).to(dtype)


def random_tasks(T, ways=5, shots=1, query=2, dtype=f64):
    def part(k):
        x = torch.randn(T, ways * k, 1, 28, 28, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(k).repeat(T, 1)
        return x, y[:, torch.randperm(ways * k)]

    return (*part(shots), *part(query))


# ----- the Betty-API sequential path, the same maths one task at a time -----

class Lower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        lam = self.config.proximal_lambda
        prox = sum(((p - q) ** 2).sum() for p, q in zip(self.parameters(), self.upper.parameters()))
        return F.cross_entropy(self.module(x), y) + 0.5 * lam * prox

    def get_batch(self):
        return self.env.batch["train"]

    def on_inner_loop_start(self):
        self.module.load_state_dict(self.upper.module.state_dict())


def sequential_meta_gradient(model, tasks, inner_steps, inner_lr, lam, cg_iterations, device="cpu"):
    """theta's gradient after one meta-step of T tasks through imaml_ext.Engine (model and
    tasks already on ``device``)."""
    import copy

    T = tasks[0].shape[0]
    theta = copy.deepcopy(model)
    upper = QueryUpper("upper", Config(gradient_accumulation=T), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
    phi = copy.deepcopy(model)
    lower = Lower("lower", Config(type="cg", unroll_steps=inner_steps, cg_iterations=cg_iterations,
                                  proximal_lambda=lam), phi, torch.optim.SGD(phi.parameters(), lr=inner_lr))

    engine = per_task_engine(inner_steps)([upper, lower], EngineConfig(device=device, train_iters=T * inner_steps),
                        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, env=TaskEnv(tasks))
    engine.run()
    assert upper.count == T
    return upper.captured


@pytest.mark.parametrize("forward", ["loop", "vmap"])
def test_batched_equals_betty_api_sequential_on_conv4_with_batchnorm(forward):
    T, inner_steps, inner_lr, lam, cg_iterations = 3, 4, 0.1, 2.0, 4
    model = conv4()
    tasks = random_tasks(T)
    expected = sequential_meta_gradient(model, tasks, inner_steps, inner_lr, lam, cg_iterations)
    imaml = IMAML(model, inner_steps, inner_lr, lam, cg_iterations, forward=forward)
    result = imaml.meta_step(*tasks)
    got = [p.grad for p in model.parameters()]
    for name, g, e in zip([n for n, _ in model.named_parameters()], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    # Every task ran all iterations, except one whose CG met non-positive curvature
    # (a Conv4 Hessian after 4 steps can be indefinite; both paths then stop alike).
    assert bool(((result.cg.iterations == cg_iterations) | result.cg.breakdown).all())
    assert 0.0 <= result.accuracy.item() <= 1.0 and result.loss.item() > 0


def test_meta_gradient_accumulates_into_existing_grad():
    model = conv4()
    tasks = random_tasks(2)
    imaml = IMAML(model, 2, 0.1, 2.0, 3)
    imaml.meta_step(*tasks)
    once = [p.grad.clone() for p in model.parameters()]
    imaml.meta_step(*tasks)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-14)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5).double()
        self.fc2 = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("cg_damping, lam_damping", [(0.0, 0.0), (1.0, 10.0), (0.3, 0.0)])
def test_batched_equals_dense_solve_on_tiny_network(cg_damping, lam_damping):
    T, inner_steps, inner_lr, lam = 3, 6, 0.2, 2.0
    model = TinyMLP()
    n = sum(p.numel() for p in model.parameters())
    sx, qx = torch.randn(T, 6, 4, dtype=f64), torch.randn(T, 9, 4, dtype=f64)
    sy, qy = torch.randint(0, 3, (T, 6)), torch.randint(0, 3, (T, 9))
    imaml = IMAML(model, inner_steps, inner_lr, lam, cg_iterations=2 * n, cg_damping=cg_damping,
                  lam_damping=lam_damping)
    result = imaml.meta_step(sx, sy, qx, qy)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(flat):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = flat[i:i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    def loss(flat, x, y):
        return F.cross_entropy(torch.func.functional_call(model, unflat(flat), (x,)), y)

    expected = torch.zeros(n, dtype=f64)
    for t in range(T):
        phi = theta.clone()
        for _ in range(inner_steps):
            g = torch.autograd.functional.jacobian(lambda f: loss(f, sx[t], sy[t]), phi)
            phi = phi - inner_lr * (g + lam * (phi - theta))
        H = torch.autograd.functional.hessian(lambda f: loss(f, sx[t], sy[t]), phi)
        v = torch.autograd.functional.jacobian(lambda f: loss(f, qx[t], qy[t]), phi)
        # the proximal inner loop's phi, damped as the iMAML authors' code does when asked
        A = (1 + cg_damping) * torch.eye(n, dtype=f64) + H / (lam + lam_damping)
        assert torch.linalg.eigvalsh(A).min() > 0
        expected += torch.linalg.solve(A, v) / T
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert not result.cg.breakdown.any()


def test_adapt_matches_the_proximal_inner_loop_and_evaluate_reports_it():
    model = TinyMLP()
    sx, sy = torch.randn(2, 6, 4, dtype=f64), torch.randint(0, 3, (2, 6))
    imaml = IMAML(model, inner_steps=3, inner_lr=0.3, lam=0.5)
    phi, module = imaml.adapt(sx, sy)
    theta = [p.detach() for p in model.parameters()]
    for t in range(2):
        ref = [p.clone() for p in theta]
        for _ in range(3):
            ref = [p.requires_grad_(True) for p in ref]
            out = torch.func.functional_call(model, dict(zip([k for k, _ in model.named_parameters()], ref)), (sx[t],))
            grads = torch.autograd.grad(F.cross_entropy(out, sy[t]), ref)
            ref = [(p - 0.3 * (g + 0.5 * (p - q))).detach() for p, g, q in zip(ref, grads, theta)]
        for a, b in zip(phi, ref):
            torch.testing.assert_close(a[t], b, rtol=1e-12, atol=1e-12)
    loss, acc = imaml.evaluate(sx, sy, sx, sy)
    with torch.no_grad():
        logits = module(phi, sx)
    assert loss.item() == pytest.approx(IMAML.task_losses(logits, sy).mean().item(), rel=1e-12)
    per_task_loss, per_task_acc = imaml.evaluate(sx, sy, sx, sy, per_task=True)
    torch.testing.assert_close(per_task_loss, IMAML.task_losses(logits, sy), rtol=1e-12, atol=0)
    torch.testing.assert_close(per_task_acc, (logits.argmax(-1) == sy).double().mean(1).to(per_task_acc.dtype))
    assert acc.item() == pytest.approx(per_task_acc.mean().item(), rel=1e-12)


# ----- bad input -----

def test_bad_inputs_are_rejected_with_clear_errors():
    model = TinyMLP()
    imaml = IMAML(model, 1, 0.1, 1.0, 2)
    sx, sy, qx, qy = torch.randn(2, 6, 4, dtype=f64), torch.randint(0, 3, (2, 6)), torch.randn(2, 9, 4, dtype=f64), torch.randint(0, 3, (2, 9))
    # Every class in every task, so the label ranges the messages print do not depend on the draw.
    sy[:, 3:] = qy[:, 3:6] = torch.arange(3)
    with pytest.raises(ValueError, match=r"query_x must have the T = 2 tasks of support_x; got shape \(3, 9, 4\)"):
        imaml.meta_step(sx, sy, torch.randn(3, 9, 4, dtype=f64), torch.randint(0, 3, (3, 9)))
    with pytest.raises(ValueError, match=r"query_y must hold labels in \[0, 2\] \(3 ways\); got labels in \[0, 3\]"):
        bad = qy.clone()
        bad[0, 4] = 3
        imaml.meta_step(sx, sy, qx, bad)
    with pytest.raises(ValueError, match=r"support_y must hold labels in \[0, 2\] \(3 ways\); got labels in \[-1, 2\]"):
        bad = sy.clone()
        bad[1, 2] = -1
        imaml.meta_step(sx, bad, qx, qy)
    with pytest.raises(ValueError, match=r"at least one task; got T = 0"):
        imaml.meta_step(sx[:0], sy[:0], qx[:0], qy[:0])
    with pytest.raises(ValueError, match=r"support_y must have one label per example of support_x \(2, 6\); got shape \(2, 5\)"):
        imaml.meta_step(sx, sy[:, :5], qx, qy)
    with pytest.raises(TypeError, match=r"query_y must hold integer class labels; got dtype torch.float32"):
        imaml.meta_step(sx, sy, qx, qy.float())
    with pytest.raises(ValueError, match=r"support_x must be \[T, N, \.\.\.\] \(tasks first\); got shape \(6, 4\)"):
        imaml.meta_step(sx[0], sy, qx, qy)
    with pytest.raises(ValueError, match=r"IMAML: lam must be a finite number > 0; got 0"):
        IMAML(model, 1, 0.1, 0, 2)
    with pytest.raises(ValueError, match=r"IMAML: cg_damping must be a finite number >= 0; got -1"):
        IMAML(model, cg_damping=-1)
    with pytest.raises(ValueError, match=r"IMAML: lam_damping must be a finite number >= 0; got nan"):
        IMAML(model, lam_damping=float("nan"))
    with pytest.raises(ValueError, match=r"IMAML: cg_iterations must be an integer > 0; got 1.5"):
        IMAML(model, 1, 0.1, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"forward must be one of 'auto', 'vmap', 'loop', 'stacked', 'im2col', 'channels_last', 'loop\+fused', 'vmap\+fused', 'stacked\+fused', 'im2col\+fused'; got 'fast'"):
        IMAML(model, forward="fast")
    with pytest.raises(ValueError, match=r"the model outputs 3 classes but ways = 5"):
        IMAML(model, 1, 0.1, 1.0, 2, ways=5).meta_step(sx, sy, qx, qy)
    with pytest.raises(TypeError, match=r"query_x must have the model's dtype \(torch.float64\); got torch.float32"):
        imaml.meta_step(sx, sy, qx.float(), qy)
    with pytest.raises(ValueError, match=r"support_x must be on the model's device \(cpu\); got meta"):
        imaml.meta_step(sx.to("meta"), sy, qx, qy)
    with pytest.raises(TypeError, match=r"IMAML: model must be a torch.nn.Module; got Tensor"):
        IMAML(sx)
    assert all(p.grad is None for p in model.parameters()), "a rejected step must not touch theta's grad"


def test_task_cross_entropy_per_task_and_its_shape_errors():
    from imaml_ext.batched import task_cross_entropy

    logits, labels = torch.randn(3, 4, 5, dtype=f64), torch.randint(0, 5, (3, 4))
    expected = torch.stack([F.cross_entropy(logits[t], labels[t]) for t in range(3)])
    torch.testing.assert_close(task_cross_entropy(logits, labels), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"logits must be \[T, B, C\] and labels \[T, B\]; got \(3, 4, 5\) and \(3, 5\)"):
        task_cross_entropy(logits, torch.randint(0, 5, (3, 5)))
    with pytest.raises(ValueError, match=r"got \(12, 5\) and \(3, 4\)"):
        task_cross_entropy(logits.reshape(12, 5), labels)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    "model, pattern",
    [
        (nn.Sequential(nn.Linear(4, 3), nn.LSTM(3, 3)), r"layer '1' \(LSTM\): recurrent layers"),
        (nn.Sequential(nn.Linear(4, 3), Custom()), r"layer '1' \(Custom\): it is not a standard torch.nn layer"),
    ],
)
def test_unbatchable_layers_are_named(model, pattern):
    with pytest.raises(ValueError, match=pattern):
        IMAML(model).meta_step(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                               torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


def test_meta_batch_that_does_not_fit_is_a_clear_error():
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 5))  # 16 MiB of parameters per task
    imaml = IMAML(model, 1, 0.1, 1.0, 1, check_labels=False)
    T = 2**20  # 16 TiB of phi
    x = torch.zeros(1, 1, 2048).expand(T, 1, 2048)
    y = torch.zeros(1, 1, dtype=torch.long).expand(T, 1)
    with pytest.raises(MemoryError, match=r"a meta-batch of T = 1048576 tasks does not fit on cpu: each task holds 16\.0 MiB"):
        imaml.meta_step(x, y, x, y)


# ----- memory is flat in the number of inner steps -----

MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    sys.path.insert(0, sys.argv[3])
    from test_batched import conv4
    from imaml_ext import IMAML
    torch.manual_seed(0)
    torch.set_num_threads(1)
    steps, mode = int(sys.argv[1]), sys.argv[2]
    model = conv4(hidden=32, dtype=torch.float32)
    T, n = 4, 25
    sx, sy = torch.randn(T, n, 1, 28, 28), torch.randint(0, 5, (T, n))
    # The forward and the HVPs fixed: "auto" times them, and two processes may choose differently
    # (forwards whose memory differs several-fold), which is not what this test compares.
    if mode == "imaml":
        IMAML(model, steps, 0.1, 2.0, 2, check_labels=False, forward="loop", hvp="reverse").meta_step(sx, sy, sx, sy)
    else:  # unrolled MAML (imaml_ext.MAML): the graph of every inner step is kept
        from imaml_ext import MAML
        measured = []
        check = MAML._check_graph_fits
        MAML._check_graph_fits = lambda self, b, d, t: (measured.append(b), check(self, b, d, t))[1]
        MAML(model, steps, 0.1, check_labels=False, forward="loop").meta_step(sx, sy, sx, sy)
        print("graph-bytes-per-step", measured[0])
    # VmHWM belongs to this process's own address space; ru_maxrss would carry
    # over the parent's peak across fork and exec.
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) // 1024)
    """
)


def peak_rss_mib(steps, mode):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(steps), mode, str(ROOT / "python_tests")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    per_step = [int(line.split()[1]) for line in lines if line.startswith("graph-bytes-per-step")]
    return int(lines[-1]), (per_step[0] / 2**20 if per_step else None)


def test_peak_memory_is_flat_in_inner_steps_while_unrolled_maml_grows():
    (imaml_5, _), (imaml_50, _) = peak_rss_mib(5, "imaml"), peak_rss_mib(50, "imaml")
    (maml_2, step_mib), (maml_8, _) = peak_rss_mib(2, "maml"), peak_rss_mib(8, "maml")
    print(f"peak RSS MiB: iMAML 5 steps {imaml_5}, 50 steps {imaml_50}; MAML 2 steps {maml_2}, 8 steps {maml_8}; "
          f"MAML's graph estimate {step_mib:.0f} MiB per step")
    # The same harness sees the unrolled graph grow by hundreds of MiB...
    assert maml_8 > maml_2 + 150
    # ...by about what MAML's graph meter predicts for 6 more steps (it counts every saved
    # storage once, an upper bound; the allocator may reuse some of it)...
    assert 0.5 * 6 * step_mib < maml_8 - maml_2 < 2.0 * 6 * step_mib
    # ...and iMAML's peak stay where it was with 10x the inner steps.
    assert imaml_50 < imaml_5 * 1.1 + 20


# ----- learning on Omniglot -----

def test_short_omniglot_run_beats_fine_tuning_from_the_random_start():
    from imaml_ext.data import find_data_root, omniglot_tasks

    try:
        find_data_root()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    seed = torch.initial_seed() % 2**31
    tasks = omniglot_tasks(ways=5, shots=1, query=5, seed=seed)
    model = conv4(hidden=32, dtype=torch.float32)
    # The damping that training uses: undamped, CG breaks down on most tasks at a random θ and the
    # outcome swings with the seed (loss ratio 0.56-0.65 over 7 seeds, 0.92 on an eighth), while
    # damped it took the loss to 0.49-0.55 of its start on all eight.
    imaml = IMAML(model, inner_steps=5, inner_lr=0.1, lam=0.5, cg_iterations=3, cg_damping=1.0, lam_damping=10.0)
    test_batch = tasks.test.sample(100)
    loss0, acc0 = imaml.evaluate(*test_batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        imaml.meta_step(*tasks.train.sample(8))
        optimizer.step()
    loss1, acc1 = imaml.evaluate(*test_batch)
    assert loss1 < 0.7 * loss0, f"query loss {loss0.item():.3f} -> {loss1.item():.3f}"
    assert acc1 > acc0 + 0.07, f"query accuracy {acc0.item():.3f} -> {acc1.item():.3f}"


# ----- way (a): the batched Env and BatchedModule through the Betty-compatible API -----

class BatchedEnv(Env):
    def __init__(self, tasks):
        super().__init__()
        self.tasks, self.batch = tasks, None

    def step(self):
        sx, sy, qx, qy = self.tasks
        self.batch = {"train": (sx, sy), "test": (qx, qy)}


class BatchedLower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        reg = sum(torch.sum((p - q) ** 2) for p, q in zip(self.parameters(), self.upper.parameters()))
        return imaml_ext.batched.task_cross_entropy(self.module(x), y).sum() + self.extra_config["reg"] * reg

    def get_batch(self):
        return self.env.batch["train"]

    def on_inner_loop_start(self):
        self.module.load_state_dict(self.upper.module.state_dict())


class BatchedUpper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return imaml_ext.batched.task_cross_entropy(self.lower(x), y).mean()

    def get_batch(self):
        return self.env.batch["test"]

    def grad_callback(self, params):
        self.captured = [p.grad.clone() for p in params]


@pytest.mark.parametrize("forward", ["loop", "vmap"])
def test_betty_api_with_batched_module_equals_imaml_meta_step(forward):
    import copy

    from imaml_ext.batched import BatchedModule

    T, inner_steps, inner_lr, reg, cg_iterations = 3, 3, 0.1, 1.0, 4
    model = conv4()
    tasks = random_tasks(T)
    theta = copy.deepcopy(model)
    upper = BatchedUpper("upper", Config(), theta, torch.optim.SGD(theta.parameters(), lr=0.0))
    batched = BatchedModule(copy.deepcopy(model), T, forward=forward)
    lower = BatchedLower("lower", Config(type="cg", unroll_steps=inner_steps, cg_iterations=cg_iterations,
                                         proximal_lambda=2 * reg),
                         batched, torch.optim.SGD(batched.parameters(), lr=inner_lr), extra_config={"reg": reg})

    class OneMetaStep(Engine):
        def train_step(self):
            if self.global_step == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

    OneMetaStep([upper, lower], EngineConfig(device="cpu", train_iters=inner_steps),
                {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, env=BatchedEnv(tasks)).run()
    assert upper.count == 1 and lower.count == inner_steps
    IMAML(model, inner_steps, inner_lr, 2 * reg, cg_iterations, forward=forward).meta_step(*tasks)
    for got, expected in zip(upper.captured, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    info = lower.last_hypergradient_info["cg"]
    assert info.iterations.shape == (T,), "one CG per task"


def test_batched_module_loads_a_single_models_state_into_every_task():
    from imaml_ext.batched import BatchedModule

    model = conv4(dtype=torch.float32)
    batched = BatchedModule(conv4(dtype=torch.float32), 4)
    batched.load_state_dict(model.state_dict())
    for p, q in zip(batched.task_parameters(), model.parameters()):
        assert p.shape == (4, *q.shape)
        assert torch.equal(p, q.detach().expand_as(p))
    x = torch.randn(4, 3, 1, 28, 28)
    torch.testing.assert_close(batched(x)[2], model(x[2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"inputs must be \[T, B, \.\.\.\] with T = 4 tasks; got shape \(3, 3, 1, 28, 28\)"):
        batched(x[:3])
    with pytest.raises(ValueError, match=r"forward must be one of 'auto', 'vmap', 'loop', 'stacked', 'im2col', 'channels_last', 'loop\+fused', 'vmap\+fused', 'stacked\+fused', 'im2col\+fused'; got 'grouped'"):
        BatchedModule(conv4(), 2, forward="grouped")
    with pytest.raises(ValueError, match=r"the number of tasks T must be an integer >= 1; got 0"):
        BatchedModule(conv4(), 0)


def test_batched_example_learns_on_omniglot():
    from imaml_ext.data import find_data_root

    try:
        find_data_root()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    import importlib.util

    spec = importlib.util.spec_from_file_location("imaml_batched_example", ROOT / "examples/implicit_maml/batched.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # With the authors' damping. Undamped (lambda 0.5), CG broke down in a quarter of the meta-steps and
    # a hypergradient's norm reached 6.7 times the query gradient's (0.5 to 0.6 damped, no breakdown in
    # 160 meta-steps); one CI run of 40 meta-steps learnt nothing (73.4 % -> 73.5 %), its query loss rising.
    engine = example.build(["--meta_batch_size", "8", "--hidden_size", "32", "--meta_lr", "3e-3", "--device", "cpu",
                            "--query", "5", "--train_iters", str(5 * 40), "--valid_step", "0", "--valid_tasks", "160",
                            "--cg_damping", "1", "--lam_damping", "10", "--seed", str(torch.initial_seed() % 2**31)])
    before = engine.validation()["acc"]  # on a fixed set of test tasks
    engine.run()
    after = engine.validation()["acc"]
    assert engine.upper.count == 40
    assert engine.lower.cg_breakdowns == 0
    assert after > before + 5, f"adapted accuracy {before:.1f} % -> {after:.1f} %"  # 9 to 14 points in 4 seeds


# ----- CUDA: vmap on the GPU, and the captured meta-step equal to eager -----

@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager_meta_step():
    torch.manual_seed(0)
    model = conv4(hidden=16, dtype=torch.float32).cuda()
    imaml = IMAML(model, inner_steps=3, inner_lr=0.1, lam=2.0, cg_iterations=3, forward="vmap")
    first = [t.cuda() for t in random_tasks(4, dtype=torch.float32)]
    second = [t.cuda() for t in random_tasks(4, dtype=torch.float32)]
    captured = imaml.capture(*first)
    for batch in (first, second, first):
        model.zero_grad()
        eager = imaml.meta_step(*batch)
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        replayed = captured.step(*batch)
        for g, e in zip([p.grad for p in model.parameters()], expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(replayed.loss, eager.loss, rtol=1e-6, atol=1e-7)
        assert torch.equal(replayed.cg.iterations, eager.cg.iterations)
    with pytest.raises(ValueError, match=r"support_x must match the captured batch"):
        captured.step(first[0][:2], *first[1:])


@pytest.mark.cuda
def test_cuda_batched_equals_cpu_float64():
    torch.manual_seed(0)
    model = conv4(hidden=8)
    tasks = random_tasks(3)
    IMAML(model, 3, 0.1, 2.0, 3, forward="loop").meta_step(*tasks)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cuda()
    IMAML(model, 3, 0.1, 2.0, 3, forward="vmap").meta_step(*[t.cuda() for t in tasks])
    for g, e in zip([p.grad.cpu() for p in model.parameters()], expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_capture_on_cpu_is_a_clear_error():
    imaml = IMAML(TinyMLP(), 1, 0.1, 1.0, 1)
    sx, sy = torch.randn(2, 3, 4, dtype=f64), torch.randint(0, 3, (2, 3))
    with pytest.raises(ValueError, match=r"IMAML.capture needs CUDA tensors \(CUDA graphs\); got tensors on cpu"):
        imaml.capture(sx, sy, sx, sy)


# ----- non-finite tasks -----

def test_task_with_a_nonfinite_hvp_is_named_and_skipped(monkeypatch):
    """CG alone would stop such a task at its last good iterate and keep it in the mean."""
    from imaml_ext.batched import imaml as imaml_module

    model = conv4(hidden=4)
    tasks = random_tasks(3, shots=1, query=2)
    solve = imaml_module.ops.cg_solve

    def solve_with_task_1_poisoned(hvp, b, *args, **kwargs):
        def poisoned(vectors):
            out = hvp(vectors)
            out[0][1].fill_(float("nan"))
            return out
        return solve(poisoned, b, *args, **kwargs)

    import copy

    clean = copy.deepcopy(model)
    keep = torch.tensor([0, 2])
    IMAML(clean, 2, 0.1, 2.0, 3).meta_step(*[t[keep] for t in tasks])
    monkeypatch.setattr(imaml_module.ops, "cg_solve", solve_with_task_1_poisoned)
    result = IMAML(model, 2, 0.1, 2.0, 3, nonfinite="skip").meta_step(*tasks)
    assert result.nonfinite.tolist() == [False, True, False]
    assert bool(result.cg.breakdown[1])
    for p, q in zip(model.parameters(), clean.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)


def test_nonfinite_task_is_skipped_on_the_device_and_named():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = conv4(hidden=4)
    sx, sy, qx, qy = random_tasks(4, shots=1, query=2)
    sx[2, 0, 0, 5, 5] = float("nan")  # poisons task 2 only (BatchNorm statistics are per task)
    keep = torch.tensor([0, 1, 3])
    import copy

    skipped = copy.deepcopy(model)
    result = IMAML(skipped, 2, 0.1, 2.0, 3, nonfinite="skip").meta_step(sx, sy, qx, qy)
    assert result.nonfinite.tolist() == [False, False, True, False]
    assert torch.isfinite(result.loss) and torch.isfinite(result.support_loss)

    clean = copy.deepcopy(model)
    expected = IMAML(clean, 2, 0.1, 2.0, 3).meta_step(sx[keep], sy[keep], qx[keep], qy[keep])
    for p, q in zip(skipped.parameters(), clean.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)

    propagated = copy.deepcopy(model)
    result = IMAML(propagated, 2, 0.1, 2.0, 3).meta_step(sx, sy, qx, qy)
    assert result.nonfinite.tolist() == [False, False, True, False]
    assert not all(torch.isfinite(p.grad).all() for p in propagated.parameters())
    with pytest.raises(ValueError, match=r"IMAML: nonfinite must be one of 'propagate', 'skip'; got 'drop'"):
        IMAML(model, nonfinite="drop")


def test_a_meta_batch_of_nonfinite_tasks_reports_nan_not_zero():
    """Every task left out: no loss to report (it was 0.0, a perfect-looking loss), and no update."""
    model = conv4(hidden=4)
    sx, sy, qx, qy = random_tasks(3, shots=1, query=2)
    result = IMAML(model, 2, 0.1, 2.0, 3, nonfinite="skip").meta_step(sx.fill_(float("nan")), sy, qx, qy)
    assert result.nonfinite.tolist() == [True] * 3
    assert all(torch.isnan(v) for v in (result.loss, result.accuracy, result.support_loss))
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


@pytest.mark.parametrize("layer, said", [
    (lambda: torch.nn.Dropout(0.2), "draws a new mask"),
    (lambda: torch.nn.BatchNorm1d(4), "keeps running statistics"),
])
@pytest.mark.parametrize("owner", ["IMAML", "MAML", "BatchedModule"])
def test_a_layer_that_changes_what_the_meta_gradient_means_is_named_once(layer, said, owner):
    import warnings as _warnings

    import imaml_ext

    build = {"BatchedModule": lambda m: imaml_ext.BatchedModule(m, 2)}.get(owner, getattr(imaml_ext, owner))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), layer(), torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=f"^{owner}: .*{said}") as caught:
        build(model)  # BatchedModule took both silently; MAML's said "IMAML" and pointed at maml.py
    ours = [w for w in caught if str(w.message).startswith(f"{owner}: ")]
    assert len(ours) == 1 and ours[0].filename == __file__
    clean = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=False),
                                torch.nn.Dropout(0.0), torch.nn.Linear(4, 2))
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        build(clean)
