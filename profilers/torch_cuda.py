"""cuDNN through PyTorch on a CUDA GPU: the ``torch_cuda`` backend (``--backend torch``).

**What an entry is.** The plain PyTorch ops the materialized network runs for that
layer (:class:`~hwslim.core.materialize.PlainNet` with BN folded, under no_grad):
``conv2d`` with the folded-BN bias, then the residual ``add_`` and the activation in
place (``relu_`` / ``clamp_(0, 6)``); ``max_pool2d``; ``adaptive_avg_pool2d`` +
``flatten``; ``linear``. Random weights (timing does not depend on values) in the
table's precision (fp32, fp16 or bf16), NCHW or channels-last.

**Protocol** (each rule is there because a GPU timing goes wrong without it):

* ``torch.backends.cudnn.benchmark`` on, so cuDNN picks its fastest algorithm per shape
  (as a deployment would), during eager warm-up runs before anything is captured;
* the timed unit is a **CUDA graph** holding ``inner`` back-to-back calls of the entry,
  ``inner`` chosen so one replay lasts about ``target_replay_ms``; one sample is one
  replay between two CUDA events on a **non-default stream**, divided by ``inner``.
  Replay removes the Python and launch overhead that a deployed engine or a captured
  network does not pay, and a replay long enough to dwarf event resolution makes
  microsecond kernels measurable;
* inputs and weights are allocated once before capture: no host-device copies and no
  allocations in the timed region;
* entries are prepared in groups (up to ``group_size`` entries or ``group_mib`` of
  tensors), and their samples are taken **interleaved** (every entry once per round,
  random order per round, one synchronization per round), so a slow spell of the GPU
  (clock change, another process) spreads over many entries instead of biasing one,
  and the host never waits between samples;
* median, IQR, p90 and n per entry; an entry whose spread stays above
  ``protocol.max_rel_iqr`` is measured again alone (the base class's retries) and the
  tighter result kept, else flagged ``noisy``.

**End to end** (calibration, ``hwslim verify``): :meth:`TorchCudaProfiler.time_onnx`
runs the materialized network itself (:func:`network_callable`: each operator's plain
module and ``run_plain``, so nothing here is written per operator): the ``.pt`` that
:meth:`TorchCudaProfiler.write_model` saves, or the network an ONNX file from ``hwslim
export`` describes in its metadata (:func:`load_network`), captured in one CUDA graph and
timed with the same events/stream/replay protocol. So entries and
whole networks are measured by one mechanism, and the calibration fit only has to
absorb what really differs between them (caches, the gaps between kernels).

Speed: with the default protocol an entry costs ``budget_ms`` (40 ms) of GPU time for
its samples plus its preparation (allocation, cuDNN's algorithm search, capture), so a
full MobileNetV2 1.5x table at 224 (2,032 entries) is planned at a few minutes of GPU
time; this was not measured where the backend was written (no GPU there).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterator, Sequence

from hwslim.core import jsonio
from hwslim.core.graph import LayerSpec
from profilers.base import Profiler, ProfilerError, Protocol, Timing, cuda_ms_per_call, plain_net_from_specs, sample

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _torch():
    import torch

    return torch


def torch_dtype(name: str):
    torch = _torch()
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# -- entries ------------------------------------------------------------------------------------------
def entry_callable(spec: LayerSpec, device: str = "cuda", dtype: str = "float32", channels_last: bool = False,
                   seed: int = 0) -> tuple[Callable[[], Any], int]:
    """``(fn, bytes)``: a no-argument call computing ``spec`` as the materialized net does, and
    the bytes of the tensors it holds (inputs, weights, one output).

    ``fn()`` returns the layer's output; inputs and weights are created once, here.
    """
    torch = _torch()

    dt = torch_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape, scale: float = 1.0, four_d: bool = False):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)
        return t.contiguous(memory_format=fmt) if four_d and len(shape) == 4 else t

    b = spec.batch
    elem = torch.finfo(dt).bits // 8
    module = spec.op.plain(spec, None)  # the materialized layer, random weights, BN folded as deployed
    op, module = spec.op.folded(spec, module.eval() if module is not None else None)
    if module is not None:
        torch.manual_seed(seed)
        module = module.to(device=device, dtype=dt)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
    xs = [rand(b, c) if k == 0 and spec.in_flat else rand(b, c, *spec.in_sizes[k], four_d=True)
          for k, c in enumerate(spec.in_channels)]

    def fn():
        with torch.no_grad():
            return op.run_plain(module, xs, spec, False, False)

    weights = sum(p.numel() for p in module.parameters()) if module is not None else 0
    tensors = sum(x.numel() for x in xs) + weights + spec.out_elements
    return fn, int(tensors * elem)


# -- whole networks ------------------------------------------------------------------------------------
def network_callable(net, input_shape: Sequence[int], device: str = "cuda", dtype: str = "float32",
                     channels_last: bool = False, seed: int = 0) -> Callable[[], Any]:
    """A no-argument call running a materialized network (:class:`~hwslim.core.materialize.PlainNet`).

    The network runs itself: each layer is its operator's plain module and ``run_plain``
    (in place where its input has no other reader), so the kernels are the ones the
    materialized network launches and every operator the core knows runs here. It is moved
    to ``device`` and ``dtype`` (channels-last where asked); the input is random, made once.
    """
    torch = _torch()
    dt = torch_dtype(dtype)
    net = net.to(device=device, dtype=dt).eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dt)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def run():
        with torch.no_grad():
            return net(x)

    return run


def load_network(path):
    """The materialized network a whole-model file holds: a ``.pt`` from
    :meth:`TorchCudaProfiler.write_model`, or an ONNX file from ``hwslim export`` (rebuilt from
    the graph and config in its metadata, random weights: timing does not depend on values)."""
    from pathlib import Path

    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise ProfilerError(f"model {path} not found")
    if path.suffix == ".pt":
        return torch.load(path, weights_only=False)  # written by write_model, never a user's file
    from hwslim.core.graph import graph_from_dict
    from hwslim.core.materialize import materialize
    from hwslim.core.supernet import SlimmableNet
    from hwslim.runtimes.onnx_file import config_from_metadata, onnx_metadata

    meta = onnx_metadata(path)
    if "graph" not in meta:
        raise ProfilerError(f"{path}: backend 'torch_cuda' runs the network an ONNX file's hwslim metadata "
                            f"describes, and this one has none; give the file `hwslim export` wrote")
    config = config_from_metadata(meta, str(path))
    net = SlimmableNet.from_graph(replace(graph_from_dict(jsonio.loads(meta["graph"])), input_size=config.input_size))
    return materialize(net, config, fold_bn=True).eval()


# -- the timed unit -------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """One callable prepared for timing: warmed up, ``inner`` calls captured in a CUDA graph."""

    fn: Callable[[], Any]
    inner: int
    per_call_ms: float
    graph: Any = None

    def launch(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.inner):
                self.fn()


class TorchCudaProfiler(Profiler):
    """Times entries and whole models as PyTorch CUDA ops (cuDNN), with CUDA graphs and events."""

    backend: ClassVar[str] = "torch_cuda"
    device: ClassVar[str] = "cuda"
    missing: ClassVar[str] = "PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)"
    dtypes: ClassVar[tuple[str, ...]] = tuple(DTYPES)
    # whole models: the materialized network itself (write_model), or an exported ONNX's network
    model_suffixes: ClassVar[tuple[str, ...]] = (".pt", ".onnx")
    identity_keys: ClassVar[tuple[str, ...]] = Profiler.identity_keys + (
        "driver_version", "cuda_runtime", "cudnn_version", "channels_last", "allow_tf32", "cuda_graphs")

    def __init__(self, *, threads: int | None = None, dtype: str | None = None, protocol=None, e2e_protocol=None,
                 channels_last: bool = False, cuda_graphs: bool = True, allow_tf32: bool = True,
                 target_replay_ms: float = 0.5, group_size: int = 64, group_mib: int = 4096,
                 device_index: int | None = None, seed: int = 0, in_network: bool = False) -> None:
        super().__init__(threads=threads, dtype=dtype, protocol=protocol, e2e_protocol=e2e_protocol)
        torch = _torch()
        if in_network:
            raise ProfilerError("backend 'torch_cuda' times each entry alone (in_network is not supported)")
        if not torch.cuda.is_available():
            raise ProfilerError(f"backend 'torch_cuda' cannot run here ({self.unavailable_reason()})")
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.allow_tf32 = bool(allow_tf32)
        self.target_replay_ms = float(target_replay_ms)
        self.group_size = int(group_size)
        self.group_mib = int(group_mib)
        self.device_index = torch.cuda.current_device() if device_index is None else int(device_index)
        self.seed = int(seed)
        self._dev = f"cuda:{self.device_index}"
        torch.cuda.set_device(self.device_index)
        # global cuDNN / TF32 switches: set for the profiler's lifetime, restored by close()
        self._saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                       torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        self._stream = torch.cuda.Stream(device=self.device_index)
        self._pool_anchors: dict = {}  # pool handle -> one graph captured into it (see _capture)
        # whole-model graphs share one memory pool: they replay one at a time on one stream and
        # their outputs are never read, so 60 MobileNetV2s at batch 32 need one network's memory
        self._e2e_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        from profilers.gpu_info import gpu_info

        self._gpu = gpu_info(self.device_index)  # read once: "clocks at start"
        self._closed = False

    # -- identity ----------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        try:
            return _torch().cuda.is_available()
        except Exception:
            return False

    @classmethod
    def machine_name(cls) -> str:
        torch = _torch()
        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "channels_last": self.channels_last, "cuda_graphs": self.cuda_graphs,
                "allow_tf32": self.allow_tf32, "target_replay_ms": self.target_replay_ms,
                "group_size": self.group_size, "group_mib": self.group_mib, "seed": self.seed}

    def _backend_metadata(self) -> dict[str, Any]:
        torch = _torch()
        g = self._gpu
        return {
            "device_name": g.get("gpu_name") or torch.cuda.get_device_name(self.device_index),
            "backend_version": f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}",
            "gpu_name": g.get("gpu_name"),
            "compute_capability": g.get("compute_capability"),
            "gpu_memory_gib": g.get("gpu_memory_gib"),
            "driver_version": g.get("driver_version"),
            "cuda_runtime": g.get("cuda_runtime"),
            "cudnn_version": g.get("cudnn_version"),
            "clocks_at_start": g.get("clocks_at_start"),
            "precision": self.dtype,
            "channels_last": self.channels_last,
            "allow_tf32": self.allow_tf32,
            "cuda_graphs": self.cuda_graphs,
            "cudnn_benchmark": True,
        }

    # -- preparing and timing units ------------------------------------------------------------
    def _estimate_ms(self, fn: Callable[[], Any], calls: int = 5) -> float:
        torch = _torch()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start.record(self._stream)
            for _ in range(calls):
                fn()
            end.record(self._stream)
        end.synchronize()
        return start.elapsed_time(end) / calls

    def _capture(self, fn: Callable[[], Any], inner: int, pool=None):
        """A CUDA graph of ``inner`` calls of ``fn``, captured on the profiler's stream.

        The low-level ``capture_begin``/``capture_end`` rather than ``torch.cuda.graph``:
        the context manager runs ``gc.collect()`` and empties the allocator cache on
        every capture, which costs more than the capture itself over 2,000 entries.
        """
        torch = _torch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            if pool is None:
                graph.capture_begin()
            else:
                graph.capture_begin(pool=pool)
            try:
                for _ in range(inner):
                    fn()
            finally:
                graph.capture_end()
        if pool is not None:
            # The caching allocator refuses a capture into a private pool all of whose
            # graphs were released ("use_count > 0 INTERNAL ASSERT", torch 2.11 on an H200):
            # the first graph captured into a pool stays referenced while the pool is used.
            self._pool_anchors.setdefault(pool, graph)
        return graph

    def _launch_ms(self, unit: _Unit, reps: int = 3) -> float:
        """GPU milliseconds of one launch of ``unit`` (mean of ``reps``, after one untimed)."""
        torch = _torch()
        with torch.cuda.stream(self._stream):
            unit.launch()
            return cuda_ms_per_call(self._stream, unit.launch, reps)

    def _inner_for(self, per_call_ms: float) -> int:
        return int(min(2000, max(1, round(self.target_replay_ms / max(per_call_ms, 1e-4)))))

    def _prepare(self, fn: Callable[[], Any], pool=None, protocol: Protocol | None = None) -> _Unit:
        """Warm up eagerly (cuDNN picks algorithms), size ``inner``, capture the graph, warm it.

        The eager estimate of a call includes Python's launch cost, which for a
        microsecond kernel is most of it; so the graph's first replays re-measure the
        call and, if a replay is far shorter than ``target_replay_ms``, it is captured
        again with more calls.
        """
        torch = _torch()
        protocol = protocol or self.protocol
        with torch.no_grad():
            self._stream.wait_stream(torch.cuda.current_stream(self.device_index))
            with torch.cuda.stream(self._stream):
                for _ in range(max(2, protocol.warmup_runs)):
                    fn()
            per_call = max(self._estimate_ms(fn), 1e-4)
            unit = _Unit(fn, self._inner_for(per_call), per_call)
            if self.cuda_graphs:
                unit.graph = self._capture(fn, unit.inner, pool)
                for _ in range(2):
                    per_call = max(self._launch_ms(unit) / unit.inner, 1e-5)
                    unit.per_call_ms = per_call
                    want = self._inner_for(per_call)
                    if want <= 1.5 * unit.inner:
                        break
                    unit.graph = None  # release the short graph before capturing the long one
                    unit = _Unit(fn, want, per_call, self._capture(fn, want, pool))
            # replay warm-up: at least warmup_runs replays and warmup_ms of GPU time
            reps = max(protocol.warmup_runs, math.ceil(protocol.warmup_ms / max(unit.per_call_ms * unit.inner, 1e-3)))
            with torch.cuda.stream(self._stream):
                for _ in range(min(reps, 10_000)):
                    unit.launch()
            self._stream.synchronize()
        return unit

    @staticmethod
    def _n_samples(unit: _Unit, protocol: Protocol) -> int:
        """Samples that fill ``protocol.budget_ms`` of GPU time, within [min_reps, max_reps]."""
        replay_ms = max(unit.per_call_ms * unit.inner, 1e-3)
        return int(min(protocol.max_reps, max(protocol.min_reps, math.ceil(protocol.budget_ms / replay_ms))))

    def _sample_units(self, units: Sequence[_Unit], n: Sequence[int], seed: int = 0) -> list[list[float]]:
        """Interleaved sampling: rounds of one event-timed launch per unit, one sync per round."""
        torch = _torch()
        rng = random.Random(seed)
        samples: list[list[float]] = [[] for _ in units]
        order = list(range(len(units)))
        rounds = max(n) if n else 0
        with torch.no_grad():
            for r in range(rounds):
                rng.shuffle(order)
                pending = []
                with torch.cuda.stream(self._stream):
                    for i in order:
                        if r >= n[i]:
                            continue
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record(self._stream)
                        units[i].launch()
                        e.record(self._stream)
                        pending.append((i, s, e))
                self._stream.synchronize()
                for i, s, e in pending:
                    samples[i].append(s.elapsed_time(e) / units[i].inner)
        return samples

    def _runner(self, unit: _Unit) -> Callable[[], float]:
        """A call that launches ``unit`` once between events and returns ms per inner call."""
        torch = _torch()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            with torch.cuda.stream(self._stream):
                s.record(self._stream)
                unit.launch()
                e.record(self._stream)
            e.synchronize()
            return s.elapsed_time(e) / unit.inner

        run._unit = unit  # keeps graph and tensors alive as long as the call
        return run

    # -- the Profiler interface ----------------------------------------------------------------
    def _time_entry(self, spec: LayerSpec) -> Timing:
        fn, _ = entry_callable(spec, self._dev, self.dtype, self.channels_last, self.seed)
        unit = self._prepare(fn)
        run = self._runner(unit)
        n = self._n_samples(unit, self.protocol)
        samples = sample(run, replace(self.protocol, warmup_runs=0, warmup_ms=0.0, budget_ms=0.0, min_reps=n,
                                      max_reps=n))
        return Timing.from_samples(samples)

    def _measure_entries(self, specs: Sequence[LayerSpec], networks) -> Iterator[tuple[LayerSpec, Timing]]:
        torch = _torch()
        specs = list(specs)
        i = 0
        while i < len(specs):
            group, units, used = [], [], 0
            pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # graphs replay one at a time
            while i < len(specs) and len(group) < self.group_size:
                fn, nbytes = entry_callable(specs[i], self._dev, self.dtype, self.channels_last, self.seed)
                if group and used + nbytes > self.group_mib * 2**20:
                    del fn
                    break
                units.append(self._prepare(fn, pool))
                group.append(specs[i])
                used += nbytes
                i += 1
            n = [self._n_samples(u, self.protocol) for u in units]
            samples = self._sample_units(units, n, seed=self.seed + i)
            del units
            self._pool_anchors.pop(pool, None)  # the group's pool is not captured into again
            for spec, s in zip(group, samples):
                t = Timing.from_samples(s)
                if t.rel_iqr > self.protocol.max_rel_iqr:  # measure it again alone; keep the tighter
                    again = self.time_entry(spec)
                    t = again if again.rel_iqr < t.rel_iqr else replace(t, noisy=True)
                yield spec, t

    def write_model(self, net, path, *, batch: int = 1, input_size: int | None = None):
        """Save a materialized network (:class:`~hwslim.core.materialize.PlainNet`) at ``path`` with
        suffix ``.pt``: :meth:`time_onnx` runs the network itself, as PyTorch ops."""
        from pathlib import Path

        path = Path(path).with_suffix(".pt")
        _torch().save(net, path)
        return path

    def _network_runner(self, net, input_shape: Sequence[int]) -> Callable[[], float]:
        fn = network_callable(net, input_shape, self._dev, self.dtype, self.channels_last, self.seed)
        return self._runner(self._prepare(fn, pool=self._e2e_pool, protocol=self.e2e_protocol))

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        return self._network_runner(load_network(path), input_shape)

    def _probe_runner(self, specs: Sequence[LayerSpec], workdir: str) -> Callable[[], float]:
        s = specs[0]
        return self._network_runner(plain_net_from_specs(specs), (1, s.cin, s.in_h, s.in_w))

    def close(self) -> None:
        if self._closed:
            return
        torch = _torch()
        self._stream.synchronize()
        self._pool_anchors.clear()
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = self._saved
        self._closed = True


__all__ = ["TorchCudaProfiler", "entry_callable", "load_network", "network_callable", "torch_dtype"]
