"""Charge TensorRT's per-layer times to hwslim layer specs (pure Python; no TensorRT needed).

TensorRT does not run the ONNX graph node by node. It fuses nodes (``"/b1/dw/Conv +
/Clip_3"``), hands whole subgraphs to Myelin (``"{ForeignNode[/a/Conv.../b/Gemm]}"``),
leaves some pointwise nodes as their own kernels (``"PWN(PWN(/Add_8), /Relu_18)"``) and
inserts layers of its own: layout/precision conversions (``"Reformatting CopyNode for
Input Tensor 0 to <layer>"``, type ``Reformat`` or ``NoOp``) and reshapes around a
Gemm (``"reshape_before_/fc/Gemm"``). ``IProfiler.report_layer_time(name, ms)`` reports
times under those *engine* layer names. This module turns them into milliseconds per
:class:`~hwslim.core.graph.LayerSpec` in three steps:

1. **ONNX node -> spec** (:func:`onnx_node_owners`). :func:`hwslim.runtimes.onnx_file.export_onnx`
   names the nodes of module calls after the layer (``/l2b0/conv1/Conv``,
   ``/fc/Gemm``) but the functional ones anonymously (``/Relu_7``, ``/Add_3``,
   ``/Clip_12``, ``/GlobalAveragePool``, ``/Flatten``). So ownership is traced through
   the tensors: an activation or residual ``Add`` belongs to the conv whose output it
   consumes (for an ``Add``, the operand whose spec has the residual), a pool to the
   pool spec reading that layer's output, ``Flatten`` to the pool before it.
2. **Engine layer -> ONNX nodes** (:func:`parse_engine_information`,
   :func:`onnx_nodes_in_name`). With ``ProfilingVerbosity.DETAILED`` each layer of
   the inspector's JSON (``IEngineInspector.get_engine_information(
   LayerInformationFormat.JSON)``) carries ``"Metadata"``: one ``[ONNX Layer: <node>]``
   per fused ONNX node, joined by a control character (``\\x1f`` in TensorRT 10). Where
   it is missing (older engines, ``LAYER_NAMES_ONLY``) the node names are read from
   the layer name itself; a foreign node's ``[first...last]`` range is expanded in the
   ONNX graph's order.
3. **Time -> spec** (:func:`attribute`), rules in order:

   * a layer whose ONNX nodes belong to one spec: all of it to that spec;
   * a fused layer spanning specs that contains convs or Gemms: to the spec owning the
     conv (TensorRT may fuse a residual ``Add`` + ``Relu`` into the *shortcut* conv
     rather than the conv whose spec carries the residual; the kernel is the
     shortcut's, so its time is too);
   * a Myelin foreign node spanning several specs: split in proportion to a rough
     roofline weight per spec (``max(MACs, 10 * bytes moved)``), and reported in
     ``Attribution.split_layers`` so a caller can tell estimated shares from measured;
   * a layer with no ONNX node (reformat, NoOp, inserted shuffle): to its **consumer**,
     the first engine layer reading its output tensor (following chains of such
     layers), as the conversion exists because that consumer wants another layout;
     with no consumer (the network output) to the producer of its input;
   * whatever is still unowned is ``unattributed_ms`` (never silently dropped): the
     per-spec times plus ``unattributed_ms`` always sum to the profiled total.

The recorded examples in ``tests/data/trt/`` show both input formats.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from hwslim.core.graph import INPUT, LayerSpec

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]|]*?)\s*(?:\|[^\]]*)?\]")
_FOREIGN = re.compile(r"\{ForeignNode\[(.*)\]\}")
_REFORMAT_NAME = re.compile(r"^Reformatting CopyNode for (Input|Output) Tensor \d+ to (.*)$")
_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# characters around an ONNX node name inside an engine layer name
_DELIMS = " +(),[]{}"


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, as the engine inspector describes it."""

    name: str
    layer_type: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    onnx_nodes: tuple[str, ...] = ()  # from "Metadata"; empty if the engine has none
    origin: str = ""

    @property
    def inserted(self) -> bool:
        """A layer TensorRT added (reformat, NoOp copy) rather than one from the ONNX graph."""
        return (self.layer_type in ("Reformat", "NoOp") or self.origin == "REFORMAT"
                or self.name.startswith("Reformatting CopyNode"))

    @property
    def foreign(self) -> bool:
        """A Myelin subgraph: one reported time for many ONNX nodes."""
        return self.layer_type == "Myelin" or self.name.startswith("{ForeignNode[")


