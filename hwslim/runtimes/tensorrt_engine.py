"""Build a TensorRT engine from an exported ONNX file (TensorRT 10 and 11), and run one.

Two builders, tried in this order:

1. the **TensorRT Python API** (``import tensorrt``; ``pip install 'hwslim[tensorrt]'``):
   ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the only mode since
   TensorRT 10) -> ``trt.OnnxParser`` -> builder config with a workspace limit, an
   optimization profile (min/opt/max shapes) and a shared timing cache ->
   ``build_serialized_network``;
2. TensorRT's **trtexec** on the PATH (``--onnx --saveEngine --minShapes/--optShapes/
   --maxShapes --timingCacheFile --skipInference``).

With neither, :func:`find_builder` refuses with one line naming what to install.

**Precision.** TensorRT 10 builds fp16 from an fp32 network with ``BuilderFlag.FP16``
(trtexec ``--fp16``). TensorRT 11 networks are strongly typed and the precision flags
are gone, so fp16 has to be in the ONNX graph itself: :func:`precision_plan` says so
(``onnx_fp16=True``) and the exporter writes an fp16 graph with fp32 inputs and outputs.

**Running.** :class:`EngineRunner` runs an engine with torch CUDA tensors as its I/O
(``set_tensor_address`` + ``execute_async_v3`` on a torch stream); torch owns the CUDA
context, so no pycuda is needed.

Everything that touches TensorRT imports it lazily. None of the TensorRT code paths
could be executed where hwslim was written (no GPU, no TensorRT); the logic around
them (version parsing, flag choice, the trtexec command line, the refusal) is tested.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from hwslim.core.errors import HwslimError

INSTALL_HINT = ("TensorRT is not available here: install its Python package (pip install 'hwslim[tensorrt]') "
                "or put TensorRT's trtexec on the PATH")
MIN_MAJOR = 10
DEFAULT_WORKSPACE_BYTES = 2 << 30


def default_timing_cache() -> Path:
    """One timing cache shared by every build (``$XDG_CACHE_HOME/hwslim/tensorrt.timing-cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hwslim" / "tensorrt.timing-cache"


class TensorRTError(HwslimError):
    """TensorRT missing, too old, or failing to parse/build a model."""


@dataclass(frozen=True)
class TensorRTInfo:
    """Which builder is used: ``kind`` is ``"python"`` or ``"trtexec"``."""

    kind: str
    version: tuple[int, int, int]
    trtexec: str | None = None  # path of trtexec when kind == "trtexec"

    @property
    def major(self) -> int:
        return self.version[0]

    def describe(self) -> str:
        v = ".".join(map(str, self.version))
        return f"TensorRT {v} (Python API)" if self.kind == "python" else f"TensorRT {v} (trtexec at {self.trtexec})"


@dataclass(frozen=True)
class PrecisionPlan:
    """How a precision is obtained on a TensorRT major version.

    ``builder_flags`` are ``trt.BuilderFlag`` member names (TensorRT 10) and
    ``trtexec_flags`` the matching trtexec options; ``onnx_fp16`` asks the exporter for
    an fp16 graph (TensorRT 11, strongly typed: the graph's types are the precision).
    """

    precision: str
    builder_flags: tuple[str, ...]
    trtexec_flags: tuple[str, ...]
    onnx_fp16: bool


@dataclass(frozen=True)
class EngineSpec:
    """What to build: shapes, precision, workspace, timing cache."""

    onnx_path: Path
    engine_path: Path
    input_shape: tuple[int, int, int, int]  # (batch, channels, height, width): the optimal shape
    input_name: str = "input"
    dynamic_batch: bool = False
    max_batch: int | None = None  # dynamic batch only; default max(2 * batch, 8)
    fp16: bool = False
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = field(default_factory=default_timing_cache)  # None: no cache

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The optimization profile (min, opt, max); all equal without --dynamic-batch."""
        opt = tuple(self.input_shape)
        if not self.dynamic_batch:
            return opt, opt, opt
        top = self.max_batch or max(2 * opt[0], 8)
        return (1, *opt[1:]), opt, (max(top, opt[0]), *opt[1:])


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.26"`` -> (10, 3, 0)."""
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def parse_trtexec_version(output: str) -> tuple[int, int, int] | None:
    """Read the version trtexec prints in its banner: ``[TensorRT v100300]`` -> (10, 3, 0)."""
    m = re.search(r"TensorRT v(\d+)", output)
    if not m:
        return None
    n = int(m.group(1))
    return n // 10000, (n // 100) % 100, n % 100


def find_builder(python: bool = True, trtexec: bool = True) -> TensorRTInfo:
    """The TensorRT builder to use: the Python API, else trtexec; else raise one line."""
    if python:
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            trt = None
        if trt is not None:
            info = TensorRTInfo("python", parse_version(trt.__version__))
            _check_major(info)
            return info
    exe = shutil.which("trtexec") if trtexec else None
    if exe:
        try:
            out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
            version = parse_trtexec_version(out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired):
            version = None
        if version is None:
            raise TensorRTError(f"{exe} did not report its TensorRT version; check that it runs")
        info = TensorRTInfo("trtexec", version, exe)
        _check_major(info)
        return info
    raise TensorRTError(INSTALL_HINT)


def _check_major(info: TensorRTInfo) -> None:
    if info.major < MIN_MAJOR:
        raise TensorRTError(f"{info.describe()} is too old: hwslim builds engines with TensorRT {MIN_MAJOR} or newer")


def precision_plan(major: int, fp16: bool) -> PrecisionPlan:
    """Builder flags and export precision for ``fp16`` on TensorRT ``major``."""
    if major < MIN_MAJOR:
        raise TensorRTError(f"TensorRT {major} is too old: hwslim needs TensorRT {MIN_MAJOR} or newer")
    if not fp16:
        return PrecisionPlan("fp32", (), (), False)
    if major == 10:
        return PrecisionPlan("fp16", ("FP16",), ("--fp16",), False)
    # 11+: strongly typed networks only; BuilderFlag.FP16 and trtexec --fp16 were removed.
    return PrecisionPlan("fp16", (), (), True)


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(trtexec: str, spec: EngineSpec, major: int) -> list[str]:
    """The trtexec command line that builds ``spec`` (no inference run)."""
    plan = precision_plan(major, spec.fp16)
    lo, opt, hi = spec.shapes()
    cmd = [
        trtexec,
        f"--onnx={spec.onnx_path}",
        f"--saveEngine={spec.engine_path}",
        f"--minShapes={spec.input_name}:{_dims(lo)}",
        f"--optShapes={spec.input_name}:{_dims(opt)}",
        f"--maxShapes={spec.input_name}:{_dims(hi)}",
        f"--memPoolSize=workspace:{max(1, spec.workspace_bytes >> 20)}M",
        "--skipInference",
        *plan.trtexec_flags,
    ]
    if spec.timing_cache is not None:
        cmd.append(f"--timingCacheFile={spec.timing_cache}")
    return cmd


def build_engine(spec: EngineSpec, info: TensorRTInfo | None = None) -> Path:
    """Build and write ``spec.engine_path`` (atomically) with the given or found builder."""
    info = info or find_builder()
    tmp = spec.engine_path.with_name(f".{spec.engine_path.name}.tmp{os.getpid()}")
    spec_tmp = replace(spec, engine_path=tmp)
    if spec.timing_cache is not None:
        spec.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    spec.engine_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if info.kind == "python":
            _build_python(spec_tmp, info)
        else:
            _build_trtexec(spec_tmp, info)
        os.replace(tmp, spec.engine_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return spec.engine_path


def _build_trtexec(spec: EngineSpec, info: TensorRTInfo) -> None:
    cmd = trtexec_command(info.trtexec or "trtexec", spec, info.major)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not spec.engine_path.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise TensorRTError(f"trtexec failed to build {spec.onnx_path} (exit {proc.returncode}): {tail[0][:200]}")


def _build_python(spec: EngineSpec, info: TensorRTInfo) -> None:
    import tensorrt as trt

    plan = precision_plan(info.major, spec.fp16)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is implicit since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {spec.onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_bytes))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input_name, *spec.shapes())
    config.add_optimization_profile(profile)
    cache_path = spec.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {spec.onnx_path} (see its log above)")
    with open(spec.engine_path, "wb") as f:
        f.write(serialized)
    if cache_path is not None:  # share what this build timed with the next one
        _atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class EngineRunner:
    """Run a serialized engine with torch CUDA tensors as inputs and outputs.

    >>> runner = EngineRunner("model.engine")          # doctest: +SKIP
    >>> logits = runner(x.cuda())                      # doctest: +SKIP
    """

    def __init__(self, engine_path: str | os.PathLike) -> None:
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{engine_path}: not an engine this TensorRT can load (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()  # non-default stream: TensorRT warns on the legacy default one

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, x):
        """The engine's (first) output on ``x``."""
        return self.run(x)[self.outputs[0]]

    def run(self, x) -> dict:
        """Every output of the engine on ``x``, by its name (the ONNX graph output's)."""
        torch = self._torch
        name = self.inputs[0]
        x = x.to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            outs[out] = torch.empty(shape, device="cuda", dtype=self._torch_dtype(out))
            self.context.set_tensor_address(out, outs[out].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTError("TensorRT failed to run the engine")
        self.stream.synchronize()
        return outs
