"""The run's rows (train windows and validations): metrics.jsonl as they come, metrics.csv, each row
as a line or a progress bar, and tensorboard's scalars. Only rank 0 writes or prints."""

from __future__ import annotations

import math
import sys
from typing import Dict, List

from ..logging import to_json
from .config import RunConfig
from .run_folder import RunFolder


class MetricsLog:
    """``rows``: those logged before (a resumed run's, up to its checkpoint); ``main``: rank 0."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, rows: List[Dict[str, object]], main: bool):
        self.cfg, self.folder, self.rows, self.main = cfg, folder, rows, main
        self.logger = None
        if cfg.tensorboard and main:
            from ..logging import TensorBoardLogger

            self.logger = TensorBoardLogger(str(folder.tensorboard))
        self.bar = None

    def open_bar(self, start_step: int) -> None:
        self.bar = _progress(self.cfg, start_step) if self.main else None

    def log(self, row: Dict[str, object]) -> None:
        self.rows.append(row)
        if not self.main:
            return
        with open(self.folder.jsonl, "a") as f:
            f.write(to_json(row, sort_keys=True) + "\n")
        if self.bar is None:  # no progress bar (--no-progress): the rows themselves, one line each
            print(row_text(row), flush=True)
        if self.logger is not None:
            self.logger.log({k: v for k, v in row.items() if k not in ("split", "step")}, tag=row["split"],
                            step=row["step"])
        if self.bar is not None and row["split"] == "validation":
            self.bar.write(row_text(row))

    def show_window(self, row: Dict[str, object]) -> None:
        """The progress bar's figures after a train row."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{100 * row['accuracy']:.1f}%",
                                 tasks_s=f"{row['tasks_per_s']:.0f}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"warning: {message}", file=sys.stderr)
        else:
            print(f"warning: {message}", file=sys.stderr)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        """metrics.csv, then tensorboard's file and the bar closed."""
        if self.main:
            self.folder.write_csv(self.rows)
        if self.logger is not None:
            self.logger.close()
        self.close_bar()


def row_text(row: Dict[str, object]) -> str:
    if row["split"] == "validation":
        return (f"step {row['step']}: validation accuracy {100 * row['accuracy']:.2f}% "
                f"(best {100 * row['best_accuracy']:.2f}%)")
    if math.isnan(row["loss"]) and row.get("nonfinite_tasks"):
        text = f"step {row['step']}: no loss, all {row['nonfinite_tasks']} tasks left out (non-finite)"
    else:
        text = f"step {row['step']}: query loss {row['loss']:.4f}, accuracy {100 * row['accuracy']:.2f}%"
    text += f", {row['tasks_per_s']:.1f} tasks/s"
    if "cg_breakdown" in row:
        text += f", CG breakdowns {100 * row['cg_breakdown']:.0f}%"
    return text


def _progress(cfg: RunConfig, start_step: int):
    if not cfg.progress or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None  # a file or a pipe gets the rows as lines, not a bar's every frame
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start_step, desc="meta-train", unit="step", dynamic_ncols=True)
