"""How far a meta-step is from the machine's floor.

Counts the floating-point operations of one iMAML meta-step, stage by stage
(torch.utils.flop_counter: convolutions and matrix products, forward, backward
and double backward), measures the machine's rate on those same operations run
as large as they come (one big matrix product; one Conv4 forward and backward
over the whole meta-batch's images through shared weights), and times each
stage. floor = FLOPs / rate: what the stage would cost at the rate the machine
reaches on large dense work. The per-task loop of the plain baseline runs the
same FLOPs, so its floor is the same.

    PYTHONPATH=. python benchmarks/bench_floor.py --device cpu --tasks 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Variant, compare, run_metadata, write_results  # noqa: E402

from imaml_ext import IMAML  # noqa: E402
from imaml_ext.data import omniglot_tasks  # noqa: E402
from imaml_ext.models import Conv4  # noqa: E402


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stages(imaml: IMAML, batch):
    """The meta-step's stages as separate callables (the same calls meta_step makes)."""
    sx, sy, qx, qy = batch
    module = imaml.batched(sx.shape[0])
    state = {}

    def inner():
        state["phi"] = imaml._inner_loop(module, sx, sy, imaml.inner_steps, check=False)

    def query():
        phi = [p.detach().requires_grad_(True) for p in state["phi"]]
        with torch.enable_grad():
            state["v"] = torch.autograd.grad(imaml.task_losses(module(phi, qx), qy).sum(), phi)

    def support_graph():
        phi = [p.detach().requires_grad_(True) for p in state["phi"]]
        with torch.enable_grad():
            grads = torch.autograd.grad(imaml.task_losses(module(phi, sx), sy).sum(), phi, create_graph=True)
        state["graph"] = (phi, grads)

    def hvps():
        phi, grads = state["graph"]
        for _ in range(imaml.cg_iterations):
            torch.autograd.grad(grads, phi, grad_outputs=state["v"], retain_graph=True)

    def whole():
        imaml.model.zero_grad(set_to_none=True)
        imaml.meta_step(sx, sy, qx, qy)

    inner()
    query()
    support_graph()
    return {"inner loop": inner, "query gradient": query, "support-gradient graph": support_graph,
            f"{imaml.cg_iterations} HVPs": hvps, "whole meta-step": whole}


def count_flops(model, args, batch) -> dict:
    """FLOPs of each stage, counted on the per-task dense path (forward="loop"): the same maths
    as the grouped convolutions of forward="vmap", whose weight gradients torch's flop counter
    overcounts by the number of groups (T)."""
    dense = IMAML(model, args.inner_steps, 0.1, 2.0, args.cg_iters, check_labels=False,
                  cg_damping=1.0, lam_damping=10.0, forward="loop")
    counted = {name: flops(fn) for name, fn in stages(dense, batch).items()}
    model.zero_grad(set_to_none=True)
    return counted


def machine_rates(device, images: int, hidden: int, repeats: int):
    """GFLOP/s of one large float32 matrix product, and of a Conv4 forward + backward over
    ``images`` images through one set of weights (the best case of the meta-step's own ops)."""
    n = 8192 if device.type == "cuda" else 2048  # large enough to reach the machine's rate
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    mm = compare({"mm": Variant(lambda: a @ b)}, device, repeats)["mm"].median_ms
    model = Conv4(5, hidden).to(device)
    x = torch.randn(images, 1, 28, 28, device=device)

    def conv_step():
        model(x).sum().backward()

    conv_flops = flops(conv_step)
    conv = compare({"conv": Variant(conv_step)}, device, repeats)["conv"].median_ms
    rates = {"matmul_n": n, "matmul_gflops": 2 * n**3 / mm / 1e6, "conv4_dense_gflops": conv_flops / conv / 1e6,
             "conv4_dense_images": images}
    if device.type == "cuda":
        # cuDNN runs float32 convolutions in TF32 by default (the meta-step's too), matrix products not:
        # the TF32 product rate is the floor that matches the convolutions' arithmetic.
        rates["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        rates["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = compare({"mm": Variant(lambda: a @ b)}, device, repeats)["mm"].median_ms
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        rates["matmul_tf32_gflops"] = 2 * n**3 / tf32 / 1e6
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--cg-iters", type=int, default=5)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--recount", type=Path, default=None,
                   help="recount the FLOPs of an earlier run's JSON here and rewrite it (its times and rates kept)")
    args = p.parse_args(argv)
    if args.recount is not None:
        return recount(args.recount)
    device = torch.device(args.device)

    torch.manual_seed(0)
    tasks = omniglot_tasks(5, 1, args.query, device=device, seed=0)
    batch = tasks.train.sample(args.tasks)
    model = Conv4(5, args.hidden).to(device)
    imaml = IMAML(model, args.inner_steps, 0.1, 2.0, args.cg_iters, check_labels=False,
                  cg_damping=1.0, lam_damping=10.0)
    parts = stages(imaml, batch)
    counted = count_flops(model, args, batch)
    timed = compare({name: Variant(fn) for name, fn in parts.items()}, device, args.repeats, warmup=1)
    rates = machine_rates(device, args.tasks * 5 * (1 + args.query), args.hidden, args.repeats)

    rows = stage_rows(counted, {name: timed[name].median_ms for name in parts}, rates)
    result = {"meta": run_metadata(device), "config": vars(args), "rates": rates, "stages": rows}
    write_results(result, args.out, Path(__file__).parent / "results" /
                  f"floor-{result['meta']['machine']}-{result['meta']['date']}.json", render)


