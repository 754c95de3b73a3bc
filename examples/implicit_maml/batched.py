"""The batched twin of tutorial.py: the same Betty-style code, with every task of
a meta-batch adapted at once. What changes from the tutorial (docs/batched-imaml.md shows
the diff):

- the Env samples T tasks at once (``imaml_ext.data.omniglot_tasks``, on the device);
- the lower problem's module is ``BatchedModule(ConvNet(...), T)``: parameters [T, *shape];
- losses are per task (``task_cross_entropy`` -> [T]): summed for the lower problem,
  averaged for the upper one, whose ``gradient_accumulation`` is 1;
- the lower problem's Config is ``type="cg"`` with ``proximal_lambda=2 * reg``: CG per
  task on the fused kernels, the proximal part applied analytically.

    PYTHONPATH=. python examples/implicit_maml/batched.py --train_iters 500

--train_iters counts global steps: here one meta-step is inner_steps of them (all T tasks
step at once, gradient_accumulation=1), so 500 is 100 meta-steps; in tutorial.py a meta-step
is inner_steps x meta_batch_size global steps.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.optim as optim

from imaml_ext.batched import BatchedModule, task_cross_entropy
from imaml_ext.configs import Config, EngineConfig
from imaml_ext.engine import Engine
from imaml_ext.envs import Env
from imaml_ext.problems import ImplicitProblem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tutorial import ConvNet  # noqa: E402  (the same Conv4)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Batched iMAML on Omniglot through the Betty-compatible API")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=1, help="query examples per class (the tutorial: = shots)")
    parser.add_argument("--inner_steps", type=int, default=5)
    parser.add_argument("--meta_batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--reg", type=float, default=0.25)
    parser.add_argument("--cg_iterations", type=int, default=3)
    parser.add_argument("--cg_damping", type=float, default=0.0,
                        help="CG solves ((1 + cg_damping) I + H / (lambda + lam_damping)) x = v; the iMAML authors' code: 1")
    parser.add_argument("--lam_damping", type=float, default=0.0, help="see --cg_damping; the iMAML authors' code: 10")
    parser.add_argument("--meta_lr", type=float, default=3e-4)
    parser.add_argument("--base_lr", type=float, default=1e-1)
    parser.add_argument("--train_iters", type=int, default=None, help="global steps; inner_steps of them make a meta-step (default: 1000 meta-steps)")
    parser.add_argument("--valid_step", type=int, default=None)
    parser.add_argument("--valid_tasks", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from imaml_ext.data import omniglot_tasks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = omniglot_tasks(args.ways, args.shots, args.query, root=args.data, seed=args.seed, device=device)
    T = args.meta_batch_size
    # Every validation sees the same test tasks: a fixed set, comparable across validations.
    valid_state = tasks.test.generator.get_state()

    class MAMLEnv(Env):
        def __init__(self):
            super().__init__()
            self.batch = {"train": None, "test": None}

        def step(self):
            support_x, support_y, query_x, query_y = tasks.train.sample(T)
            self.batch["train"] = (support_x, support_y)
            self.batch["test"] = (query_x, query_y)

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.lower(inputs)
            loss = task_cross_entropy(out, labels).mean()
            acc = 100.0 * (out.argmax(dim=-1) == labels).float().mean()
            return {"loss": loss, "acc": acc}

        def get_batch(self):
            return self.env.batch["test"]

    def reg_loss(parameters, reference_parameters, reg_lambda=0.25):
        loss = 0
        for p1, p2 in zip(parameters, reference_parameters):
            loss += torch.sum(torch.pow((p1 - p2), 2))  # [T, ...] - [...]: every task to theta
        return reg_lambda * loss

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.module(inputs)
            loss = task_cross_entropy(out, labels).sum()
            return loss + reg_loss(self.parameters(), self.upper.parameters(), args.reg)

        def get_batch(self):
            return self.env.batch["train"]

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.upper.module.state_dict())  # into every task at once

    parent_module = ConvNet(args.ways, args.hidden_size)
    parent_optimizer = optim.AdamW(parent_module.parameters(), lr=args.meta_lr)
    upper = Upper(
        name="upper",
        module=parent_module,
        optimizer=parent_optimizer,
        config=Config(log_step=10, gradient_accumulation=1),
    )
    child_module = BatchedModule(ConvNet(args.ways, args.hidden_size), T)
    lower = Lower(
        name="lower",
        module=child_module,
        optimizer=optim.SGD(child_module.parameters(), lr=args.base_lr),
        config=Config(type="cg", unroll_steps=args.inner_steps, cg_iterations=args.cg_iterations,
                      proximal_lambda=2 * args.reg, cg_damping=args.cg_damping, lam_damping=args.lam_damping),
    )

    class MAMLEngine(Engine):
        def train_step(self):
            if self.global_step % args.inner_steps == 1 or args.inner_steps == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

        def validation(self):
            """The tutorial's: inner_steps plain SGD steps from theta on each test task, all at once."""
            if not hasattr(self, "best_acc"):
                self.best_acc = -1
            correct, total = 0, 0
            tasks.test.generator.set_state(valid_state)
            for start in range(0, args.valid_tasks, T):
                n = min(T, args.valid_tasks - start)
                support_x, support_y, query_x, query_y = tasks.test.sample(n)
                net = BatchedModule(ConvNet(args.ways, args.hidden_size), n).to(self.device)
                net.load_state_dict(self.upper.module.state_dict())
                opt = optim.SGD(net.parameters(), lr=args.base_lr)
                for _ in range(args.inner_steps):
                    opt.zero_grad()
                    task_cross_entropy(net(support_x), support_y).sum().backward()
                    opt.step()
                with torch.no_grad():
                    correct += (net(query_x).argmax(-1) == query_y).sum().item()
                    total += query_y.numel()
            acc = 100.0 * correct / total
            self.best_acc = max(self.best_acc, acc)
            return {"acc": acc, "best_acc": self.best_acc}

    steps = args.inner_steps
    engine_config = EngineConfig(
        train_iters=args.train_iters if args.train_iters is not None else 1000 * steps,
        valid_step=args.valid_step if args.valid_step is not None else 100 * steps,
        device=device,
    )
    engine = MAMLEngine(
        config=engine_config,
        problems=[upper, lower],
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        env=MAMLEnv(),
    )
    engine.tasks = tasks
    return engine


def main(argv=None):
    engine = build(argv)
    engine.run()
    return engine


if __name__ == "__main__":
    main()
