"""The training command line: ``python -m imaml_ext.train`` (or ``imaml-train``); ``--help`` says it all.

The code lives in :mod:`imaml_ext.training`, one file per concern (arguments and presets,
the run folder and checkpoints, distributed set-up, signals, the time budget, evaluation,
the loop); this module is the entry point.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence

from .training.arguments import parse_args
from .training.errors import RunError
from .training.evaluation import evaluate_run, format_results
from .training.loop import train
from .training.signals import Interrupted


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = None
    try:
        args = parse_args(argv)
        results = evaluate_run(args) if args.evaluate is not None else train(args)
    except RunError as error:
        print(f"imaml-train: error: {error}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as error:  # Ctrl-C outside the meta-steps: one line, no traceback
        where = str(error) if isinstance(error, Interrupted) else (
            f"during --evaluate {args.evaluate}; nothing was written" if args is not None and args.evaluate is not None
            else "during start-up; nothing was written")
        print(f"imaml-train: interrupted (SIGINT) {where}", file=sys.stderr)
        return 128 + signal.SIGINT
    if "stopped_at" in results or "rank" in results:
        # Ctrl-C: the shell's 128 + SIGINT, after the checkpoint; SIGTERM (a job's time limit),
        # --stop_after and --time_budget end as planned stops.
        return 128 + signal.SIGINT if results.get("signal") == signal.SIGINT else 0
    if args.evaluate is not None:
        print(f"checkpoint at meta-step {results['step']} of {args.evaluate}:")
    print(format_results(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
