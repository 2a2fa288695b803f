"""The op graph every hwslim network is described by, and its concrete layer specs.

A supernet is a list of :class:`Node` in execution order. A node holds an operator
(:mod:`hwslim.core.ops`: what it computes, with its static attributes), the names of the
tensors it reads, and the units that set its widths: ``out`` for operators that choose
their output width (a dense conv, a linear layer), ``mid`` for an inner width (SE's
reduce width). Widths are *references*: a unit name (slimmable) or a fixed int (the 3
image channels, the class count).

A tensor's channels have a *layout*: the tuple of references its channels come from,
in order. Most tensors have one; a concatenation's output has its parts' (DenseNet),
so a layer reading it keeps the kept channels of each part.

Given a config's unit widths and an input size, :func:`layer_specs` turns the nodes
into concrete :class:`LayerSpec` records. Everything else reads those records through
the operator: costs (:mod:`hwslim.core.costs`), latency-table keys
(:meth:`LayerSpec.signature`), materialization, ONNX graphs, execution
(:func:`run_graph` runs the same list for the supernet and the plain net).

:func:`graph_to_dict` / :func:`graph_from_dict` serialize a graph (nodes, units with
their grids, input shape, class count) to versioned JSON: a model is data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from hwslim.core.ops import Op, op_from_dict

Width = Union[str, int]  # a unit name, or a fixed channel count
Key = Union[str, int]  # an output's key: a dict's key, or a position in a tuple
Layout = tuple  # of Width
INPUT = "input"  # the name of the network's input tensor
GRAPH_FORMAT = "hwslim-graph"
GRAPH_VERSION = 1


@dataclass(frozen=True)
class Node:
    """One step of a supernet's graph."""

    name: str
    op: Op
    inputs: tuple[str, ...]
    out: Width | None = None  # the output width, for operators that set it
    mid: Width | None = None  # an inner width (SE's reduce width)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.op.sets_width and self.out is None:
            raise ValueError(f"{self.name}: a {self.op.kind} node needs an output width")
        if self.op.has_mid and self.mid is None:
            raise ValueError(f"{self.name}: a {self.op.kind} node needs a 'mid' width")

    @property
    def input(self) -> str:
        return self.inputs[0]

    def refs(self) -> list[str]:
        """The unit names this node's own widths name (not its inputs')."""
        return [r for r in (self.out, self.mid) if isinstance(r, str)]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "op": self.op.to_dict(), "inputs": list(self.inputs)}
        if self.out is not None:
            d["out"] = self.out
        if self.mid is not None:
            d["mid"] = self.mid
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Node":
        return cls(d["name"], op_from_dict(d["op"]), tuple(d["inputs"]), d.get("out"), d.get("mid"))


@dataclass(frozen=True)
class LayerSpec:
    """A node with concrete shapes: what one layer of one config computes.

    ``cin`` is the first input's channel count, ``in_channels`` every input's;
    ``in_parts`` the first input's kept channels as (offset, width) runs in its
    full-width layout (one run unless it reads a concatenation); ``in_flat`` whether
    the first input is (N, C) features.
    """

    name: str
    op: Op
    inputs: tuple[str, ...]
    cin: int
    cout: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    batch: int = 1
    mid: int = 0
    groups: int = 1
    in_channels: tuple[int, ...] = ()
    in_parts: tuple[tuple[int, int], ...] = ()
    in_flat: bool = False
    in_sizes: tuple[tuple[int, int], ...] = ()  # (h, w) of every input
    in_per_channel: int = 1  # features per channel of a flattened first input (H*W of the map it was)

    def __getattr__(self, name: str) -> Any:  # the operator's static attributes: spec.kernel, spec.act
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.op, name)

    @property
    def input(self) -> str:
        return self.inputs[0]

    @property
    def residual(self) -> str | None:
        """The tensor a conv adds before its activation (None: none)."""
        return self.inputs[1] if len(self.inputs) > 1 and self.op.fuses_residual else None

    @property
    def depthwise(self) -> bool:
        return bool(getattr(self.op, "depthwise", False)) and self.cin > 1

    @property
    def out_elements(self) -> int:
        per = self.cout if self.op.flattens else self.cout * self.out_h * self.out_w
        return self.batch * per

    def signature(self) -> tuple | None:
        """The latency-table key: identical signatures are measured once (None: not timed)."""
        return self.op.signature(self)


