"""The iMAML paper's Omniglot table, reproduced: runs (or resumes) the presets of `imaml-train`
and writes benchmarks/results/accuracy-<machine>-<date>.{json,md,png}: one row per setting and
configuration, its runs of several --seed values together: under our protocol and the iMAML
authors' (docs/accuracy-protocol.md), each found in results.json or evaluations.jsonl, the
meta-test accuracy's mean and sample standard deviation over the seeds (one seed: its figure
± its 95 % interval over the test tasks), the same adaptation from the random initialisation,
the budget, beside the paper's figure (iMAML-GD, Table 3) and Betty's README figure for the
same setting; each seed's figures in the JSON ("seeds") and under the table. benchmarks/report.py
gathers the file into the machine's report.

    python benchmarks/reproduce.py                                   # the four Omniglot presets
    python benchmarks/reproduce.py --presets omniglot-5w1s --time_budget 540 -- --device cuda
    python benchmarks/reproduce.py --collect runs/repro-5w1s-cpu runs/repro-5w1s-cpu-seed1  # no training

Each preset runs in <runs>/<preset> (default runs/reproduce/<preset>); a run that stopped
(--time_budget, a signal) is resumed, bit for bit, by the same command. A run not finished
yet is listed with the meta-steps it has done and no accuracy. Options after `--` go to
imaml-train (e.g. `-- --hidden_size 32 --steps 3000`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from imaml_ext.training.config import ADDED_OPTION_DEFAULTS, EVALUATION_KEYS, RUNTIME_KEYS  # noqa: E402
from imaml_ext.training.errors import RunError  # noqa: E402
from imaml_ext.training.presets import BETTY_ACCURACY, PAPER_ACCURACY, PRESETS  # noqa: E402

# the paper's Omniglot table; the Mini-ImageNet presets need data that is not freely redistributable
OMNIGLOT_PRESETS = [name for name in PRESETS if name.startswith("omniglot-")]
from imaml_ext.training.run_folder import read_json_lines  # noqa: E402
from report import ACCURACY_HEADER, accuracy_rows, per_seed_lines, plot_accuracy  # noqa: E402  (benchmarks/report.py)

RESULTS = ROOT / "benchmarks" / "results"
# The settings that say how a run differs from the paper's, shown beside each entry.
SETTINGS = ("hidden_size", "inner_steps", "base_lr", "lam", "cg_iterations", "cg_damping", "lam_damping",
            "meta_batch_size", "meta_lr", "scheduler", "query")
# What a run's config.json holds beside its setting and configuration: the seed (what a row averages
# over), the final evaluation's options (each protocol is looked up by its query count and lambda
# instead) and what only the log and the validation curve read.
NOT_THE_SETTING = ("seed", *RUNTIME_KEYS, *EVALUATION_KEYS, "log_every", "checkpoint_every", "valid_every",
                   "valid_tasks")


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
    """One run folder (finished or not): its configuration, progress, wall time and each protocol's
    figure wherever it was measured (``ours`` and ``authors``, None where it was not)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config is None:
        raise CollectError(f"--collect {folder}: there is no config.json; is it an imaml-train run folder?")
    results = _read_json(folder / "results.json")
    rows = read_json_lines(folder / "metrics.jsonl")
    finished = results is not None and "test" in results and results.get("steps") == config["steps"]
    steps_done = results["steps"] if finished else max(
        (r["step"] for r in rows if r.get("split") == "train"), default=0)
    evaluations = read_json_lines(folder / "evaluations.jsonl")
    return {
        "run": str(folder), "seed": config.get("seed"), "config": config, "finished": finished,
        "steps_done": steps_done, "device": results["machine"] if finished else config.get("device"),
        "date": results["date"] if finished else None,
        "ours": find_protocol(config, results if finished else None, evaluations, training_lam(config),
                              config["query"]),
        "authors": find_protocol(config, results if finished else None, evaluations, 0.0, config["shots"]),
        "curve": [[r["step"], 100 * r["accuracy"]] for r in rows if r.get("split") == "validation"],
        **_wall_seconds(folder, config, rows),
    }


def find_protocol(config: dict, results: Optional[dict], evaluations: List[dict], eval_lam: Optional[float],
                  query: int) -> Optional[dict]:
    """The final checkpoint's test with ``query`` images per class and test-time lambda ``eval_lam``
    (docs/accuracy-protocol.md): the run's own final evaluation (results.json) if it was that one,
    else the last such --evaluate in evaluations.jsonl."""
    measured = []
    if results is not None:
        measured.append(("results.json", results))
    measured += [("evaluations.jsonl", row) for row in reversed(evaluations)
                 if row.get("step") == config["steps"] and "test" in row]
    for source, m in measured:
        # Written before eval_lam / eval_query were recorded: tested with --lam and --query (as
        # --evaluate still does when not given them).
        lam = m.get("eval_lam") if m.get("eval_lam") is not None else training_lam(config)
        images = m.get("eval_query") or config["query"]
        if lam == eval_lam and images == query:
            return {"accuracy": m["test"]["accuracy"], "ci95": m["test"]["ci95"], "tasks": m["test"]["tasks"],
                    "baseline": m.get("baseline"), "query": query, "eval_lam": eval_lam, "source": source}
    return None


def training_lam(config: dict) -> float:
    """Our protocol's test-time lambda: training's (learner.evaluation_lam without --eval_lam)."""
    return float(config["lam"]) if config.get("algo", "imaml") == "imaml" else 0.0


