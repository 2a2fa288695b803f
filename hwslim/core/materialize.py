"""Slice a supernet at a config into a plain, physically smaller network.

``materialize(supernet, config)`` returns a :class:`PlainNet` of ordinary
``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` layers holding only the chosen channels
(copies, not views, of the supernet's weights). It runs the same graph as the supernet,
so in eval mode its outputs equal the supernet's at that config. ``fold_bn=True`` folds
each BatchNorm into its conv (inference only), as the deployed graph has it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from hwslim.core.config import ChannelConfig
from hwslim.core.graph import LayerSpec, last_uses, run_graph


class PlainNet(nn.Module):
    """An ordinary network described by concrete layer specs (the output of materialize)."""

    def __init__(self, specs: Sequence[LayerSpec], layers: dict[str, nn.Module],
                 config: ChannelConfig | None = None) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict(layers)
        self.config = config
        self._free_after = last_uses(self.specs)

    def _layer(self, spec: LayerSpec, xs: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        module = self.layers[spec.name] if spec.name in self.layers else None
        return spec.op.run_plain(module, xs, spec, inplace, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_graph(self.specs, self._layer, x, free_after=self._free_after)


def plain_layers(specs: Sequence[LayerSpec], model=None) -> dict[str, nn.Module]:
    """Each spec's plain module: the supernet's kept channels (``model``), else random weights."""
    layers: dict[str, nn.Module] = {}
    for s in specs:
        src = None
        if model is not None and s.name in model.layers:
            src = model.layers[s.name]
        m = s.op.plain(s, src)
        if m is not None:
            layers[s.name] = m
    return layers


@torch.no_grad()
def materialize(model, config: ChannelConfig | None = None, fold_bn: bool = False) -> PlainNet:
    """Build the plain network of ``model`` (a SlimmableNet) at ``config`` (default: its current one)."""
    config = model.config if config is None else model.validate(config)
    specs = model.layer_specs(config)
    layers = plain_layers(specs, model)
    if fold_bn:
        folded = []
        for s in specs:
            op, m = s.op.folded(s, layers.get(s.name))
            if m is not None:
                layers[s.name] = m
            folded.append(replace(s, op=op))
        specs = folded
    net = PlainNet(specs, layers, config)
    net.train(model.training and not fold_bn)
    return net
