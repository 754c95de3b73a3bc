"""The run's configuration: ``RunConfig``, one typed field per ``imaml-train`` option, its checks,
and what config.json and the checkpoint record of it (``RunConfig.recorded``).

The command line (``arguments.parse_args``) builds it from argparse's parse; the options' defaults
and help are the parser's alone, so a field has no default of its own."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .._device import check_device
from ..batched import forwards
from ..data import NUM_DRAWERS, split_classes
from .errors import RunError

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
                "evaluate", "undamped", "preset", "time_budget", "tuning_cache")
# What only the final evaluation reads: may change on --resume (and --steps may grow, extending the run).
EVALUATION_KEYS = ("eval_tasks", "eval_batch", "baseline", "eval_lam", "eval_query")
# What --evaluate RUN_FOLDER accepts beside it; the rest comes from the run's checkpoint.
EVALUATE_OPTIONS = ("evaluate", *EVALUATION_KEYS, "device", "data", "download", "progress")
# The iMAML authors' damping of the CG system, the command line's default (--undamped: 0 and 0).
AUTHORS_DAMPING = {"cg_damping": 1.0, "lam_damping": 10.0}
# --algo imaml's alone (its proximal term and CG solve): refused beside --algo maml / fomaml when given,
# and not in a MAML run's configuration (which older checkpoints recorded: compared without them).
IMAML_ONLY = ("lam", "reg", "cg_iterations", "cg_damping", "lam_damping", "undamped", "hvp")
# The forwards with a forward-mode derivative of their convolutions under bfloat16 autocast in torch
# 2.14 (grouped, im2col, or Conv4's fused runs); a dense convolution's mixes the dtypes.
BF16_JVP_FORWARDS = tuple(name for name in forwards.names()
                          if name != forwards.AUTO and forwards.parse(name).forward.bf16_forward_mode)


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """One field per option, in --help's order. ``lam``, ``cg_damping``, ``lam_damping``,
    ``eval_batch`` and ``device`` are None until ``check`` (or ``check_evaluate``, for ``device``)
    resolves them from the others."""

    preset: Optional[str]
    # task
    task: str
    ways: int
    shots: int
    query: int
    split: str
    split_seed: int
    data: Optional[str]
    download: bool
    # meta-learning
    algo: str
    inner_steps: int
    base_lr: float
    lam: Optional[float]
    reg: Optional[float]
    cg_iterations: int
    cg_damping: Optional[float]
    lam_damping: Optional[float]
    undamped: bool
    clip_grad: float
    meta_batch_size: int
    model: str
    hidden_size: int
    meta_lr: float
    optimizer: str
    scheduler: str
    steps: int
    forward: str
    hvp: str
    tf32: str
    cuda_graph: bool
    precision: str
    # run
    seed: int
    device: Optional[str]
    out: Optional[str]
    resume: bool
    evaluate: Optional[str]
    log_every: int
    valid_every: int
    valid_tasks: int
    checkpoint_every: int
    eval_tasks: int
    eval_batch: Optional[int]
    eval_lam: Optional[float]
    eval_query: Optional[int]
    baseline: bool
    stop_after: Optional[int]
    time_budget: Optional[float]
    tuning_cache: Optional[str]
    on_nonfinite: str
    tensorboard: bool
    progress: bool

    def recorded(self) -> Dict[str, object]:
        """What determines the run's numbers (compared on --resume), as config.json and the
        checkpoint's ``config`` hold it: every field but RUNTIME_KEYS (and, for --algo maml /
        fomaml, IMAML_ONLY), sorted by name."""
        values = dataclasses.asdict(self)
        return without_unread_options({k: v for k, v in sorted(values.items()) if k not in RUNTIME_KEYS})

    def check(self, given: Sequence[str]) -> None:
        """Refuses what cannot run (a RunError naming the option) and resolves the values that
        depend on others; ``given``: the options given on the command line."""
        _check_algo_options(self, given)
        _check_training(self)

    def check_evaluate(self, given: Sequence[str]) -> None:
        """--evaluate RUN_FOLDER's options: only the evaluation's may be given beside it."""
        other = [k for k in given if k not in EVALUATE_OPTIONS]
        if other:
            raise RunError(f"--evaluate takes the run's configuration from its checkpoint; only "
                           f"{', '.join('--' + k for k in EVALUATE_OPTIONS[1:])} may be given with it; got "
                           f"--{other[0]}")
        if self.eval_tasks < 1:
            raise RunError(f"--eval_tasks must be >= 1 with --evaluate; got {self.eval_tasks}")
        if self.eval_batch is not None and self.eval_batch < 1:
            raise RunError(f"--eval_batch must be >= 1; got {self.eval_batch}")
        _check_eval_lam(self)
        self.device = _device_arg(self.device)


def without_unread_options(config: Dict[str, object]) -> Dict[str, object]:
    """``config`` without the options its --algo never reads: a MAML run's has none of IMAML_ONLY."""
    if config.get("algo", "imaml") == "imaml":
        return config
    return {k: v for k, v in config.items() if k not in IMAML_ONLY}


