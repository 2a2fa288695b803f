"""``SlimmableNet``: a supernet that runs any channel config of its units.

Model files build one with a :class:`GraphBuilder` (see ``hwslim/models``): they
declare units, then add conv/pool/linear nodes whose widths name those units. The
supernet's forward runs the graph with the widths of its current config::

    >>> net = create_model("resnet20")
    >>> cfg = net.uniform_config(6)          # every unit at 6/12 of its width
    >>> net.set_config(cfg); y = net(x)      # or: with net.using(cfg): y = net(x)

There is no global state: the config lives on the instance.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from hwslim.config import ChannelConfig
from hwslim.errors import ConfigError
from hwslim.graph import INPUT, LayerSpec, Node, Width, last_uses, layer_specs, run_graph
from hwslim.rounding import DEFAULT_DIVISOR, DIVISORS
from hwslim.slimmable import SlimmableConv2d, SlimmableConvBN, SlimmableLinear
from hwslim.units import GRID_STEPS, ChannelUnit, step_width


class GraphBuilder:
    """Collects units, nodes and their full-width layers while a model file describes a net."""

    def __init__(self) -> None:
        self.units: dict[str, int] = {}
        self.nodes: list[Node] = []
        self.modules: dict[str, nn.Module] = {}

    def unit(self, name: str, max_width: int) -> str:
        if name in self.units:
            raise ValueError(f"unit {name!r} declared twice")
        self.units[name] = int(max_width)
        return name

    def _max(self, width: Width) -> int:
        return width if isinstance(width, int) else self.units[width]

    def _add(self, node: Node, module: nn.Module | None) -> str:
        if node.name in self.modules or any(n.name == node.name for n in self.nodes) or node.name == INPUT:
            raise ValueError(f"node name {node.name!r} used twice")
        self.nodes.append(node)
        if module is not None:
            self.modules[node.name] = module
        return node.name

    def conv(self, name: str, x: str, cin: Width, cout: Width | None, kernel: int, stride: int = 1, *,
             depthwise: bool = False, groups: int = 1, act: str | None = "relu", residual: str | None = None) -> str:
        """Add ``act(bn(conv(x)) [+ residual])``; returns the output tensor's name."""
        if depthwise:
            cout = cin
        cin_max, cout_max = self._max(cin), self._max(cout)
        conv = SlimmableConv2d(cin_max, cout_max, kernel, stride, (kernel - 1) // 2, groups=groups, depthwise=depthwise)
        node = Node(name, "conv", x, cin, cout, kernel, stride, (kernel - 1) // 2, groups, depthwise, act, residual)
        return self._add(node, SlimmableConvBN(conv))

    def maxpool(self, name: str, x: str, c: Width, kernel: int, stride: int, padding: int) -> str:
        return self._add(Node(name, "maxpool", x, c, c, kernel, stride, padding), None)

    def gap(self, name: str, x: str, c: Width) -> str:
        return self._add(Node(name, "gap", x, c, c), None)

    def linear(self, name: str, x: str, cin: Width, cout: int, dropout: float = 0.0) -> str:
        node = Node(name, "linear", x, cin, cout, dropout=dropout)
        return self._add(node, SlimmableLinear(self._max(cin), cout))


class SlimmableNet(nn.Module):
    """A slimmable supernet: a graph of nodes over slimmable layers, plus its units."""

    def __init__(self, name: str, builder: GraphBuilder, *, width_mult: float, input_size: int,
                 num_classes: int, divisor: int = DEFAULT_DIVISOR, in_channels: int = 3) -> None:
        super().__init__()
        if divisor not in DIVISORS:
            raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor}")
        self.name = name
        self.width_mult = float(width_mult)
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.divisor = int(divisor)
        self.in_channels = in_channels
        self.nodes: tuple[Node, ...] = tuple(builder.nodes)
        self.units: dict[str, ChannelUnit] = {
            u: ChannelUnit.build(u, w, divisor) for u, w in builder.units.items()
        }
        self.layers = nn.ModuleDict(builder.modules)
        self._free_after = last_uses(self.nodes)
        self._widths: dict[str, int] = {u: unit.max_width for u, unit in self.units.items()}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # -- configs ------------------------------------------------------------------------
    def config_of(self, widths: Mapping[str, int], **meta) -> ChannelConfig:
        return ChannelConfig(self.name, self.width_mult, self.input_size, widths, meta)

    def full_config(self) -> ChannelConfig:
        return self.config_of({u: unit.max_width for u, unit in self.units.items()})

    def min_config(self) -> ChannelConfig:
        return self.config_of({u: unit.grid[0] for u, unit in self.units.items()})

    def uniform_config(self, step: int) -> ChannelConfig:
        """Every unit at grid step ``step`` of ``GRID_STEPS`` (12 = full width)."""
        return self.config_of({u: step_width(unit.max_width, step, self.divisor) for u, unit in self.units.items()})

    def uniform_configs(self) -> list[ChannelConfig]:
        return [self.uniform_config(s) for s in range(1, GRID_STEPS + 1)]

    def random_config(self, rng: random.Random | None = None) -> ChannelConfig:
        rng = rng or random.Random()
        return self.config_of({u: rng.choice(unit.grid) for u, unit in self.units.items()})

    def validate(self, config: ChannelConfig) -> ChannelConfig:
        """Raise :class:`ConfigError` naming the first problem of ``config`` for this net."""
        if config.model != self.name:
            raise ConfigError(f"config is for model {config.model!r}, not {self.name!r}")
        if abs(config.width_mult - self.width_mult) > 1e-9:
            raise ConfigError(f"config is for width multiplier {config.width_mult:g}, "
                              f"this {self.name} supernet has {self.width_mult:g}")
        unknown = sorted(set(config.widths) - set(self.units))
        if unknown:
            raise ConfigError(f"unknown unit {unknown[0]!r} for {self.name} (it has: {', '.join(self.units)})")
        missing = [u for u in self.units if u not in config.widths]
        if missing:
            raise ConfigError(f"config lacks unit {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                              else f"config lacks unit {missing[0]!r}")
        for u, unit in self.units.items():
            if config.widths[u] not in unit.grid:
                raise ConfigError(f"unit {u!r}: width {config.widths[u]} is not on its grid {list(unit.grid)}")
        return config

    @property
    def config(self) -> ChannelConfig:
        return self.config_of(self._widths)

    def set_config(self, config: ChannelConfig) -> None:
        self._widths = dict(self.validate(config).widths)

    @contextlib.contextmanager
    def using(self, config: ChannelConfig) -> Iterator["SlimmableNet"]:
        """Run with ``config`` inside the block, then restore the previous config."""
        old = self._widths
        self.set_config(config)
        try:
            yield self
        finally:
            self._widths = old

    # -- structure ------------------------------------------------------------------------
    def layer_specs(self, config: ChannelConfig | None = None, batch: int = 1,
                    input_size: int | None = None) -> list[LayerSpec]:
        widths = self._widths if config is None else self.validate(config).widths
        if input_size is not None and input_size < 1:
            raise ValueError(f"input size must be at least 1, got {input_size}")
        size = input_size if input_size is not None else (config.input_size if config is not None
                                                          else self.input_size)
        return layer_specs(self.nodes, widths, size, batch, self.in_channels)

    def unit_nodes(self) -> dict[str, list[int]]:
        """For each unit, the indices of the nodes whose input or output width it sets."""
        out: dict[str, list[int]] = {u: [] for u in self.units}
        for i, n in enumerate(self.nodes):
            for ref in {n.cin, n.cout}:
                if isinstance(ref, str):
                    out[ref].append(i)
        return out

    # -- execution ------------------------------------------------------------------------
    def _layer(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        module = self.layers[node.name]
        if node.op == "linear":
            if node.dropout and self.training:
                x = nn.functional.dropout(x, node.dropout, True)
            return module(x)
        return module(x, None if node.depthwise else self._width(node.cout))

    def _width(self, ref: Width) -> int:
        return ref if isinstance(ref, int) else self._widths[ref]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_graph(self.nodes, self._layer, x, free_after=self._free_after)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, width_mult={self.width_mult:g}, units={len(self.units)}"

