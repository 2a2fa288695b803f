"""Slimmable MobileNetV2 (torchvision's layout) and its CIFAR variant.

At ``width_mult=1.0`` and the full config it has exactly torchvision's
``mobilenet_v2`` parameters (3,504,872) and MACs (300,774,272 at 224).

Units: ``stem`` (stem output, block 0's depthwise), ``s1``..``s7`` (each stage's output
stream, tied across its residual adds), ``b{i}/hidden`` (block i's expansion, tied
through its depthwise conv) and ``head`` (the last 1x1 conv).
"""
from __future__ import annotations

from hwslim.models.blocks import classifier, conv_head, inverted_residual, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# t: expansion, c: output channels, n: repeats, s: first stride (torchvision's table)
_IMAGENET_SETTING = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
# CIFAR (32x32): stem stride 1 and the 24-channel stage stride 1, so the last map is 4x4.
_CIFAR_SETTING = [_IMAGENET_SETTING[0], [6, 24, 2, 1], *_IMAGENET_SETTING[2:]]


def _mobilenet_v2(name: str, setting: list[list[int]], stem_stride: int, width_mult: float, num_classes: int,
                  input_size: int, divisor: int, dropout: float = 0.2) -> SlimmableNet:
    g = GraphBuilder()
    cin, x = stem(g, 32, width_mult, 3, stem_stride, act="relu6")
    block = 0
    for stage, (t, c, n, s) in enumerate(setting, start=1):
        cout = g.unit(f"s{stage}", make_divisible(c * width_mult))
        for i in range(n):
            # repeats keep stride 1 and the stage's unit
            x = inverted_residual(g, f"b{block}", x, cin, cout, int(round(g.units[cin] * t)), 3, s if i == 0 else 1,
                                  "relu6", residual=x if i > 0 else None)
            cin, block = cout, block + 1
    head, x = conv_head(g, x, cin, make_divisible(1280 * max(1.0, width_mult)), act="relu6")
    return classifier(g, name, x, head, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, dropout=dropout)


@register_model
def mobilenet_v2(width_mult: float = 1.5, num_classes: int = 1000, input_size: int = 224,
                 divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """MobileNetV2 for 224x224 (AutoSlim starts from a 1.5x supernet)."""
    return _mobilenet_v2("mobilenet_v2", _IMAGENET_SETTING, 2, width_mult, num_classes, input_size, divisor)


@register_model
def mobilenet_v2_cifar(width_mult: float = 1.0, num_classes: int = 10, input_size: int = 32,
                       divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """MobileNetV2 with CIFAR strides for 32x32 inputs."""
    return _mobilenet_v2("mobilenet_v2_cifar", _CIFAR_SETTING, 1, width_mult, num_classes, input_size, divisor)
