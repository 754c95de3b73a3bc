"""The benchmark report of one machine: the headline figures of every benchmark's latest result
file for that machine, each beside its baseline, gathered into
benchmarks/results/<machine>-<date>.{json,md}, a PNG of the meta-step speed-ups,
<machine>-<date>-ops.png, the fused ops against the copy bandwidth (their roofline), and, with an
accuracy file of benchmarks/reproduce.py, the Omniglot accuracy table and
<machine>-<date>-accuracy.png, accuracy against meta-steps.
Nothing is measured here: every figure comes from the named result file, with its own date.

    python benchmarks/report.py                  # every machine with results
    python benchmarks/report.py --machine NVIDIA-H200
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("ops", "hvp", "meta_step", "meta_step-20w5s", "meta_step-sequential", "floor", "maml", "memory-sweep",
         "tasks-sweep", "accuracy")
DATED = re.compile(r"^(?P<stem>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.json$")


def parse_name(name: str) -> Optional[Dict[str, str]]:
    """{kind, machine, date} of a result file <kind>-<machine>-<date>.json; machine names hold
    dashes of their own (NVIDIA-H100-80GB-HBM3), so the kind is matched from KINDS, longest first."""
    m = DATED.match(name)
    if not m:
        return None
    for kind in sorted(KINDS, key=len, reverse=True):
        if m["stem"].startswith(kind + "-"):
            return {"kind": kind, "machine": m["stem"][len(kind) + 1:], "date": m["date"]}
    return None


def latest_files(machine: str) -> Dict[str, Path]:
    """Kind -> the newest result file of that kind for the machine."""
    found: Dict[str, tuple] = {}
    for path in RESULTS.glob("*.json"):
        m = parse_name(path.name)
        if not m or m["machine"] != machine:
            continue
        if m["kind"] not in found or m["date"] > found[m["kind"]][0]:
            found[m["kind"]] = (m["date"], path)
    return {kind: path for kind, (_, path) in found.items()}


def machines() -> List[str]:
    return sorted({m["machine"] for p in RESULTS.glob("*.json") if (m := parse_name(p.name))})


def fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


BASELINES = ("plain_loop", "plain_vmap", "ours_sequential")


def ops_section(d: dict) -> List[List[str]]:
    rows = []
    prox = [r for r in d["prox"] if r["momentum"] == 0.0]
    if prox:
        r = max(prox, key=lambda r: r["tasks"])
        v = r["variants"]
        op = v.get("ours_op", v["ours"])
        base = {k: v[k]["median_ms"] for k in v if not k.startswith("ours")}
        best = min(base, key=base.get)
        rows.append([f"fused prox step, T = {r['tasks']}",
                     f"{fmt(op['median_ms'])} ms (op), {op['pct_of_copy']:.0f} % of copy bandwidth",
                     f"{best} {fmt(base[best])} ms", f"{base[best] / v['ours']['median_ms']:.1f}x (wrapper)"])
    if d.get("cg_iteration"):
        r = max(d["cg_iteration"], key=lambda r: r["tasks"])
        v = r["variants"]
        rows.append([f"one CG iteration's vector work, T = {r['tasks']}", f"{fmt(v['ours']['median_ms'])} ms",
                     f"Betty-style {fmt(v['betty']['median_ms'])} ms", f"{v['betty']['median_ms'] / v['ours']['median_ms']:.1f}x"])
    if d.get("cg_solve"):
        r = max(d["cg_solve"], key=lambda r: r["tasks"])
        v = r["variants"]
        rows.append([f"CG solve, {r['iterations']} iterations, T = {r['tasks']}", f"{fmt(v['ours']['median_ms'])} ms",
                     f"Betty-style {fmt(v['betty']['median_ms'])} ms", f"{v['betty']['median_ms'] / v['ours']['median_ms']:.1f}x"])
    return rows


def meta_step_rows(d: dict, label: str) -> List[List[str]]:
    rows = []
    for c in d["configs"]:
        v = c["variants"]
        ours = {k: v[k]["seconds"] for k in v if k not in BASELINES}
        base = {k: v[k]["seconds"] for k in v if k in BASELINES}
        cell = ", ".join(f"{k} {fmt(s * 1e3)} ms" for k, s in ours.items())
        basecell = ", ".join(f"{k} {fmt(s * 1e3)} ms" for k, s in base.items())
        speed = "; ".join(f"{o} vs {b}: {base[b] / ours[o]:.1f}x" for o in ours for b in base)
        rows.append([f"{label}, T = {c['tasks']}, {c['inner_steps']} inner, {c['cg_iters']} CG", cell, basecell, speed])
    return rows


META_STEP_KINDS = (("meta_step", "5-way 1-shot"), ("meta_step-20w5s", "20-way 5-shot"))

# Issue 6's goals, as figures: (machine kind, what, variant, baseline, at least).
SPEED_GOALS = (("cpu", "meta-step speed-up over the plain per-task loop", "ours_batched", "plain_loop", 1.5),
               ("gpu", "meta-step speed-up over the plain per-task loop, eager", "ours_batched", "plain_loop", 20.0),
               ("gpu", "meta-step speed-up over the plain per-task loop, CUDA-graph replay", "ours_graph", "plain_loop",
                20.0),
               ("gpu", "meta-step speed-up over plain torch.func vmap, eager", "ours_batched", "plain_vmap", 2.0),
               ("gpu", "meta-step speed-up over plain torch.func vmap, CUDA-graph replay", "ours_graph", "plain_vmap",
                2.0))
COPY_GOAL_PCT = 70.0


def ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def verdict(values: List[float], goal: float) -> str:
    met = sum(v >= goal for v in values)
    return "met" if met == len(values) else "missed" if met == 0 else f"met in {met} of {len(values)}"


def goal_rows(machine: str, data: Dict[str, dict]) -> List[List[str]]:
    """[goal, measured, verdict] for each of issue 6's goals that applies to this machine; a goal
    whose measurement is not in the results says so instead of being left out."""
    kind = "cpu" if machine.startswith("cpu-") else "gpu"
    rows = []
    for goal_kind, what, ours, base, goal in SPEED_GOALS:
        if goal_kind != kind:
            continue
        for step_kind, label in META_STEP_KINDS:
            configs = [c for c in data.get(step_kind, {}).get("configs", [])
                       if ours in c["variants"] and base in c["variants"]]
            if not configs:
                rows.append([f"{what} ≥ {goal:g}x ({label})", "not measured", "—"])
                continue
            ratios = [c["variants"][base]["seconds"] / c["variants"][ours]["seconds"] for c in configs]
            measured = (f"{ratio(min(ratios))[:-1]}–{ratio(max(ratios))} over {len(ratios)} configurations"
                        if len(ratios) > 1 else ratio(ratios[0]))
            rows.append([f"{what} ≥ {goal:g}x ({label})", measured, verdict(ratios, goal)])
    if kind == "gpu":
        ops = data.get("ops") or {}
        for section, label in (("prox", "fused prox step"), ("cg_iteration", "one CG iteration's vector work")):
            if not ops.get(section):
                rows.append([f"{label} ≥ {COPY_GOAL_PCT:g} % of copy bandwidth at large T", "not measured", "—"])
                continue
            largest = max(r["tasks"] for r in ops[section])
            for r in (r for r in ops[section] if r["tasks"] == largest):
                v = r["variants"]
                op = v.get("ours_op", v["ours"])
                momentum = f", momentum {r['momentum']:g}" if "momentum" in r else ""
                rows.append([f"{label} ≥ {COPY_GOAL_PCT:g} % of copy bandwidth (T = {largest}{momentum})",
                             f"{op['pct_of_copy']:.0f} %", verdict([op["pct_of_copy"]], COPY_GOAL_PCT)])
    return rows


def _pct(value: Optional[float], ci: Optional[float] = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ± {ci:.2f} %" if ci is not None else f"{value:.2f} %"


ACCURACY_HEADER = ["setting", "seeds", "budget per seed: meta-steps, model, wall time",
                   "ours: query images/class, test-time λ, test tasks", "ours", "random init",
                   "iMAML authors' protocol: query images/class, test-time λ, test tasks", "authors' protocol",
                   "random init", "paper (iMAML-GD)", "Betty README", "training"]


def _over_seeds(figure: dict, of: int) -> str:
    """A protocol's (or its baseline's) figure over the seeds that have it, saying how many of ``of``."""
    n = figure["seeds"]
    if not n:
        return "not evaluated" + (f" ({of} seeds)" if of > 1 else "")
    count = f"{n} of {of} seeds" if n < of else f"{n} seed" + ("s" if n > 1 else "")
    if n == 1:
        return f"{figure['mean']:.2f} ± {figure['ci95']:.2f} % ({count}, 95 % CI)"
    return f"{figure['mean']:.2f} ± {figure['std']:.2f} % ({count}, mean ± s.d.)"


def _protocol(p: dict) -> str:
    lam = "—" if p["eval_lam"] is None else f"{p['eval_lam']:g}"
    tasks = "/".join(str(t) for t in p["tasks"]) or "—"
    return f"{p['query']}, λ {lam}, {tasks}"


def _label(e: dict) -> str:
    return f"{e['ways']}-way {e['shots']}-shot" + (f" ({e['preset']})" if e.get("preset") else "")


def accuracy_rows(entries: List[dict]) -> List[List[str]]:
    """One row per setting of an accuracy file (benchmarks/reproduce.py): ACCURACY_HEADER's columns."""
    rows = []
    for e in entries:
        seeds = f"{e['seeds_run']}: " + ", ".join(str(s["seed"]) for s in e["seeds"])
        seeds += "".join(f"; seed {s['seed']} at step {s['steps_done']:,} of {e['steps']:,}"
                         for s in e["seeds"] if not s["finished"])
        s = e["settings"]
        wall = f"{e['wall_seconds_per_seed'] / 60:.0f} min" if e.get("wall_seconds_per_seed") else "—"
        budget = f"{e['steps']:,}, Conv4-{s['hidden_size']}, {wall}"
        lam = "—" if s.get("lam") is None else f"{s['lam']:g}"
        training = (f"{s['inner_steps']} inner at {s['base_lr']:g}, λ {lam}, {s['cg_iterations']} CG, "
                    f"T {s['meta_batch_size']}, lr {s['meta_lr']:g} {s['scheduler']}, {s['query']} query/class")
        ours, authors = e["ours"], e["authors"]
        rows.append([_label(e), seeds, budget, _protocol(ours), _over_seeds(ours, ours["of"]),
                     _over_seeds(ours["baseline"], ours["of"]), _protocol(authors),
                     _over_seeds(authors, authors["of"]), _over_seeds(authors["baseline"], authors["of"]),
                     _pct(e.get("paper")), _pct(e.get("betty")), training])
    return rows


