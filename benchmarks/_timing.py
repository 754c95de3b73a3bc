"""Timing helpers shared by the benchmark scripts (torch, numpy and stdlib only).

Every timed sample is one call bracketed by synchronisation: CUDA events on
CUDA, time.perf_counter on the CPU. Variants compared with each other are
timed round-robin (one sample of each per round), so that clock drift, turbo
and other load hit all of them alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

Fn = Callable[[], object]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stats:
    """Milliseconds per call over the samples of one variant."""

    samples_ms: List[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def summary(self) -> dict:
        s = np.asarray(self.samples_ms)
        return {
            "median_ms": float(np.median(s)),
            "min_ms": float(s.min()),
            "p25_ms": float(np.percentile(s, 25)),
            "p75_ms": float(np.percentile(s, 75)),
            "samples": int(s.size),
        }


@dataclass
class Variant:
    """A callable to time; setup (untimed) runs before every sample, e.g. to restore state."""

    fn: Fn
    setup: Optional[Fn] = None


def time_once_ms(fn: Fn, device: torch.device, setup: Optional[Fn] = None) -> float:
    if setup is not None:
        setup()
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        sync(device)  # the setup must not leak into the measured interval
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def compare(
    variants: Dict[str, Variant],
    device: torch.device,
    repeats: int,
    warmup: int = 3,
    max_seconds: Optional[float] = None,
    min_repeats: int = 3,
) -> Dict[str, Stats]:
    """Round-robin samples of every variant: up to `repeats` rounds after `warmup`.

    With max_seconds, stops after the round that exceeds it (but not before
    min_repeats rounds), so that slow configurations keep the run bounded.
    """
    for v in variants.values():
        for _ in range(warmup):
            time_once_ms(v.fn, device, v.setup)
    stats = {name: Stats() for name in variants}
    began = time.perf_counter()
    for round_index in range(repeats):
        for name, v in variants.items():
            stats[name].samples_ms.append(time_once_ms(v.fn, device, v.setup))
        out_of_time = max_seconds is not None and time.perf_counter() - began > max_seconds
        if out_of_time and round_index + 1 >= min_repeats:
            break
    return stats


def copy_bandwidth_gbs(device: torch.device, mib: int = 256, repeats: int = 10) -> dict:
    """Achieved bandwidth of dst.copy_(src) on a large float32 buffer, read + write bytes."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = compare({"copy": Variant(lambda: dst.copy_(src))}, device, repeats, warmup=2)["copy"]
    moved = 2 * src.numel() * src.element_size()
    return {"gbs": moved / (stats.median_ms * 1e-3) / 1e9, "buffer_mib": mib, **stats.summary()}


def count_host_syncs(fn: Fn, device: torch.device) -> Optional[int]:
    """Synchronising CUDA calls made by fn (torch's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def count_cuda_kernels(fn: Fn, device: torch.device) -> Optional[int]:
    """GPU kernels (memcpy/memset excluded) that one call of fn launches; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(not e.name.startswith(("Memcpy", "Memset")) for e in gpu_events)


def count_dispatched_ops(fn: Fn) -> int:
    """ATen/custom operators that one call of fn dispatches (views included).

    A device-independent proxy for per-call overhead: on CUDA each non-view
    op is roughly one kernel launch.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Counter.count += 1
            return func(*args, **(kwargs or {}))

    with _Counter():
        fn()
    return _Counter.count


def keep_freed_cpu_memory() -> bool:
    """Makes glibc keep freed memory in the process instead of returning it to the OS.

    Otherwise every large temporary of an eager CPU op is a fresh mmap whose
    page faults can cost more than the op (and, in VMs, stall for tens of ms),
    which charges the allocating baselines for the OS rather than for their
    arithmetic. This is what the CUDA caching allocator does anyway. Returns
    False where it does not apply (not glibc).
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    max_mmap_threshold = 32 * 2**20  # glibc's upper limit on 64-bit
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(m_mmap_threshold, max_mmap_threshold)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return f"cpu-{cpu_cores()}cores"


def write_results(result: dict, out, default_path, render) -> None:
    """Writes result as JSON and its rendered markdown beside it, and prints the table."""
    import json
    import sys
    from pathlib import Path

    out = Path(out) if out else Path(default_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = render(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def run_metadata(device) -> dict:
    """Machine, software and date of a benchmark run, for its JSON."""
    import datetime
    import platform

    import numpy as np
    import torch

    return {
        "machine": machine_name(device),
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
    }
