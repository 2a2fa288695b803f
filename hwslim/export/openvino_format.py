"""``--format openvino``: OpenVINO IR (``.xml`` + ``.bin``) converted from the checked ONNX file.

The IR is checked against PyTorch in fp32 like the ONNX file and saved with the metadata
in its ``rt_info`` and a JSON sidecar (:mod:`hwslim.runtimes.openvino_ir`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hwslim.core.errors import ConfigError
from hwslim.export.formats import ExportFiles, ExportFormat, ExportJob, ExportOptions


class OpenVinoFormat(ExportFormat):
    """OpenVINO IR; OpenVINO chooses the precision when it compiles the model."""

    name = "openvino"
    help = ("openvino (IR .xml + .bin, converted from the ONNX kept beside it; "
            "pip install 'hwslim[openvino]')")
    out_help = "OpenVINO IR: .xml"
    error_key = "ir_max_rel_error"
    measures_artifact = True

    @classmethod
    def check_options(cls, options: ExportOptions) -> None:
        if options.fp16:
            raise ConfigError("--fp16 does not apply to --format openvino: OpenVINO chooses the precision when it "
                              "compiles the model (the latency table's --dtype: bfloat16 where the CPU has it)")

    def files(self) -> ExportFiles:
        from hwslim.runtimes.openvino_ir import ir_paths

        if self.out.suffix != ".xml":
            raise ConfigError(f"--format openvino writes OpenVINO IR (.xml and .bin): give --out a .xml path, "
                              f"not {self.out.name!r}")
        bin_path, onnx_path, sidecar = ir_paths(self.out)
        return ExportFiles(onnx_path, sidecar, {"openvino_ir": self.out, "weights": bin_path})

    def prepare(self) -> bool:
        from hwslim.runtimes.openvino_ir import version

        self.runtime = version()  # refuse before any work when OpenVINO is missing
        return False

    def build(self, onnx_path: Path, job: ExportJob) -> float:
        from hwslim.runtimes.openvino_ir import run_outputs, to_model

        self._ir = to_model(onnx_path)
        opts = job.options
        got = run_outputs(self._ir, job.images.numpy(), opts.batch, opts.dynamic_batch)
        return job.parity("OpenVINO", [torch.from_numpy(g) for g in got])

    def save(self, meta: dict[str, str]) -> None:
        from hwslim.runtimes.openvino_ir import save_ir

        tmp = self._tmp_xml()
        save_ir(self._ir, tmp, meta)
        os.replace(tmp.with_suffix(".bin"), self.files().named["weights"])
        os.replace(tmp, self.out)

    def temporaries(self) -> list[Path]:
        return [self._tmp_xml(), self._tmp_xml().with_suffix(".bin")]

    def _tmp_xml(self) -> Path:
        return self.temporary(".xml")
