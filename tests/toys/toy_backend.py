"""A toy latency backend defined outside ``profilers/``: all a new backend needs is this module
and its registry entry (``profilers.register_backend``; tests/test_profilers.py registers it).

It times each entry alone and whole ONNX models with a plain ONNX Runtime session on the wall
clock: none of the ``ort`` backend's deployment settings, just the :class:`Profiler` interface.
"""
from __future__ import annotations

import time
from typing import Any, Callable, ClassVar

import numpy as np
import onnxruntime as ort

from hwslim.core.graph import LayerSpec
from hwslim.core.machine import cpu_model
from hwslim.core.onnx_build import entry_model
from profilers.base import Profiler, Timing, sample


class ToyProfiler(Profiler):
    """Entries alone and whole models, each an ONNX Runtime session timed with ``perf_counter``."""

    backend: ClassVar[str] = "toy"
    device: ClassVar[str] = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def machine_name(cls) -> str:
        return cpu_model()

    def _backend_metadata(self) -> dict[str, Any]:
        return {"device_name": cpu_model(), "backend_version": f"toy 1 (onnxruntime {ort.__version__})"}

    def _runner(self, model: bytes | str, input_shape: tuple[int, ...] | None = None) -> Callable[[], float]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {v.name: rng.standard_normal(input_shape or v.shape).astype(np.float32) for v in session.get_inputs()}

        def run() -> float:
            t0 = time.perf_counter()
            session.run(None, feeds)
            return (time.perf_counter() - t0) * 1e3

        return run

    def _time_entry(self, spec: LayerSpec) -> Timing:
        return Timing.from_samples(sample(self._runner(entry_model(spec).SerializeToString()), self.protocol))

    def _onnx_runner(self, path: str, input_shape: tuple[int, ...]) -> Callable[[], float]:
        return self._runner(path, input_shape)
