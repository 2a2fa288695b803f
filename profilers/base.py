"""The one interface every latency backend implements, and the one result it returns.

A backend (ONNX Runtime on the CPU here; torch CUDA and TensorRT on GPUs) subclasses
:class:`Profiler` and implements a few ``_impl`` methods; the public methods wrap them
(Polygraphy's pattern) so every backend shares the measurement protocol:

* :meth:`Profiler.time_entry` times one table entry (a :class:`~hwslim.core.graph.LayerSpec`,
  i.e. the fused unit ``act(bn(conv(x)) [+ skip])``, a pool or the classifier) and
  re-measures it while its spread is too wide; what stays wide is flagged ``noisy``.
* :meth:`Profiler.measure_entries` times many entries. Its default loops
  :meth:`time_entry`; a backend that measures whole networks at once (TensorRT: one
  engine per designed config, per-layer times from ``IProfiler``) overrides
  :meth:`Profiler._measure_entries` instead and yields entries as they are attributed.
* :meth:`Profiler.time_onnx` times a whole ONNX model (or another file the backend
  runs, ``model_suffixes``) end to end with the same protocol; calibration and
  ``hwslim verify`` use it, with files :meth:`Profiler.write_model` writes.

* :meth:`Profiler.time_onnx_many` times several whole models in interleaved rounds.
* :meth:`Profiler.probe` times a fixed small network (:func:`probe_specs`): the
  machine-speed probe that tables record and ``hwslim verify`` repeats, so a change of
  the machine's speed between the table and the check is measured, not guessed
  (:mod:`hwslim.latency.conditions`).

A backend implements: ``is_available``, ``unavailable_reason``, ``machine_name``,
``_backend_metadata`` (``device_name``, ``backend_version``, plus e.g. driver, CUDA,
precision, clocks), ``_time_entry(spec) -> Timing`` (one attempt; use :func:`sample`),
``_onnx_runner(path, shape) -> () -> ms`` (whole models), optionally
``_measure_entries(specs, networks)`` with ``in_network = True``, and ``close``. Extra
settings are keyword arguments returned by ``settings()``; extra keys that make a
table invalid elsewhere go into ``identity_keys``.

Every timing is a :class:`Timing`: median, interquartile range, 90th percentile and the
number of samples, in milliseconds. Example::

    >>> from profilers import get_profiler
    >>> prof = get_profiler("cpu", threads=1)             # ONNX Runtime
    >>> t = prof.time_entry(spec)                          # doctest: +SKIP
    >>> t.median_ms, t.iqr_ms, t.n, t.noisy                # doctest: +SKIP
    (0.0412, 0.0007, 612, False)
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np

from hwslim.core.errors import HwslimError
from hwslim.core.graph import LayerSpec


class ProfilerError(HwslimError):
    """A backend that cannot run here (package or device missing) or a bad setting."""


@dataclass(frozen=True)
class Timing:
    """Summary of repeated measurements of one thing, in milliseconds."""

    median_ms: float
    iqr_ms: float
    p90_ms: float
    n: int
    noisy: bool = False
    # the reference's time adjacent to these samples (ms, :class:`ReferenceRunner`); None: not timed
    ref_ms: float | None = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], noisy: bool = False, center: str = "median",
                     ref_ms: float | None = None) -> "Timing":
        """Summarize samples; ``center="iqm"`` stores the interquartile mean as ``median_ms``.

        The interquartile mean (the mean of the samples between the quartiles) suits
        quantized samples: ONNX Runtime's profiler reports kernel times in whole
        microseconds, rounding each timestamp, so a layer of a few microseconds yields
        samples like 2, 2, 3, 2, 3 whose median is biased by up to half a microsecond
        while their mean is not (the rounding error is random from run to run). Summed
        over the many tiny layers of a narrow config, that bias made predictions ~10% low.
        """
        if len(samples_ms) == 0:
            raise ValueError("no samples")
        a = np.asarray(samples_ms, dtype=np.float64)
        q25, q50, q75, q90 = np.percentile(a, [25, 50, 75, 90])
        if center == "iqm":
            mid = a[(a >= q25) & (a <= q75)]
            q50 = float(mid.mean()) if mid.size else q50
        elif center != "median":
            raise ValueError(f"center must be 'median' or 'iqm', got {center!r}")
        return cls(float(q50), float(q75 - q25), float(q90), int(a.size), bool(noisy),
                   None if ref_ms is None else float(ref_ms))

    @property
    def rel_iqr(self) -> float:
        """IQR / median: the spread the protocol keeps below ``Protocol.max_rel_iqr``."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Protocol:
    """How one thing is timed; every backend follows it and tables record it.

    Warm up for at least ``warmup_runs`` runs and ``warmup_ms`` (first runs can be 1000x
    slower: allocation, weight prepacking, caches). Then sample until ``budget_ms`` is
    spent and at least ``min_reps`` samples exist (at most ``max_reps``). If the
    relative IQR exceeds ``max_rel_iqr``, measure again, up to ``retries`` more times,
    and keep the tightest attempt; if it is still too wide the timing is ``noisy``.
    """

    warmup_runs: int = 3
    warmup_ms: float = 5.0
    budget_ms: float = 40.0
    min_reps: int = 15
    max_reps: int = 2000
    max_rel_iqr: float = 0.10
    retries: int = 2

    @classmethod
    def quick(cls) -> "Protocol":
        """A short protocol for tests and smoke runs (numbers are less stable)."""
        return cls(warmup_runs=2, warmup_ms=1.0, budget_ms=3.0, min_reps=5, max_reps=200, retries=1)

    @classmethod
    def end_to_end(cls) -> "Protocol":
        """The protocol for whole models: more time per measurement (each run is long)."""
        return cls(warmup_runs=5, warmup_ms=50.0, budget_ms=400.0, min_reps=25, max_reps=2000,
                   max_rel_iqr=0.05, retries=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Protocol":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def sample(run: Callable[[], float], protocol: Protocol) -> list[float]:
    """Warm up, then collect samples of ``run()`` (which returns one sample in ms).

    The helper every backend uses for the loop itself; the sample's clock is the
    backend's business (thread CPU time, CUDA events...).
    """
    start = time.perf_counter()
    for i in range(10**9):
        run()
        if i + 1 >= protocol.warmup_runs and (time.perf_counter() - start) * 1e3 >= protocol.warmup_ms:
            break
    samples: list[float] = []
    deadline = time.perf_counter() + protocol.budget_ms / 1e3
    while len(samples) < protocol.max_reps and (len(samples) < protocol.min_reps or time.perf_counter() < deadline):
        samples.append(run())
    return samples


# Interleaved rounds of whole-model timing (time_onnx_many): a model's samples come from this many
# separate moments, so one slow spell of a shared machine (a fraction of a second to seconds)
# moves few of them. About the same time per model as 4 longer turns (slow models, whose turn is
# the minimum sample count, take a third more: 3 samples x 12 rounds instead of 7 x 4).
E2E_ROUNDS = 12


# The machine-speed probe: a fixed small network, timed with the profiler's own settings.
PROBE_SIZE, PROBE_CHANNELS = 56, 32


def probe_specs() -> list[LayerSpec]:
    """The probe network: an inverted residual block (32 -> 96 -> 32 channels, depthwise
    3x3 in the middle) and a dense 3x3 conv, at 56x56. It runs the kernels the tables
    hold (dense and depthwise convs, fused activations), in about 1 ms on one core of
    the development machine: long enough to dwarf the per-run overhead, short enough for
    hundreds of samples in a quarter of a second. Its 1.2 MB activations overflow a
    1 MB L2 cache, so it also feels contention for the shared cache and memory, as the
    larger models do: a memory-bound neighbor process slowed it by 4-15% there, where a
    28x28 version (in L2) moved by less than 1%.
    """
    from hwslim.core.graph import layer_spec
    from hwslim.core.ops import Conv

    c, size = PROBE_CHANNELS, PROBE_SIZE
    return [layer_spec("probe/expand", Conv(1, act="relu6"), c, size, out=3 * c, inputs=["x"]),
            layer_spec("probe/dw", Conv(3, 1, 1, group_width=1, act="relu6"), 3 * c, size, inputs=["probe/expand"]),
            layer_spec("probe/project", Conv(1), 3 * c, size, out=c, inputs=["probe/dw"]),
            layer_spec("probe/conv", Conv(3, 1, 1, act="relu"), c, size, out=c, inputs=["probe/project"])]


# The reference: timed between the timed runs of a table, a check or a benchmark (duet measurement).
# Each reference is sampled this many times per timing (after one discarded run: the network timed
# before it has evicted its weights from the caches); the median is the reference's time.
REFERENCE_RUNS = 5
# timed entries (alone) or whole-model turns (InterleavedRuns) between two timings of the reference
REFERENCE_EVERY = 4


def reference_specs() -> dict[str, list[LayerSpec]]:
    """The reference networks: the probe network (:func:`probe_specs`) cut in its two kinds of work.

    * ``dense``: the probe's dense 3x3 conv (32 -> 32 channels at 56x56, ReLU): compute-bound,
      the kind of layer that dominates ResNets;
    * ``dwpw``: the probe's inverted residual block (1x1 expand to 96, depthwise 3x3, 1x1
      project): the depthwise part is memory-bound, as in MobileNets.

    Two, because one shape does not follow every layer: on a shared 2-core Xeon (issue 34) a
    slow spell moved MobileNetV2 (depthwise-heavy) in step with the probe within +-2.5%, but
    ResNet-18 (dense) by up to 5.5% more. A time is normalized by the *sum* of the two (about
    the probe's time, 0.5 ms each on one core of the development machine), not weighted per
    layer class: one number per timing keeps tables and checks simple, and where the two
    disagree by more than :data:`hwslim.latency.conditions.REFERENCE_DISAGREEMENT` a
    verdict is not corrected but called unreliable. Both at 56x56, so their 1.2 MB of
    activations overflow a 1 MB L2 cache and feel contention for it, as the models do.
    """
    from hwslim.core.graph import layer_spec
    from hwslim.core.ops import Conv

    c, size = PROBE_CHANNELS, PROBE_SIZE
    dwpw = [layer_spec("ref/expand", Conv(1, act="relu6"), c, size, out=3 * c, inputs=["x"]),
            layer_spec("ref/dw", Conv(3, 1, 1, group_width=1, act="relu6"), 3 * c, size, inputs=["ref/expand"]),
            layer_spec("ref/project", Conv(1), 3 * c, size, out=c, inputs=["ref/dw"])]
    dense = [layer_spec("ref/conv", Conv(3, 1, 1, act="relu"), c, size, out=c, inputs=["x"])]
    return {"dense": dense, "dwpw": dwpw}


REFERENCE_DESCRIPTION = ("dense: 3x3 conv 32->32 ch at 56x56 + relu; dwpw: 1x1 32->96 + relu6, depthwise 3x3, "
                         f"1x1 96->32, at 56x56; each the median of {REFERENCE_RUNS} runs, time = their sum")


@dataclass(frozen=True)
class ReferenceTime:
    """One timing of the reference networks: ms of each (``parts``, by name) and their sum."""

    parts: tuple[tuple[str, float], ...]

    @property
    def ms(self) -> float:
        return float(sum(v for _, v in self.parts))

    def as_dict(self) -> dict[str, float]:
        return dict(self.parts)


class ReferenceRunner:
    """The reference networks (:func:`reference_specs`) loaded with a profiler's backend, threads
    and clock (its :meth:`Profiler._probe_runner`, as the probe), warmed up, ready to be timed
    between timed runs: :meth:`time` takes 2 x 6 runs (about 6 ms on the development machine)."""

    def __init__(self, profiler: "Profiler") -> None:
        import os
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="hwslim-reference-")
        self.runners: dict[str, Callable[[], float]] = {}
        for name, specs in reference_specs().items():
            os.makedirs(f"{self._dir.name}/{name}")
            self.runners[name] = profiler._probe_runner(specs, f"{self._dir.name}/{name}")
        warm = profiler.probe_protocol()
        for run in self.runners.values():
            sample(run, replace(warm, budget_ms=0.0, min_reps=0, max_reps=0))  # warm-up only

    def time(self) -> ReferenceTime:
        """Each reference's median of :data:`REFERENCE_RUNS` runs, after one discarded run."""
        parts = []
        for name, run in self.runners.items():
            run()
            parts.append((name, float(np.median([run() for _ in range(REFERENCE_RUNS)]))))
        return ReferenceTime(tuple(parts))

    def level(self, budget_ms: float = 250.0) -> ReferenceTime:
        """The reference's level now: timings repeated for ``budget_ms``, each part's median."""
        seen: list[ReferenceTime] = []
        deadline = time.perf_counter() + budget_ms / 1e3
        while len(seen) < 5 or time.perf_counter() < deadline:
            seen.append(self.time())
        return ReferenceTime(tuple((name, float(np.median([dict(t.parts)[name] for t in seen])))
                                   for name in self.runners))

    def close(self) -> None:
        self.runners.clear()  # loaded networks first, then their files
        self._dir.cleanup()


