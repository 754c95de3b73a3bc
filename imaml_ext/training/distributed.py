"""Data parallel over processes: ``torchrun --nproc_per_node N -m imaml_ext.train``."""

from __future__ import annotations

import os
from typing import List, Optional

import torch


class Distributed:
    """Data parallel over processes (``torchrun --nproc_per_node N -m imaml_ext.train``):
    gloo on CPU, NCCL on GPUs; one fused all-reduce of theta's gradient per meta-step."""

    def __init__(self, world: int, rank: int, local_rank: int):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.started = False

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, name: str) -> torch.device:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            # torch.cuda.set_device needs an index: one GPU per process, or the current one alone.
            device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def stop(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()
            self.started = False

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any process (one small all-reduce when there are several)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def average_gradients_and(self, params: List[torch.Tensor], extra: torch.Tensor,
                              tasks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One all-reduce: theta's .grad becomes the mean over every process's tasks, each
        process's gradient (a mean over its ``tasks`` tasks, a device scalar: fewer when
        non-finite ones were skipped) weighted by that count; ``extra`` is averaged over the
        processes and returned."""
        if self.world == 1:
            return extra
        grads = [p.grad for p in params]
        weight = tasks.to(grads[0].dtype).reshape(1) if tasks is not None else grads[0].new_ones(1)
        flat = torch.cat([g.reshape(-1) * weight for g in grads] + [extra.to(grads[0].dtype), weight])
        torch.distributed.all_reduce(flat)
        total = flat[-1].clamp(min=1)  # no finite task anywhere: a zero gradient, not 0 / 0
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g) / total)
            offset += g.numel()
        return (flat[offset:-1] / self.world).to(extra.dtype)

