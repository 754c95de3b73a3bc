#!/usr/bin/env python
"""Runs Betty 0.1.1's own self-contained programs on imaml_ext and on Betty, side by side.

Each program is run twice, unchanged but for the import (``betty`` -> ``imaml_ext`` in its
``from betty...`` / ``import betty`` lines): once with imaml_ext, once with Betty itself
(installed into a folder of its own that goes on PYTHONPATH for that run only). Both runs get
the same numpy and torch seeds, so they train on the same random data. For each run: whether it
completes, its last logged loss of the problem named "outer", the learned parameters of the
program's ``parent`` problem, and the wall time. Programs that need data which cannot be fetched
offline are listed with the reason, not run.

Not part of CI: it needs Betty's sdist and package from PyPI.

    pip download --no-deps --no-binary :all: betty-ml==0.1.1 -d /tmp/betty_sdist
    pip install --target /tmp/betty_pkg --no-deps betty-ml==0.1.1
    # examples/logistic_regression_hpo imports sklearn (train_test_split); without it those
    # programs are reported as needing it. A folder of extra packages for both runs:
    pip install --target /tmp/compat_deps --no-deps scikit-learn scipy joblib threadpoolctl narwhals
    python scripts/betty_compat.py --sdist /tmp/betty_sdist/betty-ml-0.1.1.tar.gz \\
        --betty /tmp/betty_pkg --deps /tmp/compat_deps --out benchmarks/results/betty-compat-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, path in the sdist, text replacements beyond the import: the program's own commented-out
# alternatives, enabled to run its other hypergradient methods)
PROGRAMS = [
    ("test_install", "betty/test_install.py", []),
    ("hpo_implicit_cg", "examples/logistic_regression_hpo/logistic_regression_implicit.py", []),
    ("hpo_implicit_darts", "examples/logistic_regression_hpo/logistic_regression_implicit.py",
     [('child_config = Config(type="cg", cg_iterations=3, cg_alpha=1, unroll_steps=100)\n', ""),
      ('# child_config = Config(type="darts", unroll_steps=100)', 'child_config = Config(type="darts", unroll_steps=100)')]),
    ("hpo_implicit_neumann", "examples/logistic_regression_hpo/logistic_regression_implicit.py",
     [('child_config = Config(type="cg", cg_iterations=3, cg_alpha=1, unroll_steps=100)\n', ""),
      ('# child_config = Config(type="neumann", neumann_iterations=3, unroll_steps=100)',
       'child_config = Config(type="neumann", neumann_iterations=3, unroll_steps=100)')]),
    ("hpo_iterative", "examples/logistic_regression_hpo/logistic_regression.py", []),
]
# Left out: the same file as a program above (checked at run time).
SAME_AS = [("examples/logistic_regression_hpo/test.py", "betty/test_install.py")]

# Read in the sdist: what each of the other programs needs that cannot be had offline.
NEEDS_DATA = [
    ("tutorial/1_quick_start.py, 2_validation.py, 3_logging.py", "MNIST (torchvision download=True)"),
    ("tutorial/4_memory_optimization.py", "CIFAR-10 (torchvision download=True)"),
    ("examples/implicit_maml/main.py", "Omniglot (downloaded into /tmp/omniglot-data), and a GPU: its training_step "
                                       "calls .cuda()"),
    ("examples/learning_to_reweight/main.py, main_iterative.py", "MNIST / CIFAR-10 / CIFAR-100 (torchvision)"),
    ("examples/neural_architecture_search/train_search.py, train.py", "CIFAR-10 (torchvision download=True)"),
    ("examples/bert_data_reweighting/main.py", "the SST data set (pandas files) and BERT weights (transformers)"),
    ("examples/learning_by_ignoring/main.py", "Office-31 / Office-Home / VisDA / DomainNet (download=True) and "
                                              "ImageNet-pretrained ResNet weights"),
]

RUNNER = """
import runpy, sys, numpy, torch
numpy.random.seed({seed}); torch.manual_seed({seed})
scope = runpy.run_path({path!r}, run_name="__main__")
parent = scope.get("parent")
if parent is not None:
    values = torch.cat([p.detach().reshape(-1).cpu() for p in parent.module.parameters()])
    print("LEARNED " + " ".join(f"{{v:.4f}}" for v in values.tolist()))
