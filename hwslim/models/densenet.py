"""Slimmable DenseNet-121 (Huang et al. 2017) in torchvision's layout.

At ``width_mult=1.0`` and the full config it has exactly torchvision's ``densenet121``
parameters (7,978,856) and MACs (2,834,161,664 at 224); with torchvision's weights
loaded the outputs are equal. Each dense layer concatenates its new features to its
input, so a layer reads the concatenation of the block's input and every earlier
layer's features; slimming keeps the kept channels of each part. Units: ``stem``,
per layer ``db{i}/l{j}/mid`` (the 1x1 bottleneck) and ``db{i}/l{j}`` (its new
features, the growth rate), and ``tr{i}`` (each transition's output).
"""
from __future__ import annotations

from hwslim.core.graph import INPUT
from hwslim.models.blocks import classifier
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet


def _densenet(name: str, growth: int, blocks: tuple[int, ...], init_features: int, bn_size: int,
              width_mult: float, num_classes: int, input_size: int, divisor: int) -> SlimmableNet:
    g = GraphBuilder()
    growth_w = make_divisible(growth * width_mult)
    stem = g.unit("stem", make_divisible(init_features * width_mult))
    x = g.conv("conv0", INPUT, 3, stem, 7, 2, act="relu")
    x = g.maxpool("pool0", x, stem, 3, 2, 1)
    channels = g.units[stem]
    for i, n in enumerate(blocks, start=1):
        for j in range(1, n + 1):
            lay = f"db{i}/l{j}"
            h = g.bn(f"{lay}/norm1", x, act="relu")
            mid = g.unit(f"{lay}/mid", bn_size * growth_w)
            h = g.conv(f"{lay}/conv1", h, None, mid, 1, act="relu")  # conv1, norm2, relu2
            new = g.unit(lay, growth_w)
            h = g.conv(f"{lay}/conv2", h, mid, new, 3, act=None, bn=False)
            x = g.concat(f"{lay}/cat", x, h)
            channels += growth_w
        if i < len(blocks):
            h = g.bn(f"tr{i}/norm", x, act="relu")
            out = g.unit(f"tr{i}", channels // 2)
            h = g.conv(f"tr{i}/conv", h, None, out, 1, act=None, bn=False)
            x = g.avgpool(f"tr{i}/pool", h, 2, 2)
            channels //= 2
    x = g.bn("norm5", x, act="relu")
    return classifier(g, name, x, None, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor)


@register_model
def densenet121(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """DenseNet-121 for 224x224 (torchvision's densenet121 at width 1.0)."""
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, 4, width_mult, num_classes, input_size, divisor)
