"""ONNX Runtime on the CPU: the ``ort`` backend.

Sessions use the deployment settings: ``intra_op_num_threads`` explicit (``threads``,
default 1), ``inter_op_num_threads=1``, sequential execution, ``ORT_ENABLE_ALL``; inputs
and outputs are bound once through IOBinding, so a timed run is just the run.

**Entries inside networks (the default for tables).** Given designed networks (see
:func:`hwslim.latency.profile.design_configs`), each is built with ``onnx.helper`` from its
layer specs (random weights), run with ONNX Runtime's profiler on, and every executed
kernel is charged to its layer (:meth:`OrtProfiler.profile_network`): a layer's time is
what it costs where it really runs, with the layout its neighbours leave, its weights
as cold as the rest of the network leaves them. Measured on MobileNetV2 1.5x (2-core
AMD EPYC VM, busy): whole-model latency / sum of these per-layer medians was 0.97-1.04
over 10 configs, against 0.71-0.97 for the same layers timed alone.

**Entries alone** (:meth:`Profiler.time_entry`, and tables with ``in_network=False``).
The entry's model (:func:`entry_model`) goes through ONNX Runtime's optimizer, which on
x86 turns the conv into a blocked-layout (NCHWc) conv with the add and activation
fused, wrapped in layout conversions the whole network does not run between layers;
:func:`in_network_layout` strips those (and adds the one the network does run before a
narrow-input conv). That moved whole-model / sum from 0.71-0.97 to 0.92-1.17: better,
but the cache effects stay, hence the in-network default.

**Clock.** With one thread (the default) a whole-model sample is the calling thread's
CPU time of the run (``time.thread_time_ns``): ONNX Runtime then computes on the
calling thread, so on an idle machine this equals the wall-clock latency, and on a busy
one it leaves out the time the scheduler gave to other processes (measured here under
load: wall-clock median 24 ms, thread CPU time 16 ms, idle wall-clock 16 ms). With more
threads the work runs on a pool, so samples are wall-clock (``clock="wall"``). Per-layer
times inside networks are ONNX Runtime's own kernel durations (wall-clock, in whole
microseconds; medians over many runs).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from hwslim.core.graph import LayerSpec
from profilers.base import Profiler, ProfilerError, Timing, sample
from profilers.cpu import CpuProfiler

NCHWC = "com.microsoft.nchwc"
OPSET = 17
SKIP_FEED = "skip_feed"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ProfilerError("backend 'ort' needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


# -- entry graphs ---------------------------------------------------------------------------
def entry_model(spec: LayerSpec):
    """A standalone ONNX model computing what ``spec`` computes in the exported network.

    Input ``x`` (plus one per further input: a residual, a concat part), output ``y``;
    the nodes are the operator's own (:meth:`hwslim.core.ops.Op.onnx`). Further inputs pass
    through a 1x1 max pool standing for the layer that produces them in a network (in
    the blocked layout, which lets ONNX Runtime fuse a residual add into the conv);
    :func:`in_network_layout` removes it again.
    """
    from hwslim.core.onnx_build import entry_model as build

    try:
        return build(spec, feed_marker=SKIP_FEED)
    except NotImplementedError as e:
        raise ProfilerError(f"backend 'ort' cannot time {spec.name!r}: {e}") from None


def network_model(specs: Sequence[LayerSpec]):
    """The ONNX model of a whole network given as layer specs (random weights), as
    :func:`hwslim.core.onnx_build.network_model` builds it from the operators."""
    from hwslim.core.onnx_build import network_model as build

    try:
        return build(specs)
    except NotImplementedError as e:
        raise ProfilerError(f"backend 'ort' cannot build this network: {e}") from None


def probe_spec() -> LayerSpec:
    """A small 1x1 conv + ReLU (8 -> 8 channels at 4x4): what reveals the NCHWc block."""
    from hwslim.core.graph import layer_spec
    from hwslim.core.ops import Conv

    return layer_spec("probe", Conv(1, act="relu"), 8, 4, out=8)


def _dims(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _round_up(c: int, block: int) -> int:
    return -(-c // block) * block


def in_network_layout(optimized, block: int, divisor: int = 8):
    """Edit an ONNX Runtime-optimized entry graph to the layout it has inside a network.

    * a ``ReorderInput`` of a graph input is dropped: the producer hands over blocked data;
    * a ``ReorderOutput`` to a graph output is dropped: the consumer takes blocked data
      (or, if it cannot, its own entry pays the conversion, see below);
    * a 4-D graph input read in plain NCHW layout (a regular conv with fewer input
      channels than a block) gets the ``ReorderOutput`` the network runs before it,
      unless its channel count is not a multiple of ``divisor``: that is the image,
      which arrives in NCHW from the caller.
    Returns a new ModelProto; the argument is not modified.
    """
    from onnx import TensorProto, helper

    g = optimized.graph
    graph_in = {v.name: v for v in g.input}
    graph_out = {v.name for v in g.output}
    reordered = {n.input[0] for n in g.node if n.op_type == "ReorderInput" and n.domain == NCHWC}
    # an input also read in plain layout (SE's scaling reads what it pools) stays an input too
    reordered -= {t for n in g.node if not (n.op_type == "ReorderInput" and n.domain == NCHWC) for t in n.input}
    inputs, outputs, nodes = [], [], []
    for v in g.input:
        dims = _dims(v)
        if v.name in reordered:
            continue
        if len(dims) == 4 and dims[1] % divisor == 0 and dims[1] % block != 0:
            blocked = f"{v.name}_blocked"
            inputs.append(helper.make_tensor_value_info(blocked, TensorProto.FLOAT,
                                                        [dims[0], _round_up(dims[1], block), *dims[2:]]))
            nodes.append(helper.make_node("ReorderOutput", [blocked], [v.name], domain=NCHWC,
                                          channels=dims[1], channels_last=0))
        else:
            inputs.append(v)
    rename_out = {}
    producer = {t: n for n in g.node for t in n.output}
    for n in g.node:
        if n.name.startswith(SKIP_FEED):  # the skip's stand-in producer: its output becomes an input
            src = producer.get(n.input[0])
            dims = _dims(graph_in[src.input[0] if src is not None and src.op_type == "ReorderInput" else n.input[0]])
            if src is not None and src.op_type == "ReorderInput":
                dims[1] = _round_up(dims[1], block)
            inputs.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, dims))
        elif n.domain == NCHWC and n.op_type == "ReorderInput" and any(
                c.name.startswith(SKIP_FEED) for c in g.node if n.output[0] in c.input):
            continue
        elif n.domain == NCHWC and n.op_type == "ReorderInput" and n.input[0] in graph_in:
            dims = _dims(graph_in[n.input[0]])
            inputs.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT,
                                                        [dims[0], _round_up(dims[1], block), *dims[2:]]))
        elif n.domain == NCHWC and n.op_type == "ReorderOutput" and n.output[0] in graph_out:
            rename_out[n.output[0]] = n.input[0]
        else:
            nodes.append(n)
    for v in g.output:
        if v.name in rename_out:
            dims = _dims(v)
            outputs.append(helper.make_tensor_value_info(rename_out[v.name], TensorProto.FLOAT,
                                                         [dims[0], _round_up(dims[1], block), *dims[2:]]))
        else:
            outputs.append(v)
    graph = helper.make_graph(nodes, g.name, inputs, outputs, list(g.initializer))
    model = helper.make_model(graph, opset_imports=list(optimized.opset_import))
    model.ir_version = optimized.ir_version
    return model


def _owners(graph, layers: Sequence[str]) -> dict[str, str]:
    """Optimized node name -> the layer it belongs to (see OrtProfiler.profile_network)."""
    names = sorted(layers, key=len, reverse=True)

    def prefix_owner(node_name: str) -> str | None:
        for layer in names:  # longest first: "b1/project" before "b1/p"
            if node_name == layer or node_name.startswith((layer + "::", layer + "_")):
                return layer
        return None

    owner: dict[str, str] = {}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    for n in graph.node:
        layer = prefix_owner(n.name)
        if layer is None:  # a conversion ORT inserted: charge it to the layer reading its output
            readers = {prefix_owner(c.name) for t in n.output for c in consumers.get(t, [])} - {None}
            layer = readers.pop() if len(readers) == 1 else next(
                (prefix_owner(t) or (t if t in layers else None) for t in n.output if (t in layers)), None)
        if layer is not None:
            owner[n.name] = layer
    return owner


class OrtProfiler(CpuProfiler):
    """Times entries and whole models with ONNX Runtime's CPU execution provider."""

    # 4 networks of 12 runs: an entry's 48 samples from 4 moments of the machine, where 2 of 24
    # came from 2, at the same table time (latency_tables/README.md, "What the layer sum misses")
    default_contexts: ClassVar[int] = 4
    backend: ClassVar[str] = "ort"
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    identity_keys: ClassVar[tuple[str, ...]] = Profiler.identity_keys + ("nchwc_block", "clock")
    package: ClassVar[str] = "onnxruntime"
    missing: ClassVar[str] = "onnxruntime is not installed: pip install onnxruntime"
    layer_center: ClassVar[str] = "iqm"  # whole-microsecond kernel times: the interquartile mean is unbiased

    def __init__(self, **settings: Any) -> None:
        """``settings``: those of :class:`~profilers.cpu.CpuProfiler`."""
        super().__init__(**settings)
        self._ort = _ort()
        self._block: int | None = None
        self._overhead: float | None = None

    def backend_version(self) -> str:
        return self._ort.__version__

    def _setup_metadata(self) -> dict[str, Any]:
        return {"nchwc_block": self.nchwc_block()}

    # -- sessions --------------------------------------------------------------------------
    def session_options(self, optimized_path: str | None = None):
        """The deployment session options (threads explicit, sequential, ORT_ENABLE_ALL)."""
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # the "optimized model is hardware specific" warning is expected
        if optimized_path:
            so.optimized_model_filepath = optimized_path
        return so

    def _session(self, model_or_path, optimized_path: str | None = None):
        src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
        return self._ort.InferenceSession(src, self.session_options(optimized_path),
                                          providers=["CPUExecutionProvider"])

    def _optimized(self, model):
        import onnx

        path = os.path.join(self._tmp.name, "optimized.onnx")
        self._session(model, path)
        try:
            return onnx.load(path)
        finally:
            os.remove(path)

    def nchwc_block(self) -> int:
        """ONNX Runtime's blocked-layout channel block on this CPU (16 with AVX-512; 0: none)."""
        if self._block is None:
            opt = self._optimized(entry_model(probe_spec())).graph
            conv = [n for n in opt.node if n.domain == NCHWC and n.op_type == "Conv"]
            weights = {i.name: i for i in opt.initializer}
            # the probe's 8 output channels are padded to one block in the blocked weights
            self._block = int(weights[conv[0].input[1]].dims[0]) if conv and conv[0].input[1] in weights else 0
        return self._block

    def entry_session(self, spec: LayerSpec):
        """The ONNX Runtime session that times ``spec`` (see the module docstring)."""
        model = entry_model(spec)
        block = self.nchwc_block()
        if block:
            model = in_network_layout(self._optimized(model), block)
        return self._session(model)

    def _binding(self, session, input_shapes: dict[str, Sequence[int]] | None = None) -> Callable[[], None]:
        """Bind random inputs once, run once so outputs get buffers, bind those; return the bare run.

        ``input_shapes`` overrides the session's declared input shapes (needed where
        they are dynamic).
        """
        ort = self._ort
        binding = session.io_binding()
        rng = np.random.default_rng(0)
        keep = []
        for v in session.get_inputs():
            shape = (input_shapes or {}).get(v.name, v.shape)
            if not all(isinstance(d, int) for d in shape):
                raise ProfilerError(f"input {v.name!r} has a dynamic shape {list(shape)}; give a static one")
            val = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32))
            keep.append(val)
            binding.bind_ortvalue_input(v.name, val)
        for v in session.get_outputs():
            binding.bind_output(v.name, "cpu")
        session.run_with_iobinding(binding)
        for v, val in zip(session.get_outputs(), binding.get_outputs()):
            keep.append(val)
            binding.bind_ortvalue_output(v.name, val)  # later runs write into the same buffers
        run_with = session.run_with_iobinding

        def run() -> None:
            run_with(binding)

        run._keep = (keep, binding, session)  # the bound buffers live as long as the call
        return run

    def run_overhead_ms(self) -> float:
        """Median time of running a one-element graph: the per-run cost of the call itself."""
        if self._overhead is not None:
            return self._overhead
        from onnx import TensorProto, helper

        v = helper.make_tensor_value_info
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty",
                                  [v("x", TensorProto.FLOAT, [1])], [v("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        timed = self._timed(self._binding(self._session(model)))
        self._overhead = round(float(np.median(sample(timed, self.protocol))), 6)
        return self._overhead

    # -- timing ----------------------------------------------------------------------------
    def _time_entry(self, spec: LayerSpec) -> Timing:
        timed = self._timed(self._binding(self.entry_session(spec)))
        return Timing.from_samples(sample(timed, self.protocol))

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        if not Path(path).is_file():
            raise ProfilerError(f"ONNX model {path} not found")
        session = self._session(path)
        ins = session.get_inputs()
        if len(ins) != 1:
            raise ProfilerError(f"{path}: expected one input, found {len(ins)}")
        return self._timed(self._binding(session, {ins[0].name: input_shape}))

    # -- entries inside whole networks --------------------------------------------------------
    def _network_timing(self, samples: list[float]) -> Timing:
        t = Timing.from_samples(samples, center=self.layer_center)  # an entry costing 0 us stays noisy here
        return replace(t, noisy=t.rel_iqr > self.protocol.max_rel_iqr)

    def profile_network(self, specs: Sequence[LayerSpec]) -> dict[str, list[float]]:
        """Per-layer times (ms per run) of one whole network, from ONNX Runtime's profiler.

        The network is built from ``specs`` (random weights), run ``network_runs``
        times after warm-up with profiling on, and every executed kernel is charged to
        the layer it came from: fused nodes keep their first node's name, which starts
        with the layer's name; a layout conversion is charged to the layer that needed
        it (its consumer), as :func:`in_network_layout` does for entries alone.
        """
        import json

        model = network_model(specs)
        opt_path = os.path.join(self._tmp.name, "network_opt.onnx")
        so = self.session_options(opt_path)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(self._tmp.name, "profile")
        session = self._ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        try:
            run = self._binding(session)
            warm = self.protocol.warmup_runs
            for _ in range(warm + self.network_runs):
                run()
        finally:
            trace = session.end_profiling()
        import onnx

        owner = _owners(onnx.load(opt_path).graph, [s.name for s in specs])
        os.remove(opt_path)
        with open(trace) as f:
            events = json.load(f)
        os.remove(trace)
        per_node: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
        out: dict[str, list[float]] = {}
        for node, durs in per_node.items():
            layer = owner.get(node)
            if layer is None:
                continue
            durs = durs[-self.network_runs:]
            acc = out.setdefault(layer, [0.0] * len(durs))
            for i, d in enumerate(durs[: len(acc)]):
                acc[i] += d
        return out