def stage_rows(counted: dict, ms_by_stage: dict, rates: dict) -> list:
    rows = []
    for name, ms in ms_by_stage.items():
        gflop = counted[name] / 1e9
        row = {"stage": name, "gflop": gflop, "ms": ms, "achieved_gflops": gflop / ms * 1e3,
               "floor_ms_at_conv_rate": gflop / rates["conv4_dense_gflops"] * 1e3,
               "floor_ms_at_matmul_rate": gflop / rates["matmul_gflops"] * 1e3}
        if "matmul_tf32_gflops" in rates:
            row["floor_ms_at_tf32_matmul_rate"] = gflop / rates["matmul_tf32_gflops"] * 1e3
        rows.append(row)
    return rows


def recount(path: Path) -> None:
    """Recount an earlier run's FLOPs here (they depend on the shapes alone) and rewrite it,
    keeping its times and rates: for runs whose count went wrong on a machine lent briefly."""
    import json

    if not path.is_file():
        raise SystemExit(f"--recount: {path} is not a file; expected a floor-<machine>-<date>.json from bench_floor.py")
    result = json.loads(path.read_text())
    if "stages" not in result or "rates" not in result:
        raise SystemExit(f"--recount: {path} is not a bench_floor.py result (no 'stages' and 'rates')")
    c = result["config"]
    args = argparse.Namespace(**c)
    torch.manual_seed(0)
    batch = omniglot_tasks(5, 1, c["query"], device="cpu", seed=0).train.sample(c["tasks"])
    counted = count_flops(Conv4(5, c["hidden"]), args, batch)
    result["stages"] = stage_rows(counted, {r["stage"]: r["ms"] for r in result["stages"]}, result["rates"])
    here = run_metadata(torch.device("cpu"))
    result["meta"]["flops_recounted"] = (
        f"FLOPs recounted on {here['machine']} on {here['date']} (forward=\"loop\", same shapes): the run's own "
        "count took the grouped convolutions' weight gradients at T times their cost (torch's flop counter). "
        "Times and rates are the run's.")
    write_results(result, path, path, render)


def render(result) -> str:
    m, c, r = result["meta"], result["config"], result["rates"]
    lines = [
        f"# Meta-step against the machine's floor: {m['machine']}, {m['date']}",
        "",
        f"{m['device_name']}, torch {m['torch']}, {m['torch_threads']} threads, float32. iMAML meta-step on "
        f"Omniglot 5-way 1-shot, {c['query']} query images per class, Conv4-{c['hidden']}, T = {c['tasks']}, "
        f"{c['inner_steps']} inner steps, {c['cg_iters']} CG iterations (forward=\"auto\").",
        "",
        f"Machine rates measured in the same run: one {r.get('matmul_n', 2048)}x{r.get('matmul_n', 2048)} float32 matrix product "
        f"{r['matmul_gflops']:.0f} GFLOP/s; a Conv4-{c['hidden']} forward + backward over all "
        f"{r['conv4_dense_images']} images through one set of weights {r['conv4_dense_gflops']:.0f} GFLOP/s."
        + (f" TF32 matrix product {r['matmul_tf32_gflops']:.0f} GFLOP/s (cuDNN TF32 convolutions: "
           f"{r['cudnn_allow_tf32']}, TF32 matrix products: {r['matmul_allow_tf32']})." if "matmul_tf32_gflops" in r else ""),
        "",
    ]
    if m.get("flops_recounted"):
        lines += [m["flops_recounted"], ""]
    tf32 = "matmul_tf32_gflops" in r
    lines += [
        "| stage | GFLOP | ms (median) | achieved GFLOP/s | floor at the dense Conv4 rate | floor at the matmul rate |"
        + (" floor at the TF32 matmul rate |" if tf32 else ""),
        "|---|---|---|---|---|---|" + ("---|" if tf32 else ""),
    ]
    for row in result["stages"]:
        lines.append(
            f"| {row['stage']} | {row['gflop']:.1f} | {row['ms']:.1f} | {row['achieved_gflops']:.0f} | "
            f"{row['floor_ms_at_conv_rate']:.1f} ms | {row['floor_ms_at_matmul_rate']:.1f} ms |"
            + (f" {row['floor_ms_at_tf32_matmul_rate']:.1f} ms |" if tf32 else "")
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
