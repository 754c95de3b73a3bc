"""Unrolled MAML (second order): imaml_ext.MAML (every task at once) against learn2learn's
l2l.algorithms.MAML (one task at a time, clone/adapt), with the same theta, tasks, inner
steps and inner lr; and our iMAML meta-step beside them. Omniglot 5-way 1-shot and 20-way
5-shot (15 query images per class), Conv4.

The meta-gradients of the two MAMLs are checked equal (float64, a few tasks) before timing.

    PYTHONPATH=. python benchmarks/bench_maml.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Variant, compare, run_metadata, write_results  # noqa: E402

from imaml_ext import IMAML, MAML  # noqa: E402
from imaml_ext.data import omniglot_tasks  # noqa: E402
from imaml_ext.models import Conv4  # noqa: E402


def l2l_meta_step(maml, batch, steps):
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    for t in range(T):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        (F.cross_entropy(learner(qx[t]), qy[t]) / T).backward()


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import learn2learn as l2l

    device = torch.device(args.device)
    configs = []
    for ways, shots in ((5, 1), (20, 5)):
        batch = tuple(omniglot_tasks(ways, shots, 15, device=device, seed=0).train.sample(args.tasks))
        torch.manual_seed(0)
        model = Conv4(ways, args.hidden).to(device)

        # float64 agreement on 2 tasks
        m64_ours, m64_l2l = copy.deepcopy(model).double(), copy.deepcopy(model).double()
        b64 = [t[:2].double() if t.is_floating_point() else t[:2] for t in batch]
        MAML(m64_ours, args.inner_steps, 0.1, check_labels=False).meta_step(*b64)
        l2l_meta_step(l2l.algorithms.MAML(m64_l2l, lr=0.1, first_order=False), b64, args.inner_steps)
        agree = ((grads(m64_ours) - grads(m64_l2l)).abs().max() / grads(m64_l2l).abs().max()).item()

        ours_model, l2l_model, imaml_model = (copy.deepcopy(model) for _ in range(3))
        ours = MAML(ours_model, args.inner_steps, 0.1, check_labels=False)
        l2l_maml = l2l.algorithms.MAML(l2l_model, lr=0.1, first_order=False)
        imaml = IMAML(imaml_model, args.inner_steps, 0.1, 2.0, 5, check_labels=False, cg_damping=1.0, lam_damping=10.0)
        variants = {
            "ours_maml": Variant(lambda: ours.meta_step(*batch), lambda: ours_model.zero_grad(set_to_none=True)),
            "l2l_maml": Variant(lambda: l2l_meta_step(l2l_maml, batch, args.inner_steps),
                                lambda: l2l_model.zero_grad(set_to_none=True)),
            "ours_imaml": Variant(lambda: imaml.meta_step(*batch), lambda: imaml_model.zero_grad(set_to_none=True)),
        }
        stats = compare(variants, device, args.repeats, warmup=1)
        configs.append({"ways": ways, "shots": shots, "float64_max_rel_diff_ours_vs_l2l": agree,
                        "seconds": {k: v.median_ms / 1e3 for k, v in stats.items()}})
        print(configs[-1], file=sys.stderr)
    meta = run_metadata(device)
    result = {"meta": meta, "config": vars(args), "configs": configs}
    default = Path(__file__).parent / "results" / f"maml-{meta['machine']}-{meta['date']}.json"
    write_results(result, args.out, default, render)


def render(result) -> str:
    m, c = result["meta"], result["config"]
    lines = [
        f"# Unrolled MAML: ours (batched) against learn2learn: {m['machine']}, {m['date']}",
        "",
        f"{m['device_name']}, torch {m['torch']}, {m['torch_threads']} threads, float32. Omniglot, 15 query images "
        f"per class, Conv4-{c['hidden']}, T = {c['tasks']}, {c['inner_steps']} inner steps at lr 0.1; MAML second "
        f"order; iMAML with 5 damped CG iterations. Median seconds per meta-step over {c['repeats']} calls after a "
        f"warm-up; in brackets, tasks/s.",
        "",
        "| task | ours MAML | learn2learn MAML | speed-up | ours iMAML | ours vs learn2learn meta-gradient (float64) |",
        "|---|---|---|---|---|---|",
    ]
    T = c["tasks"]
    for cfg in result["configs"]:
        s = cfg["seconds"]
        lines.append(
            f"| {cfg['ways']}-way {cfg['shots']}-shot | {s['ours_maml']:.2f} ({T / s['ours_maml']:.1f}) | "
            f"{s['l2l_maml']:.2f} ({T / s['l2l_maml']:.1f}) | {s['l2l_maml'] / s['ours_maml']:.2f}x | "
            f"{s['ours_imaml']:.2f} ({T / s['ours_imaml']:.1f}) | {cfg['float64_max_rel_diff_ours_vs_l2l']:.0e} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
