"""Slimmable RegNetY (Radosavovic et al. 2020) in torchvision's layout.

At ``width_mult=1.0`` and the full config, ``regnet_y_400mf`` has exactly torchvision's
parameters (4,344,144) and MACs (401,842,848 at 224); with torchvision's weights loaded
the outputs are equal. The stage widths come from torchvision's own ``BlockParams``.
Units: ``stem``, ``s{i}`` (each stage's residual stream), per block ``{b}/mid`` (the
bottleneck width; it moves in multiples of the group width, so the group count follows
the width) and ``{b}/se`` (SE reduce width, a quarter of the block's input width).
"""
from __future__ import annotations

from hwslim.models.blocks import classifier, stem
from hwslim.models.registry import register_model
from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible
from hwslim.core.supernet import GraphBuilder, SlimmableNet


def _regnet(name: str, depth: int, w_0: int, w_a: float, w_m: float, group_width: int, se_ratio: float,
            width_mult: float, num_classes: int, input_size: int, divisor: int) -> SlimmableNet:
    import torch
    from torchvision.models.regnet import BlockParams

    with torch.device("cpu"):  # torchvision computes the widths with tensors (also when building on "meta")
        params = BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width,
                                              se_ratio=se_ratio)
        stages = list(params._get_expanded_params())
    g = GraphBuilder()
    cin, x = stem(g, 32, width_mult, 3, 2)
    for stage, (w_out, stride, n, gw, bm) in enumerate(stages, start=1):
        w_out = make_divisible(w_out * width_mult, gw) if width_mult != 1.0 else w_out
        cout = g.unit(f"s{stage}", w_out)
        for i in range(n):
            b = f"l{stage}b{i}"
            s = stride if i == 0 else 1
            width_in = g.units[cin]
            # the projection first, as torchvision registers it (its state dict order)
            skip = g.conv(f"{b}/proj", x, cin, cout, 1, s, act=None) if (width_in != w_out or s != 1) else x
            mid = g.unit(f"{b}/mid", int(round(w_out * bm)), quantum=gw)
            h = g.conv(f"{b}/a", x, cin, mid, 1, act="relu")
            h = g.conv(f"{b}/b", h, mid, None, 3, s, group_width=gw, act="relu")
            h = g.se(f"{b}/se", h, g.unit(f"{b}/se", int(round(se_ratio * width_in))), act="relu", gate="sigmoid")
            x = g.conv(f"{b}/c", h, mid, cout, 1, act="relu", residual=skip)
            cin = cout
    return classifier(g, name, x, cin, num_classes, width_mult=width_mult, input_size=input_size,
                      divisor=divisor, fc="fc")


@register_model
def regnet_y_400mf(width_mult: float = 1.0, num_classes: int = 1000, input_size: int = 224,
                   divisor: int = DEFAULT_DIVISOR) -> SlimmableNet:
    """RegNetY-400MF for 224x224 (torchvision's regnet_y_400mf at width 1.0)."""
    return _regnet("regnet_y_400mf", 16, 48, 27.89, 2.09, 8, 0.25, width_mult, num_classes, input_size, divisor)
