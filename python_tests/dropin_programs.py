"""The Betty iMAML tutorial's classes (MAMLEnv, Upper, Lower, MAMLEngine), as written,
on synthetic few-shot tasks in float64: the program the task-batching tests run
batched and task by task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext.configs import Config, EngineConfig
from imaml_ext.envs import Env
from imaml_ext.problems import ImplicitProblem, IterativeProblem
from meta_problems import per_task_engine

WAYS, SHOTS, QUERY, SIDE = 3, 2, 2, 8


def small_convnet(ways: int = WAYS, hidden: int = 4, running_stats: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, hidden, 3, padding=1, bias=False),  # a bias before BatchNorm has no gradient but noise
        nn.BatchNorm2d(hidden, track_running_stats=running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(hidden * (SIDE // 2) ** 2, ways),
    )


def reg_loss(parameters, reference_parameters, reg_lambda=0.25):
    loss = 0
    for p1, p2 in zip(parameters, reference_parameters):
        loss += torch.sum(torch.pow((p1 - p2), 2))
    return reg_lambda * loss


def build(
    mode: str = "auto",
    meta_batch: int = 4,
    inner_steps: int = 3,
    seed: int = 0,
    kind: str = "implicit",
    lower_config: dict = None,
    upper_config: dict = None,
    lower_optimizer=None,
    lower_class=None,
    env_class=None,
    running_stats: bool = False,
    forward: str = "auto",
    max_tasks=None,
    reg: float = 0.25,
    scheduler: bool = True,
    dtype=torch.float64,
    accuracy_item: bool = True,
    roll_back: bool = False,
    strategy: str = "default",
):
    """The tutorial's program. ``kind``: "implicit" (as written) or "iterative" (the
    tutorial's one-word switch, ImplicitProblem -> IterativeProblem everywhere)."""
    torch.manual_seed(seed)
    base = IterativeProblem if kind == "iterative" else ImplicitProblem
    data = torch.Generator().manual_seed(seed + 1)

    class MAMLEnv(Env):
        def __init__(self):
            super().__init__()
            self.batch = {"train": None, "test": None}

        def sample(self, shots):
            x = torch.randn(WAYS * shots, 1, SIDE, SIDE, generator=data, dtype=dtype)
            y = torch.arange(WAYS).repeat_interleave(shots)
            x = x + y.to(dtype).view(-1, 1, 1, 1) * 0.5  # learnable: the class shifts the image
            return x.to(self.device), y.to(self.device)

        def step(self):
            self.batch["train"] = self.sample(SHOTS)
            self.batch["test"] = self.sample(QUERY)

    class Upper(base):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.lower(inputs)
            loss = F.cross_entropy(out, labels)
            acc = 100.0 * (out.argmax(dim=1) == labels).float().mean()
            return {"loss": loss, "acc": acc.item() if accuracy_item else acc}

        def get_batch(self):
            inputs, labels = self.env.batch["test"]
            return inputs, labels

    class Lower(base):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.module(inputs)
            loss = F.cross_entropy(out, labels)
            reg_ = reg_loss(self.parameters(), self.upper.parameters(), reg)
            return loss + reg_

        def get_batch(self):
            inputs, labels = self.env.batch["train"]
            return inputs, labels

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.upper.module.state_dict())

    lower_class = lower_class(Lower) if lower_class is not None else Lower
    env = (env_class(MAMLEnv) if env_class is not None else MAMLEnv)()

    parent_module = small_convnet(running_stats=running_stats).to(dtype)
    parent_optimizer = torch.optim.AdamW(parent_module.parameters(), lr=3e-3)
    parent_scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(parent_optimizer, T_max=meta_batch * 50) if scheduler else None
    )
    parent = Upper(
        name="upper",
        module=parent_module,
        optimizer=parent_optimizer,
        scheduler=parent_scheduler,
        config=Config(retain_graph=True, gradient_accumulation=meta_batch, **(upper_config or {})),
    )
    child_module = small_convnet(running_stats=running_stats).to(dtype)
    child_optimizer = (lower_optimizer or (lambda params: torch.optim.SGD(params, lr=1e-1)))(child_module.parameters())
    config = {"type": "darts", "unroll_steps": inner_steps, **(lower_config or {})}
    lower = lower_class(name="lower", module=child_module, optimizer=child_optimizer, config=Config(**config))

    MAMLEngine = per_task_engine(inner_steps)  # the tutorial's MAMLEngine.train_step

    engine_config = EngineConfig(
        train_iters=10 ** 6, valid_step=0, device="cpu", task_batching=mode, task_batching_forward=forward,
        task_batching_max_tasks=max_tasks, roll_back=roll_back, strategy=strategy,
    )
    return MAMLEngine(
        config=engine_config,
        problems=[parent, lower],
        dependencies={"u2l": {parent: [lower]}, "l2u": {lower: [parent]}},
        env=env,
    )


