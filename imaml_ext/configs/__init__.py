"""Betty-compatible configurations: ``Config`` (one per problem) and ``EngineConfig``.

Same field names and defaults as Betty's GitHub version, so a Betty script's
configs run unchanged; a misspelt or unknown field is an error that lists the
valid ones (Betty's dataclasses raise a bare TypeError). Every field is checked
when it is set, in the constructor or by a later ``config.field = value``: a bad
value raises a ValueError naming the field and leaves the config as it was.
Fields added here are marked "imaml_ext" below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from typing import Callable, Dict, Optional

from .._device import check_device
from ..batched import forwards

HYPERGRADIENT_TYPES = ("cg", "darts", "neumann")
PRECISIONS = ("fp32", "bf16", "fp16")
LOGGER_TYPES = ("none", "tensorboard")
# Betty's names (imaml_ext/strategies.py): the scale-out ones on torch.distributed, "accelerate" through HF accelerate
STRATEGIES = ("default", "distributed", "zero", "fsdp", "accelerate", "cpu", "gpu")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}; got {value!r}")


def _check_float(owner: str, name: str, value, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}; got {value!r}")


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


# Field checks: each takes (owner, name, value) and raises naming the field, what it expects and what came.
def _integer(minimum: int):
    return lambda owner, name, value: _check_int(owner, name, value, minimum)


def _number(minimum: float, strict: bool = False):
    return lambda owner, name, value: _check_float(owner, name, value, minimum, strict)


def _one_of(*choices):
    return lambda owner, name, value: _check_choice(owner, name, value, choices)


def _optional(check):
    return lambda owner, name, value: None if value is None else check(owner, name, value)


def _checked(checks: Dict[str, Callable]):
    """Runs ``checks`` on every assignment of a field, in the constructor and after it (Betty programs set
    fields on a built config), so a bad value fails where it is set and the old value stays. Unknown
    keywords and attributes name the valid fields (Betty's dataclasses raise a bare TypeError). After the
    constructor, the class's ``_after_assign(name, value)`` keeps the fields that depend on each other
    consistent."""

    def wrap(cls):
        init = cls.__init__
        valid = [f.name for f in fields(cls)]

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            unknown = [k for k in kwargs if k not in valid]
            if unknown:
                raise TypeError(
                    f"{cls.__name__}: unknown field {unknown[0]!r}; valid fields are: {', '.join(valid)}"
                )
            if len(args) > len(valid):
                raise TypeError(f"{cls.__name__} takes at most {len(valid)} fields; got {len(args)} positional values")
            init(self, *args, **kwargs)
            object.__setattr__(self, "_built", True)

        def __setattr__(self, name, value):
            if name not in checks and name not in valid and not name.startswith("_"):
                raise AttributeError(f"{cls.__name__}: unknown field {name!r}; valid fields are: {', '.join(valid)}")
            if name in checks:
                checks[name](cls.__name__, name, value)
            built = self.__dict__.get("_built", False)
            follow = self._after_assign(name, value) if built else {}
            object.__setattr__(self, name, value)
            for other, new in follow.items():
                object.__setattr__(self, other, new)

        cls.__init__ = __init__
        cls.__setattr__ = __setattr__
        return cls

    return wrap


def _check_log_step(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 1 (log every log_step steps) or < 0 (no logging, "
                         f"Betty's default -1); got {value!r}")


def _check_damping(cg_damping, lam_damping, proximal_lambda) -> None:
    if (cg_damping or lam_damping) and proximal_lambda is None:
        raise ValueError(
            f"Config: cg_damping and lam_damping damp the implicit-MAML system (I + H / lambda) and need "
            f"proximal_lambda; got cg_damping={cg_damping}, lam_damping={lam_damping} without it"
        )


_CONFIG_CHECKS = {
    "type": _one_of(*HYPERGRADIENT_TYPES),
    "unroll_steps": _integer(1),
    "gradient_accumulation": _integer(1),
    "precision": _one_of(*PRECISIONS),
    "initial_dynamic_scale": _number(0.0, strict=True),
    "scale_factor": _number(1.0, strict=True),
    "gradient_clipping": _number(0.0),
    "warmup_steps": _integer(0),
    "log_step": _check_log_step,
    "darts_alpha": _number(0.0, strict=True),
    "neumann_iterations": _integer(0),
    "neumann_alpha": _number(0.0, strict=True),
    "cg_iterations": _integer(1),
    "cg_alpha": _number(0.0, strict=True),
    "cg_tol": _number(0.0),
    "proximal_lambda": _optional(_number(0.0, strict=True)),
    "cg_damping": _number(0.0),
    "lam_damping": _number(0.0),
}


@_checked(_CONFIG_CHECKS)
@dataclass
class Config:
    """Training configuration of one ``Problem``.

    ``type`` is the hypergradient method used when this problem is the lower
    level of a dependency: "cg", "neumann" or "darts".

    cg: solves H x = v by conjugate gradient (H = the Hessian of this
    problem's loss in its own parameters), ``cg_iterations`` steps, with the
    fused vector work of ``imaml_ext.ops.cg_solve``. ``cg_alpha`` scales the
    system CG runs on, (cg_alpha H) y = v with x = cg_alpha y, as in Betty; CG
    is invariant to that scale, so every cg_alpha > 0 gives the same x (Betty's
    own code is right only at 1.0). ``cg_tol`` (imaml_ext) stops a solve
    early once ||r|| <= cg_tol ||v||, checked on the device.

    neumann: x = alpha sum_{k=0..K} (I - alpha H)^k v, K = neumann_iterations,
    alpha = neumann_alpha (converges when alpha < 2 / largest eigenvalue of H).

    darts: the one-step approximation H^-1 ~ I; the mixed second derivative
    is taken by central differences with step darts_alpha / ||v||.

    ``proximal_lambda`` (imaml_ext): declares that this problem's loss (what
    training_step returns) holds the proximal term (lambda / 2) ||phi - theta||^2,
    theta being the parent's trainable parameters in the same order. The
    hypergradient then uses it analytically: cg solves (I + H_task / lambda) x = v
    (the implicit-MAML system) and the mixed second derivative, -lambda I, is
    never differentiated. The tutorial's reg * ||phi - theta||^2 is
    proximal_lambda = 2 * reg. The declaration is checked against the loss the
    first time it is used.
    """

    type: str = "darts"
    unroll_steps: int = 1
    first_order: bool = True
    retain_graph: bool = False
    allow_unused: bool = True

    # gradient accumulation
    gradient_accumulation: int = 1

    # precision: "fp32", "bf16" or "fp16" (autocast; fp16 adds a GradScaler).
    precision: str = "fp32"
    fp16: bool = False  # Betty's older switch, the same as precision="fp16"
    initial_dynamic_scale: float = 4096.0
    scale_factor: float = 2.0

    gradient_clipping: float = 0.0
    warmup_steps: int = 0

    # logging: every log_step local steps; < 0 (the default -1, as Betty) logs nothing
    log_step: int = -1
    log_local_step: bool = False

    # darts
    darts_alpha: float = 0.01

    # neumann
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0

    # cg
    cg_iterations: int = 1
    cg_alpha: float = 1.0
    cg_tol: float = 0.0  # imaml_ext

    # imaml_ext: the loss holds (proximal_lambda / 2) ||phi - theta||^2 to the parent.
    proximal_lambda: Optional[float] = None
    # imaml_ext, with proximal_lambda: cg solves ((1 + cg_damping) I + H / (lambda + lam_damping)) x = v,
    # as the iMAML authors' code does (1 and 10); 0 and 0 are the exact system.
    cg_damping: float = 0.0
    lam_damping: float = 0.0

    def __post_init__(self):
        # Each field was checked as the constructor set it; what is left ties fields together.
        if self.fp16:
            if self.precision not in ("fp32", "fp16"):
                raise ValueError(f"Config.fp16=True contradicts Config.precision={self.precision!r}")
            self.precision = "fp16"
        self.fp16 = self.precision == "fp16"
        _check_damping(self.cg_damping, self.lam_damping, self.proximal_lambda)

    def _after_assign(self, name: str, value) -> Dict[str, object]:
        """Checks ``name = value`` against the other fields; returns the fields that follow it."""
        if name == "precision":
            return {"fp16": value == "fp16"}
        if name == "fp16":
            if value and self.precision not in ("fp32", "fp16"):
                raise ValueError(f"Config.fp16=True contradicts Config.precision={self.precision!r}")
            return {"precision": "fp16" if value else ("fp32" if self.precision == "fp16" else self.precision)}
        if name in ("cg_damping", "lam_damping", "proximal_lambda"):
            damping = {"cg_damping": self.cg_damping, "lam_damping": self.lam_damping,
                       "proximal_lambda": self.proximal_lambda, name: value}
            _check_damping(**damping)
        return {}

    def replace(self, **changes) -> "Config":
        # precision and its older alias fp16 move together.
        if "precision" in changes and "fp16" not in changes:
            changes["fp16"] = changes["precision"] == "fp16"
        elif "fp16" in changes and "precision" not in changes:
            changes["precision"] = "fp16" if changes["fp16"] else "fp32"
        return dataclasses.replace(self, **changes)


def _check_device(owner: str, name: str, value) -> None:
    if value is not None:
        check_device(value, f"{owner}.{name}")


def _check_valid_step(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer (<= 0 turns validation off); got {value!r}")


def _check_forward(owner: str, name: str, value) -> None:
    forwards.check(f"{owner}.{name}", value)  # the registry as it is now: a forward registered later is accepted


def _check_strategy(owner: str, name: str, value) -> None:
    if value not in STRATEGIES:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, STRATEGIES))}; got {value!r}")


_ENGINE_CHECKS = {
    "train_iters": _integer(1),
    "valid_step": _check_valid_step,
    "logger_type": _one_of(*LOGGER_TYPES),
    "strategy": _check_strategy,
    "distributed": _one_of(False, True),
    "early_stopping_mode": _one_of("min", "max"),
    "early_stopping_tolerance": _integer(1),
    "device": _check_device,
    "task_batching": _one_of("auto", "on", "off"),
    "task_batching_forward": _check_forward,
    "task_batching_max_tasks": _optional(_integer(1)),
}


@_checked(_ENGINE_CHECKS)
@dataclass
class EngineConfig:
    """Configuration of the ``Engine``: Betty's fields and defaults.

    ``device`` (imaml_ext): where the env and the problems given no
    ``device=`` of their own live (a problem's ``device=`` takes precedence);
    None picks "cuda" when available, else "cpu", as Betty does. ``log_dir``
    (imaml_ext): the tensorboard folder when logger_type="tensorboard" (None:
    runs/<time>). ``strategy``: Betty's scale-out strategies, "distributed"
    and "zero" data parallel over the processes torchrun starts (and Betty
    0.1.1's ``distributed=True``), "fsdp" the same with each module's
    parameters and optimizer state sharded at rest (FSDP2), "accelerate" the
    same through HF accelerate where it is installed, "cpu" / "gpu" the
    device; see imaml_ext/strategies.py.
    """

    train_iters: int = 50000
    valid_step: int = 500

    # logger
    logger_type: str = "none"
    log_dir: Optional[str] = None

    # roll back (Betty's warm start): each problem with parents caches its state at its inner loop's
    # start and, after its parents' step, restores it and steps once more with the updated parents
    roll_back: bool = False

    # scale-out (imaml_ext/strategies.py): NCCL's default becomes gloo on a CPU
    strategy: str = "default"
    backend: str = "nccl"
    distributed: bool = False  # Betty 0.1.1's name

    # early stopping on a validation metric
    early_stopping: bool = False
    early_stopping_mode: str = "min"
    early_stopping_tolerance: int = 5
    early_stopping_metric: str = "loss"

    device: Optional[str] = None

    # imaml_ext: run the G inner loops of a meta-step (an upper problem with
    # gradient_accumulation=G over one lower problem) as one batch; see engine.task_batching
    task_batching: str = "auto"  # "auto": when the pattern holds; "on": raise the cause when not; "off"
    # "vmap", "loop" over tasks, "stacked" (vmap, tasks' channels side by side), "im2col" (stacked, the
    # convolutions as im2col + batched matrix products), "channels_last" (stacked, channels-last layout),
    # "loop+fused", "vmap+fused", "stacked+fused", "im2col+fused" (each BatchNorm2d -> ReLU -> MaxPool2d(2)
    # run of the module's Sequentials as one fused op), "auto": the fastest of loop, vmap and stacked on a
    # CPU (and loop+fused, stacked+fused when there is a run to fuse), of vmap, stacked, im2col and
    # channels_last on CUDA, timed at the first inner step; vmap elsewhere
    task_batching_forward: str = "auto"
    task_batching_max_tasks: Optional[int] = None  # tasks run at once (None: as many as memory allows)

    def _after_assign(self, name: str, value) -> Dict[str, object]:
        return {}


__all__ = ["Config", "EngineConfig", "HYPERGRADIENT_TYPES", "PRECISIONS"]
