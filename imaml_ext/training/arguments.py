"""The command line's options: the parser, presets (--preset), and the run's configuration
(``config.RunConfig``) built and checked from what was given."""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

from ..batched import forwards
from ..data import PROTOCOLS
from .config import ADDED_OPTION_DEFAULTS, ALGOS, AUTHORS_DAMPING, MODELS, TASKS, RunConfig
from .errors import RunError
from .presets import PRESETS

DESCRIPTION = """Train implicit MAML on Omniglot or Mini-ImageNet: python -m imaml_ext.train (or imaml-train).

Every task of a meta-batch runs at once (imaml_ext.IMAML). The run folder (--out) gets
config.json, metrics.jsonl and metrics.csv (one row per log window and per validation),
curves.png, checkpoint.pt and the one before it, checkpoint.prev.pt (written atomically every
--checkpoint_every steps and at the end; --resume continues bit for bit), invocations.jsonl
(each invocation's steps and seconds) and results.json (meta-test accuracy over --eval_tasks
test tasks with its 95 % confidence interval, beside the same adaptation from the random
initialisation); --evaluate RUN_FOLDER appends to RUN_FOLDER/evaluations.jsonl.

The defaults are Omniglot 5-way 1-shot with the paper's optimisation values (lambda = 2, 16
inner steps, 5 CG iterations, meta-batch 32, Adam) but not its setting: 15 query images per
class, 10,000 meta-steps, and a test-time adaptation with lambda = --lam. The paper's setting
for a table entry is --preset omniglot-5w1s (5w5s, 20w1s, 20w5s): query = shots, 20,000
meta-steps, test-time lambda 0 (docs/accuracy-protocol.md); options given beside it win.
make demo runs a short version of the defaults. --time_budget SECONDS stops (with a
checkpoint) before the time is up: repeat the same command with --resume to go on.

--task mini-imagenet reads learn2learn's three mini-imagenet-cache-*.pkl files from
--data DIR (in DIR/mini-imagenet/ or DIR; never downloaded) with a restricted unpickler;
--preset mini-imagenet-5w1s (5w5s) and --model resnet12: see docs/mini-imagenet.md.
"""