def run_meta_steps(engine, meta_steps: int) -> None:
    """``meta_steps`` meta-steps of the engine's own run loop."""
    engine.train_iters = meta_steps * engine.upper.gas * engine.lower.config.unroll_steps
    engine.run()


def theta(engine):
    return [p.detach().clone() for p in engine.upper.module.parameters()]


def relative_difference(a, b) -> float:
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)).sqrt()
    den = sum((x ** 2).sum() for x in a).sqrt()
    return float(num / den) if den > 0 else float(num)


def build_siblings(
    mode: str = "auto",
    tasks: int = 4,
    inner_steps: int = 3,
    seed: int = 0,
    lower_config: dict = None,
    lower_optimizer=None,
    forward: str = "auto",
    outer_class=None,
    dtype=torch.float64,
):
    """Betty 0.1.1's own implicit-MAML example (examples/implicit_maml/main.py in its sdist), as
    written but for the device calls, on synthetic float64 tasks: ``tasks`` sibling lower problems
    named "inner" (reached as inner_0, inner_1, ...) under "outer", each reading its slice of
    one batch, with BatchNorm keeping running statistics (momentum 1) as there."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)

    def net():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=1, affine=True), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(4 * ((SIDE - 2) // 2) ** 2, WAYS),
        ).to(dtype)

    def sample(shots):
        x = torch.randn(tasks, WAYS * shots, 1, SIDE, SIDE, generator=data, dtype=dtype)
        y = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
        return x + y.to(dtype).view(tasks, -1, 1, 1, 1) * 0.5, y

    class MAMLEnv(Env):
        def __init__(self):
            super().__init__()
            self.batch = None

        def step(self):
            self.batch = (*sample(SHOTS), *sample(QUERY))

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            accs = []
            loss = 0
            for idx in range(len(self._children)):
                net = getattr(self, f"inner_{idx}")
                out = net(inputs[idx])
                loss += F.cross_entropy(out, labels[idx]) / len(self._children)
                accs.append((out.argmax(dim=1) == labels[idx]).detach())
            acc = 100.0 * torch.cat(accs).float().mean().item()
            return {"loss": loss, "acc": acc}

        def get_batch(self):
            x_spt, y_spt, x_qry, y_qry = self.env.batch
            return (x_qry, y_qry)

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            idx = self.outer.children.index(self)
            out = self.module(inputs[idx])
            return F.cross_entropy(out, labels[idx]) + self.reg_loss()

        def reg_loss(self):
            return 0.5 * sum(
                [(p1 - p2).pow(2).sum() for p1, p2 in zip(self.trainable_parameters(), self.outer.trainable_parameters())]
            )

        def get_batch(self):
            x_spt, y_spt, x_qry, y_qry = self.env.batch
            return (x_spt, y_spt)

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.outer.module.state_dict())

        def configure_module(self):
            return net()

        def configure_optimizer(self):
            return (lower_optimizer or (lambda params: torch.optim.SGD(params, lr=0.1)))(self.module.parameters())

    outer_class = outer_class(Outer) if outer_class is not None else Outer
    parent_module = net()
    parent_optimizer = torch.optim.Adam(parent_module.parameters(), lr=0.01)
    parent_scheduler = torch.optim.lr_scheduler.StepLR(parent_optimizer, step_size=2, gamma=0.9)
    parent = outer_class(name="outer", module=parent_module, optimizer=parent_optimizer, scheduler=parent_scheduler,
                         config=Config(log_step=1, retain_graph=True))
    child_config = Config(**{"type": "darts", "unroll_steps": inner_steps, **(lower_config or {})})
    children = [Inner(name="inner", config=child_config) for _ in range(tasks)]
    MAMLEngine = per_task_engine(inner_steps)
    engine_config = EngineConfig(train_iters=10 ** 6, valid_step=0, device="cpu", task_batching=mode,
                                 task_batching_forward=forward)
    return MAMLEngine(
        config=engine_config,
        problems=children + [parent],
        dependencies={"u2l": {parent: children}, "l2u": {c: [parent] for c in children}},
        env=MAMLEnv(),
    )


def run_sibling_meta_steps(engine, meta_steps: int) -> None:
    engine.train_iters = meta_steps * engine.inner_0.config.unroll_steps
    engine.run()
