"""The command line's options: the parser, the checks of what was given, presets (--preset),
and the run's configuration (what config.json and the checkpoint record)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, Optional, Sequence

import torch

from .._device import check_device
from ..batched.module import TaskBatchedModule
from ..data import NUM_DRAWERS, PROTOCOLS, split_classes
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

TASKS = ("omniglot", "mini-imagenet")
MODELS = ("conv4", "resnet12")
ALGOS = ("imaml", "maml", "fomaml")

# Arguments that do not change what a run computes: they may differ on --resume.
# Options added after checkpoints were first written, with the value those runs had.
# (Runs before --hvp double-backpropagated, what "auto" keeps wherever it times faster, as on a CPU; like
# --forward auto, it changes only the float rounding.)
ADDED_OPTION_DEFAULTS = {"precision": "fp32", "model": "conv4", "hvp": "auto", "tf32": "torch"}
# (--preset only names defaults: the values it resolved to are what a run records and compares.)
RUNTIME_KEYS = ("out", "resume", "progress", "tensorboard", "data", "download", "stop_after", "on_nonfinite",
                "evaluate", "undamped", "preset", "time_budget")
# What only the final evaluation reads: may change on --resume (and --steps may grow, extending the run).
EVALUATION_KEYS = ("eval_tasks", "eval_batch", "baseline", "eval_lam", "eval_query")
# What --evaluate RUN_FOLDER accepts beside it; the rest comes from the run's checkpoint.
EVALUATE_OPTIONS = ("evaluate", *EVALUATION_KEYS, "device", "data", "download", "progress")
# The iMAML authors' damping of the CG system, the command line's default (--undamped: 0 and 0).
AUTHORS_DAMPING = {"cg_damping": 1.0, "lam_damping": 10.0}
# --algo imaml's alone (its proximal term and CG solve): refused beside --algo maml / fomaml when given,
# and not in a MAML run's configuration (which older checkpoints recorded: compared without them).
IMAML_ONLY = ("lam", "reg", "cg_iterations", "cg_damping", "lam_damping", "undamped", "hvp")
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
    _add(algo, "forward", default="auto", choices=TaskBatchedModule.FORWARDS,
         help="task-batched forward: vmap (grouped convolutions), loop (per-task dense layers), stacked (vmap with "
              "convolutions, BatchNorm and max-pooling on the tasks' stacked channels), im2col (stacked, with the "
              "convolutions as im2col and one batched matrix product over tasks), channels_last (stacked, in "
              "channels-last memory layout) or auto (the fastest of loop and stacked on a CPU, of vmap, stacked, "
              "im2col and channels_last on a GPU, timed once per input shape)")
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
        if args.preset is not None:
            args = parser.parse_args(argv, apply_preset(parser, args))
        # Only what was given counts: every action's value starts unset, not at its default.
        given = parser.parse_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in parser._actions}))
        given = sorted(k for k, v in vars(given).items() if v is not _UNSET)
        if args.evaluate is not None:
            args.given = given
            check_evaluate_args(args)
        else:
            check_algo_options(args, given)
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
    check_eval_lam(args)
    args.device = _device_arg(args.device)


def check_algo_options(args: argparse.Namespace, given: Sequence[str]) -> None:
    if args.algo == "imaml":
        return
    extra = [k for k in IMAML_ONLY if k in given]
    if extra:
        raise RunError(f"--{extra[0]} is an option of --algo imaml (its proximal term and CG solve); --algo "
                       f"{args.algo} adapts by plain SGD through the unrolled inner loop and solves nothing: leave it "
                       f"out")


def check_eval_lam(args: argparse.Namespace) -> None:
    """--eval_lam and --eval_query, the options of the test-time adaptation."""
    if args.eval_lam is not None and not (math.isfinite(args.eval_lam) and args.eval_lam >= 0):
        raise RunError(f"--eval_lam must be a finite number >= 0; got {args.eval_lam}")
    if args.eval_query is not None and args.eval_query < 1:
        raise RunError(f"--eval_query must be >= 1; got {args.eval_query}")


def check_args(args: argparse.Namespace) -> None:
    if args.task not in TASKS:
        raise RunError(f"--task must be one of {', '.join(TASKS)}; got {args.task!r}")
    if args.reg is not None:
        args.lam = 2.0 * args.reg  # the tutorial's reg * ||phi - theta||^2 has gradient 2 * reg * (phi - theta)
    elif args.lam is None:
        args.lam = 2.0
    # --inner_steps 0 would meta-learn with phi = theta, as --cg_iterations 0 with no solve: both refused.
    positive_ints = ["ways", "shots", "query", "inner_steps", "cg_iterations", "meta_batch_size", "hidden_size",
                     "steps", "log_every", "valid_tasks", "checkpoint_every"]
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
    for name in ("valid_every", "eval_tasks"):
        if getattr(args, name) < 0:
            raise RunError(f"--{name} must be >= 0; got {getattr(args, name)}")
    for name in ("base_lr", "lam", "meta_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            shown = "--reg" if name == "lam" and args.reg is not None else f"--{name}"
            raise RunError(f"{shown} must be a finite number > 0; got {value if shown != '--reg' else args.reg}")
    if args.task == "mini-imagenet":
        # Its classes and images per class are the files': checked once they are read (training.tasks).
        if args.download:
            raise RunError("--download fetches Omniglot; Mini-ImageNet is never downloaded (ImageNet's images are not "
                           "freely redistributable): put learn2learn's mini-imagenet-cache-*.pkl files in "
                           "--data <folder>/mini-imagenet/")
    else:
        for name in ("query", "eval_query"):
            query = getattr(args, name)
            if query is not None and args.shots + query > NUM_DRAWERS:
                raise RunError(f"--shots + --{name} must be <= {NUM_DRAWERS} (Omniglot has {NUM_DRAWERS} drawers per "
                               f"character, and support and query images are distinct); got {args.shots} + {query} = "
                               f"{args.shots + query}")
        for split in ("train", "validation", "test"):
            classes = len(split_classes(split, seed=args.split_seed, protocol=args.split))
            if args.ways > classes:
                raise RunError(f"--ways {args.ways} is more than the {classes} classes of the {args.split} {split} "
                               f"split")
    if args.eval_batch is None:
        args.eval_batch = args.meta_batch_size
    elif args.eval_batch < 1:
        raise RunError(f"--eval_batch must be >= 1; got {args.eval_batch}")
    if args.stop_after is not None and not 1 <= args.stop_after:
        raise RunError(f"--stop_after must be >= 1; got {args.stop_after}")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise RunError(f"--time_budget must be a number of seconds > 0; got {args.time_budget:g}")
    check_eval_lam(args)
    args.device = _device_arg(args.device)
    device = torch.device(args.device)
    if args.eval_lam not in (None, 0.0) and args.algo != "imaml":
        raise RunError(f"--eval_lam {args.eval_lam} is a proximal adaptation, for --algo imaml; --algo {args.algo} "
                       f"adapts with plain SGD (--eval_lam 0)")
    if args.precision != "fp32" and args.algo != "imaml":
        raise RunError(f"--precision {args.precision} is built for --algo imaml only; got --algo {args.algo}")
    if args.precision == "fp16" and args.on_nonfinite != "skip-task":
        raise RunError("--precision fp16 leaves out a task whose scaled gradients overflow (as GradScaler skips a "
                       f"step) and lowers the loss scale: it needs --on_nonfinite skip-task; got {args.on_nonfinite}")
    if args.tf32 == "on" and device.type != "cuda":
        print(f"imaml-train: note: --tf32 on has no effect on {device.type}: TensorFloat-32 is a mode of NVIDIA GPUs' "
              f"convolutions and matrix products; the run computes in IEEE float32", file=sys.stderr)
    if args.cuda_graph and device.type != "cuda":
        raise RunError(f"--cuda_graph needs a CUDA --device; got {args.device}")
    check_lifecycle_args(args)


# The forwards with a forward-mode derivative of their convolutions under bfloat16 autocast in torch
# 2.14 (grouped, im2col, or Conv4's fused runs); a dense convolution's mixes the dtypes.
BF16_JVP_FORWARDS = ("vmap", "im2col", "vmap+fused", "im2col+fused")


def check_lifecycle_args(args: argparse.Namespace) -> None:
    """--out, --seed, and a combination that would fail only at the first meta-step."""
    if args.out is not None and not args.out.strip():
        raise RunError(f"--out must name a folder; got {args.out!r} (the current folder is no run folder)")
    if args.seed < 0:
        raise RunError(f"--seed must be >= 0; got {args.seed}")
    fine = BF16_JVP_FORWARDS + (("loop+fused", "stacked+fused") if args.model == "conv4" else ())
    if args.algo == "imaml" and args.precision == "bf16" and args.hvp == "forward" and args.forward not in fine:
        raise RunError(f"--precision bf16 --hvp forward needs --forward {', '.join(fine)} (this torch's forward-mode "
                       f"derivative of a dense convolution under bfloat16 autocast fails); got --forward "
                       f"{args.forward}. --hvp reverse or auto runs with any --forward")


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
    return without_unread_options({k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_KEYS})


def without_unread_options(config: Dict[str, object]) -> Dict[str, object]:
    """``config`` without the options its --algo never reads: a MAML run's has none of IMAML_ONLY."""
    if config.get("algo", "imaml") == "imaml":
        return config
    return {k: v for k, v in config.items() if k not in IMAML_ONLY}



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
