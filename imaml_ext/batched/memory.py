"""Measuring what an autograd graph keeps, and what the device has left: so an unrolled inner
loop that will not fit is refused with an estimate instead of dying half-way."""

from __future__ import annotations

from typing import Optional, Set

import torch


class GraphSizeMeter:
    """Bytes of the tensors autograd saves for backward while the context is active.

    Each storage counts once (a weight saved by several ops is one tensor). Parameters and
    inputs that live anyway are counted too, so this is an upper bound of what the graph
    adds; it is the size that scales with the number of unrolled steps.
    """

    def __init__(self):
        self.bytes = 0
        self._seen: Set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. a functorch-wrapped tensor: count its elements
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation on ``device`` can still get, or None if unknown (or while a
    CUDA graph is being captured, when querying the driver is not allowed)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_unroll_fits(who: str, what: str, steps: int, step_bytes: int, device: torch.device,
                      fraction: float, advice: str, free: Optional[int]) -> None:
    """Raise MemoryError if ``steps`` graphs of ``step_bytes`` (the first already held) will
    not fit in ``fraction`` of ``free`` bytes (None: unknown, nothing is checked)."""
    needed = step_bytes * (steps - 1)
    if free is not None and needed > fraction * free:
        raise MemoryError(
            f"{who}: unrolling {steps} {what} keeps about {step_bytes * steps / 2**30:.2f} GiB of graph "
            f"({step_bytes / 2**20:.0f} MiB per step, measured on the first), but {device} has "
            f"{free / 2**30:.2f} GiB free: {advice}"
        )


__all__ = ["GraphSizeMeter", "available_bytes", "check_unroll_fits"]
