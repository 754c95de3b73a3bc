"""The fused BatchNorm -> ReLU -> 2x2 max-pool op (imaml_ext.ops.batch_norm_relu_max_pool2d) against
ATen's three layers (F.batch_norm with batch statistics, F.relu, F.max_pool2d), on Conv4's blocks.

Three passes, each as a meta-step uses them:
- forward: the forward alone (no_grad: evaluation);
- first order: forward and backward (an inner step);
- second order: forward, a create_graph backward of a loss of the output, and the backward of that
  (one reverse HVP's graph build and product).

Shapes: the first block's [N, C, H, W] for one task (5 images, 64 channels, 28x28), T tasks stacked
([5, 64 T, 28, 28], as forward="stacked" runs it) and the query images stacked ([75, 64 T, 28, 28]).
Variants alternate within each round, medians over rounds. Before timing, both variants' output and
gradients are compared in float64. Writes benchmarks/results/batch_norm_pool-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imaml_ext.ops import batch_norm_relu_max_pool2d, has_compiled_kernels  # noqa: E402
from _timing import run_metadata, sync, write_results  # noqa: E402

EPS = 1e-5
PASSES = ("forward", "first order", "second order")


def aten_layers(x, weight, bias):
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.1, EPS)), 2)


def fused(x, weight, bias):
    return batch_norm_relu_max_pool2d(x, weight, bias, EPS)


VARIANTS = {"fused": fused, "aten": aten_layers}


def inputs(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).to(device).requires_grad_(True)
    bias = (0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).to(device).requires_grad_(True)
    return x, weight, bias


def run_pass(name: str, f: Callable, args) -> List[torch.Tensor]:
    if name == "forward":
        with torch.no_grad():
            return [f(*args)]
    out = f(*args)
    if name == "first order":
        return list(torch.autograd.grad(out, args, torch.ones_like(out)))
    grads = torch.autograd.grad(out.square().sum(), args, create_graph=True)
    return list(torch.autograd.grad(grads, args, [torch.ones_like(g) for g in grads]))


def agreement(shape, device) -> Dict[str, float]:
    """Max relative difference of the fused op from ATen's layers in float64, per pass."""
    args = inputs(shape, device, torch.float64)
    diffs = {}
    for name in PASSES:
        a, b = run_pass(name, fused, args), run_pass(name, aten_layers, args)
        diffs[name] = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))
    return diffs


def time_shape(shape, device, rounds: int) -> Dict[str, Dict[str, float]]:
    args = inputs(shape, device)
    samples: Dict[str, Dict[str, List[float]]] = {p: {v: [] for v in VARIANTS} for p in PASSES}
    for _ in range(rounds + 1):  # the first round warms up
        for name in PASSES:
            for variant, f in VARIANTS.items():
                sync(device)
                start = time.perf_counter()
                run_pass(name, f, args)
                sync(device)
                samples[name][variant].append(time.perf_counter() - start)
    return {p: {v: 1e3 * sorted(s[1:])[len(s[1:]) // 2] for v, s in per.items()} for p, per in samples.items()}


def render(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Fused BatchNorm -> ReLU -> max-pool against ATen's layers: {meta['machine']}, {meta['date']}", "",
             f"{meta['description']}; {meta['threads']} threads, float32, median ms of {meta['rounds']} rounds "
             "(variants alternating). Agreement: max relative difference from ATen's layers in float64.", "",
             "| shape [N, C, H, W] | pass | fused ms | ATen ms | ATen / fused | float64 agreement |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for name in PASSES:
            t = row["ms"][name]
            lines.append(f"| {row['label']} {row['shape']} | {name} | {t['fused']:.2f} | {t['aten']:.2f} | "
                         f"{t['aten'] / t['fused']:.2f}x | {row['agreement'][name]:.0e} |")
    lines += ["", "Passes: forward (no_grad); first order (forward and backward, an inner step); second order "
              "(forward, create_graph backward of a loss of the output, and its backward: a reverse HVP). The "
              "fused op's second order runs its compiled double backward; ATen's, its BatchNorm, ReLU and "
              "max-pool double backward."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default="16,32", help="comma-separated T for the stacked shapes")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds: a smoke test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not has_compiled_kernels(device.type):
        raise SystemExit(f"bench_batch_norm_pool: imaml_ext has no compiled kernels for {device.type}; build them first")
    if args.quick:
        shapes, rounds = [("one task", (2, 4, 8, 8))], 2
    else:
        shapes = [("one task", (5, 64, 28, 28))]
        for t in (int(v) for v in args.tasks.split(",")):
            shapes += [(f"T={t} support", (5, 64 * t, 28, 28)), (f"T={t} query", (75, 64 * t, 28, 28))]
        rounds = args.rounds
    rows = []
    for label, shape in shapes:
        rows.append({"label": label, "shape": list(shape), "agreement": agreement(shape, device),
                     "ms": time_shape(shape, device, rounds)})
        print(label, shape, {p: {v: round(ms, 2) for v, ms in t.items()} for p, t in rows[-1]["ms"].items()},
              flush=True)
    meta = run_metadata(device)
    meta.update(rounds=rounds, threads=torch.get_num_threads(),
                description="the first Conv4 block's BatchNorm, ReLU and 2x2 max-pool (64 channels a task)")
    result = {"meta": meta, "rows": rows}
    default = ROOT / "benchmarks" / "results" / f"batch_norm_pool-{meta['machine']}-{meta['date']}.json"
    write_results(result, args.out, default, render)


if __name__ == "__main__":
    main()
