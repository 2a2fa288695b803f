"""Convert an exported ONNX file to OpenVINO IR (``.xml`` + ``.bin``), and run one.

``hwslim export --format openvino --out model.xml`` first writes and checks the ONNX
file as for ``--format onnx`` (kept beside the IR as ``model.onnx``), then
:func:`to_model` reads it with ``openvino.convert_model``, :func:`run_model` checks it
against PyTorch in fp32, and :func:`save_ir` saves the IR with fp32
weights (``compress_to_fp16=False``: the precision is chosen when the model is
compiled, by the latency table's ``dtype``). The IR carries the same ``hwslim.*``
provenance as the ONNX file, in its ``rt_info`` (under ``hwslim``), and a JSON file
beside it (``model.xml.json``) names its ONNX source, as for TensorRT engines, so
``hwslim verify model.xml`` finds the config.

Without the ``openvino`` package, :func:`require` refuses with one line naming the
extra to install.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from hwslim.core.errors import HwslimError

INSTALL_HINT = "OpenVINO is not installed: pip install 'hwslim[openvino]'"


class OpenVinoError(HwslimError):
    """OpenVINO missing, or failing to convert or run a model."""


def require():
    """The ``openvino`` module, or OpenVinoError (one line naming the extra to install)."""
    try:
        import openvino
    except ImportError:
        raise OpenVinoError(INSTALL_HINT) from None
    return openvino


def version() -> str:
    """``"OpenVINO 2026.4.1-..."``: what converted and checked the IR."""
    return f"OpenVINO {require().get_version()}"


def ir_paths(out: Path) -> tuple[Path, Path, Path]:
    """For an IR ``model.xml``: its weights (``model.bin``), ONNX source and provenance JSON."""
    return out.with_suffix(".bin"), out.with_suffix(".onnx"), out.with_name(out.name + ".json")


def to_model(onnx_path: str | os.PathLike):
    """The ``openvino.Model`` of an ONNX file (``openvino.convert_model``)."""
    ov = require()
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as e:  # the frontend's errors have no common base
        raise OpenVinoError(f"OpenVINO could not convert {onnx_path}: {str(e).splitlines()[0][:200]}") from None


def save_ir(model, xml_path: str | os.PathLike, meta: Mapping[str, str] | None = None) -> Path:
    """Save ``model`` as IR at ``xml_path`` (its ``.bin`` beside it) with fp32 weights and
    ``meta`` in its rt_info under ``hwslim``."""
    ov = require()
    for key, value in (meta or {}).items():
        model.set_rt_info(str(value), ["hwslim", key])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def convert(onnx_path: str | os.PathLike, xml_path: str | os.PathLike,
            meta: Mapping[str, str] | None = None) -> Path:
    """Convert ``onnx_path`` to IR at ``xml_path`` (:func:`to_model`, then :func:`save_ir`)."""
    return save_ir(to_model(onnx_path), xml_path, meta)


def run_model(model, images: np.ndarray, batch: int, dynamic: bool = False, precision: str = "f32") -> np.ndarray:
    """The (first) output of ``model`` (an ``openvino.Model`` or an IR/ONNX path) on ``images`` (N, C, H, W),
    run in batches of ``batch`` on the CPU at ``precision`` (``f32``: the parity check)."""
    return run_outputs(model, images, batch, dynamic, precision)[0]


def run_outputs(model, images: np.ndarray, batch: int, dynamic: bool = False,
                precision: str = "f32") -> list[np.ndarray]:
    """Every output of ``model`` on ``images``, in the model's order (its ONNX graph's), as :func:`run_model`."""
    ov = require()
    core = ov.Core()
    src = str(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        compiled = core.compile_model(src, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    except Exception as e:
        raise OpenVinoError(f"OpenVINO could not compile the model: {str(e).splitlines()[0][:200]}") from None
    step = len(images) if dynamic else batch
    runs = [compiled(np.ascontiguousarray(images[i:i + step], dtype=np.float32))
            for i in range(0, len(images), step)]
    return [np.concatenate([r[out] for r in runs]) for out in compiled.outputs]


def ir_metadata(xml_path: str | os.PathLike) -> dict[str, str]:
    """The ``hwslim`` provenance an IR written by ``hwslim export`` carries in its rt_info."""
    ov = require()
    model = ov.Core().read_model(str(xml_path))
    if not model.has_rt_info(["hwslim"]):
        return {}
    return {str(k): str(v.astype(str)) for k, v in model.get_rt_info(["hwslim"]).astype(dict).items()}


__all__ = ["INSTALL_HINT", "OpenVinoError", "convert", "ir_metadata", "ir_paths", "require", "run_model", "run_outputs", "save_ir",
           "to_model", "version"]
