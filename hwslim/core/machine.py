"""Facts about this machine that a latency depends on: the CPU, its kernel-relevant
flags, clock and governor, the load, and the threads other processes are running.

:mod:`hwslim.latency.conditions` records them with every table and measurement; the
profilers name the CPU by :func:`cpu_model`.
"""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


# CPU features that change which kernels a runtime runs (x86: /proc/cpuinfo "flags"; ARM: "Features")
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp", "sve",
                "sve2", "i8mm", "bf16")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...] | None:
    """The :data:`KERNEL_FLAGS` this CPU has (None where the system does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in KERNEL_FLAGS if f in have)
    return None


def cpu_mhz() -> float | None:
    """The cores' mean current clock (MHz) where readable (a VM may report a constant)."""
    vals = []
    for f in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            vals.append(int(f.read_text()) / 1000)
        except (OSError, ValueError):
            pass
    if not vals:
        try:
            vals = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("cpu MHz")]
        except (OSError, ValueError):
            vals = []
    return round(statistics.mean(vals), 1) if vals else None


def cpu_governor() -> str | None:
    """The frequency governor of core 0 (``performance``, ``powersave``...), where readable."""
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip() or None
    except OSError:
        return None


def load_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def others_running() -> int | None:
    """Threads running or runnable now that are not this process's (None off Linux)."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # a thread that just ended
                continue
            own += text[text.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))
