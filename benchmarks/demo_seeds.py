"""The demo's figure as a sample, not one run: runs ``imaml-train`` with the demo's options for
several seeds (each in its own run folder, skipped when it already has results) and writes
benchmarks/results/demo-seeds-<machine>-<date>.{json,md}: each seed's meta-test accuracy and
its random-initialisation baseline, and their mean and spread over the seeds.

    python benchmarks/demo_seeds.py --seeds 0 1 2 -- --hidden_size 32 ...   # what make demo-seeds runs
    python benchmarks/demo_seeds.py --collect runs/demo-seed0 runs/demo-seed1 runs/demo-seed2

The spread is the sample standard deviation over the seeds; each seed's own interval (95 %,
over its test tasks) is in the JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo_seeds.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to train (default: 0 1 2)")
    p.add_argument("--runs", default="runs/demo-seeds", help="folder of the seeds' run folders (seed<N>)")
    p.add_argument("--collect", nargs="+", metavar="RUN_FOLDER", help="finished run folders: nothing trained")
    p.add_argument("--out", default=None, help="results path without suffix (default: benchmarks/results/...)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then imaml-train's options")
    return p


def train(seeds: Sequence[int], runs: Path, options: List[str]) -> List[Path]:
    folders = []
    for seed in seeds:
        folder = runs / f"seed{seed}"
        if not (folder / "results.json").exists():
            command = [sys.executable, "-m", "imaml_ext.train", *options, "--seed", str(seed), "--out", str(folder)]
            if folder.exists():
                command.append("--resume")
            subprocess.run(command, check=True)
        folders.append(folder)
    return folders


def read_run(folder: Path) -> dict:
    for name in ("config.json", "results.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"demo_seeds.py: {folder} has no {name}; is it a finished imaml-train run folder?")
    results = json.loads((folder / "results.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    if "test" not in results:
        raise SystemExit(f"demo_seeds.py: {folder}/results.json has no test accuracy (was --eval_tasks 0?)")
    return {"seed": config["seed"], "out": str(folder), "test": results["test"], "baseline": results.get("baseline"),
            "config": config}


def summary(runs: List[dict]) -> dict:
    def stats(values):
        spread = statistics.stdev(values) if len(values) > 1 else math.nan
        return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values)}

    settings = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
    differ = sorted(k for r in runs for k, v in r["config"].items() if k != "seed" and settings.get(k) != v)
    if differ:
        raise SystemExit(f"demo_seeds.py: the runs differ in more than their seed: {', '.join(sorted(set(differ)))}")
    out = {"seeds": [{k: r[k] for k in ("seed", "out", "test", "baseline")} for r in runs],
           "test": stats([r["test"]["accuracy"] for r in runs]), "settings": settings}
    if all(r["baseline"] for r in runs):
        out["baseline"] = stats([r["baseline"]["accuracy"] for r in runs])
    return out


def _cell(entry: Optional[dict]) -> str:
    return "—" if not entry else f"{entry['accuracy']:.2f} ± {entry['ci95']:.2f} %"


def markdown(result: dict) -> str:
    lines = [f"# The demo over {len(result['seeds'])} seeds: {result['machine']}, {result['date']}", "",
             f"Written by `benchmarks/demo_seeds.py`. {result['cpu']}, torch {result['torch']}.", "",
             "| seed | meta-test accuracy (95 % CI over its tasks) | random initialisation | run folder |",
             "|---|---|---|---|"]
    for run in result["seeds"]:
        lines.append(f"| {run['seed']} | {_cell(run['test'])} ({run['test']['tasks']} tasks) | "
                     f"{_cell(run['baseline'])} | `{run['out']}` |")
    test, base = result["test"], result.get("baseline")
    against = f", against {base['mean']:.2f} % (std {base['std']:.2f}) from the random initialisation" if base else ""
    lines += ["", f"**Mean over the seeds: {test['mean']:.2f} % (sample std {test['std']:.2f}; "
                  f"{test['min']:.2f} to {test['max']:.2f}){against}.**", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    options = [a for a in args.train_args if a != "--"]
    if args.collect and (options or args.seeds is not None):
        raise SystemExit("demo_seeds.py: --collect reads finished run folders; it takes no --seeds or imaml-train "
                         "options")
    folders = [Path(f) for f in args.collect] if args.collect else train(args.seeds or [0, 1, 2], Path(args.runs),
                                                                          options)
    runs = [read_run(folder) for folder in folders]
    import torch
    from _timing import run_metadata  # benchmarks/_timing.py

    meta = run_metadata(torch.device(runs[0]["config"].get("device", "cpu")))
    result = {**summary(runs), "machine": meta["machine"], "date": meta["date"], "torch": meta["torch"],
              "cpu": meta["device_name"]}
    out = Path(args.out) if args.out else RESULTS / f"demo-seeds-omniglot-5w1s-{meta['machine']}-{meta['date']}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
