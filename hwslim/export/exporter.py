"""Export a searched config as a deployable model: a checked ONNX file, and the artifact of the
format asked for (a TensorRT engine, OpenVINO IR, an ExecuTorch program...), checked too.

Two levels:

* :func:`export_model` is ``hwslim export``: checkpoint + channel config -> a checked
  ONNX file that records what produced it (see its docstring), then the format's own
  artifact built from it or from the same plain network; formats are registered in
  :mod:`hwslim.export.formats`;
* :func:`hwslim.runtimes.onnx_file.export_onnx` is the low-level writer, shared with the profilers.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from hwslim.core.version import __version__
from hwslim.core.config import ChannelConfig, atomic_write_text
from hwslim.core.outputs import owned, remove_stale_temporaries, temporary_path
from hwslim.core.errors import ConfigError, HwslimError, OutputExistsError
from hwslim.core.materialize import PlainNet
from hwslim.export.formats import (FP16_TOLERANCE, FP32_TOLERANCE, ExportCheckError, ExportFormat, ExportJob,
                                   ExportOptions, format_class)
from hwslim.core.graph import flatten_outputs
from hwslim.runtimes.onnx_file import (META_PREFIX, export_onnx, ort_outputs, output_names, outputs_metadata,
                                       remove_temporaries, sha256_file)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote and how well it matched PyTorch."""

    path: Path  # the artifact asked for (.onnx, the engine, the IR's .xml, the .pte program)
    onnx_path: Path
    format: str
    precision: str
    config: ChannelConfig
    max_rel_error: float
    tolerance: float
    check: str  # what the comparison ran on
    bn: str  # where the BatchNorm statistics came from
    metadata: dict[str, str] = field(default_factory=dict)
    engine_error: float | None = None  # the artifact (engine, IR, program) vs PyTorch, where it could run here
    runtime: str | None = None  # what built and checked the artifact, e.g. "OpenVINO 2025.1.0"
    sidecar: Path | None = None  # JSON provenance next to an engine, IR or program
    beside: tuple[Path, ...] = ()  # the other files written next to ``path``

    @property
    def verify_path(self) -> Path:
        """What ``--verify`` measures: the artifact where the table's backend runs it, else its ONNX source."""
        return self.path if format_class(self.format).measures_artifact else self.onnx_path

    def as_dict(self) -> dict[str, Any]:
        """The ``hwslim export --json`` object."""
        out = {"path": str(self.path), "onnx": str(self.onnx_path), "format": self.format,
               "precision": self.precision, "max_rel_error": self.max_rel_error, "tolerance": self.tolerance,
               "check_inputs": self.check, "bn_statistics": self.bn}
        if self.sidecar:
            out["provenance"] = str(self.sidecar)
        if self.runtime:
            out[self.format] = self.runtime
            out[format_class(self.format).error_key] = self.engine_error
        return out


class _HalfGraph(nn.Module):
    """The plain net in fp16 with fp32 input and output (an fp16 graph for TensorRT 11, strongly typed)."""

    def __init__(self, net: PlainNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).half()
        self.specs, self.outputs = net.specs, net.outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [o.float() for o in flatten_outputs(self.net(x.half()))]
        return tuple(outs) if self.outputs else outs[0]


def provenance(ckpt, config: ChannelConfig, opts: ExportOptions, *, precision: str,
               config_path: Path | None = None) -> dict[str, str]:
    """The metadata an exported model carries: what produced it, and from what."""
    model = ckpt.model
    meta = {
        "producer": f"hwslim {__version__}",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model.name,
        "width_mult": f"{model.width_mult:g}",
        "input_size": str(config.input_size),
        "num_classes": str(model.num_classes),
        "divisor": str(model.divisor),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "graph": json.dumps(model.graph_dict(), sort_keys=True, separators=(",", ":")),  # the model as data
        "batch": str(opts.batch),
        "dynamic_batch": str(bool(opts.dynamic_batch)).lower(),
        "precision": precision,
        "opset": str(opts.opset),
        **outputs_metadata(model.outputs),  # several outputs: each one's key and graph output
    }
    if ckpt.path is not None:
        meta["checkpoint"] = str(Path(ckpt.path).resolve())
        meta["checkpoint_sha256"] = sha256_file(ckpt.path)
    if config_path is not None:
        meta["config_path"] = str(Path(config_path).resolve())
    table = opts.table or config.meta.get("table")
    if table:
        meta["table"] = str(Path(table).resolve())
        if Path(table).is_file():
            meta["table_sha256"] = sha256_file(table)
    return meta


