"""Where the time of one implicit-MAML meta-step goes: a torch.profiler table per op class.

Workload: bench_meta_step.py's (the tutorial's Conv4-64 on Omniglot, float32, inner lr 0.1,
lam 2), ``imaml_ext.IMAML.meta_step`` over T tasks at once. Configurations (``--config``):

- ``paper``: the iMAML paper's 5-way 1-shot, T = 32, 16 inner steps, 5 CG, 15 query images per class;
- ``20w5s``: 20-way 5-shot, 5 inner steps, 5 CG, 15 query images per class, T = 16 on CUDA (the
  H200 20-way 5-shot benchmark's) and T = 8 on a CPU (the CPU one's, ``make bench``: at T = 16 the
  profiled step ran out of a 24 GiB machine's memory);

``--tasks``, ``--inner-steps``, ``--cg-iters``, ``--ways``, ``--shots``, ``--query`` override them.
On CUDA the profiled step is the CUDA-graph replay (``IMAML.capture``) unless ``--eager``.

After ``--warmup`` meta-steps (they include forward="auto"'s one-off timing on a CPU),
``--wall-steps`` unprofiled steps give the wall time, then ``--steps`` steps run under
torch.profiler. Every op's self time (CPU) or every kernel's time (CUDA) goes to one class,
reported per meta-step (the profiled steps' total over their number):

- convolution forward, convolution data gradient, convolution weight gradient (bias gradient
  included), BatchNorm, pooling, elementwise (arithmetic, activations, copies and fills),
  CG and our fused ops (``imaml_ext::*``), other (reductions, the linear head's matrix
  products, losses, views, autograd-engine bookkeeping), and on a CPU "outside ops" (the
  Python between them: the profiled steps' wall time less the ops' self time).

CPU: an op belongs to the class of its outermost enclosing op that has one, so the
allocations and copies inside a convolution count as convolution, and the elementwise ops of
BatchNorm's and max-pooling's double backward (autograd nodes ``NativeBatchNormBackward*``,
``MaxPool2DWithIndicesBackward*``) as BatchNorm and pooling.

The data / weight gradient split, CPU: ``aten::convolution_backward`` computes both in one call
when its ``output_mask`` asks for both, so the profiler has one time for the two. The profiler
records each call's shapes and arguments (``record_shapes``: input shapes and
``concrete_inputs``, output_mask included). After the profile, each distinct call signature that
asked for both is replayed alone, with random tensors of its shapes, once with
``output_mask = [True, False, False]`` (the data gradient) and once with
``[False, True, bias]`` (the weight and bias gradients), and its profiled time is split in the
ratio of those two timings (median of ``--split-repeats``). A call that asked for one of
them is that one. CUDA: cuDNN runs the two as separate kernels, named ``*dgrad*`` and
``*wgrad*``, which decide it.

CUDA (not run yet here: written on a machine without a GPU): a captured graph's kernels are
not tied to the ops that launched them, so on CUDA every kernel is classed by its name (see
``kernel_class``); the table is device time per step, the wall time is CUDA events around
replays.

Caveat, CPU: under torch.profiler, ops on tensors of 32 MiB and more ran 2-3x slower on the
2-core machine these tables come from (a lone 32 MiB multiply: 10 ms unprofiled, 28 ms
profiled; 16 MiB ones unaffected), so where a configuration makes such tensors (forward="auto"'s
stacked support pass at T = 32 does) their classes are overstated: compare the profiled step's
wall time with the unprofiled one printed beside it (the report flags a gap over 15 %).

Writes benchmarks/results/profile-<machine>-<date>.{json,md} (``--out`` to change it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_meta_step as bench  # noqa: E402
from imaml_ext import IMAML  # noqa: E402
from _timing import keep_freed_cpu_memory, run_metadata, sync, time_once_ms, write_results  # noqa: E402

CONFIGS = {
    "paper": dict(ways=5, shots=1, query=15, tasks=32, inner_steps=16, cg_iters=5),
    "20w5s": dict(ways=20, shots=5, query=15, tasks={"cuda": 16, "cpu": 8}, inner_steps=5, cg_iters=5),
}
CLASSES = ("convolution forward", "convolution data gradient", "convolution weight gradient", "BatchNorm",
           "pooling", "elementwise", "CG and fused ops (imaml_ext)", "other", "outside ops (Python)")
CONV_FWD, CONV_DATA, CONV_WEIGHT, BATCHNORM, POOLING, ELEMENTWISE, OURS, OTHER, OUTSIDE = CLASSES
STEP_LABEL = "profiled meta-step"

_CONV_FORWARD_OPS = {
    "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution", "aten::_convolution_mode",
    "aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::slow_conv_dilated2d",
    "aten::cudnn_convolution", "aten::_nnpack_spatial_convolution", "aten::conv_transpose2d",
    "aten::slow_conv_transpose2d", "aten::convolution_overrideable", "aten::miopen_convolution",
}
_CONV_BACKWARD_OPS = {
    "aten::convolution_backward", "aten::mkldnn_convolution_backward", "aten::_slow_conv2d_backward",
    "aten::cudnn_convolution_backward", "aten::convolution_backward_overrideable",
}
_ELEMENTWISE_OPS = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "neg_", "relu", "relu_",
    "threshold_backward", "clamp", "clamp_", "clamp_min", "clamp_min_", "where", "fill_", "zero_", "zeros",
    "zeros_like", "ones_like", "full", "full_like", "copy_", "clone", "_to_copy", "contiguous", "sqrt", "rsqrt",
    "pow", "exp", "log", "abs", "sign", "addcmul_", "addcdiv_", "lerp_", "eq", "ne", "gt", "lt", "ge", "le",
    "logical_and", "logical_or", "logical_not", "bitwise_or", "bitwise_and", "bitwise_not", "isfinite", "isnan",
    "masked_fill", "masked_fill_", "stack", "cat", "leaky_relu", "leaky_relu_backward", "reciprocal", "square",
}


def op_class(name: str) -> Optional[str]:
    """The class an op (or autograd node) gives everything it encloses; None: it gives none."""
    if name.startswith("imaml_ext::"):
        return OURS
    if name in _CONV_FORWARD_OPS:
        return CONV_FWD
    if name in _CONV_BACKWARD_OPS:
        return CONV_DATA  # split into data / weight later
    if "batch_norm" in name or "BatchNorm" in name:
        return BATCHNORM
    if "pool" in name.lower():
        return POOLING
    return None


def leaf_class(name: str) -> str:
    """The class of an op outside every classed op."""
    if name.startswith("aten::"):
        base = name[len("aten::"):]
        if base in _ELEMENTWISE_OPS or base.startswith("_foreach_"):
            return ELEMENTWISE
    return OTHER


def kernel_class(name: str) -> str:
    """A CUDA kernel's class from its name (cuDNN, cuBLAS, ATen and imaml_ext kernels)."""
    low = name.lower()
    if "imaml" in low or "prox_sgd" in low or "cg_dot" in low or "cg_update" in low or "cg_alpha" in low:
        return OURS
    if "wgrad" in low:
        return CONV_WEIGHT
    if "dgrad" in low:
        return CONV_DATA
    if any(k in low for k in ("fprop", "convolve", "conv2d", "implicit_gemm", "winograd", "conv_")):
        return CONV_FWD
    if "batch_norm" in low or "batchnorm" in low or "bn_fw" in low or "bn_bw" in low:
        return BATCHNORM
    if "pool" in low:
        return POOLING
    if any(k in low for k in ("elementwise", "vectorized", "unrolled", "fill", "copy", "threshold", "where")):
        return ELEMENTWISE
    return OTHER


