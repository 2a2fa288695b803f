"""Slimmable MobileNetV3 (Howard et al. 2019) in torchvision's layout.

At ``width_mult=1.0`` and the full config, ``mobilenet_v3_large`` has exactly
torchvision's parameters (5,483,032) and MACs (216,589,760 at 224), and
``mobilenet_v3_small`` 2,542,856 / 56,510,400; with torchvision's weights loaded the
outputs are equal. Units: ``stem`` (and every block that adds back into it), ``s{i}``
(each new block output, tied across its residual adds), ``b{i}/hidden`` (a block's
expansion, tied through its depthwise conv), ``b{i}/se`` (its SE reduce width),
``head`` (the last 1x1 conv) and ``pre_logits`` (the classifier's hidden layer).
"""
from __future__ import annotations

from hwslim.models.blocks import conv_head, inverted_residual, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet

# k: kernel, e: expanded channels, c: output channels, se: squeeze-excite, a: activation, s: stride
_LARGE = [
    # k, e, c, se, a, s
    [3, 16, 16, False, "relu", 1],
    [3, 64, 24, False, "relu", 2],
    [3, 72, 24, False, "relu", 1],
    [5, 72, 40, True, "relu", 2],
    [5, 120, 40, True, "relu", 1],
    [5, 120, 40, True, "relu", 1],
    [3, 240, 80, False, "hardswish", 2],
    [3, 200, 80, False, "hardswish", 1],
    [3, 184, 80, False, "hardswish", 1],
    [3, 184, 80, False, "hardswish", 1],
    [3, 480, 112, True, "hardswish", 1],
    [3, 672, 112, True, "hardswish", 1],
    [5, 672, 160, True, "hardswish", 2],
    [5, 960, 160, True, "hardswish", 1],
    [5, 960, 160, True, "hardswish", 1],
]
_SMALL = [
    # k, e, c, se, a, s
    [3, 16, 16, True, "relu", 2],
    [3, 72, 24, False, "relu", 2],
    [3, 88, 24, False, "relu", 1],
    [5, 96, 40, True, "hardswish", 2],
    [5, 240, 40, True, "hardswish", 1],
    [5, 240, 40, True, "hardswish", 1],
    [5, 120, 48, True, "hardswish", 1],
    [5, 144, 48, True, "hardswish", 1],
    [5, 288, 96, True, "hardswish", 2],
    [5, 576, 96, True, "hardswish", 1],
    [5, 576, 96, True, "hardswish", 1],
]


def _mobilenet_v3(name: str, setting: list, last_channel: int, width_mult: float, num_classes: int,
                  input_size: int, divisor: int, dropout: float = 0.2) -> SlimmableNet:
    g = GraphBuilder(bn_eps=1e-3)  # torchvision's MobileNetV3 BatchNorm
    adjust = lambda c: make_divisible(c * width_mult)  # noqa: E731  (torchvision's adjust_channels)
    cin, x = stem(g, 16, width_mult, 3, 2, act="hardswish")
    stage = 0
    for i, (k, e, c, se, act, s) in enumerate(setting):
        exp, cout_w = adjust(e), adjust(c)
        residual = s == 1 and g.units[cin] == cout_w
        if residual:
            cout = cin
        else:
            stage += 1
            cout = g.unit(f"s{stage}", cout_w)
        x = inverted_residual(g, f"b{i}", x, cin, cout, exp, k, s, act, residual=x if residual else None,
                              se_width=make_divisible(exp // 4, 8) if se else None, se_gate="hardsigmoid")
        cin = cout
    head, x = conv_head(g, x, cin, 6 * g.units[cin], act="hardswish")
    x = g.gap("pool", x, head)
    hidden = g.unit("pre_logits", adjust(last_channel))
    x = g.linear("pre_logits", x, head, hidden, act="hardswish")
    g.linear("classifier", x, hidden, num_classes, dropout=dropout)
    return SlimmableNet(name, g, width_mult=width_mult, input_size=input_size, num_classes=num_classes,
                        divisor=divisor)


@register_model
def mobilenet_v3_large(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                       divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """MobileNetV3-Large for 224x224 (torchvision's mobilenet_v3_large at width 1.0)."""
    return _mobilenet_v3("mobilenet_v3_large", _LARGE, 1280, width_mult, num_classes, input_size, divisor)


@register_model
def mobilenet_v3_small(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                       divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """MobileNetV3-Small for 224x224 (torchvision's mobilenet_v3_small at width 1.0)."""
    return _mobilenet_v3("mobilenet_v3_small", _SMALL, 1024, width_mult, num_classes, input_size, divisor)
