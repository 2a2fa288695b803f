"""``--format onnx``: the checked ONNX file is the artifact; nothing else is built."""
from __future__ import annotations

from hwslim.export.formats import ExportFiles, ExportFormat


class OnnxFormat(ExportFormat):
    """The ONNX file itself (ONNX Runtime checked it against PyTorch already)."""

    name = "onnx"
    help = "onnx"
    out_help = ".onnx"

    def files(self) -> ExportFiles:
        return ExportFiles(self.out)
