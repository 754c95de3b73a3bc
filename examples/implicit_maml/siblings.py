"""iMAML in Betty 0.1.1's own example layout (``examples/implicit_maml/main.py`` of its
sdist), on imaml_ext: T lower problems of one class, all named "inner" (the Engine
numbers them inner_0 ... inner_{T-1}), under one upper. Each reads its task's slice of
one batch of T tasks (``idx = self.outer.children.index(self)``), and the upper's loss
is the mean of the T query losses.

The Engine finds this layout and runs the T inner loops as one batch
(``engine.task_batching.pattern == "siblings"``): each sibling's own ``training_step``
per task, one SGD update for all, the T hypergradients as one.

    python examples/implicit_maml/siblings.py --task_num 16 --train_iters 500

As there, the model is a 3-layer ConvNet whose BatchNorm keeps running statistics
(momentum 1), darts is the hypergradient and ``reg_loss`` holds 0.5 ||phi - theta||^2;
the tasks come from imaml_ext's Omniglot sampler instead of its OmniglotNShot loader.
One meta-step is ``inner_steps`` global steps.
"""

import argparse

import torch
import torch.nn.functional as F
import torch.optim as optim
from torch import nn

from imaml_ext.configs import Config, EngineConfig
from imaml_ext.engine import Engine
from imaml_ext.envs import Env
from imaml_ext.problems import ImplicitProblem


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="iMAML in Betty's sibling-problem layout, on imaml_ext")
    parser.add_argument("--n_way", type=int, default=5)
    parser.add_argument("--k_spt", type=int, default=1, help="support images per class")
    parser.add_argument("--k_qry", type=int, default=15, help="query images per class")
    parser.add_argument("--inner_steps", type=int, default=5)
    parser.add_argument("--task_num", type=int, default=16, help="tasks per meta-step: one lower problem each")
    parser.add_argument("--train_iters", type=int, default=500, help="global steps (inner_steps per meta-step)")
    parser.add_argument("--valid_step", type=int, default=100)
    parser.add_argument("--valid_tasks", type=int, default=100)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", default=None, help="Omniglot root (default: $IMAML_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def convnet(n_way: int, channels: int = 64) -> nn.Module:
    """Three conv(3x3, no padding) + BatchNorm(momentum 1) + ReLU + max-pool blocks and a linear head."""
    layers, in_channels = [], 1
    for _ in range(3):
        layers += [nn.Conv2d(in_channels, channels, 3), nn.BatchNorm2d(channels, momentum=1, affine=True),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
        in_channels = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, n_way))


def build(argv=None):
    """The program up to ``engine.run()``; returns the engine."""
    global args
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    from imaml_ext.data import omniglot_tasks

    tasks = omniglot_tasks(args.n_way, args.k_spt, args.k_qry, root=args.data, seed=args.seed)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            correct, loss = [], 0
            for idx in range(len(self.children)):
                out = getattr(self, f"inner_{idx}")(inputs[idx])
                loss = loss + F.cross_entropy(out, labels[idx]) / len(self.children)
                correct.append((out.argmax(dim=1) == labels[idx]).detach())
            return {"loss": loss, "acc": 100.0 * torch.cat(correct).float().mean().item()}

        def get_batch(self):
            _, _, x_qry, y_qry = self.env.batch
            return x_qry, y_qry

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            inputs, labels = batch
            idx = self.outer.children.index(self)
            return F.cross_entropy(self.module(inputs[idx]), labels[idx]) + self.reg_loss()

        def reg_loss(self):
            pairs = zip(self.trainable_parameters(), self.outer.trainable_parameters())
            return 0.5 * sum((mine - theirs).pow(2).sum() for mine, theirs in pairs)

        def get_batch(self):
            x_spt, y_spt, _, _ = self.env.batch
            return x_spt, y_spt

        def on_inner_loop_start(self):
            self.module.load_state_dict(self.outer.module.state_dict())

        def configure_module(self):
            return convnet(args.n_way)

        def configure_optimizer(self):
            return optim.SGD(self.module.parameters(), lr=0.1)

    class TasksEnv(Env):
        def step(self):
            self.batch = tuple(t.to(device) for t in tasks.train.sample(args.task_num))

    class SiblingEngine(Engine):
        def train_step(self):
            if self.global_step % args.inner_steps == 1 or args.inner_steps == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

        def validation(self):
            net = convnet(args.n_way).to(device)
            sgd = optim.SGD(net.parameters(), lr=0.1)
            correct = []
            for x_spt, y_spt, x_qry, y_qry in zip(*(t.to(device) for t in tasks.test.sample(args.valid_tasks))):
                net.load_state_dict(self.outer.module.state_dict())
                for _ in range(args.inner_steps):
                    sgd.zero_grad()
                    F.cross_entropy(net(x_spt), y_spt).backward()
                    sgd.step()
                correct.append((net(x_qry).argmax(dim=1) == y_qry).detach())
            return {"acc": 100.0 * torch.cat(correct).float().mean().item()}

    outer_module = convnet(args.n_way)
    outer_optimizer = optim.Adam(outer_module.parameters(), lr=0.001)
    outer = Outer(
        name="outer",
        module=outer_module,
        optimizer=outer_optimizer,
        scheduler=optim.lr_scheduler.StepLR(outer_optimizer, step_size=100, gamma=0.9),
        config=Config(log_step=10, retain_graph=True),
        device=device,
    )
    inner_config = Config(type="darts", unroll_steps=args.inner_steps)
    inners = [Inner(name="inner", config=inner_config, device=device) for _ in range(args.task_num)]
    return SiblingEngine(
        config=EngineConfig(train_iters=args.train_iters, valid_step=args.valid_step),
        problems=inners + [outer],
        dependencies={"u2l": {outer: inners}, "l2u": {inner: [outer] for inner in inners}},
        env=TasksEnv(),
    )


def main(argv=None):
    engine = build(argv)
    engine.run()
    return engine


if __name__ == "__main__":
    main()
