"""Slimmable MobileNetV1 (Howard et al. 2017).

torchvision has no MobileNetV1; at ``width_mult=1.0`` this matches the paper's
4.2M parameters and 569M MACs at 224. Units: ``stem`` and ``c1``..``c13``, the output of
each depthwise-separable block's pointwise conv (the next depthwise conv is tied to it).
"""
from __future__ import annotations

from hwslim.models.blocks import classifier, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# c: pointwise output channels, s: depthwise stride
_SETTING = [
    # c, s
    [64, 1],
    [128, 2],
    [128, 1],
    [256, 2],
    [256, 1],
    [512, 2],
    [512, 1],
    [512, 1],
    [512, 1],
    [512, 1],
    [512, 1],
    [1024, 2],
    [1024, 1],
]


@register_model
def mobilenet_v1(width_mult: float = 1.5, num_classes: int = 1000, input_size: int = 224,
                 divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """MobileNetV1 for 224x224 (AutoSlim starts from a 1.5x supernet)."""
    g = GraphBuilder()
    cin, x = stem(g, 32, width_mult, 3, 2)
    for i, (c, s) in enumerate(_SETTING, start=1):
        cout = g.unit(f"c{i}", make_divisible(c * width_mult))
        x = g.conv(f"b{i}/dw", x, cin, None, 3, s, depthwise=True)
        x = g.conv(f"b{i}/pw", x, cin, cout, 1)
        cin = cout
    return classifier(g, "mobilenet_v1", x, cin, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor)
