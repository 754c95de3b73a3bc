"""Why CG breaks down: the support loss's Hessian H at phi, per task, in float64.

CG on A = (1 + c) I + H / (lam + l) can only meet p'Ap <= 0 where A is indefinite, i.e. where
H has an eigenvalue below -(1 + c)(lam + l). This prints, per inner-loop setting, H's extreme
eigenvalues over the tasks (Lanczos with full reorthogonalisation, on H-vector products of the
same mean cross-entropy IMAML differentiates) beside the library's CG breakdown flags, all in
float64 at a random theta or at a run's checkpoint (--checkpoint RUN_FOLDER/checkpoint.pt).

    IMAML_DATA=<folder> PYTHONPATH=. python benchmarks/hessian_spectrum.py [--checkpoint FILE]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from imaml_ext import IMAML
from imaml_ext.batched.hvp import load_jvp_decompositions
from imaml_ext.data import omniglot_tasks
from imaml_ext.models import Conv4


def lanczos_extremes(hvp, dim: int, iterations: int, generator: torch.Generator):
    """(smallest, largest) Ritz values of the symmetric operator hvp after `iterations` steps."""
    q = torch.randn(dim, dtype=torch.float64, generator=generator)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for _ in range(min(iterations, dim)):
        w = hvp(basis[-1])
        alphas.append(torch.dot(w, basis[-1]))
        for v in basis:  # full reorthogonalisation: plain Lanczos loses it within a few steps
            w = w - torch.dot(w, v) * v
        beta = w.norm()
        if beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    tridiagonal = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return ritz[0].item(), ritz[-1].item()


def task_hvp(model, names, shapes, phi_flat, x, y):
    load_jvp_decompositions()  # torch.func.jvp below, without torch's own deprecation warning
    sizes = [s.numel() for s in shapes]

    def loss_at(flat):
        params = {n: p.view(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def hvp(v):
        return torch.func.jvp(torch.func.grad(loss_at), (phi_flat,), (v,))[1]

    return hvp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lanczos", type=int, default=60, help="Lanczos iterations per task")
    p.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt: theta from its model state")
    args = p.parse_args(argv)
    for name in ("tasks", "hidden", "lanczos"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer; got {getattr(args, name)}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint must be a run's checkpoint.pt file; got {args.checkpoint!r}, which is not a file")
    torch.manual_seed(args.seed)
    model = Conv4(5, args.hidden).double()
    where = "a random theta"
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        model.double()
        where = f"theta of {args.checkpoint} (meta-step {state.get('step', '?')})"
    sx, sy, qx, qy = omniglot_tasks(5, 1, 5, protocol="finn", seed=args.seed).train.sample(args.tasks)
    sx, qx = sx.double(), qx.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    dim = sum(s.numel() for s in shapes)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"Conv4-{args.hidden} at {where}, seed {args.seed}, 5-way 1-shot, {args.tasks} tasks, lam 2, "
          f"inner lr 0.1, 5 CG iterations, float64; H: {args.lanczos} Lanczos iterations per task")
    print("| inner steps | cg_damping, lam_damping | CG breakdowns | tasks with min eig(H) < bound (bound) "
          "| min eig(H): median, lowest | max eig(H): median |")
    print("|---|---|---|---|---|---|")
    for steps, c, l in ((5, 0, 0), (5, 1, 10), (16, 0, 0), (16, 1, 10)):
        imaml = IMAML(model, steps, 0.1, 2.0, 5, check_labels=False, cg_damping=c, lam_damping=l,
                      hvp="reverse", forward="loop")
        model.zero_grad()
        broke = imaml.meta_step(sx, sy, qx, qy).cg.breakdown
        phi, _ = imaml.adapt(sx, sy)
        bound = -(1 + c) * (2.0 + l)
        lows, highs = [], []
        for t in range(args.tasks):
            flat = torch.cat([p[t].detach().reshape(-1) for p in phi])
            low, high = lanczos_extremes(task_hvp(model, names, shapes, flat, sx[t], sy[t]), dim, args.lanczos, gen)
            lows.append(low)
            highs.append(high)
        lows_t, highs_t = torch.tensor(lows), torch.tensor(highs)
        below = lows_t < bound
        both = int((below & broke).sum())
        print(f"| {steps} | {c}, {l} | {int(broke.sum())}/{args.tasks} | {int(below.sum())}/{args.tasks} ({bound:g}); "
              f"{both} of them broke down | {lows_t.median():.3g}, {lows_t.min():.3g} | {highs_t.median():.3g} |")


if __name__ == "__main__":
    main()
