"""Export a searched config as a deployable model: ONNX (and a TensorRT engine, OpenVINO IR or an
ExecuTorch program), checked.

Two levels:

* :func:`export_model` is ``hwslim export``: checkpoint + channel config -> a checked
  ONNX file that records what produced it (see its docstring), optionally a TensorRT
  engine built from it (:mod:`hwslim.runtimes.tensorrt_engine`) or OpenVINO IR converted from it
  (:mod:`hwslim.runtimes.openvino_ir`);
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

from hwslim import __version__
from hwslim.core.config import ChannelConfig, atomic_write_text
from hwslim.core.errors import ConfigError, HwslimError, OutputExistsError
from hwslim.core.materialize import PlainNet
from hwslim.runtimes.onnx_file import (INPUT_NAME, META_PREFIX, ONNX_OPSET, check_opset, export_onnx,
                                       max_relative_error, ort_outputs, remove_temporaries, sha256_file)

FORMATS = ("onnx", "tensorrt", "openvino", "executorch")
FP32_TOLERANCE = 1e-4  # max relative error of ONNX Runtime vs PyTorch in fp32
FP16_TOLERANCE = 1e-2
TRT_FP32_TOLERANCE = 2e-3  # TensorRT may run fp32 convolutions in TF32


class ExportCheckError(HwslimError):
    """The exported model does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``None`` means the default named in the field's comment."""

    format: str = "onnx"  # "onnx" | "tensorrt" | "openvino" | "executorch"
    batch: int = 1
    dynamic_batch: bool = False
    fp16: bool = False
    opset: int = ONNX_OPSET
    force: bool = False  # overwrite existing outputs
    check_images: int = 32  # images for the ONNX Runtime vs PyTorch comparison
    calib_images: int = 512  # images to recalibrate BatchNorm at the config (0: keep the supernet's)
    tolerance: float | None = None  # default FP32_TOLERANCE, or FP16_TOLERANCE with fp16
    table: Path | None = None  # a latency table to name in the metadata (and to verify against)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.format == "openvino" and self.fp16:
            raise ConfigError("--fp16 does not apply to --format openvino: OpenVINO chooses the precision when it "
                              "compiles the model (the latency table's --dtype: bfloat16 where the CPU has it)")
        if self.format == "executorch" and (self.fp16 or self.dynamic_batch):
            raise ConfigError(f"--format executorch writes an fp32 program of fixed batch; "
                              f"{'--fp16' if self.fp16 else '--dynamic-batch'} is not supported")
        if self.check_images < 1:
            raise ConfigError(f"--check-images must be >= 1, got {self.check_images}")
        if self.calib_images < 0:
            raise ConfigError(f"--calib-images must be >= 0, got {self.calib_images}")
        check_opset(self.opset)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote and how well it matched PyTorch."""

    path: Path  # the artifact asked for (.onnx, the engine, or the IR's .xml)
    onnx_path: Path
    format: str
    precision: str
    config: ChannelConfig
    max_rel_error: float
    tolerance: float
    check: str  # what the comparison ran on
    bn: str  # where the BatchNorm statistics came from
    metadata: dict[str, str] = field(default_factory=dict)
    engine_error: float | None = None  # TensorRT engine (when it could be run here) or OpenVINO IR vs PyTorch
    tensorrt: str | None = None  # which TensorRT built the engine
    sidecar: Path | None = None  # JSON provenance next to an engine or IR
    openvino: str | None = None  # which OpenVINO converted and checked the IR
    executorch: str | None = None  # which ExecuTorch lowered and checked the program






class _HalfGraph(nn.Module):
    """The plain net in fp16 with fp32 input and output (an fp16 graph for TensorRT 11, strongly typed)."""

    def __init__(self, net: PlainNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).half()
        self.specs = net.specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()






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
        if p.exists() and not force:
            raise OutputExistsError(f"{p} exists; pass --force to overwrite it")


def engine_paths(out: Path) -> tuple[Path, Path]:
    """For an engine ``model.engine``: the ONNX it is built from and its provenance JSON."""
    onnx_path = out.with_suffix(".onnx") if out.suffix != ".onnx" else out.with_name(out.name + ".src.onnx")
    return onnx_path, out.with_name(out.name + ".json")




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
            return _export_model(ckpt, config, Path(out), options or ExportOptions(), log or (lambda msg: None))
    finally:
        model.to(home)
        model.train(was_training)


def _export_model(ckpt, config: ChannelConfig | str | os.PathLike, out: Path, opts: ExportOptions,
                  log: Callable[[str], None]) -> ExportResult:
    import onnx

    from hwslim.core.materialize import materialize

    config_path = None if isinstance(config, ChannelConfig) else Path(config)
    cfg = config if isinstance(config, ChannelConfig) else ChannelConfig.load(config)
    net = ckpt.model.cpu().eval()
    net.validate(cfg)

    trt_info = ov_info = et_info = None
    if opts.format == "executorch":
        from hwslim.runtimes.executorch_program import pte_paths, version as et_version

        if out.suffix != ".pte":
            raise ConfigError(f"--format executorch writes an ExecuTorch program: give --out a .pte path, "
                              f"not {out.name!r}")
        onnx_path, sidecar = pte_paths(out)
        _check_outputs([out, onnx_path, sidecar], opts.force)
        et_info = et_version()  # refuse before any work when ExecuTorch is missing
        onnx_fp16 = False
    elif opts.format == "openvino":
        from hwslim.runtimes.openvino_ir import ir_paths, version

        if out.suffix != ".xml":
            raise ConfigError(f"--format openvino writes OpenVINO IR (.xml and .bin): give --out a .xml path, "
                              f"not {out.name!r}")
        bin_path, onnx_path, sidecar = ir_paths(out)
        _check_outputs([out, bin_path, onnx_path, sidecar], opts.force)
        ov_info = version()  # refuse before any work when OpenVINO is missing
        onnx_fp16 = False
    elif opts.format == "tensorrt":
        from hwslim.runtimes.tensorrt_engine import find_builder, precision_plan

        trt_info = find_builder()  # refuse before any work when TensorRT is missing
        onnx_path, sidecar = engine_paths(out)
        _check_outputs([out, onnx_path, sidecar], opts.force)
        onnx_fp16 = precision_plan(trt_info.major, opts.fp16).onnx_fp16
    else:
        onnx_path, sidecar = out, None
        _check_outputs([out], opts.force)
        onnx_fp16 = opts.fp16
    precision = "fp16" if opts.fp16 else "fp32"
    tolerance = opts.tolerance if opts.tolerance is not None else (FP16_TOLERANCE if onnx_fp16 else FP32_TOLERANCE)

    calib, why = checkpoint_images(ckpt, "search", opts.calib_images)
    if calib is not None:
        _recalibrate(net, cfg, calib)
        bn = f"recalibrated at this config on {why}"
    else:
        bn = f"the supernet's running statistics ({why})"
    log(f"BatchNorm: {bn}")
    plain = materialize(net, cfg, fold_bn=True).eval()

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

    meta = provenance(ckpt, cfg, opts, precision=precision, config_path=config_path)
    meta["bn_statistics"] = bn
    with torch.no_grad(), net.using(cfg):
        reference = torch.cat([net(images[i:i + 64]) for i in range(0, len(images), 64)])
    tmp = onnx_path.with_name(f".{onnx_path.name}.export{os.getpid()}.onnx")
    tmp_engine = out.with_name(f".{out.name}.export{os.getpid()}")
    tmp_ir = out.with_name(f".{out.stem}.export{os.getpid()}.xml")
    try:
        export_onnx(_HalfGraph(plain) if onnx_fp16 else plain, tmp, batch=opts.batch, input_size=cfg.input_size,
                    dynamic_batch=opts.dynamic_batch, opset=opts.opset)
        err = _parity("ONNX Runtime", ort_outputs(tmp, images, opts.batch, opts.dynamic_batch), reference, check,
                      tolerance, log)
        meta["max_rel_error"] = f"{err:.3e}"
        meta["check_inputs"] = check
        model = onnx.load(str(tmp))
        _write_props(model, meta)
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportCheckError(f"the ONNX checker rejected the export: {str(e).splitlines()[0][:200]}") from None

        engine_err = None
        if trt_info is not None:
            from hwslim.runtimes.tensorrt_engine import EngineSpec, build_engine

            spec = EngineSpec(tmp, tmp_engine, (opts.batch, net.in_channels, cfg.input_size, cfg.input_size),
                              INPUT_NAME, opts.dynamic_batch, fp16=opts.fp16)
            log(f"building the engine with {trt_info.describe()}")
            build_engine(spec, trt_info)
            engine_err = _engine_error(tmp_engine, trt_info, images, reference, opts)
            meta["tensorrt"] = trt_info.describe()
            if engine_err is not None:
                meta["engine_max_rel_error"] = f"{engine_err:.3e}"
            os.replace(tmp_engine, out)
        if ov_info is not None:
            from hwslim.runtimes.openvino_ir import run_model, save_ir, to_model

            ir = to_model(tmp)
            engine_err = _parity("OpenVINO", torch.from_numpy(run_model(ir, images.numpy(), opts.batch,
                                                                       opts.dynamic_batch)),
                                 reference, check, tolerance, log)
            meta["openvino"] = ov_info
            meta["ir_max_rel_error"] = f"{engine_err:.3e}"
            save_ir(ir, tmp_ir, meta)
            os.replace(tmp_ir.with_suffix(".bin"), bin_path)
            os.replace(tmp_ir, out)
        if et_info is not None:
            from hwslim.runtimes.executorch_program import lower, run_program

            program = lower(plain, [images[:opts.batch]])
            engine_err = _parity("ExecuTorch", run_program(program, images, opts.batch), reference, check,
                                 tolerance, log)
            meta["executorch"] = et_info
            meta["pte_max_rel_error"] = f"{engine_err:.3e}"
            tmp_engine.write_bytes(program)
            os.replace(tmp_engine, out)
        os.replace(tmp, onnx_path)
    finally:
        for t in (tmp, tmp_engine, tmp_ir, tmp_ir.with_suffix(".bin")):
            remove_temporaries(t)
    if sidecar is not None:
        files = ({"openvino_ir": str(out.resolve()), "weights": str(bin_path.resolve())} if ov_info is not None
                 else {"executorch_program": str(out.resolve())} if et_info is not None
                 else {"engine": str(out.resolve())})
        atomic_write_text(sidecar, json.dumps({"onnx": str(onnx_path.resolve()), **files, **meta},
                                              sort_keys=True, indent=2) + "\n")
    return ExportResult(out, onnx_path, opts.format, precision, cfg, err, tolerance, check, bn, meta, engine_err,
                        meta.get("tensorrt"), sidecar, meta.get("openvino"), meta.get("executorch"))


def _parity(runtime: str, got: torch.Tensor, reference: torch.Tensor, check: str, tolerance: float,
            log: Callable[[str], None]) -> float:
    """Max relative error of ``runtime``'s outputs against PyTorch's, logged; refused above ``tolerance``."""
    err = max_relative_error(got, reference)
    log(f"{runtime} vs PyTorch on {check}: max relative error {err:.2e} (tolerance {tolerance:.0e})")
    if not err <= tolerance:
        raise ExportCheckError(f"{runtime} and PyTorch disagree: max relative error {err:.3e} > "
                               f"{tolerance:.0e} on {check}; nothing was written")
    return err


def _write_props(model, meta: Mapping[str, str]) -> None:
    import onnx

    model.producer_name, model.producer_version = "hwslim", __version__
    model.doc_string = (f"{meta['model']} x{meta['width_mult']} at a searched channel config, exported by "
                        f"hwslim {__version__}; see metadata_props hwslim.*")
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in meta.items()})


def _engine_error(engine: Path, info, images: torch.Tensor, reference: torch.Tensor,
                  opts: ExportOptions) -> float | None:
    """Engine vs PyTorch, when the engine can run here (Python API and a GPU); else None."""
    if info.kind != "python" or not torch.cuda.is_available():
        return None
    from hwslim.runtimes.tensorrt_engine import EngineRunner

    runner = EngineRunner(engine)
    step = len(images) if opts.dynamic_batch else opts.batch
    outs = torch.cat([runner(images[i:i + step]).float().cpu() for i in range(0, len(images), step)])
    err = max_relative_error(outs, reference)
    tol = opts.tolerance or (FP16_TOLERANCE if opts.fp16 else TRT_FP32_TOLERANCE)
    if not err <= tol:
        raise ExportCheckError(f"the TensorRT engine and PyTorch disagree: max relative error {err:.3e} > {tol:.0e}")
    return err