SIGNATURE_FIELDS = ("op", "kernel", "stride", "padding", "groups", "in_h", "in_w",
                    "cin", "cout", "act", "residual", "batch", "extra")


def resolve(width: Width, widths: Mapping[str, int]) -> int:
    return width if isinstance(width, int) else widths[width]


@dataclass
class TensorInfo:
    layout: Layout
    h: int
    w: int
    flat: bool = False
    per_channel: int = 1  # features per channel once flattened (channel-major)


def tensor_infos(nodes: Sequence[Node], input_size: int | tuple[int, int], in_channels: int = 3
                 ) -> dict[str, TensorInfo]:
    """Layout and full spatial size of every tensor (checks the graph's structure)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    infos = {INPUT: TensorInfo((in_channels,), h, w)}
    for n in nodes:
        missing = [t for t in n.inputs if t not in infos]
        if missing:
            raise ValueError(f"{n.name}: reads {missing[0]!r}, which no earlier node produces")
        ins = [infos[t] for t in n.inputs]
        layouts = [t.layout for t in ins]
        n.op.check_inputs(n.name, layouts)
        for a, b in n.op.unit_ties(n, layouts):
            if tuple(a) != tuple(b):
                raise ValueError(f"{n.name}: inputs with different channel units {tuple(a)} and {tuple(b)} "
                                 f"cannot be combined element-wise")
        if n.name in infos:
            raise ValueError(f"node name {n.name!r} used twice")
        oh, ow = n.op.out_hw([(t.h, t.w) for t in ins])
        flat = n.op.flattens or (ins[0].flat and n.op.view)
        per_channel = 1
        if n.op.view:  # a flatten keeps every position of a channel (channel-major); dropout passes it on
            per_channel = ins[0].per_channel * (ins[0].h * ins[0].w if n.op.flattens and not ins[0].flat else 1)
        infos[n.name] = TensorInfo(tuple(n.op.out_layout(n, layouts)), oh, ow, flat, per_channel)
    return infos


def layer_specs(nodes: Sequence[Node], widths: Mapping[str, int], input_size: int | tuple[int, int],
                batch: int = 1, in_channels: int = 3, max_widths: Mapping[str, int] | None = None,
                infos: Mapping[str, TensorInfo] | None = None) -> list[LayerSpec]:
    """Concrete specs of ``nodes`` at the given unit widths, input size and batch."""
    infos = tensor_infos(nodes, input_size, in_channels) if infos is None else infos
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    hw: dict[str, tuple[int, int]] = {INPUT: (h, w)}
    maxw = max_widths if max_widths is not None else widths
    specs = []
    for n in nodes:
        lay0 = infos[n.inputs[0]].layout
        cins = tuple(sum(resolve(r, widths) for r in infos[t].layout) * infos[t].per_channel for t in n.inputs)
        parts, off = [], 0
        for r in lay0:
            parts.append((off, resolve(r, widths)))
            off += resolve(r, maxw)
        (ih, iw) = hw[n.inputs[0]]
        oh, ow = n.op.out_hw([hw[t] for t in n.inputs])
        cout = sum(resolve(r, widths) for r in infos[n.name].layout) * infos[n.name].per_channel
        mid = resolve(n.mid, widths) if n.mid is not None else 0
        spec = LayerSpec(n.name, n.op, n.inputs, cins[0], cout, ih, iw, oh, ow, batch, mid, n.op.groups(cins[0]),
                         cins, tuple(parts), infos[n.inputs[0]].flat, tuple(hw[t] for t in n.inputs),
                         infos[n.inputs[0]].per_channel)
        hw[n.name] = (oh, ow)
        specs.append(spec)
    return specs


def last_uses(nodes: Sequence[Node | LayerSpec], outputs: Sequence[tuple[Key, str]] = ()) -> dict[str, int]:
    """Index of the last node reading each tensor (the output: its producer's index; the outputs of a
    network with several: past the last node, so none is freed or overwritten)."""
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.inputs:
            last[t] = i
    last.setdefault(nodes[-1].name, len(nodes) - 1)
    for _, t in outputs:
        last[t] = len(nodes)
    return last


def collect_outputs(env: Mapping[str, Any], outputs: Sequence[tuple[Key, str]]) -> tuple | dict:
    """A network's several outputs, as its module returned them: a dict (str keys) or a tuple."""
    if all(isinstance(k, str) for k, _ in outputs):
        return {k: env[t] for k, t in outputs}
    return tuple(env[t] for _, t in outputs)


