"""``SlimmableNet``: a supernet that runs any channel config of its units.

A supernet is built from a :class:`~hwslim.core.graph.Graph` (data: nodes with operators,
units, input shape, class count), which a model file writes with a
:class:`GraphBuilder`, a checkpoint stores as JSON, and an importer derives from a
user's module. The supernet's forward runs the graph with the widths of its current
config::

    >>> net = create_model("resnet20")
    >>> cfg = net.uniform_config(6)          # every unit at 6/12 of its width
    >>> with net.using(cfg):                 # or net.set_config(cfg)
    ...     y = net(torch.zeros(1, 3, 32, 32))

There is no global state: the config lives on the instance.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Mapping

import torch
from torch import nn

from hwslim.core.config import ChannelConfig
from hwslim.core.errors import ConfigError
from hwslim.core.graph import (INPUT, Graph, LayerSpec, Node, UnitDef, Width, graph_from_dict, graph_to_dict,
                          last_uses, layer_specs, resolve, run_graph, same_channels, tensor_infos)
from hwslim.core.ops import (Act, Add, AvgPool, BatchNorm, ChannelShuffle, ChannelSlice, Concat, Conv, Dropout, Flatten,
                        GlobalAvgPool, Linear, MaxPool, Op, Slice, SqueezeExcite)
from hwslim.core.rounding import DEFAULT_DIVISOR, DIVISORS
from hwslim.core.units import GRID_STEPS, ChannelUnit


class GraphBuilder:
    """Collects units and nodes while a model file describes a network.

    :meth:`node` adds a node of any operator (the shorthands below, one per built-in operator, call
    it) and returns its output tensor's name. Channel widths are
    unit names (declared with :meth:`unit`) or fixed ints; a node's input widths follow
    from the tensors it reads.
    """

    def __init__(self, in_channels: int = 3, bn_eps: float = 1e-5) -> None:
        self.bn_eps = float(bn_eps)  # BatchNorm's epsilon for every conv and BN node added
        self.units: dict[str, int] = {}
        self.quanta: dict[str, int] = {}
        self.nodes: list[Node] = []
        self._layouts: dict[str, tuple] = {INPUT: (in_channels,)}

    def unit(self, name: str, max_width: int, quantum: int = 1) -> str:
        if name in self.units:
            raise ValueError(f"unit {name!r} declared twice")
        self.units[name] = int(max_width)
        self.quanta[name] = int(quantum)
        return name

    def layout(self, tensor: str) -> tuple:
        return self._layouts[tensor]

    def width(self, tensor: str) -> Width:
        """The single unit (or fixed width) of a tensor's channels."""
        lay = self._layouts[tensor]
        if len(lay) != 1:
            raise ValueError(f"{tensor!r} is a concatenation of {len(lay)} parts")
        return lay[0]

    def add_node(self, node: Node) -> str:
        if node.name in self._layouts:
            raise ValueError(f"node name {node.name!r} used twice")
        for t in node.inputs:
            if t not in self._layouts:
                raise ValueError(f"{node.name}: reads {t!r}, which no earlier node produces")
        for r in node.refs():
            if r not in self.units:
                raise ValueError(f"{node.name}: unit {r!r} is not declared")
        layouts = [self._layouts[t] for t in node.inputs]
        node.op.check_inputs(node.name, layouts)
        for a, b in node.op.unit_ties(node, layouts):
            if not same_channels(a, b):
                raise ValueError(f"{node.name}: cannot combine channels of units {tuple(a)} and {tuple(b)} "
                                 "element-wise; give both the same unit")
        self.nodes.append(node)
        self._layouts[node.name] = tuple(node.op.out_layout(node, layouts))
        return node.name

    def _check_cin(self, name: str, x: str, cin: Width | None) -> None:
        if cin is not None and self._layouts[x] != (cin,):
            raise ValueError(f"{name}: input {x!r} has channels {self._layouts[x]}, node expects {cin!r}")

    def node(self, name: str, op: Op, *inputs: str, out: Width | None = None, mid: Width | None = None) -> str:
        """Add a node of any operator reading ``inputs``; ``out`` / ``mid``: its output / inner width,
        for an op that sets one. The methods below are shorthands for the zoo's model files."""
        return self.add_node(Node(name, op, tuple(inputs), out, mid))

    # -- shorthands for the built-in operators --------------------------------------------------------
    def conv(self, name: str, x: str, cin: Width | None, cout: Width | None, kernel: int, stride: int = 1, *,
             depthwise: bool = False, group_width: int | None = None, act: str | None = "relu",
             residual: str | None = None, bn: bool = True, bias: bool = False, padding: int | None = None) -> str:
        """``act(bn(conv(x)) [+ residual])``. ``depthwise``/``group_width``: output tied to the input."""
        self._check_cin(name, x, cin)
        if depthwise:
            group_width = 1
        pad = (kernel - 1) // 2 if padding is None else padding
        op = Conv(kernel, stride, pad, group_width, act, bn, bias, self.bn_eps)
        inputs = (x,) if residual is None else (x, residual)
        return self.node(name, op, *inputs, out=None if group_width is not None else cout)

    def se(self, name: str, x: str, mid: Width, act: str = "relu", gate: str = "sigmoid") -> str:
        return self.node(name, SqueezeExcite(act, gate), x, mid=mid)

    def add(self, name: str, *xs: str, act: str | None = None) -> str:
        return self.node(name, Add(act), *xs)

    def concat(self, name: str, *xs: str) -> str:
        return self.node(name, Concat(), *xs)

    def act(self, name: str, x: str, act: str) -> str:
        return self.node(name, Act(act), x)

    def bn(self, name: str, x: str, act: str | None = None) -> str:
        return self.node(name, BatchNorm(act, self.bn_eps), x)

    def shuffle(self, name: str, x: str, groups: int) -> str:
        """ShuffleNet's channel shuffle of ``groups`` groups (``x``'s channels must be fixed)."""
        return self.node(name, ChannelShuffle(groups), x)

    def channel_slice(self, name: str, x: str, start: int, stop: int) -> str:
        """``x[:, start:stop]`` (``x``'s channels must be fixed)."""
        return self.node(name, ChannelSlice(start, stop), x)

    def maxpool(self, name: str, x: str, c: Width | None, kernel: int, stride: int, padding: int = 0) -> str:
        self._check_cin(name, x, c)
        return self.node(name, MaxPool(kernel, stride, padding), x)

    def avgpool(self, name: str, x: str, kernel: int, stride: int, padding: int = 0) -> str:
        return self.node(name, AvgPool(kernel, stride, padding), x)

    def gap(self, name: str, x: str, c: Width | None = None, flatten: bool = True) -> str:
        self._check_cin(name, x, c)
        return self.node(name, GlobalAvgPool(flatten), x)

    def flatten(self, name: str, x: str) -> str:
        return self.node(name, Flatten(), x)

    def dropout(self, name: str, x: str, p: float) -> str:
        return self.node(name, Dropout(p), x)

    def linear(self, name: str, x: str, cin: Width | None, cout: Width, dropout: float = 0.0,
               act: str | None = None) -> str:
        self._check_cin(name, x, cin)
        return self.node(name, Linear(act, dropout), x, out=cout)

    def graph(self, name: str, *, input_size: int, num_classes: int, width_mult: float = 1.0,
              divisor: int = DEFAULT_DIVISOR, in_channels: int | None = None) -> Graph:
        units = {u: UnitDef(w, self.quanta.get(u, 1)) for u, w in self.units.items()}
        c = self._layouts[INPUT][0] if in_channels is None else in_channels
        return Graph(name, list(self.nodes), units, int(input_size), int(num_classes), int(c), float(width_mult),
                     int(divisor))


