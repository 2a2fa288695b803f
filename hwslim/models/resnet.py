"""Slimmable ResNets: ResNet-50 (torchvision's v1.5) and the CIFAR ResNet-20/56 family.

ResNet-50 at ``width_mult=1.0`` has exactly torchvision's ``resnet50`` parameters
(25,557,032) and MACs (4,089,184,256 at 224). Units: ``stem``, ``s1``..``s4`` (each
stage's residual stream), and per block ``l{stage}b{i}/mid1`` and ``/mid2`` (the
bottleneck's inner widths; ``mid`` for a CIFAR basic block).

CIFAR ResNets (He et al. 2016, section 4.2) use projection shortcuts (option B) where
the shape changes, so every shortcut is an ordinary, slimmable conv.
"""
from __future__ import annotations

from hwslim.core.graph import INPUT
from hwslim.models.blocks import classifier, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# planes, blocks, first stride (torchvision's resnet50 layers; output = planes * 4)
_RESNET50 = [
    # planes, n, s
    [64, 3, 1],
    [128, 4, 2],
    [256, 6, 2],
    [512, 3, 2],
]


def _bottleneck(g: GraphBuilder, name: str, x: str, cin: str, cout: str, planes: int, stride: int) -> str:
    mid1 = g.unit(f"{name}/mid1", planes)
    mid2 = g.unit(f"{name}/mid2", planes)
    h = g.conv(f"{name}/conv1", x, cin, mid1, 1)
    h = g.conv(f"{name}/conv2", h, mid1, mid2, 3, stride)
    # the shortcut runs before conv3 so conv3 can fuse the add (and x is freed earlier)
    skip = x if cin == cout else g.conv(f"{name}/downsample", x, cin, cout, 1, stride, act=None)
    return g.conv(f"{name}/conv3", h, mid2, cout, 1, act="relu", residual=skip)


@register_model
def resnet50(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
             divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """ResNet-50 v1.5 for 224x224 (AutoSlim starts from 1.0x)."""
    g = GraphBuilder()
    cin, x = stem(g, 64, width_mult, 7, 2)
    x = g.maxpool("maxpool", x, cin, 3, 2, 1)
    for stage, (planes, n, s) in enumerate(_RESNET50, start=1):
        p = make_divisible(planes * width_mult)
        cout = g.unit(f"s{stage}", p * 4)
        for i in range(n):
            x = _bottleneck(g, f"l{stage}b{i}", x, cin, cout, p, s if i == 0 else 1)
            cin = cout
    return classifier(g, "resnet50", x, cin, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, fc="fc")


def _cifar_resnet(name: str, depth: int, width_mult: float, num_classes: int, input_size: int,
                  divisor: int) -> SlimmableNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    g = GraphBuilder()
    widths = [make_divisible(c * width_mult) for c in (16, 32, 64)]
    cin = g.unit("s1", widths[0])  # the stem feeds stage 1's identity shortcuts: one unit
    x = g.conv("stem", INPUT, 3, cin, 3, 1)
    for stage, w in enumerate(widths, start=1):
        cout = cin if stage == 1 else g.unit(f"s{stage}", w)
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            blk = f"l{stage}b{i}"
            mid = g.unit(f"{blk}/mid", w)
            h = g.conv(f"{blk}/conv1", x, cin, mid, 3, stride)
            skip = x if cin == cout else g.conv(f"{blk}/shortcut", x, cin, cout, 1, stride, act=None)
            x = g.conv(f"{blk}/conv2", h, mid, cout, 3, act="relu", residual=skip)
            cin = cout
    return classifier(g, name, x, cin, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, fc="fc")


@register_model
def resnet20(width_mult: float = 1.0, num_classes: int = 10, input_size: int = 32,
             divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """CIFAR ResNet-20 for 32x32."""
    return _cifar_resnet("resnet20", 20, width_mult, num_classes, input_size, divisor)


@register_model
def resnet56(width_mult: float = 1.0, num_classes: int = 10, input_size: int = 32,
             divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """CIFAR ResNet-56 for 32x32."""
    return _cifar_resnet("resnet56", 56, width_mult, num_classes, input_size, divisor)
