"""Can torch.compile speed up the CG solve's Hessian-vector products? (issue 17)

The HVPs are the meta-step's largest part (103.5 of 164.5 ms at T = 32, 5 inner steps, 5 CG on
an H200, 2026-11-28). torch.compile could fuse them, if it can compile what they are:

- "reverse": double backward through a support-gradient graph built with ``create_graph``
  (the eager default of ``IMAML(hvp="reverse")``), the forward compiled;
- "forward": ``torch.func.jvp`` of ``torch.func.grad`` of the task-vmapped support loss
  (``IMAML(hvp="forward")``), the whole product compiled with ``fullgraph=True`` (a graph
  break would silently run eager);
- "forward, BatchNorm decomposed": the same with each BatchNorm written as its elementwise
  ops (batch mean and biased variance, the same values as ``F.batch_norm`` in training), to
  see whether BatchNorm is what stops "forward".

Workload: the tutorial's Conv4 (64 channels, BatchNorm on batch statistics) on Omniglot-shaped
5-way 1-shot support sets, T tasks, float32, vmapped over tasks. For each mode: whether it
compiles and runs, its compile time, its product's largest relative difference from the eager
product in float32 (relative to the product's largest entry), and the milliseconds of both, timed
round-robin. A mode that cannot compile is reported with the first line of its error.

    python benchmarks/probe_compile.py [--device cuda] [--tasks 32]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imaml_ext.models import Conv4  # noqa: E402
from _timing import Variant, compare, run_metadata, write_results  # noqa: E402

WAYS, SHOTS = 5, 1


class DecomposedBatchNorm2d(nn.Module):
    """BatchNorm2d on batch statistics (no running ones) as elementwise ops; same parameter names."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def decomposed(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.BatchNorm2d):
            model.features[i] = DecomposedBatchNorm2d(layer)
    return model


def workload(device: torch.device, tasks: int, seed: int):
    """(model, names, phi [T, *shape], support x, support y, tangent vectors)."""
    torch.manual_seed(seed)
    model = Conv4(WAYS).to(device)
    names = [n for n, _ in model.named_parameters()]
    phi = tuple(p.detach().unsqueeze(0).repeat(tasks, *[1] * p.dim()) + 0.01 * torch.randn(tasks, *p.shape, device=device)
                for p in model.parameters())
    x = torch.randn(tasks, WAYS * SHOTS, 1, 28, 28, device=device)
    y = torch.arange(WAYS, device=device).repeat(tasks, SHOTS)
    vectors = tuple(torch.randn_like(p) for p in phi)
    return model, names, phi, x, y, vectors


def products(model, names, x, y) -> Dict[str, Callable]:
    """mode -> (compile(fn) -> the product function of (phi, vectors))."""

    def task_loss(params, xt, yt):
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (xt,)), yt)

    def total(params):
        return vmap(task_loss, randomness="different")(list(params), x, y).sum()

    def reverse(wrap):
        loss = wrap(total)

        def hvp(phi, vectors):
            leaves = [p.detach().requires_grad_(True) for p in phi]
            grads = torch.autograd.grad(loss(leaves), leaves, create_graph=True)
            return torch.autograd.grad(grads, leaves, vectors)

        return hvp

    def forward(wrap):
        return wrap(lambda phi, vectors: jvp(grad(total), (phi,), (vectors,))[1])

    return {"reverse": reverse, "forward": forward}


def all_products(model, names, x, y) -> Dict[str, Callable]:
    modes = products(model, names, x, y)
    modes["forward, BatchNorm decomposed"] = products(decomposed(model), names, x, y)["forward"]
    return modes


def cause(error: Exception) -> str:
    """The error's first line and, for dynamo's "Observed exception", the op it failed on and why."""
    text = str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    said = f"{type(error).__name__}: {lines[0] if lines else ''}"
    op = re.search(r"call_function <function (\w+)", text)
    inner = re.search(r"got (\w+)\(\\?'([^'\\]{0,200})", text)
    if op:
        said += f"; dynamo failed on {op.group(1)}"
    if inner:
        said += f": {inner.group(1)}: {inner.group(2)}"
    return said[:400]


def max_rel_diff(got, expected) -> float:
    scale = max(float(e.abs().max()) for e in expected)
    return max(float((g - e).abs().max()) for g, e in zip(got, expected)) / scale


def probe(args, save: Callable[[dict], None]) -> dict:
    """Every mode in turn; ``save`` gets the result so far after each (a killed run keeps its rows)."""
    device = torch.device(args.device)
    model, names, phi, x, y, vectors = workload(device, args.tasks, args.seed)
    rows: List[dict] = []
    result = {"meta": {**run_metadata(device), "tasks": args.tasks, "seed": args.seed}, "rows": rows}
    for mode, build in all_products(model, names, x, y).items():
        eager = build(lambda fn: fn)
        row = {"mode": mode}
        try:
            torch._dynamo.reset()
            compiled = build(lambda fn: torch.compile(fn, fullgraph=True, dynamic=False))
            start = time.perf_counter()
            got = compiled(phi, vectors)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["compile_s"] = round(time.perf_counter() - start, 1)
        except Exception as error:  # what torch.compile raises varies (Unsupported, RuntimeError, ...)
            row["refused"] = cause(error)
            row["where"] = traceback.extract_tb(error.__traceback__)[-1].name
            rows.append(row)
            save(result)
            continue
        row["max_rel_diff"] = max_rel_diff(got, eager(phi, vectors))
        stats = compare({"eager": Variant(lambda: eager(phi, vectors)), "compiled": Variant(lambda: compiled(phi, vectors))},
                        device, repeats=args.repeats, warmup=2)
        row["eager_ms"] = round(stats["eager"].median_ms, 2)
        row["compiled_ms"] = round(stats["compiled"].median_ms, 2)
        rows.append(row)
        save(result)
    return result


def render(result: dict) -> str:
    meta = result["meta"]
    lines = ["# torch.compile of the CG solve's Hessian-vector products",
             "",
             f"{meta['device_name']}, torch {meta['torch']}, {meta['torch_threads']} threads, {meta['date']}; "
             f"Conv4-64, 5-way 1-shot support sets, T = {meta['tasks']} tasks, float32, vmapped over tasks "
             "(benchmarks/probe_compile.py).",
             "",
             "| HVP | compiles | compile s | eager ms | compiled ms | max rel. diff (float32) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "refused" in row:
            lines.append(f"| {row['mode']} | no: {row['refused']} (in {row['where']}) | - | - | - | - |")
        else:
            lines.append(f"| {row['mode']} | yes | {row['compile_s']} | {row['eager_ms']} | {row['compiled_ms']} | "
                         f"{row['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tasks", type=int, default=16, help="meta-batch size T (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/"
                        "compile_probe-<machine>-<date>.json; a .md beside it)")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks must be >= 1; got {args.tasks}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    def save(result: dict) -> None:
        meta = result["meta"]
        default = ROOT / "benchmarks" / "results" / f"compile_probe-{meta['machine']}-{meta['date']}.json"
        write_results(result, args.out, default, render)

    probe(args, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