def _images_from(obj: Any, limit: int) -> torch.Tensor | None:
    """Images out of whatever a data split is: a tensor, (images, labels), a dataset or a loader."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj[:limit]
    for attr in ("images", "x", "inputs"):
        if isinstance(getattr(obj, attr, None), torch.Tensor):
            return getattr(obj, attr)[:limit]
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor) and obj[0].dim() == 4:
        return obj[0][:limit]
    out, n = [], 0
    try:
        for item in obj:
            x = item[0] if isinstance(item, (tuple, list)) else item
            x = x.unsqueeze(0) if x.dim() == 3 else x
            out.append(x)
            n += len(x)
            if n >= limit:
                break
    except TypeError:
        return None
    return torch.cat(out)[:limit] if out else None


def checkpoint_images(ckpt, split: str, max_images: int) -> tuple[torch.Tensor | None, str]:
    """Up to ``max_images`` images of a split of the checkpoint's training data, and a note.

    ``split`` is ``"search"`` (the held-out split the search scored on, used here for BN
    recalibration exactly as the search did) or ``"validation"``. Returns ``(None,
    why)`` when the checkpoint records no data or the data cannot be built here.
    """
    if max_images <= 0:
        return None, "not requested"
    if not ckpt.data:
        return None, "the checkpoint records no training data"
    try:
        from hwslim.importing import data as hdata
    except ImportError:
        return None, "hwslim.importing.data is not available"
    fn: Callable | None = getattr(hdata, f"{split}_split", None)
    if fn is None:
        return None, f"hwslim.importing.data has no {split}_split"
    try:
        images = _images_from(fn(ckpt, max_images=max_images), max_images)
    except HwslimError as e:
        return None, f"its data could not be loaded ({e})"
    if images is None or len(images) == 0:
        return None, f"its {split} split is empty"
    return images.float(), f"{len(images)} images of the checkpoint's {split} split"


@torch.no_grad()
def _recalibrate(net, config: ChannelConfig, images: torch.Tensor, batch_size: int = 128) -> None:
    """Set the supernet's BN statistics to the config's own (as the search evaluated it)."""
    from hwslim.core.accuracy import batches
    from hwslim.core.slimmable import recalibrate_bn

    with net.using(config):
        recalibrate_bn(net, batches(images, batch_size))
    net.eval()


def _check_outputs(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise OutputExistsError(f"{p} is a directory; give a file path for --out (e.g. {p / 'model.onnx'})")
        if (p.exists() or p.is_symlink()) and not force:  # a dangling symlink is the user's too
            raise OutputExistsError(f"{p} exists; pass --force to overwrite it")


def export_model(checkpoint, config: ChannelConfig | str | os.PathLike, out: str | os.PathLike,
                 options: ExportOptions | None = None, *, log: Callable[[str], None] | None = None) -> ExportResult:
    """Export the plain network of ``checkpoint`` at ``config`` to ``out`` and check it.

    ``checkpoint`` is a path or a loaded :class:`~hwslim.importing.checkpoint.Checkpoint`;
    ``config`` a :class:`ChannelConfig` or its JSON file. Steps: validate the config
    against the supernet; recalibrate BatchNorm at the config on the checkpoint's
    search split (as the search scored it); materialize with BN folded; export ONNX;
    run the ONNX checker (``full_check``); compare ONNX Runtime with PyTorch on real
    images (validation split; random ones only when the checkpoint has no data) and
    fail if the max relative error exceeds the tolerance; write the provenance into
    the ONNX ``metadata_props``. For ``format="tensorrt"`` the engine is then built
    from that ONNX (kept next to it) with a JSON sidecar carrying the same metadata;
    for ``format="openvino"`` the ONNX is converted to IR, checked against PyTorch in
    fp32 like the ONNX file, and saved with the metadata in its rt_info and a sidecar;
    for ``format="executorch"`` the same plain network is lowered to a ``.pte`` program
    (XNNPACK), checked the same way, with the metadata in a sidecar.
    Nothing that exists is overwritten unless ``options.force``; every file is written
    to a temporary name first and renamed into place only after all checks passed.
    The caller's supernet is left as it was: its device, train/eval mode and BatchNorm
    statistics are restored (the recalibration works on them in place).
    """
    from hwslim.importing.checkpoint import Checkpoint, load_checkpoint
    from hwslim.core.accuracy import preserved_bn_stats

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.model
    home = next(model.parameters()).device
    was_training = model.training
    try:
        with preserved_bn_stats(model):
            with owned(out):  # one export per output file
                return _export_model(ckpt, config, Path(out), options or ExportOptions(), log or (lambda msg: None))
    finally:
        model.to(home)
        model.train(was_training)


def _export_model(ckpt, config: ChannelConfig | str | os.PathLike, out: Path, opts: ExportOptions,
                  log: Callable[[str], None]) -> ExportResult:
    """The steps of :func:`export_model`, each a function below; the format is asked, never named."""
    from hwslim.core.materialize import materialize

    config_path = None if isinstance(config, ChannelConfig) else Path(config)
    cfg = config if isinstance(config, ChannelConfig) else ChannelConfig.load(config)
    net = ckpt.model.cpu().eval()
    net.validate(cfg)
    fmt = format_class(opts.format)(out, opts)
    if len(net.outputs) > 1 and not fmt.several_outputs:
        raise ConfigError(f"--format {opts.format} exports a network with one output; this one has "
                          f"{len(net.outputs)} ({', '.join(output_names(net.outputs))}): use --format onnx, openvino "
                          "or torch")
    files = fmt.files()
    _check_outputs([out, *files.beside(out)], opts.force)
    remove_stale_temporaries(out.parent)  # left by an export killed while writing
    onnx_fp16 = fmt.prepare()  # refuses before any work when the format's runtime is missing
    precision = "fp16" if opts.fp16 else "fp32"
    tolerance = opts.tolerance if opts.tolerance is not None else (FP16_TOLERANCE if onnx_fp16 else FP32_TOLERANCE)

    bn = opts.bn_source or _bn_statistics(ckpt, net, cfg, opts.calib_images)
    log(f"BatchNorm: {bn}")
    plain = materialize(net, cfg, fold_bn=True).eval()
    images, check = _check_images(ckpt, net, cfg, opts)
    meta = provenance(ckpt, cfg, opts, precision=precision, config_path=config_path)
    meta["bn_statistics"] = bn
    with torch.no_grad(), net.using(cfg):
        runs = [flatten_outputs(net(images[i:i + 64])) for i in range(0, len(images), 64)]
    reference = tuple(torch.cat(parts) for parts in zip(*runs))  # one tensor per output
    job = ExportJob(plain, images, reference, check, tolerance, opts, log, tuple(output_names(net.outputs)))
    err, artifact_err = _write(fmt, files.onnx, job, meta, onnx_fp16)
    if files.sidecar is not None:
        named = {k: str(p.resolve()) for k, p in files.named.items()}
        atomic_write_text(files.sidecar, json.dumps({"onnx": str(files.onnx.resolve()), **named, **meta},
                                                    sort_keys=True, indent=2) + "\n")
    return ExportResult(out, files.onnx, opts.format, precision, cfg, err, tolerance, check, bn, meta, artifact_err,
                        fmt.runtime, files.sidecar, tuple(files.beside(out)))


def _bn_statistics(ckpt, net, cfg: ChannelConfig, calib_images: int) -> str:
    """Recalibrate BN at the config on the search split where the checkpoint has one; where they came from."""
    calib, why = checkpoint_images(ckpt, "search", calib_images)
    if calib is None:
        return f"the supernet's running statistics ({why})"
    _recalibrate(net, cfg, calib)
    return f"recalibrated at this config on {why}"


def _check_images(ckpt, net, cfg: ChannelConfig, opts: ExportOptions) -> tuple[torch.Tensor, str]:
    """The images the export is checked on (validation split, else search split, else random), whole
    batches of the config's input size, and what they are."""
    images, why = checkpoint_images(ckpt, "validation", opts.check_images)
    if images is None:
        images, why2 = checkpoint_images(ckpt, "search", opts.check_images)
        why = why2 if images is not None else why
    if images is None:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(max(opts.check_images, opts.batch), net.in_channels, cfg.input_size, cfg.input_size,
                             generator=gen)
        check = f"{len(images)} random inputs ({why})"
    else:
        check = why
    n = max(opts.batch, len(images) // opts.batch * opts.batch) if not opts.dynamic_batch else len(images)
    if len(images) < n:  # fewer images than one batch: repeat them
        images = images.repeat((n + len(images) - 1) // len(images), 1, 1, 1)
    images = images[:n]
    if images.shape[-1] != cfg.input_size or images.shape[-2] != cfg.input_size:
        images = nn.functional.interpolate(images, size=(cfg.input_size, cfg.input_size), mode="bilinear",
                                           align_corners=False)
    return images, check


def _write(fmt: ExportFormat, onnx_path: Path, job: ExportJob, meta: dict[str, str],
           onnx_fp16: bool) -> tuple[float, float | None]:
    """Write the checked ONNX file and the format's artifact at temporary names, rename them into
    place only once every check passed; the ONNX and the artifact's max relative errors."""
    tmp = temporary_path(onnx_path, "export", ".onnx")
    try:
        err = _write_onnx(tmp, job, meta, onnx_fp16)
        artifact_err = fmt.build(tmp, job)
        if fmt.runtime is not None:
            meta[fmt.name] = fmt.runtime
        if artifact_err is not None:
            meta[fmt.error_key] = f"{artifact_err:.3e}"
        fmt.save(meta)
        os.replace(tmp, onnx_path)
    finally:
        for t in (tmp, *fmt.temporaries()):
            remove_temporaries(t)
    return err, artifact_err


def _write_onnx(tmp: Path, job: ExportJob, meta: dict[str, str], fp16: bool) -> float:
    """Export ONNX to ``tmp``, compare ONNX Runtime with PyTorch, record the provenance, run the checker."""
    import onnx

    opts = job.options
    export_onnx(_HalfGraph(job.plain) if fp16 else job.plain, tmp, batch=opts.batch,
                input_size=job.images.shape[-1], dynamic_batch=opts.dynamic_batch, opset=opts.opset)
    err = job.parity("ONNX Runtime", ort_outputs(tmp, job.images, opts.batch, opts.dynamic_batch))
    meta["max_rel_error"] = f"{err:.3e}"
    meta["check_inputs"] = job.check
    model = onnx.load(str(tmp))
    _write_props(model, meta)
    onnx.save(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportCheckError(f"the ONNX checker rejected the export: {str(e).splitlines()[0][:200]}") from None
    return err


def _write_props(model, meta: Mapping[str, str]) -> None:
    import onnx

    model.producer_name, model.producer_version = "hwslim", __version__
    model.doc_string = (f"{meta['model']} x{meta['width_mult']} at a searched channel config, exported by "
                        f"hwslim {__version__}; see metadata_props hwslim.*")
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in meta.items()})
