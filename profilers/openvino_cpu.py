"""OpenVINO on the CPU: the ``openvino`` backend.

Models are compiled for the ``CPU`` plugin with the deployment settings: explicit
``INFERENCE_NUM_THREADS`` (``threads``, default 1), ``PERFORMANCE_HINT=LATENCY`` (one
stream), and an explicit ``INFERENCE_PRECISION_HINT``: ``f32`` for ``dtype="float32"``
(without it, CPUs with AMX or AVX512-BF16 silently run bf16), ``bf16`` for
``dtype="bfloat16"`` where ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``. Inputs are set
once per request, so a timed run is just ``infer()``.

**Entries inside networks (the default for tables).** OpenVINO reports per-node
counters (``PERF_COUNT``, :meth:`InferRequest.get_profiling_info`), and they map
cleanly onto hwslim's layers: the CPU plugin keeps the name of the first
node of a fused group (``"b1/expand::conv/WithoutBiases"`` for conv + bias + add +
activation; the fused nodes are reported ``NOT_RUN``), and a layout conversion it
inserts is named after the producer and the consumer
(``"input_abcd_acdb_stem::conv/WithoutBiases"``), so it is charged to the consumer, as
ONNX Runtime's conversions are. Every executed node of MobileNetV2/V3, EfficientNet,
RegNet, MNasNet, ResNet and DenseNet networks maps onto a layer this way (checked
here). A layer with no executed node in a network (DenseNet's concatenations, done in
place) costs 0 there. A counter is not the last run's time but the node's running
average since compile, in whole microseconds (measured: a conv read 54, 35, 25, 20,
17 us over its first five runs, then settled at 6-7 us): so each designed network (see
:func:`hwslim.latency.profile.design_configs`) gives one mean per layer over ``network_runs``
runs after warm-up, from the counters before and after them
(:meth:`OpenVinoProfiler.profile_network`), and an entry's time is the median over
the networks it was timed in (``--contexts``).

**Entries alone** (:meth:`Profiler.time_entry`, tables with ``in_network=False``): the
entry's one-layer ONNX model, compiled and timed end to end.

**Clock.** With one thread the CPU plugin computes on the calling thread (measured
here: thread CPU time = process CPU time = wall-clock per run, 0.239 ms for a
MobileNetV2 0.5x at 64 px), so whole-model samples are the calling thread's CPU time,
as for ONNX Runtime; with more threads, wall-clock (``clock="wall"``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from hwslim.core.graph import LayerSpec
from hwslim.core.machine import cpu_model
from profilers.base import ProfilerError, Timing, sample
from profilers.cpu import CpuProfiler

INSTALL = "pip install 'hwslim[openvino]'"
# hwslim dtype -> OpenVINO inference precision, and the capability the CPU must report
PRECISIONS = {"float32": ("f32", "FP32"), "bfloat16": ("bf16", "BF16")}
MODEL_SUFFIXES = (".onnx", ".xml")  # what the plugin reads directly: ONNX and OpenVINO IR
RUNS_PER_PRIOR_RUN = 20  # measured runs of a designed network per run before them (see profile_network)


def _ov():
    try:
        import openvino
    except ImportError:
        raise ProfilerError(f"backend 'openvino' needs the openvino package: {INSTALL}") from None
    return openvino


def capabilities(core=None) -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (``["BF16", "FP32", "INT8", ...]``)."""
    core = core or _ov().Core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def layer_owner(node_name: str, layers: Sequence[str]) -> str | None:
    """The layer an OpenVINO node (by its runtime name) belongs to, or None.

    A layer ``L`` matches where ``L`` starts the name or follows ``_``, and is followed
    by ``::``, ``/`` or the end. The match that starts last wins: a layout conversion
    ``<producer>_<layouts>_<consumer>`` goes to its consumer; among matches at the same
    place the longest name wins (``b1/project`` over ``b1/p``).
    """
    best: tuple[int, int, str] | None = None
    for layer in layers:
        pos = node_name.find(layer)
        while pos >= 0:
            end = pos + len(layer)
            if (pos == 0 or node_name[pos - 1] == "_") and (
                    end == len(node_name) or node_name.startswith(("::", "/"), end)):
                cand = (pos, len(layer), layer)
                if best is None or cand[:2] > best[:2]:
                    best = cand
            pos = node_name.find(layer, pos + 1)
    return best[2] if best else None


