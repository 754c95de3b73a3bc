"""Train implicit MAML on Omniglot: ``python -m imaml_ext.train`` (or ``imaml-train``).

Every task of a meta-batch runs at once (:class:`imaml_ext.IMAML`). The run folder
(``--out``) gets ``config.json``, ``metrics.jsonl`` and ``metrics.csv`` (one row per log
window and per validation), ``curves.png``, ``checkpoint.pt`` (written atomically every
``--checkpoint-every`` steps and at the end; ``--resume`` continues bit for bit) and
``results.json`` (meta-test accuracy over ``--eval-tasks`` test tasks with its 95 %
confidence interval, beside the same adaptation from the random initialisation).

The defaults are the iMAML paper's Omniglot 5-way 1-shot setting (lambda = 2, 16 inner
steps, 5 CG iterations, meta-batch 32, Adam); ``make demo`` runs a short version.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ._device import check_device
from ._io import atomic_write
from .batched import IMAML, MAML
from .data import NUM_DRAWERS, DownloadError, PROTOCOLS, option_spelling, TaskIndices, TaskSampler, load_omniglot, omniglot_tasks, split_classes
from .models import Conv4

TASKS = ("omniglot",)
ALGOS = ("imaml", "maml", "fomaml")
WINDOW_KEYS = ("loss", "accuracy", "support_loss", "cg_residual", "cg_breakdown", "nonfinite")
CHECKPOINT_FORMAT = 1

# Arguments that do not change what a run computes: they may differ on --resume.
# Options added after checkpoints were first written, with the value those runs had.
ADDED_OPTION_DEFAULTS = {"precision": "fp32"}
RUNTIME_KEYS = ("out", "resume", "progress", "tensorboard", "data", "download", "stop_after", "on_nonfinite",
                "evaluate", "undamped")
# What only the final evaluation reads: may change on --resume (and --steps may grow, extending the run).
EVALUATION_KEYS = ("eval_tasks", "eval_batch", "baseline")
# What --evaluate RUN_FOLDER accepts beside it; the rest comes from the run's checkpoint.
EVALUATE_OPTIONS = ("evaluate", *EVALUATION_KEYS, "device", "data", "download", "progress")
# The columns of metrics.csv, in this order (then any others): a train row's, then a validation row's.
CSV_COLUMNS = ("split", "step", "loss", "accuracy", "support_loss", "cg_residual", "cg_breakdown", "lr", "tasks_per_s",
               "nonfinite_tasks", "best_accuracy")
# The iMAML authors' damping of the CG system, the command line's default (--undamped: 0 and 0).
AUTHORS_DAMPING = {"cg_damping": 1.0, "lam_damping": 10.0}
_UNSET = object()


class RunError(Exception):
    """A problem with the command line or the run folder: printed without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Every refusal is one line, argparse's own and ours alike (no usage block before some)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default in --help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action, argparse.BooleanOptionalAction) and "default" not in text:
            return f"{text} (default: {'on' if action.default else 'off'})"
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


# --------------------------------------------------------------------------- arguments


