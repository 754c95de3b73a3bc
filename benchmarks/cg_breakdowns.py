"""How often CG breaks down (p'Ap <= 0: I + H/lam indefinite) at a random theta, with and
without the iMAML authors' damping ((1 + c) I + H / (lam + l), c = 1, l = 10).

    PYTHONPATH=. python benchmarks/cg_breakdowns.py
"""

import argparse

import torch

from imaml_ext import IMAML
from imaml_ext.data import omniglot_tasks
from imaml_ext.models import Conv4


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    batch = omniglot_tasks(5, 1, args.query, protocol="finn", seed=args.seed).train.sample(args.tasks)
    print(f"Conv4-{args.hidden} at a random theta (seed {args.seed}), T = {args.tasks}, lam = 2, inner lr 0.1, 5 CG iterations")
    print("| inner steps | cg_damping | lam_damping | CG breakdowns | median final residual |")
    print("|---|---|---|---|---|")
    for steps, c, l in ((5, 0, 0), (5, 1, 10), (16, 0, 0), (16, 1, 10)):
        torch.manual_seed(args.seed)
        imaml = IMAML(Conv4(5, args.hidden), steps, 0.1, 2.0, 5, check_labels=False, cg_damping=c, lam_damping=l)
        info = imaml.meta_step(*batch).cg
        print(f"| {steps} | {c} | {l} | {int(info.breakdown.sum())}/{args.tasks} | {info.residual_norm.median().item():.3g} |")


if __name__ == "__main__":
    main()