# --------------------------------------------------------------------------- CPU attribution


def conv_backward_signature(event) -> Optional[tuple]:
    """(grad_output, input, weight shapes, bias_sizes, stride, padding, dilation, transposed, output_padding,
    groups, output_mask) of an aten::convolution_backward event, from record_shapes' data."""
    args = getattr(event, "concrete_inputs", None)
    shapes = event.input_shapes
    if not args or len(args) < 11 or not shapes or len(shapes) < 3:
        return None
    return (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]),
            *(tuple(a) if isinstance(a, list) else a for a in args[3:11]))


def time_split(signature: tuple, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """The data gradient's share of a both-gradients convolution_backward call: the two replayed
    alone with random tensors of its shapes (see the module docstring)."""
    go_shape, in_shape, w_shape, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask = signature
    make = lambda shape: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
    go, inp, w = make(go_shape), make(in_shape), make(w_shape)

    def call(m):
        return lambda: torch.ops.aten.convolution_backward(
            go, inp, w, list(bias_sizes) if bias_sizes is not None else None, list(stride), list(padding),
            list(dilation), transposed, list(out_pad), groups, m)

    data, weight = call([True, False, False]), call([False, bool(mask[1]), bool(mask[2])])
    ms = {"data": [], "weight": []}
    for fn in (data, weight):  # warm-up
        fn()
    for _ in range(repeats):
        ms["data"].append(time_once_ms(data, device))
        ms["weight"].append(time_once_ms(weight, device))
    d, w_ = statistics.median(ms["data"]), statistics.median(ms["weight"])
    return d / (d + w_) if d + w_ > 0 else 0.5


def cpu_table(prof, steps: int, dtype: torch.dtype, device: torch.device, split_repeats: int) -> dict:
    totals: Dict[str, float] = defaultdict(float)  # microseconds over all profiled steps
    per_op: Dict[tuple, List[float]] = defaultdict(lambda: [0.0, 0])  # (name, class) -> [us, calls]
    conv_bwd: Dict[int, dict] = {}  # anchor id -> {"us", "signature"}
    step_wall_us = 0.0
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    for e in events:
        if e.name == STEP_LABEL:
            step_wall_us += e.cpu_time_total
    for e in events:
        self_us = e.self_cpu_time_total
        if e.name == STEP_LABEL:
            totals[OUTSIDE] += self_us
            continue
        chain, node = [], e
        while node is not None:
            chain.append(node)
            node = node.cpu_parent
        if not any(n.name == STEP_LABEL for n in chain):
            continue  # outside the profiled steps (e.g. the profiler's own start-up)
        anchor, cls = None, None
        for n in reversed(chain):  # outermost first
            cls = op_class(n.name)
            if cls is not None:
                anchor = n
                break
        if anchor is None:
            cls = leaf_class(e.name)
        if anchor is not None and anchor.name in _CONV_BACKWARD_OPS:
            rec = conv_bwd.setdefault(id(anchor), {"us": 0.0, "signature": conv_backward_signature(anchor)})
            rec["us"] += self_us
            continue
        totals[cls] += self_us
        per_op[(e.name, cls)][0] += self_us
        per_op[(e.name, cls)][1] += 1

    # Split convolution_backward calls into data and weight gradients.
    ratios: Dict[tuple, float] = {}
    split_rows: Dict[tuple, dict] = {}
    for rec in conv_bwd.values():
        sig = rec["signature"]
        mask = sig[-1] if sig is not None else None
        if sig is None or mask is None:
            share = 0.5
        elif mask[0] and (mask[1] or mask[2]):
            if sig not in ratios:
                ratios[sig] = time_split(sig, dtype, device, split_repeats)
            share = ratios[sig]
        else:
            share = 1.0 if mask[0] else 0.0
        totals[CONV_DATA] += rec["us"] * share
        totals[CONV_WEIGHT] += rec["us"] * (1 - share)
        listed = None if sig is None else [list(s) if isinstance(s, tuple) else s for s in sig]
        row = split_rows.setdefault(sig, {"signature": listed, "calls": 0, "ms": 0.0, "data_share": share})
        row["calls"] += 1
        row["ms"] += rec["us"] / 1e3 / steps
    calls = sum(r["calls"] for r in split_rows.values())
    for cls, part in ((CONV_DATA, "data"), (CONV_WEIGHT, "weight")):
        per_op[(f"aten::convolution_backward ({part})", cls)] = [totals[cls], calls]
    total_us = sum(totals.values())
    return {
        "classes": [{"class": c, "ms": totals[c] / 1e3 / steps, "pct": 100 * totals[c] / total_us if total_us else 0.0}
                    for c in CLASSES],
        "total_ms": total_us / 1e3 / steps,
        "profiled_wall_ms": step_wall_us / 1e3 / steps,
        "top_ops": [{"op": n, "class": c, "ms": us / 1e3 / steps, "calls_per_step": calls / steps}
                    for (n, c), (us, calls) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:20]],
        "conv_backward_calls": sorted(split_rows.values(), key=lambda r: -r["ms"]),
    }


