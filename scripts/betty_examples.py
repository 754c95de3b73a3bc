#!/usr/bin/env python
"""Runs Betty's example programs, of its 0.1.1 release and of its current source, on Betty and on imaml_ext.

The programs are read at run time from Betty 0.1.1's sdist (a folder or the .tar.gz) and from a
checkout of Betty's source (a folder, or a bare git repository whose HEAD is extracted with
``git archive``); none is stored here. Each program's folder is copied and run twice, each run in
its own process with OMP_NUM_THREADS=1, the same seed and a timeout: once with Betty on PYTHONPATH
(0.1.1 as installed by pip, 0.2 from the source tree) and once with ``betty`` -> ``imaml_ext`` in
the import lines of the copied files. Both runs see the same changes (``scripts/betty_examples/``):
seeded synthetic data of the real shapes in place of torchvision's data sets, learn2learn's task
sets and the data files a program reads; DataLoader workers 0; ``.cuda()`` and "cuda" device
strings on the CPU; the sizes cut by the program's own flags or, where it has none, by rewriting
its iteration count. The table gives, per program, whether each run completes, the loss each
problem's ``training_step`` returned last, their largest difference, and the last line of the
error. Programs that cannot run on a CPU are listed with the reason.

``--launch torchrun:N`` runs Betty's scale-out programs instead (0.1.1's memory-optimization
tutorial with its ``distributed = True``, 0.2's distributed-training tutorial with ``--strategy
distributed``, ``zero`` and ``fsdp``; fp16 as they set it), each in N processes started by
``python -m torch.distributed.run --standalone`` (gloo on a CPU), and tables each rank's last
losses and whether the ranks ended with the same parameters (runner.py's digest of them).

Not part of CI: it needs Betty's sdist, source and package.

    pip download --no-deps --no-binary :all: betty-ml==0.1.1 -d /tmp/betty_sdist
    pip install --target .betty/betty011 --no-deps betty-ml==0.1.1
    pip install --target .betty/deps --no-deps scikit-learn joblib threadpoolctl narwhals  # HPO programs
    OMP_NUM_THREADS=1 nice -n 10 python scripts/betty_examples.py --sdist /tmp/betty_sdist/betty-ml-0.1.1.tar.gz \\
        --betty .betty/betty011 --source /path/to/betty.git --deps .betty/deps --out benchmarks/results/...md
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from betty_compat import machine, swap_import  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "betty_examples"
VERSIONS = ("0.1.1", "0.2")
SHORT = "TRAIN=200 TEST=100"  # fake data set sizes (fakes.py) for the programs whose epochs follow them

# Each program: path in its tree, its own flags, text replacements (old, new) in it where no flag
# sets its size, and the fake data sets' sizes (fakes.py).
L2RW = (["--device", "cpu", "--max_epoch", "1", "--num_meta", "100", "--batch_size", "20", "--imbalanced_factor",
         "10"], [("train_iters=15000", "train_iters=20")], SHORT)
NAS = (["--batchsz", "8", "--epochs", "1", "--layers", "3", "--init_ch", "4", "--report_freq", "10"], [], SHORT)
NAS_02 = (NAS[0] + ["--save", "."], [], SHORT)  # robust and saliency-aware NAS log into --save, which must exist
TUTORIAL = ([], [("train_iters=3000", "train_iters=100")], "")
# the ResNet-50 tutorials: one block a stage, batches of 10, 10 steps
RESNET = [("[3, 4, 6, 3]", "[1, 1, 1, 1]"), ("batch_size=100", "batch_size=10"),
          ("train_iters=10000", "train_iters=10")]
DISTRIBUTED_02 = [("batch_size=50", "batch_size=10"), *RESNET]  # 0.2's tutorial 5 also batches by 50
HPO = ([], [("train_iters=10000", "train_iters=1000")], "")
BOTH = [
    ("betty/test_install.py", [], [], ""),
    ("examples/logistic_regression_hpo/logistic_regression.py", *HPO),
    ("examples/logistic_regression_hpo/logistic_regression_implicit.py", *HPO),
    ("tutorial/1_quick_start.py", *TUTORIAL),
    ("tutorial/2_validation.py", *TUTORIAL),
    ("tutorial/3_logging.py", *TUTORIAL),
    ("tutorial/4_memory_optimization.py", [], [("distributed = True", "distributed = False"), *RESNET], ""),
    ("examples/learning_to_reweight/main.py", *L2RW),
    ("examples/neural_architecture_search/train_search.py", *NAS),
]
ONLY_011 = [
    ("examples/implicit_maml/main.py", ["--task_num", "2", "--inner_steps", "2", "--k_qry", "2"],
     [("EngineConfig(valid_step=100)", "EngineConfig(valid_step=100, train_iters=40)"),
      ('"/tmp/omniglot-data', '"omniglot-data')], ""),
    ("examples/learning_to_reweight/main_iterative.py", *L2RW),
]
ONLY_02 = [
    ("examples/logistic_regression_hpo/test.py", [], [], ""),  # as test_install: 5000 steps, a few seconds
    ("tutorial/5_distributed_training.py", ["--strategy", "default"], DISTRIBUTED_02, ""),
    ("examples/implicit_maml/main.py",
     ["--ways", "5", "--shots", "1", "--inner_steps", "2", "--meta_batch_size", "2", "--hidden_size", "8"],
     [("* 7500)", "* 10)")], ""),
    ("examples/imagenet_pruning/main.py", ["--layers", "18", "--batch_size", "4", "--epochs", "1", "--unroll_step",
                                           "2", "--log_step", "4", "--num_workers", "0"], [], "TRAIN=40 TEST=8"),
    ("examples/robust_nas/dsrna_search.py", *NAS_02),
    ("examples/saliency_aware_nas_4_level/train_search_sanas.py", *NAS_02),
]
PROGRAMS = [("0.1.1", *p) for p in BOTH + ONLY_011] + [("0.2", *p) for p in BOTH + ONLY_02]

# Betty's scale-out programs, run by --launch torchrun:N with their own strategy, fp16 as they have it:
# (version, path, flags, replacements, sizes, the strategy as the program sets it).
SCALE_OUT = [("0.1.1", "tutorial/4_memory_optimization.py", [], RESNET, "", "distributed=True")] + [
    ("0.2", "tutorial/5_distributed_training.py", ["--strategy", name], DISTRIBUTED_02, "", name)
    for name in ("distributed", "zero", "fsdp")]

# Copies of another program, checked byte for byte at run time and then run once.
SAME_AS = [("0.1.1", "examples/logistic_regression_hpo/test.py", "betty/test_install.py")]

# The others, each with what keeps it off a CPU here.
NOT_RUN = [
    ("0.1.1, 0.2", "examples/bert_data_reweighting/main.py",
     "the SST data (pandas files) and pretrained RoBERTa-large weights through `transformers`, not installed: "
     "a pretrained model's weights cannot be faked"),
    ("0.1.1, 0.2", "examples/learning_by_ignoring/main.py",
     "Office-31 / Office-Home image folders (dalib's `ImageList` reads image files listed in text files) and "
     "ImageNet-pretrained ResNet-50 weights (torchvision download)"),
    ("0.1.1, 0.2", "examples/neural_architecture_search/train.py",
     "not a Betty program (no `betty` import): it retrains the found cell from `genotype.t7`"),
    ("0.2", "examples/learning_to_reweight/analysis_noise.py",
     "not a Betty training program: it reads the checkpoints and `train_index.pt` of an earlier run, and "
     "needs matplotlib"),
    ("0.2", "examples/nas_augmented_image_captioning_3_level/train_search_IUC.py",
     "MS-COCO captions, a pickled vocabulary and ImageNet-pretrained ResNet weights"),
    ("0.2", "examples/ppo/main.py", "an empty file in Betty's tree"),
]


def label(version: str, path: str) -> str:
    """``0.2/robust_nas/dsrna_search``: the version, the example's folder (if any) and the file."""
    parts = Path(path).with_suffix("").parts
    return f"{version}/" + "/".join(parts[1:] if parts[0] in ("examples", "betty") else parts)


