"""One check of a device name before anything runs on it, for the command line and the
Betty API alike: a clear ``ValueError`` or ``TypeError`` instead of torch's error from deep
inside a sampler or a generator."""

from __future__ import annotations

import torch


def check_device(value, owner: str) -> torch.device:
    """``value`` (a str or ``torch.device``) as a device this torch can run on. ``owner`` names
    the argument in the error (``"--device"``, ``"EngineConfig.device"``)."""
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"{owner} must be a device such as 'cpu', 'cuda' or 'cuda:1'; got {value!r}") from None
    else:
        raise TypeError(f"{owner} must be a str or a torch.device; got {type(value).__name__}")
    if device.type == "cpu":
        return device
    use = "use 'cpu'" + (" or 'cuda'" if torch.cuda.is_available() else "")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{owner}: got {value!r}, but this torch sees no CUDA device "
                             f"(torch.cuda.is_available() is False); {use}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{owner}: got {value!r}, but this machine has {count} CUDA device(s), "
                             f"numbered from 0")
        return device
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{owner}: got {value!r}, but this torch has no usable {device.type} backend; {use}")
    return device


__all__ = ["check_device"]
