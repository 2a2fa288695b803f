"""A small CIFAR-size CNN written the way users write theirs: plain ``nn.Module`` code.

It has what hwslim's importer must understand in real networks: BatchNorm after convs,
a grouped conv, a squeeze-and-excitation block, a residual add and a concatenation.
``hwslim cost --model hwslim.examples.tiny_cnn:build`` imports it.
"""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.expand = conv_bn(width, 2 * width, 1)
        self.grouped = conv_bn(2 * width, 2 * width, 3, 2, groups=4)
        self.se = SqueezeExcite(2 * width, width // 2)
        self.project = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, width, 1, 2, bias=False), nn.BatchNorm2d(width))
        self.branch = conv_bn(width, width, 3)
        self.head = conv_bn(2 * width, 4 * width, 1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.project(self.se(self.grouped(self.expand(x)))) + self.down(x))
        x = torch.cat([x, self.branch(x)], dim=1)
        x = self.head(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build() -> nn.Module:
    """The example model, randomly initialized (``--init FILE`` loads your trained weights)."""
    return TinyCNN()
