"""Few-shot networks: the Conv4 of MAML / iMAML (and of the Betty tutorial)."""

from __future__ import annotations

from torch import nn


class Conv4(nn.Module):
    """4 x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool), then a linear head.

    BatchNorm keeps no running statistics (``track_running_stats=False``): every forward
    normalises with its own batch, i.e. per task in a meta-batch, as in MAML and iMAML.
    On 28x28 Omniglot the features are ``hidden_size x 1 x 1``.
    """

    def __init__(self, ways: int, hidden_size: int = 64, in_channels: int = 1):
        super().__init__()
        for name, value in (("ways", ways), ("hidden_size", hidden_size), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Conv4: {name} must be an int >= 1; got {value!r}")
        blocks = []
        channels = in_channels
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden_size, 3, padding=1),
                nn.BatchNorm2d(hidden_size, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = hidden_size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden_size, ways)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


__all__ = ["Conv4"]
