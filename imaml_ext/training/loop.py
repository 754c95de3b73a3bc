"""The training recipe: ``train(cfg)`` runs (or resumes) the run that ``cfg`` describes.

``_train`` reads top to bottom: set-up (tasks, model, learner, meta-optimizer and schedule), a new
run or the checkpoint's state, the meta-steps (with their log rows, validations and checkpoints at
their intervals), the end of the invocation, and the final evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .checkpointing import extend, restore, write_checkpoint
from .config import RunConfig
from .distributed import Distributed
from .errors import RunError
from .evaluation import evaluate, final_evaluation, slice_indices, time_evaluation_shapes
from .learner import build_learning
from .metrics_log import MetricsLog
from .run_folder import RunFolder, check_out_folder
from .run_lock import RunLock, default_out
from .signals import Interrupted, StopSignal
from .start import checkpoint_to_resume, interruption
from .tasks import make_tasks
from .time_budget import TimeBudget, process_age
from .window import Window, breakdown_message


def train(cfg: RunConfig) -> Dict[str, object]:
    """Run (or resume) the training described by ``cfg``; returns the results dict."""
    budget = TimeBudget(cfg.time_budget, spent=process_age()) if cfg.time_budget is not None else None
    ddp = Distributed.from_env()
    made = cfg.out is None
    if made:
        if ddp.world > 1:
            raise RunError(f"--out must be given with {ddp.world} processes (each would make a default folder "
                           f"of its own)")
        cfg = dataclasses.replace(cfg, out=default_out(cfg))
    folder = RunFolder(cfg.out)
    check_out_folder(folder.path)
    config = cfg.recorded()
    phase: Dict[str, object] = {"at": "start-up"}  # where a Ctrl-C outside the meta-steps found the run
    ckpt = None
    try:
        # Rank 0 holds the lock: a second run in the same folder is refused until this one ends.
        with RunLock(folder.path, made) if ddp.rank == 0 else contextlib.nullcontext():
            ckpt = checkpoint_to_resume(cfg, folder, config, main=ddp.rank == 0)
            device = ddp.device(cfg.device)
            if cfg.meta_batch_size % ddp.world:
                raise RunError(f"--meta_batch_size {cfg.meta_batch_size} must be divisible by the {ddp.world} "
                               f"processes")
            ddp.start(device)  # after every rank has checked the run folder, before rank 0 writes to it
            try:
                return _train(cfg, folder, config, ckpt, ddp, device, budget, phase)
            finally:
                ddp.stop()
    except KeyboardInterrupt:
        raise Interrupted(interruption(phase, folder, ckpt)) from None


def _train(cfg: RunConfig, folder: RunFolder, config: Dict[str, object], ckpt: Optional[Dict[str, object]],
           ddp: Distributed, device: torch.device, budget: Optional[TimeBudget],
           phase: Dict[str, object]) -> Dict[str, object]:
    started = time.perf_counter()
    run = _Run(cfg, folder, config, ddp, device, budget)  # the tasks, model, learner, optimizer and schedule
    start_step = run.resume(ckpt) if ckpt is not None else run.start()
    run.log.open_bar(start_step)
    phase["at"] = "training"
    with StopSignal() as stop:
        step, timed_out = run.meta_steps(start_step, stop)
    run.end_window(step)

    # The end of this invocation: a checkpoint, then the final evaluation once the last step is done.
    run.save(step)
    if ddp.rank != 0:
        return {"rank": ddp.rank, "stopped_at": step, "signal": stop.received}
    run.log.close()
    evaluations = cfg.eval_tasks * (2 if cfg.baseline else 1)
    if step == cfg.steps and budget is not None and not budget.allows_evaluation(evaluations, cfg.meta_batch_size):
        timed_out = True
    folder.log_invocation(start_step, step, time.perf_counter() - started, cfg.device)
    if step < cfg.steps or timed_out:
        return _stopped(cfg, folder, run.log, step, stop.received, timed_out, budget)

    phase.update(at="evaluation", step=step)
    results = final_evaluation(cfg, run.learning.model, run.tasks.test, folder,
                               choices=run.learning.learner.timed_choices())
    folder.plot_curves(run.log.rows, baseline=results.get("baseline", {}).get("accuracy"), test=results.get("test"),
                       step=step)
    return results


class _Run:
    """One invocation's training: its set-up, and each part of the meta-step loop as a method."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, config: Dict[str, object], ddp: Distributed,
                 device: torch.device, budget: Optional[TimeBudget]):
        self.cfg, self.folder, self.config, self.ddp, self.device, self.budget = cfg, folder, config, ddp, device, budget
        self.main = ddp.rank == 0
        self.tasks = make_tasks(cfg, device)
        self.valid_indices = self.tasks.validation.sample_indices(cfg.valid_tasks) if cfg.valid_every else None
        self.learning = build_learning(cfg)
        self.window = Window(device)
        self.best_valid: Optional[float] = None
        self.log: Optional[MetricsLog] = None  # made by start() or resume(), with the rows so far
        self.captured = None  # --cuda_graph's captured meta-step
        self.warned_breakdown = False

    # ------------------------------------------------------------------ where the run starts

    def start(self) -> int:
        """A new run: every RNG seeded, the run folder with config.json and empty metrics."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        folder = self.folder
        if self.main:
            try:
                folder.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise RunError(f"--out {folder.path}: cannot make the run folder ({error.strerror or error})") from None
            folder.write_config(self.config, cfg.preset)
            folder.write_metrics([])
        # Before the first checkpoint, as the training shapes are (at the first meta-step).
        time_evaluation_shapes(self.learning.learner, self.tasks.validation, cfg)
        self.log = MetricsLog(cfg, folder, [], self.main)
        return 0

    def resume(self, ckpt: Dict[str, object]) -> int:
        """The checkpoint's state, and its rows of the metrics (what came after it is dropped)."""
        start_step, self.best_valid = restore(ckpt, self.learning, self.tasks, self.window)
        if ckpt["config"].get("steps") != self.cfg.steps:
            extend(self.cfg, self.folder, ckpt, self.learning, self.main)
        rows = [r for r in self.folder.read_metrics() if r["step"] <= start_step and not r.get("partial")]
        if self.main:
            self.folder.write_metrics(rows)  # drop what an interrupted run logged after its checkpoint
            if ckpt["config"] != self.config:  # a longer --steps, or other evaluation options
                # The --preset it started from, if any: a --preset given now only named the same values.
                self.folder.write_config(self.config, self.folder.recorded_preset())
        self.log = MetricsLog(self.cfg, self.folder, rows, self.main)
        return start_step

    # ------------------------------------------------------------------ the meta-steps

    def meta_steps(self, step: int, stop: StopSignal) -> Tuple[int, bool]:
        """Meta-steps from ``step`` to --steps (or --stop_after), each followed at its interval by a log
        row, a validation and a checkpoint; returns the step reached and whether --time_budget ended it."""
        cfg = self.cfg
        stop_at = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        self.window.restart_clock()
        stopping = False  # agreed by every process: one signalled rank must not leave the others waiting
        while step < stop_at and not stopping:
            if self._out_of_time(step):
                return step, True
            stats = self._meta_step(step, stop)
            stopping = self._stop_agreed(stats, stop, step, stop_at)
            self._update_theta()
            step += 1
            self.window.add(stats)
            if step % cfg.log_every == 0 or step == cfg.steps:
                self._log_window(step)
            if self.valid_indices is not None and step % cfg.valid_every == 0 and self.main:
                self._validate(step)
            if step % cfg.checkpoint_every == 0 and step < stop_at:
                self.save(step)
            self.log.advance()
        return step, False

    def _out_of_time(self, step: int) -> bool:
        """--time_budget: meta-step ``step + 1`` (with its validation) would not fit; every process agrees."""
        if self.budget is None:
            return False
        self.budget.lap()
        validates = self.valid_indices is not None and self.main and (step + 1) % self.cfg.valid_every == 0
        need = self.budget.allows_step(self.cfg.valid_tasks if validates else 0, self.cfg.meta_batch_size)
        return self.ddp.any(not need, self.device)

    def _meta_step(self, step: int, stop: StopSignal) -> torch.Tensor:
        """One meta-step on this process's share of the meta-batch; theta's gradient averaged over the
        processes, and the step's window values (see Window.step_statistics)."""
        cfg, ddp, learner = self.cfg, self.ddp, self.learning.learner
        # Every rank draws the same T tasks and runs its own T / world of them, so the run
        # equals one process with the whole meta-batch.
        indices = self.tasks.train.sample_indices(cfg.meta_batch_size)
        per_rank = cfg.meta_batch_size // ddp.world
        batch = self.tasks.train.gather(slice_indices(indices, ddp.rank * per_rank, (ddp.rank + 1) * per_rank))
        self.learning.optimizer.zero_grad(set_to_none=True)
        if cfg.cuda_graph:
            if self.captured is None:
                self.captured = learner.capture(*batch)
            result = self.captured.step(*batch)
        else:
            result = learner.meta_step(*batch)
        with torch.no_grad():
            stats, kept = self.window.step_statistics(result, stop.received is not None, step, ddp.rank * per_rank,
                                                      per_rank)
            return ddp.average_gradients_and(list(self.learning.model.parameters()), stats, kept)

    def _stop_agreed(self, stats: torch.Tensor, stop: StopSignal, step: int, stop_at: int) -> bool:
        """Whether every process stops after this step (a SIGINT or SIGTERM to any of them)."""
        if self.ddp.world == 1:
            return stop.received is not None
        if self.device.type == "cpu" or step + 1 == stop_at or (step + 1) % self.cfg.log_every == 0:
            stopping = bool(stats[-1] > 0)  # on a GPU read only where a log reads anyway
            if stopping and stop.received is None:
                stop.received = signal.SIGTERM  # another process was signalled
            return stopping
        return False

    def _update_theta(self) -> None:
        learning = self.learning
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(learning.model.parameters(), self.cfg.clip_grad)  # on the device: no sync
        learning.optimizer.step()
        if learning.scheduler is not None:
            learning.scheduler.step()

    # ------------------------------------------------------------------ at their intervals

    def _log_window(self, step: int) -> None:
        """The window's train row; a non-finite task stops the run (--on_nonfinite error) or is said."""
        cfg, window = self.cfg, self.window
        n = window.steps
        row = window.row(cfg, step, self.learning.optimizer.param_groups[0]["lr"])
        self.log.log(row)
        window.values.zero_()
        bad_tasks = row["nonfinite_tasks"]
        if bad_tasks:
            message = window.nonfinite_message(bad_tasks, step)
            if cfg.on_nonfinite == "error":
                self.save(step)  # theta is finite: the bad tasks never reached it
                self.log.close()
                raise RunError(f"{message}. Stopping (--on_nonfinite error) with a checkpoint at step {step} "
                               f"in {self.folder.checkpoint}; --resume --on_nonfinite skip-task goes on without "
                               f"such tasks.")
            self.log.warn(message)
            window.first_bad.fill_(-1)
        breakdown = row.get("cg_breakdown", 0.0)
        if breakdown > 0.5 and not self.warned_breakdown:
            self.warned_breakdown = True
            self.log.warn(breakdown_message(cfg, breakdown, step - n + 1, step))
        window.steps = 0
        window.restart_clock()
        self.log.show_window(row)

    def _validate(self, step: int) -> None:
        """Accuracy on the same --valid_tasks validation tasks each time, and the best so far."""
        budget = self.budget
        with budget.measure("validation", self.cfg.valid_tasks) if budget is not None else contextlib.nullcontext():
            metrics = evaluate(self.learning.learner, self.tasks.validation, self.valid_indices, self.cfg.eval_batch)
            acc = metrics["accuracy"].mean().item()
        self.best_valid = acc if self.best_valid is None else max(self.best_valid, acc)
        self.log.log({"split": "validation", "step": step, "loss": metrics["loss"].mean().item(),
                      "accuracy": acc, "best_accuracy": self.best_valid})
        self.window.restart_clock()

    def save(self, step: int) -> None:
        if not self.main:
            return  # every rank holds the same state: rank 0 writes it
        with self.budget.measure("checkpoint") if self.budget is not None else contextlib.nullcontext():
            write_checkpoint(self.folder, self.config, step, self.learning, self.tasks, self.window, self.best_valid)

    def end_window(self, step: int) -> None:
        """A stop inside a log window logs its steps so far, marked partial (a resume drops the row and
        logs the whole window at its end, as an uninterrupted run does); the bar closes."""
        if self.window.steps and step < self.cfg.steps:
            row = self.window.row(self.cfg, step, self.learning.optimizer.param_groups[0]["lr"])
            self.log.log({**row, "partial": True})
        self.log.close_bar()


def _stopped(cfg: RunConfig, folder: RunFolder, log: MetricsLog, step: int, received: Optional[int],
             timed_out: bool, budget: Optional[TimeBudget]) -> Dict[str, object]:
    """An invocation that ends before the final evaluation: says why and how to go on."""
    if received is not None:
        why = signal.Signals(received).name
    elif timed_out:
        what = "the final evaluation" if step == cfg.steps else "the next meta-step"
        why = f"--time_budget {cfg.time_budget:g} s: {what} would not fit in the {budget.left():.0f} s left"
    else:
        why = f"--stop_after {cfg.stop_after}"
    folder.plot_curves(log.rows)
    print(f"stopped at meta-step {step} of {cfg.steps} ({why}); checkpoint in {folder.checkpoint}. "
          f"Continue with the same arguments and --resume.")
    return {"stopped_at": step, "out": str(folder.path), "signal": received}
