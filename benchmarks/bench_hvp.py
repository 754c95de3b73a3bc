"""Hessian-vector products of the support loss for all tasks of a meta-batch: the HVP work of
one CG solve (its set-up and ``--products`` products), four ways.

- batched_double_backward (what IMAML.meta_step does): one support-gradient graph for all T
  tasks, built once per solve, then one backward through it per product;
- batched_jvp_grad: torch.func, vmap over tasks of jvp(grad) (forward-over-reverse): no graph
  kept, a forward and a backward pass per product;
- per_task_double_backward and per_task_jvp_grad: the same, one task at a time.

Omniglot-shaped random inputs (5-way 1-shot), Conv4 with BatchNorm, at phi = theta (the cost
does not depend on the values). Before timing, every variant's products are compared with the
first one's in float64 on the first tasks. Writes benchmarks/results/hvp-<machine>-<date>.{json,md}.

    PYTHONPATH=. python benchmarks/bench_hvp.py --device cpu --tasks 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Variant, compare, run_metadata, sync, write_results  # noqa: E402

from imaml_ext import IMAML  # noqa: E402
from imaml_ext.models import Conv4  # noqa: E402

WAYS = 5

Solve = Callable[[List[torch.Tensor]], List[torch.Tensor]]  # tangents [T, ...] -> last product [T, ...]


def variants(model: torch.nn.Module, sx: torch.Tensor, sy: torch.Tensor, products: int,
             forward: str) -> Dict[str, Solve]:
    """Each entry runs the HVP work of one solve (set-up + `products` products of the same
    tangents, as CG's iterations would) and returns the last product."""
    num_tasks = sx.shape[0]
    imaml = IMAML(model, 0, 0.1, 1.0, products, check_labels=False, forward=forward)
    module = imaml.batched(num_tasks)
    theta = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    phi_batched = [p.unsqueeze(0).expand(num_tasks, *p.shape).clone().requires_grad_(True) for p in theta]

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)

    task_grad = grad(loss)

    def task_hvp(params, tangent, x, y):
        return jvp(lambda p: task_grad(p, x, y), (params,), (tangent,))[1]

    batched_hvp = vmap(task_hvp, randomness="different")

    def batched_double_backward(tangents):
        with torch.enable_grad():
            grads = torch.autograd.grad(imaml.task_losses(module(phi_batched, sx), sy).sum(), phi_batched,
                                        create_graph=True)
        for _ in range(products):
            out = torch.autograd.grad(grads, phi_batched, grad_outputs=tangents, retain_graph=True)
        return [o.detach() for o in out]

    def batched_jvp_grad(tangents):
        phi = [p.detach() for p in phi_batched]
        for _ in range(products):
            out = batched_hvp(phi, tangents, sx, sy)
        return list(out)

    def per_task_double_backward(tangents):
        results = []
        for t in range(num_tasks):
            phi = [p.detach().clone().requires_grad_(True) for p in theta]
            with torch.enable_grad():
                grads = torch.autograd.grad(loss(phi, sx[t], sy[t]), phi, create_graph=True)
            for _ in range(products):
                out = torch.autograd.grad(grads, phi, grad_outputs=[v[t] for v in tangents], retain_graph=True)
            results.append(out)
        return [torch.stack(parts) for parts in zip(*results)]

    def per_task_jvp_grad(tangents):
        results = []
        for t in range(num_tasks):
            for _ in range(products):
                out = task_hvp(theta, [v[t] for v in tangents], sx[t], sy[t])
            results.append(out)
        return [torch.stack(parts) for parts in zip(*results)]

    return {"batched_double_backward": batched_double_backward, "batched_jvp_grad": batched_jvp_grad,
            "per_task_double_backward": per_task_double_backward, "per_task_jvp_grad": per_task_jvp_grad}


def inputs(num_tasks: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(num_tasks, WAYS, 1, 28, 28, generator=g, dtype=dtype)
    sy = torch.arange(WAYS).repeat(num_tasks, 1)
    return sx.to(device), sy.to(device)


def tangents_like(model, num_tasks, device, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(num_tasks, *p.shape, generator=g, dtype=dtype).to(device) for p in model.parameters()]


def peak_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", type=int, default=None, help="T (default 16 on the CPU, 32 on CUDA)")
    p.add_argument("--products", type=int, default=5, help="HVPs per solve (CG iterations)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-tasks", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    num_tasks = args.tasks or (32 if device.type == "cuda" else 16)
    forward = "vmap" if device.type == "cuda" else "loop"  # IMAML's "auto"

    # Same maths: float64, first tasks, against batched_double_backward.
    torch.manual_seed(0)
    model64 = Conv4(WAYS, args.hidden).double().to(device)
    k = min(args.check_tasks, num_tasks)
    sx, sy = inputs(k, device, torch.float64, 0)
    vec = tangents_like(model64, k, device, torch.float64, 0)
    out64 = {name: fn(vec) for name, fn in variants(model64, sx, sy, 1, forward).items()}
    ref = out64["batched_double_backward"]
    scale = max(float(r.abs().max()) for r in ref)
    agreement = {name: max(float((a - r).abs().max()) for a, r in zip(out, ref)) / scale
                 for name, out in out64.items()}

    torch.manual_seed(0)
    model = Conv4(WAYS, args.hidden).to(device)
    sx, sy = inputs(num_tasks, device, torch.float32, 0)
    vec = tangents_like(model, num_tasks, device, torch.float32, 0)
    fns = variants(model, sx, sy, args.products, forward)
    memory = {name: peak_mib(lambda fn=fn: fn(vec), device) for name, fn in fns.items()}
    stats = compare({name: Variant(lambda fn=fn: fn(vec)) for name, fn in fns.items()}, device, args.repeats,
                    warmup=1)
    rows = []
    for name in fns:
        ms = stats[name].median_ms
        rows.append({"variant": name, "ms_per_solve": ms, "ms_per_product_incl_setup": ms / args.products,
                     "speedup_vs_per_task_double_backward": stats["per_task_double_backward"].median_ms / ms,
                     "peak_mib": memory[name], "max_rel_diff_float64": agreement[name]})
    result = {"meta": run_metadata(device),
              "config": {**vars(args), "tasks": num_tasks, "forward": forward}, "rows": rows}
    write_results(result, args.out, Path(__file__).parent / "results" /
                  f"hvp-{result['meta']['machine']}-{result['meta']['date']}.json", render)


def render(result) -> str:
    m, c = result["meta"], result["config"]
    lines = [
        f"# HVPs of one CG solve for all tasks: {m['machine']}, {m['date']}",
        "",
        f"{m['device_name']}, torch {m['torch']}, {m['torch_threads']} threads, float32. Conv4-{c['hidden']} with "
        f"BatchNorm, {WAYS}-way 1-shot support batches, T = {c['tasks']}; one solve = its set-up and "
        f"{c['products']} products. Batched variants use IMAML's forward=\"{c['forward']}\" module (double "
        "backward) or torch.func vmap (jvp of grad). Medians of "
        f"{c['repeats']} after a warm-up. Agreement: max relative difference from batched_double_backward in "
        f"float64 on {c['check_tasks']} tasks.",
        "",
        "| variant | ms per solve | ms per product (set-up included) | vs per-task double backward | peak MiB | "
        "float64 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['variant']} | {r['ms_per_solve']:.1f} | {r['ms_per_product_incl_setup']:.1f} | "
                     f"{r['speedup_vs_per_task_double_backward']:.2f}x | {peak} | {r['max_rel_diff_float64']:.0e} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