def programs(processes: int) -> list:
    """(label, strategy, version, path, flags, replacements, sizes) of the programs that a launch with
    ``processes`` processes runs: every runnable program in one, the scale-out programs under torchrun,
    each labelled with its strategy (``0.2/tutorial/5_distributed_training:zero``)."""
    if processes == 1:
        return [(label(v, p), "", v, p, *rest) for v, p, *rest in PROGRAMS]
    return [(f"{label(v, p)}:{strategy.split('=')[0]}", strategy, v, p, *rest)
            for v, p, *rest, strategy in SCALE_OUT]


def launcher(launch: str) -> list:
    """The command that starts runner.py: this Python, or torchrun's module with N processes on one machine."""
    found = re.fullmatch(r"python|torchrun:(\d+)", launch)
    if not found or (found.group(1) is not None and int(found.group(1)) < 2):
        raise ValueError(f"--launch {launch}: expected python or torchrun:N with N >= 2 processes")
    if found.group(1) is None:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", found.group(1)]


def select(only: str | None, labels: list[str]) -> list[str]:
    """The labels named by ``--only`` (comma-separated; a name ending in ``/`` takes its whole folder)."""
    if not only:
        return list(labels)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if not any(x == name or (name.endswith("/") and x.startswith(name))
                                                   for x in labels)]
    if unknown:
        raise ValueError(f"--only: no program {', '.join(map(repr, unknown))}; the programs are: " + ", ".join(labels))
    return [x for x in labels if any(x == name or (name.endswith("/") and x.startswith(name)) for name in wanted)]


