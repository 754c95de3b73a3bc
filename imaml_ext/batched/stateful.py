"""The one warning about layers that change what a meta-gradient means (Dropout, running BatchNorm
statistics), shared by IMAML, MAML and BatchedModule."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

from torch import nn

_PACKAGE = str(Path(__file__).resolve().parents[1])


def _user_stacklevel() -> int:
    """For a ``warnings.warn`` in this function's caller: the ``stacklevel`` of the first frame outside
    imaml_ext, so a warning points at the user's line, not at a subclass's ``super().__init__``."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def stateful_layer_message(model: nn.Module, owner: str) -> Optional[str]:
    """What the first such layer of ``model`` does to the meta-gradient, or None."""
    for name, layer in model.named_modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0:
            return (f"{owner}: layer {name!r} ({type(layer).__name__}, p={layer.p}) draws a new mask in every "
                    "forward (the inner steps, the hypergradient's Hessian products and the query loss each see "
                    "another), so the meta-gradient is that of a random loss; set p=0 or put the layer in eval() "
                    "for meta-training")
        if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats:
            return (f"{owner}: layer {name!r} ({type(layer).__name__}) keeps running statistics: in training mode "
                    "each task normalises with its own batch and the running buffers (kept per task) never reach "
                    "theta, so an eval() forward of the meta-learned model uses its initial statistics; use "
                    "track_running_stats=False as MAML and iMAML do")
    return None


def warn_stateful_layers(model: nn.Module, owner: str) -> None:
    """Says once, at the user's line, when ``model`` has a layer :func:`stateful_layer_message` names."""
    message = stateful_layer_message(model, owner)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


__all__ = ["stateful_layer_message", "warn_stateful_layers"]