@dataclass
class Attribution:
    """Milliseconds of one profiled run (or an average run) per layer spec."""

    per_spec: dict[str, float]
    owner_of_layer: dict[str, dict[str, float]]  # engine layer -> {spec: share}
    split_layers: list[str] = field(default_factory=list)
    unattributed: dict[str, float] = field(default_factory=dict)  # engine layer -> ms

    @property
    def unattributed_ms(self) -> float:
        return sum(self.unattributed.values())

    @property
    def total_ms(self) -> float:
        return sum(self.per_spec.values()) + self.unattributed_ms


# -- 1. ONNX nodes -> specs -----------------------------------------------------------------------
def _load(model):
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        import onnx

        return onnx.load(str(model), load_external_data=False)
    return model


def onnx_node_owners(model, specs: Sequence[LayerSpec]) -> dict[str, str]:
    """ONNX node name -> name of the spec it computes, for a graph written by ``export_onnx``.

    ``model`` is a ``ModelProto`` or a path. Nodes that compute nothing at run time
    (``Constant``, ``Identity``) and non-compute nodes reading no layer's output (an
    input Cast) are left out. Raises ``ValueError`` for a Conv/Gemm it cannot place
    (the graph was not exported from these specs).
    """
    graph = _load(model).graph
    by_name = {s.name: s for s in specs}
    # weightless layers (pools, concatenation, SE scaling...) by the tensor they read first
    free: dict[str, list[str]] = {}
    for s in specs:
        if s.op.params(s) == 0:
            free.setdefault(s.input, []).append(s.name)
    tensor_layer: dict[str, str] = {i.name: INPUT for i in graph.input}  # tensor -> spec (or INPUT)
    owners: dict[str, str] = {}
    for node in graph.node:
        op = node.op_type
        if op in ("Constant", "Identity"):
            continue
        owner = None
        if op in _COMPUTE_OPS:
            # "/l2b0/conv1/Conv" -> "l2b0/conv1"; a wrapper module adds leading parts ("/net/l2b0/conv1/Conv")
            parts = node.name.strip("/").split("/")[:-1]
            owner = next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in by_name), None)
        elif op == "Add":
            cands = [tensor_layer.get(t) for t in node.input[:2]]
            with_skip = [c for c in cands if c in by_name and by_name[c].residual is not None]
            owner = with_skip[0] if with_skip else cands[0]
        elif op in ("MaxPool", "GlobalAveragePool", "AveragePool", "Concat"):
            readers = free.get(tensor_layer.get(node.input[0], ""), [])
            owner = readers[0] if len(readers) == 1 else None
        else:  # Relu, Clip, Flatten, Reshape, Cast...: the layer whose output it reads
            owner = tensor_layer.get(node.input[0]) if node.input else None
        if owner in (None, INPUT) and op not in _COMPUTE_OPS:
            # e.g. the Cast of the image in an fp16 graph, or shape arithmetic on constants:
            # no layer of its own; an engine layer made of it goes to its consumer
            continue
        if owner is None or owner == INPUT:
            raise ValueError(f"cannot place ONNX node {node.name!r} ({op}) on a layer spec")
        owners[node.name] = owner
        for t in node.output:
            tensor_layer[t] = owner
    return owners


def onnx_order(model) -> list[str]:
    """Names of the graph's nodes in its (topological) order."""
    return [n.name for n in _load(model).graph.node]


def onnx_op_types(model) -> dict[str, str]:
    return {n.name: n.op_type for n in _load(model).graph.node}


