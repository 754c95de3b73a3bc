"""One benchmark, two source trees, alternated: is a change's speed the speed before it?

    python benchmarks/compare_trees.py --before /path/to/old-checkout --after . --rounds 4 \
        --out benchmarks/results/compare-<what>.json -- bench_meta_step.py --configs 16x5x3 --variants ours_batched

Each round runs the benchmark once in each tree (``PYTHONPATH`` and working folder that tree, the
order swapped every round: before/after, after/before, ...), so that load and clock drift hit both
alike; the figure per tree is the median over rounds of each run's median. The trees' imaml_ext must
be built (the C++ extension in place). A benchmark writes JSON with "rows" (bench_dropin.py) or
"configs" (bench_meta_step.py); each (configuration, variant) gets a row: both medians and after /
before. A ratio within the rounds' spread is no change."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


def _config_name(entry: dict) -> str:
    parts = [f"T {entry['tasks']}", f"{entry['inner_steps']} inner"]
    if "cg_iters" in entry:
        parts.append(f"{entry['cg_iters']} CG")
    return ", ".join(parts)


def figures(result: dict, statistic: str = "median") -> Dict[Tuple[str, str], float]:
    """(configuration, variant) -> its median (or min) ms, from either benchmark's JSON."""
    entries = result.get("rows") or result.get("configs") or []
    field = f"{statistic}_ms"
    return {(_config_name(e), variant): v[field] for e in entries for variant, v in e["variants"].items()
            if isinstance(v, dict) and field in v}


class BenchmarkFailed(Exception):
    """A benchmark run that exited with an error or wrote no figures: printed as one line."""


def run_once(tree: Path, script: str, args: Sequence[str], python: str, statistic: str) -> Dict[Tuple[str, str], float]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([python, str(tree / "benchmarks" / script), *args, "--out", str(out)], cwd=tree,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise BenchmarkFailed(f"{script} in {tree} exited with {done.returncode}: {last}")
        try:
            found = figures(json.loads(out.read_text()), statistic)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BenchmarkFailed(f"{script} in {tree} wrote no readable result JSON to --out "
                                  f"({type(error).__name__}: {error})") from None
        if not found:
            raise BenchmarkFailed(f"{script} in {tree} wrote no {statistic}_ms figures (its JSON has no "
                                  '"rows" or "configs" with variants)')
        return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the source tree before the change")
    parser.add_argument("--after", type=Path, required=True, help="the source tree with it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--statistic", default="median", choices=("median", "min"),
                        help="each run's figure: the median of its samples, or the fastest (steadier beside other load)")
    parser.add_argument("--out", type=Path, required=True, help="JSON path; a .md table is written beside it")
    parser.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- SCRIPT [its arguments] (in benchmarks/)")
    args = parser.parse_args(argv)
    bench = [a for a in args.benchmark if a != "--"]
    if not bench:
        parser.error("name the benchmark after --, e.g. -- bench_meta_step.py --configs 16x5x3")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    for written in (args.out, args.out.with_suffix(".md")):  # a result is never overwritten
        if written.exists():
            parser.error(f"--out {args.out}: {written} exists; name another file or remove it")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "benchmarks" / bench[0]).is_file():
            parser.error(f"--{name}: {tree} has no benchmarks/{bench[0]}")
    samples: Dict[str, List[Dict[Tuple[str, str], float]]] = {"before": [], "after": []}
    started = datetime.datetime.now(datetime.timezone.utc)
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            try:
                samples[name].append(run_once(trees[name], bench[0], bench[1:], args.python, args.statistic))
            except BenchmarkFailed as error:
                print(f"compare_trees.py: error: --{name}: {error}", file=sys.stderr)
                return 1
            print(f"round {r + 1}, {name}: " + ", ".join(f"{k[0]} {k[1]} {v:.0f} ms" for k, v in samples[name][-1].items()),
                  flush=True)
    keys = sorted(set.intersection(*(set(s) for runs in samples.values() for s in runs)))
    if not keys:
        named = {name: sorted({k for s in runs for k in s}) for name, runs in samples.items()}
        print(f"compare_trees.py: error: no (configuration, variant) ran in every round of both trees; "
              f"before: {named['before']}, after: {named['after']}", file=sys.stderr)
        return 1
    rows = []
    for key in keys:
        per = {name: [s[key] for s in runs] for name, runs in samples.items()}
        before, after = statistics.median(per["before"]), statistics.median(per["after"])
        rows.append({"config": key[0], "variant": key[1], "before_ms": per["before"], "after_ms": per["after"],
                     "before_median_ms": before, "after_median_ms": after, "after_over_before": after / before,
                     "paired_after_over_before": [a / b for a, b in zip(per["after"], per["before"])]})
    meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "benchmark": bench, "rounds": args.rounds, "statistic": args.statistic,
            "trees": {k: str(v) for k, v in trees.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {' '.join(bench)}: before / after, alternated ({meta['date']})", "",
             f"{meta['machine']}, {meta['cores']} cores; {args.rounds} rounds, each tree once per round, order swapped "
             f"every round; medians over rounds of each run's {args.statistic}; the last column, each round's after / "
             "before (the pairs ran one after the other).", "",
             "| configuration | variant | before ms | after ms | after / before | each round, before | each round, after "
             "| each round, after / before |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['variant']} | {row['before_median_ms']:.0f} | {row['after_median_ms']:.0f} "
                     f"| {row['after_over_before']:.3f} | {', '.join(f'{v:.0f}' for v in row['before_ms'])} "
                     f"| {', '.join(f'{v:.0f}' for v in row['after_ms'])} "
                     f"| {', '.join(f'{a / b:.3f}' for a, b in zip(row['after_ms'], row['before_ms']))} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
