"""Shared by the benchmark scripts: a machine stamp and a CSV writer.

Every result row carries the machine it ran on, so numbers from different machines
are never compared by accident. Run scripts from the repository root:
``python benchmarks/NAME.py``.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from hwslim.core.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine_stamp() -> dict[str, str]:
    """Who measured: CPU, cores, GPU (if any), torch version, date, git commit."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": f"{cpu_model()} x{os.cpu_count()}",
        "gpu": gpu,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "commit": commit,
    }


def write_csv(rows: list[dict], name: str) -> Path:
    """Write ``rows`` (stamped with the machine) to benchmarks/results/NAME.csv and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = machine_stamp()
    rows = [{**r, **stamp} for r in rows]
    path = RESULTS / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    from hwslim.core.report import print_table as _pt

    _pt(rows, columns)


@contextlib.contextmanager
def busy_neighbor(enabled: bool = True):
    """A process spinning on another core (``python -c 'while True: pass'``) while the block runs:
    the "busy" condition of the latency benchmarks. It runs for 2 s before the block starts and
    is killed when the block ends, however it ends."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        print(f"busy neighbor: pid {proc.pid} spinning", file=sys.stderr, flush=True)
        yield proc
    finally:
        proc.kill()
        proc.wait()
