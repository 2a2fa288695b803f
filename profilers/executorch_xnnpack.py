"""ExecuTorch with the XNNPACK delegate on the CPU (the mobile CPU path): the ``executorch`` backend.

Programs are lowered from ``torch.export`` with ``XnnpackPartitioner``
(:mod:`hwslim.executorch_build`) and run through ``executorch.runtime``; XNNPACK computes
on ExecuTorch's process-wide thread pool, sized to ``threads`` (default 1) before every
measurement.

**Layers are timed alone** (``method="isolated"``; the table's ``layer_times`` says so):
each entry is its own one-layer program (BatchNorm folded, random weights) timed end to
end. ExecuTorch's ETDump does report per-operator XNNPACK events inside a whole network,
but they name XNNPACK operators (``"Convolution (NHWC, F32) IGEMM #2"``) and carry no
debug handle back to the exported graph (checked with executorch 1.5.1), so they cannot
be charged to layers reliably. Calibration against whole networks absorbs what timing
alone misses.

**Whole models** are ``.pte`` programs: :meth:`write_model` lowers the materialized
network, and :meth:`time_onnx` (the shared end-to-end entry point) times a ``.pte``.

**Clock.** With one thread XNNPACK computes on the calling thread (pthreadpool runs a
one-thread pool inline), so samples are the calling thread's CPU time, as for ONNX
Runtime; with more threads, wall-clock.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from hwslim.graph import LayerSpec
from profilers.base import Profiler, ProfilerError, Timing, sample
from profilers.ort import cpu_clock, cpu_model

INSTALL = "pip install 'hwslim[executorch]'"


class _Entry(nn.Module):
    """One layer as the deployed network runs it: the op's plain module, BatchNorm folded."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        op, module = spec.op.folded(spec, spec.op.plain(spec, None))
        self.spec = replace(spec, op=op)
        self.module = module

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.spec.op.run_plain(self.module, list(xs), self.spec, False, False)


class _Network(nn.Module):
    """Layers given as specs, run in order, each reading the tensors its spec names (the
    first spec's first input is the network's input): the probe as a PyTorch module."""

    def __init__(self, specs) -> None:
        super().__init__()
        self.specs = list(specs)
        self.entries = nn.ModuleList(_Entry(s) for s in self.specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.specs[0].inputs[0]: x}
        for spec, entry in zip(self.specs, self.entries):
            env[spec.name] = entry(*(env[t] for t in spec.inputs))
        return env[self.specs[-1].name]


def entry_inputs(spec: LayerSpec) -> list[torch.Tensor]:
    """Random inputs of ``spec``'s shapes (one per input: a residual, a concat part)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for k, c in enumerate(spec.in_channels):
        shape = (spec.batch, c) if k == 0 and spec.in_flat else (spec.batch, c, *spec.in_sizes[k])
        out.append(torch.randn(shape, generator=gen))
    return out


class ExecuTorchProfiler(Profiler):
    """Times entries and whole ``.pte`` programs with ExecuTorch's XNNPACK delegate."""

    backend: ClassVar[str] = "executorch"
    device: ClassVar[str] = "cpu"
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    in_network: ClassVar[bool] = False
    identity_keys: ClassVar[tuple[str, ...]] = Profiler.identity_keys + ("clock", "delegate", "torch_version")
    model_suffixes: ClassVar[tuple[str, ...]] = (".pte",)

    def __init__(self, *, threads: int | None = None, dtype: str | None = None, protocol=None, e2e_protocol=None,
                 clock: str | None = None) -> None:
        super().__init__(threads=threads, dtype=dtype, protocol=protocol, e2e_protocol=e2e_protocol)
        self.clock = cpu_clock(clock, self.threads)
        from hwslim import executorch_build as etb

        try:
            etb.require()
        except etb.ExecuTorchError:
            raise ProfilerError(f"backend 'executorch' needs the executorch package: {INSTALL}") from None
        self._etb = etb
        self._tmp = tempfile.TemporaryDirectory(prefix="hwslim-executorch-")

    # -- identity --------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("executorch") is not None

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"the executorch package is not installed: {INSTALL}"

    @classmethod
    def machine_name(cls) -> str:
        return cpu_model()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "clock": self.clock}

    def _backend_metadata(self) -> dict[str, Any]:
        return {
            "device_name": cpu_model(),
            "cpu_count": os.cpu_count(),
            "backend_version": importlib.metadata.version("executorch"),
            "torch_version": torch.__version__,  # programs are lowered through this torch.export
            "clock": self.clock,
            "delegate": self._etb.PARTITIONER,
            "layer_times": "each entry's one-layer .pte program timed alone (XNNPACK's per-operator events "
                           "carry no layer names)",
        }

    # -- programs --------------------------------------------------------------------------
    def write_model(self, net: nn.Module, path, *, batch: int = 1, input_size: int | None = None) -> Path:
        """Lower a materialized network (BatchNorm folded) to ``path`` with suffix ``.pte``."""
        first = net.specs[0]
        size = input_size or first.in_h
        path = Path(path).with_suffix(".pte")
        x = torch.randn(batch, first.cin, size, size)
        path.write_bytes(self._etb.lower(net.eval(), [x]))
        return path

    def _runner(self, program, inputs: list[torch.Tensor]) -> Callable[[], float]:
        self._etb.set_threads(self.threads)
        method = self._etb.load(program)
        clock = time.thread_time_ns if self.clock == "thread_cpu" else time.perf_counter_ns
        execute = method.execute

        def timed() -> float:
            t0 = clock()
            execute(inputs)
            return (clock() - t0) * 1e-6

        timed._keep = (method, inputs, program)  # a program given as bytes is not copied by the runtime
        return timed

    # -- timing ----------------------------------------------------------------------------
    def _time_entry(self, spec: LayerSpec) -> Timing:
        try:
            entry = _Entry(spec)
        except NotImplementedError as e:
            raise ProfilerError(f"backend 'executorch' cannot time {spec.name!r}: {e}") from None
        inputs = entry_inputs(spec)
        try:
            program = self._etb.lower(entry, inputs)
        except self._etb.ExecuTorchError as e:
            raise ProfilerError(f"backend 'executorch' cannot time {spec.name!r}: {e}") from None
        return Timing.from_samples(sample(self._runner(program, inputs), self.protocol))

    def _probe_runner(self, specs, workdir: str) -> Callable[[], float]:
        """The probe lowered to a ``.pte`` program (ExecuTorch does not run ONNX), once per profiler;
        where it cannot be lowered there is no probe (NotImplementedError)."""
        s = specs[0]
        x = torch.randn(1, s.cin, s.in_h, s.in_w, generator=torch.Generator().manual_seed(0))
        if getattr(self, "_probe_program", None) is None:
            try:
                self._probe_program = self._etb.lower(_Network(specs).eval(), [x])
            except self._etb.ExecuTorchError as e:
                raise NotImplementedError(f"the probe cannot be lowered: {e}") from None
        return self._runner(self._probe_program, [x])

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        p = Path(path)
        if not p.is_file():
            raise ProfilerError(f"model {path} not found")
        if p.suffix != ".pte":
            raise ProfilerError(f"{path}: ExecuTorch runs .pte programs (hwslim export --format executorch), "
                                f"not {p.suffix or 'this file'}")
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
        return self._runner(p, [x])

    def close(self) -> None:
        self._tmp.cleanup()
