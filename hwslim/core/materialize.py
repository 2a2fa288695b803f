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
from hwslim.core.graph import Key, LayerSpec, last_uses, run_graph


class PlainNet(nn.Module):
    """An ordinary network described by concrete layer specs (the output of materialize)."""

    def __init__(self, specs: Sequence[LayerSpec], layers: dict[str, nn.Module],
                 config: ChannelConfig | None = None, outputs: Sequence[tuple[Key, str]] = ()) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict(layers)
        self.config = config
        self.outputs = tuple(outputs)  # a network with several outputs (Graph.outputs)
        self._free_after = last_uses(self.specs, self.outputs)

    def _layer(self, spec: LayerSpec, xs: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        module = self.layers[spec.name] if spec.name in self.layers else None
        return spec.op.run_plain(module, xs, spec, inplace, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple | dict:
        return run_graph(self.specs, self._layer, x, free_after=self._free_after, outputs=self.outputs)


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
    net = PlainNet(specs, layers, config, model.outputs)
    net.train(model.training and not fold_bn)
    return net


_LOW = 4096  # probe values stay below 2**24, exact in float32 (the materialized layers copy through float32)


def _float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def slice_positions(model, config: ChannelConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """Where each weight of ``materialize(model, config)`` comes from in ``model``.

    For every floating-point entry of the plain network's state dict: the supernet's
    state-dict key and the flat positions in it (a LongTensor of the entry's shape). Found
    by materializing a probe copy whose every element holds its own position, so no
    operator needs an inverse of its slicing; two probes (high and low part) keep each
    value exact.
    """
    import copy

    probe = copy.deepcopy(model).cpu().double()
    own = _float_tensors(probe)
    keys = list(own)
    parts = []
    for layer in ("tensor", "high", "low"):
        for i, (k, t) in enumerate(own.items()):
            pos = torch.arange(t.numel(), dtype=torch.float64).view_as(t)
            t.copy_(torch.full_like(t, i) if layer == "tensor" else pos // _LOW if layer == "high" else pos % _LOW)
        parts.append(_float_tensors(materialize(probe, config)))
    out = {}
    for k in parts[0]:
        which = parts[0][k].long().unique()
        if len(which) != 1 or not torch.equal(parts[0][k], parts[0][k].round()):
            raise ValueError(f"materialized {k} does not copy one supernet tensor")
        out[k] = (keys[int(which)], (parts[1][k] * _LOW + parts[2][k]).long())
    return out


@torch.no_grad()
def write_back(model, plain: nn.Module, positions: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Copy ``plain``'s weights (and BN statistics) into the slices of ``model`` they were cut from
    (``positions`` from :func:`slice_positions`); every other element of ``model`` is left as it is."""
    state, own = plain.state_dict(), model.state_dict()
    for k, (src, pos) in positions.items():
        own[src].view(-1)[pos.view(-1).to(own[src].device)] = state[k].detach().reshape(-1).to(own[src])
