"""Slice a supernet at a config into a plain, physically smaller network.

``materialize(supernet, config)`` returns a :class:`PlainNet` of ordinary
``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` layers holding only the chosen channels
(copies, not views, of the supernet's weights). It runs the same graph as the supernet,
so in eval mode its outputs equal the supernet's at that config. ``fold_bn=True`` folds
each BatchNorm into its conv (inference only), as the deployed graph has it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hwslim.config import ChannelConfig
from hwslim.graph import LayerSpec, last_uses, run_graph


class PlainNet(nn.Module):
    """An ordinary network described by concrete layer specs (the output of materialize)."""

    def __init__(self, specs: Sequence[LayerSpec], layers: dict[str, nn.Module],
                 config: ChannelConfig | None = None) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict(layers)
        self.config = config
        self._free_after = last_uses(self.specs)

    def _layer(self, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
        if spec.op == "linear" and spec.dropout and self.training:
            x = nn.functional.dropout(x, spec.dropout, True)
        return self.layers[spec.name](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_graph(self.specs, self._layer, x, free_after=self._free_after)


@torch.no_grad()
def materialize(model, config: ChannelConfig | None = None, fold_bn: bool = False) -> PlainNet:
    """Build the plain network of ``model`` (a SlimmableNet) at ``config`` (default: its current one)."""
    config = model.config if config is None else model.validate(config)
    specs = model.layer_specs(config)
    layers: dict[str, nn.Module] = {}
    for s in specs:
        if s.op == "conv":
            src = model.layers[s.name]
            w, _, groups = src.conv.active_weight(s.cin, s.cout)
            conv = nn.Conv2d(s.cin, s.cout, s.kernel, s.stride, s.padding, groups=groups, bias=False)
            conv.weight.copy_(w)
            bn = nn.BatchNorm2d(s.cout, eps=src.bn.eps, momentum=src.bn.momentum or 0.1)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(src.bn, name)[: s.cout])
            bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)
            conv = conv.to(src.conv.weight.device, src.conv.weight.dtype)
            bn = bn.to(src.conv.weight.device)
            layers[s.name] = fuse_conv_bn_eval(conv.eval(), bn.eval()) if fold_bn else nn.Sequential(conv, bn)
        elif s.op == "linear":
            src = model.layers[s.name]
            lin = nn.Linear(s.cin, s.cout, bias=True).to(src.weight.device, src.weight.dtype)
            lin.weight.copy_(src.weight[:, : s.cin])
            lin.bias.copy_(src.bias)
            layers[s.name] = lin
    if fold_bn:
        specs = [s if s.op != "conv" else _with(s, bn=False, bias=True) for s in specs]
    net = PlainNet(specs, layers, config)
    net.train(model.training and not fold_bn)
    return net


def _with(spec: LayerSpec, **changes) -> LayerSpec:
    from dataclasses import replace
    return replace(spec, **changes)
