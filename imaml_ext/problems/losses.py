"""What a problem's ``training_step`` returns, read as a loss: under the problem's precision
(autocast for bf16 and fp16), and checked for a scalar loss or a dict with one."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Losses:
    """``Problem``'s ``autocast``, ``training_step_exec`` and ``parse_loss``."""

    def autocast(self):
        dtype = _DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def training_step_exec(self, batch):
        with self.autocast():
            return self.training_step(batch)

    def parse_loss(self, out, where: str = "training_step"):
        """(loss tensor, metrics dict) from what training_step returned."""
        if isinstance(out, Tensor):
            loss, metrics = out, {}
        elif isinstance(out, dict) and "loss" in out:
            loss, metrics = out["loss"], {k: v for k, v in out.items() if k != "loss"}
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f'problem "{self.name}": {where} returned a dict whose "loss" is a {type(loss).__name__}; '
                    "it must be a scalar tensor attached to the graph"
                )
        else:
            got = f"a dict with keys {sorted(out)}" if isinstance(out, dict) else f"a {type(out).__name__}"
            raise TypeError(
                f'problem "{self.name}": {where} must return a scalar loss tensor or a dict with "loss"; got {got}'
            )
        if loss.numel() != 1:
            raise ValueError(
                f'problem "{self.name}": {where} must return a scalar loss; got a tensor of shape {tuple(loss.shape)}'
            )
        return loss.reshape(()), metrics


__all__ = ["Losses"]
