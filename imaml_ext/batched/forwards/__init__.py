"""The task-batched forwards, one registry: a forward is one ``Forward`` object (how it maps a
per-task function over the tasks, which 2-d convolution rules it stacks, where it is offered,
where ``"auto"`` times it), registered here by name. Everything that lists, checks, parses or
times forwards reads this registry: ``TaskBatchedModule`` and the Engine's task batching run
them, ``IMAML``/``MAML``, ``EngineConfig.task_batching_forward`` and ``imaml-train --forward``
check names against it, and the docs' and ``--help``'s lists come from ``describe``.

A forward's name may carry two options, kept as strings because timed choices record them
(checkpoints hold them): ``"+fused"`` (the model's BatchNorm2d -> ReLU -> MaxPool2d(2) runs as
one op) and, inside ``"auto"``'s choices, ``"/N"`` (the tasks in chunks of N). ``parse`` reads a
label into a ``Plan``; ``Plan.label`` writes it back.

Adding a forward: one file that defines it (and any stacked convolution rule it brings, see
``stacked.add_conv2d_rule``) and ``register``-s it; see docs/batched-imaml.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

FUSED = "+fused"
AUTO = "auto"
# Where no registered forward is timed by "auto" (e.g. MPS), "auto" runs this one.
UNTIMED_DEFAULT = "vmap"
# The fused CUDA kernels have not run on a GPU yet: "auto" times "+fused" forms only on these devices.
FUSED_TIMED_ON = ("cpu",)


@dataclass(frozen=True)
class Forward:
    """One way to run a model's forward for T tasks at once.

    ``vmapped``: the per-task function runs under ``torch.func.vmap`` (False: once per task in a
    Python loop). ``conv2d_rules``: under vmap, 2-d convolutions, BatchNorm and max-pooling run on
    the tasks' stacked channels, each convolution by the first of these rules of ``stacked`` that
    accepts it (None: vmap's own batching rules). ``auto_on``: the device types where ``"auto"``
    times it; ``chunked_on``: where ``"auto"`` also times it over chunks of ``CHUNKS`` tasks.
    ``fusable``: has a ``"+fused"`` form. ``bf16_forward_mode``: its convolutions have a
    forward-mode derivative under bfloat16 autocast (torch 2.14: not a dense convolution's), which
    ``hvp="forward"`` needs there."""

    name: str
    summary: str
    vmapped: bool = True
    conv2d_rules: Optional[Tuple[str, ...]] = None
    auto_on: Tuple[str, ...] = ()
    chunked_on: Tuple[str, ...] = ()
    fusable: bool = True
    bf16_forward_mode: bool = False

    def layers(self):
        """The context a vmapped call runs in: the stacked rules, when this forward has any."""
        if self.conv2d_rules is None:
            return contextlib.nullcontext()
        from ..stacked import StackedLayers
        return StackedLayers(self.conv2d_rules)


@dataclass(frozen=True)
class Plan:
    """A forward with its options: fused runs, and the tasks in chunks of ``chunk``."""

    forward: Forward
    fused: bool = False
    chunk: Optional[int] = None

    @property
    def label(self) -> str:
        chunk = "" if self.chunk is None else f"/{self.chunk}"
        return f"{self.forward.name}{chunk}{FUSED if self.fused else ''}"


CHUNKS = (8, 4)
_REGISTRY: Dict[str, Forward] = {}


def register(forward: Forward) -> Forward:
    """Adds ``forward`` under its name (a new name; "auto", "/" and "+" are reserved)."""
    if not isinstance(forward, Forward):
        raise TypeError(f"register: forward must be a Forward; got {type(forward).__name__}")
    name = forward.name
    if not name or name == AUTO or "/" in name or "+" in name or name in _REGISTRY:
        taken = " (already registered)" if name in _REGISTRY else ""
        raise ValueError(f"register: forward.name must be a new name without '/' or '+', not 'auto'; got {name!r}{taken}")
    _REGISTRY[name] = forward
    return forward


def registered() -> Tuple[Forward, ...]:
    return tuple(_REGISTRY.values())


def names() -> Tuple[str, ...]:
    """What a user may pass as ``forward``: "auto", each forward, and "+fused" of each fusable one."""
    plain = [f.name for f in _REGISTRY.values()]
    # the loop's fused form first: the order these names have always been listed in
    fusable = sorted((f for f in _REGISTRY.values() if f.fusable), key=lambda f: f.vmapped)
    return (AUTO, *plain, *(f.name + FUSED for f in fusable))


def check(owner: str, forward) -> str:
    """``forward`` if it names a forward, else a ValueError naming ``owner`` and the choices."""
    if forward not in names():
        raise ValueError(f"{owner} must be one of {', '.join(map(repr, names()))}; got {forward!r}")
    return forward


def parse(label: str) -> Plan:
    """The plan a name or a recorded label ("stacked/8+fused") stands for; ValueError if none."""
    if not isinstance(label, str):
        raise TypeError(f"forward must be a string; got {type(label).__name__}")
    base, fused = (label[:-len(FUSED)], True) if label.endswith(FUSED) else (label, False)
    base, _, chunk = base.partition("/")
    forward = _REGISTRY.get(base)
    if forward is None or (fused and not forward.fusable) or (chunk and not chunk.isdigit()) or chunk == "0":
        raise ValueError(f"forward must be one of {', '.join(map(repr, names()))} (a timed choice may add "
                         f"'/N' chunks); got {label!r}")
    return Plan(forward, fused, int(chunk) if chunk else None)


def auto_plans(device_type: str, fusable: bool, num_tasks: int, chunks: bool = True) -> List[Plan]:
    """What "auto" times on ``device_type``, in order: every forward timed there, then their "+fused"
    forms (a model with a run to fuse, on FUSED_TIMED_ON), then (``chunks``) each chunked form that
    splits the ``num_tasks`` tasks. Empty: nothing is timed there (UNTIMED_DEFAULT runs)."""
    timed = sorted((f for f in _REGISTRY.values() if device_type in f.auto_on), key=lambda f: f.vmapped)
    fuse = fusable and device_type in FUSED_TIMED_ON
    plans = [Plan(f) for f in timed] + [Plan(f, True) for f in timed if fuse and f.fusable]
    if chunks:
        for size in CHUNKS:
            for f in timed:
                if device_type in f.chunked_on and size < num_tasks:
                    plans += [Plan(f, False, size)] + ([Plan(f, True, size)] if fuse and f.fusable else [])
    return plans


def timed_on(device_type: str) -> bool:
    """Whether "auto" times anything on this device type (else it runs UNTIMED_DEFAULT)."""
    return any(device_type in f.auto_on for f in _REGISTRY.values())


def describe() -> str:
    """Every forward, its "+fused" forms and what "auto" times, from the registry: --help's text."""
    rows = [f"{f.name}: {f.summary}" for f in _REGISTRY.values()]
    fusable = ", ".join(f.name for f in _REGISTRY.values() if f.fusable)
    timed = {device: ", ".join(p.label for p in auto_plans(device, True, 0, chunks=False)) for device in ("cpu", "cuda")}
    return (f"{'; '.join(rows)}; {FUSED} after {fusable}: the same with each BatchNorm2d -> ReLU -> MaxPool2d(2) "
            f"run as one op; auto: the fastest of {timed['cpu']} (and stacked chunks of {' or '.join(map(str, CHUNKS))} "
            f"tasks) on a CPU, of {timed['cuda']} on CUDA, timed once per input shape")


from . import builtin  # noqa: E402,F401  (registers loop, vmap, stacked, im2col, channels_last)

__all__ = ["Forward", "Plan", "register", "registered", "names", "check", "parse", "auto_plans", "timed_on", "describe", "FUSED",
           "AUTO", "CHUNKS", "UNTIMED_DEFAULT"]
