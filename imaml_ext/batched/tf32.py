"""TensorFloat-32 for the meta-step's CUDA convolutions and matrix products, set for the duration of
a call and restored after, so one learner's choice never leaks into the user's other code.

torch's own defaults (2.11-2.14) already run cuDNN convolutions in TF32 and matrix products in
IEEE float32: ``tf32=None`` keeps whatever is set; True puts both in TF32; False both in IEEE
float32 (the strict float32 a comparison with float64 wants)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch


def _flags():
    """(the cuDNN convolution flag, the matmul flag), each (object, attribute, tf32 value, ieee value):
    torch's fp32_precision API where it exists (mixing it with allow_tf32 raises), else allow_tf32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return ((conv, "fp32_precision", "tf32", "ieee"),
                (torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"))
    return ((torch.backends.cudnn, "allow_tf32", True, False), (torch.backends.cuda.matmul, "allow_tf32", True, False))


class TF32:
    """``with mode(device):`` the TF32 setting ``tf32`` for CUDA work on ``device``; on other devices
    nothing changes, and tf32=True says once that it does not apply there."""

    def __init__(self, owner: str, tf32: Optional[bool]):
        if tf32 is not None and not isinstance(tf32, bool):
            raise ValueError(f"{owner}: tf32 must be None (torch's settings as they are), True or False; got {tf32!r}")
        self.owner = owner
        self.tf32 = tf32
        self._warned = False

    @contextlib.contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        if self.tf32 is None or torch.device(device).type != "cuda":
            if self.tf32 and not self._warned:
                self._warned = True
                warnings.warn(f"{self.owner}: tf32=True applies to CUDA convolutions and matrix products only; on "
                              f"{torch.device(device).type} the meta-step runs in float32 as it is",
                              UserWarning, stacklevel=4)
            yield
            return
        flags = _flags()
        saved = [getattr(obj, name) for obj, name, _, _ in flags]
        try:
            for obj, name, on, off in flags:
                setattr(obj, name, on if self.tf32 else off)
            yield
        finally:
            for (obj, name, _, _), value in zip(flags, saved):
                setattr(obj, name, value)


__all__ = ["TF32"]