def _one_seed(name: str, found: Optional[dict]) -> str:
    if not found:
        return f"{name} not evaluated"
    base = found.get("baseline") or {}
    return (f"{name} {_pct(found['accuracy'], found['ci95'])} ({_pct(base.get('accuracy'), base.get('ci95'))}), "
            f"{found['tasks']} tasks, from {found['source']}")


def per_seed_lines(entries: List[dict]) -> List[str]:
    """Each setting's seeds, one line each: both protocols' figures with their 95 % intervals."""
    lines = []
    for e in entries:
        lines.append(f"- {_label(e)}, {e['steps']:,} meta-steps:")
        for s in e["seeds"]:
            state = "" if s["finished"] else f", not finished (step {s['steps_done']:,})"
            wall = f", {s['wall_seconds'] / 60:.0f} min" if s.get("wall_seconds") else ""
            lines.append(f"  - seed {s['seed']} (`{s['run']}`{state}{wall}): {_one_seed('ours', s['ours'])}; "
                         f"{_one_seed('authors', s['authors'])}")
    return lines


def plot_accuracy(entries: List[dict], machine: str, path: Path) -> bool:
    """Validation accuracy against meta-steps for each seed of each setting, the final meta-test
    accuracy under our protocol (mean ± s.d. over seeds, or one seed's 95 % interval) and the
    paper's figure for the same setting as a dashed line."""
    shown = [e for e in entries if e["ours"]["seeds"] or any(s.get("curve") for s in e["seeds"])]
    plt = pyplot() if shown else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for e in shown:
        label = f"{e['ways']}-way {e['shots']}-shot, {e['steps']:,} steps"
        color = None
        for s in (s for s in e["seeds"] if s.get("curve")):
            (line,) = ax.plot(*zip(*s["curve"]), "o-", markersize=3, linewidth=1, color=color,
                              label=f"{label}, validation" if color is None else None)
            color = line.get_color()
        ours = e["ours"]
        if ours["seeds"]:
            spread = ours["std"] if ours["seeds"] > 1 else ours["ci95"]
            line = ax.errorbar([e["steps"]], [ours["mean"]], yerr=[spread], fmt="*", markersize=10, capsize=4,
                               color=color, label=f"{label}, meta-test {_over_seeds(ours, ours['of'])}")
            color = line.lines[0].get_color()
        if e.get("paper") is not None:
            ax.axhline(e["paper"], color=color, linestyle="--", linewidth=0.8, label=f"{label}, paper {e['paper']:.2f} %")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"Omniglot accuracy against meta-steps: {machine}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def gather(machine: str) -> Optional[dict]:
    files = latest_files(machine)
    if not files:
        return None
    data = {kind: json.loads(path.read_text()) for kind, path in files.items()}
    rows: List[List[str]] = []
    if "ops" in data:
        rows += ops_section(data["ops"])
    if "hvp" in data:
        h = {r["variant"]: r["ms_per_solve"] for r in data["hvp"]["rows"]}
        t = data["hvp"]["config"]["tasks"]
        rows.append([f"HVPs of one solve, T = {t}", f"batched double backward {fmt(h['batched_double_backward'])} ms, "
                     f"batched jvp(grad) {fmt(h['batched_jvp_grad'])} ms",
                     f"per task {fmt(h['per_task_double_backward'])} ms",
                     f"{h['per_task_double_backward'] / h['batched_double_backward']:.2f}x"])
    for kind, label in META_STEP_KINDS + (("meta_step-sequential", "5-way 1-shot, sequential"),):
        if kind in data:
            rows += meta_step_rows(data[kind], label)
    if "maml" in data:
        for c in data["maml"]["configs"]:
            s = c["seconds"]
            rows.append([f"MAML, {c['ways']}-way {c['shots']}-shot", f"ours {fmt(s['ours_maml'])} s",
                         f"learn2learn {fmt(s['l2l_maml'])} s", f"{s['l2l_maml'] / s['ours_maml']:.2f}x"])
    if "floor" in data:
        whole = next(r for r in data["floor"]["stages"] if r["stage"] == "whole meta-step")
        rows.append([f"meta-step against the floor, T = {data['floor']['config']['tasks']}",
                     f"{fmt(whole['ms'])} ms ({fmt(whole['gflop'])} GFLOP)",
                     f"floor at the dense-Conv4 rate {fmt(whole['floor_ms_at_conv_rate'])} ms",
                     f"{whole['ms'] / whole['floor_ms_at_conv_rate']:.1f}x the floor"])
    for kind, key in (("memory-sweep", "inner_steps"), ("tasks-sweep", "tasks")):
        if kind in data:
            pts = data[kind]["points"]
            by = {algo: {p[key]: p for p in pts if p["algo"] == algo and "peak_mib" in p} for algo in ("imaml", "maml")}
            common = sorted(set(by["imaml"]) & set(by["maml"]))
            if common:
                lo, hi = common[0], common[-1]
                what = "inner steps" if key == "inner_steps" else "T"
                rows.append([f"peak memory of a meta-step, {what} {lo} → {hi}",
                             f"iMAML {fmt(by['imaml'][lo]['peak_mib'])} → {fmt(by['imaml'][hi]['peak_mib'])} MiB",
                             f"unrolled MAML {fmt(by['maml'][lo]['peak_mib'])} → {fmt(by['maml'][hi]['peak_mib'])} MiB",
                             f"{by['maml'][hi]['peak_mib'] / by['imaml'][hi]['peak_mib']:.1f}x less at {hi}"])
    accuracy = data.get("accuracy", {}).get("entries", [])
    if any("seeds" not in e for e in accuracy):
        raise SystemExit(f"{files['accuracy']}: an accuracy file from before its rows were over seeds (an entry "
                         "without \"seeds\"); write it again with benchmarks/reproduce.py --collect RUN_FOLDER...")
    dates = sorted(d["meta"]["date"] for d in data.values())
    return {"machine": machine, "date": dates[-1], "sources": {k: p.name for k, p in files.items()},
            "device": next(iter(data.values()))["meta"].get("device_name"),
            "torch": sorted({d["meta"]["torch"] for d in data.values()}), "rows": rows,
            "goals": goal_rows(machine, data),
            "accuracy": accuracy_rows(accuracy), "accuracy_entries": accuracy,
            "meta_step": data.get("meta_step"), "ops": data.get("ops")}