class OpenVinoProfiler(CpuProfiler):
    """Times entries and whole models with OpenVINO's CPU plugin."""

    backend: ClassVar[str] = "openvino"
    dtypes: ClassVar[tuple[str, ...]] = tuple(PRECISIONS)
    identity_keys: ClassVar[tuple[str, ...]] = CpuProfiler.identity_keys + ("inference_precision",
                                                                             "performance_hint")
    model_suffixes: ClassVar[tuple[str, ...]] = MODEL_SUFFIXES
    package: ClassVar[str] = "openvino"
    missing: ClassVar[str] = f"the openvino package is not installed: {INSTALL}"

    def __init__(self, **settings: Any) -> None:
        """``settings``: those of :class:`~profilers.cpu.CpuProfiler`."""
        super().__init__(**settings)
        self._ov = _ov()
        self._core = self._ov.Core()
        self.precision, cap = PRECISIONS[self.dtype]
        self._caps = capabilities(self._core)
        if cap not in self._caps:
            raise ProfilerError(f"OpenVINO's CPU plugin cannot run {self.dtype} on this CPU ({cpu_model()}: "
                                f"capabilities {', '.join(self._caps)}); use --dtype float32")
        self._owners: dict[tuple, dict[str, str | None]] = {}

    def backend_version(self) -> str:
        return self._ov.get_version()

    def _setup_metadata(self) -> dict[str, Any]:
        return {
            "inference_precision": self.precision,
            "performance_hint": "LATENCY",
            "optimization_capabilities": list(self._caps),
            "layer_times": ("OpenVINO's per-node counters (PERF_COUNT) inside designed networks: per network, "
                            "the mean over network_runs runs after warm-up, from the counters' running averages "
                            "before and after" if self.in_network else "each entry's one-layer model timed end to end"),
        }

    # -- compiled models -------------------------------------------------------------------
    def compile_config(self, perf_count: bool = False) -> dict[str, Any]:
        """The CPU plugin's properties for deployment-like runs (``PERF_COUNT`` for layer times)."""
        return {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": self.precision, "PERF_COUNT": bool(perf_count)}

    def compile(self, model_or_path, input_shape: Sequence[int] | None = None, perf_count: bool = False):
        """A compiled model from an ONNX ModelProto, an ONNX/IR path or an ``ov.Model``."""
        if isinstance(model_or_path, (str, os.PathLike)):
            model = self._core.read_model(str(model_or_path))
        elif isinstance(model_or_path, self._ov.Model):
            model = model_or_path
        else:  # an onnx ModelProto
            import onnx

            path = os.path.join(self._tmp.name, "model.onnx")
            onnx.save(model_or_path, path)
            try:
                model = self._core.read_model(path)
            finally:
                os.remove(path)
        if input_shape is not None:
            if len(model.inputs) != 1:
                raise ProfilerError(f"expected a model with one input, found {len(model.inputs)}")
            if model.input(0).get_partial_shape().is_dynamic or list(model.input(0).get_shape()) != list(input_shape):
                model.reshape({model.input(0): self._ov.PartialShape(list(input_shape))})
        return self._core.compile_model(model, "CPU", self.compile_config(perf_count))

    def _request(self, compiled) -> Callable[[], None]:
        """An infer request with random inputs set once; returns the bare run."""
        req = compiled.create_infer_request()
        rng = np.random.default_rng(0)
        keep = []
        for port in compiled.inputs:
            arr = rng.standard_normal(tuple(port.get_shape())).astype(np.float32)
            keep.append(arr)
            req.set_tensor(port, self._ov.Tensor(arr))
        req.infer()
        infer = req.infer

        def run() -> None:
            infer()

        run._keep = (keep, req, compiled)  # inputs and request live as long as the call
        run.request = req
        return run

    # -- timing ----------------------------------------------------------------------------
    def _time_entry(self, spec: LayerSpec) -> Timing:
        from hwslim.core.onnx_build import entry_model

        model = self._entry(lambda: entry_model(spec), spec)
        timed = self._timed(self._request(self.compile(model)))
        return Timing.from_samples(sample(timed, self.protocol))

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        p = Path(path)
        if not p.is_file():
            raise ProfilerError(f"model {path} not found")
        if p.suffix not in MODEL_SUFFIXES:
            raise ProfilerError(f"{path}: OpenVINO reads {' or '.join(MODEL_SUFFIXES)} files here")
        return self._timed(self._request(self.compile(path, input_shape)))

    # -- entries inside whole networks (one mean per network an entry was timed in) ----------
    def profile_network(self, specs: Sequence[LayerSpec]) -> dict[str, list[float]]:
        """Per-layer time (ms per run) of one whole network, from OpenVINO's counters.

        The network is built from ``specs`` (random weights), compiled with
        ``PERF_COUNT``, warmed up, then run ``network_runs`` times. The CPU plugin's
        counter of a node holds its *running average since compile*, in whole
        microseconds (each run's duration truncated, the average floor-divided), not
        the last run's time: the first runs, up to 10x slower, stay in it. So the
        counters are read before and after the measured runs; a node's total over
        ``n`` runs is ``n * average + (n - 1) / 2`` us (the division's expected
        remainder), the difference of the two totals over ``network_runs`` is its mean
        per run, plus 0.5 us for the truncation of each run. A total read after ``n``
        runs is known to +-n/2 us, so at least ``RUNS_PER_PRIOR_RUN`` times as many runs
        are measured as came before them (compile's first run and the warm-up): the
        mean is then known to about +-0.5 us per node. That is one value per layer and
        network (0 where none of its nodes ran), the sum of its nodes'. A mean, not a
        median: a busy machine's preemptions land in it (measure tables on a quiet one).
        """
        from hwslim.core.onnx_build import network_model

        try:
            model = network_model(specs)
        except NotImplementedError as e:
            raise ProfilerError(f"backend 'openvino' cannot build this network: {e}") from None
        run = self._request(self.compile(model, perf_count=True))  # runs it once
        req = run.request
        done = 1 + self._warm_up(run)
        layers = [s.name for s in specs]
        owners = self._owners.setdefault(tuple(layers), {})
        before = self._counter_totals(req, done)
        # a total read after n runs is known to +-n/2 us: measured runs >> runs before keep the mean to ~0.5 us
        runs = max(self.network_runs, RUNS_PER_PRIOR_RUN * done)
        for _ in range(runs):
            run()
        after = self._counter_totals(req, done + runs)
        out: dict[str, float] = {name: 0.0 for name in layers}
        for name, (total, avg_us, kernel) in after.items():
            if not kernel:  # fused into another node, or nothing to run (inputs, outputs, reshapes)
                continue
            if name not in owners:
                owners[name] = layer_owner(name, layers)
            layer = owners[name]
            if layer is not None:  # under 1 us on average a counter reads 0: 0.5 us expected
                out[layer] += (0.5 if avg_us == 0 else (total - before[name][0]) / runs + 0.5) * 1e-3
        return {name: [max(v, 0.0)] for name, v in out.items()}

    def _warm_up(self, run: Callable[[], None]) -> int:
        """Run the protocol's warm-up (at least ``warmup_runs`` runs and ``warmup_ms``); return the runs."""
        start, n = time.perf_counter(), 0
        while n < self.protocol.warmup_runs or (time.perf_counter() - start) * 1e3 < self.protocol.warmup_ms:
            run()
            n += 1
        return n

    @staticmethod
    def _counter_totals(req, runs: int) -> dict[str, tuple[float, int, bool]]:
        """Each node's estimated total time (us) over the ``runs`` runs so far, its counter, and
        whether it runs a kernel of its own.

        Every node is read, whatever its status: the plugin reports ``NOT_RUN`` for a
        node whose average is below 1 us, which changes from one read to the next. A
        node fused into another reports the kernel ``undef``; inputs, outputs and
        reshapes ``unknown_...``.
        """
        out = {}
        for info in req.get_profiling_info():
            avg_us = round(info.real_time.total_seconds() * 1e6)
            kernel = info.exec_type != "undef" and not info.exec_type.startswith("unknown")
            out[info.node_name] = (runs * avg_us + (runs - 1) / 2, avg_us, kernel)
        return out
