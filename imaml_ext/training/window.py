"""The log window: what each meta-step adds to it (kept on the device, no host sync), the train
row it becomes every --log_every steps, and the warnings that row may call for."""

from __future__ import annotations

import math
import time
from typing import Dict, Tuple

import torch

from .config import RunConfig

WINDOW_KEYS = ("loss", "accuracy", "support_loss", "cg_residual", "cg_breakdown", "nonfinite")


class Window:
    """Sums over the log window of the meta-batch's means (over all processes): no sync until read;
    the (step, task) of its first non-finite task; the wall clock since it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values = torch.zeros(len(WINDOW_KEYS), device=device)
        self.steps = 0
        self.first_bad = torch.full((2,), -1.0, device=device)
        self.started = time.perf_counter()

    def state(self) -> Dict[str, object]:
        """What a checkpoint keeps (a stop inside a window goes on with its sums)."""
        return {"values": self.values.cpu(), "steps": self.steps}

    def load(self, state: Dict[str, object]) -> None:
        self.values, self.steps = state["values"].to(self.device), state["steps"]

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def step_statistics(self, result, stopped: bool, step: int, offset: int,
                        per_rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The meta-step's window values, with a last one saying whether this process was
        signalled, and the count of its kept tasks; remembers the first non-finite task (``offset``:
        this process's first task in the meta-batch)."""
        zero = torch.zeros((), device=self.device)
        stats = torch.cat([
            kept_share_means(result, zero),
            (result.cg.breakdown.float().mean() if result.cg is not None else zero).view(1),
            (result.nonfinite.float().mean() if result.nonfinite is not None else zero).view(1),
            (zero + float(stopped)).view(1),
        ])
        if result.nonfinite is not None:  # remember the first, on the device
            here = torch.stack([zero + step + 1, (result.nonfinite.int().argmax() + offset).to(zero.dtype)])
            self.first_bad = torch.where((self.first_bad[0] < 0) & result.nonfinite.any(), here, self.first_bad)
        kept = (~result.nonfinite).sum() if result.nonfinite is not None else zero + per_rank
        return stats, kept

    def add(self, stats: torch.Tensor) -> None:
        self.values += stats[: len(WINDOW_KEYS)]
        self.steps += 1

    def row(self, cfg: RunConfig, step: int, lr: float) -> Dict[str, object]:
        """The train row of the log window ending at ``step``: means over its steps' kept tasks."""
        n = self.steps
        elapsed = time.perf_counter() - self.started
        # The one host sync per log window.
        loss, acc, support, residual, breakdown, nonfinite = (self.values / n).tolist()
        bad_tasks = round(nonfinite * n * cfg.meta_batch_size)
        # Means over the tasks kept; none kept: NaN (null in metrics.jsonl), never a 0.
        loss, acc, support, residual = (v / (1 - nonfinite) if bad_tasks < n * cfg.meta_batch_size
                                        else math.nan for v in (loss, acc, support, residual))
        row = {"split": "train", "step": step, "loss": loss, "accuracy": acc, "support_loss": support,
               "cg_residual": residual, "cg_breakdown": breakdown, "lr": lr,
               "tasks_per_s": n * cfg.meta_batch_size / elapsed}
        if cfg.algo != "imaml":  # nothing is solved
            del row["cg_residual"], row["cg_breakdown"]
        row["nonfinite_tasks"] = bad_tasks
        return row

    def nonfinite_message(self, bad_tasks: int, step: int) -> str:
        s_bad, t_bad = (int(v) for v in self.first_bad.tolist())
        first = f" (the first: step {s_bad}, task {t_bad} of its meta-batch)" if s_bad >= 0 else ""
        return (f"a non-finite support or query loss, or meta-gradient, in {bad_tasks} task(s) of steps "
                f"{step - self.steps + 1}-{step}{first}; they were left out of theta's update")


def kept_share_means(result, zero: torch.Tensor) -> torch.Tensor:
    """[query loss, accuracy, support loss, CG residual], each a mean over the step's kept (finite)
    tasks times their share of the meta-batch: a window's sum of these over its share of kept tasks
    is the mean over every kept task, and a step whose tasks were all left out adds nothing."""
    bad = result.nonfinite
    share = 1 - bad.float().mean() if bad is not None else zero + 1
    residual = zero
    if result.cg is not None:
        norms = result.cg.residual_norm
        residual = norms.mean() if bad is None else torch.where(bad, 0, norms).sum() / (~bad).sum().clamp(min=1)
    values = torch.stack([result.loss, result.accuracy, result.support_loss, residual])
    return torch.where(share > 0, values * share, zero)


def breakdown_message(cfg: RunConfig, share: float, first: int, last: int) -> str:
    """The CG breakdown warning, with a remedy true for the damping in force."""
    said = (f"CG broke down (p'Ap <= 0, or a NaN or Inf) on {100 * share:.0f}% of the tasks of steps {first}-{last}, "
            f"so those tasks' meta-gradients stop at the last good CG iterate. ")
    c, d = cfg.cg_damping, cfg.lam_damping
    if not c and not d:
        return said + (f"The system I + H/lam is indefinite where the support loss's Hessian H has an eigenvalue "
                       f"below -lam = -{cfg.lam:g}: damping (--cg_damping 1 --lam_damping 10, the iMAML authors' "
                       f"values, the default without --undamped) or more inner steps keep it positive definite.")
    return said + (f"With the damping in force (--cg_damping {c:g} --lam_damping {d:g}) the system "
                   f"(1 + {c:g}) I + H/({cfg.lam:g} + {d:g}) is indefinite only where H has an eigenvalue below "
                   f"{-(1 + c) * (cfg.lam + d):g}, far from the inner minimum, or where the products were not finite: "
                   f"a smaller --base_lr, more --inner_steps or a larger --cg_damping / --lam_damping keep it "
                   f"positive definite.")
