"""Logging in Betty's stdout format, and tensorboard when asked.

Messages look like Betty's: ``[2026-11-27 12:00:00] [INFO] [Problem "upper"]
[Global Step 100] [Local Step 10] loss: 0.51 || acc: 80.0``.
"""

from __future__ import annotations

import json
import logging as _logging
import math
import sys
from typing import Mapping, Optional

_FORMAT = "[%(asctime)s] [%(levelname)s] %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def get_logger(name: str = "imaml_ext") -> _logging.Logger:
    """The package's stdout logger (one handler, however often it is asked for)."""
    logger = _logging.getLogger(name)
    if not any(getattr(h, "_imaml_ext", False) for h in logger.handlers):
        handler = _logging.StreamHandler(sys.stdout)
        handler.setFormatter(_logging.Formatter(_FORMAT, _DATE_FORMAT))
        handler._imaml_ext = True
        logger.addHandler(handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = False
    return logger


def _scalar(value):
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


def format_stats(stats: Mapping) -> str:
    """``loss: 0.5 || acc: 80.0``; list or dict values are numbered or keyed."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, Mapping):
            parts += [f"{key}_{k}: {_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            parts += [f"{key}_{i}: {_scalar(v)}" for i, v in enumerate(value)]
        else:
            parts.append(f"{key}: {_scalar(value)}")
    return " || ".join(parts)


def flatten_stats(stats: Mapping) -> dict:
    out = {}
    for key, value in stats.items():
        if isinstance(value, Mapping):
            out.update({f"{key}_{k}": _scalar(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": _scalar(v) for i, v in enumerate(value)})
        else:
            out[key] = _scalar(value)
    return out


def strict(value):
    """``value`` with every non-finite float as None: strict JSON (RFC 8259) has no NaN or Infinity,
    which Python's json writes by default and other readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """``json.dumps`` as strict JSON: non-finite floats as null (a row of tasks all left out has no loss)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


class NoneLogger:
    """logger_type="none": stdout only."""

    def log(self, stats: Mapping, tag: Optional[str] = None, step: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """logger_type="tensorboard": every logged number as a scalar ``tag/key``."""

    def __init__(self, log_dir: Optional[str] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is an optional extra
            raise ImportError(
                "EngineConfig(logger_type='tensorboard') needs the tensorboard package: "
                "pip install 'imaml_ext[tensorboard]' (or pip install tensorboard)"
            ) from error
        self.writer = SummaryWriter(log_dir=log_dir)
        self.log_dir = self.writer.log_dir

    def log(self, stats: Mapping, tag: Optional[str] = None, step: Optional[int] = None) -> None:
        for key, value in flatten_stats(stats).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{tag}/{key}" if tag else key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(logger_type: str, log_dir: Optional[str] = None):
    if logger_type == "tensorboard":
        return TensorBoardLogger(log_dir)
    if logger_type == "none":
        return NoneLogger()
    raise ValueError(f"logger_type must be 'none' or 'tensorboard'; got {logger_type!r}")


__all__ = ["get_logger", "format_stats", "flatten_stats", "strict", "to_json", "NoneLogger", "TensorBoardLogger", "make_logger"]
