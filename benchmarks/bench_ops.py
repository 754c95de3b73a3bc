"""Microbenchmarks of the fused imaml_ext ops against plain PyTorch.

Workload: the parameter list of the Omniglot Conv4 (18 tensors, ~112k
parameters), batched over T tasks ([T, *shape]), float32. Three parts:

1. proximal SGD step (with and without momentum): ours vs a per-tensor loop,
   torch._foreach_* ops and torch.compile of the reference;
2. the vector work of one CG iteration (everything but the HVP): ours
   (cg_alpha_ + cg_update_) vs the reference ops and a Betty-style CG
   (per task, torch.cat-flattened vectors, torch.dot);
3. a whole 5-iteration CG solve with a diagonal HVP: cg_solve vs Betty-style
   CG per task.

Prints a markdown table and writes it, with every figure, to
benchmarks/results/ops-<machine>-<date>.{json,md}. Needs only torch and numpy.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `import imaml_ext` of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import imaml_ext.ops  # noqa: E402
from imaml_ext.ops import reference  # noqa: E402
from _timing import (  # noqa: E402
    run_metadata,
    write_results,
    Variant,
    compare,
    copy_bandwidth_gbs,
    count_cuda_kernels,
    count_dispatched_ops,
    count_host_syncs,
    keep_freed_cpu_memory,
)

DTYPE = torch.float32
WAYS = 5
LR, LAM, MOMENTUM = 0.1, 1.0, 0.9
CG_LAM, CG_ITERS, CG_TOL = 1.0, 5, 0.0
PROX_BYTES_FORMULA = (
    "bytes = 4 * (3*T*P + P) without momentum, 4 * (5*T*P + P) with it "
    "(phi read+write, g read, momentum buffer read+write, theta read once; P = parameters per task)"
)
CG_ITERATION_BYTES_FORMULA = (
    "bytes = 4 * 11*T*P (cg_alpha_ reads r, Hr; cg_update_ reads x, r, p, s, Hr and writes x, r, p, s)"
)


# --------------------------------------------------------------------------- setup


def conv4_parameters(device: torch.device) -> List[Tensor]:
    """theta of the Omniglot Conv4: 4 x (conv3x3 64 + BatchNorm + ReLU + maxpool), linear to 5 ways."""
    layers: List[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        channels = 64
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, WAYS))
    return [p.detach().to(device=device, dtype=DTYPE) for p in model.parameters()]


def per_task_like(theta: List[Tensor], tasks: int, scale: float, around: bool = False) -> List[Tensor]:
    """[T, *shape] random tensors, optionally around theta."""
    out = []
    for t in theta:
        noise = scale * torch.randn((tasks, *t.shape), dtype=DTYPE, device=t.device)
        out.append(noise + t if around else noise)
    return out


class Snapshot:
    """Copies of tensors that a benchmarked op mutates, to put them back before a sample."""

    def __init__(self, tensors: List[Tensor]):
        self.tensors = tensors
        self.saved = [t.clone() for t in tensors]

    def restore(self) -> None:
        for t, s in zip(self.tensors, self.saved):
            t.copy_(s)


def max_abs_diff(a: List[Tensor], b: List[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def agreement(variants: Dict[str, Variant], outputs: Callable[[], List[Tensor]]) -> Dict[str, float]:
    """Max |difference| of each variant's outputs from ours after one call (setup first)."""
    results = {}
    for name, v in variants.items():
        if v.setup is not None:
            v.setup()
        v.fn()
        results[name] = [t.clone() for t in outputs()]
    return {name: max_abs_diff(out, results["ours"]) for name, out in results.items()}


@dataclass
class Context:
    device: torch.device
    theta: List[Tensor]
    repeats: int
    warmup: int
    max_seconds: float
    compile_gate: "CompileGate"

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.theta)


def measure(ctx: Context, variants: Dict[str, Variant], uncountable=("compile",)) -> Dict[str, dict]:
    """Timings of all variants side by side, plus per-call counts and ours' speed-up over each."""
    stats = compare(variants, ctx.device, ctx.repeats, ctx.warmup, ctx.max_seconds)
    records = {}
    for name, v in variants.items():
        rec = stats[name].summary()
        rec["dispatched_ops"] = None if name in uncountable else _counted(v, count_dispatched_ops)
        rec["host_syncs_measured"] = _counted(v, lambda fn: count_host_syncs(fn, ctx.device))
        rec["cuda_kernels"] = _counted(v, lambda fn: count_cuda_kernels(fn, ctx.device))
        records[name] = rec
    ours_ms = records["ours"]["median_ms"]
    for rec in records.values():
        rec["ours_speedup"] = rec["median_ms"] / ours_ms
    return records


