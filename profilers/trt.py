"""TensorRT on a CUDA GPU: the ``trt`` backend (TensorRT 10 and 11 Python APIs).

**Not executed where it was written**: that machine had neither a GPU nor TensorRT.
The pure parts (attribution in :mod:`profilers.trt_attribution`, the fp16 ONNX rewrite,
the entry graphs, the network builder) are tested on the CPU; everything that touches
``tensorrt`` follows the documented API of both majors and awaits a GPU session.

**Why whole networks.** Building an engine takes seconds, so one engine per table entry
(~2,000 for MobileNetV2 1.5x) is impractical, and a layer alone is not what TensorRT
runs anyway (it fuses across layers and picks layouts per neighbour). Instead the
profile driver hands this backend *designed networks* (``hwslim.latency.profile.design_configs``:
configs that together contain every entry, each entry in ``contexts`` of them). Per
network:

1. materialize it from its layer specs with random weights and write it with
   :func:`hwslim.runtimes.onnx_file.export_onnx` (static shapes, the table's batch);
2. build an engine with the deployment precision, ``ProfilingVerbosity.DETAILED`` and
   the timing cache shared by every build of the run (and kept on disk across runs);
3. run it with torch CUDA tensors as I/O (``set_tensor_address`` +
   ``execute_async_v3`` on a non-default torch stream): warm-up, then ``network_runs``
   runs with an :class:`trt.IProfiler` attached (``report_layer_time(layer, ms)``);
4. read the engine inspector's JSON and attribute each run's layer times to the specs
   (:mod:`profilers.trt_attribution`: fused layers to the conv's spec, reformats to
   their consumer, Myelin nodes split and flagged); every run is one sample per entry.

Then the profile driver calibrates exactly as for the CPU tables: whole exported
configs timed end to end here (:meth:`TrtProfiler.time_onnx`, an engine per config,
plain enqueues between CUDA events, no profiler attached), ``e2e = a * sum + b``.

**TensorRT 10 vs 11** (the differences this module handles):

* precision: TensorRT 10 builds fp16 from the fp32 ONNX with ``BuilderFlag.FP16``.
  TensorRT 11 removed every precision flag (networks are strongly typed), so fp16 must
  be in the graph: :func:`onnx_to_fp16` rewrites the exported ONNX (fp16 weights and
  compute, fp32 input and output through Cast nodes) before parsing.
  (:func:`hwslim.runtimes.tensorrt_engine.precision_plan` is the one place that decides.)
* inspector JSON: TensorRT 11 replaced ``"Bindings"`` with ``"I/O Tensors"`` and split
  ``"Format/Datatype"``; the parser reads only layer names, types, tensor names and
  ``"Metadata"``, which both keep.
* unchanged and used as is in both: ``Builder.create_network(0)`` (explicit batch only),
  ``OnnxParser``, ``set_memory_pool_limit``, ``profiling_verbosity``,
  ``create_timing_cache``/``set_timing_cache``/``get_timing_cache().serialize()``,
  ``build_serialized_network``, ``Runtime.deserialize_cuda_engine``, the
  ``num_io_tensors``/``get_tensor_*`` name-based I/O, ``set_tensor_address``,
  ``execute_async_v3``, ``IExecutionContext.profiler`` and ``create_engine_inspector``.
  Not used because removed in 11: ``device_memory_size``, the weak-typing flags,
  ``platform_has_fast_fp16``.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

from hwslim.core.graph import LayerSpec
from profilers.base import Profiler, ProfilerError, Timing, cuda_ms_per_call, plain_net_from_specs, sample

TRT_DTYPES = ("float32", "float16")


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise ProfilerError("backend 'trt' needs TensorRT's Python package: pip install 'hwslim[tensorrt]'") from None
    return tensorrt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


# -- ONNX graphs ------------------------------------------------------------------------------------------
def entry_onnx(spec: LayerSpec, seed: int = 0):
    """A standalone ONNX model of one entry (input ``x``, one more per further input, output ``y``).

    Only used for entries timed alone (``in_network=False`` or entries no network held).
    """
    from hwslim.core.onnx_build import entry_model

    try:
        return entry_model(spec)
    except NotImplementedError as e:
        raise ProfilerError(f"backend 'trt' cannot time {spec.name!r}: {e}") from None


def onnx_to_fp16(model):
    """An fp16 copy of an fp32 ONNX graph with fp32 input and output (for strongly typed TensorRT 11).

    Float initializers and Constant tensors become fp16; each float graph input is cast
    to fp16 on entry, each output back to fp32 on exit, so callers keep fp32 I/O (as
    TensorRT 10's ``BuilderFlag.FP16`` engines have). Intermediate value_info is
    dropped (TensorRT re-infers it). Covers the ops ``export_onnx`` writes; ops whose
    attributes carry float types (Cast) are left to their inputs' types.
    """
    import copy

    import numpy as np
    from onnx import TensorProto, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    for i, init in enumerate(list(g.initializer)):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                              init.name))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    del g.value_info[:]
    casts_in = [_half_io(g.node, inp.name, inputs=True) for inp in g.input
                if inp.type.tensor_type.elem_type == TensorProto.FLOAT]
    casts_out = [_half_io(g.node, out.name, inputs=False) for out in g.output
                 if out.type.tensor_type.elem_type == TensorProto.FLOAT]
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    return m


def _half_io(nodes, name: str, inputs: bool):
    """Rename graph input (or output) ``name`` to ``name_fp16`` where ``nodes`` read (or write) it;
    return the Cast node converting between the fp32 tensor and its fp16 copy."""
    from onnx import TensorProto, helper

    half = f"{name}_fp16"
    for node in nodes:
        ports = node.input if inputs else node.output
        for k, t in enumerate(ports):
            if t == name:
                ports[k] = half
    if inputs:
        return helper.make_node("Cast", [name], [half], name=f"/cast_{name}_fp16", to=TensorProto.FLOAT16)
    return helper.make_node("Cast", [half], [name], name=f"/cast_{name}_fp32", to=TensorProto.FLOAT)


# -- TensorRT pieces (need the package and a GPU) ---------------------------------------------------------
def _layer_times_profiler(trt):
    """An ``IProfiler`` that records every ``report_layer_time`` call in order."""

    class LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)  # the binding requires the explicit base init
            self.calls: list[tuple[str, float]] = []

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.calls.append((layer_name, float(ms)))

    return LayerTimes()


class _Engine:
    """A built engine with its context, torch CUDA I/O tensors bound once, and its stream."""

    def __init__(self, trt, serialized: bytes, stream, seed: int = 0) -> None:
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise ProfilerError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        self.stream = stream
        gen = torch.Generator().manual_seed(seed)
        self.tensors = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ProfilerError(f"engine tensor {name!r} has a dynamic shape {shape}; export with static shapes")
            dt = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            t = torch.randn(shape, generator=gen).to(dtype=dt, device="cuda") if dt.is_floating_point else \
                torch.zeros(shape, dtype=dt, device="cuda")
            self.tensors[name] = t
            self.context.set_tensor_address(name, t.data_ptr())

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ProfilerError("TensorRT failed to run the engine (execute_async_v3 returned False)")

    def inspector_json(self) -> str:
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return inspector.get_engine_information(self.trt.LayerInformationFormat.JSON)


def _torch_dtype(trt, dt):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    for name in ("int64", "bfloat16"):
        if hasattr(trt, name):
            table[getattr(trt, name)] = getattr(torch, name)
    return table[dt]


class TrtProfiler(Profiler):
    """Times table entries inside whole TensorRT engines (IProfiler + inspector) and models end to end."""

    backend: ClassVar[str] = "trt"
    device: ClassVar[str] = "cuda"
    dtypes: ClassVar[tuple[str, ...]] = TRT_DTYPES
    identity_keys: ClassVar[tuple[str, ...]] = Profiler.identity_keys + (
        "driver_version", "cuda_runtime", "precision_mode")

    def __init__(self, *, threads: int | None = None, dtype: str | None = None, protocol=None, e2e_protocol=None,
                 in_network: bool = True, network_runs: int | None = None, workspace_mib: int = 2048,
                 timing_cache: str | None = None, optimization_level: int | None = None,
                 target_replay_ms: float = 1.0, seed: int = 0) -> None:
        super().__init__(threads=threads, dtype=dtype, protocol=protocol, e2e_protocol=e2e_protocol)
        import torch

        if not torch.cuda.is_available():
            raise ProfilerError("backend 'trt' needs a CUDA GPU; PyTorch sees none")
        self._trt_mod = _trt()
        from hwslim.runtimes.tensorrt_engine import default_timing_cache, precision_plan

        self.major = trt_major(self._trt_mod.__version__)
        if self.major < 10:
            raise ProfilerError(f"TensorRT {self._trt_mod.__version__} is too old: the trt backend needs 10 or newer")
        self.plan = precision_plan(self.major, self.dtype == "float16")
        self.in_network = bool(in_network)
        self.network_runs = int(network_runs) if network_runs else max(self.protocol.min_reps, 30)
        self.workspace_mib = int(workspace_mib)
        self.timing_cache = str(timing_cache) if timing_cache else str(default_timing_cache())
        self.optimization_level = optimization_level
        self.target_replay_ms = float(target_replay_ms)
        self.seed = int(seed)
        self._stream = torch.cuda.Stream()  # non-default: TensorRT warns on (and serializes with) the legacy one
        self._tmp = tempfile.TemporaryDirectory(prefix="hwslim-trt-")
        self._logger = self._trt_mod.Logger(self._trt_mod.Logger.WARNING)
        self._builder = self._trt_mod.Builder(self._logger)
        self._cache = None  # the ITimingCache shared by every build of this profiler
        self.split_entries = 0  # entries whose time includes an estimated share of a Myelin node
        self.unattributed_ms = self.profiled_ms = 0.0  # profiled time no spec could be charged with
        from profilers.gpu_info import gpu_info

        self._gpu = gpu_info()

    # -- identity ------------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("tensorrt") is None:
            return False
        try:
            import torch

            return torch.cuda.is_available()
        except Exception:
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT's Python package is not installed: pip install 'hwslim[tensorrt]'"
        return "PyTorch sees no CUDA GPU"

    @classmethod
    def machine_name(cls) -> str:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "in_network": self.in_network, "network_runs": self.network_runs,
                "workspace_mib": self.workspace_mib, "optimization_level": self.optimization_level,
                "target_replay_ms": self.target_replay_ms, "seed": self.seed}

    def _backend_metadata(self) -> dict[str, Any]:
        g = self._gpu
        mode = ("BuilderFlag.FP16" if self.plan.builder_flags else
                "strongly typed fp16 ONNX" if self.plan.onnx_fp16 else "fp32")
        return {
            "device_name": g.get("gpu_name") or self.machine_name(),
            "backend_version": self._trt_mod.__version__,
            "tensorrt_major": self.major,
            "gpu_name": g.get("gpu_name"),
            "compute_capability": g.get("compute_capability"),
            "driver_version": g.get("driver_version"),
            "cuda_runtime": g.get("cuda_runtime"),
            "clocks_at_start": g.get("clocks_at_start"),
            "precision": self.dtype,
            "precision_mode": mode,
            "timing_cache": self.timing_cache,
        }

    # -- building --------------------------------------------------------------------------------
    def build(self, onnx_model) -> bytes:
        """A serialized engine for ``onnx_model`` (ModelProto) at the profiler's precision."""
        import onnx

        trt = self._trt_mod
        if self.plan.onnx_fp16:
            onnx_model = onnx_to_fp16(onnx_model)
        network = self._builder.create_network(0)  # explicit batch: the only mode since 10; strongly typed in 11
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx.shape_inference.infer_shapes(onnx_model).SerializeToString()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ProfilerError(f"TensorRT could not parse the network: {errors[:300]}")
        config = self._builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer metadata for attribution
        for flag in self.plan.builder_flags:  # TensorRT 10 fp16: BuilderFlag.FP16; none on 11
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if self.optimization_level is not None:
            config.builder_optimization_level = int(self.optimization_level)
        if self._cache is None:
            path = Path(self.timing_cache)
            self._cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(self._cache, False)  # shared: later builds reuse earlier tactic timings
        serialized = self._builder.build_serialized_network(network, config)
        if serialized is None:
            raise ProfilerError("TensorRT failed to build an engine (see its log above)")
        self._save_cache()
        return bytes(serialized)

    def _save_cache(self) -> None:
        if self._cache is None:
            return
        path = Path(self.timing_cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(bytes(self._cache.serialize()))
        os.replace(tmp, path)

    def _engine(self, onnx_model) -> _Engine:
        return _Engine(self._trt_mod, self.build(onnx_model), self._stream, self.seed)

    # -- timing ------------------------------------------------------------------------------------
    def _runner(self, eng: _Engine, protocol) -> Callable[[], float]:
        """Warm up, size ``inner`` (enqueues per sample), return a call giving ms per enqueue."""
        import torch

        self._stream.wait_stream(torch.cuda.current_stream())
        for _ in range(max(2, protocol.warmup_runs)):
            eng.enqueue()
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        per = max(cuda_ms_per_call(self._stream, eng.enqueue, 3, events), 1e-4)
        inner = int(min(1000, max(1, round(self.target_replay_ms / per))))

        def run() -> float:
            return cuda_ms_per_call(self._stream, eng.enqueue, inner, events)

        run._engine = eng
        return run

    def _time_entry(self, spec: LayerSpec) -> Timing:
        # one engine per entry: slow (a build each); only for entries no network contained
        run = self._runner(self._engine(entry_onnx(spec, self.seed)), self.protocol)
        return Timing.from_samples(sample(run, self.protocol))

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        import onnx

        if not Path(path).is_file():
            raise ProfilerError(f"ONNX model {path} not found")
        model = onnx.load(path)
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        if list(dims) != list(input_shape):
            raise ProfilerError(f"{path}: input shape {dims} differs from {list(input_shape)}; export it static")
        return self._runner(self._engine(model), self.e2e_protocol)

    def profile_network(self, specs: Sequence[LayerSpec]) -> tuple[dict[str, list[float]], set[str]]:
        """Per-spec times (ms, one value per profiled run) of one whole network, and the specs
        whose times include an estimated share of a Myelin node."""
        import onnx

        from hwslim.runtimes.onnx_file import export_onnx
        from profilers.trt_attribution import (onnx_node_owners, onnx_op_types, onnx_order,
                                               parse_engine_information, plan_attribution, runs_from_callbacks)

        path = Path(self._tmp.name) / "network.onnx"
        export_onnx(plain_net_from_specs(specs, self.seed), path, batch=specs[0].batch, input_size=specs[0].in_h)
        model = onnx.load(str(path))
        eng = self._engine(model)
        for _ in range(max(3, self.protocol.warmup_runs)):
            eng.enqueue()
        self._stream.synchronize()
        prof = _layer_times_profiler(self._trt_mod)
        eng.context.profiler = prof  # enqueue_emits_profile is True by default: every run reports
        for _ in range(self.network_runs):
            eng.enqueue()
            self._stream.synchronize()
        layers = parse_engine_information(eng.inspector_json())
        plan = plan_attribution(layers, onnx_node_owners(model, specs), onnx_order(model), onnx_op_types(model),
                                specs)
        if plan.unowned:
            raise ProfilerError(f"TensorRT layers not attributable to any layer: {', '.join(plan.unowned[:3])}")
        split_specs = {s for layer in plan.split_layers for s in plan.shares[layer]}
        out: dict[str, list[float]] = {}
        lost = total = 0.0
        for run in runs_from_callbacks(prof.calls)[-self.network_runs:]:
            att = plan.apply(run)
            lost, total = lost + att.unattributed_ms, total + att.total_ms
            for spec, ms in att.per_spec.items():
                out.setdefault(spec, []).append(ms)
        self.unattributed_ms += lost
        self.profiled_ms += total
        if total > 0 and lost > 0.01 * total:
            import warnings

            warnings.warn(f"{100 * lost / total:.1f}% of a network's profiled time came under layer names the "
                          f"engine inspector does not list; it is left out of the table", stacklevel=2)
        return out, split_specs

    def _measure_entries(self, specs, networks) -> Iterator[tuple[LayerSpec, Timing]]:
        if networks is None:
            yield from super()._measure_entries(specs, None)
            return
        for spec, samples, split, ref in self._pool_networks(specs, networks, self.profile_network):
            t = Timing.from_samples(samples, ref_ms=ref)
            self.split_entries += split
            yield spec, replace(t, noisy=t.rel_iqr > self.protocol.max_rel_iqr)

    def close(self) -> None:
        self._save_cache()
        self._tmp.cleanup()


__all__ = ["TrtProfiler", "entry_onnx", "onnx_to_fp16", "trt_major"]