# -- 2. engine layers -> ONNX nodes ---------------------------------------------------------------
def parse_engine_information(info: str | Mapping[str, Any]) -> list[EngineLayer]:
    """The layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Accepts the JSON text or the parsed dict. Handles TensorRT 10 (``"Bindings"``,
    ``"Format/Datatype"``) and 11 (``"I/O Tensors"``, separate ``"Format"`` and
    ``"DataType"``); only names, types, tensors and metadata are read, which both keep.
    With ``LAYER_NAMES_ONLY`` verbosity ``"Layers"`` is a list of names; those parse too.
    """
    data = json.loads(info) if isinstance(info, str) else info
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(EngineLayer(entry))
            continue
        meta = entry.get("Metadata") or ""
        layers.append(EngineLayer(
            name=entry["Name"],
            layer_type=entry.get("LayerType", ""),
            inputs=tuple(t["Name"] for t in entry.get("Inputs", []) if isinstance(t, Mapping)),
            outputs=tuple(t["Name"] for t in entry.get("Outputs", []) if isinstance(t, Mapping)),
            onnx_nodes=tuple(m.strip() for m in _ONNX_LAYER.findall(meta)),
            origin=entry.get("Origin", ""),
        ))
    return layers


def onnx_nodes_in_name(name: str, order: Sequence[str]) -> tuple[str, ...]:
    """ONNX node names (from ``order``) that an engine layer name mentions, in graph order.

    ``"{ForeignNode[/a/Conv.../b/Gemm]}"`` expands to every node from ``/a/Conv`` to
    ``/b/Gemm``; otherwise each node name must appear delimited (so ``/Relu_1`` does
    not match inside ``/Relu_17``).
    """
    m = _FOREIGN.search(name)
    index = {n: i for i, n in enumerate(order)}
    if m:
        parts = [p for p in m.group(1).split("...") if p]
        known = [p for p in parts if p in index]
        if known:
            lo, hi = min(index[p] for p in known), max(index[p] for p in known)
            return tuple(order[lo: hi + 1])
    found = []
    for node in order:
        if not node:
            continue
        start = name.find(node)
        while start >= 0:
            end = start + len(node)
            if (start == 0 or name[start - 1] in _DELIMS) and (end == len(name) or name[end] in _DELIMS):
                found.append(node)
                break
            start = name.find(node, start + 1)
    return tuple(found)


# -- 3. times -> specs ----------------------------------------------------------------------------
def roofline_weight(spec: LayerSpec) -> float:
    """A rough relative cost of a spec: ``max(MACs, 10 * elements moved)``.

    Only used to split a Myelin node's single time among the specs inside it; ten MACs
    per element moved is about where a data-center GPU turns from memory- to compute-bound.
    """
    b = spec.batch
    macs = spec.op.macs(spec) or b * spec.cin * spec.in_h * spec.in_w
    moved = b * (spec.cin * spec.in_h * spec.in_w + spec.cout * spec.out_h * spec.out_w)
    if spec.residual is not None:
        moved += b * spec.cout * spec.out_h * spec.out_w
    return float(max(macs, 10 * moved, 1))


@dataclass(frozen=True)
class AttributionPlan:
    """How each engine layer's time is shared among specs; built once per engine."""

    shares: dict[str, dict[str, float]]  # engine layer -> {spec: share summing to 1}
    split_layers: tuple[str, ...]
    unowned: tuple[str, ...]

    def apply(self, times: Mapping[str, float]) -> Attribution:
        """Distribute one run's ``{engine layer: ms}`` (or an average run's)."""
        per_spec: dict[str, float] = defaultdict(float)
        unattributed: dict[str, float] = {}
        for layer, ms in times.items():
            shares = self.shares.get(layer) or self._by_containment(layer)
            if not shares:
                unattributed[layer] = unattributed.get(layer, 0.0) + float(ms)
                continue
            for spec, share in shares.items():
                per_spec[spec] += float(ms) * share
        return Attribution(dict(per_spec), self.shares, list(self.split_layers), unattributed)

    def _by_containment(self, reported: str) -> dict[str, float] | None:
        """Shares of the longest inspector layer name inside a reported name the inspector
        did not list (a profiler name with a suffix); None if there is none."""
        best = max((name for name in self.shares if name and name in reported), key=len, default=None)
        return self.shares[best] if best is not None else None


