"""``--format tensorrt``: a TensorRT engine built from the checked ONNX file (kept beside it).

Built through the TensorRT Python API, else trtexec (:mod:`hwslim.runtimes.tensorrt_engine`);
checked against PyTorch where it can run here (the Python API and a GPU), with the
metadata in a JSON sidecar.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hwslim.export.formats import FP16_TOLERANCE, ExportCheckError, ExportFiles, ExportFormat, ExportJob
from hwslim.runtimes.onnx_file import INPUT_NAME, max_relative_error

TRT_FP32_TOLERANCE = 2e-3  # TensorRT may run fp32 convolutions in TF32


class TensorRTFormat(ExportFormat):
    """A serialized TensorRT engine (``.engine`` / ``.plan``)."""

    name = "tensorrt"
    help = "tensorrt (an engine, built from the ONNX kept beside it)"
    out_help = "the engine: .engine/.plan"
    error_key = "engine_max_rel_error"

    def files(self) -> ExportFiles:
        return ExportFiles(*engine_paths(self.out), {"engine": self.out})

    def prepare(self) -> bool:
        from hwslim.runtimes.tensorrt_engine import find_builder, precision_plan

        self._info = find_builder()  # refuse before any work when TensorRT is missing
        self.runtime = self._info.describe()
        return precision_plan(self._info.major, self.options.fp16).onnx_fp16

    def build(self, onnx_path: Path, job: ExportJob) -> float | None:
        from hwslim.runtimes.tensorrt_engine import EngineSpec, build_engine

        opts = job.options
        spec = EngineSpec(onnx_path, self.temporaries()[0], (opts.batch, *job.images.shape[1:]), INPUT_NAME,
                          opts.dynamic_batch, fp16=opts.fp16)
        job.log(f"building the engine with {self.runtime}")
        build_engine(spec, self._info)
        return self._engine_error(job)

    def save(self, meta: dict[str, str]) -> None:
        os.replace(self.temporaries()[0], self.out)

    def temporaries(self) -> list[Path]:
        return [self.temporary()]

    def _engine_error(self, job: ExportJob) -> float | None:
        """Engine vs PyTorch, when the engine can run here (Python API and a GPU); else None."""
        if self._info.kind != "python" or not torch.cuda.is_available():
            return None
        from hwslim.runtimes.tensorrt_engine import EngineRunner

        runner = EngineRunner(self.temporaries()[0])
        opts, images = job.options, job.images
        step = len(images) if opts.dynamic_batch else opts.batch
        runs = [runner.run(images[i:i + step]) for i in range(0, len(images), step)]
        outs = [torch.cat([r[name].float().cpu() for r in runs]) for name in job.names]
        err = max(max_relative_error(o, ref) for o, ref in zip(outs, job.reference))  # each output on its own scale
        tol = opts.tolerance or (FP16_TOLERANCE if opts.fp16 else TRT_FP32_TOLERANCE)
        if not err <= tol:
            raise ExportCheckError(f"the TensorRT engine and PyTorch disagree: max relative error {err:.3e} > "
                                   f"{tol:.0e}")
        return err


def engine_paths(out: Path) -> tuple[Path, Path]:
    """For an engine ``model.engine``: the ONNX it is built from and its provenance JSON."""
    onnx_path = out.with_suffix(".onnx") if out.suffix != ".onnx" else out.with_name(out.name + ".src.onnx")
    return onnx_path, out.with_name(out.name + ".json")
