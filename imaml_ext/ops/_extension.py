"""Finds the compiled operators and says once, loudly, when they are missing."""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation .` in an environment "
    "that has torch, with a CUDA toolkit for the CUDA kernels)"
)

try:
    from imaml_ext import _C  # noqa: F401  (loading it registers torch.ops.imaml_ext)

    LOAD_ERROR = None
except ImportError as error:  # the wrappers fall back to the reference, with a warning
    _C = None
    LOAD_ERROR = error

_warned: set = set()


def _missing_reason() -> str:
    """Why ``_C`` is absent, in plain words: Python's own message for a missing submodule of a
    package being imported blames a circular import."""
    import importlib.machinery
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]
    built = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in sorted(package.glob("_C" + suffix))]
    if not built:
        return f"is not built (there is no _C{importlib.machinery.EXTENSION_SUFFIXES[0]} in {package})"
    return f"is built ({built[0].name}) but did not load: {LOAD_ERROR}"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def has_compiled_kernels(device_type: str) -> bool:
    """Whether torch.ops.imaml_ext has kernels for this device type (no warning)."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("imaml_ext::prox_sgd_step_", key)


def use_compiled(device: torch.device) -> bool:
    """True to run torch.ops.imaml_ext on this device; else warns once and returns False."""
    if device.type == "meta":  # fake tensors under torch.compile: the registered fake kernels
        return _C is not None
    if has_compiled_kernels(device.type):
        return True
    if _C is None:
        _warn_once(
            "no-extension",
            f"imaml_ext: the compiled extension imaml_ext._C {_missing_reason()}; "
            f"running the pure-PyTorch reference instead. To get the fused kernels, {BUILD_HINT}.",
        )
    elif device.type == "cuda":
        _warn_once(
            "no-cuda-kernels",
            "imaml_ext: the compiled extension was built without CUDA kernels; running the "
            f"pure-PyTorch reference on CUDA tensors instead. To get them, {BUILD_HINT}.",
        )
    else:
        _warn_once(
            f"no-kernels-{device.type}",
            f"imaml_ext: no compiled kernels for device type '{device.type}'; running the "
            "pure-PyTorch reference.",
        )
    return False