def plan_attribution(layers: Sequence[EngineLayer], owners: Mapping[str, str], order: Sequence[str],
                     op_types: Mapping[str, str], specs: Sequence[LayerSpec]) -> AttributionPlan:
    """Decide, for every engine layer, which specs its time goes to (see the module docstring)."""
    by_name = {s.name: s for s in specs}
    shares: dict[str, dict[str, float]] = {}
    split: list[str] = []
    deferred: list[int] = []
    for i, layer in enumerate(layers):
        # a conversion's name mentions the layer it serves, not nodes of its own: never parse it
        named = () if layer.inserted else onnx_nodes_in_name(layer.name, order)
        nodes = [n for n in (layer.onnx_nodes or named) if n in owners]
        owned = list(dict.fromkeys(owners[n] for n in nodes))
        if not owned:
            deferred.append(i)
            continue
        if len(owned) > 1 and not layer.foreign:
            compute = list(dict.fromkeys(owners[n] for n in nodes if op_types.get(n) in _COMPUTE_OPS))
            owned = compute or owned
        if len(owned) == 1:
            shares[layer.name] = {owned[0]: 1.0}
        else:
            w = {s: roofline_weight(by_name[s]) for s in owned}
            total = sum(w.values())
            shares[layer.name] = {s: v / total for s, v in w.items()}
            split.append(layer.name)
    # layers without ONNX nodes: to the consumer of their output, else the producer of their input
    consumers: dict[str, list[int]] = defaultdict(list)
    producer: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for t in layer.inputs:
            consumers[t].append(i)
        for t in layer.outputs:
            producer[t] = i
    name_index = {layer.name: i for i, layer in enumerate(layers)}

    def resolve(i: int, seen: frozenset) -> dict[str, float] | None:
        layer = layers[i]
        if layer.name in shares:
            return shares[layer.name]
        if i in seen:
            return None
        seen = seen | {i}
        nexts = [j for t in layer.outputs for j in consumers.get(t, [])]
        if not layer.outputs:  # no tensor information: read the conversion's name
            m = _REFORMAT_NAME.match(layer.name)
            if m and m.group(1) == "Input" and m.group(2) in name_index:
                nexts = [name_index[m.group(2)]]
            else:
                nexts = list(range(i + 1, len(layers)))  # the adjacent layer downstream
        for j in sorted(set(nexts)):
            got = resolve(j, seen)
            if got:
                return got
        prevs = [producer[t] for t in layer.inputs if t in producer]
        if not layer.inputs:
            m = _REFORMAT_NAME.match(layer.name)
            prevs = [name_index[m.group(2)]] if m and m.group(2) in name_index else list(range(i - 1, -1, -1))
        for j in prevs:
            got = resolve(j, seen)
            if got:
                return got
        return None

    unowned = []
    for i in deferred:
        got = resolve(i, frozenset())
        if got:
            shares[layers[i].name] = dict(got)
        else:
            unowned.append(layers[i].name)
    return AttributionPlan(shares, tuple(split), tuple(unowned))


def attribute(layers: Sequence[EngineLayer], times: Mapping[str, float], model, specs: Sequence[LayerSpec]
              ) -> Attribution:
    """One call for the whole chain: engine layers + one run's times + the ONNX model + specs."""
    model = _load(model)
    plan = plan_attribution(layers, onnx_node_owners(model, specs), onnx_order(model), onnx_op_types(model), specs)
    return plan.apply(times)


# -- profiler time formats ------------------------------------------------------------------------
def runs_from_callbacks(calls: Iterable[tuple[str, float]]) -> list[dict[str, float]]:
    """Split the stream of ``report_layer_time(layer_name, ms)`` calls into runs.

    TensorRT reports every layer once per execution, in execution order, so a run
    ends where a layer name comes round again.
    """
    runs: list[dict[str, float]] = []
    cur: dict[str, float] = {}
    for name, ms in calls:
        if name in cur:
            runs.append(cur)
            cur = {}
        cur[name] = float(ms)
    if cur:
        runs.append(cur)
    return runs


def average_from_trtexec_profile(profile: str | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{layer: average ms}`` from trtexec's ``--exportProfile`` JSON (``[{"count": N}, {"name", "averageMs"}...]``)."""
    data = json.loads(profile) if isinstance(profile, str) else profile
    return {e["name"]: float(e["averageMs"]) for e in data if "name" in e and "averageMs" in e}


__all__ = ["Attribution", "AttributionPlan", "EngineLayer", "attribute", "average_from_trtexec_profile",
           "onnx_node_owners", "onnx_nodes_in_name", "onnx_op_types", "onnx_order", "parse_engine_information",
           "plan_attribution", "roofline_weight", "runs_from_callbacks"]