def normalized(samples_ms: Sequence[float], level_ms: float | None, before: float | None,
               after: float | None) -> tuple[list[float], float | None]:
    """``samples_ms`` brought to the reference level ``level_ms``: scaled by ``level_ms / adjacent``,
    where ``adjacent`` is the mean of the reference times just ``before`` and ``after`` them;
    and that adjacent time. Unchanged (and None) where there is no level or no reference time."""
    times = [t for t in (before, after) if t is not None]
    if level_ms is None or not times:
        return list(samples_ms), None
    adjacent = sum(times) / len(times)
    return [x * level_ms / adjacent for x in samples_ms], adjacent


def cuda_ms_per_call(stream, call: Callable[[], Any], n: int, events=None) -> float:
    """GPU milliseconds per call of ``call``: ``n`` calls between two CUDA events recorded on
    ``stream`` (the GPU backends' one timing loop; ``events``: a (start, end) pair to reuse)."""
    import torch

    start, end = events or (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    start.record(stream)
    for _ in range(n):
        call()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / n


def plain_net_from_specs(specs: Sequence[LayerSpec], seed: int = 0):
    """A :class:`~hwslim.core.materialize.PlainNet` computing ``specs`` with random weights (BN folded).

    The same module tree ``materialize(..., fold_bn=True)`` produces, so ``export_onnx``
    writes the same graph (and the same node names) as for a real materialized config.
    """
    import torch

    from hwslim.core.materialize import PlainNet, plain_layers

    torch.manual_seed(seed)
    layers = plain_layers(specs)
    folded = []
    for s in specs:  # BN folded, as materialize(..., fold_bn=True) leaves it
        op, m = s.op.folded(s, layers[s.name].eval() if s.name in layers else None)
        if m is not None:
            layers[s.name] = m
        folded.append(replace(s, op=op))
    return PlainNet(folded, layers).eval()


class Profiler:
    """Base class of latency backends. Subclasses set ``backend``/``device`` and the ``_impl``s.

    Settings are keyword arguments (``threads``, ``dtype``, ``protocol`` and any a
    backend adds); :meth:`settings` returns them and :func:`profilers.profiler_for_table` rebuilds a
    profiler from a table's metadata, so a table can be extended or checked with the
    setup that measured it.
    """

    backend: ClassVar[str] = ""
    device: ClassVar[str] = ""
    missing: ClassVar[str] = "its package or device is missing"  # what unavailable_reason says
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    # True: the backend times entries inside whole networks when given some (see measure_entries)
    in_network: ClassVar[bool] = False
    # designed networks each entry is timed in, by default (in-network backends; `--contexts`)
    default_contexts: ClassVar[int] = 2
    # model files time_onnx reads (verify measures an exported artifact itself when listed here)
    model_suffixes: ClassVar[tuple[str, ...]] = (".onnx",)
    # called as on_network(done, total) after each designed network _pool_networks ran (or
    # skipped): hwslim profile spreads its calibration rounds by it
    on_network: Callable[[int, int], None] | None = None
    # the reference level times are brought to (use_reference); None: raw times
    reference_level_ms: float | None = None
    _reference: "ReferenceRunner | None" = None
    _no_reference: bool = False
    # metadata keys that must match for a table to be valid on this setup
    identity_keys: ClassVar[tuple[str, ...]] = ("device", "device_name", "backend", "backend_version",
                                                "threads", "dtype")

    def __init__(self, *, threads: int | None = None, dtype: str | None = None,
                 protocol: Protocol | Mapping[str, Any] | None = None,
                 e2e_protocol: Protocol | Mapping[str, Any] | None = None) -> None:
        self.threads = 1 if threads is None else int(threads)
        if self.threads < 1:
            raise ProfilerError(f"threads must be >= 1, got {self.threads}")
        self.dtype = dtype or "float32"
        if self.dtype not in self.dtypes:
            raise ProfilerError(f"backend {self.backend!r} measures {', '.join(self.dtypes)}, not {self.dtype!r}")
        self.protocol = protocol if isinstance(protocol, Protocol) else Protocol.from_dict(protocol)
        self.e2e_protocol = (e2e_protocol if isinstance(e2e_protocol, Protocol)
                             else Protocol.from_dict(e2e_protocol) if e2e_protocol else Protocol.end_to_end())

    # -- what a backend provides ---------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        """True when the backend's package and device are present (cheap; no timing)."""
        return False

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why :meth:`is_available` is False, in a few words a user can act on (:attr:`missing`)."""
        return cls.missing

    @classmethod
    def machine_name(cls) -> str:
        """The measured device's name (CPU model, GPU name): part of table paths and checks."""
        raise NotImplementedError

    def _backend_metadata(self) -> dict[str, Any]:
        """``device_name``, ``backend_version`` and anything else that identifies the setup."""
        raise NotImplementedError

    def _time_entry(self, spec: LayerSpec) -> Timing:
        """One measurement attempt of one entry, following ``self.protocol``."""
        raise NotImplementedError

    def _measure_entries(self, specs: Sequence[LayerSpec],
                         networks: Iterable[Sequence[LayerSpec]] | None) -> Iterator[tuple[LayerSpec, Timing]]:
        """Many entries; override to measure several at once. Yield each as soon as it is known.

        ``networks`` (only passed when the backend sets ``in_network``) are whole networks,
        as the layer specs of one config each, that together contain every entry: a
        backend may time entries inside them. The default times each entry alone
        (:meth:`_entries_alone`).
        """
        yield from self._entries_alone(specs)

    def _entries_alone(self, specs: Iterable[LayerSpec]) -> Iterator[tuple[LayerSpec, Timing]]:
        """Each entry timed alone (:meth:`time_entry`); with a reference level set
        (:meth:`use_reference`), the reference is timed between every :data:`REFERENCE_EVERY`
        entries and each entry's times are brought to the level by the mean of the reference
        times before and after its group."""
        specs = list(specs)
        before = self._reference_ms()
        for k in range(0, len(specs), REFERENCE_EVERY):
            group = [(spec, self.time_entry(spec)) for spec in specs[k:k + REFERENCE_EVERY]]
            after = self._reference_ms()
            for spec, t in group:
                (med, iqr, p90), ref = normalized([t.median_ms, t.iqr_ms, t.p90_ms], self.reference_level_ms,
                                                  before, after)
                yield spec, replace(t, median_ms=med, iqr_ms=iqr, p90_ms=p90, ref_ms=ref)
            before = after

    def _pool_networks(self, specs: Sequence[LayerSpec], networks: Iterable[Sequence[LayerSpec]],
                       profile: Callable[[list[LayerSpec]], tuple[Mapping[str, list[float]], set[str]]]
                       ) -> Iterator[tuple[LayerSpec, list[float], bool, float | None]]:
        """The schedule in-network backends share: run each designed network once with
        ``profile`` (per-layer samples, plus names whose time was estimated), pool an
        entry's samples over every network containing it, and yield ``(spec, samples,
        estimated, ref_ms)`` as soon as the last such network has run. Networks holding no
        entry still pending are skipped. With a reference level set (:meth:`use_reference`),
        the reference is timed between the networks and each network's samples are brought
        to the level by the mean of the reference times just before and after it
        (:func:`normalized`); ``ref_ms`` is the mean of those adjacent times (else None)."""
        wanted = {s.signature() for s in specs}
        networks = [list(n) for n in networks]
        last: dict[tuple, int] = {}  # an entry is final after the last network containing it
        for i, net_specs in enumerate(networks):
            for s in net_specs:
                if s.signature() in wanted:
                    last[s.signature()] = i
        pooled: dict[tuple, list[float]] = {}
        refs: dict[tuple, list[float]] = {}
        estimated: set[tuple] = set()
        before = self._reference_ms()
        for i, net_specs in enumerate(networks):
            if self.on_network is not None and i:
                self.on_network(i, len(networks))
            if not any(last.get(s.signature(), -1) >= i for s in net_specs):
                continue
            samples, flagged = profile(net_specs)
            after = self._reference_ms()
            for spec in net_specs:
                sig = spec.signature()
                if sig in last and samples.get(spec.name):
                    scaled, ref = normalized(samples[spec.name], self.reference_level_ms, before, after)
                    pooled.setdefault(sig, []).extend(scaled)
                    if ref is not None:
                        refs.setdefault(sig, []).append(ref)
                    if spec.name in flagged:
                        estimated.add(sig)
            before = after
            for spec in net_specs:
                sig = spec.signature()
                if last.get(sig) == i and sig in pooled:
                    del last[sig]
                    adjacent = refs.pop(sig, None)
                    yield spec, pooled.pop(sig), sig in estimated, float(np.mean(adjacent)) if adjacent else None

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        """Load an ONNX model, bind its input once; return a call that runs it once and returns ms."""
        raise NotImplementedError

    def write_model(self, net, path, *, batch: int = 1, input_size: int | None = None):
        """Write a materialized network (:class:`~hwslim.core.materialize.PlainNet`) as the file
        :meth:`time_onnx` runs, at ``path`` with this backend's suffix; return its path.
        ONNX by default; a backend that does not run ONNX (ExecuTorch: ``.pte``) overrides it."""
        from pathlib import Path

        from hwslim.runtimes.onnx_file import export_onnx

        return export_onnx(net, Path(path).with_suffix(".onnx"), batch=batch, input_size=input_size)

    def _time_onnx(self, path: str, input_shape: tuple[int, ...]) -> Timing:
        """One end-to-end measurement attempt of an ONNX model, following ``self.e2e_protocol``."""
        return Timing.from_samples(sample(self._onnx_runner(path, input_shape), self.e2e_protocol))

    def close(self) -> None:
        """Release sessions, engines, streams. The profiler is unusable afterwards."""

    # -- public API ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The backend's name (``"ort"``), for messages."""
        return self.backend

    def settings(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this profiler (see :func:`profilers.profiler_for_table`)."""
        return {"threads": self.threads, "dtype": self.dtype, "protocol": asdict(self.protocol),
                "e2e_protocol": asdict(self.e2e_protocol)}

    def metadata(self) -> dict[str, Any]:
        """Everything a table must record about who measured it (JSON-serializable)."""
        meta = {"device": self.device, "backend": self.backend, "threads": self.threads, "dtype": self.dtype}
        meta.update(self._backend_metadata())
        meta["settings"] = self.settings()
        meta["measured_at"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return meta

    def mismatches(self, meta: Mapping[str, Any]) -> list[str]:
        """Human-readable differences between a table's metadata and this setup."""
        mine = self.metadata()
        chosen = set(self.settings())  # keys this profiler was set up with, not properties of the machine
        out = []
        for key in self.identity_keys:
            if key in meta and key in mine and meta[key] != mine[key]:
                if key in chosen:
                    out.append(f"table measured with {key}={meta[key]!r}, this profiler is set to "
                               f"{key}={mine[key]!r}")
                else:
                    out.append(f"{key} {meta[key]!r} (here: {mine[key]!r})")
        return out

    def time_entry(self, spec: LayerSpec) -> Timing:
        """Time one entry; re-measure while its spread is too wide, flag it if it stays wide."""
        return self._with_retries(lambda: self._time_entry(spec), self.protocol)

    def measure_entries(self, specs: Iterable[LayerSpec], networks: Iterable[Sequence[LayerSpec]] | None = None
                        ) -> Iterator[tuple[LayerSpec, Timing]]:
        """Time many entries, yielding ``(spec, timing)`` as each one is done.

        Callers persist each pair as it arrives (that is what makes profiling
        resumable), so a backend must yield as early as it can. ``networks``: see
        :meth:`_measure_entries`; every entry is yielded exactly once either way.
        """
        specs = list(specs)
        done = set()
        for spec, timing in self._measure_entries(specs, networks if self.in_network else None):
            if spec.signature() not in done:
                done.add(spec.signature())
                yield spec, timing
        rest = [s for s in specs if s.signature() not in done]  # whatever the networks did not contain
        for spec, timing in self._entries_alone({s.signature(): s for s in rest}.values()):
            yield spec, timing

    def time_onnx(self, path, input_shape: Sequence[int]) -> Timing:
        """Time a whole ONNX model end to end (the input is bound once, random data)."""
        return self._with_retries(lambda: self._time_onnx(str(path), tuple(int(d) for d in input_shape)),
                                  self.e2e_protocol)

    def probe_protocol(self) -> Protocol:
        """How :meth:`probe` samples: a quarter of a second after a short warm-up, whatever the
        table's protocol (a shorter probe of a busy machine wandered by 6%)."""
        return Protocol(warmup_runs=10, warmup_ms=30.0, budget_ms=250.0, min_reps=30, max_reps=100_000, retries=0)

    def probe(self, between: Callable[[], None] | None = None) -> Timing | None:
        """Time the machine-speed probe (:func:`probe_specs`) end to end with this profiler's
        backend, threads and clock, in the backend's own model format (:meth:`_probe_runner`);
        None where the backend cannot run it.

        ``between()`` is called about every 10 ms between two runs (outside the timed
        region): :func:`hwslim.latency.conditions.measure_conditions` counts the machine's other
        running threads there, while the probe runs.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hwslim-probe-") as d:
            try:
                run = self._probe_runner(probe_specs(), d)
            except NotImplementedError:
                return None
            p = self.probe_protocol()
            sample(run, replace(p, budget_ms=0.0, min_reps=0, max_reps=0))  # warm-up only
            samples: list[float] = []
            start = last = time.perf_counter()
            while len(samples) < p.max_reps and (len(samples) < p.min_reps
                                                 or time.perf_counter() - start < p.budget_ms / 1e3):
                samples.append(run())
                if between is not None and time.perf_counter() - last >= 0.01:
                    between()
                    last = time.perf_counter()
        return Timing.from_samples(samples)

    def _probe_runner(self, specs: Sequence[LayerSpec], workdir: str) -> Callable[[], float]:
        """A timed call of the probe network (``specs``), in the backend's own model format: the
        ONNX model by default (a backend that runs another format overrides this)."""
        from hwslim.core.onnx_build import network_model

        path = f"{workdir}/probe.onnx"
        with open(path, "wb") as f:
            f.write(network_model(specs).SerializeToString())
        return self._onnx_runner(path, (1, specs[0].cin, specs[0].in_h, specs[0].in_w))

    def reference_runner(self) -> "ReferenceRunner | None":
        """The reference networks (:func:`reference_specs`) loaded with this profiler's backend,
        threads and clock, once per profiler; None where the backend cannot run them (as :meth:`probe`)."""
        if self._reference is None and not self._no_reference:
            try:
                self._reference = ReferenceRunner(self)
            except NotImplementedError:
                self._no_reference = True
        return self._reference

    def measure_reference(self) -> ReferenceTime | None:
        """The reference's level now (:meth:`ReferenceRunner.level`: a quarter of a second); None
        where the backend cannot run it. A table records it and measures in its units."""
        runner = self.reference_runner()
        return None if runner is None else runner.level()

    def use_reference(self, level_ms: float | None) -> None:
        """From now on, bring the times measured for a table (entries alone or in networks,
        :class:`InterleavedRuns`) to the reference level ``level_ms`` (the reference's ms at the
        table's level): each time is scaled by ``level_ms / adjacent reference time``, so a
        change of the machine's speed while a table is measured cancels out. None: raw times."""
        self.reference_level_ms = None if level_ms is None else float(level_ms)

    def _reference_ms(self) -> float | None:
        """The reference timed now (ms); None without a level (:meth:`use_reference`) or a reference."""
        if self.reference_level_ms is None:
            return None
        runner = self.reference_runner()
        return None if runner is None else runner.time().ms

    def time_onnx_many(self, models: Sequence[tuple[Any, Sequence[int]]], rounds: int = E2E_ROUNDS,
                       seed: int = 0, on_progress: Callable[[int, int], None] | None = None) -> list[Timing]:
        """Time several ONNX models ``[(path, input_shape), ...]`` interleaved.

        All models are loaded and warmed up, then sampled in ``rounds`` rounds back to back
        (:class:`InterleavedRuns`). A slow spell of a shared machine then hits every model
        alike instead of whichever was being timed: comparisons between the models (a
        calibration fit, a rank correlation) stay fair. ``on_progress(done, total)`` is
        called after each warm-up and each model's turn in a round (``total = models *
        (rounds + 1)``), for a progress bar.
        """
        runs = InterleavedRuns(self, models, rounds=rounds, seed=seed)
        total = len(runs.runners) * (rounds + 1)
        turn = None if on_progress is None else (lambda done: on_progress(done, total))
        runs.warm_up(turn)
        while runs.rounds_left:
            runs.round(turn)
        return runs.timings()

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared protocol -----------------------------------------------------------------
    @staticmethod
    def _with_retries(attempt: Callable[[], Timing], protocol: Protocol) -> Timing:
        best = attempt()
        for _ in range(protocol.retries):
            if best.rel_iqr <= protocol.max_rel_iqr:
                break
            again = attempt()
            # the tightest attempt is the one least disturbed by other work on the machine
            if again.rel_iqr < best.rel_iqr:
                best = again
        return replace(best, noisy=best.rel_iqr > protocol.max_rel_iqr)


class InterleavedRuns:
    """Whole models timed in interleaved rounds, which a caller may spread out in time.

    All models are loaded (``Profiler._onnx_runner``) and, on :meth:`warm_up`, warmed up;
    each :meth:`round` then samples every model in a fresh random order, with
    ``e2e_protocol.budget_ms / rounds`` (and ``min_reps / rounds`` samples, after one
    discarded run) per model. :meth:`Profiler.time_onnx_many` runs the rounds back to
    back; ``hwslim profile`` runs its calibration rounds spread over the time it
    measures the entries, so the fit compares whole models and layers timed over the
    same stretch of the machine's time (a slow spell while the entries were measured,
    or while the whole models were, no longer scales the whole table).

    With a reference level set on the profiler (:meth:`Profiler.use_reference`) the
    reference networks join the rounds: they are timed before each round and after every
    :data:`REFERENCE_EVERY` models' turns, and each turn's samples are brought to the level
    by the mean of the reference times around it (:meth:`timings`; :meth:`raw_timings` keeps
    the times as measured, :meth:`reference_ms` the reference's median time meanwhile).
    """

    def __init__(self, profiler: "Profiler", models: Sequence[tuple[Any, Sequence[int]]], rounds: int = E2E_ROUNDS,
                 seed: int = 0) -> None:
        import random

        p = profiler.e2e_protocol
        self.protocol = p
        self.rounds = int(rounds)
        self.runners = [profiler._onnx_runner(str(path), tuple(int(d) for d in shape)) for path, shape in models]
        self.per_round = replace(p, warmup_runs=0, warmup_ms=0.0, budget_ms=p.budget_ms / self.rounds,
                                 min_reps=max(1, -(-p.min_reps // self.rounds)), max_reps=max(1, p.max_reps // self.rounds))
        self.samples: list[list[float]] = [[] for _ in self.runners]
        self.scaled: list[list[float]] = [[] for _ in self.runners]  # brought to the reference level
        self.refs: list[list[float]] = [[] for _ in self.runners]  # adjacent reference time of each turn
        self.reference_times: list[ReferenceTime] = []
        self.level_ms = profiler.reference_level_ms
        self._reference = profiler.reference_runner() if self.level_ms is not None else None
        self.rounds_done = 0
        self._turns = 0
        self._order = list(range(len(self.runners)))
        self._rng = random.Random(seed)

    @property
    def rounds_left(self) -> int:
        return self.rounds - self.rounds_done

    def _turn(self, on_turn: Callable[[int], None] | None) -> None:
        self._turns += 1
        if on_turn is not None:
            on_turn(self._turns)

    def _reference_ms(self) -> float | None:
        if self._reference is None:
            return None
        self.reference_times.append(self._reference.time())
        return self.reference_times[-1].ms

    def warm_up(self, on_turn: Callable[[int], None] | None = None) -> None:
        for run in self.runners:
            sample(run, replace(self.protocol, budget_ms=0.0, min_reps=0, max_reps=0))  # warm-up only
            self._turn(on_turn)

    def round(self, on_turn: Callable[[int], None] | None = None) -> None:
        """One turn of every model, in a fresh random order (``on_turn(turns so far)`` after each)."""
        self._rng.shuffle(self._order)
        before = self._reference_ms()
        for k in range(0, len(self._order), REFERENCE_EVERY):
            group = []
            for i in self._order[k:k + REFERENCE_EVERY]:
                group.append((i, sample(self.runners[i], self.per_round)))
                self._turn(on_turn)
            after = self._reference_ms()
            for i, got in group:
                self.samples[i] += got
                scaled, ref = normalized(got, self.level_ms, before, after)
                self.scaled[i] += scaled
                if ref is not None:
                    self.refs[i].append(ref)
            before = after
        self.rounds_done += 1

    def _summary(self, samples: Sequence[float], ref_ms: float | None = None) -> Timing:
        t = Timing.from_samples(samples, ref_ms=ref_ms)
        return replace(t, noisy=t.rel_iqr > self.protocol.max_rel_iqr)

    def timings(self) -> list[Timing]:
        """Each model's Timing, at the reference level where one is set (its ``ref_ms``: the mean
        adjacent reference time), else as measured."""
        return [self._summary(s, float(np.mean(r)) if r else None) for s, r in zip(self.scaled, self.refs)]

    def raw_timings(self) -> list[Timing]:
        """Each model's Timing as measured (not brought to the reference level)."""
        return [self._summary(s) for s in self.samples]

    def reference_ms(self) -> ReferenceTime | None:
        """The reference's median time (each part's) over the rounds; None where it was not timed."""
        if not self.reference_times:
            return None
        names = [n for n, _ in self.reference_times[0].parts]
        return ReferenceTime(tuple((n, float(np.median([t.as_dict()[n] for t in self.reference_times])))
                                   for n in names))


__all__ = ["REFERENCE_DESCRIPTION", "InterleavedRuns", "Profiler", "ProfilerError", "Protocol", "ReferenceRunner",
           "ReferenceTime", "Timing", "normalized", "plain_net_from_specs", "probe_specs", "reference_specs", "sample"]
