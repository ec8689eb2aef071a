"""Small built-in models for the quickstart, the tests and the benchmarks.

Every factory takes keyword arguments only and returns an `nn.Module` mapping a batch of
features to class logits, so the registry can build them from a job file.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn


def mlp(
    in_features: int | Sequence[int] = 64,
    num_classes: int = 10,
    hidden: int = 128,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A ReLU MLP; `in_features` may be a shape, which is flattened."""
    flat = in_features if isinstance(in_features, int) else math.prod(in_features)
    layers: list[nn.Module] = [nn.Flatten()]
    width = flat
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def convnet(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 32,
    blocks: int = 2,
) -> nn.Module:
    """A small VGG-style conv net with batch norm and global average pooling."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(blocks):
        out = width * (2**i)
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(),
            nn.Conv2d(out, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(),
        ]
        if i < blocks - 1:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def is_conv_net(model: nn.Module) -> bool:
    """channels_last only pays off (and only applies) when the model has 2-d convolutions."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


BUILTINS = {"mlp": mlp, "convnet": convnet}

__all__ = ["mlp", "convnet", "is_conv_net", "num_parameters", "BUILTINS"]
