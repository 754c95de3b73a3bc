"""The iMAML paper's Omniglot table, reproduced: runs (or resumes) the presets of `imaml-train`
and writes benchmarks/results/accuracy-<machine>-<date>.{json,md,png}: per run its setting,
meta-steps, meta-test accuracy with its 95 % interval over the test tasks, the same
adaptation from the random initialisation, wall time and device, beside the paper's figure
(iMAML-GD, Table 3) and Betty's README figure for the same setting. benchmarks/report.py
gathers the file into the machine's report.

    python benchmarks/reproduce.py                                   # the four Omniglot presets
    python benchmarks/reproduce.py --presets omniglot-5w1s --time_budget 540 -- --device cuda
    python benchmarks/reproduce.py --collect runs/repro-5w1s-cpu     # finished runs, no training

Each preset runs in <runs>/<preset> (default runs/reproduce/<preset>); a run that stopped
(--time_budget, a signal) is resumed, bit for bit, by the same command. A run not finished
yet is listed with the meta-steps it has done and no accuracy. Options after `--` go to
imaml-train (e.g. `-- --hidden_size 32 --steps 3000`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from imaml_ext.training.errors import RunError  # noqa: E402
from imaml_ext.training.presets import BETTY_ACCURACY, PAPER_ACCURACY, PRESETS  # noqa: E402

# the paper's Omniglot table; the Mini-ImageNet presets need data that is not freely redistributable
OMNIGLOT_PRESETS = [name for name in PRESETS if name.startswith("omniglot-")]
from imaml_ext.training.run_folder import read_json_lines  # noqa: E402
from report import ACCURACY_HEADER, accuracy_rows, plot_accuracy  # noqa: E402  (benchmarks/report.py)

RESULTS = ROOT / "benchmarks" / "results"
# The settings that say how a run differs from the paper's, shown beside each entry.
SETTINGS = ("hidden_size", "inner_steps", "base_lr", "lam", "cg_iterations", "cg_damping", "lam_damping",
            "meta_batch_size", "meta_lr", "scheduler", "query", "eval_lam")


class CollectError(Exception):
    """A run folder that cannot be read: printed as one line."""


def _read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CollectError(f"{path} is not JSON ({error})") from None


def _setting_name(ways: int, shots: int) -> str:
    return f"omniglot-{ways}w{shots}s"


def machine_tag(machine: str) -> str:
    """A file-name tag for results.json's machine: 'CPU (x86_64, 2 cores), torch ...' -> cpu-2cores,
    'NVIDIA H200, torch ...' -> NVIDIA-H200 (as the benchmarks name machines)."""
    cores = re.match(r"CPU \(.*?(\d+) cores\)", machine)
    if cores:
        return f"cpu-{cores[1]}cores"
    name = machine.split(", torch")[0]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _host_tag(device: Optional[str]) -> str:
    """The tag of this machine's ``device`` (an unfinished run has no results.json naming its machine)."""
    import torch
    from _timing import machine_name  # benchmarks/_timing.py

    target = torch.device(device or "cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        return "gpu"
    return machine_name(target)


def _wall_seconds(folder: Path, config: dict, rows: List[dict]) -> Dict[str, object]:
    """The run's wall time: the sum of its invocations (invocations.jsonl), or, for a run from
    before that file existed, the meta-steps' time from the metrics' tasks/s (without set-up,
    validations and evaluation)."""
    invocations = read_json_lines(folder / "invocations.jsonl")
    if invocations:
        return {"wall_seconds": sum(i["seconds"] for i in invocations), "wall_time_source": "invocations.jsonl",
                "invocations": len(invocations)}
    seconds, previous = 0.0, 0
    for r in rows:
        if r.get("split") == "train" and r.get("tasks_per_s"):
            seconds += (r["step"] - previous) * config["meta_batch_size"] / r["tasks_per_s"]
            previous = r["step"]
    return {"wall_seconds": seconds, "wall_time_source": "metrics.jsonl (meta-steps only)"}


def collect(folder: Path) -> dict:
    """One entry of the accuracy file from a run folder (finished or not)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config is None:
        raise CollectError(f"--collect {folder}: there is no config.json; is it an imaml-train run folder?")
    results = _read_json(folder / "results.json")
    rows = read_json_lines(folder / "metrics.jsonl")
    steps_done = max((r["step"] for r in rows if r.get("split") == "train"), default=0)
    ways, shots = config["ways"], config["shots"]
    setting = _setting_name(ways, shots)
    entry = {
        "run": str(folder),
        "task": config.get("task", "omniglot"),
        "preset": config.get("preset"),
        "ways": ways,
        "shots": shots,
        "steps": config["steps"],
        "finished": results is not None and "test" in results and results.get("steps") == config["steps"],
        "steps_done": steps_done,
        "settings": {k: config.get(k) for k in SETTINGS},
        "paper": PAPER_ACCURACY.get(setting),
        "betty": BETTY_ACCURACY.get(setting),
        "curve": [[r["step"], 100 * r["accuracy"]] for r in rows if r.get("split") == "validation"],
        **_wall_seconds(folder, config, rows),
    }
    if entry["finished"]:
        entry["settings"]["eval_lam"] = results.get("eval_lam", config.get("lam"))
        entry.update(
            steps_done=results["steps"], accuracy=results["test"]["accuracy"], ci95=results["test"]["ci95"],
            tasks=results["test"]["tasks"], baseline=results.get("baseline"), device=results["machine"],
            date=results["date"],
        )
    else:
        entry.update(accuracy=None, ci95=None, tasks=None, baseline=None, device=config.get("device"), date=None)
    entry["authors_protocol"] = authors_protocol(folder, shots, config["steps"])
    return entry


def authors_protocol(folder: Path, shots: int, steps: int) -> Optional[dict]:
    """The last --evaluate of the final checkpoint as the iMAML authors' measure_accuracy.py measures
    (docs/accuracy-protocol.md): as many query images per class as shots, test-time lambda 0."""
    found = None
    for row in read_json_lines(folder / "evaluations.jsonl"):
        query = row.get("eval_query", row.get("query"))
        if row.get("step") == steps and row.get("eval_lam") == 0 and query == shots and "test" in row:
            found = {"accuracy": row["test"]["accuracy"], "ci95": row["test"]["ci95"], "tasks": row["test"]["tasks"],
                     "baseline": row.get("baseline"), "query": query, "eval_lam": 0.0}
    return found


def write(entries: List[dict], results_dir: Path, machine: Optional[str] = None) -> List[Path]:
    """accuracy-<machine>-<date>.{json,md,png} for each machine the entries ran on; returns the JSON paths."""
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    groups: Dict[str, List[dict]] = {}
    for e in entries:
        tag = machine or (machine_tag(e["device"]) if e["finished"] else _host_tag(e["device"]))
        groups.setdefault(tag, []).append(e)
    written = []
    results_dir.mkdir(parents=True, exist_ok=True)
    for tag, group in groups.items():
        date = max((e["date"] for e in group if e["date"]), default=today)
        devices = sorted({e["device"] for e in group if e["device"]})
        torch_versions = sorted({d.split("torch ")[-1] for d in devices if "torch " in d})
        data = {"meta": {"machine": tag, "date": date, "device_name": ", ".join(devices),
                         "torch": ", ".join(torch_versions) or "unknown"},
                "entries": group}
        path = results_dir / f"accuracy-{tag}-{date}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.with_suffix(".md").write_text(render(data))
        plot_accuracy(group, tag, path.with_suffix(".png"))
        written.append(path)
    return written


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# Omniglot meta-test accuracy: {meta['machine']}, {meta['date']}", "",
             f"Device: {meta['device_name'] or 'unknown'}. Written by `benchmarks/reproduce.py` from the run folders "
             "below; the paper's figures are iMAML-GD in its Table 3, Betty's from its README.", "",
             "| " + " | ".join(ACCURACY_HEADER) + " |", "|" + "---|" * len(ACCURACY_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in accuracy_rows(data["entries"])]
    lines += ["", "Runs: " + ", ".join(f"`{e['run']}`" for e in data["entries"]) + ".", ""]
    return "\n".join(lines)


def run_preset(preset: str, folder: Path, train_args: Sequence[str], time_budget: Optional[float]) -> int:
    """Runs or resumes one preset in ``folder`` with imaml-train; a finished run is left as it is."""
    results = _read_json(folder / "results.json")
    config = _read_json(folder / "config.json")
    if results is not None and config is not None and results.get("steps") == config.get("steps"):
        print(f"{preset}: finished in {folder}")
        return 0
    command = [sys.executable, "-m", "imaml_ext.train", "--preset", preset, "--out", str(folder), *train_args]
    if time_budget is not None:
        command += ["--time_budget", str(time_budget), "--resume"]  # --resume starts the run too
    elif (folder / "checkpoint.pt").exists():
        command += ["--resume"]
    print(" ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def build_parser() -> argparse.ArgumentParser:
    """This script's own options: those after ``--`` go to imaml-train."""
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(OMNIGLOT_PRESETS),
                   help="comma-separated presets to run or resume (default: the Omniglot table's four)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "reproduce"), help="folder of the presets' run folders")
    p.add_argument("--time_budget", type=float, default=None,
                   help="seconds per preset in this invocation (imaml-train --time_budget); run again to go on")
    p.add_argument("--collect", nargs="+", metavar="RUN_FOLDER", default=None,
                   help="only collect these run folders (finished or not) into the accuracy file; trains nothing")
    p.add_argument("--results", default=str(RESULTS), help="where the accuracy file is written")
    p.add_argument("--machine", default=None, help="the file's machine tag (default: from each run's results)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.collect is not None:
            folders = [Path(f) for f in args.collect]
        else:
            presets = [name.strip() for name in args.presets.split(",") if name.strip()]
            unknown = [name for name in presets if name not in PRESETS]
            if unknown:
                p.error(f"--presets: {unknown[0]!r} is not one of {', '.join(PRESETS)}")
            if args.time_budget is not None and not args.time_budget > 0:
                p.error(f"--time_budget must be > 0; got {args.time_budget:g}")
            folders = []
            for preset in presets:
                folder = Path(args.runs) / preset
                if run_preset(preset, folder, train_args, args.time_budget) != 0:
                    print(f"reproduce.py: {preset} did not complete its invocation; collecting what there is",
                          file=sys.stderr)
                if (folder / "config.json").exists():
                    folders.append(folder)
        entries = [collect(f) for f in folders]
    except (CollectError, RunError) as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2
    if not entries:
        print("reproduce.py: error: no run folder to collect", file=sys.stderr)
        return 2
    for path in write(entries, Path(args.results), args.machine):
        print(path.with_suffix(".md").read_text())
        png = path.with_suffix(".png")
        print(f"wrote {path}, .md" + (", .png" if png.exists() else " (no curve to plot yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
