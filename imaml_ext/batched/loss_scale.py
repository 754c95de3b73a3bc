"""fp16's dynamic loss scale as IMAML keeps it: torch.amp.GradScaler's policy, on the device (no
host sync, and a CUDA-graph replay carries it on): start at ``initial``, halve after a step with
a non-finite task, double after ``growth_interval`` clean steps in a row."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


class DynamicLossScale:
    def __init__(self, initial: float, growth_interval: int):
        self.initial = float(initial)
        self.growth_interval = growth_interval
        self._scale: Optional[Tensor] = None
        self._clean_steps: Optional[Tensor] = None

    def scale(self, device) -> Tensor:
        """The current scale, a 0-d float32 tensor on ``device`` (made there at the first call)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU, as tensors say
            device = torch.device("cuda", torch.cuda.current_device())
        if self._scale is None or self._scale.device != device:
            self._scale = torch.full((), self.initial, dtype=torch.float32, device=device)
            self._clean_steps = torch.zeros((), dtype=torch.int64, device=device)
        return self._scale

    def update(self, found_nonfinite: Tensor) -> None:
        scale, clean = self._scale, self._clean_steps
        clean.copy_(torch.where(found_nonfinite, torch.zeros_like(clean), clean + 1))
        grow = clean >= self.growth_interval
        scale.copy_(torch.where(found_nonfinite, scale * 0.5, torch.where(grow, scale * 2.0, scale)))
        clean.copy_(torch.where(grow, torch.zeros_like(clean), clean))


def scaled_grad(loss: Tensor, inputs: Sequence[Tensor], scale: Optional[Tensor]) -> List[Tensor]:
    """d loss / d inputs, through loss * scale when there is a scale, then unscaled."""
    if scale is None:
        return list(torch.autograd.grad(loss, inputs))
    grads = list(torch.autograd.grad(loss * scale, inputs))
    torch._foreach_div_(grads, scale)
    return grads


__all__ = ["DynamicLossScale", "scaled_grad"]