def _counted(v: Variant, counter: Callable[[Callable], Optional[int]]) -> Optional[int]:
    if v.setup is not None:
        v.setup()
    return counter(v.fn)


# --------------------------------------------------------------------------- 1. prox step


@dataclass
class ProxCase:
    params: List[Tensor]
    grads: List[Tensor]
    anchors: List[Tensor]
    buffers: List[Tensor]  # empty without momentum
    momentum: float


def prox_ours(c: ProxCase) -> None:
    imaml_ext.ops.prox_sgd_step_(c.params, c.grads, c.anchors, LR, LAM, c.momentum, c.buffers or None)


def prox_op(c: ProxCase) -> None:
    """The compiled op without the wrapper's Python argument checks."""
    torch.ops.imaml_ext.prox_sgd_step_(c.params, c.grads, c.anchors, c.buffers, LR, LAM, c.momentum, None, None)


def prox_loop(c: ProxCase) -> None:
    """The way a user writes it: plain torch ops, tensor by tensor."""
    for i, (p, g, a) in enumerate(zip(c.params, c.grads, c.anchors)):
        d = g + LAM * (p - a)
        if c.momentum:
            d = c.buffers[i].mul_(c.momentum).add_(d)
        p.sub_(LR * d)


def prox_foreach(c: ProxCase, anchors: List[Tensor]) -> None:
    d = torch._foreach_sub(c.params, anchors)
    torch._foreach_mul_(d, LAM)
    torch._foreach_add_(d, c.grads)
    if c.momentum:
        torch._foreach_mul_(c.buffers, c.momentum)
        torch._foreach_add_(c.buffers, d)
        d = c.buffers
    torch._foreach_add_(c.params, d, alpha=-LR)


@functools.lru_cache(maxsize=None)
def compiled_reference_prox():
    return torch.compile(reference.prox_sgd_step_)


def prox_compiled(c: ProxCase) -> None:
    compiled_reference_prox()(c.params, c.grads, c.anchors, c.buffers, LR, LAM, c.momentum, None, None)


class CompileGate:
    """Admits torch.compile variants while the compile-time budget lasts.

    A first call (which compiles, or recompiles for new shapes) cannot be
    interrupted, so the budget is checked before each one.
    """

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.spent_s = 0.0
        self.closed: Optional[str] = None if budget_s > 0 else "skipped (compile budget 0, e.g. --quick)"

    def admit(self, first_call: Callable[[], None]) -> Optional[str]:
        """Runs first_call; returns None if the variant can be timed, else why not."""
        if self.closed is None and self.spent_s >= self.budget_s:
            self.closed = f"skipped: compile budget of {self.budget_s:.0f} s spent"
        if self.closed is not None:
            return self.closed
        began = time.perf_counter()
        try:
            first_call()
        except Exception as error:  # any compiler failure: report it, keep benchmarking
            self.closed = f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            return self.closed
        finally:
            self.spent_s += time.perf_counter() - began
        return None


def make_prox_case(ctx: Context, tasks: int, momentum: float) -> ProxCase:
    params = per_task_like(ctx.theta, tasks, 0.01, around=True)
    buffers = per_task_like(ctx.theta, tasks, 0.01) if momentum else []
    return ProxCase(params, per_task_like(ctx.theta, tasks, 0.01), ctx.theta, buffers, momentum)


def prox_min_bytes(num_params: int, tasks: int, momentum: float) -> int:
    streams = 5 if momentum else 3
    return 4 * (streams * tasks * num_params + num_params)


def add_bandwidth(rec: dict, moved: int, copy_gbs: float) -> None:
    rec["gbs"] = moved / (rec["median_ms"] * 1e-3) / 1e9
    rec["pct_of_copy"] = 100.0 * rec["gbs"] / copy_gbs


