"""Small CNNs written the way people write them (issue 29's idioms), for ``model_coverage --idioms``.

Each entry of :data:`IDIOMS` builds a module at random weights that takes images of any size
from 32 px. ``shared_conv`` is a module called twice: hwslim refuses it by name rather than
split its weights.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _head(c: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


class _Act(nn.Module):
    """Two convs, each with a norm and an activation (``act(c)``: a module for c channels); a classifier."""

    def __init__(self, act: Callable[[int], nn.Module], norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), norm(16), act(16),
                                  nn.Conv2d(16, 32, 3, 2, 1, bias=False), norm(32), act(32))
        self.head = _head(32)

    def forward(self, x):
        return self.head(self.body(x))


class LinearSE(nn.Module):
    """An SE of Linear layers without bias, its gate viewed back and expanded."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // r, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class CifarResNetBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding="same", bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding="same", bias=False), nn.BatchNorm2d(c)
        self.se = LinearSE(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        out.add_(x)  # in place on a tensor read later
        return F.relu(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet idiom: 'same' padding, ``y.add_(x)``, ``F.avg_pool2d(x, x.size()[3])``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(CifarResNetBlock(16), CifarResNetBlock(16))
        self.bn1d, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.avg_pool2d(x, x.size()[3])
        return self.fc(self.bn1d(x.view(x.size(0), -1)))


class ScaledResidual(nn.Module):
    """``x + 0.2 * y``, ``y.add(x)``, ``x + 0``: scalar arithmetic on branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.head = _head(16)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + 0.2 * F.relu(self.a(x))
        x = self.b(x).add(x) + 0
        return self.head(x)


class Gated(nn.Module):
    """LRASPP's gate: one branch times a pooled 1x1 conv's sigmoid of the other; a bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.cbr = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1, bias=False), nn.Sigmoid())
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return F.interpolate(self.out(self.cbr(h) * self.scale(h)), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


class Dilated(nn.Module):
    """An ASPP-like head: dilated 3x3 convs at several rates, a 1x5 and a 5x1 conv, a nearest upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.rates = nn.ModuleList(nn.Conv2d(16, 8, 3, padding=r, dilation=r) for r in (1, 2, 3))
        self.h, self.v = nn.Conv2d(24, 16, (1, 5), padding=(0, 2)), nn.Conv2d(16, 16, (5, 1), padding=(2, 0))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.cls = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([F.relu(r(x)) for r in self.rates], 1)
        return self.cls(self.up(self.v(self.h(x))))


class FrozenBN(nn.Module):
    """A detector's backbone style: convs with torchvision's FrozenBatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), FrozenBatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1, bias=False), FrozenBatchNorm2d(32), nn.ReLU())
        self.head = _head(32)

    def forward(self, x):
        return self.head(self.body(x))


class SharedConv(nn.Module):
    """A conv called twice: one set of weights; hwslim refuses it by name rather than split it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = _head(16)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.block(F.relu(self.block(x))))


IDIOMS: dict[str, Callable[[], nn.Module]] = {
    "prelu": lambda: _Act(nn.PReLU),  # one slope per channel
    "prelu_shared": lambda: _Act(lambda c: nn.PReLU()),
    "leaky_relu": lambda: _Act(lambda c: nn.LeakyReLU(0.1)),
    "elu": lambda: _Act(lambda c: nn.ELU()),
    "gelu": lambda: _Act(lambda c: nn.GELU()),
    "group_norm": lambda: _Act(lambda c: nn.ReLU(), lambda c: nn.GroupNorm(4, c)),
    "frozen_bn": FrozenBN,
    "cifar_resnet": CifarResNet,
    "scaled_residual": ScaledResidual,
    "gated_upsampling": Gated,
    "dilated_1xk": Dilated,
    "shared_conv": SharedConv,
}