def _add(parser, name: str, **kwargs):
    """``--inner_steps`` (the tutorial's spelling) and ``--inner-steps`` both work."""
    names = [f"--{name}"]
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    if other != name:
        names.append(f"--{other}")
    kwargs.setdefault("dest", name.replace("-", "_"))
    parser.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="imaml-train",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    task = p.add_argument_group("task")
    _add(task, "task", default="omniglot", help=f"data set: {', '.join(TASKS)}")
    _add(task, "ways", type=int, default=5, help="classes per task")
    _add(task, "shots", type=int, default=1, help="support examples per class")
    _add(task, "query", type=int, default=15, help="query examples per class")
    _add(task, "split", default="finn", choices=PROTOCOLS,
         help="class split: finn (MAML/iMAML: first 1200 characters train, rest test) or l2l (learn2learn's)")
    _add(task, "split_seed", type=int, default=0, help="seed of the l2l class shuffle")
    _add(task, "data", default=None, help="Omniglot root (default: $IMAML_DATA, ./data, ../shared/data)")
    _add(task, "download", action="store_true", help="download the official Omniglot zips if no data are found")

    algo = p.add_argument_group("meta-learning")
    _add(algo, "algo", default="imaml", choices=ALGOS,
         help="imaml (implicit gradients), maml (through the unrolled inner loop) or fomaml (first-order MAML)")
    _add(algo, "inner_steps", type=int, default=16, help="proximal inner-loop steps per task")
    _add(algo, "base_lr", type=float, default=0.1, help="inner-loop learning rate")
    lam = algo.add_mutually_exclusive_group()
    lam.add_argument("--lam", type=float, default=None, help="proximal strength lambda (default: 2)")
    lam.add_argument("--reg", type=float, default=None, help="the tutorial's reg * ||phi - theta||^2: lambda = 2 * reg")
    _add(algo, "cg_iterations", type=int, default=5, help="CG iterations of the implicit-gradient solve")
    _add(algo, "cg_damping", type=float, default=None,
         help="solve ((1 + cg_damping) I + H / (lam + lam_damping)) x = g (default: 1, the iMAML authors' code)")
    _add(algo, "lam_damping", type=float, default=None, help="see --cg_damping (default: 10, the iMAML authors' code)")
    _add(algo, "undamped", action="store_true",
         help="the exact system (I + H / lam) x = g: --cg_damping 0 --lam_damping 0 (CG can break down far from "
              "the inner minimum, see the README)")
    _add(algo, "clip_grad", type=float, default=0.0, help="clip the meta-gradient's norm to this (0: off)")
    _add(algo, "meta_batch_size", type=int, default=32, help="tasks per meta-step (T)")
    _add(algo, "hidden_size", type=int, default=64, help="Conv4 channels")
    _add(algo, "meta_lr", type=float, default=1e-3, help="the meta-optimizer's learning rate")
    _add(algo, "optimizer", default="adam", choices=("adam", "adamw"), help="the meta-optimizer")
    _add(algo, "scheduler", default="none", choices=("none", "cosine"), help="meta learning-rate schedule")
    _add(algo, "steps", type=int, default=10000, help="meta-steps")
    _add(algo, "forward", default="auto", choices=("auto", "vmap", "loop"),
         help="task-batched forward: vmap (grouped convolutions), loop, or auto (vmap on GPU, loop on CPU)")
    _add(algo, "cuda_graph", action="store_true", help="capture the meta-step as a CUDA graph (CUDA only)")
    _add(algo, "precision", default="fp32", choices=("fp32", "bf16", "fp16"),
         help="bf16 / fp16: iMAML's forwards under bfloat16 / float16 autocast, float32 weights, gradients and "
              "CG; fp16 with a dynamic loss scale (see the README for their accuracy)")

    run = p.add_argument_group("run")
    _add(run, "seed", type=int, default=0, help="seed of the model, the task sampler and every RNG")
    _add(run, "device", default=None, help="default: cuda if available, else cpu")
    _add(run, "out", default=None, help="run folder (default: runs/<task>-<ways>w<shots>s-<time>)")
    _add(run, "resume", action="store_true",
         help="continue the run in --out from its checkpoint; --eval_tasks, --eval_batch and --baseline may "
              "change, and a larger --steps extends a run (a finished one too)")
    _add(run, "evaluate", default=None, metavar="RUN_FOLDER",
         help="only evaluate RUN_FOLDER's checkpoint on --eval_tasks test tasks (with --eval_batch, --baseline, "
              "--device, --data); appends the result to RUN_FOLDER/evaluations.jsonl")
    _add(run, "log_every", type=int, default=10, help="meta-steps per metrics row")
    _add(run, "valid_every", type=int, default=500, help="meta-steps between validations (0: none)")
    _add(run, "valid_tasks", type=int, default=200, help="validation tasks, the same ones each time")
    _add(run, "checkpoint_every", type=int, default=500, help="meta-steps between checkpoints")
    _add(run, "eval_tasks", type=int, default=600, help="meta-test tasks at the end (0: none)")
    _add(run, "eval_batch", type=int, default=None, help="tasks per evaluation batch (default: meta_batch_size)")
    _add(run, "baseline", action=argparse.BooleanOptionalAction, default=True,
         help="also evaluate the same adaptation from the random initialisation")
    _add(run, "stop_after", type=int, default=None,
         help="end this invocation after this many meta-steps in all (checkpointed); --resume continues")
    _add(run, "on_nonfinite", default="error", choices=("error", "skip-task"),
         help="a task with a non-finite loss or meta-gradient is always left out of theta's update; "
              "error: stop at the next log step, naming it; skip-task: count it in the log and go on")
    _add(run, "tensorboard", action="store_true", help="also write tensorboard scalars to <out>/tensorboard")
    _add(run, "progress", action=argparse.BooleanOptionalAction, default=True,
         help="progress bar; without it each metrics row is printed as a line")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.evaluate is not None:
            # Only what was given counts: every action's value starts unset, not at its default.
            given = parser.parse_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))
            args.given = sorted(k for k, v in vars(given).items() if v is not _UNSET)
            check_evaluate_args(args)
        else:
            check_args(args)
    except RunError as error:
        parser.error(str(error))
    return args


def check_evaluate_args(args: argparse.Namespace) -> None:
    other = [k for k in args.given if k not in EVALUATE_OPTIONS]
    if other:
        raise RunError(f"--evaluate takes the run's configuration from its checkpoint; only "
                       f"{', '.join('--' + k for k in EVALUATE_OPTIONS[1:])} may be given with it; got --{other[0]}")
    if args.eval_tasks < 1:
        raise RunError(f"--eval_tasks must be >= 1 with --evaluate; got {args.eval_tasks}")
    if args.eval_batch is not None and args.eval_batch < 1:
        raise RunError(f"--eval_batch must be >= 1; got {args.eval_batch}")
    args.device = _device_arg(args.device)


