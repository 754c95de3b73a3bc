"""The training loop: ``train(args)`` runs (or resumes) the run that ``args`` (a RunConfig) describe."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from ..logging import to_json
from .config import RunConfig
from .distributed import Distributed
from .errors import RunError
from .evaluation import evaluate, final_evaluation, slice_indices, time_evaluation_shapes
from .learner import build_imaml, build_model
from .run_folder import RunFolder, check_out_folder, rng_state, save_checkpoint, set_rng_state
from .run_lock import RunLock, default_out
from .signals import Interrupted, StopSignal
from .start import checkpoint_to_resume, interruption
from .tasks import make_tasks
from .time_budget import TimeBudget, process_age

WINDOW_KEYS = ("loss", "accuracy", "support_loss", "cg_residual", "cg_breakdown", "nonfinite")


def train(args: RunConfig) -> Dict[str, object]:
    """Run (or resume) the training described by ``args``; returns the results dict."""
    budget = TimeBudget(args.time_budget, spent=process_age()) if args.time_budget is not None else None
    ddp = Distributed.from_env()
    made = args.out is None
    if made:
        if ddp.world > 1:
            raise RunError(f"--out must be given with {ddp.world} processes (each would make a default folder "
                           f"of its own)")
        args = dataclasses.replace(args, out=default_out(args))
    folder = RunFolder(args.out)
    check_out_folder(folder.path)
    config = args.recorded()
    phase: Dict[str, object] = {"at": "start-up"}  # where a Ctrl-C outside the meta-steps found the run
    ckpt = None
    try:
        # Rank 0 holds the lock: a second run in the same folder is refused until this one ends.
        with RunLock(folder.path, made) if ddp.rank == 0 else contextlib.nullcontext():
            ckpt = checkpoint_to_resume(args, folder, config, main=ddp.rank == 0)
            device = ddp.device(args.device)
            if args.meta_batch_size % ddp.world:
                raise RunError(f"--meta_batch_size {args.meta_batch_size} must be divisible by the {ddp.world} "
                               f"processes")
            ddp.start(device)  # after every rank has checked the run folder, before rank 0 writes to it
            try:
                return _train(args, folder, config, ckpt, ddp, device, budget, phase)
            finally:
                ddp.stop()
    except KeyboardInterrupt:
        raise Interrupted(interruption(phase, folder, ckpt)) from None


def _train(args, folder: RunFolder, config, ckpt, ddp: Distributed, device: torch.device,
           budget: Optional[TimeBudget], phase: Dict[str, object]) -> Dict[str, object]:
    main_rank = ddp.rank == 0
    started = time.perf_counter()

    # The tasks, the learner and its meta-optimizer.
    tasks = make_tasks(args, device)
    valid_indices = tasks.validation.sample_indices(args.valid_tasks) if args.valid_every else None

    model = build_model(args)
    imaml = build_imaml(model, args)
    optimizer_cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=args.meta_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps) if args.scheduler == "cosine" else None

    # Where the run stands: the checkpoint's state, or a new run folder.
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
        imaml.keep_timed_choices(ckpt.get("timed_choices"))
        if ckpt["config"].get("steps") != args.steps:
            _extend(args, folder, ckpt, optimizer, scheduler, main_rank)
        rows = [r for r in folder.read_metrics() if r["step"] <= start_step and not r.get("partial")]
        if main_rank:
            folder.write_metrics(rows)  # drop what an interrupted run logged after its checkpoint
            if ckpt["config"] != config:  # a longer --steps, or other evaluation options
                # The --preset it started from, if any: a --preset given now only named the same values.
                folder.write_config(config, folder.recorded_preset())
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
            folder.write_config(config, args.preset)
            folder.write_metrics(rows)
        # Before the first checkpoint, as the training shapes are (at the first meta-step).
        time_evaluation_shapes(imaml, tasks.validation, args)

    logger = None
    if args.tensorboard and main_rank:
        from ..logging import TensorBoardLogger

        logger = TensorBoardLogger(str(folder.tensorboard))

    def save(step: int) -> None:
        if not main_rank:
            return  # every rank holds the same state: rank 0 writes it
        with budget.measure("checkpoint") if budget is not None else contextlib.nullcontext():
            save_checkpoint(folder, {
                "config": config,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "sampler": tasks.train.generator.get_state(),
                "rng": rng_state(),
                "window": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in window.items()},
                "best_valid": best_valid,
                "timed_choices": imaml.timed_choices(),
            })

    def log_row(row: Dict[str, object]) -> None:
        rows.append(row)
        if not main_rank:
            return
        with open(folder.jsonl, "a") as f:
            f.write(to_json(row, sort_keys=True) + "\n")
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

    def out_of_time(step: int) -> bool:
        """--time_budget: meta-step ``step + 1`` (with its validation) would not fit; every process agrees."""
        if budget is None:
            return False
        budget.lap()
        validates = valid_indices is not None and main_rank and (step + 1) % args.valid_every == 0
        return ddp.any(not budget.allows_step(args.valid_tasks if validates else 0, args.meta_batch_size), device)

    # The meta-steps.
    captured = None
    warned_breakdown = False
    timed_out = False
    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    bar = _progress(args, start_step) if main_rank else None
    window_start = time.perf_counter()
    step = start_step
    phase["at"] = "training"
    with StopSignal() as stop:
        first_bad = torch.full((2,), -1.0, device=device)  # (step, task) of the first non-finite task
        stopping = False  # agreed by every process: one signalled rank must not leave the others waiting
        while step < stop_at and not stopping:
            if out_of_time(step):
                timed_out = True
                break
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
                stats = torch.cat([
                    _kept_share_means(result, zero),
                    (result.cg.breakdown.float().mean() if result.cg is not None else zero).view(1),
                    (result.nonfinite.float().mean() if result.nonfinite is not None else zero).view(1),
                    (zero + float(stop.received is not None)).view(1),
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
                row = _window_row(args, window, step, time.perf_counter() - window_start,
                                  optimizer.param_groups[0]["lr"])
                loss, acc, breakdown, bad_tasks = (row["loss"], row["accuracy"], row.get("cg_breakdown", 0.0),
                                                   row["nonfinite_tasks"])
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
                    _warn(bar, _breakdown_message(args, breakdown, step - n + 1, step))
                window["steps"] = 0
                window_start = time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}%", tasks_s=f"{row['tasks_per_s']:.0f}")
            if valid_indices is not None and step % args.valid_every == 0 and main_rank:
                with budget.measure("validation", args.valid_tasks) if budget is not None else contextlib.nullcontext():
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
    if window["steps"] and step < args.steps:
        # A stop inside a log window logs its steps so far, marked partial: a resume drops the row
        # and logs the whole window at its end, as an uninterrupted run does.
        log_row({**_window_row(args, window, step, time.perf_counter() - window_start,
                               optimizer.param_groups[0]["lr"]), "partial": True})

    # The end of this invocation: a checkpoint, then the final evaluation once the last step is done.
    save(step)
    if not main_rank:
        return {"rank": ddp.rank, "stopped_at": step, "signal": stop.received}
    folder.write_csv(rows)
    if logger is not None:
        logger.close()
    evaluations = args.eval_tasks * (2 if args.baseline else 1)
    if step == args.steps and budget is not None and not budget.allows_evaluation(evaluations, args.meta_batch_size):
        timed_out = True
    folder.log_invocation(start_step, step, time.perf_counter() - started, args.device)

    if step < args.steps or timed_out:
        if stop.received is not None:
            why = signal.Signals(stop.received).name
        elif timed_out:
            what = "the final evaluation" if step == args.steps else "the next meta-step"
            why = f"--time_budget {args.time_budget:g} s: {what} would not fit in the {budget.left():.0f} s left"
        else:
            why = f"--stop_after {args.stop_after}"
        folder.plot_curves(rows)
        print(f"stopped at meta-step {step} of {args.steps} ({why}); checkpoint in {folder.checkpoint}. "
              f"Continue with the same arguments and --resume.")
        return {"stopped_at": step, "out": str(folder.path), "signal": stop.received}

    phase.update(at="evaluation", step=step)
    results = final_evaluation(args, model, tasks.test, folder, choices=imaml.timed_choices())
    folder.plot_curves(rows, baseline=results.get("baseline", {}).get("accuracy"), test=results.get("test"),
                       step=step)
    return results


def _breakdown_message(args, share: float, first: int, last: int) -> str:
    """The CG breakdown warning, with a remedy true for the damping in force."""
    said = (f"CG broke down (p'Ap <= 0, or a NaN or Inf) on {100 * share:.0f}% of the tasks of steps {first}-{last}, "
            f"so those tasks' meta-gradients stop at the last good CG iterate. ")
    c, d = args.cg_damping, args.lam_damping
    if not c and not d:
        return said + (f"The system I + H/lam is indefinite where the support loss's Hessian H has an eigenvalue "
                       f"below -lam = -{args.lam:g}: damping (--cg_damping 1 --lam_damping 10, the iMAML authors' "
                       f"values, the default without --undamped) or more inner steps keep it positive definite.")
    return said + (f"With the damping in force (--cg_damping {c:g} --lam_damping {d:g}) the system "
                   f"(1 + {c:g}) I + H/({args.lam:g} + {d:g}) is indefinite only where H has an eigenvalue below "
                   f"{-(1 + c) * (args.lam + d):g}, far from the inner minimum, or where the products were not finite: "
                   f"a smaller --base_lr, more --inner_steps or a larger --cg_damping / --lam_damping keep it "
                   f"positive definite.")


def _kept_share_means(result, zero: torch.Tensor) -> torch.Tensor:
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


def _window_row(args, window: Dict[str, object], step: int, elapsed: float, lr: float) -> Dict[str, object]:
    """The train row of the log window ending at ``step``: means over its steps' kept tasks."""
    n = window["steps"]
    # The one host sync per log window.
    loss, acc, support, residual, breakdown, nonfinite = (window["values"] / n).tolist()
    bad_tasks = round(nonfinite * n * args.meta_batch_size)
    # Means over the tasks kept; none kept: NaN (null in metrics.jsonl), never a 0.
    loss, acc, support, residual = (v / (1 - nonfinite) if bad_tasks < n * args.meta_batch_size
                                    else math.nan for v in (loss, acc, support, residual))
    row = {"split": "train", "step": step, "loss": loss, "accuracy": acc, "support_loss": support,
           "cg_residual": residual, "cg_breakdown": breakdown, "lr": lr,
           "tasks_per_s": n * args.meta_batch_size / elapsed}
    if args.algo != "imaml":  # nothing is solved
        del row["cg_residual"], row["cg_breakdown"]
    row["nonfinite_tasks"] = bad_tasks
    return row


def _row_text(row: Dict[str, object]) -> str:
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


def _warn(bar, message: str) -> None:
    if bar is not None:
        bar.write(f"warning: {message}", file=sys.stderr)
    else:
        print(f"warning: {message}", file=sys.stderr)


def _progress(args, start_step: int):
    if not args.progress or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None  # a file or a pipe gets the rows as lines, not a bar's every frame
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=args.steps, initial=start_step, desc="meta-train", unit="step", dynamic_ncols=True)
