"""Blocks the zoo's models share: the stem conv, the inverted residual and the classifier.

Each helper adds nodes to a :class:`GraphBuilder` in the order torchvision's modules
register them, so a model built from them keeps torchvision's state-dict order (and
its graph JSON) exactly; names are given by the caller, so every model keeps its own.
"""
from __future__ import annotations

from hwslim.core.graph import INPUT
from hwslim.core.rounding import make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet


def stem(g: GraphBuilder, channels: int, width_mult: float, kernel: int, stride: int,
         act: str | None = "relu") -> tuple[str, str]:
    """The first conv on the image, its output a unit named ``stem``: (unit, node)."""
    unit = g.unit("stem", make_divisible(channels * width_mult))
    return unit, g.conv("stem", INPUT, 3, unit, kernel, stride, act=act)


def inverted_residual(g: GraphBuilder, name: str, x: str, cin: str, cout: str, expanded: int, kernel: int,
                      stride: int, act: str, *, residual: str | None = None, se_width: int | None = None,
                      se_act: str = "relu", se_gate: str = "sigmoid") -> str:
    """MobileNetV2's block: 1x1 expand, depthwise, optional squeeze-excite, 1x1 project.

    The expansion (unit ``{name}/hidden``) is left out where ``expanded`` equals the input
    width, as torchvision does; the depthwise conv is then tied to ``cin``. ``se_width``
    declares the SE unit ``{name}/se``; ``residual`` is added after the projection.
    """
    h, hidden = x, cin
    if expanded != g.units[cin]:
        hidden = g.unit(f"{name}/hidden", expanded)
        h = g.conv(f"{name}/expand", h, cin, hidden, 1, act=act)
    h = g.conv(f"{name}/dw", h, hidden, None, kernel, stride, depthwise=True, act=act)
    if se_width is not None:
        h = g.se(f"{name}/se", h, g.unit(f"{name}/se", se_width), act=se_act, gate=se_gate)
    return g.conv(f"{name}/project", h, hidden, cout, 1, act=None, residual=residual)


def conv_head(g: GraphBuilder, x: str, cin: str, width: int, act: str) -> tuple[str, str]:
    """The last 1x1 conv before pooling, its output a unit named ``head``: (unit, node)."""
    head = g.unit("head", width)
    return head, g.conv("head", x, cin, head, 1, act=act)


def classifier(g: GraphBuilder, name: str, x: str, c: str | None, num_classes: int, *, width_mult: float,
               input_size: int, divisor: int, fc: str = "classifier", dropout: float = 0.0) -> SlimmableNet:
    """Global average pool, the linear layer ``fc``, and the supernet over the built graph.

    ``c`` is the pooled input's unit (``None`` where it is a concatenation, as in DenseNet).
    """
    x = g.gap("pool", x, c)
    g.linear(fc, x, c, num_classes, dropout=dropout)
    return SlimmableNet(name, g, width_mult=width_mult, input_size=input_size, num_classes=num_classes,
                        divisor=divisor)
