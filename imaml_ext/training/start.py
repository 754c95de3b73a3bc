"""Where an invocation starts: a new run, a run that stopped before its first checkpoint started
again, or a resumed one; and what a Ctrl-C outside the meta-steps (which end with a checkpoint)
says on its way out."""

from __future__ import annotations

from typing import Dict, List, Optional

from .config import RunConfig
from .errors import RunError
from .run_folder import RunFolder, load_checkpoint


def checkpoint_to_resume(args: RunConfig, folder: RunFolder, config: Dict[str, object],
                         main: bool) -> Optional[Dict[str, object]]:
    """The checkpoint to continue from, or None to start at step 0. A folder holding only what a
    run writes before its first checkpoint (a crash or a kill in its first meta-steps) starts
    again, with or without --resume (with it, if its config.json is this run's); so does an
    absent or empty one (with --resume only as the first invocation of a --time_budget chain).
    A folder with a checkpoint or results is never started over, nor one with other files."""
    state, ours, others = folder.contents()
    if state == "run":
        if args.resume:
            return load_checkpoint(folder, config, preset=args.preset)
        raise RunError(f"--out {folder.path} already holds a run ({', '.join(folder.holds_run())}); pass --resume "
                       f"to continue it, or choose another --out (nothing was overwritten)")
    if state == "other":
        raise RunError(f"--out {folder.path} holds files that are not a run's ({_listed(others)}); choose a new or "
                       f"empty folder (nothing was written)")
    if state == "unstarted+other":
        raise RunError(f"--out {folder.path} holds a run that stopped before its first checkpoint ({_listed(ours)}) "
                       f"beside files that are not a run's ({_listed(others)}): move those away to start it again, "
                       f"or choose another --out (nothing was overwritten)")
    if args.resume and state == "new" and args.time_budget is None:
        return load_checkpoint(folder, config, preset=args.preset)  # says there is no checkpoint to resume
    if args.resume:
        folder.check_config(config, preset=args.preset)
    if state == "unstarted" and main:
        print(f"{'--resume: ' if args.resume else ''}{folder.path} holds a run that stopped before its first "
              f"checkpoint ({_listed(ours)}): starting it from step 0", flush=True)
        folder.clear_unstarted()
    return None


def _listed(names: List[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def interruption(phase: Dict[str, object], folder: RunFolder, ckpt: Optional[Dict[str, object]]) -> str:
    """What a Ctrl-C at ``phase["at"]`` left, and how to go on (the loop's own stop, after the
    current meta-step with a checkpoint, is not this: this is a Ctrl-C outside it, or a second)."""
    at = phase["at"]
    if at == "evaluation":
        return (f"during the final evaluation; the checkpoint at meta-step {phase['step']} is in {folder.checkpoint}: "
                f"the same command with --resume evaluates it")
    if at == "training":
        if not folder.checkpoint.exists():
            return "before the run's first checkpoint; nothing to resume: the same command starts it again"
        return (f"before a checkpoint of the last meta-steps; the same command with --resume goes on from the last "
                f"one, {folder.checkpoint}")
    if ckpt is not None:
        return (f"during start-up; the checkpoint at meta-step {ckpt['step']} in {folder.checkpoint} is unchanged: "
                f"the same command goes on from it")
    return "during start-up, before the first meta-step; nothing to resume: the same command starts the run again"