def bench_prox(ctx: Context, tasks: int, momentum: float, copy_gbs: float) -> dict:
    c = make_prox_case(ctx, tasks, momentum)
    expanded = [a.expand_as(p) for a, p in zip(c.anchors, c.params)]
    # What a foreach user can do instead: repeat theta once per outer step, reuse it every inner step.
    materialized = [e.contiguous() for e in expanded]
    variants = {
        "ours": Variant(lambda: prox_ours(c)),
        "ours_op": Variant(lambda: prox_op(c)),
        "loop": Variant(lambda: prox_loop(c)),
        "foreach": Variant(lambda: prox_foreach(c, expanded)),
        "foreach_mat": Variant(lambda: prox_foreach(c, materialized)),
    }
    compile_note = ctx.compile_gate.admit(lambda: prox_compiled(c))
    if compile_note is None:
        variants["compile"] = Variant(lambda: prox_compiled(c))

    snapshot = Snapshot(c.params + c.buffers)
    checks = agreement({k: Variant(v.fn, snapshot.restore) for k, v in variants.items()}, lambda: c.params)
    # No restore while timing: the repeated step is a contraction towards theta - g/lam, values stay tame.
    records = measure(ctx, variants)
    for name, diff in checks.items():
        records[name]["max_abs_diff_vs_ours"] = diff
    moved = prox_min_bytes(ctx.num_params, tasks, momentum)
    for name in ("ours", "ours_op"):
        add_bandwidth(records[name], moved, copy_gbs)
    return {"tasks": tasks, "momentum": momentum, "variants": records, "compile_note": compile_note,
            "ours_min_bytes": moved}


# --------------------------------------------------------------------------- 2./3. CG


@dataclass
class CgState:
    """The solver state of imaml_ext.ops.cg_solve, built the way it builds it."""

    x: List[Tensor]
    r: List[Tensor]
    p: List[Tensor]
    s: List[Tensor]
    scalars: Tensor
    status: Tensor
    iterations: Tensor
    counter: Tensor

    @classmethod
    def start(cls, b: List[Tensor]) -> "CgState":
        like = b[0]
        tasks = like.shape[0]
        r = [t.clone() for t in b]
        state = cls(
            x=[torch.zeros_like(t) for t in r],
            r=r,
            p=[torch.zeros_like(t) for t in r],
            s=[torch.zeros_like(t) for t in r],
            scalars=like.new_zeros((tasks, reference.NUM_CG_SCALARS)),
            status=torch.zeros(tasks, dtype=torch.int32, device=like.device),
            iterations=torch.zeros(tasks, dtype=torch.int64, device=like.device),
            counter=torch.zeros(1, dtype=torch.int32, device=like.device),
        )
        torch.ops.imaml_ext.cg_init_(state.r, state.scalars, state.status, state.counter, CG_TOL)
        return state

    def tensors(self) -> List[Tensor]:
        return [*self.x, *self.r, *self.p, *self.s, self.scalars, self.status, self.iterations, self.counter]

    def iterate(self, ops, hr: List[Tensor]) -> None:
        """The vector work of one iteration with ops = torch.ops.imaml_ext or the reference."""
        ops.cg_alpha_(self.r, hr, self.scalars, self.status, self.counter, CG_LAM, None)
        ops.cg_update_(self.x, self.r, self.p, self.s, hr, self.scalars, self.status, self.iterations,
                       self.counter, CG_LAM, None, CG_TOL)


class HostScalars:
    """Turns 0-d device tensors into Python floats (one host sync each on CUDA), counting them."""

    def __init__(self):
        self.count = 0

    def __call__(self, t: Tensor) -> float:
        self.count += 1
        return float(t)

    def reads_per_call(self, fn: Callable[[], object]) -> int:
        self.count = 0
        fn()
        return self.count


def keep_on_device(t: Tensor) -> Tensor:
    return t


