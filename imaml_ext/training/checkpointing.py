"""What a checkpoint holds of a run, and the run put back from one: the model, the meta-optimizer
and its schedule, the task sampler, every RNG, the log window, the best validation accuracy and
"auto"'s timed choices; with a larger --steps, the run extended."""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

from .config import RunConfig
from .learner import Learning
from .run_folder import RunFolder, rng_state, save_checkpoint, set_rng_state
from .tasks import Tasks
from .window import Window


def write_checkpoint(folder: RunFolder, config: Dict[str, object], step: int, learning: Learning,
                     tasks: Tasks, window: Window, best_valid: Optional[float]) -> None:
    """checkpoint.pt at ``step`` (the one before kept as checkpoint.prev.pt)."""
    scheduler = learning.scheduler
    save_checkpoint(folder, {
        "config": config,
        "step": step,
        "model": learning.model.state_dict(),
        "optimizer": learning.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "sampler": tasks.train.generator.get_state(),
        "rng": rng_state(),
        "window": window.state(),
        "best_valid": best_valid,
        "timed_choices": learning.learner.timed_choices(),
    })


def restore(ckpt: Dict[str, object], learning: Learning, tasks: Tasks, window: Window) -> Tuple[int, Optional[float]]:
    """Puts the checkpoint's state back; returns its step and best validation accuracy."""
    learning.model.load_state_dict(ckpt["model"])
    learning.optimizer.load_state_dict(ckpt["optimizer"])
    if learning.scheduler is not None:
        learning.scheduler.load_state_dict(ckpt["scheduler"])
    tasks.train.generator.set_state(ckpt["sampler"])
    set_rng_state(ckpt["rng"])
    window.load(ckpt["window"])
    learning.learner.keep_timed_choices(ckpt.get("timed_choices"))
    return ckpt["step"], ckpt["best_valid"]


def extend(cfg: RunConfig, folder: RunFolder, ckpt: Dict[str, object], learning: Learning, main: bool) -> None:
    """--resume with another --steps: the run goes on to the new --steps. A cosine schedule is
    stretched to end there: from the checkpoint's step on, the learning rate follows the cosine
    over the new --steps (up again where the old one had decayed); earlier steps keep the old
    one's. The old results.json, if any, is kept as results-<old steps>-steps.json."""
    old, step = ckpt["config"]["steps"], ckpt["step"]
    optimizer, scheduler = learning.optimizer, learning.scheduler
    note = ""
    if scheduler is not None:
        scheduler.T_max = cfg.steps
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / cfg.steps)) / 2
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        note = (f"; the cosine schedule now ends at step {cfg.steps}: the learning rate goes on from "
                f"{scheduler._last_lr[0]:.3g}")
    if not main:
        return
    if folder.results.exists():
        os.replace(folder.results, folder.path / f"results-{old}-steps.json")
    print(f"extending the run in {folder.path} from --steps {old} to {cfg.steps}, at step {step}{note}")