_UNSET = object()


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
        if ("default:" in text.lower() or not action.option_strings or action.nargs == 0
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
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    _add(p, "preset", default=None, metavar="NAME",
         help=f"the iMAML paper's setting for one table entry: {', '.join(PRESETS)} (the Mini-ImageNet ones "
              f"fill in values the paper does not give; imaml_ext/training/presets.py gives each value's source); "
              f"options given beside it win")
    task = p.add_argument_group("task")
    _add(task, "task", default="omniglot", help=f"data set: {', '.join(TASKS)}")
    _add(task, "ways", type=int, default=5, help="classes per task")
    _add(task, "shots", type=int, default=1, help="support examples per class")
    _add(task, "query", type=int, default=15, help="query examples per class")
    _add(task, "split", default="finn", choices=PROTOCOLS,
         help="Omniglot's class split: finn (MAML/iMAML: first 1200 characters train, rest test) or l2l "
              "(learn2learn's); Mini-ImageNet's is its three files'")
    _add(task, "split_seed", type=int, default=0, help="seed of the l2l class shuffle")
    _add(task, "data", default=None,
         help="data folder: Omniglot's, or the one holding mini-imagenet/ (default: $IMAML_DATA if set; else the "
              "first that holds the data of ./data, ../shared/data, the checkout's ../shared/data and CACHE/data, "
              "where --download puts Omniglot; CACHE is $IMAML_CACHE or ~/.cache/imaml_ext)")
    _add(task, "download", action="store_true",
         help="download the official Omniglot zips if no data are found (Mini-ImageNet is never downloaded)")

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
              "the inner minimum, see docs/cg-damping.md)")
    _add(algo, "clip_grad", type=float, default=0.0, help="clip the meta-gradient's norm to this (0: off)")
    _add(algo, "meta_batch_size", type=int, default=32, help="tasks per meta-step (T)")
    _add(algo, "model", default="conv4", choices=MODELS,
         help="conv4 (the paper's: 4 x conv3x3-BN-ReLU-maxpool, linear head) or resnet12 (MetaOptNet's, "
              "without DropBlock)")
    _add(algo, "hidden_size", type=int, default=64,
         help="Conv4 channels, or ResNet-12's first stage (64: 64-160-320-640 channels)")
    _add(algo, "meta_lr", type=float, default=1e-3, help="the meta-optimizer's learning rate")
    _add(algo, "optimizer", default="adam", choices=("adam", "adamw"), help="the meta-optimizer")
    _add(algo, "scheduler", default="none", choices=("none", "cosine"), help="meta learning-rate schedule")
    _add(algo, "steps", type=int, default=10000, help="meta-steps")
    _add(algo, "forward", default="auto", choices=forwards.names(),
         help=f"task-batched forward, imaml_ext.batched.forwards: {forwards.describe()}")
    _add(algo, "hvp", default="auto", choices=("auto", "reverse", "forward"),
         help="the CG solve's Hessian-vector products: reverse (double backward through one kept support-gradient "
              "graph), forward (jvp of grad: no graph kept) or auto (the faster, timed at the first meta-step)")
    _add(algo, "tf32", default="torch", choices=("torch", "on", "off"),
         help="CUDA convolutions and matrix products in TensorFloat-32: torch (its settings as they are: by default "
              "cuDNN convolutions in TF32, matrix products not), on (both) or off (both IEEE float32)")
    _add(algo, "cuda_graph", action="store_true", help="capture the meta-step as a CUDA graph (CUDA only)")
    _add(algo, "precision", default="fp32", choices=("fp32", "bf16", "fp16"),
         help="bf16 / fp16: iMAML's forwards under bfloat16 / float16 autocast, float32 weights, gradients and "
              "CG; fp16 with a dynamic loss scale (docs/mixed-precision.md gives their accuracy)")

    run = p.add_argument_group("run")
    _add(run, "seed", type=int, default=0, help="seed of the model, the task sampler and every RNG")
    _add(run, "device", default=None, help="default: cuda if available, else cpu")
    _add(run, "out", default=None,
         help="run folder (default: runs/<task>-<ways>w<shots>s-<date>-<time>, with -2, -3, ... where taken); one "
              "run at a time uses it")
    _add(run, "resume", action="store_true",
         help="continue the run in --out from its checkpoint; --eval_tasks, --eval_batch, --eval_lam, "
              "--eval_query and --baseline may change, and a larger --steps extends a run (a finished one too); "
              "with --time_budget it also starts the run where there is no checkpoint yet")
    _add(run, "evaluate", default=None, metavar="RUN_FOLDER",
         help="only evaluate RUN_FOLDER's checkpoint on --eval_tasks test tasks (with --eval_batch, --eval_lam, "
              "--eval_query, --baseline, --device, --data); appends the result to RUN_FOLDER/evaluations.jsonl")
    _add(run, "log_every", type=int, default=10, help="meta-steps per metrics row")
    _add(run, "valid_every", type=int, default=500, help="meta-steps between validations (0: none)")
    _add(run, "valid_tasks", type=int, default=200, help="validation tasks, the same ones each time")
    _add(run, "checkpoint_every", type=int, default=500, help="meta-steps between checkpoints")
    _add(run, "eval_tasks", type=int, default=600, help="meta-test tasks at the end (0: none)")
    _add(run, "eval_batch", type=int, default=None, help="tasks per evaluation batch (default: meta_batch_size)")
    _add(run, "eval_lam", type=float, default=None,
         help="lambda of the test-time adaptation of the final evaluation (and --evaluate). Default: --lam, the "
              "proximal inner loop of training; 0: plain SGD from theta, as the iMAML authors' "
              "measure_accuracy.py evaluates (validation during training always uses --lam)")
    _add(run, "eval_query", type=int, default=None, metavar="N",
         help="query images per class of the final evaluation's test tasks (and --evaluate's); the tasks are the "
              "same, with more or fewer query images. Default: --query; the iMAML authors' measure_accuracy.py "
              "uses as many as --shots (validation during training always uses --query)")
    _add(run, "baseline", action=argparse.BooleanOptionalAction, default=True,
         help="also evaluate the same adaptation from the random initialisation")
    _add(run, "stop_after", type=int, default=None,
         help="end this invocation after this many meta-steps in all (checkpointed); --resume continues")
    _add(run, "time_budget", type=float, default=None, metavar="SECONDS",
         help="end this invocation, with a checkpoint, before SECONDS have passed since the process started "
              "(each next meta-step, validation and the final evaluation is estimated from this invocation's "
              "own); repeat the same command with --resume, which may then also start the run, to go on bit "
              "for bit")
    _add(run, "tuning_cache", default=None, metavar="FILE_OR_FOLDER",
         help="where forward and hvp auto keep what they timed on this machine, so that a run's numbers do not "
              "depend on the load at its start: a .json file, a folder (one file per machine in it), or none "
              "(time in every run). Default: $IMAML_TUNING_CACHE, else the tuning folder of the image cache "
              "($IMAML_CACHE, else ~/.cache/imaml_ext)")
    _add(run, "on_nonfinite", default="error", choices=("error", "skip-task"),
         help="a task with a non-finite loss or meta-gradient is always left out of theta's update; "
              "error: stop at the next log step, naming it; skip-task: count it in the log and go on")
    _add(run, "tensorboard", action="store_true", help="also write tensorboard scalars to <out>/tensorboard")
    _add(run, "progress", action=argparse.BooleanOptionalAction, default=True,
         help="progress bar; without it each metrics row is printed as a line")
    return p



def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """The run that ``argv`` describe, checked (an error exits with argparse's one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.preset is not None:
            args = parser.parse_args(argv, apply_preset(parser, args))
        # Only what was given counts: every action's value starts unset, not at its default.
        given = parser.parse_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))
        given = sorted(k for k, v in vars(given).items() if v is not _UNSET)
        config = RunConfig(**vars(args))
        if config.evaluate is not None:
            config.check_evaluate(given)
        else:
            config.check(given)
    except RunError as error:
        parser.error(str(error))
    return config


def recorded_run(saved: Dict[str, object], where: str) -> RunConfig:
    """The configuration that ``where`` (a checkpoint) recorded (``RunConfig.recorded``), with the
    options it does not hold at the value runs had before the option existed, or at their default."""
    defaults = vars(build_parser().parse_args([]))
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise RunError(f"{where} records --{unknown[0]}, which is no option of this imaml-train")
    return RunConfig(**{**defaults, **ADDED_OPTION_DEFAULTS, **saved})


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The namespace to parse the command line into again: --preset's values, which the options
    given on the command line then overwrite (every other option at its default)."""
    if args.evaluate is not None:
        raise RunError(f"--preset sets how to train; --evaluate {args.evaluate} takes the run's configuration "
                       f"from its checkpoint; got --preset {args.preset} as well")
    if args.preset not in PRESETS:
        raise RunError(f"--preset must be one of {', '.join(PRESETS)}; got {args.preset!r}")
    values = dict(PRESETS[args.preset])
    if args.undamped:  # --undamped is the damping given explicitly: it wins over the preset's
        for name in AUTHORS_DAMPING:
            values.pop(name)
    defaults = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}
    return argparse.Namespace(**{**defaults, **values})
