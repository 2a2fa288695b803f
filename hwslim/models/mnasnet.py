"""Slimmable MNasNet-A1 as torchvision's ``mnasnet1_0``.

At ``width_mult=1.0`` it has exactly torchvision's parameters (4,383,312) and MACs
(314,415,872 at 224). Units: ``stem`` (stem conv and the depthwise after it), ``sep``
(the 16-channel separable output), ``s1``..``s6`` (stack outputs, tied across their
residual adds), ``b{i}/hidden`` (each block's expansion) and ``head``.
"""
from __future__ import annotations

from hwslim.models.blocks import classifier, conv_head, inverted_residual, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# torchvision's _get_depths: the stem, the separable conv, then each stack's output channels
_DEPTHS = [32, 16, 24, 40, 80, 96, 192, 320]
# k: kernel, s: first stride, t: expansion, n: repeats (torchvision's _stack calls; c from _DEPTHS[2:])
_STACKS = [
    # k, s, t, n
    [3, 2, 3, 3],
    [5, 2, 3, 3],
    [5, 2, 6, 3],
    [3, 1, 6, 2],
    [5, 2, 6, 4],
    [3, 1, 6, 1],
]


@register_model
def mnasnet(width_mult: float = 1.5, num_classes: int = 1000, input_size: int = 224,
            divisor: int = DEFAULT_DIVISOR, dropout: float = 0.2) -> SlimmableNet:
    """MNasNet 224x224 (torchvision's mnasnet1_0 at width_mult=1.0)."""
    g = GraphBuilder()
    sep, x = stem(g, _DEPTHS[0], width_mult, 3, 2)
    x = g.conv("stem/dw", x, sep, None, 3, 1, depthwise=True)
    cin = g.unit("sep", make_divisible(_DEPTHS[1] * width_mult))
    x = g.conv("stem/pw", x, sep, cin, 1, act=None)
    block = 0
    for stage, (c, (k, s, t, n)) in enumerate(zip(_DEPTHS[2:], _STACKS), start=1):
        cout = g.unit(f"s{stage}", make_divisible(c * width_mult))
        for i in range(n):
            x = inverted_residual(g, f"b{block}", x, cin, cout, g.units[cin] * t, k, s if i == 0 else 1, "relu",
                                  residual=x if i > 0 else None)
            cin, block = cout, block + 1
    head, x = conv_head(g, x, cin, make_divisible(1280 * max(1.0, width_mult)), act="relu")
    return classifier(g, "mnasnet", x, head, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, dropout=dropout)
