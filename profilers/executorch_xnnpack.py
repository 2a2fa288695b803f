"""ExecuTorch with the XNNPACK delegate on the CPU (the mobile CPU path): the ``executorch`` backend.

Programs are lowered from ``torch.export`` with ``XnnpackPartitioner``
(:mod:`hwslim.runtimes.executorch_program`) and run through ``executorch.runtime``; XNNPACK computes
on ExecuTorch's process-wide thread pool, sized to ``threads`` (default 1) before every
measurement.

**Entries inside networks (the default for tables).** Each designed network (see
:func:`hwslim.latency.profile.design_configs`) is lowered once and run with ETDump on: the XNNPACK
delegate reports every operator it runs (``"Convolution (NHWC, F32) IGEMM #2"``, in whole
microseconds), in the order its runtime created them from the delegate's nodes. The names
carry no link to the graph, but the order does: the nodes are read while lowering
(:func:`hwslim.runtimes.executorch_program.lower_traced`), each with the submodule it came from, and
the runtime's operators are matched to them in order (:func:`match_operators`; a node the
runtime fused into its neighbour, such as a clamp after an add, has no operator of its
own). A layout transpose the delegate inserted is charged to the layer that consumes its
output, as ONNX Runtime's and OpenVINO's are. Every run gives one sample per layer (the
sum of its operators); an entry's samples are pooled over the networks it was timed in
(``--contexts``). Where the operators cannot be matched, profiling stops with a line
saying so (``--isolated`` times entries alone).

**Entries alone** (``--isolated``, tables with ``in_network=False``): each entry is its own
one-layer program (BatchNorm folded, random weights) timed end to end, its input and output
transposed between NCHW and XNNPACK's NHWC inside it; calibration against whole networks
absorbs what that adds (measured on MobileNetV2 1.5x@224: fitted slope 0.68, 56% of held-out
configs within +-5%; in networks, see the README).

**Whole models** are ``.pte`` programs: :meth:`write_model` lowers the materialized
network, and :meth:`time_onnx` (the shared end-to-end entry point) times a ``.pte``.

**Clock.** With one thread XNNPACK computes on the calling thread (pthreadpool runs a
one-thread pool inline), so samples are the calling thread's CPU time, as for ONNX
Runtime; with more threads, wall-clock.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from hwslim.core.graph import LayerSpec
from profilers.base import ProfilerError, Timing, sample
from profilers.cpu import CpuProfiler

INSTALL = "pip install 'hwslim[executorch]'"
# delegate node kinds (hwslim.runtimes.executorch_program.XnnNode.kind) whose runtime operators are named
# otherwise: a 1x1 convolution runs as a GEMM, a global average pooling as a mean
OPERATOR_NAMES = {"Conv2d": ("Convolution", "Fully Connected"), "DepthwiseConv2d": ("Convolution",),
                  "ConvTranspose2d": ("Deconvolution",), "GlobalAvgPooling2d": ("Mean", "Global Average Pooling"),
                  "AvgPooling2d": ("Average Pooling",), "MaxPooling2d": ("Max Pooling",), "Div": ("Divide",)}


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


def _matches(kind: str, operator: str) -> bool:
    """Whether the runtime operator ``operator`` (``"Add (ND) #3"``) can come from a node of ``kind``."""
    name = operator.split(" (")[0].split(" #")[0]
    if any(name.startswith(n) for n in OPERATOR_NAMES.get(kind, ())):
        return True
    a, b = (n.replace(" ", "").lower().removeprefix("static") for n in (name, kind))
    return a.startswith(b) or b.startswith(a)


def match_operators(nodes: Sequence[str], operators: Sequence[str]) -> list[int]:
    """For each runtime operator, the index of the delegate node it runs, or ValueError.

    Operators come in node order. A node with no operator was fused into a neighbour (a
    clamp into the add before it) and is skipped; a node with a fused activation the
    runtime cannot fuse (an add with a ReLU) runs it as a ``Clamp`` right after, which
    goes to that node. Otherwise each operator takes the next node of a matching kind
    (:data:`OPERATOR_NAMES`); an operator that matches no later node means the order is
    not what this expects.
    """
    out: list[int] = []
    j = 0
    for op in operators:
        if out and op.startswith("Clamp") and (j == len(nodes) or not _matches(nodes[j], op)):
            out.append(out[-1])
            continue
        while j < len(nodes) and not _matches(nodes[j], op):
            j += 1
        if j == len(nodes):
            raise ValueError(f"XNNPACK operator {op!r} matches none of the delegate's remaining nodes")
        out.append(j)
        j += 1
    return out


def layer_of(owner: str | None, names: Sequence[str]) -> str | None:
    """The layer a delegate node belongs to, from its submodule path in a :class:`_Network`
    (``"entries.3.module.fc1"`` -> ``names[3]``), or None (a node the delegate inserted)."""
    if owner is None:
        return None
    parts = owner.split(".")
    if len(parts) >= 2 and parts[0] == "entries" and parts[1].isdigit() and int(parts[1]) < len(names):
        return names[int(parts[1])]
    return None


class ExecuTorchProfiler(CpuProfiler):
    """Times entries and whole ``.pte`` programs with ExecuTorch's XNNPACK delegate."""

    backend: ClassVar[str] = "executorch"
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    identity_keys: ClassVar[tuple[str, ...]] = CpuProfiler.identity_keys + ("delegate", "torch_version")
    model_suffixes: ClassVar[tuple[str, ...]] = (".pte",)
    package: ClassVar[str] = "executorch"
    missing: ClassVar[str] = f"the executorch package is not installed: {INSTALL}"
    layer_center: ClassVar[str] = "iqm"  # whole-microsecond operator times: the interquartile mean is unbiased

    def __init__(self, **settings: Any) -> None:
        """``settings``: those of :class:`~profilers.cpu.CpuProfiler`."""
        super().__init__(**settings)
        from hwslim.runtimes import executorch_program as etb

        try:
            etb.require()
        except etb.ExecuTorchError:
            raise ProfilerError(f"backend 'executorch' needs the executorch package: {INSTALL}") from None
        self._etb = etb

    def backend_version(self) -> str:
        return importlib.metadata.version("executorch")

    def _setup_metadata(self) -> dict[str, Any]:
        return {
            "torch_version": torch.__version__,  # programs are lowered through this torch.export
            "delegate": self._etb.PARTITIONER,
            "layer_times": ("XNNPACK's per-operator ETDump events inside designed networks, matched in order to "
                            "the delegate's nodes and their layers; one sample per run" if self.in_network
                            else "each entry's one-layer .pte program timed alone"),
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
        timed = self._timed(partial(method.execute, inputs))
        timed._keep = (method, inputs, program)  # a program given as bytes is not copied by the runtime
        return timed

    # -- timing ----------------------------------------------------------------------------
    def _time_entry(self, spec: LayerSpec) -> Timing:
        entry = self._entry(lambda: _Entry(spec), spec)
        inputs = entry_inputs(spec)
        program = self._entry(lambda: self._etb.lower(entry, inputs), spec, (self._etb.ExecuTorchError,))
        return Timing.from_samples(sample(self._runner(program, inputs), self.protocol))

    # -- entries inside whole networks ------------------------------------------------------
    def profile_network(self, specs: Sequence[LayerSpec]) -> dict[str, list[float]]:
        """Per-layer times (ms, one sample per run) of one whole network, from ETDump.

        The network is built from ``specs`` (random weights, BatchNorm folded), lowered
        with its delegate nodes traced, run ``protocol.warmup_runs`` times and then
        ``network_runs`` times with ETDump on; each run's XNNPACK operators are matched to
        the nodes (:func:`match_operators`) and summed per layer. A transpose the delegate
        inserted goes to the next layer's node (its consumer); a layer with no operator of
        its own costs 0.
        """
        names = [s.name for s in specs]
        s0 = specs[0]
        x = torch.randn(s0.batch, s0.cin, s0.in_h, s0.in_w, generator=torch.Generator().manual_seed(0))
        try:
            program, delegates = self._etb.lower_traced(_Network(specs).eval(), [x])
        except (NotImplementedError, self._etb.ExecuTorchError) as e:
            raise ProfilerError(f"backend 'executorch' cannot build this network: {e}") from None
        if len(delegates) != 1:
            raise ProfilerError(f"backend 'executorch': the network lowered to {len(delegates)} XNNPACK delegates, "
                                f"so its operators cannot be charged to layers; profile with --isolated")
        nodes = delegates[0]
        layers = [layer_of(n.owner, names) for n in nodes]
        for k in range(len(layers) - 2, -1, -1):  # an inserted node goes to its consumer ...
            if layers[k] is None:
                layers[k] = layers[k + 1]
        for k in range(1, len(layers)):  # ... or, after the last layer's nodes, to that layer
            if layers[k] is None:
                layers[k] = layers[k - 1]
        events = self._run_traced(program, [x], self.protocol.warmup_runs, self.network_runs)
        out: dict[str, list[float]] = {name: [0.0] * len(events) for name in names}
        try:
            index = match_operators([n.kind for n in nodes], [op for op, _ in events[0]])
        except ValueError as e:
            raise ProfilerError(f"backend 'executorch' cannot charge this network's operators to layers ({e}); "
                                f"profile with --isolated") from None
        for r, run in enumerate(events):
            if [op for op, _ in run] != [op for op, _ in events[0]]:
                raise ProfilerError("backend 'executorch': the runs of one program reported different operators")
            for (_, ms), j in zip(run, index):
                if layers[j] is not None:
                    out[layers[j]][r] += ms
        return out

    def _run_traced(self, program: bytes, inputs, warmup: int, runs: int) -> list[list[tuple[str, float]]]:
        """``warmup`` then ``runs`` runs of ``program`` with ETDump on; per measured run, its
        delegate operators in order as ``(name, ms)``."""
        from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc
        from executorch.extension.pybindings import portable_lib

        self._etb.set_threads(self.threads)
        module = portable_lib._load_for_executorch_from_buffer(program, enable_etdump=True)
        for _ in range(warmup + runs):
            module.forward(inputs)
        path = os.path.join(self._tmp.name, "network.etdp")
        module.write_etdump_result_to_file(path)
        with open(path, "rb") as f:
            dump = deserialize_from_etdump_flatcc(f.read())
        os.remove(path)
        per_run = []
        for block in dump.run_data:
            ops = [(e.profile_event.delegate_debug_id_str, (e.profile_event.end_time - e.profile_event.start_time) * 1e-6)
                   for e in block.events or () if e.profile_event is not None
                   and e.profile_event.delegate_debug_id_str]
            if ops:
                per_run.append(ops)
        if len(per_run) < runs:
            raise ProfilerError(f"backend 'executorch': ETDump recorded {len(per_run)} runs, expected {warmup + runs}")
        return per_run[-runs:]

    def _probe_runner(self, specs, workdir: str) -> Callable[[], float]:
        """The probe lowered to a ``.pte`` program (ExecuTorch does not run ONNX), once per profiler;
        where it cannot be lowered there is no probe (NotImplementedError)."""
        s = specs[0]
        x = torch.randn(1, s.cin, s.in_h, s.in_w, generator=torch.Generator().manual_seed(0))
        programs = self.__dict__.setdefault("_probe_programs", {})  # the probe and the references
        key = tuple(spec.name for spec in specs)
        if key not in programs:
            try:
                programs[key] = self._etb.lower(_Network(specs).eval(), [x])
            except self._etb.ExecuTorchError as e:
                raise NotImplementedError(f"the probe cannot be lowered: {e}") from None
        return self._runner(programs[key], [x])

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        p = Path(path)
        if not p.is_file():
            raise ProfilerError(f"model {path} not found")
        if p.suffix != ".pte":
            raise ProfilerError(f"{path}: ExecuTorch runs .pte programs (hwslim export --format executorch), "
                                f"not {p.suffix or 'this file'}")
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
        return self._runner(p, [x])
