"""What the timed "auto" choices (forward, hvp) share: a clock that waits for the device's queued
work, and the RNG states put back afterwards, so that timing changes nothing a run draws."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch


def device_clock(device: torch.device) -> Callable[[], float]:
    """perf_counter, after a CUDA device's queued work has finished."""
    cuda = device if device.type == "cuda" else None

    def now() -> float:
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        return time.perf_counter()

    return now


@contextlib.contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """The CPU RNG state, and a CUDA device's, as they were before the block."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


__all__ = ["device_clock", "rng_kept"]
