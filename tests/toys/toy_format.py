"""A toy export format: the checked ONNX file's bytes reversed (``.xnno``), with a JSON sidecar.

All a new format needs is a module like this one and its entry in
``hwslim.export.formats.FORMATS`` (tests/test_export.py registers it with ``monkeypatch``).
"""
from __future__ import annotations

import os
from pathlib import Path

from hwslim.core.errors import ConfigError
from hwslim.export.formats import ExportFiles, ExportFormat, ExportJob
from hwslim.runtimes.onnx_file import ort_outputs


class ReversedOnnxFormat(ExportFormat):
    """The ONNX bytes reversed; reversed again, ONNX Runtime runs them and must match PyTorch."""

    name = "toy"
    help = "toy (the ONNX bytes reversed)"
    out_help = "toy: .xnno"
    error_key = "toy_max_rel_error"

    def files(self) -> ExportFiles:
        if self.out.suffix != ".xnno":
            raise ConfigError(f"--format toy writes reversed ONNX: give --out a .xnno path, not {self.out.name!r}")
        return ExportFiles(self.out.with_suffix(".onnx"), self.out.with_name(self.out.name + ".json"),
                           {"reversed_onnx": self.out})

    def prepare(self) -> bool:
        self.runtime = "toy 1.0"
        return False

    def build(self, onnx_path: Path, job: ExportJob) -> float:
        tmp = self.temporaries()[0]
        tmp.write_bytes(onnx_path.read_bytes()[::-1])
        back = tmp.with_name(tmp.name + ".onnx")  # a side file of tmp: removed with it
        back.write_bytes(tmp.read_bytes()[::-1])
        return job.parity("toy", ort_outputs(back, job.images, job.options.batch, job.options.dynamic_batch))

    def save(self, meta: dict[str, str]) -> None:
        os.replace(self.temporaries()[0], self.out)

    def temporaries(self) -> list[Path]:
        return [self.out.with_name(f".{self.out.name}.export{os.getpid()}")]