def _check_algo_options(cfg: RunConfig, given: Sequence[str]) -> None:
    if cfg.algo == "imaml":
        return
    extra = [k for k in IMAML_ONLY if k in given]
    if extra:
        raise RunError(f"--{extra[0]} is an option of --algo imaml (its proximal term and CG solve); --algo "
                       f"{cfg.algo} adapts by plain SGD through the unrolled inner loop and solves nothing: leave it "
                       f"out")


def _check_eval_lam(cfg: RunConfig) -> None:
    """--eval_lam and --eval_query, the options of the test-time adaptation."""
    if cfg.eval_lam is not None and not (math.isfinite(cfg.eval_lam) and cfg.eval_lam >= 0):
        raise RunError(f"--eval_lam must be a finite number >= 0; got {cfg.eval_lam}")
    if cfg.eval_query is not None and cfg.eval_query < 1:
        raise RunError(f"--eval_query must be >= 1; got {cfg.eval_query}")


def _check_training(cfg: RunConfig) -> None:
    if cfg.task not in TASKS:
        raise RunError(f"--task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    if cfg.reg is not None:
        cfg.lam = 2.0 * cfg.reg  # the tutorial's reg * ||phi - theta||^2 has gradient 2 * reg * (phi - theta)
    elif cfg.lam is None:
        cfg.lam = 2.0
    _check_numbers(cfg)
    _check_task_sizes(cfg)
    if cfg.eval_batch is None:
        cfg.eval_batch = cfg.meta_batch_size
    elif cfg.eval_batch < 1:
        raise RunError(f"--eval_batch must be >= 1; got {cfg.eval_batch}")
    if cfg.stop_after is not None and not 1 <= cfg.stop_after:
        raise RunError(f"--stop_after must be >= 1; got {cfg.stop_after}")
    if cfg.tuning_cache is not None and Path(cfg.tuning_cache).suffix != ".json" and Path(cfg.tuning_cache).is_file():
        raise RunError(f"--tuning_cache must name a .json file or a folder (or none); got {cfg.tuning_cache!r}, a file")
    if cfg.time_budget is not None and not (math.isfinite(cfg.time_budget) and cfg.time_budget > 0):
        raise RunError(f"--time_budget must be a number of seconds > 0; got {cfg.time_budget:g}")
    _check_eval_lam(cfg)
    cfg.device = _device_arg(cfg.device)
    _check_combinations(cfg, torch.device(cfg.device))
    _check_lifecycle(cfg)


def _check_numbers(cfg: RunConfig) -> None:
    """The counts, rates and damping; the damping left out becomes the authors' (0 with --undamped)."""
    # --inner_steps 0 would meta-learn with phi = theta, as --cg_iterations 0 with no solve: both refused.
    positive_ints = ["ways", "shots", "query", "inner_steps", "cg_iterations", "meta_batch_size", "hidden_size",
                     "steps", "log_every", "valid_tasks", "checkpoint_every"]
    for name in positive_ints:
        value = getattr(cfg, name)
        if value < 1:
            raise RunError(f"--{name} must be >= 1; got {value}")
    for name, value in AUTHORS_DAMPING.items():
        if cfg.undamped and getattr(cfg, name) not in (None, 0.0):
            raise RunError(f"--undamped sets --{name} 0; got --{name} {getattr(cfg, name)} as well")
        if getattr(cfg, name) is None:
            setattr(cfg, name, 0.0 if cfg.undamped else value)
    for name in ("cg_damping", "lam_damping", "clip_grad"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise RunError(f"--{name} must be a finite number >= 0; got {value}")
    for name in ("valid_every", "eval_tasks"):
        if getattr(cfg, name) < 0:
            raise RunError(f"--{name} must be >= 0; got {getattr(cfg, name)}")
    for name in ("base_lr", "lam", "meta_lr"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            shown = "--reg" if name == "lam" and cfg.reg is not None else f"--{name}"
            raise RunError(f"{shown} must be a finite number > 0; got {value if shown != '--reg' else cfg.reg}")


def _check_task_sizes(cfg: RunConfig) -> None:
    if cfg.task == "mini-imagenet":
        # Its classes and images per class are the files': checked once they are read (training.tasks).
        if cfg.download:
            raise RunError("--download fetches Omniglot; Mini-ImageNet is never downloaded (ImageNet's images are not "
                           "freely redistributable): put learn2learn's mini-imagenet-cache-*.pkl files in "
                           "--data <folder>/mini-imagenet/")
        return
    for name in ("query", "eval_query"):
        query = getattr(cfg, name)
        if query is not None and cfg.shots + query > NUM_DRAWERS:
            raise RunError(f"--shots + --{name} must be <= {NUM_DRAWERS} (Omniglot has {NUM_DRAWERS} drawers per "
                           f"character, and support and query images are distinct); got {cfg.shots} + {query} = "
                           f"{cfg.shots + query}")
    for split in ("train", "validation", "test"):
        classes = len(split_classes(split, seed=cfg.split_seed, protocol=cfg.split))
        if cfg.ways > classes:
            raise RunError(f"--ways {cfg.ways} is more than the {classes} classes of the {cfg.split} {split} split")


def _check_combinations(cfg: RunConfig, device: torch.device) -> None:
    """Options that work only with some others, or only on some devices."""
    if cfg.eval_lam not in (None, 0.0) and cfg.algo != "imaml":
        raise RunError(f"--eval_lam {cfg.eval_lam} is a proximal adaptation, for --algo imaml; --algo {cfg.algo} "
                       f"adapts with plain SGD (--eval_lam 0)")
    if cfg.precision != "fp32" and cfg.algo != "imaml":
        raise RunError(f"--precision {cfg.precision} is built for --algo imaml only; got --algo {cfg.algo}")
    if cfg.precision == "fp16" and cfg.on_nonfinite != "skip-task":
        raise RunError("--precision fp16 leaves out a task whose scaled gradients overflow (as GradScaler skips a "
                       f"step) and lowers the loss scale: it needs --on_nonfinite skip-task; got {cfg.on_nonfinite}")
    if cfg.tf32 == "on" and device.type != "cuda":
        print(f"imaml-train: note: --tf32 on has no effect on {device.type}: TensorFloat-32 is a mode of NVIDIA GPUs' "
              f"convolutions and matrix products; the run computes in IEEE float32", file=sys.stderr)
    if cfg.cuda_graph and device.type != "cuda":
        raise RunError(f"--cuda_graph needs a CUDA --device; got {cfg.device}")


def _check_lifecycle(cfg: RunConfig) -> None:
    """--out, --seed, and a combination that would fail only at the first meta-step."""
    if cfg.out is not None and not cfg.out.strip():
        raise RunError(f"--out must name a folder; got {cfg.out!r} (the current folder is no run folder)")
    if cfg.seed < 0:
        raise RunError(f"--seed must be >= 0; got {cfg.seed}")
    fine = BF16_JVP_FORWARDS + (("loop+fused", "stacked+fused") if cfg.model == "conv4" else ())
    if cfg.algo == "imaml" and cfg.precision == "bf16" and cfg.hvp == "forward" and cfg.forward not in fine:
        raise RunError(f"--precision bf16 --hvp forward needs --forward {', '.join(fine)} (this torch's forward-mode "
                       f"derivative of a dense convolution under bfloat16 autocast fails); got --forward "
                       f"{cfg.forward}. --hvp reverse or auto runs with any --forward")


def _device_arg(name: Optional[str]) -> str:
    """--device, checked: cuda when there is one and none is given, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name, "--device")
    except ValueError as error:
        raise RunError(str(error)) from None
    return name
