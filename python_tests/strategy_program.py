"""A two-level least-squares program for the data-parallel strategies' tests, run by
test_strategies.py in one process and as ``torchrun --nproc_per_node 2 strategy_program.py``.

The lower problem's loss, mean_i 0.5 ||w - theta - x_i||^2, has the same curvature on every
shard (H = I, d2L/dtheta dw = -I), so the mean of the ranks' hypergradients is the
single-process one on the global batch, exactly: the test can ask for float64 equality.

    python strategy_program.py STRATEGY HYPERGRADIENT PER_RANK_BATCH OUT.pt [roll_back]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imaml_ext import Config, Engine, EngineConfig, ImplicitProblem

D, ROWS, STEPS = 3, 24, 6
CLAMP = -0.3


class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, dtype=torch.float64))

    def forward(self):
        return self.w


class Lower(ImplicitProblem):
    def training_step(self, batch):
        (x,) = batch
        return 0.5 * ((self.module() - self.upper.module.w - x) ** 2).sum(1).mean()

    def param_callback(self):
        for p in self.trainable_parameters():  # as Betty's test_install clamps its parameters
            p.data.clamp_(min=CLAMP)


class Upper(ImplicitProblem):
    def training_step(self, batch):
        (y,) = batch
        return 0.5 * ((self.lower.module() - y) ** 2).sum(1).mean() + 0.1 * (self.module.w ** 2).sum()


def run(strategy: str, hypergradient: str, batch: int, optimizer: str = "adam", roll_back: bool = False):
    torch.manual_seed(0)
    x, y = torch.randn(ROWS, D, dtype=torch.float64), torch.randn(ROWS, D, dtype=torch.float64) + 1
    lower_m, upper_m = Vector(), Vector()
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    # seeded loaders: accelerate's sampler keeps one generator over the epochs, so the order must not
    # hang on whoever else draws from the global RNG (one process's loader draws a seed each epoch)
    lower_loader, upper_loader = (DataLoader(TensorDataset(t), batch_size=batch, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
                                  for t, seed in ((x, 1), (y, 2)))
    lower = Lower("lower", Config(type=hypergradient, unroll_steps=2, cg_iterations=3), lower_m,
                  torch.optim.SGD(lower_m.parameters(), lr=0.3), None, lower_loader)
    upper_opt = make(upper_m.parameters(), lr=0.05)
    upper = Upper("upper", Config(), upper_m, upper_opt, torch.optim.lr_scheduler.StepLR(upper_opt, 2, 0.5),
                  upper_loader)
    config = EngineConfig(train_iters=STEPS, strategy=strategy, backend="gloo", device="cpu", roll_back=roll_back)
    Engine([upper, lower], config, dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}}).run()
    # what this rank's optimizer steps: the upper's parameter and its first moment (a shard under fsdp)
    (stepped,) = upper_opt.param_groups[0]["params"]
    moment = upper_opt.state.get(stepped, {}).get("exp_avg", stepped)  # zero's optimizer is a new one
    local = [getattr(t, "to_local", lambda: t)().numel() for t in (stepped, moment)]
    return {"lower": lower_m.w.detach().clone(), "upper": upper_m.w.detach().clone(), "local": local}


if __name__ == "__main__":
    strategy, hypergradient, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import os

    result = run(strategy, hypergradient, batch, roll_back="roll_back" in sys.argv[5:])
    torch.save(result, f"{out}.rank{os.environ['RANK']}")