def flatten_outputs(out: torch.Tensor | tuple | list | Mapping[Any, torch.Tensor]) -> list[torch.Tensor]:
    """A network's outputs as a list, in the order :attr:`Graph.outputs` names them: ``[out]`` for one
    tensor, the values of a tuple, list or dict (:func:`collect_outputs` builds them in that order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values()) if isinstance(out, Mapping) else list(out)


def can_overwrite(env: Mapping[str, torch.Tensor], name: str, i: int, free_after: Mapping[str, int],
                  inputs: Sequence[str], borrowed: frozenset[str] | set[str] = frozenset(),
                  held: frozenset[int] | set[int] = frozenset()) -> bool:
    """Whether node ``i`` may write into tensor ``name``: it dies here, is not the caller's
    (the input, or any tensor of an environment handed in to resume from: the search
    reuses one prefix for many candidates) nor a view of one (``held``: their storages),
    is read once by this node and shares no storage with a tensor still alive."""
    if torch.is_grad_enabled() or name == INPUT or name in borrowed or free_after.get(name) != i \
            or inputs.count(name) != 1:
        return False
    # a view may start at an offset of the tensor it views (a channel slice): compare storages
    ptr = _storage(env[name])
    return ptr is not None and ptr not in held and not any(k != name and _storage(t) == ptr for k, t in env.items())


def _storage(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (None where there is none to see: fake tensors while tracing)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


LayerFn = Callable[[Any, list, bool], torch.Tensor]


def run_graph(nodes: Sequence[Node | LayerSpec], layer: LayerFn, x: torch.Tensor | None, start: int = 0,
              env: dict[str, torch.Tensor] | None = None, stop: int | None = None,
              free_after: Mapping[str, int] | None = None, outputs: Sequence[tuple[Key, str]] = ()
              ) -> torch.Tensor | tuple | dict:
    """Execute ``nodes[start:stop]``; ``layer(node, inputs, inplace)`` computes one node.

    ``inplace`` says the node may write into its first input (see :func:`can_overwrite`).
    Tensors are dropped after their last reader, so memory follows the liveness model
    of :func:`hwslim.core.costs.peak_activation_bytes`. With ``stop`` set, returns the
    environment (live tensors) so a later call can resume from there; this is how the
    search computes a shared prefix once for many candidates. ``outputs``: a network with several
    outputs (:attr:`Graph.outputs`) returns them all (:func:`collect_outputs`), else the last node's.
    """
    env = {INPUT: x} if env is None else dict(env)
    borrowed = frozenset(env)
    held = frozenset(_storage(t) for t in env.values())
    free_after = last_uses(nodes) if free_after is None else free_after
    stop = len(nodes) if stop is None else stop
    for i in range(start, stop):
        n = nodes[i]
        inplace = n.op.inplace and can_overwrite(env, n.inputs[0], i, free_after, n.inputs, borrowed, held)
        y = layer(n, [env[t] for t in n.inputs], inplace)
        env[n.name] = y
        del y
        for t in set(n.inputs):
            if free_after.get(t) == i:
                env.pop(t, None)
    if stop < len(nodes):
        return env
    return collect_outputs(env, outputs) if outputs else env[nodes[-1].name]


# -- serialization --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitDef:
    """A unit as a graph declares it: its full width and the quantum its widths move in."""

    max_width: int
    quantum: int = 1  # a grouped conv's group width: widths stay multiples of it


@dataclass
class Graph:
    """A supernet as data: what :class:`hwslim.core.supernet.SlimmableNet` is built from."""

    name: str
    nodes: list[Node]
    units: dict[str, UnitDef]
    input_size: int
    num_classes: int
    in_channels: int = 3
    width_mult: float = 1.0
    divisor: int = 8
    meta: dict[str, Any] = field(default_factory=dict)
    # several outputs (a detector's levels, a segmenter's dict): (key, tensor) pairs; () : the last node's
    outputs: tuple[tuple[Key, str], ...] = ()


def graph_to_dict(g: Graph, grids: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    units = {}
    for u, d in g.units.items():
        units[u] = {"max_width": d.max_width, "quantum": d.quantum}
        if grids is not None:
            units[u]["grid"] = list(grids[u])
    return {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "name": g.name, "width_mult": g.width_mult,
            "input_size": g.input_size, "in_channels": g.in_channels, "num_classes": g.num_classes,
            "divisor": g.divisor, "units": units, "nodes": [n.to_dict() for n in g.nodes], "meta": dict(g.meta),
            **({"outputs": [[k, t] for k, t in g.outputs]} if g.outputs else {})}


class GraphFormatError(ValueError):
    """A serialized graph this hwslim cannot read."""


def graph_from_dict(d: Mapping[str, Any]) -> Graph:
    if not isinstance(d, Mapping) or d.get("format") != GRAPH_FORMAT:
        raise GraphFormatError("not an hwslim graph (no 'hwslim-graph' format marker)")
    if d.get("version") != GRAPH_VERSION:
        raise GraphFormatError(f"graph version {d.get('version')!r} is not supported (this hwslim reads "
                               f"{GRAPH_VERSION})")
    try:
        units = {u: UnitDef(int(v["max_width"]), int(v.get("quantum", 1))) for u, v in d["units"].items()}
        nodes = [Node.from_dict(n) for n in d["nodes"]]
        outputs = tuple((k if isinstance(k, str) else int(k), str(t)) for k, t in d.get("outputs") or ())
        return Graph(str(d["name"]), nodes, units, int(d["input_size"]), int(d["num_classes"]),
                     int(d.get("in_channels", 3)), float(d.get("width_mult", 1.0)), int(d.get("divisor", 8)),
                     dict(d.get("meta") or {}), outputs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GraphFormatError(f"malformed graph ({type(e).__name__}: {e})") from None


def layer_spec(name: str, op: Op, in_channels: int | Sequence[int], size: int | tuple[int, int], *,
               out: int | None = None, mid: int | None = None, batch: int = 1, flat: bool = False,
               inputs: Sequence[str] | None = None) -> LayerSpec:
    """The spec of one layer on its own (``in_channels``: one count per input), e.g. for a profiler's probe::

        >>> from hwslim.core.ops import Conv
        >>> layer_spec("c", Conv(3, 1, 1, act="relu"), 16, 8, out=32).signature()[:9]
        ('conv', 3, 1, 1, 1, 8, 8, 16, 32)
    """
    cins = (in_channels,) if isinstance(in_channels, int) else tuple(in_channels)
    h, w = (size, size) if isinstance(size, int) else size
    names = tuple(inputs) if inputs is not None else ("x",) + tuple(f"in{k}" for k in range(1, len(cins)))
    node = Node(name, op, names, out, mid)
    op.check_inputs(name, [(c,) for c in cins])
    oh, ow = op.out_hw([(h, w)])
    sizes = ((h, w),) + ((oh, ow) if op.fuses_residual else (h, w),) * (len(cins) - 1)
    cout = sum(op.out_layout(node, [(c,) for c in cins]))
    return LayerSpec(name, op, names, cins[0], cout, h, w, oh, ow, batch, mid or 0, op.groups(cins[0]), cins,
                     ((0, cins[0]),), flat, sizes)