def to_vec(tensors: List[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def betty_cg_step(x, r, p, hp, scalar):
    """One textbook CG iteration on one task, written the way Betty writes it.

    A = I + H/lam; hp = H p. Betty keeps alpha and beta as 0-d tensors
    (scalar = keep_on_device); many hand-written solvers take Python floats
    (scalar = HostScalars()). Unlike Betty's cg.py, which builds the new p
    from the old r, this uses the new r (textbook CG).
    """
    ap = [pi + hi / CG_LAM for pi, hi in zip(p, hp)]
    r_vec = to_vec(r)
    rr = torch.dot(r_vec, r_vec)
    alpha = scalar(rr / torch.dot(to_vec(p), to_vec(ap)))
    x = [xi + alpha * pi for xi, pi in zip(x, p)]
    r = [ri - alpha * api for ri, api in zip(r, ap)]
    r_vec = to_vec(r)
    beta = scalar(torch.dot(r_vec, r_vec) / rr)
    p = [ri + beta * pi for ri, pi in zip(r, p)]
    return x, r, p


def task_slices(tensors: List[Tensor], t: int) -> List[Tensor]:
    return [x[t] for x in tensors]


def add_host_syncs_by_construction(records: Dict[str, dict], host: HostScalars, betty_item: Callable) -> None:
    """Device values read on the host per call: only betty_item reads any (2 per task and iteration)."""
    for rec in records.values():
        rec["host_syncs_by_construction"] = 0
    records["betty_item"]["host_syncs_by_construction"] = host.reads_per_call(betty_item)


def bench_cg_iteration(ctx: Context, tasks: int, copy_gbs: float) -> dict:
    b = per_task_like(ctx.theta, tasks, 1.0)
    diag = [torch.rand_like(t) * 2.0 for t in b]  # a positive diagonal H keeps every task active
    state = CgState.start(b)
    for _ in range(2):  # mid-solve state: beta != 0, as in most iterations
        state.iterate(torch.ops.imaml_ext, torch._foreach_mul(state.r, diag))
    hr = torch._foreach_mul(state.r, diag)
    hp = torch._foreach_mul(state.p, diag)
    snapshot = Snapshot(state.tensors())

    def betty_iteration(scalar):
        def run():
            for t in range(tasks):
                betty_cg_step(task_slices(state.x, t), task_slices(state.r, t), task_slices(state.p, t),
                              task_slices(hp, t), scalar)
        return run

    host = HostScalars()
    variants = {
        "ours": Variant(lambda: state.iterate(torch.ops.imaml_ext, hr), snapshot.restore),
        "reference": Variant(lambda: state.iterate(reference, hr), snapshot.restore),
        "betty": Variant(betty_iteration(keep_on_device)),
        "betty_item": Variant(betty_iteration(host)),
    }
    checks = agreement({k: variants[k] for k in ("ours", "reference")}, lambda: state.x + state.r)
    if state.status.any():
        raise RuntimeError("a CG task stopped updating: the timed iteration would skip work")
    records = measure(ctx, variants)
    add_host_syncs_by_construction(records, host, variants["betty_item"].fn)
    records["reference"]["max_abs_diff_vs_ours"] = checks["reference"]
    moved = 4 * 11 * tasks * ctx.num_params
    add_bandwidth(records["ours"], moved, copy_gbs)
    return {"tasks": tasks, "variants": records, "ours_min_bytes": moved}


def bench_cg_solve(ctx: Context, tasks: int) -> dict:
    b = per_task_like(ctx.theta, tasks, 1.0)
    diag = [torch.rand_like(t) * 2.0 for t in b]

    def ours():
        return imaml_ext.ops.cg_solve(lambda v: torch._foreach_mul(v, diag), b, CG_LAM, CG_ITERS, CG_TOL)[0]

    def betty_solve(scalar):
        def run():
            xs = []
            for t in range(tasks):
                d_t = task_slices(diag, t)
                x = [torch.zeros_like(v) for v in task_slices(b, t)]
                r = [v.clone() for v in task_slices(b, t)]
                p = [v.clone() for v in r]
                for _ in range(CG_ITERS):
                    x, r, p = betty_cg_step(x, r, p, [pi * di for pi, di in zip(p, d_t)], scalar)
                xs.append(x)
            return xs
        return run

    host = HostScalars()
    variants = {
        "ours": Variant(ours),
        "betty": Variant(betty_solve(keep_on_device)),
        "betty_item": Variant(betty_solve(host)),
    }
    x_ours = ours()
    x_betty = [torch.stack(per_tensor) for per_tensor in zip(*variants["betty"].fn())]
    scale = max(float(t.abs().max()) for t in x_ours)
    records = measure(ctx, variants)
    add_host_syncs_by_construction(records, host, variants["betty_item"].fn)
    return {
        "tasks": tasks,
        "iterations": CG_ITERS,
        "variants": records,
        "max_rel_diff_betty_vs_ours": max_abs_diff(x_betty, x_ours) / scale,
    }


# --------------------------------------------------------------------------- report


def fmt_ms(ms: float) -> str:
    for bound, digits in ((100, 0), (10, 1), (1, 2)):
        if ms >= bound:
            return f"{ms:.{digits}f}"
    return f"{ms:.3f}"


def cell(records: Dict[str, dict], name: str) -> str:
    """'ms (ours' speed-up x)' for a baseline, just 'ms' for ours, '-' if not run."""
    rec = records.get(name)
    if rec is None:
        return "-"
    if name.startswith("ours"):
        return fmt_ms(rec["median_ms"])
    return f"{fmt_ms(rec['median_ms'])} ({rec['ours_speedup']:.1f}x)"


def counts(records: Dict[str, dict], names: List[str], key: str) -> str:
    values = [records[n].get(key) for n in names]
    return "/".join("?" if v is None else str(v) for v in values)


def md_table(headers: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(result: dict) -> str:
    meta = result["meta"]
    cuda = meta["device"] == "cuda"
    lines = [
        f"# imaml_ext op microbenchmarks: {meta['machine']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, device {meta['device_name']}, {meta['cores']} cores "
        f"({meta['torch_threads']} torch threads), float32, Conv4: {meta['num_tensors']} tensors, "
        f"{meta['num_params']} parameters per task. Medians over up to {meta['repeats']} samples "
        f"after {meta['warmup']} warm-up calls; ms per call, (x) = ours' speed-up over that variant.",
        "",
        f"Copy bandwidth (dst.copy_(src), {meta['copy']['buffer_mib']} MiB, read+write): "
        f"{meta['copy']['gbs']:.1f} GB/s. Percentages of it can pass 100%: the probe's buffer is far larger "
        "than the caches (small T fits in them), and a copy also pays write-allocate reads that are not counted.",
        "",
    ]
    if meta["cpu_malloc_keeps_freed_memory"]:
        lines += ["glibc keeps freed memory (mallopt; --os-malloc to disable): temporaries of the plain-PyTorch "
                  "variants reuse touched pages, as with the CUDA caching allocator, instead of paying fresh page faults.",
                  ""]
    lines += [
        "## 1. Proximal SGD step, phi <- phi - lr*(g + lam*(phi - theta))",
        "",
        "ours = imaml_ext.ops.prox_sgd_step_ (public wrapper, Python argument checks included); "
        "ours_op = torch.ops.imaml_ext.prox_sgd_step_ called directly; speed-ups are of ours (the wrapper).",
        f"GB/s from the minimum traffic: {PROX_BYTES_FORMULA}.",
        "",
    ]
    names = ["ours", "ours_op", "loop", "foreach", "foreach_mat", "compile"]
    rows = []
    for r in result["prox"]:
        ours, op = r["variants"]["ours"], r["variants"]["ours_op"]
        rows.append([str(r["tasks"]), str(r["momentum"]), *[cell(r["variants"], n) for n in names],
                     f"{ours['gbs']:.1f} / {op['gbs']:.1f}", f"{ours['pct_of_copy']:.0f}% / {op['pct_of_copy']:.0f}%"])
    lines += md_table(["T", "momentum", "ours", "ours_op", "loop", "foreach (expand)", "foreach (theta repeated)",
                       "compile(reference)", "GB/s ours / ours_op", "% of copy ours / ours_op"], rows)
    notes = sorted({r["compile_note"] for r in result["prox"] if r["compile_note"]})
    lines += [""] + [f"compile: {n}" for n in notes] + ([""] if notes else [])

    cg_names = ["ours", "reference", "betty", "betty_item"]
    syncs_key = "host_syncs_measured" if cuda else "host_syncs_by_construction"
    lines += [
        "## 2. One CG iteration's vector work (no HVP)",
        "",
        "betty = per task, torch.cat-flattened vectors, torch.dot, 0-d tensor alpha/beta (as Betty's cg.py); "
        "betty_item = the same with Python-float alpha/beta.",
        f"Counts per iteration as {'/'.join(cg_names)}: host syncs "
        f"({'measured, sync debug mode' if cuda else 'by construction: float() of a device value'}), "
        "dispatched ops (ATen + custom, views included)" + (", CUDA kernels." if cuda else "."),
        f"GB/s of ours: {CG_ITERATION_BYTES_FORMULA}.",
        "",
    ]
    count_headers = ["host syncs", "dispatched ops"] + (["CUDA kernels"] if cuda else [])
    count_keys = [syncs_key, "dispatched_ops"] + (["cuda_kernels"] if cuda else [])
    rows = [
        [str(r["tasks"]), *[cell(r["variants"], n) for n in cg_names],
         f"{r['variants']['ours']['gbs']:.1f} ({r['variants']['ours']['pct_of_copy']:.0f}%)",
         *[counts(r["variants"], cg_names, k) for k in count_keys]]
        for r in result["cg_iteration"]
    ]
    lines += md_table(["T", *cg_names, "ours GB/s (% of copy)", *count_headers], rows)

    solve_names = ["ours", "betty", "betty_item"]
    lines += [
        "",
        f"## 3. Whole CG solve, {CG_ITERS} iterations, diagonal HVP",
        "",
        "ours = imaml_ext.ops.cg_solve (all tasks at once, HVP = one torch._foreach_mul over the [T, ...] lists); "
        "betty/betty_item = a Python loop over tasks as in 2. (HVP = per-task multiplies).",
        "",
    ]
    rows = [
        [str(r["tasks"]), *[cell(r["variants"], n) for n in solve_names],
         counts(r["variants"], solve_names, syncs_key), f"{r['max_rel_diff_betty_vs_ours']:.1e}"]
        for r in result["cg_solve"]
    ]
    lines += md_table(["T", *solve_names, "host syncs", "max rel diff of x"], rows)
    lines += ["", f"Total run time: {meta['run_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default="1,16,32,128", help="comma-separated task counts T")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per variant (default 200 on CUDA, 25 on CPU; 3 with --quick)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop sampling a comparison after this long (default 15; 2 with --quick)")
    parser.add_argument("--compile-budget", type=float, default=None,
                        help="seconds of torch.compile allowed in all (default 240; 0 = skip, the --quick default)")
    parser.add_argument("--os-malloc", action="store_true",
                        help="on CPU, let glibc return freed memory to the OS (default: keep it, see _timing)")
    parser.add_argument("--quick", action="store_true", help="few samples, no torch.compile: a smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/ops-<machine>-<date>.json); .md beside it")
    args = parser.parse_args(argv)
    args.tasks = [int(t) for t in args.tasks.split(",") if t.strip()]
    if args.repeats is None:
        args.repeats = 3 if args.quick else (200 if args.device == "cuda" else 25)
    if args.max_seconds is None:
        args.max_seconds = 2.0 if args.quick else 15.0
    if args.compile_budget is None:
        args.compile_budget = 0.0 if args.quick else 240.0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if not imaml_ext.ops.has_compiled_kernels(device.type):
        sys.exit(f"imaml_ext has no compiled {device.type} kernels: 'ours' would be the reference. Build it first.")
    malloc_cache = device.type == "cpu" and not args.os_malloc and keep_freed_cpu_memory()
    torch.manual_seed(0)
    ctx = Context(device, conv4_parameters(device), args.repeats, warmup=1 if args.quick else 3,
                  max_seconds=args.max_seconds, compile_gate=CompileGate(args.compile_budget))
    print(f"Conv4: {len(ctx.theta)} parameter tensors, {ctx.num_params} parameters per task", file=sys.stderr)

    copy = copy_bandwidth_gbs(device, repeats=5 if args.quick else 20)
    prox, cg_iteration, cg_solve = [], [], []
    for tasks in args.tasks:
        for momentum in (0.0, MOMENTUM):
            print(f"prox step T={tasks} momentum={momentum}", file=sys.stderr)
            prox.append(bench_prox(ctx, tasks, momentum, copy["gbs"]))
        print(f"CG iteration and solve T={tasks}", file=sys.stderr)
        cg_iteration.append(bench_cg_iteration(ctx, tasks, copy["gbs"]))
        cg_solve.append(bench_cg_solve(ctx, tasks))

    meta = run_metadata(device)
    date, machine = meta["date"], meta["machine"]
    result = {
        "meta": {
            **meta,
            "dtype": "float32",
            "num_tensors": len(ctx.theta),
            "num_params": ctx.num_params,
            "shapes": [list(t.shape) for t in ctx.theta],
            "tasks": args.tasks,
            "repeats": args.repeats,
            "warmup": ctx.warmup,
            "max_seconds_per_comparison": args.max_seconds,
            "quick": args.quick,
            "cpu_malloc_keeps_freed_memory": malloc_cache,
            "lr": LR, "lam": LAM, "momentum": MOMENTUM, "cg_lam": CG_LAM, "cg_iters": CG_ITERS,
            "copy": copy,
            "prox_bytes_formula": PROX_BYTES_FORMULA,
            "compile_seconds": ctx.compile_gate.spent_s,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "prox": prox,
        "cg_iteration": cg_iteration,
        "cg_solve": cg_solve,
    }
    result["meta"]["run_seconds"] = time.perf_counter() - began
    write_results(result, args.out, ROOT / "benchmarks" / "results" / f"ops-{machine}-{date}.json", render)


if __name__ == "__main__":
    main()
