"""Slimmable EfficientNet-B0 (Tan & Le 2019) in torchvision's layout.

At ``width_mult=1.0`` and the full config it has exactly torchvision's
``efficientnet_b0`` parameters (5,288,548) and MACs (385,814,752 at 224); with
torchvision's weights loaded the outputs are equal (stochastic depth is the identity at
inference and is not applied in training here). Units: ``stem``, ``s{i}`` (each
stage's output, tied across its residual adds), ``b{i}/hidden`` (expansion, tied
through the depthwise conv), ``b{i}/se`` (SE reduce width, a quarter of the block's
input width) and ``head``.
"""
from __future__ import annotations

import math

from hwslim.models.blocks import classifier, conv_head, inverted_residual, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# t: expansion, k: kernel, s: first stride, c: output channels, n: layers (torchvision's B0 table)
_B0 = [
    # t, k, s, c, n
    [1, 3, 1, 16, 1],
    [6, 3, 2, 24, 2],
    [6, 5, 2, 40, 2],
    [6, 3, 2, 80, 3],
    [6, 5, 1, 112, 3],
    [6, 5, 2, 192, 4],
    [6, 3, 1, 320, 1],
]


def _efficientnet(name: str, width_mult: float, depth_mult: float, num_classes: int, input_size: int,
                  divisor: int, dropout: float) -> SlimmableNet:
    g = GraphBuilder()
    cin, x = stem(g, 32, width_mult, 3, 2, act="silu")
    block = 0
    for stage, (t, k, s, c, n) in enumerate(_B0, start=1):
        cout = g.unit(f"s{stage}", make_divisible(c * width_mult))
        for i in range(int(math.ceil(n * depth_mult))):
            stride, residual = (s, None) if i == 0 else (1, x)
            if residual is not None and cout != cin:
                raise AssertionError("a repeated EfficientNet block keeps its stage's width")
            width_in = g.units[cin]
            x = inverted_residual(g, f"b{block}", x, cin, cout, make_divisible(width_in * t), k, stride, "silu",
                                  residual=residual, se_width=max(1, width_in // 4), se_act="silu")
            cin, block = cout, block + 1
    head, x = conv_head(g, x, cin, 4 * g.units[cin], act="silu")
    return classifier(g, name, x, head, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, dropout=dropout)

@register_model
def efficientnet_b0(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                    divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """EfficientNet-B0 for 224x224 (torchvision's efficientnet_b0 at width 1.0)."""
    return _efficientnet("efficientnet_b0", width_mult, 1.0, num_classes, input_size, divisor, dropout=0.2)
