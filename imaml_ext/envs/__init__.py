"""Betty's ``Env``: one place that loads data shared by several problems."""

from __future__ import annotations

from typing import Optional

import torch


class Env:
    """Override ``step()`` to load the data that several problems read (e.g. a
    meta-learning task whose support set the lower problem trains on and whose
    query set the upper problem evaluates). The engine sets ``self.device``
    and makes every problem reachable by name (``self.upper``) before the
    first step; ``Engine.train_step`` decides when ``step()`` runs."""

    def __init__(self, name: str = "env"):
        self.name = name
        self.device: Optional[torch.device] = None
        self.engine = None

    def initialize(self, engine) -> None:
        self.engine = engine
        self.device = engine.device

    def step(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}.step() is not defined: an Env subclass must override step() "
            "to load the data its problems read"
        )

    def reset(self) -> None:
        """Called by nothing here; a hook for subclasses that need one."""


__all__ = ["Env"]
