"""Export formats behind one interface, registered by name like the profilers' ``BACKENDS``.

Every export writes and checks an ONNX file first (:mod:`hwslim.export.exporter`); a
format then builds its artifact from that ONNX file or from the plain network, checks it
against PyTorch and renames it into place. Formats are peers, one module each, imported
only when asked for; a module imports its runtime's package only inside its methods, so
a missing package is explained only when that format is used::

    >>> from hwslim.export.formats import FORMATS, format_class
    >>> list(FORMATS)
    ['onnx', 'tensorrt', 'openvino', 'executorch', 'torch']
    >>> format_class("openvino").out_help
    'OpenVINO IR: .xml'

To add a format: a module in ``hwslim/export/`` with an :class:`ExportFormat` subclass,
and one line in ``FORMATS`` (name -> module, class). ``hwslim export --format``, its help
and the ``--json`` keys come from here. The module is never named like the package it
wraps (``openvino_format.py``, not ``openvino.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from hwslim.core.errors import ConfigError, HwslimError
from hwslim.core.outputs import temporary_path
from hwslim.runtimes.onnx_file import ONNX_OPSET, OUTPUT_NAME, check_opset, max_relative_error

FP32_TOLERANCE = 1e-4  # max relative error of ONNX Runtime vs PyTorch in fp32
FP16_TOLERANCE = 1e-2

# name -> (module, class); the order is the CLI's
FORMATS: dict[str, tuple[str, str]] = {
    "onnx": ("hwslim.export.onnx_format", "OnnxFormat"),
    "tensorrt": ("hwslim.export.tensorrt_format", "TensorRTFormat"),
    "openvino": ("hwslim.export.openvino_format", "OpenVinoFormat"),
    "executorch": ("hwslim.export.executorch_format", "ExecuTorchFormat"),
    "torch": ("hwslim.export.torch_format", "TorchExportFormat"),
}


class ExportCheckError(HwslimError):
    """The exported model does not compute what the PyTorch model computes."""


def format_class(name: str) -> type[ExportFormat]:
    """The ExportFormat subclass registered as ``name`` (imports its module, not its runtime)."""
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}; expected one of {', '.join(FORMATS)}")
    module, cls = FORMATS[name]
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``None`` means the default named in the field's comment."""

    format: str = "onnx"  # a name in FORMATS: "onnx" | "tensorrt" | "openvino" | "executorch" | "torch"
    batch: int = 1
    dynamic_batch: bool = False
    fp16: bool = False
    opset: int = ONNX_OPSET
    force: bool = False  # overwrite existing outputs
    check_images: int = 32  # images for the ONNX Runtime vs PyTorch comparison
    calib_images: int = 512  # images to recalibrate BatchNorm at the config (0: keep the supernet's)
    tolerance: float | None = None  # default FP32_TOLERANCE, or FP16_TOLERANCE with fp16
    table: Path | None = None  # a latency table to name in the metadata (and to verify against)
    # where the caller already set the BatchNorm statistics at the config (hwslim.export_model(calib=)):
    # recorded as bn_statistics, and nothing recalibrated; None: calib_images decides
    bn_source: str | None = None

    def __post_init__(self) -> None:
        fmt = format_class(self.format)
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        fmt.check_options(self)
        if self.check_images < 1:
            raise ConfigError(f"--check-images must be >= 1, got {self.check_images}")
        if self.calib_images < 0:
            raise ConfigError(f"--calib-images must be >= 0, got {self.calib_images}")
        check_opset(self.opset)


@dataclass(frozen=True)
class ExportFiles:
    """Where an export writes: the ONNX file, and for other formats what lies beside the artifact."""

    onnx: Path
    sidecar: Path | None = None  # JSON provenance next to the artifact
    named: dict[str, Path] = field(default_factory=dict)  # sidecar key -> file, e.g. {"engine": out}

    def beside(self, out: Path) -> list[Path]:
        """The files written besides ``out``, in the order ``hwslim export`` names them."""
        extra = [p for p in self.named.values() if p != out]
        return extra + [self.onnx, self.sidecar] if self.sidecar else extra


