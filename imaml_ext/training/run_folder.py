"""The run folder (--out): config.json, the metrics (JSON lines and CSV), curves.png, and the
checkpoints with the RNG state they hold. Every file is written atomically."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .._io import atomic_write
from ..logging import strict, to_json
from .config import ADDED_OPTION_DEFAULTS, EVALUATION_KEYS, without_unread_options
from .errors import RunError
from .run_lock import LOCK_NAME

CHECKPOINT_FORMAT = 1
# What config.json holds beside the run's configuration.
CONFIG_METADATA = ("preset", "imaml_ext", "torch")
# What a run writes before its first checkpoint: a folder holding nothing else never got one.
EARLY_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "tensorboard")
CSV_COLUMNS = ("split", "step", "loss", "accuracy", "support_loss", "cg_residual", "cg_breakdown", "lr", "tasks_per_s",
               "nonfinite_tasks", "best_accuracy")


def _is_temporary(name: str) -> bool:
    """A file atomic_write had not yet renamed when the process stopped."""
    return name.endswith(".tmp") and any(name.startswith(f"{n}.") for n in (*EARLY_FILES, "checkpoint.new.pt"))


def read_json_lines(path: Path) -> List[Dict[str, object]]:
    """The rows of a JSON-lines file (none if it does not exist); a damaged line is a RunError naming it."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
    return rows


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
        self.invocations = self.path / "invocations.jsonl"  # one line per invocation: its steps and seconds

    def holds_run(self) -> List[str]:
        return [p.name for p in (self.config, self.checkpoint, self.jsonl, self.results) if p.exists()]

    def contents(self) -> Tuple[str, List[str], List[str]]:
        """What the folder holds: its state, the run's entries and the others (the lock file left
        out). States: "new" (absent or empty); "unstarted" (only what a run writes before its first
        checkpoint, with a run's config.json); "unstarted+other" (that, beside other files); "run"
        (a checkpoint or results); "other" (nothing of a run's)."""
        names = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME) if self.path.is_dir() else []
        ours = [n for n in names if n in EARLY_FILES or _is_temporary(n)]
        others = [n for n in names if n not in ours]
        if not names:
            return "new", ours, others
        if any(p.exists() for p in (self.checkpoint, self.previous, self.results)):
            return "run", ours, others
        if not ours or not (self._config_is_a_run() if self.config.exists() else all(map(_is_temporary, ours))):
            return "other", [], names  # e.g. another program's config.json
        return ("unstarted+other" if others else "unstarted"), ours, others

    def _config_is_a_run(self) -> bool:
        try:
            saved = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and {"task", "steps", "seed"} <= saved.keys()

    def clear_unstarted(self) -> None:
        """Removes what a run that never reached its first checkpoint wrote (see contents())."""
        for name in self.contents()[1]:
            path = self.path / name
            if path.is_dir():  # tensorboard/: its event files only
                for event in path.glob("events.out.tfevents.*"):
                    event.unlink()
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)

    def write_json(self, path: Path, obj) -> None:
        data = (to_json(obj, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(path, lambda f: f.write(data))

    def write_config(self, config: Dict[str, object], preset: Optional[str] = None) -> None:
        """config.json: the run's configuration (as its checkpoint holds it), the --preset it was
        resolved from (if any), and the versions that ran it."""
        named = {"preset": preset} if preset is not None else {}
        self.write_json(self.config, {**config, **named, "imaml_ext": _version(), "torch": torch.__version__})

    def recorded_preset(self) -> Optional[str]:
        """The --preset that config.json says the run started from (None: none, or no config.json)."""
        try:
            saved = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return None
        return saved.get("preset") if isinstance(saved, dict) else None

    def check_config(self, config: Dict[str, object], preset: Optional[str] = None) -> None:
        """A run folder without a checkpoint, which --resume starts: its config.json, if any, must
        be this run's (as a checkpoint's must on --resume)."""
        if not self.config.exists():
            return
        try:
            saved = json.loads(self.config.read_text())
        except ValueError as error:
            raise RunError(f"--resume: {self.config} is not JSON ({error}); choose another --out") from None
        saved = {k: v for k, v in saved.items() if k not in CONFIG_METADATA}
        refuse_other_config(self, f"{self.config.name} in {self.path}", saved, config, preset)

    def log_invocation(self, start_step: int, step: int, seconds: float, device: str) -> None:
        """Appends this invocation's meta-steps and wall time (set-up, steps, validations, checkpoints)."""
        line = {"from_step": start_step, "to_step": step, "seconds": seconds, "device": device,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(self.invocations, "a") as f:
            f.write(to_json(line, sort_keys=True) + "\n")

    def read_metrics(self) -> List[Dict[str, object]]:
        return read_json_lines(self.jsonl)

    def write_metrics(self, rows: List[Dict[str, object]]) -> None:
        text = "".join(to_json(r, sort_keys=True) + "\n" for r in rows).encode()
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
        writer.writerows(strict(r) for r in rows)  # a NaN (no task kept) as an empty cell, as null in JSON
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
        except ImportError as error:  # an optional extra: say so, once per invocation (one call each)
            print(f"note: {self.plot} was not written: it needs matplotlib ({error}); pip install matplotlib "
                  f"(or the imaml_ext[train] extra) for the curves", file=sys.stderr)
            return False
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for split, style in (("train", "-"), ("validation", "o-")):
            part = [r for r in rows if r["split"] == split]
            if part:
                steps = [r["step"] for r in part]
                loss, acc = ([math.nan if r[k] is None else r[k] for r in part] for k in ("loss", "accuracy"))
                ax_loss.plot(steps, loss, style, label=f"{split} query loss")
                ax_acc.plot(steps, [100 * a for a in acc], style, label=f"{split} query accuracy")
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


def _previous_hint(folder: RunFolder, flag: str = "--resume", damaged: bool = False) -> str:
    """How to go on from the previous checkpoint; for a ``damaged`` latest one with no readable
    previous, what else to do."""
    unreadable = ""
    if folder.previous.exists():
        try:
            step = torch.load(folder.previous, map_location="cpu", weights_only=True)["step"]
            return (f" The previous checkpoint is kept: move {folder.previous.name} to {folder.checkpoint.name} "
                    f"to resume from step {step}.")
        except Exception:
            unreadable = f" The previous checkpoint {folder.previous} is unreadable too."
    if not damaged:
        return unreadable
    restart = ", or start the run again without --resume in a new --out" if flag == "--resume" else ""
    return (f" The file is damaged (truncated, or overwritten in part) and no readable earlier checkpoint is "
            f"kept.{unreadable} Restore {folder.checkpoint.name} from a copy{restart}.")


def read_checkpoint(folder: RunFolder, flag: str = "--resume") -> Dict[str, object]:
    if not folder.checkpoint.exists():
        start = "start the run without --resume" if flag == "--resume" else "is it a run folder?"
        raise RunError(f"{flag}: {folder.checkpoint} does not exist; {start}." + _previous_hint(folder))
    try:
        ckpt = torch.load(folder.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: name it, never a raw unpickling trace
        # Its first sentence: torch's unpickling messages go on to advise weights_only=False.
        cause = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise RunError(f"{flag}: cannot read {folder.checkpoint} ({type(error).__name__}: {cause})."
                       + _previous_hint(folder, flag, damaged=True)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{flag}: {folder.checkpoint} is not an imaml_ext checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def refuse_other_config(folder: RunFolder, what: str, saved: Dict[str, object], config: Dict[str, object],
                        preset: Optional[str] = None) -> None:
    """--resume: refuses a run whose ``saved`` configuration (``what``: its checkpoint or config.json)
    differs from ``config`` in anything but --steps and the evaluation options, naming each value."""
    # Runs from before an option existed ran with its default; MAML runs recorded iMAML's options once.
    saved = without_unread_options({**ADDED_OPTION_DEFAULTS, **saved})
    differ = [k for k in sorted(set(saved) | set(config))
              if saved.get(k) != config.get(k) and k not in (*EVALUATION_KEYS, "steps")]
    if not differ:
        return
    source = "checkpoint" if what.startswith("the checkpoint") else "run"
    now = f"--preset {preset}" if preset is not None else "now"
    shown = "; ".join(f"--{k}: {source} {saved.get(k)!r}, {now} {config.get(k)!r}" for k in differ)
    undamped = not saved.get("cg_damping") and not saved.get("lam_damping") and "cg_damping" in differ
    raise RunError(
        f"--resume: {what} is from another configuration ({shown}). "
        + ("The defaults are now the iMAML authors' damping: --undamped resumes a run that had none. "
           if undamped else "")
        + ("Options given beside --preset win over its values. " if preset is not None else "")
        + "Resume with the same arguments, or start a new run in another --out."
    )


def load_checkpoint(folder: RunFolder, config: Dict[str, object], preset: Optional[str] = None) -> Dict[str, object]:
    ckpt = read_checkpoint(folder)
    refuse_other_config(folder, f"the checkpoint in {folder.path}", ckpt["config"], config, preset)
    if config["steps"] < ckpt["step"]:
        raise RunError(f"--resume: --steps {config['steps']} is below the checkpoint's step {ckpt['step']} in "
                       f"{folder.path}; give --steps {ckpt['step']} or more (a larger --steps extends the run)")
    return ckpt



def save_checkpoint(folder: RunFolder, state: Dict[str, object]) -> None:
    """Writes ``state`` (with the format number) as the checkpoint; the one before is kept as
    checkpoint.prev.pt. Each file is complete whenever the process stops."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    fresh = folder.path / "checkpoint.new.pt"
    atomic_write(fresh, lambda f: torch.save(state, f))
    if folder.checkpoint.exists():
        os.replace(folder.checkpoint, folder.previous)
    os.replace(fresh, folder.checkpoint)


def _version() -> str:
    from .. import __version__

    return __version__
