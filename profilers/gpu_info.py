"""What a GPU table records about the GPU: name, driver and CUDA versions, clocks at start.

GPU latency depends on more than the model name: the driver and CUDA/cuDNN versions pick
kernels, and the clocks the card runs at (boost, thermal or power throttling, a clock
lock set with ``nvidia-smi -lgc``) scale every number. :func:`gpu_info` gathers these
when a profiler starts, from PyTorch and from NVML (``pynvml`` when importable, else the
``nvidia-smi`` command); whatever cannot be read is left out rather than guessed.

    >>> from profilers.gpu_info import gpu_info
    >>> gpu_info()                                     # doctest: +SKIP
    {'gpu_name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0', 'driver_version': '550.54.15',
     'cuda_runtime': '12.4', 'cudnn_version': 90100, 'clocks_at_start': {'sm_mhz': 1980, ...}, ...}
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Any

# nvidia-smi --query-gpu fields -> our keys (values in MHz / W / C, "nounits")
SMI_FIELDS = {
    "name": "gpu_name",
    "driver_version": "driver_version",
    "clocks.sm": "sm_mhz",
    "clocks.mem": "mem_mhz",
    "clocks.max.sm": "max_sm_mhz",
    "clocks.max.mem": "max_mem_mhz",
    "clocks.applications.graphics": "app_sm_mhz",
    "pstate": "pstate",
    "temperature.gpu": "temperature_c",
    "power.limit": "power_limit_w",
    "persistence_mode": "persistence_mode",
    "clocks_throttle_reasons.active": "throttle_reasons",
}
CLOCK_KEYS = ("sm_mhz", "mem_mhz", "max_sm_mhz", "max_mem_mhz", "app_sm_mhz", "pstate", "temperature_c",
              "power_limit_w", "throttle_reasons")


def _number(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_smi_csv(text: str, fields: tuple[str, ...] = tuple(SMI_FIELDS)) -> dict[str, Any]:
    """Parse one line of ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits``.

    Values nvidia-smi cannot report (``[N/A]``, ``[Not Supported]``) are dropped.
    """
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    values = [v.strip() for v in line.split(",")]
    out: dict[str, Any] = {}
    for field, value in zip(fields, values):
        if not value or value.startswith("[") or value == "N/A":
            continue
        key = SMI_FIELDS.get(field, field)
        out[key] = value if key in ("gpu_name", "driver_version", "pstate", "persistence_mode",
                                    "throttle_reasons") else _number(value)
    return out


def _smi(uuid: str | None, index: int) -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    # query fields one call; an older driver rejecting one field rejects the call, so retry without extras
    for fields in (tuple(SMI_FIELDS), tuple(f for f in SMI_FIELDS if f != "clocks_throttle_reasons.active")):
        cmd = [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", f"--id={uuid or index}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if proc.returncode == 0:
            return parse_smi_csv(proc.stdout, fields)
    return {}


def _nvml(uuid: str | None, index: int) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML missing or no permission: nvidia-smi may still work
        return {}
    try:
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else pynvml.nvmlDeviceGetHandleByIndex(index)
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        out: dict[str, Any] = {"driver_version": dec(pynvml.nvmlSystemGetDriverVersion()),
                               "gpu_name": dec(pynvml.nvmlDeviceGetName(h))}
        reads = {
            "sm_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_mem_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "app_sm_mhz": lambda: pynvml.nvmlDeviceGetApplicationsClock(h, pynvml.NVML_CLOCK_GRAPHICS),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
            "pstate": lambda: f"P{pynvml.nvmlDeviceGetPerformanceState(h)}",
        }
        for key, read in reads.items():
            try:
                out[key] = read()
            except Exception:  # not supported on this board / driver
                pass
        return out
    except Exception:
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_info(device: int | None = None) -> dict[str, Any]:
    """Identity and state of CUDA ``device`` (default: the current one); ``{}`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device() if device is None else int(device)
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    uuid = f"GPU-{uuid}" if uuid is not None and not str(uuid).startswith("GPU-") else (str(uuid) if uuid else None)
    info: dict[str, Any] = {
        "gpu_name": torch.cuda.get_device_name(index),
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "torch_version": torch.__version__,
    }
    nv = _nvml(uuid, index) or _smi(uuid, index)
    if "driver_version" in nv:
        info["driver_version"] = nv["driver_version"]
    clocks = {k: nv[k] for k in CLOCK_KEYS if k in nv}
    if clocks:
        info["clocks_at_start"] = clocks
    return info


__all__ = ["gpu_info", "parse_smi_csv"]