@dataclass(frozen=True)
class ExportJob:
    """What a format builds its artifact from, and what it must match."""

    plain: nn.Module  # the materialized network, BatchNorm folded, fp32
    images: torch.Tensor  # the check images, at the config's input size
    reference: tuple[torch.Tensor, ...]  # PyTorch's outputs on them, one per output (flatten_outputs' order)
    check: str  # what the images are, for messages
    tolerance: float
    options: ExportOptions
    log: Callable[[str], None]
    names: tuple[str, ...] = (OUTPUT_NAME,)  # the graph output of each (output_names)

    def parity(self, runtime: str, got: torch.Tensor | Sequence[torch.Tensor]) -> float:
        """Max relative error of ``runtime``'s outputs against PyTorch's, each output against its own
        scale (a detector's box and class maps differ by orders of magnitude), logged; refused above
        the tolerance, naming the output. Returns the largest."""
        got = [got] if isinstance(got, torch.Tensor) else list(got)
        if len(got) != len(self.reference):
            raise ExportCheckError(f"{runtime} returned {len(got)} output(s) where PyTorch returns "
                                   f"{len(self.reference)}; nothing was written")
        errs = [max_relative_error(g, r) for g, r in zip(got, self.reference)]
        worst = max(range(len(errs)), key=lambda i: (not errs[i] <= self.tolerance, errs[i]))  # NaN counts as worst
        err, which = errs[worst], (f" ({self.names[worst]})" if len(errs) > 1 else "")
        each = f"; per output {', '.join(f'{n} {e:.2e}' for n, e in zip(self.names, errs))}" if len(errs) > 1 else ""
        self.log(f"{runtime} vs PyTorch on {self.check}: max relative error {err:.2e} (tolerance "
                 f"{self.tolerance:.0e}){each}")
        if not err <= self.tolerance:
            raise ExportCheckError(f"{runtime} and PyTorch disagree{which}: max relative error {err:.3e} > "
                                   f"{self.tolerance:.0e} on {self.check}; nothing was written")
        return err


def fp32_fixed_batch_only(name: str, options: ExportOptions) -> None:
    """Refuse (ConfigError) --fp16 and --dynamic-batch for a format that writes an fp32 program of fixed batch."""
    if options.fp16 or options.dynamic_batch:
        raise ConfigError(f"--format {name} writes an fp32 program of fixed batch; "
                          f"{'--fp16' if options.fp16 else '--dynamic-batch'} is not supported")


def out_suffix(out: Path, suffix: str, name: str, what: str) -> None:
    """Refuse (ConfigError) an ``--out`` whose suffix is not the format's."""
    if out.suffix != suffix:
        raise ConfigError(f"--format {name} writes {what}: give --out a {suffix} path, not {out.name!r}")


class ExportFormat:
    """One export format. The exporter calls, in order: :meth:`files`, :meth:`prepare` (before
    any work), :meth:`build` (with the checked ONNX file still at a temporary name), then
    :meth:`save` with the final metadata; :meth:`temporaries` are removed whatever happened.

    ``runtime`` (what built the artifact, e.g. ``"OpenVINO 2025.1"``) is recorded in the
    metadata under the format's name, and the artifact's error under ``error_key``.
    """

    name: ClassVar[str]
    help: ClassVar[str]  # this format in ``--format``'s help
    out_help: ClassVar[str]  # which file to give ``--out``
    error_key: ClassVar[str] = ""  # metadata and --json key of the artifact's max relative error vs PyTorch
    measures_artifact: ClassVar[bool] = False  # --verify times the artifact itself, not its ONNX source
    several_outputs: ClassVar[bool] = True  # writes and checks a network with several outputs

    def __init__(self, out: Path, options: ExportOptions) -> None:
        self.out, self.options = out, options
        self.runtime: str | None = None

    @classmethod
    def check_options(cls, options: ExportOptions) -> None:
        """Refuse (ConfigError) options this format cannot honour."""

    def files(self) -> ExportFiles:
        """Where this export writes (ConfigError for an ``--out`` of the wrong kind)."""
        raise NotImplementedError

    def prepare(self) -> bool:
        """Refuse when the runtime is missing, before any work; whether the ONNX graph is fp16."""
        return self.options.fp16

    def build(self, onnx_path: Path, job: ExportJob) -> float | None:
        """Build the artifact (not yet in place) and check it; its max relative error, None if not run."""
        return None

    def save(self, meta: dict[str, str]) -> None:
        """Write the artifact with ``meta`` and rename it into place."""

    def temporaries(self) -> list[Path]:
        """Files :meth:`build` or :meth:`save` may leave behind on failure."""
        return []

    def temporary(self, suffix: str = "") -> Path:
        """Where the artifact is written before it is renamed into place (short even for a
        long output name; :func:`hwslim.core.outputs.temporary_path`)."""
        return temporary_path(self.out.with_suffix("") if suffix else self.out, "export", suffix)