def setting_key(config: dict) -> str:
    """What makes runs the same setting and configuration: config.json less NOT_THE_SETTING."""
    full = {**ADDED_OPTION_DEFAULTS, **config}
    return json.dumps({k: v for k, v in sorted(full.items()) if k not in NOT_THE_SETTING})


def group(runs: List[dict]) -> List[dict]:
    """One entry of the accuracy file per setting: the runs of collect() that differ only in their
    seed (and NOT_THE_SETTING), in the order first given; two runs of one seed are refused."""
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        same = groups.setdefault(setting_key(run["config"]), [])
        twin = next((r for r in same if r["seed"] == run["seed"]), None)
        if twin is not None:
            raise CollectError(f"--collect: {twin['run']} and {run['run']} are the same setting with the same "
                               f"--seed {run['seed']}; collect one of them")
        same.append(run)
    return [_entry(sorted(same, key=lambda r: r["seed"])) for same in groups.values()]


def _entry(runs: List[dict]) -> dict:
    config = runs[0]["config"]
    ways, shots = config["ways"], config["shots"]
    setting = _setting_name(ways, shots)
    presets = {r["config"].get("preset") for r in runs}
    finished = [r for r in runs if r["finished"]]
    keys = ("seed", "run", "finished", "steps_done", "device", "date", "wall_seconds", "wall_time_source", "ours",
            "authors", "curve")
    return {
        "task": config.get("task", "omniglot"), "preset": presets.pop() if len(presets) == 1 else None,
        "ways": ways, "shots": shots, "steps": config["steps"], "settings": {k: config.get(k) for k in SETTINGS},
        "paper": PAPER_ACCURACY.get(setting), "betty": BETTY_ACCURACY.get(setting),
        "seeds_run": len(runs), "seeds_finished": len(finished),
        "wall_seconds_per_seed": statistics.mean(r["wall_seconds"] for r in finished) if finished else None,
        "ours": summarise([r["ours"] for r in runs], training_lam(config), config["query"]),
        "authors": summarise([r["authors"] for r in runs], 0.0, shots),
        "seeds": [{k: r.get(k) for k in keys} for r in runs],
    }


def summarise(found: List[Optional[dict]], eval_lam: Optional[float], query: int) -> dict:
    """One protocol over a setting's seeds: the mean and sample standard deviation of the seeds that
    have it, with how many of how many; with one seed, its 95 % interval over the test tasks."""
    have = [f for f in found if f is not None]
    out = {"query": query, "eval_lam": eval_lam, "seeds": len(have), "of": len(found),
           "tasks": sorted({f["tasks"] for f in have})}
    out.update(_spread([f["accuracy"] for f in have], [f["ci95"] for f in have]))
    baselines = [f["baseline"] for f in have if f.get("baseline")]
    out["baseline"] = {"seeds": len(baselines), **_spread([b["accuracy"] for b in baselines],
                                                          [b["ci95"] for b in baselines])}
    return out


def _spread(values: List[float], ci95: List[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "ci95": None}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "ci95": ci95[0] if len(values) == 1 else None}


def write(runs: List[dict], results_dir: Path, machine: Optional[str] = None) -> List[Path]:
    """accuracy-<machine>-<date>.{json,md,png} for each machine the runs of collect() ran on, one entry
    per setting (group()); returns the JSON paths."""
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    by_machine: Dict[str, List[dict]] = {}
    for r in runs:
        tag = machine or (machine_tag(r["device"]) if r["finished"] else _host_tag(r["device"]))
        by_machine.setdefault(tag, []).append(r)
    files = []
    for tag, same in by_machine.items():
        devices = sorted({r["device"] for r in same if r["device"]})
        torch_versions = sorted({d.split("torch ")[-1] for d in devices if "torch " in d})
        data = {"meta": {"machine": tag, "date": max((r["date"] for r in same if r["date"]), default=today),
                         "device_name": ", ".join(devices), "torch": ", ".join(torch_versions) or "unknown"},
                "entries": group(same)}
        files.append(data)
    written = []
    results_dir.mkdir(parents=True, exist_ok=True)
    for data in files:
        path = results_dir / f"accuracy-{data['meta']['machine']}-{data['meta']['date']}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.with_suffix(".md").write_text(render(data))
        plot_accuracy(data["entries"], data["meta"]["machine"], path.with_suffix(".png"))
        written.append(path)
    return written


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# Omniglot meta-test accuracy: {meta['machine']}, {meta['date']}", "",
             f"Device: {meta['device_name'] or 'unknown'}. Written by `benchmarks/reproduce.py` from the run folders "
             "below; the paper's figures are iMAML-GD in its Table 3, Betty's from its README. A row is one setting "
             "and configuration; over several seeds a figure is the mean ± the sample standard deviation over the "
             "seeds, for one seed its run's figure ± the 95 % interval over its test tasks. Ours tests with the "
             "run's query images per class and its training λ, the iMAML authors' protocol with as many query "
             "images as shots and λ 0 (docs/accuracy-protocol.md).", "",
             "| " + " | ".join(ACCURACY_HEADER) + " |", "|" + "---|" * len(ACCURACY_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in accuracy_rows(data["entries"])]
    lines += ["", "Per seed (95 % interval over the test tasks; random initialisation in brackets):", ""]
    lines += per_seed_lines(data["entries"]) + [""]
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
        runs = [collect(f) for f in folders]
        if not runs:
            raise CollectError("no run folder to collect")
        written = write(runs, Path(args.results), args.machine)
    except (CollectError, RunError) as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path.with_suffix(".md").read_text())
        png = path.with_suffix(".png")
        print(f"wrote {path}, .md" + (", .png" if png.exists() else " (no curve to plot yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