def render(report: dict) -> str:
    lines = [f"# Benchmark report: {report['machine']} ({report['device']}), latest {report['date']}", "",
             f"torch {', '.join(report['torch'])}. Gathered by `benchmarks/report.py` from the files below; "
             "each figure is from its file's own run and date, beside the baseline measured in that run.", "",
             "| measurement | ours | baseline | ratio |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in report["rows"]]
    if report.get("goals"):
        lines += ["", "Goals of the benchmark issue (figures, not timed tests):", "",
                  "| goal | measured | verdict |", "|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in report["goals"]]
    if report.get("accuracy"):
        lines += ["", "Omniglot meta-test accuracy (`benchmarks/reproduce.py`), beside the iMAML paper's (iMAML-GD, "
                  "Table 3) and Betty's README figures:", "",
                  "| " + " | ".join(ACCURACY_HEADER) + " |", "|" + "---|" * len(ACCURACY_HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in report["accuracy"]]
    lines += ["", "Sources: " + ", ".join(f"`{v}`" for v in report["sources"].values()) + ".", ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (the report is then text only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(report: dict, path: Path) -> bool:
    d = report.get("meta_step")
    if not d:
        return False
    plt = pyplot()
    if plt is None:
        return False
    configs = d["configs"]
    names = list(configs[0]["variants"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(configs))],
               [c["tasks"] / c["variants"][name]["seconds"] for c in configs], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
    ax.set_xticklabels([f"T={c['tasks']}\nK={c['inner_steps']} CG={c['cg_iters']}" for c in configs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tasks / s (log)")
    ax.set_title(f"iMAML meta-step, 5-way 1-shot: {report['machine']}, {d['meta']['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_ops(ops: Optional[dict], machine: str, path: Path) -> bool:
    """The fused ops' roofline: the minimum traffic each variant moves per second, against T, beside the
    copy bandwidth measured in the same run. A baseline moving the same useful bytes in more time
    sits lower; none can sit above the copy line unless the working set fits in cache."""
    if not ops:
        return False
    plt = pyplot()
    if plt is None:
        return False
    copy = ops["meta"]["copy"]["gbs"]
    sections = (("prox", "fused prox step (momentum 0)", lambda r: r.get("momentum", 0.0) == 0.0),
                ("cg_iteration", "one CG iteration's vector work", lambda r: True))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (key, title, keep) in zip(axes, sections):
        rows = sorted((r for r in ops.get(key, []) if keep(r)), key=lambda r: r["tasks"])
        names = [n for n in rows[0]["variants"]] if rows else []
        for name in names:
            pts = [(r["tasks"], r["ours_min_bytes"] / (r["variants"][name]["median_ms"] * 1e-3) / 1e9) for r in rows
                   if r["variants"].get(name, {}).get("median_ms")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name.startswith("ours") else 1.2)
        ax.axhline(copy, color="black", linestyle="--", label=f"copy {copy:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tasks T")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("minimum traffic / time (GB/s, log)")
    fig.suptitle(f"imaml_ext ops against copy bandwidth: {machine}, {ops['meta']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", action="append", help="e.g. cpu-2cores or NVIDIA-H200 (default: every one)")
    args = p.parse_args(argv)
    for machine in args.machine or machines():
        report = gather(machine)
        if report is None:
            raise SystemExit(f"--machine {machine}: no result files for it in {RESULTS}; have {', '.join(machines())}")
        base = RESULTS / f"{machine}-{report['date']}"
        png = plot(report, base.with_suffix(".png"))
        ops_png = plot_ops(report.pop("ops"), machine, base.parent / f"{base.name}-ops.png")
        accuracy_png = plot_accuracy(report.pop("accuracy_entries"), machine,
                                     base.parent / f"{base.name}-accuracy.png")
        report.pop("meta_step")
        base.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        base.with_suffix(".md").write_text(render(report))
        print(render(report))
        print(f"wrote {base}.json, .md" + (", .png" if png else "") + (f", {base.name}-ops.png" if ops_png else "")
              + (f", {base.name}-accuracy.png" if accuracy_png else ""))


if __name__ == "__main__":
    main()