class SlimmableNet(nn.Module):
    """A slimmable supernet: a graph of nodes over slimmable layers, plus its units."""

    def __init__(self, name: str | Graph, builder: GraphBuilder | None = None, *, width_mult: float = 1.0,
                 input_size: int = 224, num_classes: int = 1000, divisor: int = DEFAULT_DIVISOR,
                 in_channels: int = 3) -> None:
        super().__init__()
        if isinstance(name, Graph):
            graph = name
        else:
            graph = builder.graph(name, input_size=input_size, num_classes=num_classes, width_mult=width_mult,
                                  divisor=divisor, in_channels=in_channels)
        if graph.divisor not in DIVISORS:
            raise ValueError(f"divisor must be one of {DIVISORS}, got {graph.divisor}")
        self.graph = graph
        self.name = graph.name
        self.width_mult = float(graph.width_mult)
        self.input_size = int(graph.input_size)
        self.num_classes = int(graph.num_classes)
        self.divisor = int(graph.divisor)
        self.in_channels = int(graph.in_channels)
        self.nodes: tuple[Node, ...] = tuple(graph.nodes)
        self.units: dict[str, ChannelUnit] = {
            u: ChannelUnit.build(u, d.max_width, graph.divisor, d.quantum) for u, d in graph.units.items()
        }
        self._infos = tensor_infos(self.nodes, self.input_size, self.in_channels)
        self._max = {u: unit.max_width for u, unit in self.units.items()}
        modules = {}
        for n in self.nodes:
            lay = self._infos[n.inputs[0]].layout
            cin = sum(resolve(r, self._max) for r in lay) * self._infos[n.inputs[0]].per_channel
            cout = resolve(n.out, self._max) if n.out is not None else cin
            mid = resolve(n.mid, self._max) if n.mid is not None else 0
            m = n.op.build(n, cin, cout, mid)
            if m is not None:
                modules[n.name] = m
        self.layers = nn.ModuleDict(modules)
        self.outputs = tuple(graph.outputs)  # several outputs: (key, tensor) pairs; () : the last node's
        self._free_after = last_uses(self.nodes, self.outputs)
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._widths: dict[str, int] = dict(self._max)
        self._init_weights()

    @classmethod
    def from_graph(cls, graph: Graph | Mapping) -> "SlimmableNet":
        return cls(graph if isinstance(graph, Graph) else graph_from_dict(graph))

    def graph_dict(self) -> dict:
        """The graph as versioned JSON-ready data (with each unit's grid)."""
        return graph_to_dict(self.graph, {u: unit.grid for u, unit in self.units.items()})

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- configs ------------------------------------------------------------------------
    def config_of(self, widths: Mapping[str, int], **meta) -> ChannelConfig:
        return ChannelConfig(self.name, self.width_mult, self.input_size, widths, meta)

    def full_config(self) -> ChannelConfig:
        return self.config_of(self._max)

    def min_config(self) -> ChannelConfig:
        return self.config_of({u: unit.grid[0] for u, unit in self.units.items()})

    def uniform_config(self, step: int) -> ChannelConfig:
        """Every unit at grid step ``step`` of ``GRID_STEPS`` (12 = full width)."""
        return self.config_of({u: unit.step(step) for u, unit in self.units.items()})

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
        infos = self._infos if size == self.input_size else None
        return layer_specs(self.nodes, widths, size, batch, self.in_channels, self._max, infos)

    def tensor_layout(self, tensor: str) -> tuple:
        """The units (or fixed widths) a tensor's channels come from."""
        return self._infos[tensor].layout

    def per_channel(self, tensor: str) -> int:
        """Features per channel of a tensor (H*W for a flattened map, else 1)."""
        return self._infos[tensor].per_channel

    def node_units(self, node: Node) -> list[str]:
        """Units that set any width of ``node``: its inputs' channels, its output, its inner width."""
        refs = [r for t in (*node.inputs, node.name) for r in self._infos[t].layout] + [node.mid]
        return list(dict.fromkeys(r for r in refs if isinstance(r, str)))

    def unit_nodes(self) -> dict[str, list[int]]:
        """For each unit, the indices of the nodes whose input or output width it sets."""
        out: dict[str, list[int]] = {u: [] for u in self.units}
        for i, n in enumerate(self.nodes):
            for ref in self.node_units(n):
                out[ref].append(i)
        return out

    # -- execution ------------------------------------------------------------------------
    def _index(self, tensor: str) -> torch.Tensor | None:
        """Kept channels of a concatenated tensor as positions in its full layout (None: a prefix)."""
        lay = self._infos[tensor].layout
        if len(lay) <= 1:
            return None
        key = (tensor, tuple(resolve(r, self._widths) for r in lay))
        idx = self._index_cache.get(key)
        if idx is None:
            parts, off, k = [], 0, self._infos[tensor].per_channel
            for r, w in zip(lay, key[1]):
                parts.append(torch.arange(off * k, (off + w) * k))
                off += resolve(r, self._max)
            idx = torch.cat(parts)
            if len(self._index_cache) > 4096:
                self._index_cache.clear()
            self._index_cache[key] = idx
        return idx

    def _layer(self, node: Node, xs: list[torch.Tensor], inplace: bool) -> torch.Tensor:
        idx = self._index(node.inputs[0])
        if idx is not None:
            idx = idx.to(xs[0].device)
        lay = self._infos[node.inputs[0]].layout
        ctx = Slice(out=None if node.out is None else resolve(node.out, self._widths),
                    mid=None if node.mid is None else resolve(node.mid, self._widths),
                    index=idx, parts=tuple(resolve(r, self._widths) for r in lay) if len(lay) > 1 else None,
                    inplace=inplace, training=self.training)
        return node.op.run(self.layers[node.name] if node.name in self.layers else None, xs, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple | dict:
        return run_graph(self.nodes, self._layer, x, free_after=self._free_after, outputs=self.outputs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, width_mult={self.width_mult:g}, units={len(self.units)}"


__all__ = ["GraphBuilder", "SlimmableNet"]