def cuda_table(prof, steps: int) -> dict:
    totals: Dict[str, float] = defaultdict(float)
    per_kernel: Dict[tuple, List[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith(("Memcpy", "Memset")):
            continue
        us = e.time_range.elapsed_us()
        cls = kernel_class(e.name)
        totals[cls] += us
        per_kernel[(e.name[:120], cls)][0] += us
        per_kernel[(e.name[:120], cls)][1] += 1
    total_us = sum(totals.values())
    return {
        "classes": [{"class": c, "ms": totals[c] / 1e3 / steps, "pct": 100 * totals[c] / total_us if total_us else 0.0}
                    for c in CLASSES if c != OUTSIDE],
        "total_ms": total_us / 1e3 / steps,
        "profiled_wall_ms": None,
        "top_ops": [{"op": n, "class": c, "ms": us / 1e3 / steps, "calls_per_step": calls / steps}
                    for (n, c), (us, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:20]],
        "conv_backward_calls": [],
    }


# --------------------------------------------------------------------------- one configuration


def profile_config(args, name: str, cfg: dict, device: torch.device) -> dict:
    bench.WAYS, bench.SHOTS, bench.QUERY = cfg["ways"], cfg["shots"], cfg["query"]
    torch.manual_seed(args.seed)
    model = bench.tutorial_convnet()(cfg["ways"], bench.HIDDEN).to(device)
    source = bench.TaskSource(device, args.seed)
    batch = source.sample(cfg["tasks"])
    imaml = IMAML(copy.deepcopy(model), inner_steps=cfg["inner_steps"], inner_lr=bench.INNER_LR, lam=bench.LAM,
                  cg_iterations=cfg["cg_iters"], ways=cfg["ways"], forward=args.forward, hvp=args.hvp)
    if device.type == "cuda" and not args.eager:
        imaml.meta_step(*batch)  # hvp="auto" times its choice eagerly, never inside the capture
        imaml.model.zero_grad(set_to_none=True)
    captured = None
    if device.type == "cuda" and not args.eager:
        captured = imaml.capture(*batch)
        step = lambda: captured.step(*batch)  # noqa: E731
    else:
        step = lambda: imaml.meta_step(*batch)  # noqa: E731
    reset = lambda: imaml.model.zero_grad(set_to_none=True)  # noqa: E731

    began = time.perf_counter()
    for _ in range(args.warmup):
        reset()
        step()
    sync(device)
    warmup_s = time.perf_counter() - began
    wall = [time_once_ms(step, device, reset) for _ in range(args.wall_steps)]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            reset()
            with record_function(STEP_LABEL):
                step()
            sync(device)
    dtype = next(model.parameters()).dtype
    table = cuda_table(prof, args.steps) if device.type == "cuda" else cpu_table(
        prof, args.steps, dtype, device, args.split_repeats)
    choices = [{"input": list(k[0]), "dtype": k[1], "mode": k[2], "threads": k[3], "autocast": k[4], **v}
               for k, v in imaml.forward_choices.items()]
    return {
        "config": name, **cfg, "forward": args.forward, "captured": captured is not None,
        "data": source.note, "warmup_steps": args.warmup, "warmup_s": warmup_s,
        "wall_ms": {"median": statistics.median(wall), "samples": wall} if wall else None,
        "profiled_steps": args.steps, "auto_choices": choices, **table,
    }


# --------------------------------------------------------------------------- report


def render(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Meta-step profile: {meta['machine']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, {meta['device']} ({meta['device_name']}), {meta['cores']} cores, "
        f"{meta['torch_threads']} torch threads, float32; `benchmarks/profile_meta_step.py "
        f"{' '.join(meta['argv'])}`. Load average before the run: {bench.fmt_load(meta['loadavg_at_start'])}, "
        f"after: {bench.fmt_load(meta['loadavg_at_end'])}.",
        "",
        "Time per meta-step by op class: self time of the ops (CPU) or kernel time (CUDA) over the profiled "
        "steps, divided by their number. Method (op classes, the convolution data / weight gradient split): "
        "the script's docstring.",
    ]
    if not meta.get("complete", True):
        lines += ["", "**Cut off: only the configurations below finished.**"]
    for r in result["configs"]:
        what = "CUDA-graph replay" if r["captured"] else "eager"
        wall = r["wall_ms"]
        lines += [
            "",
            f"## {r['config']}: {r['ways']}-way {r['shots']}-shot, {r['query']} query per class, T = {r['tasks']}, "
            f"{r['inner_steps']} inner steps, {r['cg_iters']} CG",
            "",
            f"forward=\"{r['forward']}\", {what}; data: {r['data']}. Wall time per meta-step (unprofiled, median of "
            f"{len(wall['samples']) if wall else 0}): **{wall['median']:.0f} ms**" if wall else "",
        ]
        if r["profiled_wall_ms"] is not None:
            lines[-1] += (f"; under the profiler {r['profiled_wall_ms']:.0f} ms ({r['profiled_steps']} steps "
                          f"profiled), of which ops {r['total_ms'] - _cls(r, OUTSIDE):.0f} ms.")
            if wall and r["profiled_wall_ms"] > 1.15 * wall["median"]:
                lines[-1] += (f" **The profiled step took {r['profiled_wall_ms'] / wall['median']:.2f}x the unprofiled "
                              "one: the profiler slowed some ops (large tensors, see the script's docstring), whose "
                              "classes are overstated here.**")
        else:
            lines[-1] += f"; kernels {r['total_ms']:.1f} ms per step ({r['profiled_steps']} steps profiled)."
        if r["auto_choices"]:
            lines += ["", "forward=\"auto\" chose: " + "; ".join(
                f"{c['input']} ({c['mode']}): {c['forward']} ({', '.join(f'{m} {ms:.0f} ms' for m, ms in c['ms'].items())})"
                for c in r["auto_choices"]) + "."]
        lines += ["", "| class | ms per meta-step | % |", "|---|---|---|"]
        lines += [f"| {c['class']} | {c['ms']:.1f} | {c['pct']:.1f} |" for c in r["classes"]]
        lines += [f"| total | {r['total_ms']:.1f} | 100 |", "", "Top ops:", "",
                  "| op | class | ms per step | calls per step |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['class']} | {o['ms']:.1f} | {o['calls_per_step']:.0f} |" for o in r["top_ops"][:12]]
    return "\n".join(lines) + "\n"


def _cls(r: dict, cls: str) -> float:
    return next((c["ms"] for c in r["classes"] if c["class"] == cls), 0.0)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="paper,20w5s", help=f"comma-separated presets: {', '.join(CONFIGS)}")
    for flag in ("tasks", "inner-steps", "cg-iters", "ways", "shots", "query"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="overrides the presets' value")
    parser.add_argument("--forward", default="auto", choices=["auto", "vmap", "loop", "stacked"])
    parser.add_argument("--hvp", default="auto", choices=["auto", "reverse", "forward"])
    parser.add_argument("--eager", action="store_true", help="CUDA: profile the eager step, not the graph replay")
    parser.add_argument("--warmup", type=int, default=2, help="meta-steps before any timing")
    parser.add_argument("--wall-steps", type=int, default=2, help="unprofiled meta-steps timed for the wall time")
    parser.add_argument("--steps", type=int, default=2, help="profiled meta-steps")
    parser.add_argument("--split-repeats", type=int, default=3,
                        help="CPU: timed replays of each convolution_backward signature for the data/weight split")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/profile-<machine>-<date>.json); .md beside it")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.config.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--config: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    for n in ("warmup", "steps"):
        if getattr(args, n) < 1:
            parser.error(f"--{n} must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # as bench_meta_step does: no fresh page faults for every temporary
    warnings.filterwarnings("ignore", message=r"IMAML: layer")
    load_at_start = bench.load_average()
    configs = []
    for name in args.configs:
        cfg = {k: v[device.type] if isinstance(v, dict) else v for k, v in CONFIGS[name].items()}
        for key in cfg:
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        print(f"{name}: {cfg}", file=sys.stderr)
        configs.append(profile_config(args, name, cfg, device))
        meta = run_metadata(device)
        meta.update(argv=sys.argv[1:] if argv is None else list(argv), loadavg_at_start=load_at_start,
                    loadavg_at_end=bench.load_average(), complete=len(configs) == len(args.configs), method=__doc__)
        out_default = ROOT / "benchmarks" / "results" / f"profile-{meta['machine']}-{meta['date']}.json"
        write_results({"meta": meta, "configs": configs}, args.out, out_default, render)  # after each: a cut-off run keeps it


if __name__ == "__main__":
    main()
