"""``--format executorch``: an ExecuTorch program (``.pte``, XNNPACK delegate) lowered from the plain network.

The program is checked against PyTorch like the ONNX file (kept beside it), with the
metadata in a JSON sidecar (:mod:`hwslim.runtimes.executorch_program`).
"""
from __future__ import annotations

import os
from pathlib import Path

from hwslim.export.formats import ExportFiles, ExportFormat, ExportJob, ExportOptions, fp32_fixed_batch_only, out_suffix


class ExecuTorchFormat(ExportFormat):
    """An fp32 ExecuTorch program of fixed batch."""

    name = "executorch"
    help = ("executorch (a .pte program, XNNPACK; the ONNX kept beside it; "
            "pip install 'hwslim[executorch]')")
    out_help = "ExecuTorch: .pte"
    error_key = "pte_max_rel_error"
    measures_artifact = True
    several_outputs = False  # run_program reads one output: refused before any work, not checked half

    @classmethod
    def check_options(cls, options: ExportOptions) -> None:
        fp32_fixed_batch_only(cls.name, options)

    def files(self) -> ExportFiles:
        from hwslim.runtimes.executorch_program import pte_paths

        out_suffix(self.out, ".pte", self.name, "an ExecuTorch program")
        onnx_path, sidecar = pte_paths(self.out)
        return ExportFiles(onnx_path, sidecar, {"executorch_program": self.out})

    def prepare(self) -> bool:
        from hwslim.runtimes.executorch_program import version

        self.runtime = version()  # refuse before any work when ExecuTorch is missing
        return False

    def build(self, onnx_path: Path, job: ExportJob) -> float:
        from hwslim.runtimes.executorch_program import lower, run_program

        self._program = lower(job.plain, [job.images[:job.options.batch]])
        return job.parity("ExecuTorch", run_program(self._program, job.images, job.options.batch))

    def save(self, meta: dict[str, str]) -> None:
        tmp = self.temporaries()[0]
        tmp.write_bytes(self._program)
        os.replace(tmp, self.out)

    def temporaries(self) -> list[Path]:
        return [self.temporary()]