def check_args(args: argparse.Namespace) -> None:
    if args.task not in TASKS:
        raise RunError(f"--task must be one of {', '.join(TASKS)}; got {args.task!r}")
    if args.reg is not None:
        args.lam = 2.0 * args.reg  # the tutorial's reg * ||phi - theta||^2 has gradient 2 * reg * (phi - theta)
    elif args.lam is None:
        args.lam = 2.0
    positive_ints = ["ways", "shots", "query", "cg_iterations", "meta_batch_size", "hidden_size", "steps",
                     "log_every", "valid_tasks", "checkpoint_every"]
    for name in positive_ints:
        value = getattr(args, name)
        if value < 1:
            raise RunError(f"--{name} must be >= 1; got {value}")
    for name, value in AUTHORS_DAMPING.items():
        if args.undamped and getattr(args, name) not in (None, 0.0):
            raise RunError(f"--undamped sets --{name} 0; got --{name} {getattr(args, name)} as well")
        if getattr(args, name) is None:
            setattr(args, name, 0.0 if args.undamped else value)
    for name in ("cg_damping", "lam_damping", "clip_grad"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise RunError(f"--{name} must be a finite number >= 0; got {value}")
    for name in ("inner_steps", "valid_every", "eval_tasks"):
        if getattr(args, name) < 0:
            raise RunError(f"--{name} must be >= 0; got {getattr(args, name)}")
    for name in ("base_lr", "lam", "meta_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            shown = "--reg" if name == "lam" and args.reg is not None else f"--{name}"
            raise RunError(f"{shown} must be a finite number > 0; got {value if shown != '--reg' else args.reg}")
    if args.shots + args.query > NUM_DRAWERS:
        raise RunError(
            f"--shots + --query must be <= {NUM_DRAWERS} (Omniglot has {NUM_DRAWERS} drawers per character, and "
            f"support and query images are distinct); got {args.shots} + {args.query} = {args.shots + args.query}"
        )
    for split in ("train", "validation", "test"):
        classes = len(split_classes(split, seed=args.split_seed, protocol=args.split))
        if args.ways > classes:
            raise RunError(f"--ways {args.ways} is more than the {classes} classes of the {args.split} {split} split")
    if args.eval_batch is None:
        args.eval_batch = args.meta_batch_size
    elif args.eval_batch < 1:
        raise RunError(f"--eval_batch must be >= 1; got {args.eval_batch}")
    if args.stop_after is not None and not 1 <= args.stop_after:
        raise RunError(f"--stop_after must be >= 1; got {args.stop_after}")
    args.device = _device_arg(args.device)
    device = torch.device(args.device)
    if args.precision != "fp32" and args.algo != "imaml":
        raise RunError(f"--precision {args.precision} is built for --algo imaml only; got --algo {args.algo}")
    if args.precision == "fp16" and args.on_nonfinite != "skip-task":
        raise RunError("--precision fp16 leaves out a task whose scaled gradients overflow (as GradScaler skips a "
                       f"step) and lowers the loss scale: it needs --on_nonfinite skip-task; got {args.on_nonfinite}")
    if args.cuda_graph and device.type != "cuda":
        raise RunError(f"--cuda_graph needs a CUDA --device; got {args.device}")
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", f"{args.task}-{args.ways}w{args.shots}s-{stamp}")


def _device_arg(name: Optional[str]) -> str:
    """--device, checked: cuda when there is one and none is given, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name, "--device")
    except ValueError as error:
        raise RunError(str(error)) from None
    return name


def run_config(args: argparse.Namespace) -> Dict[str, object]:
    """What determines the run's numbers (compared on --resume)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_KEYS}


# --------------------------------------------------------------------------- evaluation


def slice_indices(indices: TaskIndices, start: int, stop: int) -> TaskIndices:
    return TaskIndices(*(t[start:stop] for t in indices))


def evaluate(imaml: IMAML, sampler: TaskSampler, indices: TaskIndices, batch: int) -> Dict[str, torch.Tensor]:
    """Per-task query accuracy and loss after the proximal inner loop, ``batch`` tasks at a time."""
    accuracy, loss = [], []
    total = indices.classes.shape[0]
    for start in range(0, total, batch):
        task_loss, task_accuracy = imaml.evaluate(*sampler.gather(slice_indices(indices, start, start + batch)),
                                                  per_task=True)
        loss.append(task_loss)
        accuracy.append(task_accuracy)
    return {"accuracy": torch.cat(accuracy), "loss": torch.cat(loss)}


def summarise(per_task_accuracy: torch.Tensor) -> Dict[str, float]:
    """Mean accuracy in percent with the half-width of its 95 % confidence interval."""
    acc = per_task_accuracy.double().cpu() * 100.0
    n = acc.numel()
    std = acc.std(unbiased=True).item() if n > 1 else float("nan")
    return {"accuracy": acc.mean().item(), "ci95": 1.96 * std / math.sqrt(n), "tasks": n}


# --------------------------------------------------------------------------- run folder


class RunFolder:
    def __init__(self, path: str):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.checkpoint = self.path / "checkpoint.pt"
        self.previous = self.path / "checkpoint.prev.pt"  # the one before: kept in case the latest is damaged
        self.jsonl = self.path / "metrics.jsonl"
        self.csv = self.path / "metrics.csv"
        self.plot = self.path / "curves.png"
        self.results = self.path / "results.json"
        self.tensorboard = self.path / "tensorboard"

    def holds_run(self) -> List[str]:
        return [p.name for p in (self.config, self.checkpoint, self.jsonl, self.results) if p.exists()]

    def write_json(self, path: Path, obj) -> None:
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(path, lambda f: f.write(data))

    def read_metrics(self) -> List[Dict[str, object]]:
        if not self.jsonl.exists():
            return []
        rows = []
        for number, line in enumerate(self.jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise RunError(f"{self.jsonl}: line {number} is not JSON: {line[:80]!r}") from None
        return rows

    def write_metrics(self, rows: List[Dict[str, object]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        atomic_write(self.jsonl, lambda f: f.write(text))
        self.write_csv(rows)

    def write_csv(self, rows: List[Dict[str, object]]) -> None:
        """One column per key, in CSV_COLUMNS' order; a run with no row yet gets the header alone."""
        present = {k for r in rows for k in r}
        keys = [k for k in CSV_COLUMNS if k in present or not rows]
        for r in rows:
            keys += [k for k in r if k not in keys]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = buffer.getvalue().encode()
        atomic_write(self.csv, lambda f: f.write(data))

    def plot_curves(self, rows: List[Dict[str, object]], baseline: Optional[float] = None,
                    test: Optional[Dict[str, float]] = None, step: Optional[int] = None) -> bool:
        """Loss and accuracy against the meta-step; ``test`` (a summarise() dict) marks the final
        meta-test accuracy at ``step``, with its 95 % interval."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for split, style in (("train", "-"), ("validation", "o-")):
            part = [r for r in rows if r["split"] == split]
            if part:
                steps = [r["step"] for r in part]
                ax_loss.plot(steps, [r["loss"] for r in part], style, label=f"{split} query loss")
                ax_acc.plot(steps, [100 * r["accuracy"] for r in part], style, label=f"{split} query accuracy")
        if baseline is not None:
            ax_acc.axhline(baseline, color="gray", linestyle="--", label="random init, test")
        if test is not None and step is not None:
            ax_acc.errorbar([step], [test["accuracy"]], yerr=[test["ci95"]], fmt="*", color="black", markersize=10,
                            capsize=4, label=f"meta-test, {test['tasks']} tasks: {test['accuracy']:.2f} ± "
                                             f"{test['ci95']:.2f} %")
        for ax, label in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy (%)")):
            ax.set_xlabel("meta-step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            else:  # stopped before its first row: say so rather than an empty legend
                ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write(self.plot, lambda f: f.write(buffer.getvalue()))
        return True


# --------------------------------------------------------------------------- RNG state


def rng_state() -> Dict[str, object]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- the run


def build_model(args) -> Conv4:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return Conv4(args.ways, args.hidden_size).to(args.device)


def build_imaml(model, args) -> IMAML:
    """The learner of ``--algo``: IMAML, or MAML (a subclass) for maml / fomaml."""
    if args.algo != "imaml":
        return MAML(model, inner_steps=args.inner_steps, inner_lr=args.base_lr, first_order=args.algo == "fomaml",
                    ways=args.ways, check_labels=False, forward=args.forward)
    return IMAML(model, inner_steps=args.inner_steps, inner_lr=args.base_lr, lam=args.lam,
                 cg_iterations=args.cg_iterations, ways=args.ways, check_labels=False, forward=args.forward,
                 cg_damping=args.cg_damping, lam_damping=args.lam_damping, nonfinite="skip",
                 precision=args.precision)


def _previous_hint(folder: RunFolder) -> str:
    if not folder.previous.exists():
        return ""
    try:
        step = torch.load(folder.previous, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return f" The previous checkpoint {folder.previous} is unreadable too."
    return (f" The previous checkpoint is kept: move {folder.previous.name} to {folder.checkpoint.name} "
            f"to resume from step {step}.")


def read_checkpoint(folder: RunFolder, flag: str = "--resume") -> Dict[str, object]:
    if not folder.checkpoint.exists():
        start = "start the run without --resume" if flag == "--resume" else "is it a run folder?"
        raise RunError(f"{flag}: {folder.checkpoint} does not exist; {start}." + _previous_hint(folder))
    try:
        ckpt = torch.load(folder.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: name it, never a raw unpickling trace
        raise RunError(f"{flag}: cannot read {folder.checkpoint} ({type(error).__name__}: {error})."
                       + _previous_hint(folder)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{flag}: {folder.checkpoint} is not an imaml_ext checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_checkpoint(folder: RunFolder, config: Dict[str, object]) -> Dict[str, object]:
    ckpt = read_checkpoint(folder)
    # Checkpoints from before an option existed ran with its default.
    saved = {**ADDED_OPTION_DEFAULTS, **ckpt["config"]}
    differ = [k for k in sorted(set(saved) | set(config))
              if saved.get(k) != config.get(k) and k not in (*EVALUATION_KEYS, "steps")]
    if differ:
        shown = "; ".join(f"--{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in differ)
        undamped = not saved.get("cg_damping") and not saved.get("lam_damping") and "cg_damping" in differ
        raise RunError(
            f"--resume: the checkpoint in {folder.path} is from another configuration ({shown}). "
            + ("The defaults are now the iMAML authors' damping: --undamped resumes a run that had none. "
               if undamped else "")
            + "Resume with the same arguments, or start a new run in another --out."
        )
    if config["steps"] < ckpt["step"]:
        raise RunError(f"--resume: --steps {config['steps']} is below the checkpoint's step {ckpt['step']} in "
                       f"{folder.path}; give --steps {ckpt['step']} or more (a larger --steps extends the run)")
    return ckpt


def _extend(args, folder: RunFolder, ckpt, optimizer, scheduler, main_rank: bool) -> None:
    """--resume with another --steps: the run goes on to the new --steps. A cosine schedule is
    stretched to end there: from the checkpoint's step on, the learning rate follows the cosine
    over the new --steps (up again where the old one had decayed); earlier steps keep the old
    one's. The old results.json, if any, is kept as results-<old steps>-steps.json."""
    old, step = ckpt["config"]["steps"], ckpt["step"]
    note = ""
    if scheduler is not None:
        scheduler.T_max = args.steps
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / args.steps)) / 2
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        note = (f"; the cosine schedule now ends at step {args.steps}: the learning rate goes on from "
                f"{scheduler._last_lr[0]:.3g}")
    if not main_rank:
        return
    if folder.results.exists():
        os.replace(folder.results, folder.path / f"results-{old}-steps.json")
    print(f"extending the run in {folder.path} from --steps {old} to {args.steps}, at step {step}{note}")


class Distributed:
    """Data parallel over processes (``torchrun --nproc_per_node N -m imaml_ext.train``):
    gloo on CPU, NCCL on GPUs; one fused all-reduce of theta's gradient per meta-step."""

    def __init__(self, world: int, rank: int, local_rank: int):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.started = False

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, name: str) -> torch.device:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            # torch.cuda.set_device needs an index: one GPU per process, or the current one alone.
            device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def stop(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()
            self.started = False

    def average_gradients_and(self, params: List[torch.Tensor], extra: torch.Tensor,
                              tasks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One all-reduce: theta's .grad becomes the mean over every process's tasks, each
        process's gradient (a mean over its ``tasks`` tasks, a device scalar: fewer when
        non-finite ones were skipped) weighted by that count; ``extra`` is averaged over the
        processes and returned."""
        if self.world == 1:
            return extra
        grads = [p.grad for p in params]
        weight = tasks.to(grads[0].dtype).reshape(1) if tasks is not None else grads[0].new_ones(1)
        flat = torch.cat([g.reshape(-1) * weight for g in grads] + [extra.to(grads[0].dtype), weight])
        torch.distributed.all_reduce(flat)
        total = flat[-1].clamp(min=1)  # no finite task anywhere: a zero gradient, not 0 / 0
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g) / total)
            offset += g.numel()
        return (flat[offset:-1] / self.world).to(extra.dtype)


class _StopSignal:
    """SIGTERM / SIGINT end the run after the current meta-step, with a checkpoint."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(args: argparse.Namespace) -> Dict[str, object]:
    """Run (or resume) the training described by ``args``; returns the results dict."""
    folder = RunFolder(args.out)
    check_out_folder(folder.path)
    config = run_config(args)
    if args.resume:
        ckpt = load_checkpoint(folder, config)
    else:
        existing = folder.holds_run()
        if existing:
            raise RunError(
                f"--out {folder.path} already holds a run ({', '.join(existing)}); pass --resume to continue "
                f"it, or choose another --out (nothing was overwritten)"
            )
        ckpt = None
    ddp = Distributed.from_env()
    device = ddp.device(args.device)
    if args.meta_batch_size % ddp.world:
        raise RunError(f"--meta_batch_size {args.meta_batch_size} must be divisible by the {ddp.world} processes")
    ddp.start(device)  # after every rank has checked the run folder, before rank 0 writes to it
    try:
        return _train(args, folder, config, ckpt, ddp, device)
    finally:
        ddp.stop()


def check_out_folder(path: Path) -> None:
    """Refuse an --out that is a file, lies under one, or where no folder can be made, before
    anything runs (the run folder itself is made once the data are loaded)."""
    parent = path
    try:
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder; choose another --out")
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunError(f"--out {path} lies under {parent}, which is a file, not a folder; choose another --out")
        os.rmdir(tempfile.mkdtemp(prefix=".imaml-train-", dir=parent))  # can folders be made there?
    except OSError as error:
        raise RunError(f"--out {path}: cannot make a folder in {parent} ({error.strerror or error}); "
                       f"choose another --out") from None


def _load_images(args) -> torch.Tensor:
    try:
        with option_spelling(root="--data <folder>", download="--download"):  # the flags, in its messages
            return load_omniglot(args.data, download=args.download)
    except (FileNotFoundError, ValueError, DownloadError) as error:  # missing or damaged data: the message names it
        raise RunError(str(error)) from None


def _train(args, folder: RunFolder, config, ckpt, ddp: "Distributed", device: torch.device) -> Dict[str, object]:
    main_rank = ddp.rank == 0

    images = _load_images(args)
    tasks = omniglot_tasks(args.ways, args.shots, args.query, images=images, protocol=args.split,
                           split_seed=args.split_seed, seed=args.seed, device=device)
    del images
    valid_indices = tasks.validation.sample_indices(args.valid_tasks) if args.valid_every else None

    model = build_model(args)
    imaml = build_imaml(model, args)
    optimizer_cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=args.meta_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps) if args.scheduler == "cosine" else None

    # Sums over the log window of the meta-batch's means (over all processes): no sync until read.
    window = {"values": torch.zeros(len(WINDOW_KEYS), device=device), "steps": 0}
    start_step, best_valid = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        tasks.train.generator.set_state(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        for key, value in ckpt["window"].items():
            window[key] = value.to(device) if isinstance(value, torch.Tensor) else value
        start_step, best_valid = ckpt["step"], ckpt["best_valid"]
        if ckpt["config"].get("steps") != args.steps:
            _extend(args, folder, ckpt, optimizer, scheduler, main_rank)
        rows = [r for r in folder.read_metrics() if r["step"] <= start_step]
        if main_rank:
            folder.write_metrics(rows)  # drop what an interrupted run logged after its checkpoint
            if ckpt["config"] != config:  # a longer --steps, or other evaluation options
                folder.write_json(folder.config, {**config, "imaml_ext": _version(), "torch": torch.__version__})
    else:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed % 2**32)
        random.seed(args.seed)
        rows = []
        if main_rank:
            try:
                folder.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise RunError(f"--out {folder.path}: cannot make the run folder ({error.strerror or error})") from None
            folder.write_json(folder.config, {**config, "imaml_ext": _version(), "torch": torch.__version__})
            folder.write_metrics(rows)

    logger = None
    if args.tensorboard and main_rank:
        from .logging import TensorBoardLogger

        logger = TensorBoardLogger(str(folder.tensorboard))

    def save(step: int) -> None:
        if not main_rank:
            return  # every rank holds the same state: rank 0 writes it
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sampler": tasks.train.generator.get_state(),
            "rng": rng_state(),
            "window": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in window.items()},
            "best_valid": best_valid,
        }
        fresh = folder.path / "checkpoint.new.pt"
        atomic_write(fresh, lambda f: torch.save(state, f))
        if folder.checkpoint.exists():
            os.replace(folder.checkpoint, folder.previous)
        os.replace(fresh, folder.checkpoint)

    def log_row(row: Dict[str, object]) -> None:
        rows.append(row)
        if not main_rank:
            return
        with open(folder.jsonl, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if bar is None:  # no progress bar (--no-progress): the rows themselves, one line each
            print(_row_text(row), flush=True)
        if logger is not None:
            logger.log({k: v for k, v in row.items() if k not in ("split", "step")}, tag=row["split"], step=row["step"])

    def save_rows_and_close() -> None:
        if main_rank:
            folder.write_csv(rows)
        if logger is not None:
            logger.close()
        if bar is not None:
            bar.close()

    captured = None
    warned_breakdown = False
    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    bar = _progress(args, start_step) if main_rank else None
    window_start = time.perf_counter()
    step = start_step
    with _StopSignal() as stop:
        first_bad = torch.full((2,), -1.0, device=device)  # (step, task) of the first non-finite task
        stopping = False  # agreed by every process: one signalled rank must not leave the others waiting
        while step < stop_at and not stopping:
            # Every rank draws the same T tasks and runs its own T / world of them, so the run
            # equals one process with the whole meta-batch.
            indices = tasks.train.sample_indices(args.meta_batch_size)
            per_rank = args.meta_batch_size // ddp.world
            batch = tasks.train.gather(slice_indices(indices, ddp.rank * per_rank, (ddp.rank + 1) * per_rank))
            optimizer.zero_grad(set_to_none=True)
            if args.cuda_graph:
                if captured is None:
                    captured = imaml.capture(*batch)
                result = captured.step(*batch)
            else:
                result = imaml.meta_step(*batch)
            with torch.no_grad():
                zero = torch.zeros((), device=device)
                stats = torch.stack([
                    result.loss, result.accuracy, result.support_loss,
                    result.cg.residual_norm.mean() if result.cg is not None else zero,
                    result.cg.breakdown.float().mean() if result.cg is not None else zero,
                    result.nonfinite.float().mean() if result.nonfinite is not None else zero,
                    zero + float(stop.received is not None),
                ])
                if result.nonfinite is not None:  # remember the first, on the device
                    here = torch.stack([zero + step + 1, (result.nonfinite.int().argmax() + ddp.rank * per_rank).to(zero.dtype)])
                    first_bad = torch.where((first_bad[0] < 0) & result.nonfinite.any(), here, first_bad)
                kept = (~result.nonfinite).sum() if result.nonfinite is not None else zero + per_rank
                stats = ddp.average_gradients_and(list(model.parameters()), stats, kept)
            if ddp.world == 1:
                stopping = stop.received is not None
            elif device.type == "cpu" or step + 1 == stop_at or (step + 1) % args.log_every == 0:
                stopping = bool(stats[-1] > 0)  # on a GPU read only where a log reads anyway
                if stopping and stop.received is None:
                    stop.received = signal.SIGTERM  # another process was signalled
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)  # on the device: no sync
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            window["values"] += stats[: len(WINDOW_KEYS)]
            window["steps"] += 1
            if step % args.log_every == 0 or step == args.steps:
                n = window["steps"]
                loss, acc, support, residual, breakdown, nonfinite = (window["values"] / n).tolist()  # the one host sync per log window
                elapsed = time.perf_counter() - window_start
                row = {"split": "train", "step": step, "loss": loss, "accuracy": acc, "support_loss": support,
                       "cg_residual": residual, "cg_breakdown": breakdown, "lr": optimizer.param_groups[0]["lr"],
                       "tasks_per_s": n * args.meta_batch_size / elapsed}
                if args.algo != "imaml":  # nothing is solved
                    del row["cg_residual"], row["cg_breakdown"]
                bad_tasks = round(nonfinite * n * args.meta_batch_size)
                row["nonfinite_tasks"] = bad_tasks
                log_row(row)
                window["values"].zero_()
                if bad_tasks:
                    s_bad, t_bad = (int(v) for v in first_bad.tolist())
                    first = f" (the first: step {s_bad}, task {t_bad} of its meta-batch)" if s_bad >= 0 else ""
                    message = (f"a non-finite support or query loss, or meta-gradient, in {bad_tasks} task(s) of steps "
                               f"{step - n + 1}-{step}{first}; they were left out of theta's update")
                    if args.on_nonfinite == "error":
                        save(step)  # theta is finite: the bad tasks never reached it
                        save_rows_and_close()
                        raise RunError(f"{message}. Stopping (--on_nonfinite error) with a checkpoint at step {step} "
                                       f"in {folder.checkpoint}; --resume --on_nonfinite skip-task goes on without "
                                       f"such tasks.")
                    _warn(bar, message)
                    first_bad.fill_(-1)
                if breakdown > 0.5 and not warned_breakdown:
                    warned_breakdown = True
                    _warn(bar, f"CG broke down (p'Ap <= 0) on {100 * breakdown:.0f}% of the tasks of steps "
                               f"{step - n + 1}-{step}: I + H/lam is indefinite there, so those tasks' meta-gradients "
                               f"stop at the last good CG iterate. Damping (--cg_damping 1 --lam_damping 10, the iMAML "
                               f"authors' values) or more inner steps keep the system positive definite.")
                window["steps"] = 0
                window_start = time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}%", tasks_s=f"{row['tasks_per_s']:.0f}")
            if valid_indices is not None and step % args.valid_every == 0 and main_rank:
                metrics = evaluate(imaml, tasks.validation, valid_indices, args.eval_batch)
                acc = metrics["accuracy"].mean().item()
                best_valid = acc if best_valid is None else max(best_valid, acc)
                log_row({"split": "validation", "step": step, "loss": metrics["loss"].mean().item(),
                         "accuracy": acc, "best_accuracy": best_valid})
                if bar is not None:
                    bar.write(_row_text(rows[-1]))
                window_start = time.perf_counter()
            if step % args.checkpoint_every == 0 and step < stop_at:
                save(step)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    save(step)
    if not main_rank:
        return {"rank": ddp.rank, "stopped_at": step, "signal": stop.received}
    folder.write_csv(rows)
    if logger is not None:
        logger.close()

    if step < args.steps:
        why = (signal.Signals(stop.received).name if stop.received is not None else f"--stop_after {args.stop_after}")
        folder.plot_curves(rows)
        print(f"stopped at meta-step {step} of {args.steps} ({why}); checkpoint in {folder.checkpoint}. "
              f"Continue with the same arguments and --resume.")
        return {"stopped_at": step, "out": str(folder.path), "signal": stop.received}

    results = final_evaluation(args, imaml, tasks.test, folder)
    folder.plot_curves(rows, baseline=results.get("baseline", {}).get("accuracy"), test=results.get("test"),
                       step=step)
    return results


