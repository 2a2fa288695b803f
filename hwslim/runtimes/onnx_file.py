"""ONNX files of plain networks: writing (:func:`export_onnx`), their ``hwslim.*`` metadata,
and running them with ONNX Runtime.

``export_onnx`` writes the plain network (BatchNorm folded) with input ``input`` and
output ``logits``. It uses PyTorch's TorchScript-based exporter, which is about 15x
faster than the torch.export-based one on these graphs (0.26 s vs 4 s for a
MobileNetV2, measured on the 2-core CPU machine), and falls back to the latter where
the former is unavailable. Both give the same graph after ONNX Runtime's optimizer.
``hwslim export`` (:mod:`hwslim.export`) and the profilers both write with it.
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from hwslim.core.outputs import temporary_path
from hwslim.core.config import ChannelConfig
from hwslim.core.errors import ConfigError
from hwslim.core.materialize import PlainNet


ONNX_OPSET = 17


MIN_OPSET = 17


INPUT_NAME, OUTPUT_NAME = "input", "logits"


def max_opset() -> int:
    """The newest ONNX opset the installed ``onnx`` package knows."""
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Refuse (ConfigError, one line) an opset outside ``MIN_OPSET .. max_opset()``."""
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise ConfigError(f"--opset must be between {MIN_OPSET} and {hi} (the newest this onnx package "
                          f"supports), got {opset!r}")


@torch.no_grad()
def export_onnx(net: PlainNet, path: str | os.PathLike, *, batch: int = 1, input_size: int | None = None,
                dynamic_batch: bool = False, opset: int = ONNX_OPSET) -> Path:
    """Write ``net`` as ONNX to ``path`` (atomically) and return the path.

    The file is self-contained (no external data); on any failure no temporary file is
    left behind.
    """
    check_opset(opset)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the path of the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    first = net.specs[0]
    size = input_size or first.in_h
    device = next(net.parameters()).device
    x = torch.randn(batch, first.cin, size, size, device=device)
    was_training = net.training
    net.eval()
    tmp = temporary_path(path)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes)
            except (TypeError, RuntimeError, AttributeError):
                dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
                remove_temporaries(tmp)  # whatever the failed first attempt left
                torch.onnx.export(net, (x,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dyn,
                                  external_data=False)
        os.replace(tmp, path)
    finally:
        remove_temporaries(tmp)
        net.train(was_training)
    return path


def remove_temporaries(tmp: Path) -> None:
    """Remove ``tmp`` and any side file an exporter wrote next to it (``tmp.data``, ...)."""
    for t in [tmp, *tmp.parent.glob(glob.escape(tmp.name) + ".*")]:
        try:
            if t.is_file() or t.is_symlink():
                t.unlink()
        except FileNotFoundError:
            pass


META_PREFIX = "hwslim."


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``: the largest deviation relative to the output's scale.

    Per-element ratios blow up on logits near zero, so the error is measured against
    the largest reference magnitude (over everything compared).
    """
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``hwslim.*`` metadata of an ONNX file written by ``hwslim export`` (prefix removed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ConfigError(f"model file {path} not found") from None
    except Exception as e:  # protobuf decode errors have no common base
        raise ConfigError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    check_graph(model, Path(path), meta)
    return meta


def check_graph(model, path: Path, meta: Mapping[str, str]) -> None:
    """Refuse (ConfigError, one line) an ONNX file no runtime should be handed: external data
    outside its own folder (ONNX Runtime would read any file it names), or, where it carries
    hwslim's metadata, a graph that is not the one the metadata describes (another input
    size or class count: a crafted file or one edited after export)."""
    import onnx

    folder = path.resolve().parent
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in init.external_data if e.key == "location"), "")
            if not (folder / loc).resolve().is_relative_to(folder):
                raise ConfigError(f"{path}: tensor {init.name!r} keeps its data in {loc!r}, outside the model's "
                                  "folder; refused (re-export the model)")
    if "config" not in meta:
        return
    cfg = config_from_metadata(meta, str(path))
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    want = {"size": str(cfg.input_size), "classes": meta.get("num_classes")}  # the batch: its reader's checks
    want = {k: v for k, v in want.items() if str(v).isdigit()}  # a garbled number is refused by its own reader
    shape = _dims(inputs[0]) if len(inputs) == 1 else []
    if len(shape) != 4 or len(model.graph.output) != 1:
        raise ConfigError(f"{path}: its graph takes {len(inputs)} input(s) of rank {len(shape)}, not the one image "
                          "batch its hwslim metadata describes; re-export the model")
    found = {"size": shape[2], "classes": (_dims(model.graph.output[0]) + [None, None])[1]}
    for key, value in found.items():
        if value is not None and key in want and str(value) != want[key]:
            raise ConfigError(f"{path}: its graph has {key} {value} but its hwslim metadata says {want[key]}: "
                              "not the graph that was exported; re-export the model")


def _dims(value_info) -> list[int | None]:
    """The dimensions of an ONNX input or output; None for a symbolic (dynamic) one."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def config_from_metadata(meta: Mapping[str, str], source: str = "model") -> ChannelConfig:
    """The channel config an exported model records (``hwslim.core.config``)."""
    if "config" not in meta:
        raise ConfigError(f"{source} carries no hwslim config in its metadata; was it written by `hwslim export`?")
    return ChannelConfig.from_json(meta["config"], source=f"{source} (metadata)")


def ort_outputs(path: Path, images: torch.Tensor, batch: int, dynamic: bool):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what deployment runs
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    step = len(images) if dynamic else batch
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + step].numpy()})[0]
            for i in range(0, len(images), step)]
    return torch.from_numpy(np.concatenate(outs))
