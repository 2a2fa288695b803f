"""ONNX files of plain networks: writing (:func:`export_onnx`), their ``hwslim.*`` metadata,
and running them with ONNX Runtime.

``export_onnx`` writes the plain network (BatchNorm folded) with input ``input`` and
output ``logits``; a network with several outputs (a detector's levels, a segmenter's
dict) gets one graph output each, named by :func:`output_names` and recorded in the
metadata (:func:`outputs_metadata`, read back by :func:`metadata_outputs`). It uses PyTorch's TorchScript-based exporter, which is about 15x
faster than the torch.export-based one on these graphs (0.26 s vs 4 s for a
MobileNetV2, measured on the 2-core CPU machine), and falls back to the latter where
the former is unavailable. Both give the same graph after ONNX Runtime's optimizer.
``hwslim export`` (:mod:`hwslim.export`) and the profilers both write with it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from hwslim.core.outputs import temporary_path
from hwslim.core.config import ChannelConfig
from hwslim.core.errors import ConfigError
from hwslim.core.graph import Key, flatten_outputs
from hwslim.core.materialize import PlainNet


ONNX_OPSET = 17


MIN_OPSET = 17


INPUT_NAME, OUTPUT_NAME = "input", "logits"


def output_names(outputs: Sequence[tuple[Key, str]] = ()) -> list[str]:
    """The ONNX graph outputs of a network whose several outputs are ``outputs`` (:attr:`Graph.outputs`):
    ``[OUTPUT_NAME]`` for one (as every file exported before), a dict's keys where they are distinct
    non-empty names other than the input's, else ``output0 .. output{N-1}`` in the module's order."""
    if not outputs:
        return [OUTPUT_NAME]
    keys = [k for k, _ in outputs]
    if all(isinstance(k, str) and k for k in keys) and len(set(keys)) == len(keys) and INPUT_NAME not in keys:
        return list(keys)
    return [f"output{i}" for i in range(len(outputs))]


def outputs_metadata(outputs: Sequence[tuple[Key, str]] = ()) -> dict[str, str]:
    """The metadata that records several outputs: ``{"outputs": JSON [[key, graph output], ...]}``, the
    module's key (a dict's key or a tuple's position) of each graph output; ``{}`` for one output."""
    if not outputs:
        return {}
    return {"outputs": json.dumps([[k, n] for (k, _), n in zip(outputs, output_names(outputs))])}


def metadata_outputs(meta: Mapping[str, str], source: str = "model") -> list[tuple[Key, str]]:
    """(key, graph output name) of each output an exported model records (:func:`outputs_metadata`);
    ``[("", OUTPUT_NAME)]`` for a model with one output."""
    if "outputs" not in meta:
        return [("", OUTPUT_NAME)]
    try:
        pairs = [(k, str(n)) for k, n in json.loads(meta["outputs"])]
        if not pairs or not all(isinstance(k, (str, int)) for k, _ in pairs):
            raise ValueError
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: its hwslim metadata 'outputs' is not a list of [key, name] pairs; "
                          "re-export the model") from None
    return pairs


class FlatOutputs(nn.Module):
    """``net`` returning its several outputs as one flat tuple (:func:`flatten_outputs`): what the
    exporters write as one graph output each, whatever the module returned (a dict, a list...)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.net(x)))


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
    outputs = tuple(getattr(net, "outputs", ()))
    names = output_names(outputs)
    module = FlatOutputs(net) if outputs else net
    dynamic_axes = {n: {0: "batch"} for n in (INPUT_NAME, *names)} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic_axes)
            except (TypeError, RuntimeError, AttributeError):
                dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
                remove_temporaries(tmp)  # whatever the failed first attempt left
                torch.onnx.export(module, (x,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                  input_names=[INPUT_NAME], output_names=names, dynamic_shapes=dyn,
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
    size, other outputs, or, for a classifier's one output, another class count: a crafted
    file or one edited after export)."""
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
    if len(shape) != 4:
        raise ConfigError(f"{path}: its graph takes {len(inputs)} input(s) of rank {len(shape)}, not the one image "
                          "batch its hwslim metadata describes; re-export the model")
    names = [n for _, n in metadata_outputs(meta, str(path))]
    graph_names = [o.name for o in model.graph.output]
    if len(graph_names) != len(names) or (len(names) > 1 and graph_names != names):
        raise ConfigError(f"{path}: its graph's outputs are {graph_names}, not the "
                          f"{names} its hwslim metadata describes; re-export the model")
    found = {"size": shape[2]}
    if len(names) == 1:  # a classifier's logits: the class count (several outputs keep their own widths)
        found["classes"] = (_dims(model.graph.output[0]) + [None, None])[1]
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


def ort_outputs(path: Path, images: torch.Tensor, batch: int, dynamic: bool) -> list[torch.Tensor]:
    """Every graph output of the ONNX file at ``path`` on ``images`` (in batches of ``batch``, or all at
    once for a dynamic batch), in the graph's order: one tensor for a classifier's logits, one per
    output of a network with several."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what deployment runs
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    step = len(images) if dynamic else batch
    runs = [sess.run(None, {INPUT_NAME: images[i:i + step].numpy()}) for i in range(0, len(images), step)]
    return [torch.from_numpy(np.concatenate(parts)) for parts in zip(*runs)]