def rewrite(text: str, imaml: bool) -> str:
    """The copied source: "cuda" device strings become "cpu" (both runs), the import (imaml_ext's run)."""
    text = re.sub(r"""(["'])cuda(:\d+)?\1""", r'\1cpu\1', text)
    return swap_import(text) if imaml else text


def unpack(source: str, into: Path) -> Path:
    """The tree at ``source``: a folder as is, a .tar.gz extracted, a bare git repository's HEAD archived."""
    path = Path(source)
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            tar.extractall(into, filter="data")
        return next(into.iterdir())
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        into.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD"], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(into, filter="data")
        return into
    if (path / "betty").is_dir():
        return path
    raise ValueError(f"{source}: not a folder holding betty/, a .tar.gz, or a bare git repository")


def commit_of(source: str) -> str:
    done = subprocess.run(["git", "--git-dir", source, "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()[:12] if done.returncode == 0 else "a folder"


def imaml_commit() -> str:
    """This checkout's commit, and whether imaml_ext/ had uncommitted changes when the runs started."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imaml_ext"], capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes to imaml_ext/" if dirty else "")


def prepare(root: Path, path: str, replacements, imaml: bool, folder: Path) -> Path:
    """A copy of the program's folder (only the file for one in betty/), rewritten; the program's path in it."""
    source = root / path
    if source.parent.name == "betty" or source.parent == root / "tutorial":
        folder.mkdir(parents=True)
        shutil.copy(source, folder)
    else:
        shutil.copytree(source.parent, folder)
    for file in folder.rglob("*.py"):
        text = file.read_text()
        if file.name == source.name:
            for old, new in replacements:
                if old not in text:
                    raise SystemExit(f"{path} no longer holds {old!r}")
                text = text.replace(old, new)
        file.write_text(rewrite(text, imaml))
    overlay = HERE / "overlays" / source.parent.name
    if overlay.is_dir():
        shutil.copytree(overlay, folder, dirs_exist_ok=True)
    return folder / source.name


MARK = re.compile(r"^(?:RANK(\d+) )?(FINAL_LOSS|LOSSES|PARAMS|RAISED) (.*)$", re.M)
ERROR = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b|^timed out after")


def outcome(out: str) -> dict:
    """runner.py's lines, by rank (0 for one process): each problem's last loss, its losses, its parameters'
    digest and sum, and the error the program raised."""
    ranks = {}
    for rank, kind, rest in MARK.findall(out):
        mine = ranks.setdefault(int(rank or 0), {"losses": {}, "history": {}, "params": {}, "raised": ""})
        if kind == "RAISED":
            mine["raised"] = rest
            continue
        name, value = rest.split(" ", 1)
        if kind == "FINAL_LOSS":
            mine["losses"][name] = float(value)
        elif kind == "LOSSES":
            mine["history"][name] = [float(v) for v in value.split(",")]
        else:
            mine["params"][name] = tuple(value.split())
    return ranks


def execute(command, cwd, env, timeout: float):
    """(exit status or "timeout", output): under torchrun a timeout ends the launcher's whole session
    (its ranks), not only the launcher."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout + stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        return "timeout", (stdout or "") + (stderr or "") + f"\ntimed out after {timeout:.0f} s"


def run_one(program: Path, arguments, backend: str, paths, sizes: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               BETTY_EXAMPLES_SEED=str(args.seed), WANDB_MODE="disabled")
    env.update(("BETTY_EXAMPLES_" + kv.split("=")[0], kv.split("=")[1]) for kv in sizes.split())
    command = [*launcher(args.launch), str(HERE / "runner.py"), "imaml_ext" if backend == "imaml_ext" else "betty",
               str(program), *arguments]
    start = time.perf_counter()
    rc, out = execute(command, program.parent, env, args.timeout)
    (program.parent.parent / f"{program.parent.name}.log").write_text(out)
    out = out.replace(str(program.parent.parent.parent) + "/", "")  # the errors' paths, without the temp folder
    ranks = outcome(out)
    first = ranks.get(0, {"losses": {}, "history": {}})
    return {"rc": rc, "seconds": time.perf_counter() - start, "losses": first["losses"], "history": first["history"],
            "ranks": ranks, "error": "" if rc == 0 else failure(rc, out, ranks)}


def failure(rc, out: str, ranks: dict) -> str:
    """The line that says why a run failed: the lowest rank's RAISED line, else the last error-like line."""
    raised = [ranks[r]["raised"] for r in sorted(ranks) if ranks[r]["raised"]][:1]
    lines = [line for line in out.strip().splitlines() if line.strip() and not MARK.match(line)
             and not line.startswith("torch.distributed.elastic")]  # torchrun's summary names no cause
    raised = raised or [line for line in lines if ERROR.match(line)]
    return (raised or lines or [f"exit {rc}"])[-1][:400]


def omniglot_npy(folder: Path) -> None:
    """0.1.1's OmniglotNShot loads ``omniglot-data/omniglot.npy`` when it is there: classes x 20 x 28 x 28 x 1,
    the first 1200 classes for training (10 left for testing, where the real file has 423)."""
    import numpy as np

    data = np.random.default_rng(0).random((1210, 20, 28, 28, 1), dtype=np.float32)
    for name in ("omniglot-data", "omniglot-data-test"):
        (folder / name).mkdir()
        np.save(folder / name / "omniglot.npy", data)


SETUP = {"0.1.1/implicit_maml/main": omniglot_npy}


def cell(result: dict) -> str:
    if result["rc"] == 0:
        return "yes"
    return ("timeout" if result["rc"] == "timeout" else "no") + (": " + result["error"]).replace("|", "\\|")


def losses(result: dict) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in sorted(result["losses"].items()))


def difference(a: dict, b: dict) -> str:
    common = [name for name in a["losses"] if name in b["losses"]]
    if a["rc"] != 0 or b["rc"] != 0 or not common:
        return ""
    return f"{max(abs(a['losses'][name] - b['losses'][name]) for name in common):.3g}"


def agreement(a: dict, b: dict, tolerance: float = 1e-4) -> str:
    """How many of their first training_step calls the two runs share, to ``tolerance`` (relative, or absolute
    below 1), for the problem that parts first: a final loss after many steps on random labels drifts
    with rounding, so this says where the runs part."""
    counts = []
    for name in sorted(set(a.get("history", {})) & set(b.get("history", {}))):
        x, y = a["history"][name], b["history"][name]
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if abs(u - v) > tolerance * max(1.0, abs(u))),
                    min(len(x), len(y)))
        counts.append((same, name, len(x), len(y)))
    if not counts:
        return ""
    same, name, n, m = min(counts)
    return f"{name}: all {n}" if same == n == m else f"{name}: {same} of {n} / {m}"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help="Betty 0.1.1's sdist: betty-ml-0.1.1.tar.gz or its unpacked folder")
    parser.add_argument("--betty", help="folder Betty 0.1.1 was installed into (pip install --target)")
    parser.add_argument("--source", help="Betty's current source: a folder or a bare git repository (HEAD)")
    parser.add_argument("--deps", default=None, help="a folder of extra packages for all runs (sklearn)")
    parser.add_argument("--out", default=None, help="markdown report (default: stdout only)")
    parser.add_argument("--only", default=None, help="comma-separated labels (e.g. 0.2/test_install, 0.1.1/)")
    parser.add_argument("--backends", default="betty,imaml_ext", help="which libraries to run (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--launch", default="python",
                        help="python: every program in one process; torchrun:N: Betty's scale-out programs, each "
                             "with its strategy, in N processes (torch.distributed.run --standalone, gloo on a CPU)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.processes = int(launcher(args.launch)[-1]) if args.launch != "python" else 1
    except ValueError as error:
        parser.error(str(error))
    if not args.sdist and not args.source:
        parser.error("give --sdist (Betty 0.1.1's programs), --source (Betty 0.2's) or both")
    if args.sdist and not (args.betty and Path(args.betty, "betty").is_dir()):
        parser.error(f"--betty {args.betty}: no betty/ package there; pip install --target DIR --no-deps "
                     "betty-ml==0.1.1 and pass DIR")
    for name in ("sdist", "source", "deps", "betty"):
        if getattr(args, name) and not Path(getattr(args, name)).exists():
            parser.error(f"--{name} {getattr(args, name)}: no such file or folder")
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    backends = args.backends.split(",")
    if not backends or set(backends) - {"betty", "imaml_ext"}:
        parser.error(f"--backends {args.backends}: expected betty, imaml_ext or both, comma-separated")
    args.backends = backends
    versions = [v for v, given in zip(VERSIONS, (args.sdist, args.source)) if given]
    labels = [name for name, _, v, *_ in programs(args.processes) if v in versions]
    try:
        args.only = select(args.only, labels)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="betty_examples_"))
    roots = {}
    try:
        if args.sdist:
            roots["0.1.1"] = unpack(args.sdist, workdir / "sdist")
        if args.source:
            roots["0.2"] = unpack(args.source, workdir / "source")
    except (ValueError, subprocess.CalledProcessError, tarfile.TarError) as error:
        shutil.rmtree(workdir)
        raise SystemExit(f"betty_examples.py: {error}") from None
    library = {"0.1.1": args.betty, "0.2": str(roots.get("0.2"))}
    extra = [args.deps] if args.deps else []
    rows, commit = [], imaml_commit()
    for name, strategy, version, path, arguments, replacements, sizes in programs(args.processes):
        if name not in args.only:
            continue
        results = {}
        for backend in args.backends:
            folder = workdir / "runs" / f"{name.replace('/', '_')}-{backend}"
            program = prepare(roots[version], path, replacements, backend == "imaml_ext", folder)
            if name in SETUP:
                SETUP[name](folder)
            paths = ([str(REPO)] if backend == "imaml_ext" else [library[version]]) + extra
            results[backend] = r = run_one(program, arguments, backend, paths, sizes, args)
            print(f"{name:48s} {backend:9s} rc={r['rc']} {losses(r)} {r['seconds']:.0f} s {r['error']}", flush=True)
        rows.append((name, arguments, replacements, results) + ((strategy,) if args.processes > 1 else ()))
    versions = f"torch {torch.__version__}; imaml_ext {commit}"
    report = table(rows, roots, args, versions) if args.processes == 1 else scale_out_table(rows, roots, args, versions)
    print(report)
    print(f"logs: {workdir}/runs")
    if args.out:
        Path(args.out).write_text(report)
    return 0


