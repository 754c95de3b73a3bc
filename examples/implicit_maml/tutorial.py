"""The Betty iMAML tutorial (../shared/seed, "Implicit Model Agnostic
Meta-Learning") with ``betty`` replaced by ``imaml_ext`` and nothing else
changed in its classes: MAMLEnv, Upper, Lower, MAMLEngine.

Two additions around them, since the tutorial leaves them implicit: the
argument parser, and the tasksets. learn2learn's ``get_tasksets`` downloads
Omniglot (which fails offline), so ``tasksets`` is built by
``imaml_ext.data.l2l_tasksets``: learn2learn ``TaskDataset``s over the same
images, whose ``tasksets.train.sample()`` the tutorial calls unchanged.

    python examples/implicit_maml/tutorial.py --train_iters 8000

--train_iters counts global steps, Betty's unit: one meta-step is inner_steps x
meta_batch_size of them (80 with the defaults), so 8000 is 100 meta-steps. The Engine
runs each meta-step's 16 inner loops as one batch (engine.task_batching).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim

from imaml_ext.configs import Config, EngineConfig
from imaml_ext.engine import Engine
from imaml_ext.envs import Env
from imaml_ext.models import Conv4
from imaml_ext.problems import ImplicitProblem


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="iMAML on Omniglot, the Betty tutorial on imaml_ext")
    parser.add_argument("--task", default="omniglot", choices=["omniglot"])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--inner_steps", type=int, default=5)
    parser.add_argument("--meta_batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--meta_lr", type=float, default=3e-4, help="the upper's AdamW learning rate")
    parser.add_argument("--base_lr", type=float, default=1e-1, help="the lower's SGD learning rate")
    parser.add_argument("--reg", type=float, default=0.25, help="reg * ||phi - theta||^2 in the lower loss")
    parser.add_argument("--task_num", type=int, default=-1)
    parser.add_argument("--train_iters", type=int, default=None, help="global steps; inner_steps x meta_batch_size of them make a meta-step (default: 1000 meta-steps)")
    parser.add_argument("--valid_step", type=int, default=None, help="global steps between validations")
    parser.add_argument("--valid_tasks", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", default=None, help="Omniglot root (default: $IMAML_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# The Conv4 of the iMAML/MAML papers, which Betty's full example imports from its utilities.
ConvNet = Conv4

model_cls = ConvNet


def build(argv=None):
    """Everything of the tutorial up to ``engine.run()``; returns the engine."""
    global args, tasksets
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import random

    random.seed(args.seed)
    from imaml_ext.data import l2l_tasksets

    tasksets = l2l_tasksets(
        train_ways=args.ways,
        train_samples=2 * args.shots,
        test_ways=args.ways,
        test_samples=2 * args.shots,
        num_tasks=args.task_num,
        root=args.data,
    )

    # ----- the tutorial, as written -----
    def split_data(data, labels, shots, ways):
        out = {"train": None, "test": None}
        adapt_indices = np.zeros(data.size(0), dtype=bool)
        adapt_indices[np.arange(shots * ways) * 2] = True
        eval_indices = torch.from_numpy(~adapt_indices)
        adapt_indices = torch.from_numpy(adapt_indices)
        out["train"] = (data[adapt_indices], labels[adapt_indices])
        out["test"] = (data[eval_indices], labels[eval_indices])

        return out

    class MAMLEnv(Env):
        def __init__(self):
            super().__init__()

            self.tasks = tasksets
            self.batch = {"train": None, "test": None}

        def step(self):
            data, labels = self.tasks.train.sample()
            data, labels = data.to(self.device), labels.to(self.device)
            out = split_data(data, labels, args.shots, args.ways)
            self.batch["train"] = out["train"]
            self.batch["test"] = out["test"]

    env = MAMLEnv()

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.lower(inputs)
            loss = F.cross_entropy(out, labels)
            acc = 100.0 * (out.argmax(dim=1) == labels).float().mean().item()

            return {"loss": loss, "acc": acc}

        def get_batch(self):
            inputs, labels = self.env.batch["test"]

            return inputs, labels

    parent_module = ConvNet(args.ways, args.hidden_size)
    parent_optimizer = optim.AdamW(parent_module.parameters(), lr=args.meta_lr)
    parent_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        parent_optimizer,
        T_max=int(args.meta_batch_size * 7500),
    )
    parent_config = Config(
        log_step=int(args.inner_steps * args.meta_batch_size * 10),
        retain_graph=True,
        gradient_accumulation=args.meta_batch_size,
    )
    parent = Upper(
        name="upper",
        module=parent_module,
        optimizer=parent_optimizer,
        scheduler=parent_scheduler,
        config=parent_config,
    )

    def reg_loss(parameters, reference_parameters, reg_lambda=0.25):
        loss = 0
        for p1, p2 in zip(parameters, reference_parameters):
            loss += torch.sum(torch.pow((p1 - p2), 2))

        return reg_lambda * loss

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            out = self.module(inputs)
            loss = F.cross_entropy(out, labels)
            reg = reg_loss(self.parameters(), self.upper.parameters(), args.reg)

            return loss + reg

        def get_batch(self):
            inputs, labels = self.env.batch["train"]

            return inputs, labels

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.upper.module.state_dict())

    child_module = model_cls(args.ways, args.hidden_size)
    child_optimizer = optim.SGD(child_module.parameters(), lr=args.base_lr)
    child_config = Config(type="darts", unroll_steps=args.inner_steps)
    lower = Lower(name="lower", module=child_module, optimizer=child_optimizer, config=child_config)

    class MAMLEngine(Engine):
        def train_step(self):
            if self.global_step % args.inner_steps == 1 or args.inner_steps == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

        def validation(self):
            self.upper.module.train()
            if not hasattr(self, "best_acc"):
                self.best_acc = -1
            test_net = ConvNet(args.ways, args.hidden_size).to(self.device)
            test_optim = optim.SGD(test_net.parameters(), lr=args.base_lr)
            accs = []
            for i in range(args.valid_tasks):
                inputs, labels = tasksets.test.sample()
                inputs, labels = inputs.to(self.device), labels.to(self.device)
                out = split_data(inputs, labels, args.shots, args.ways)
                train_inputs, train_labels = out["train"]
                test_inputs, test_labels = out["test"]
                test_net.load_state_dict(self.upper.module.state_dict())
                for _ in range(args.inner_steps):
                    out = test_net(train_inputs)
                    loss = F.cross_entropy(out, train_labels)
                    test_optim.zero_grad()
                    loss.backward()
                    test_optim.step()

                out = test_net(test_inputs)
                accs.append((out.argmax(dim=1) == test_labels).detach())

            acc = 100.0 * torch.cat(accs).float().mean().item()
            if acc > self.best_acc:
                self.best_acc = acc

            return {"acc": acc, "best_acc": self.best_acc}

    # ----- around the tutorial: what it leaves implicit -----
    outer, inner = parent, lower
    problems = [outer, inner]
    steps_per_meta_step = args.inner_steps * args.meta_batch_size
    engine_config = EngineConfig(
        train_iters=args.train_iters if args.train_iters is not None else 1000 * steps_per_meta_step,
        valid_step=args.valid_step if args.valid_step is not None else 100 * steps_per_meta_step,
        # Betty's EngineConfig has no device (it picks cuda when available): pass it only when asked for
        **({"device": args.device} if args.device else {}),
    )

    u2l = {outer: [inner]}
    l2u = {inner: [outer]}
    dependencies = {"u2l": u2l, "l2u": l2u}
    engine = MAMLEngine(
        config=engine_config, problems=problems, dependencies=dependencies, env=env
    )
    return engine


def main(argv=None):
    engine = build(argv)
    engine.run()
    return engine


if __name__ == "__main__":
    main()