"""

LOSS = re.compile(r'\[Problem "outer"\].* loss: ([-+0-9.eE]+|nan|inf)')


def swap_import(text: str) -> str:
    """``betty`` -> ``imaml_ext`` in the import lines only."""
    return re.sub(r"^(\s*)(from|import)\s+betty\b", r"\1\2 imaml_ext", text, flags=re.M)


def run(label: str, source: str, backend: str, args, workdir: Path) -> dict:
    folder = workdir / f"{label}-{backend}"
    folder.mkdir()
    program = folder / "program.py"
    program.write_text(swap_import(source) if backend == "imaml_ext" else source)
    paths = [str(REPO)] if backend == "imaml_ext" else [args.betty]
    if args.deps:
        paths.append(args.deps)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER.format(seed=args.seed, path=str(program))], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        rc, out = "timeout", (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) \
            else (expired.stdout or "")
    seconds = time.perf_counter() - start
    (workdir / f"{label}-{backend}.log").write_text(out)
    losses = LOSS.findall(out)
    learned = [float(v) for line in out.splitlines() if line.startswith("LEARNED ") for v in line.split()[1:]]
    error = ""
    if rc != 0:
        lines = [line for line in out.strip().splitlines() if line.strip()]
        error = lines[-1][:160] if lines else f"exit {rc}"
    return {"rc": rc, "seconds": seconds, "loss": float(losses[-1]) if losses else None, "learned": learned,
            "error": error}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", required=True, help="betty-ml-0.1.1.tar.gz")
    parser.add_argument("--betty", required=True, help="folder Betty was installed into (pip install --target)")
    parser.add_argument("--deps", default=None, help="a folder of extra packages for both runs (sklearn)")
    parser.add_argument("--out", default=None, help="markdown report (default: stdout only)")
    parser.add_argument("--only", default=None, help="comma-separated labels to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    if not Path(args.betty, "betty").is_dir():
        parser.error(f"--betty {args.betty}: no betty/ package there; pip install --target {args.betty} --no-deps "
                     "betty-ml==0.1.1")

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="betty_compat_"))
    with tarfile.open(args.sdist) as tar:
        tar.extractall(workdir / "sdist", filter="data")
    root = next((workdir / "sdist").iterdir())
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for label, path, replacements in PROGRAMS:
        if only and label not in only:
            continue
        source = (root / path).read_text()
        for old, new in replacements:
            if old not in source:
                raise SystemExit(f"{label}: {path} no longer holds {old!r}")
            source = source.replace(old, new)
        results = {}
        for backend in ("imaml_ext", "betty"):
            results[backend] = run(label, source, backend, args, workdir)
            r = results[backend]
            print(f"{label:22s} {backend:9s} rc={r['rc']} loss={r['loss']} {r['seconds']:.1f} s {r['error']}",
                  flush=True)
        rows.append((label, path, results))

    lines = [
        f"# Betty 0.1.1's programs on imaml_ext and on Betty ({args.date})",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, torch {torch.__version__}; seed {args.seed} "
        "(numpy and torch, the same for both runs). Made by `scripts/betty_compat.py` (not part of CI). Each "
        "program is Betty's own, unchanged but for `betty` -> `imaml_ext` in its import lines; "
        "`hpo_implicit_darts` and `hpo_implicit_neumann` are `logistic_regression_implicit.py` with its own "
        "commented-out `child_config` line for that method enabled instead of cg's. The loss is the last logged "
        "loss of the problem \"outer\" (the validation loss); *learned* is the largest difference between the "
        "two runs' learned L2 weights (`parent.module`).",
        "",
        "| program | imaml_ext | loss | time (s) | Betty 0.1.1 | loss | time (s) | learned, max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, path, results in rows:
        cells = [f"`{label}` ({path})"]
        for backend in ("imaml_ext", "betty"):
            r = results[backend]
            status = "completes" if r["rc"] == 0 else f"fails: {r['error']}".replace("|", "\\|")
            loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
            cells += [status, loss, f"{r['seconds']:.1f}"]
        a, b = results["imaml_ext"]["learned"], results["betty"]["learned"]
        cells.append(f"{max(abs(x - y) for x, y in zip(a, b)):.4f}" if a and len(a) == len(b) else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where the two differ, with `type=\"cg\"` (`test_install` and `hpo_implicit_cg`), Betty's solve is "
              "not conjugate gradient (its new direction comes from the residual before the step, and with "
              "`cg_alpha` != 1 the step length and the residual use different matrices); ours is. See "
              "`docs/betty-compat.md`."]
    for copy, original in SAME_AS:
        if (root / copy).read_bytes() == (root / original).read_bytes():
            lines += ["", f"`{copy}` is byte for byte `{original}`, so it is run once."]
    lines += ["", "Not run: they need data that cannot be fetched offline.", "", "| program | needs |", "|---|---|"]
    lines += [f"| {program} | {needs} |" for program, needs in NEEDS_DATA]
    report = "\n".join(lines) + "\n"
    print(report)
    print(f"logs: {workdir}")
    if args.out:
        Path(args.out).write_text(report)
    return 0 if all(r["rc"] == 0 for _, _, results in rows for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
