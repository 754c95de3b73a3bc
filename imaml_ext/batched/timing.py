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
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(device, state)


def rng_state(device: torch.device):
    """The CPU RNG state, and a CUDA device's: what ``set_rng_state`` puts back."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


__all__ = ["device_clock", "rng_kept", "rng_state", "set_rng_state"]