def table(rows, roots, args, versions: str) -> str:
    lines = [
        f"# Betty's example programs on Betty and on imaml_ext ({args.date})",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, {versions}; one thread "
        f"(OMP_NUM_THREADS=1), seed {args.seed}, at most {args.timeout:.0f} s a run. Made by "
        "`scripts/betty_examples.py` (not part of CI). Betty 0.1.1: its sdist's programs on the pip package; "
        f"Betty 0.2: the programs of its source tree ({commit_of(args.source) if args.source else '-'}) on that "
        "tree. Each program is Betty's own, run on seeded synthetic data of the real shapes, with `betty` -> "
        "`imaml_ext` in the import lines for imaml_ext and the changes below for both. *Loss*: what each "
        "problem's `training_step` returned last; *diff*: the largest difference between the two runs' values; "
        "*same calls*: for the problem whose values part first, how many of its first `training_step` calls "
        "return the same loss (to 1e-4, relative) on both, of the calls on Betty / on imaml_ext.",
        "",
        "| program | Betty | imaml_ext | loss, Betty | loss, imaml_ext | diff | same calls | flags; rewritten |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arguments, replacements, results in rows:
        betty, ours = results.get("betty"), results.get("imaml_ext")
        changes = " ".join(arguments) + "; " + ", ".join(f"`{old}` -> `{new}`" for old, new in replacements)
        lines.append("| " + " | ".join([
            f"`{name}`", cell(betty) if betty else "-", cell(ours) if ours else "-",
            losses(betty) if betty else "", losses(ours) if ours else "",
            difference(betty, ours) if betty and ours else "", agreement(betty, ours) if betty and ours else "",
            changes.strip("; ")]) + " |")
    for backend in args.backends:
        for version in roots:
            done = [r for n, _, _, r in rows if n.startswith(version + "/") and r[backend]["rc"] == 0]
            total = sum(n.startswith(version + "/") for n, *_ in rows)
            lines.append(f"\n{backend}, Betty {version}'s programs: {len(done)} of {total} complete.")
    for version, copy, original in SAME_AS:
        if version in roots and (roots[version] / copy).read_bytes() == (roots[version] / original).read_bytes():
            lines += ["", f"`{version}/{copy}` is byte for byte `{original}`, so it is run once."]
    lines += ["", "Not run:", "", "| version | program | why |", "|---|---|---|"]
    lines += [f"| {version} | `{path}` | {why} |" for version, path, why in NOT_RUN]
    return "\n".join(lines) + "\n"


def rank_losses(result: dict) -> str:
    """Each rank's last losses (``rank 0: inner 0.5, outer 0.2; rank 1: ...``)."""
    ranks = result.get("ranks", {})
    return "; ".join(f"rank {r}: " + ", ".join(f"{n} {v:.4g}" for n, v in sorted(ranks[r]["losses"].items()))
                     for r in sorted(ranks) if ranks[r]["losses"])


def rank_parameters(result: dict, processes: int) -> str:
    """Per problem, whether every rank ended with the same parameters (their float64 bytes' digest)."""
    ranks = result.get("ranks", {})
    if result["rc"] != 0 or len(ranks) < processes:
        return "-"
    cells = []
    for name in sorted(ranks[0]["params"]):
        seen = [ranks[r]["params"].get(name, ("missing", "")) for r in sorted(ranks)]
        if seen[0][0] == "sharded":
            cells.append(f"{name}: sharded (each rank holds its shard)")
        elif all(s == seen[0] for s in seen):
            cells.append(f"{name}: same on {len(seen)} ranks (sum {seen[0][1]})")
        else:
            cells.append(f"{name}: differ (sums " + " / ".join(s[1] for s in seen) + ")")
    return "; ".join(cells)


def scale_out_table(rows, roots, args, versions: str) -> str:
    lines = [
        f"# Betty's scale-out example programs in {args.processes} CPU processes, on Betty and on imaml_ext "
        f"({args.date})",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, {versions}; Betty 0.2's source "
        f"{commit_of(args.source) if args.source else '-'}. Each run is `python -m torch.distributed.run --standalone "
        f"--nproc_per_node {args.processes}` of `scripts/betty_examples/runner.py` and the program, "
        "OMP_NUM_THREADS=1 in each process, the process group on gloo (nothing here has a GPU), seed "
        f"{args.seed} in every rank, at most {args.timeout:.0f} s a run. Made by:",
        "",
        "    OMP_NUM_THREADS=1 python scripts/betty_examples.py " + " ".join(args.argv),
        "",
        "Each program is Betty's own with its strategy as it sets it and fp16 kept, on seeded synthetic data "
        "of the real shapes, sizes cut as in the one-process table, `betty` -> `imaml_ext` in the import lines "
        "for imaml_ext. *Losses*: what each problem's `training_step` returned last in each rank (each rank "
        "reads its own share of the batches, so they differ). *Parameters*: whether the ranks ended with the "
        "same parameters, compared by a digest of their float64 bytes, with their sum.",
        "",
        "| program | strategy | processes | Betty | imaml_ext | losses, imaml_ext | parameters, imaml_ext "
        "| losses, Betty | flags; rewritten |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arguments, replacements, results, strategy in rows:
        betty, ours = results.get("betty"), results.get("imaml_ext")
        changes = " ".join(arguments) + "; " + ", ".join(f"`{old}` -> `{new}`" for old, new in replacements)
        lines.append("| " + " | ".join([
            f"`{name.split(':')[0]}`", f"`{strategy}`", str(args.processes), cell(betty) if betty else "-",
            cell(ours) if ours else "-", rank_losses(ours) if ours else "",
            rank_parameters(ours, args.processes) if ours else "", rank_losses(betty) if betty else "",
            changes.strip("; ")]) + " |")
    for backend in args.backends:
        done = [r for *_, r, _ in rows if r[backend]["rc"] == 0]
        lines.append(f"\n{backend}: {len(done)} of {len(rows)} complete.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
