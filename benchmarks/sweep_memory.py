"""Peak memory and time of one meta-step against the number of inner steps: iMAML (flat:
no graph is kept across inner steps) beside MAML (the unrolled graph grows with them);
with ``--sweep tasks``, against the meta-batch size T instead (tasks/s and memory per task).

Memory is taken from a point's first meta-step. On the CPU each point runs in a fresh
process, so one point's peak does not hide the next: its VmHWM after (reset through
/proc/self/clear_refs just before), less its VmRSS before. On CUDA all points share one
process: torch.cuda.max_memory_allocated (reset before) less what was allocated before.
Time is the second meta-step's (CPU) or the median of three after the first (CUDA). Omniglot-shaped random inputs (5-way 1-shot, 15 query
images per class), Conv4.

    PYTHONPATH=. python benchmarks/sweep_memory.py --device cpu
    PYTHONPATH=. python benchmarks/sweep_memory.py --device cpu --sweep tasks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import run_metadata, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

POINT = textwrap.dedent(
    """
    import gc, json, sys, time, torch
    from imaml_ext import IMAML, MAML
    from imaml_ext.models import Conv4


    def point(algo, steps, tasks, hidden, device, repeats=1):
        torch.manual_seed(0)
        model = Conv4(5, hidden).to(device)
        sx, qx = torch.randn(tasks, 5, 1, 28, 28, device=device), torch.randn(tasks, 75, 1, 28, 28, device=device)
        sy = torch.arange(5, device=device).repeat(tasks, 1)
        qy = torch.arange(5, device=device).repeat_interleave(15).repeat(tasks, 1)
        if algo == "imaml":
            learner = IMAML(model, steps, 0.1, 2.0, 5, check_labels=False, cg_damping=1.0, lam_damping=10.0)
        else:
            learner = MAML(model, steps, 0.1, check_labels=False, memory_fraction=1.0)
        cuda = device.startswith("cuda")

        def status(key):
            with open("/proc/self/status") as f:
                return int(next(l for l in f if l.startswith(key)).split()[1]) * 1024

        def run():
            model.zero_grad(set_to_none=True)
            learner.meta_step(sx, sy, qx, qy)
            if cuda:
                torch.cuda.synchronize()

        # Memory from the first meta-step (nothing freed and kept by the allocator yet):
        # the resident set before it, against the process's peak after it.
        try:
            if cuda:
                gc.collect(); torch.cuda.empty_cache()
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
                before = status("VmRSS:")
                run()
                peak = status("VmHWM:") - before
            times = []
            for _ in range(repeats):  # time the calls after the first, after lazy initialisation
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}
        except (MemoryError, torch.cuda.OutOfMemoryError) as error:
            return {"refused": f"{type(error).__name__}: {error}"[:300]}
        finally:
            del model, learner
            if cuda:
                gc.collect(); torch.cuda.empty_cache()


    if __name__ == "__main__":
        print(json.dumps(point(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
    """
)


def measure(algo: str, steps: int, tasks: int, args) -> dict:
    """One point. On the CPU in a fresh process (the resident-set peak is per process); on CUDA
    in this one, since the allocator's peak can be reset, which spares a CUDA start-up per point."""
    if args.device.startswith("cuda"):
        if "point" not in _IN_PROCESS:
            exec(compile(POINT, "sweep_memory.POINT", "exec"), _IN_PROCESS)
        return _IN_PROCESS["point"](algo, steps, tasks, args.hidden, args.device, repeats=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", POINT, algo, str(steps), str(tasks), str(args.hidden), args.device],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{algo} at {steps} inner steps, T = {tasks} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_IN_PROCESS: dict = {"__name__": "sweep_memory_point"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", default="5,10,20,40,100", help="comma-separated inner-step counts (--sweep inner)")
    p.add_argument("--sweep", default="inner", choices=("inner", "tasks"))
    p.add_argument("--task-counts", default="1,4,16,64", help="comma-separated T (--sweep tasks, at 5 inner steps)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    if args.sweep == "inner":
        grid = [(int(k), args.tasks) for k in args.steps.split(",")]
    else:
        grid = [(5, int(t)) for t in args.task_counts.split(",")]
    points = []
    for algo in ("imaml", "maml"):
        for k, tasks in grid:
            point = {"algo": algo, "inner_steps": k, "tasks": tasks, **measure(algo, k, tasks, args)}
            print(point, file=sys.stderr)
            points.append(point)
    meta = run_metadata(torch.device(args.device))
    result = {"meta": meta, "config": vars(args), "points": points}
    name = "memory-sweep" if args.sweep == "inner" else "tasks-sweep"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}-{meta['machine']}-{meta['date']}.json"
    write_results(result, out, out, render if args.sweep == "inner" else render_tasks)
    plot(result, out.with_suffix(".png"))


def how_measured(meta) -> str:
    if meta["device"] == "cpu":
        return ("Each point is a fresh process; peak = what the first meta-step adds (VmHWM after - VmRSS before); "
                "time = the second meta-step's.")
    return ("All points in one process; peak = what the first meta-step adds (torch.cuda.max_memory_allocated, "
            "reset before); time = the median of the next three.")


def render(result) -> str:
    m, c = result["meta"], result["config"]
    lines = [
        f"# Peak memory of one meta-step against inner steps: {m['machine']}, {m['date']}",
        "",
        f"{m['device_name']}, torch {m['torch']}. Conv4-{c['hidden']}, T = {c['tasks']}, 5-way 1-shot with 15 "
        f"query images per class; iMAML with 5 CG iterations (damped), MAML second order, inner lr 0.1. "
        f"{how_measured(m)}",
        "",
        "| inner steps | iMAML peak MiB | iMAML s | MAML peak MiB | MAML s |",
        "|---|---|---|---|---|",
    ]
    by = {(p["algo"], p["inner_steps"]): p for p in result["points"]}
    for k in sorted({p["inner_steps"] for p in result["points"]}):
        cells = []
        for algo in ("imaml", "maml"):
            p = by[(algo, k)]
            cells += ["refused (MemoryError)", "-"] if "refused" in p else [f"{p['peak_mib']:.0f}", f"{p['seconds']:.2f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def render_tasks(result) -> str:
    m, c = result["meta"], result["config"]
    lines = [
        f"# One meta-step against the meta-batch size T: {m['machine']}, {m['date']}",
        "",
        f"{m['device_name']}, torch {m['torch']}. Conv4-{c['hidden']}, 5 inner steps, 5-way 1-shot with 15 query "
        f"images per class; iMAML with 5 damped CG iterations, MAML second order. "
        f"{how_measured(m)} A refused point is MAML's graph-size check (MemoryError) or CUDA out of memory.",
        "",
        "| T | iMAML tasks/s | iMAML peak MiB (per task) | MAML tasks/s | MAML peak MiB (per task) |",
        "|---|---|---|---|---|",
    ]
    by = {(p["algo"], p["tasks"]): p for p in result["points"]}
    for t in sorted({p["tasks"] for p in result["points"]}):
        cells = []
        for algo in ("imaml", "maml"):
            p = by[(algo, t)]
            if "refused" in p:
                cells += ["refused (MemoryError)", "-"]
            else:
                cells += [f"{t / p['seconds']:.1f}", f"{p['peak_mib']:.0f} ({p['peak_mib'] / t:.0f})"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x_key = "inner_steps" if result["config"]["sweep"] == "inner" else "tasks"
    for algo, label in (("imaml", "iMAML (implicit gradient)"), ("maml", "MAML (unrolled)")):
        pts = [p for p in result["points"] if p["algo"] == algo and "peak_mib" in p]
        ax.plot([p[x_key] for p in pts], [p["peak_mib"] for p in pts], "o-", label=label)
    m = result["meta"]
    ax.set_xlabel("inner steps" if x_key == "inner_steps" else "tasks per meta-batch (T)")
    if x_key == "tasks":
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_ylabel("peak memory of one meta-step (MiB)")
    ax.set_title(f"{m['machine']}, " + (f"T = {result['config']['tasks']}" if x_key == "inner_steps"
                                          else "5 inner steps") + f", {m['date']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
