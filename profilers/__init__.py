"""Latency backends behind one interface (:class:`profilers.base.Profiler`).

Backends are peers, one module each, imported only when asked for, so the core works
without TensorRT or a GPU; a missing package is explained when that backend is used::

    >>> from profilers import available_backends, get_profiler
    >>> available_backends()                       # doctest: +SKIP
    ['ort', 'openvino']
    >>> prof = get_profiler("cpu", threads=1)      # the default CPU backend: ONNX Runtime

To add a backend: a module here with a :class:`Profiler` subclass, and one line in
``BACKENDS`` (name -> module, class, device); a backend living elsewhere (a plugin, a test's
toy) is added with :func:`register_backend`. Its ``is_available()`` must be cheap. ``hwslim
profile --backend`` offers what the registry holds. The
module is never named like the package it wraps (``openvino_cpu.py``, not ``openvino.py``):
run as a script, it would shadow that package.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping

from hwslim.core.errors import TableError

from profilers.base import Profiler, ProfilerError, Protocol, Timing

# name -> (module, class, device). The order per device is the default preference.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "ort": ("profilers.ort", "OrtProfiler", "cpu"),
    "openvino": ("profilers.openvino_cpu", "OpenVinoProfiler", "cpu"),
    "executorch": ("profilers.executorch_xnnpack", "ExecuTorchProfiler", "cpu"),
    "trt": ("profilers.trt", "TrtProfiler", "cuda"),
    "torch_cuda": ("profilers.torch_cuda", "TorchCudaProfiler", "cuda"),
}
ALIASES = {"onnxruntime": "ort", "tensorrt": "trt", "torch": "torch_cuda"}
DEVICES = ("cpu", "cuda")


def register_backend(name: str, module: str, cls: str, device: str) -> None:
    """Add backend ``name``: class ``cls`` of the importable ``module``, measuring ``device``.

    Imported only when asked for, like the built-in ones; ``hwslim profile --backend`` offers
    it from then on. A name already taken (a backend or an alias) is refused.
    """
    if device not in DEVICES:
        raise ProfilerError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if name in BACKENDS or name in ALIASES:
        raise ProfilerError(f"backend {name!r} is already registered")
    BACKENDS[name] = (module, cls, device)


def backend_names(device: str) -> list[str]:
    """The registered backends that measure ``device``, in order of preference."""
    return [n for n, (_, _, dev) in BACKENDS.items() if dev == device]


def backend_class(name: str) -> type[Profiler]:
    """The Profiler subclass of backend ``name`` (imports its module)."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ProfilerError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module, cls, _ = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ProfilerError(f"backend {name!r} is not part of this hwslim installation") from None
        raise ProfilerError(f"backend {name!r} needs the Python package {e.name!r}, which is not installed") from None
    return getattr(mod, cls)


def _available(name: str) -> bool:
    try:
        return backend_class(name).is_available()
    except ProfilerError:
        return False


def available_backends(device: str | None = None) -> list[str]:
    """Backends that can measure on this machine (optionally only those for ``device``)."""
    return [n for n, (_, _, dev) in BACKENDS.items() if (device is None or dev == device) and _available(n)]


def default_backend(device: str) -> str:
    """The preferred available backend for ``device`` (cpu: ort; cuda: trt, else torch_cuda)."""
    if device not in DEVICES:
        raise ProfilerError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    names = backend_names(device)
    for n in names:
        if _available(n):
            if n != names[0]:
                print(f"note: backend {names[0]!r} is not available here; using {n!r}", file=sys.stderr)
            return n
    raise ProfilerError(f"no latency backend can run on device {device!r} here (tried {', '.join(names)})")


def get_profiler(device: str, backend: str | None = None, **settings: Any) -> Profiler:
    """A ready profiler for ``device`` with ``backend`` (default: :func:`default_backend`).

    ``settings`` are the backend's keyword arguments (``threads``, ``dtype``,
    ``protocol``...). ``None`` values are dropped, so CLI defaults never override a
    backend's own.
    """
    name = ALIASES.get(backend, backend) if backend else default_backend(device)
    cls = backend_class(name)
    if cls.device != device:
        raise ProfilerError(f"backend {name!r} measures device {cls.device!r}, not {device!r}")
    if not cls.is_available():
        raise ProfilerError(f"backend {name!r} cannot run here ({cls.unavailable_reason()})")
    return cls(**{k: v for k, v in settings.items() if v is not None})


def profiler_for_table(table) -> Profiler:
    """The profiler with the settings a table (or its metadata dict) was measured with."""
    meta = table if isinstance(table, Mapping) else table.meta
    where = getattr(table, "path", None) or "latency table"
    try:
        settings = meta.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings is {type(settings).__name__}, not an object")
        return get_profiler(meta["device"], meta["backend"], **dict(settings))
    except KeyError as e:
        raise TableError(f"{where}: metadata lacks {e}; re-run hwslim profile") from None
    except (TypeError, ValueError) as e:
        raise TableError(f"{where}: metadata holds settings this hwslim cannot use ({e}); "
                         f"re-run hwslim profile") from None


__all__ = ["ALIASES", "BACKENDS", "DEVICES", "Profiler", "ProfilerError", "Protocol", "Timing", "available_backends",
           "backend_class", "backend_names", "default_backend", "get_profiler", "profiler_for_table",
           "register_backend"]