def _row_text(row: Dict[str, object]) -> str:
    if row["split"] == "validation":
        return (f"step {row['step']}: validation accuracy {100 * row['accuracy']:.2f}% "
                f"(best {100 * row['best_accuracy']:.2f}%)")
    text = (f"step {row['step']}: query loss {row['loss']:.4f}, accuracy {100 * row['accuracy']:.2f}%, "
            f"{row['tasks_per_s']:.1f} tasks/s")
    if "cg_breakdown" in row:
        text += f", CG breakdowns {100 * row['cg_breakdown']:.0f}%"
    return text


def evaluate_run(args: argparse.Namespace) -> Dict[str, object]:
    """``--evaluate RUN_FOLDER``: the checkpoint's model, adapted to --eval_tasks test tasks, beside
    the same adaptation from the run's random initialisation (--no-baseline skips it); nothing
    is trained. The test tasks are drawn as the run's own final evaluation draws them, so the
    same --eval_tasks gives the same tasks. The result is appended to evaluations.jsonl."""
    folder = RunFolder(args.evaluate)
    ckpt = read_checkpoint(folder, "--evaluate")
    run = argparse.Namespace(**{**vars(build_parser().parse_args([])), **ADDED_OPTION_DEFAULTS, **ckpt["config"]})
    for name in ("eval_tasks", "baseline", "device", "data", "download", "progress"):
        setattr(run, name, getattr(args, name))
    if args.eval_batch is not None:
        run.eval_batch = args.eval_batch
    device = Distributed(1, 0, 0).device(run.device)
    tasks = omniglot_tasks(run.ways, run.shots, run.query, images=_load_images(run), protocol=run.split,
                           split_seed=run.split_seed, seed=run.seed, device=device)
    model = build_model(run)
    model.load_state_dict(ckpt["model"])
    results = final_evaluation(run, build_imaml(model, run), tasks.test, folder, write=False)
    results.update(step=ckpt["step"], eval_batch=run.eval_batch, ways=run.ways, shots=run.shots)
    with open(folder.path / "evaluations.jsonl", "a") as f:
        f.write(json.dumps(results, sort_keys=True) + "\n")
    return results


