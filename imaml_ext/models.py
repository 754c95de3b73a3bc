"""Few-shot networks: the Conv4 of MAML / iMAML (and of the Betty tutorial), and ResNet-12."""

from __future__ import annotations

from torch import nn


def _check_sizes(model: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model}: {name} must be an int >= 1; got {value!r}")


class Conv4(nn.Module):
    """4 x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool), then a linear head.

    BatchNorm keeps no running statistics (``track_running_stats=False``): every forward
    normalises with its own batch, i.e. per task in a meta-batch, as in MAML and iMAML.
    The head reads the flattened ``hidden_size x s x s`` features, ``s = image_size`` halved
    (rounding down) four times: 1 on 28x28 Omniglot, 5 on 84x84 Mini-ImageNet (MAML's
    network there: ``Conv4(ways, 32, in_channels=3, image_size=84)``, 800 features).
    """

    def __init__(self, ways: int, hidden_size: int = 64, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        _check_sizes("Conv4", ways=ways, hidden_size=hidden_size, in_channels=in_channels, image_size=image_size)
        if image_size < 16:
            raise ValueError(f"Conv4: image_size must be >= 16 (four 2x2 max-pools); got {image_size}")
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
        side = image_size // 16
        self.head = nn.Linear(hidden_size * side * side, ways)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class ResNet12Block(nn.Module):
    """3 x (3x3 conv, BatchNorm, LeakyReLU(0.1)) (the last activation after the sum) beside a
    1x1 conv + BatchNorm shortcut, then a 2x2 max-pool (MetaOptNet's block, without DropBlock)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                      nn.BatchNorm2d(channels, track_running_stats=False))
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.relu(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 as in MetaOptNet (Lee et al. 2019) and learn2learn: four :class:`ResNet12Block`
    of ``hidden_size x (1, 2.5, 5, 10)`` channels (64: 64-160-320-640), global average
    pooling, then a linear head. No DropBlock or dropout: a random mask in every forward would
    make iMAML's inner problem and its CG system random (see ``IMAML``'s warning).

    BatchNorm keeps no running statistics, as in :class:`Conv4` (per-task batch statistics,
    which the task-batched forward keeps apart). Any input of side >= 16 works: 84x84 gives
    5x5 maps before the pooling, 28x28 1x1.
    """

    def __init__(self, ways: int, hidden_size: int = 64, in_channels: int = 3):
        super().__init__()
        _check_sizes("ResNet12", ways=ways, hidden_size=hidden_size, in_channels=in_channels)
        widths = (hidden_size, hidden_size * 5 // 2, hidden_size * 5, hidden_size * 10)
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(ResNet12Block(channels, width))
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, ways)
        for module in self.modules():  # MetaOptNet's and learn2learn's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x):
        return self.head(self.features(x))


__all__ = ["Conv4", "ResNet12", "ResNet12Block"]
