"""The one timed chooser behind every "auto" (the forward of IMAML / MAML, IMAML's Hessian-vector
products, the Engine's task batching), and the tuning cache that makes its choices the machine's
rather than the moment's.

``choose`` times candidates in rounds (all of them, then those within a margin of the fastest), each
keeping its best time, with the RNG states put back between candidates (each starts from the same
draws; afterwards the RNG is as the winner's run left it, or as before when ``restore``): the timing
draws nothing a run would not. A candidate that raises is left out, its cause returned for the
caller to name once.

Timing depends on what else the machine runs: beside busy processes a close choice can go the
other way, and two forwards round differently, so a run's numbers would depend on the load. A
``TuningCache`` keeps each choice on disk per machine (CPU model and cores, GPU, torch version):
the first run that meets a key times it and writes it; every later run on that machine reads it.
Same seed, same code, same machine: the same choices, so the same numbers, whatever else runs.
``imaml-train`` keeps one by default (``--tuning_cache``); the library's ``IMAML``, ``MAML`` and the
Engine keep one when ``$IMAML_TUNING_CACHE`` names a file (or ``tuning_cache=`` does), else time
afresh in each process as ``torch.backends.cudnn.benchmark`` does."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .._io import atomic_write, unwritable_cause
from .timing import device_clock, rng_state, set_rng_state

TUNING_ENV = "IMAML_TUNING_CACHE"
MARGINS = (1.5, 1.1)  # the rounds after the first: those within this factor of the fastest run again


class NoCandidateRan(RuntimeError):
    """Every candidate raised; ``errors`` holds each one's exception."""

    def __init__(self, kind: str, errors: Dict[str, BaseException]):
        causes = {c: _first_line(e) for c, e in errors.items()}
        super().__init__(f'{kind}="auto": every candidate failed here ({causes})')
        self.errors = errors


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def choose(kind: str, candidates: Sequence[str], measure: Callable[[str], float], device: torch.device,
           margins: Sequence[float] = MARGINS, restore: bool = True,
           describe: Callable[[BaseException], str] = _first_line) -> Dict[str, object]:
    """``{kind: the fastest candidate, "ms": {candidate: its best measure in ms}}``, and ``"refused":
    {candidate: describe(its error)}`` for one that raised a RuntimeError (the caller says so).
    ``measure(candidate)`` runs it once and returns its seconds (or a modelled cost in seconds).
    Rounds: every candidate, then for each margin those within ``margin`` of the fastest, while more
    than one is left (a single candidate is not run). RNG: each run starts from the caller's state;
    afterwards it is the caller's (``restore``) or as the winner's run left it."""
    if len(candidates) == 1:
        return {kind: candidates[0], "ms": {}}
    start_state = rng_state(device)
    seconds: Dict[str, float] = {}
    after: Dict[str, object] = {}
    errors: Dict[str, BaseException] = {}
    try:
        contenders = list(candidates)
        for margin in (None, *margins):
            if margin is not None:
                contenders = [c for c in contenders if c in seconds and seconds[c] <= margin * min(seconds.values())]
                if len(contenders) < 2:
                    break
            for candidate in contenders:
                if candidate in errors:
                    continue
                set_rng_state(device, start_state)
                try:
                    took = measure(candidate)
                except RuntimeError as error:
                    errors[candidate] = error
                    continue
                seconds[candidate] = min(seconds.get(candidate, math.inf), took)
                after.setdefault(candidate, rng_state(device))
    finally:
        set_rng_state(device, start_state)
    if not seconds:
        raise NoCandidateRan(kind, errors)
    best = min(seconds, key=seconds.get)
    if not restore:
        set_rng_state(device, after[best])
    choice: Dict[str, object] = {kind: best, "ms": {c: round(s * 1e3, 3) for c, s in seconds.items()}}
    if errors:
        choice["refused"] = {c: describe(e) for c, e in errors.items()}
    return choice


def timer(device: torch.device, run: Callable[[], object]) -> float:
    """Seconds ``run()`` takes on ``device`` (its queued CUDA work included)."""
    now = device_clock(device)
    start = now()
    run()
    return now() - start