def final_evaluation(args, imaml: IMAML, test_sampler: TaskSampler, folder: RunFolder,
                     write: bool = True) -> Dict[str, object]:
    results: Dict[str, object] = {
        "out": str(folder.path),
        "steps": args.steps,
        "machine": _machine(args.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if args.eval_tasks:
        indices = test_sampler.sample_indices(args.eval_tasks)  # the same tasks for both models
        start = time.perf_counter()
        results["test"] = summarise(evaluate(imaml, test_sampler, indices, args.eval_batch)["accuracy"])
        results["test"]["seconds"] = time.perf_counter() - start
        if args.baseline:
            baseline = build_imaml(build_model(args), args)
            results["baseline"] = summarise(evaluate(baseline, test_sampler, indices, args.eval_batch)["accuracy"])
    if write:
        folder.write_json(folder.results, results)
    return results


def _warn(bar, message: str) -> None:
    if bar is not None:
        bar.write(f"warning: {message}", file=sys.stderr)
    else:
        print(f"warning: {message}", file=sys.stderr)


def _progress(args, start_step: int):
    if not args.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=args.steps, initial=start_step, desc="meta-train", unit="step", dynamic_ncols=True)


def _version() -> str:
    from . import __version__

    return __version__


def _machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def format_results(args, results: Dict[str, object]) -> str:
    lines = []
    setting = f"{results.get('ways', args.ways)}-way {results.get('shots', args.shots)}-shot"
    if "test" in results:
        t = results["test"]
        lines.append(f"meta-test accuracy, {setting}, {t['tasks']} tasks: {t['accuracy']:.2f} ± {t['ci95']:.2f} % (95% CI)")
        if "baseline" in results:
            b = results["baseline"]
            lines.append(f"same adaptation from the random initialisation:      {b['accuracy']:.2f} ± {b['ci95']:.2f} %")
    lines.append(f"run folder: {results['out']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        results = evaluate_run(args) if args.evaluate is not None else train(args)
    except RunError as error:
        print(f"imaml-train: error: {error}", file=sys.stderr)
        return 2
    if "stopped_at" in results or "rank" in results:
        # Ctrl-C: the shell's 128 + SIGINT, after the checkpoint; SIGTERM (a job's time limit) and
        # --stop_after end as planned stops.
        return 128 + signal.SIGINT if results.get("signal") == signal.SIGINT else 0
    if args.evaluate is not None:
        print(f"checkpoint at meta-step {results['step']} of {args.evaluate}:")
    print(format_results(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
