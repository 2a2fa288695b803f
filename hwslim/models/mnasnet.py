"""Slimmable MNasNet-A1 as torchvision's ``mnasnet1_0``.

At ``width_mult=1.0`` it has exactly torchvision's parameters (4,383,312) and MACs
(314,415,872 at 224). Units: ``stem`` (stem conv and the depthwise after it), ``sep``
(the 16-channel separable output), ``s1``..``s6`` (stack outputs, tied across their
residual adds), ``b{i}/hidden`` (each block's expansion) and ``head``.
"""
from __future__ import annotations

from hwslim.core.graph import INPUT
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

_DEPTHS = [32, 16, 24, 40, 80, 96, 192, 320]
# c: output channels, k: kernel, s: first stride, t: expansion, n: repeats (torchvision's _stack calls)
_STACKS = [
    # c, k, s, t, n
    [24, 3, 2, 3, 3],
    [40, 5, 2, 3, 3],
    [80, 5, 2, 6, 3],
    [96, 3, 1, 6, 2],
    [192, 5, 2, 6, 4],
    [320, 3, 1, 6, 1],
]


@register_model
def mnasnet(width_mult: float = 1.5, num_classes: int = 1000, input_size: int = 224,
            divisor: int = DEFAULT_DIVISOR, dropout: float = 0.2) -> SlimmableNet:
    """MNasNet 224x224 (torchvision's mnasnet1_0 at width_mult=1.0)."""
    g = GraphBuilder()
    stem = g.unit("stem", make_divisible(32 * width_mult))
    x = g.conv("stem", INPUT, 3, stem, 3, 2)
    x = g.conv("stem/dw", x, stem, None, 3, 1, depthwise=True)
    cin = g.unit("sep", make_divisible(16 * width_mult))
    x = g.conv("stem/pw", x, stem, cin, 1, act=None)
    block = 0
    for stage, (c, k, s, t, n) in enumerate(_STACKS, start=1):
        cout = g.unit(f"s{stage}", make_divisible(c * width_mult))
        for i in range(n):
            hidden = g.unit(f"b{block}/hidden", g.units[cin] * t)
            h = g.conv(f"b{block}/expand", x, cin, hidden, 1)
            h = g.conv(f"b{block}/dw", h, hidden, None, k, s if i == 0 else 1, depthwise=True)
            x = g.conv(f"b{block}/project", h, hidden, cout, 1, act=None, residual=x if i > 0 else None)
            cin, block = cout, block + 1
    head = g.unit("head", make_divisible(1280 * max(1.0, width_mult)))
    x = g.conv("head", x, cin, head, 1)
    x = g.gap("pool", x, head)
    g.linear("classifier", x, head, num_classes, dropout=dropout)
    return SlimmableNet("mnasnet", g, width_mult=width_mult, input_size=input_size,
                        num_classes=num_classes, divisor=divisor)
