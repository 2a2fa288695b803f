"""``--format torch``: a ``torch.export`` program (``.pt2``) of the plain network, for PyTorch deployments.

The program is the materialized network (BatchNorm folded, fp32, fixed batch) as
``torch.export`` captures it; ``torch.export.load(path).module()`` runs it without hwslim
and returns what the network returns (a tuple or dict for several outputs).
It is checked against PyTorch like the ONNX file (kept beside it), and the metadata goes
into the program's ``extra_files`` (``hwslim.json``) and a JSON sidecar.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hwslim.core.graph import flatten_outputs
from hwslim.export.formats import ExportFiles, ExportFormat, ExportJob, ExportOptions, fp32_fixed_batch_only, out_suffix


class TorchExportFormat(ExportFormat):
    """An fp32 ``torch.export`` program of fixed batch."""

    name = "torch"
    help = "torch (a torch.export program, .pt2: torch.export.load(path).module() is the plain network)"
    out_help = "torch: .pt2"
    error_key = "pt2_max_rel_error"

    @classmethod
    def check_options(cls, options: ExportOptions) -> None:
        fp32_fixed_batch_only(cls.name, options)

    def files(self) -> ExportFiles:
        out_suffix(self.out, ".pt2", self.name, "a torch.export program")
        return ExportFiles(self.out.with_suffix(".onnx"), self.out.with_name(self.out.name + ".json"),
                           {"torch_program": self.out})

    def prepare(self) -> bool:
        import torch

        self.runtime = f"torch.export {torch.__version__}"
        return False

    def build(self, onnx_path: Path, job: ExportJob) -> float:
        import torch

        batch = job.options.batch
        self._program = torch.export.export(job.plain.eval(), (job.images[:batch],))
        run = self._program.module()
        with torch.no_grad():
            runs = [flatten_outputs(run(job.images[i:i + batch]))
                    for i in range(0, len(job.images) // batch * batch, batch)]
        return job.parity("torch.export", [torch.cat(parts) for parts in zip(*runs)])

    def save(self, meta: dict[str, str]) -> None:
        import torch

        tmp = self.temporaries()[0]
        torch.export.save(self._program, tmp, extra_files={"hwslim.json": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, self.out)

    def temporaries(self) -> list[Path]:
        return [self.temporary()]