def machine_fingerprint() -> Dict[str, object]:
    """What a timed choice depends on besides its key: the CPU, the GPUs and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "torch": torch.__version__}


def key_text(key) -> str:
    """A choice's key as the JSON text the cache and results.json keep."""
    return ", ".join(map(str, key)) if isinstance(key, tuple) else str(key)


class TuningCache:
    """Timed choices kept on disk for this machine: ``<folder>/tuning-<machine hash>.json``, or the
    file named. Read at each lookup (another run may have written since), written atomically; a
    choice that names a candidate not offered now is not used. A folder that cannot be written is
    said once, and the choices are then kept for this process only."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path).expanduser()
        if path.suffix != ".json":
            digest = hashlib.sha1(json.dumps(machine_fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
            path = path / f"tuning-{digest}.json"
        self.path = path
        self._unwritable = False
        self._said_unreadable = False
        self._memory: Dict[str, Dict[str, dict]] = {}

    def __repr__(self) -> str:
        return f"TuningCache({str(self.path)!r})"

    def _read(self) -> Dict[str, Dict[str, dict]]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return {}  # nothing kept yet (a write says why it cannot keep anything)
        except (OSError, ValueError) as error:
            if not self._said_unreadable:
                self._said_unreadable = True
                warnings.warn(f"tuning cache {str(self.path)!r} cannot be read ({error}); its choices are timed "
                              "again and the file rewritten", RuntimeWarning, stacklevel=4)
            return {}
        return data.get("choices", {}) if isinstance(data, dict) else {}

    def get(self, kind: str, key, candidates: Sequence[str]) -> Optional[dict]:
        text = key_text(key)
        choice = self._memory.get(kind, {}).get(text) or self._read().get(kind, {}).get(text)
        if isinstance(choice, dict) and choice.get(kind) in candidates:
            return dict(choice)
        return None

    def put(self, kind: str, key, choice: dict) -> None:
        self._memory.setdefault(kind, {})[key_text(key)] = choice
        if self._unwritable:
            return
        data = self._read()
        data.setdefault(kind, {})[key_text(key)] = choice
        text = json.dumps({"machine": machine_fingerprint(), "choices": data}, indent=1, sort_keys=True)
        try:
            atomic_write(self.path, lambda f: f.write(text.encode()))
        except OSError as error:
            self._unwritable = True
            warnings.warn(f"tuning cache: cannot write {str(self.path)!r} ({unwritable_cause(self.path.parent, error)}); "
                          f"this run's timed choices are kept in memory only (set {TUNING_ENV} or --tuning_cache to "
                          "a writable place)", RuntimeWarning, stacklevel=3)


def tuning_cache(given=None) -> Optional[TuningCache]:
    """``given`` (a TuningCache, a path, or None), else ``$IMAML_TUNING_CACHE`` (a path; "" or "none":
    no cache)."""
    if isinstance(given, TuningCache):
        return given
    if given is None:
        given = os.environ.get(TUNING_ENV, "")
    if isinstance(given, str) and given.strip().lower() in ("", "none"):
        return None
    if not isinstance(given, (str, os.PathLike)):
        raise TypeError(f"tuning_cache must be a TuningCache, a path or None; got {type(given).__name__}")
    return TuningCache(given)


class Chooser:
    """``choose`` with the choices kept: in ``choices`` (a dict a checkpoint saves: a resumed run
    computes as the uninterrupted one), then in the tuning cache (this machine's), else timed."""

    def __init__(self, kind: str, choices: Optional[dict] = None, cache: Optional[TuningCache] = None):
        self.kind = kind
        self.choices = {} if choices is None else choices
        self.cache = cache

    def get(self, key, candidates: Sequence[str], time: Callable[[], dict]) -> dict:
        """The choice for ``key``: kept, cached, or ``time()`` (which runs ``choose``)."""
        choice = self.choices.get(key)
        if choice is None and self.cache is not None:
            choice = self.cache.get(self.kind, key, candidates)
            if choice is not None:
                choice["from"] = "tuning cache"
        if choice is None:
            choice = time()
            if self.cache is not None:
                self.cache.put(self.kind, key, {k: v for k, v in choice.items() if k != "from"})
        self.choices[key] = choice
        return choice


__all__ = ["choose", "NoCandidateRan", "timer", "Chooser", "TuningCache", "tuning_cache", "machine_fingerprint", "key_text", "TUNING_ENV"]
