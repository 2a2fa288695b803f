"""What the CPU backends (``ort``, ``openvino``, ``executorch``) share: :class:`CpuProfiler`.

They measure one CPU with an explicit thread count, time whole models with the same clock
(:func:`cpu_clock`), name the machine by its CPU model, time entries inside designed
networks by default (``network_runs`` runs of each, :func:`network_runs_for`), and keep
their temporary files in one directory per profiler. A CPU backend subclasses
:class:`CpuProfiler`, names its package (``package``, ``missing``), and adds its version
(:meth:`CpuProfiler.backend_version`), its own metadata (:meth:`CpuProfiler._setup_metadata`)
and ``profile_network(specs) -> {layer: [ms, ...]}``.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable, ClassVar, Sequence

from hwslim.core.machine import cpu_model
from profilers.base import Profiler, ProfilerError, Timing

CLOCKS = ("thread_cpu", "wall")


def cpu_clock(clock: str | None, threads: int) -> str:
    """The clock a CPU backend times with: ``thread_cpu`` for one thread (immune to the
    process being descheduled), else ``wall``; an impossible choice is refused."""
    clock = clock or ("thread_cpu" if threads == 1 else "wall")
    if clock not in CLOCKS:
        raise ProfilerError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "thread_cpu" and threads != 1:
        raise ProfilerError("clock 'thread_cpu' measures one thread; use clock='wall' with threads > 1")
    return clock


def network_runs_for(protocol, network_runs: int | None) -> int:
    """Runs of each designed network (every entry in it gets one sample per run): with the full
    protocol 12, or more where the protocol asks for more samples than 4 networks of 12 give
    (x 4 networks per entry = 48 samples from 4 separate moments of the machine)."""
    if network_runs:
        return int(network_runs)
    return max(12, -(-protocol.min_reps // 4)) if protocol.min_reps >= 15 else max(protocol.min_reps, 1)


class CpuProfiler(Profiler):
    """Base class of the CPU backends: threads, clock, in-network schedule, CPU identity."""

    device: ClassVar[str] = "cpu"
    identity_keys: ClassVar[tuple[str, ...]] = Profiler.identity_keys + ("clock",)
    package: ClassVar[str] = ""  # the package is_available looks for (``missing`` says how to install it)
    # how an entry's per-run samples inside networks are summarized (Timing.from_samples)
    layer_center: ClassVar[str] = "median"

    def __init__(self, *, threads: int | None = None, dtype: str | None = None, protocol=None, e2e_protocol=None,
                 clock: str | None = None, in_network: bool = True, network_runs: int | None = None) -> None:
        super().__init__(threads=threads, dtype=dtype, protocol=protocol, e2e_protocol=e2e_protocol)
        self.clock = cpu_clock(clock, self.threads)
        self.in_network = bool(in_network)
        self.network_runs = network_runs_for(self.protocol, network_runs)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"hwslim-{self.backend}-")

    # -- identity --------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.package) is not None

    @classmethod
    def machine_name(cls) -> str:
        return cpu_model()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "clock": self.clock, "in_network": self.in_network,
                "network_runs": self.network_runs}

    def backend_version(self) -> str:
        """The measuring package's version (``backend_version`` in table metadata)."""
        raise NotImplementedError

    def _setup_metadata(self) -> dict[str, Any]:
        """Metadata this backend adds to what every CPU table records."""
        return {}

    def _backend_metadata(self) -> dict[str, Any]:
        return {"device_name": cpu_model(), "cpu_count": os.cpu_count(), "backend_version": self.backend_version(),
                "clock": self.clock, **self._setup_metadata()}

    # -- timing ----------------------------------------------------------------------------
    def _entry(self, build: Callable[[], Any], spec, errors: tuple[type[BaseException], ...] = (NotImplementedError,)):
        """``build()``: the program that times entry ``spec``; one line naming the entry where this
        backend cannot express it (``errors``)."""
        try:
            return build()
        except errors as e:
            raise ProfilerError(f"backend {self.backend!r} cannot time {spec.name!r}: {e}") from None

    def _timed(self, run: Callable[[], Any]) -> Callable[[], float]:
        """``run`` as a call returning its time in ms on the profiler's clock."""
        clock = time.thread_time_ns if self.clock == "thread_cpu" else time.perf_counter_ns

        def timed() -> float:
            t0 = clock()
            run()
            return (clock() - t0) * 1e-6

        return timed

    # -- entries inside whole networks ------------------------------------------------------
    def profile_network(self, specs: Sequence) -> dict[str, list[float]]:
        """Per-layer times (ms) of one whole designed network: the backend's own profiler."""
        raise NotImplementedError

    def _network_timing(self, samples: list[float]) -> Timing:
        """An entry's Timing from its samples pooled over networks (0 ms: a layer with nothing
        of its own to run, never noisy)."""
        t = Timing.from_samples(samples, center=self.layer_center)
        return replace(t, noisy=t.median_ms > 0 and t.rel_iqr > self.protocol.max_rel_iqr)

    def _measure_entries(self, specs, networks):
        if networks is None:
            yield from self._entries_alone(specs)
            return
        for spec, samples, _, ref in self._pool_networks(specs, networks, lambda n: (self.profile_network(n), set())):
            yield spec, replace(self._network_timing(samples), ref_ms=ref)

    def close(self) -> None:
        self._tmp.cleanup()


__all__ = ["CLOCKS", "CpuProfiler", "cpu_clock", "network_runs_for"]
