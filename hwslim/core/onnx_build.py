"""ONNX graphs of layer specs, built from the operators' own :meth:`~hwslim.core.ops.Op.onnx`.

The profilers time layers inside whole *designed* networks (and, for backends that
time layers alone, inside one-layer entry models). Both are built here from
:class:`~hwslim.core.graph.LayerSpec` lists with random weights. Every node's name starts
with its layer's name (``"b1/expand::conv"``) and every layer's output tensor is named
after the layer, so a runtime's per-kernel report can be traced back to layers.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

OPSET = 17
_POOL: list[np.ndarray] = [np.empty(0, np.float32)]


def random_array(shape, scale: float = 1.0) -> np.ndarray:
    """Random normal values, sliced from one cached pool (timing does not depend on values,
    and drawing 10M fresh numbers per network cost more than running it)."""
    n = int(np.prod(shape))
    if _POOL[0].size < n:
        _POOL[0] = np.random.default_rng(0).standard_normal(max(n, 2 * _POOL[0].size), dtype=np.float32)
    return _POOL[0][:n].reshape(shape) * np.float32(scale)


class OnnxGraph:
    """Collects nodes and initializers while operators describe themselves."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def weight(self, name: str, shape: Sequence[int], scale: float) -> str:
        from onnx import numpy_helper

        arr = random_array(tuple(shape), scale) if scale else np.zeros(tuple(shape), np.float32)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def const(self, name: str, value: float) -> str:
        return self._constant(name, np.array(value, dtype=np.float32))

    def floats(self, name: str, values: Sequence[float]) -> str:
        """A float32 initializer (resize scales, fixed parameters), added once per name."""
        return self._constant(name, np.array(list(values), dtype=np.float32))

    def ints(self, name: str, values: Sequence[int]) -> str:
        """An int64 initializer (shapes, slice bounds), added once per name."""
        return self._constant(name, np.array(list(values), dtype=np.int64))

    def _constant(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))

    @staticmethod
    def tmp(layer: str, suffix: str, *, last: bool, out: str) -> str:
        """The name of an intermediate tensor, or the layer's output when it is the last one."""
        return out if last else f"{layer}::{suffix}"


def _shape(s, out: bool = True) -> list[int]:
    if out:
        return [s.batch, s.cout] if s.op.flattens else [s.batch, s.cout, s.out_h, s.out_w]
    return [s.batch, s.cin] if s.in_flat else [s.batch, s.cin, s.in_h, s.in_w]


def network_model(specs: Sequence, input_name: str | None = None):
    """The ONNX model of a whole network given as layer specs (random weights)."""
    from onnx import TensorProto, helper

    g = OnnxGraph()
    first, last = specs[0], specs[-1]
    x = helper.make_tensor_value_info(input_name or first.inputs[0], TensorProto.FLOAT, _shape(first, out=False))
    for s in specs:
        s.op.onnx(s, g, list(s.inputs), s.name)
    y = helper.make_tensor_value_info(last.name, TensorProto.FLOAT, _shape(last))
    graph = helper.make_graph(g.nodes, "network", [x], [y], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def entry_model(spec, feed_marker: str | None = None):
    """A one-layer ONNX model of ``spec``: its inputs are graph inputs, its output ``y``.

    With ``feed_marker``, every input but the first passes through a 1x1 MaxPool named
    by the marker: inside a network such an input (a residual, another concat part)
    comes from a layer in the runtime's own layout, which the stand-in imitates (the
    ONNX Runtime profiler removes it again).
    """
    from onnx import TensorProto, helper

    g = OnnxGraph()
    ins, names = [], []
    for k, c in enumerate(spec.in_channels):
        flat = k == 0 and spec.in_flat
        shape = [spec.batch, c] if flat else [spec.batch, c, *spec.in_sizes[k]]
        name = "x" if k == 0 else f"in{k}"
        ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        if k > 0 and feed_marker is not None:
            g.node("MaxPool", [name], [f"{feed_marker}{k}"], f"{feed_marker}{k}", kernel_shape=[1, 1])
            name = f"{feed_marker}{k}"
        names.append(name)
    spec.op.onnx(spec, g, names, "y")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, _shape(spec))
    graph = helper.make_graph(g.nodes, f"entry_{spec.op.kind}", ins, [y], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model

