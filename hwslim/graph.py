"""The op graph every hwslim network is described by.

A supernet is a list of :class:`Node` in execution order. A node's channel counts are
*references*: a unit name (slimmable) or a fixed int (the 3 image channels, the class
count). Given a config's unit widths and an input size, :func:`layer_specs` turns the
nodes into concrete :class:`LayerSpec` records. Everything else reads those records:

* cost models (:mod:`hwslim.costs`): MACs, params, peak activation memory;
* latency tables: :meth:`LayerSpec.signature` is the table key;
* materialization (:mod:`hwslim.materialize`): one plain layer per spec;
* execution: :func:`run_graph` runs the same list for the supernet and the plain net.

A ``conv`` node is the unit a runtime executes: conv, BatchNorm, then the optional
residual add, then the activation: ``act(bn(conv(x)) + skip)``. Runtimes fuse exactly
this (ONNX Runtime's NCHWc conv with Sum, TensorRT), so it is timed as one entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

Width = Union[str, int]  # a unit name, or a fixed channel count
INPUT = "input"  # the name of the network's input tensor
OPS = ("conv", "maxpool", "gap", "linear")
ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor] | None] = {
    None: None,
    "relu": F.relu,
    "relu6": F.relu6,
}
_INPLACE_ACTIVATIONS = {"relu": F.relu_, "relu6": lambda t: t.clamp_(0.0, 6.0)}


@dataclass(frozen=True)
class Node:
    """One step of a supernet's graph; ``cin``/``cout`` are unit names or fixed ints."""

    name: str
    op: str
    input: str
    cin: Width
    cout: Width
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1  # fixed group count; depthwise is flagged separately
    depthwise: bool = False
    act: str | None = None
    residual: str | None = None  # tensor added before the activation
    dropout: float = 0.0  # linear only, training only

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r}")


@dataclass(frozen=True)
class LayerSpec:
    """A node with concrete shapes: what one layer of one config computes."""

    name: str
    op: str
    input: str
    cin: int
    cout: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    act: str | None = None
    residual: str | None = None
    bn: bool = False
    bias: bool = False
    dropout: float = 0.0
    batch: int = 1

    @property
    def depthwise(self) -> bool:
        return self.op == "conv" and self.groups == self.cin and self.cin == self.cout and self.cin > 1

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if self.residual is None else (self.input, self.residual)

    @property
    def out_elements(self) -> int:
        return self.batch * self.cout * self.out_h * self.out_w

    def signature(self) -> tuple:
        """The latency-table key: identical signatures are measured once."""
        return (self.op, self.kernel, self.stride, self.padding, self.groups, self.in_h, self.in_w,
                self.cin, self.cout, self.act or "none", self.residual is not None, self.batch)


SIGNATURE_FIELDS = ("op", "kernel", "stride", "padding", "groups", "in_h", "in_w",
                    "cin", "cout", "act", "residual", "batch")


def resolve(width: Width, widths: Mapping[str, int]) -> int:
    return width if isinstance(width, int) else widths[width]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def layer_specs(nodes: Sequence[Node], widths: Mapping[str, int], input_size: int | tuple[int, int],
                batch: int = 1, in_channels: int = 3) -> list[LayerSpec]:
    """Concrete specs of ``nodes`` at the given unit widths, input size and batch."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    shapes: dict[str, tuple[int, int, int]] = {INPUT: (in_channels, h, w)}
    specs = []
    for n in nodes:
        c, ih, iw = shapes[n.input]
        cin = resolve(n.cin, widths)
        if cin != c:
            raise ValueError(f"{n.name}: input {n.input!r} has {c} channels, node expects {cin}")
        if n.op == "conv":
            cout = cin if n.depthwise else resolve(n.cout, widths)
            groups = cin if n.depthwise else n.groups
            oh, ow = _conv_out(ih, n.kernel, n.stride, n.padding), _conv_out(iw, n.kernel, n.stride, n.padding)
            spec = LayerSpec(n.name, "conv", n.input, cin, cout, ih, iw, oh, ow, n.kernel, n.stride, n.padding,
                             groups, n.act, n.residual, bn=True, batch=batch)
        elif n.op == "maxpool":
            oh, ow = _conv_out(ih, n.kernel, n.stride, n.padding), _conv_out(iw, n.kernel, n.stride, n.padding)
            spec = LayerSpec(n.name, "maxpool", n.input, cin, cin, ih, iw, oh, ow, n.kernel, n.stride, n.padding,
                             cin, batch=batch)
        elif n.op == "gap":
            spec = LayerSpec(n.name, "gap", n.input, cin, cin, ih, iw, 1, 1, ih, 1, 0, cin, batch=batch)
        else:  # linear
            spec = LayerSpec(n.name, "linear", n.input, cin, resolve(n.cout, widths), 1, 1, 1, 1,
                             bias=True, dropout=n.dropout, batch=batch)
        if spec.residual is not None:
            skip = shapes[spec.residual]
            if skip != (spec.cout, spec.out_h, spec.out_w):
                raise ValueError(f"{n.name}: residual {spec.residual!r} has shape {skip}, "
                                 f"output has {(spec.cout, spec.out_h, spec.out_w)}")
        shapes[n.name] = (spec.cout, spec.out_h, spec.out_w)
        specs.append(spec)
    return specs


def last_uses(nodes: Sequence[Node | LayerSpec]) -> dict[str, int]:
    """Index of the last node reading each tensor (the output: its producer's index)."""
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        last[n.input] = i
        if n.residual is not None:
            last[n.residual] = i
    last.setdefault(nodes[-1].name, len(nodes) - 1)
    return last


def run_graph(nodes: Sequence[Node | LayerSpec], layer: Callable[[Node | LayerSpec, torch.Tensor], torch.Tensor],
              x: torch.Tensor, start: int = 0, env: dict[str, torch.Tensor] | None = None,
              stop: int | None = None, free_after: Mapping[str, int] | None = None) -> torch.Tensor | dict:
    """Execute ``nodes[start:stop]``; ``layer(node, x)`` computes a conv/linear node's layer.

    Tensors are dropped after their last reader, so memory follows the liveness model
    of :func:`hwslim.costs.peak_activation_bytes`. With ``stop`` set, returns the
    environment (live tensors) so a later call can resume from there; this is how the
    search computes a shared prefix once for many candidates.
    """
    env = {INPUT: x} if env is None else dict(env)
    free_after = last_uses(nodes) if free_after is None else free_after
    stop = len(nodes) if stop is None else stop
    inplace = not torch.is_grad_enabled()
    for i in range(start, stop):
        n = nodes[i]
        inp = env[n.input]
        if n.op == "conv":
            y = layer(n, inp)
            if n.residual is not None:
                y = y.add_(env[n.residual]) if inplace else y + env[n.residual]
            if n.act is not None:
                y = _INPLACE_ACTIVATIONS[n.act](y) if inplace else ACTIVATIONS[n.act](y)
        elif n.op == "maxpool":
            y = F.max_pool2d(inp, n.kernel, n.stride, n.padding)
        elif n.op == "gap":
            y = torch.flatten(F.adaptive_avg_pool2d(inp, 1), 1)
        else:
            y = layer(n, inp)
        env[n.name] = y
        del inp, y
        for name in (n.input, n.residual):
            if name is not None and free_after.get(name) == i:
                env.pop(name, None)
    if stop < len(nodes):
        return env
    return env[nodes[-1].name]
