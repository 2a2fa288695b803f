"""Latency lookup tables: format, I/O, the compatibility check, and prediction.

A table is two files side by side (see ``latency_tables/README.md``):

* ``NAME.csv``, one row per entry: the :meth:`~hwslim.core.graph.LayerSpec.signature`
  fields, then ``median_ms, iqr_ms, p90_ms, n, noisy``. ``pandas.read_csv`` opens it.
* ``NAME.json``, the metadata: who measured (device, CPU/GPU model, backend and its
  version, threads, dtype, clock), what (model, width multiplier, input size, batch),
  when, with which hwslim, and the calibration with its held-out accuracy.

(``NAME.e2e.csv`` keeps the whole-model measurements behind the calibration.)

A prediction is ``a * sum(layer medians) + b`` (with depthwise layers on their own
slope where that fits better): the fit of whole-model latencies on layer sums stored in
the metadata (see :mod:`hwslim.latency.profile`). Example::

    >>> table = LatencyTable.load("latency_tables/cpu-amd-epyc/mobilenet_v2-x1.5-224px-b1-ort-t1-float32.csv")
    >>> table.check_compatible(net, batch=1)               # refuses another machine/setup
    >>> table.predict_ms(net.layer_specs(config))          # doctest: +SKIP
    7.41

Rows are appended one at a time with flush + fsync (profiling is resumable after a
``kill -9``); a torn last line is dropped when the file is read.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hwslim.core import jsonio
from hwslim.core.version import __version__
from hwslim.core.config import atomic_write_text
from hwslim.core.errors import HwslimError, TableError
from hwslim.core.graph import SIGNATURE_FIELDS, LayerSpec

FORMAT = "hwslim-latency-table"
FORMAT_VERSION = 3
# version 1 had no ``extra`` signature column (its rows read as extra=""); versions 1 and 2 no reference:
# their times are as measured (``ref_ms`` reads as empty, :attr:`LatencyTable.reference_level_ms` is None)
READ_VERSIONS = (1, 2, 3)
# ``ref_ms``: the reference's time adjacent to the row's samples, as measured (the row's times are
# at the table's reference level: as measured x level / ref_ms)
TIMING_FIELDS = ("median_ms", "iqr_ms", "p90_ms", "n", "noisy", "ref_ms")
COLUMNS = SIGNATURE_FIELDS + TIMING_FIELDS
COLUMNS_V2 = COLUMNS[:-1]
COLUMNS_V1 = tuple(f for f in COLUMNS_V2 if f != "extra")
E2E_COLUMNS = ("role", "widths", "sum_ms", "median_ms", "iqr_ms", "p90_ms", "n", "noisy", "ref_ms")
# the columns files of older versions have, by the columns of this version
OLDER_COLUMNS = {COLUMNS: (COLUMNS_V2, COLUMNS_V1), E2E_COLUMNS: (E2E_COLUMNS[:-1],)}
_INT_FIELDS = {"kernel", "stride", "padding", "groups", "in_h", "in_w", "cin", "cout", "batch"}
# metadata that must match the use: name -> how the mismatch is described
SETUP_KEYS = ("model", "width_mult", "input_size", "batch", "dtype")


# the tables that come with hwslim (a source checkout or an editable install)
PACKAGE_TABLE_DIR = Path(__file__).resolve().parent.parent / "latency_tables"


def user_table_dir() -> Path:
    """The per-user table cache: ``$XDG_CACHE_HOME/hwslim/latency_tables`` (``~/.cache/...``)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative is invalid
    return base / "hwslim" / "latency_tables"


def table_dir() -> Path:
    """Where ``hwslim profile`` writes a new table by default: ``$HWSLIM_TABLE_DIR``, else
    :func:`user_table_dir`; both are on :func:`table_search_path`, so the table is found
    from any working directory."""
    env = os.environ.get("HWSLIM_TABLE_DIR", "")
    return checked_table_dir(env, "$HWSLIM_TABLE_DIR") if env else user_table_dir()


def checked_table_dir(path: str | os.PathLike, what: str, must_exist: bool = False) -> Path:
    """``path`` (``--table-dir``, ``$HWSLIM_TABLE_DIR``) as a folder of tables, or TableError (one
    line) when it is a file, a symlink loop, or (``must_exist``) missing: a table is never
    silently looked up or written somewhere else instead."""
    p = Path(path).expanduser()
    try:
        is_dir = stat.S_ISDIR(os.stat(p).st_mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TableError(f"{what} {path} is a symlink loop; give a directory") from None
        if must_exist or e.errno != errno.ENOENT:
            raise TableError(f"{what} {path}: {e.strerror}; give a directory of latency tables") from None
        return p
    if not is_dir:
        raise TableError(f"{what} {path} is a file, not a directory of latency tables")
    return p


def table_search_path(root: str | os.PathLike | None = None) -> list[Path]:
    """Where :func:`find_table` looks, in order: ``root`` (a directory given, e.g.
    ``--table-dir``), ``$HWSLIM_TABLE_DIR``, the per-user cache (:func:`user_table_dir`),
    and hwslim's own ``latency_tables/``. Never the working directory."""
    env = os.environ.get("HWSLIM_TABLE_DIR", "")
    out: list[Path] = []
    for d in (checked_table_dir(root, "--table-dir", must_exist=True) if root is not None else None,
              checked_table_dir(env, "$HWSLIM_TABLE_DIR") if env else None, user_table_dir(), PACKAGE_TABLE_DIR):
        if d is not None and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def table_name(model: str, width_mult: float, input_size: int, batch: int, backend: str, threads: int,
               dtype: str) -> str:
    """File stem of a table: ``mobilenet_v2-x1.5-224px-b1-ort-t1-float32``."""
    return f"{model}-x{width_mult:g}-{input_size}px-b{batch}-{backend}-t{threads}-{dtype}"


def default_table_path(device: str, device_name: str, model: str, width_mult: float, input_size: int,
                       batch: int, backend: str, threads: int, dtype: str, root: str | os.PathLike | None = None
                       ) -> Path:
    """``<root>/<device>-<device name>/<table_name>.csv``; ``root`` defaults to :func:`table_dir`."""
    root = Path(root) if root is not None else table_dir()
    return root / f"{device}-{slug(device_name)}" / (table_name(model, width_mult, input_size, batch, backend,
                                                                threads, dtype) + ".csv")


def table_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(entries CSV, metadata JSON, end-to-end CSV) of a table given any one of them or its stem."""
    p = Path(path)
    name = p.name
    for suffix in (".e2e.csv", ".csv", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".csv"), p.with_name(name + ".json"), p.with_name(name + ".e2e.csv")


# -- rows ---------------------------------------------------------------------------------------
def timing_from_row(row: Mapping[str, str]):
    from profilers.base import Timing

    ref = row.get("ref_ms") or ""
    return Timing(float(row["median_ms"]), float(row["iqr_ms"]), float(row["p90_ms"]), int(row["n"]),
                  str(row["noisy"]) in ("1", "True", "true"), float(ref) if ref else None)


def timing_fields(timing) -> dict[str, Any]:
    """A Timing as the CSV's timing columns (:data:`TIMING_FIELDS`; ``ref_ms`` empty where not timed)."""
    ref = getattr(timing, "ref_ms", None)
    return {"median_ms": f"{timing.median_ms:.6f}", "iqr_ms": f"{timing.iqr_ms:.6f}", "p90_ms": f"{timing.p90_ms:.6f}",
            "n": timing.n, "noisy": int(timing.noisy), "ref_ms": "" if ref is None else f"{ref:.6f}"}


def signature_from_row(row: Mapping[str, Any]) -> tuple:
    out = []
    for f in SIGNATURE_FIELDS:
        v = row.get(f, "")
        if f in _INT_FIELDS:
            v = int(v)
        elif f == "residual":
            v = str(v) in ("1", "True", "true")
        elif f == "extra":
            v = "" if v is None or v != v else str(v)
        else:
            v = str(v)
        out.append(v)
    return tuple(out)


def entry_row(spec_or_sig: LayerSpec | tuple, timing) -> dict[str, Any]:
    sig = spec_or_sig.signature() if isinstance(spec_or_sig, LayerSpec) else spec_or_sig
    row = dict(zip(SIGNATURE_FIELDS, sig))
    row["residual"] = int(row["residual"])
    row.update(timing_fields(timing))
    return row


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> tuple[list[dict[str, str]], int]:
    """Complete rows of an append-only CSV and the byte length they span.

    A last line without its newline (a write cut by a kill) or one that does not
    parse is dropped; everything before it is kept.
    """
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn row
    lines = data[:end].decode("utf-8", errors="replace").splitlines(keepends=True)
    if not lines:
        return [], 0
    header = tuple(next(csv.reader([lines[0]])))
    if header in OLDER_COLUMNS.get(tuple(columns), ()):
        columns = header  # an older version's file: its rows lack the newer columns
    elif header != tuple(columns):
        raise TableError(f"{path}: unexpected columns {header[:4]}...; not a hwslim table file")
    rows, good = [], len(lines[0].encode())
    for line in lines[1:]:
        values = next(csv.reader([line]), [])
        if len(values) != len(columns):
            break
        rows.append(dict(zip(columns, values)))
        good += len(line.encode())
    return rows, good


def _header(path: Path) -> tuple[str, ...]:
    with open(path, newline="") as f:
        return tuple(next(csv.reader(f), []))


class RowWriter:
    """Append-only CSV writer: one row per call, flushed and fsynced (survives ``kill -9``)."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]) -> None:
        self.path, self.columns = Path(path), tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            rows, good = read_rows(self.path, self.columns)
            if _header(self.path) != self.columns:  # upgrade an older version's file
                buf = io.StringIO()
                w = csv.writer(buf, lineterminator="\n")
                w.writerow(self.columns)
                for r in rows:
                    w.writerow([r.get(c, "") for c in self.columns])
                atomic_write_text(self.path, buf.getvalue())
                _, good = read_rows(self.path, self.columns)
            with open(self.path, "r+b") as f:  # cut a torn last row before appending
                f.truncate(good)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="")
        if fresh:
            self._write(dict(zip(self.columns, self.columns)))

    def _write(self, row: Mapping[str, Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([row[c] for c in self.columns])
        self._f.write(buf.getvalue())
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, row: Mapping[str, Any]) -> None:
        self._write(row)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- calibration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """``e2e_ms = a * sum_ms + b``, fitted on ``n_fit`` whole configs, checked on others.

    With ``a_depthwise`` set, depthwise layers get their own slope:
    ``e2e_ms = a * (sum_ms - depthwise_ms) + a_depthwise * depthwise_ms + b``. With layers
    timed *alone*, a depthwise conv (memory-bound) costs more inside a network than alone
    (ONNX Runtime, MobileNetV2: about 1.5x), which one slope cannot follow. With layers
    timed inside networks it does not (in-config / table 1.03-1.04 for depthwise as for
    the other classes, latency_tables/README.md), and the second slope is kept only when
    it predicts left-out configs better (:func:`fit_calibration`).
    """

    a: float
    b: float
    n_fit: int
    holdout: Mapping[str, float] = field(default_factory=dict)
    a_depthwise: float | None = None

    def apply(self, sum_ms: float, depthwise_ms: float = 0.0) -> float:
        if self.a_depthwise is None:
            return self.a * sum_ms + self.b
        return self.a * (sum_ms - depthwise_ms) + self.a_depthwise * depthwise_ms + self.b

    def to_dict(self) -> dict[str, Any]:
        model = ("e2e_ms = a * sum_ms + b" if self.a_depthwise is None else
                 "e2e_ms = a * (sum_ms - depthwise_ms) + a_depthwise * depthwise_ms + b")
        return {"model": model, **asdict(self), "holdout": dict(self.holdout)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Calibration | None":
        if not d:
            return None
        a_dw = d.get("a_depthwise")
        return cls(float(d["a"]), float(d["b"]), int(d.get("n_fit", 0)), dict(d.get("holdout") or {}),
                   None if a_dw is None else float(a_dw))


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``y = a x + b`` minimizing the *relative* squared error ``sum(((a x + b) / y - 1) ** 2)``.

    Relative, because accuracy is judged in percent: an ordinary fit lets the big
    configs dominate and leaves the small ones several percent off. With fewer than 3
    distinct points, or where noise tilts the line to a slope <= 0 (meaningless: a bigger
    layer sum never makes a network faster): ``a = sum(y) / sum(x)``, ``b = 0``.
    """
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    proportional = float(np.sum(y) / max(np.sum(x), 1e-12)), 0.0
    if len(x) < 3 or np.ptp(x) <= 1e-12:
        return proportional
    (a, b), *_ = np.linalg.lstsq(np.c_[x / y, 1.0 / y], np.ones_like(y), rcond=None)
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):
        return proportional
    return float(a), float(b)


def _fit_two(s, d, y):
    import numpy as np

    (a, a_dw, b), *_ = np.linalg.lstsq(np.c_[(s - d) / y, d / y, 1.0 / y], np.ones_like(y), rcond=None)
    return float(a), float(a_dw), float(b)


def _loo_rms(s, d, y, two: bool) -> float:
    """Leave-one-out RMS relative error of the one-slope (or two-slope) fit."""
    import numpy as np

    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        if two:
            a, a_dw, b = _fit_two(s[keep], d[keep], y[keep])
            p = a * (s[i] - d[i]) + a_dw * d[i] + b
        else:
            a, b = fit_line(s[keep], y[keep])
            p = a * s[i] + b
        errs.append(p / y[i] - 1.0)
    return float(np.sqrt(np.mean(np.square(errs))))


def fit_calibration(sums: Sequence[float], depthwise: Sequence[float], e2e: Sequence[float],
                    slope_range: tuple[float, float] = (0.5, 2.5)) -> tuple[float, float | None, float]:
    """``(a, a_depthwise, b)`` of :class:`Calibration` by relative least squares.

    A depthwise slope of its own is a second parameter fitted on a few configs whose
    depthwise and other layer times are strongly correlated (0.92-0.94 on MobileNetV2 and
    MobileNetV3: the depthwise width is the expansion width), so it is poorly determined
    and can land anywhere (0.62-1.16 measured) without predicting better. It is used only
    where it can be fitted (depthwise time that varies, at least 8 configs), both slopes
    come out in ``slope_range``, and it predicts left-out configs better than one slope
    (leave-one-out RMS relative error at least 10% lower); otherwise ``a_depthwise`` is
    None and the fit is :func:`fit_line`'s.
    """
    import numpy as np

    s, d, y = (np.asarray(v, float) for v in (sums, depthwise, e2e))
    a, b = fit_line(s, y)
    if len(y) >= 8 and np.ptp(d) > 1e-9 and np.ptp(s - d) > 1e-9:
        a2, a_dw, b2 = _fit_two(s, d, y)
        lo, hi = slope_range
        if lo <= a2 <= hi and lo <= a_dw <= hi and _loo_rms(s, d, y, True) < 0.9 * _loo_rms(s, d, y, False):
            return a2, a_dw, b2
    return a, None, b


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np
    import pandas as pd

    if len(x) < 2:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Share of predictions within +-5% / +-10% of the measurement, Spearman, worst error."""
    import numpy as np

    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    err = p / m - 1.0
    return {"n": int(len(m)), "within_5pct": float(np.mean(np.abs(err) <= 0.05)),
            "within_10pct": float(np.mean(np.abs(err) <= 0.10)), "spearman": spearman(p, m),
            "mean_abs_err_pct": float(np.mean(np.abs(err)) * 100), "max_abs_err_pct": float(np.max(np.abs(err)) * 100)}


# -- the table ----------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return _is_number(v) and float(v) == int(v) and v >= 1


# Bounds of every measurement-protocol value a table's metadata can hand to a profiler
# (verify and resumed profiles rebuild the profiler from it): a crafted min_reps=1e12
# must not make `hwslim verify` sample for ever. Each range holds the defaults with a
# wide margin. name -> (low, high, whole number)
PROTOCOL_BOUNDS = {
    "warmup_runs": (0, 10_000, True), "warmup_ms": (0.0, 600_000.0, False), "budget_ms": (0.0, 600_000.0, False),
    "min_reps": (1, 100_000, True), "max_reps": (1, 1_000_000, True), "max_rel_iqr": (0.0, 100.0, False),
    "retries": (0, 100, True),
}
SETTING_BOUNDS = {  # other numeric profiler settings -> (low, high, whole number)
    "threads": (1, 4096, True), "network_runs": (1, 100_000, True), "workspace_mib": (1, 1 << 20, True),
    "optimization_level": (0, 5, True), "target_replay_ms": (0.0, 600_000.0, False), "group_size": (1, 100_000, True),
    "group_mib": (0.0, 1 << 20, False),
}


def _check_protocol_values(settings: Mapping[str, Any], bad) -> None:
    def check(where: str, value: Any, low: float, high: float, whole: bool) -> None:
        ok = _is_number(value) and low <= value <= high and (not whole or float(value) == int(value))
        if not ok:
            kind = "a whole number" if whole else "a number"
            raise bad(f"has {where}={value!r}, not {kind} from {low:g} to {high:g}")

    for proto in ("protocol", "e2e_protocol"):
        d = settings.get(proto)
        if d is None:
            continue
        if not isinstance(d, dict):
            raise bad(f"has settings.{proto}={d!r}, not an object")
        for key, (low, high, whole) in PROTOCOL_BOUNDS.items():
            if key in d:
                check(f"settings.{proto}.{key}", d[key], low, high, whole)
        if "min_reps" in d and "max_reps" in d and d["min_reps"] > d["max_reps"]:
            raise bad(f"has settings.{proto}.min_reps={d['min_reps']!r} above max_reps={d['max_reps']!r}")
    for key, (low, high, whole) in SETTING_BOUNDS.items():
        if settings.get(key) is not None:
            check(f"settings.{key}", settings[key], low, high, whole)


def _check_entries(rows: Sequence[Mapping[str, str]], csv_path: Path) -> dict[tuple, Any]:
    """Entries of a table's rows; refuse (TableError) a value no measurement gives, or a repeated key."""
    entries: dict[tuple, Any] = {}
    for line, row in enumerate(rows, start=2):
        def bad(problem: str) -> TableError:
            return TableError(f"latency table {csv_path}, line {line}: {problem}; re-run hwslim profile")

        try:
            sig, t = signature_from_row(row), timing_from_row(row)
        except (ValueError, KeyError) as e:
            raise bad(f"unreadable ({e})") from None
        if not (math.isfinite(t.median_ms) and t.median_ms >= 0):
            raise bad(f"median_ms={row['median_ms']} is not a time (a finite number, 0 or more)")
        for name in ("iqr_ms", "p90_ms"):
            v = getattr(t, name)
            if not (math.isfinite(v) and v >= 0):
                raise bad(f"{name}={row[name]} is not a finite number, 0 or more")
        if t.n < 1:
            raise bad(f"n={row['n']} is not a sample count")
        if t.ref_ms is not None and not (math.isfinite(t.ref_ms) and t.ref_ms > 0):
            raise bad(f"ref_ms={row['ref_ms']} is not a time (a finite number above 0)")
        if any(isinstance(v, int) and v < 0 for v in sig):
            raise bad("a negative size in its key")
        if sig in entries:
            raise bad("repeats the key of an earlier row (one measurement per layer shape)")
        entries[sig] = t
    return entries


def _check_meta(meta: Mapping[str, Any], meta_path: Path) -> None:
    """Refuse (TableError, one line) metadata that lacks or garbles what the table's users read."""
    def bad(problem: str) -> TableError:
        return TableError(f"{meta_path}: metadata {problem}; re-run hwslim profile")

    for key in ("device", "backend", "model", "dtype"):
        if key not in meta:
            raise bad(f"lacks {key!r}")
        if not isinstance(meta[key], str) or not meta[key]:
            raise bad(f"has {key}={meta[key]!r}, not a name")
    if "settings" not in meta:
        raise bad("lacks 'settings'")
    settings = meta["settings"]
    if not isinstance(settings, dict):
        raise bad(f"has settings={settings!r}, not an object")
    for key in ("threads", "batch", "input_size"):
        if key not in meta:
            raise bad(f"lacks {key!r}")
        if not _is_count(meta[key]):
            raise bad(f"has {key}={meta[key]!r}, not a whole number >= 1")
    if "threads" in settings and settings["threads"] is not None:
        if not _is_count(settings["threads"]):
            raise bad(f"has settings.threads={settings['threads']!r}, not a whole number >= 1")
        if settings["threads"] != meta["threads"]:
            raise bad(f"is inconsistent (threads={meta['threads']!r} but settings.threads={settings['threads']!r})")
    if "dtype" in settings and settings["dtype"] is not None and settings["dtype"] != meta["dtype"]:
        raise bad(f"is inconsistent (dtype={meta['dtype']!r} but settings.dtype={settings['dtype']!r})")
    _check_protocol_values(settings, bad)
    ref = meta.get("reference")
    if ref is not None and not (isinstance(ref, dict) and _is_number(ref.get("level_ms")) and ref["level_ms"] > 0):
        raise bad(f"has reference={ref!r}, not an object with a positive level_ms")
    if not _is_number(meta.get("width_mult")) or meta["width_mult"] <= 0:
        raise bad(f"has width_mult={meta.get('width_mult')!r}, not a positive number")
    cal = meta.get("calibration")
    if meta.get("status") == "complete" or cal is not None:
        if not isinstance(cal, dict):
            raise bad("lacks a 'calibration' object" if cal is None else f"has calibration={cal!r}, not an object")
        for key in ("a", "b"):
            if not _is_number(cal.get(key)):
                raise bad(f"has calibration.{key}={cal.get(key)!r}, not a number" if key in cal
                          else f"calibration lacks {key!r}")
        if cal.get("a_depthwise") is not None and not _is_number(cal["a_depthwise"]):
            raise bad(f"has calibration.a_depthwise={cal['a_depthwise']!r}, not a number")
        for key in ("a", "a_depthwise"):  # a bigger layer sum never makes a network faster
            if cal.get(key) is not None and not cal[key] > 0:
                raise bad(f"has calibration.{key}={cal[key]!r}, not a positive slope")
        if "n_fit" in cal and not (_is_number(cal["n_fit"]) and float(cal["n_fit"]) == int(cal["n_fit"])):
            raise bad(f"has calibration.n_fit={cal['n_fit']!r}, not a whole number")
        if cal.get("holdout") is not None and not isinstance(cal["holdout"], dict):
            raise bad(f"has calibration.holdout={cal['holdout']!r}, not an object")


class LatencyTable:
    """Measured entries (signature -> Timing) plus metadata; predicts whole-config latency."""

    def __init__(self, meta: Mapping[str, Any], entries: Mapping[tuple, Any], path: Path | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta)
        self.entries: dict[tuple, Any] = dict(entries)
        self.path = path

    # -- I/O --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> "LatencyTable":
        """Read a table (give the .csv, the .json or the stem). Missing or corrupt: TableError."""
        if Path(path).is_dir():
            raise TableError(f"latency table {path} is a directory; give the table's .csv file")
        csv_path, meta_path, _ = table_paths(path)
        if not meta_path.exists() or not csv_path.exists():
            missing = csv_path if not csv_path.exists() else meta_path
            raise TableError(f"latency table {missing} not found (run `hwslim profile` to measure one)")
        try:
            meta = jsonio.load(meta_path)
        except (OSError, ValueError) as e:  # ValueError: malformed, not UTF-8 or too deep
            raise TableError(f"latency table metadata {meta_path} is unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TableError(f"{meta_path} is not a hwslim latency table")
        if meta.get("format_version") not in READ_VERSIONS:
            raise TableError(f"{meta_path}: table format version {meta.get('format_version')!r} "
                             f"(this hwslim reads {FORMAT_VERSION})")
        _check_meta(meta, meta_path)
        try:
            rows, _ = read_rows(csv_path, COLUMNS)
        except (OSError, ValueError, KeyError) as e:
            raise TableError(f"latency table {csv_path} is corrupt ({e})") from None
        entries = _check_entries(rows, csv_path)
        table = cls(meta, entries, csv_path)
        if not allow_incomplete and meta.get("status") != "complete":
            raise TableError(f"latency table {csv_path} is incomplete ({len(entries)}/{meta.get('entries_expected', '?')} "
                             f"entries); run the same `hwslim profile` command again to finish it")
        return table

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole table atomically (entries CSV, then metadata JSON)."""
        csv_path, meta_path, _ = table_paths(path)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        w.writeheader()
        for sig, t in self.entries.items():
            w.writerow(entry_row(sig, t))
        atomic_write_text(csv_path, buf.getvalue())
        atomic_write_text(meta_path, json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        self.path = csv_path
        return csv_path

    def to_frame(self):
        """The entries as a pandas DataFrame (the CSV's columns)."""
        import pandas as pd

        return pd.DataFrame([entry_row(sig, t) for sig, t in self.entries.items()], columns=list(COLUMNS))

    # -- lookups ------------------------------------------------------------------------------
    @property
    def calibration(self) -> Calibration | None:
        return Calibration.from_dict(self.meta.get("calibration"))

    @property
    def reference_level_ms(self) -> float | None:
        """The reference's time (ms) at this table's level: its times and predictions are ms at
        that level (``meta["reference"]``, :func:`reference_meta`); None for tables measured
        before hwslim timed a reference (format 1 and 2): their times are as measured."""
        ref = self.meta.get("reference")
        return float(ref["level_ms"]) if isinstance(ref, dict) and _is_number(ref.get("level_ms")) else None

    def missing(self, specs: Iterable[LayerSpec]) -> list[LayerSpec]:
        return [s for s in specs if (sig := s.signature()) is not None and sig not in self.entries]

    def layer_ms(self, spec: LayerSpec) -> float:
        """The measured median of ``spec``'s entry (uncalibrated; 0 for free ops: views, dropout)."""
        sig = spec.signature()
        if sig is None:
            return 0.0
        try:
            return self.entries[sig].median_ms
        except KeyError:
            raise TableError(self._missing_message(spec)) from None

    def sum_ms(self, specs: Iterable[LayerSpec]) -> float:
        """Sum of the layers' medians (what calibration maps to whole-model latency)."""
        return math.fsum(self.layer_ms(s) for s in specs)

    def depthwise_ms(self, specs: Iterable[LayerSpec]) -> float:
        """Sum of the depthwise layers' medians (the part calibration may scale apart)."""
        return math.fsum(self.layer_ms(s) for s in specs if s.depthwise)

    def predict_ms(self, specs: Sequence[LayerSpec]) -> float:
        """Predicted end-to-end latency of a network given as its layer specs (calibrated sum)."""
        total = self.sum_ms(specs)
        cal = self.calibration
        if cal is None:
            return total
        return cal.apply(total, self.depthwise_ms(specs) if cal.a_depthwise is not None else 0.0)

    def lower_bound_ms(self, net, batch: int = 1, input_size: int | None = None) -> float:
        """A latency no config of ``net`` can beat: the calibrated sum of every layer's fastest entry.

        The calibration is increasing in every layer's time (positive slopes), so taking
        each layer at its own fastest width bounds every config's prediction from below,
        whether or not one config has all those widths at once.
        """
        from hwslim.latency.entries import node_entries

        total = dw = 0.0
        for entries in node_entries(net, batch, input_size):
            times = [self.layer_ms(spec) for spec, _ in entries.values()]
            if times:
                fastest = min(times)
                total += fastest
                dw += fastest if next(iter(entries.values()))[0].depthwise else 0.0
        cal = self.calibration
        return total if cal is None else cal.apply(total, dw if cal.a_depthwise is not None else 0.0)

    def _missing_message(self, spec: LayerSpec) -> str:
        sig = ", ".join(f"{k}={v}" for k, v in zip(SIGNATURE_FIELDS, spec.signature()) if v != "")
        where = self.path or "the latency table"
        return (f"{where} has no entry for layer {spec.name!r} ({sig}); it was measured for "
                f"{self.meta.get('model')} x{self.meta.get('width_mult')} at {self.meta.get('input_size')}px, "
                f"batch {self.meta.get('batch')}")

    # -- compatibility --------------------------------------------------------------------------
    def mismatches(self, net=None, *, batch: int | None = None, input_size: int | None = None,
                   threads: int | None = None, dtype: str | None = None, backend: str | None = None,
                   machine: bool = True) -> list[str]:
        """What differs between this table's setup and the intended use (empty: compatible).

        ``batch``, ``threads``, ``dtype`` and ``backend`` (a name or alias, ``"onnxruntime"``)
        are the deployment's: a table measured at another one is refused, as a table of
        another machine is (``machine``).
        """
        m = self.meta
        want: dict[str, Any] = {}
        out = []
        if net is not None:
            size = input_size if input_size is not None else net.input_size
            want["input_size"] = size
            same_net = (m.get("model") == net.name and _is_number(m.get("width_mult"))
                        and abs(float(m["width_mult"]) - net.width_mult) < 1e-9)
            if not same_net and m.get("input_size") == size:  # a table serves any graph whose shapes it holds
                b = batch if batch is not None else int(m.get("batch", 1))
                missing, total = self.uncovered(net, batch=b, input_size=size)
                if missing:
                    out.append(f"only {total - missing} of the {total} layer shapes of {net.name} "
                               f"x{net.width_mult:g} at {size}px (it was measured for {m.get('model')} "
                               f"x{m.get('width_mult'):g} at {m.get('input_size')}px)")
        elif input_size is not None:
            want["input_size"] = input_size
        if batch is not None:
            want["batch"] = batch
        if dtype is not None:
            want["dtype"] = dtype
        if threads is not None:
            want["threads"] = threads
        if backend is not None:
            from profilers import ALIASES

            want["backend"] = ALIASES.get(backend, backend)
        for key, value in want.items():
            have = m.get(key)
            same = (abs(float(have) - float(value)) < 1e-9) if key == "width_mult" and have is not None else have == value
            if not same:
                out.append(f"{key.replace('_', ' ')} {have} (wanted: {value})")
        if machine:
            out += self._machine_mismatches()
        return out

    def uncovered(self, net, batch: int = 1, input_size: int | None = None) -> tuple[int, int]:
        """(layer shapes of ``net``'s configs this table lacks, all of them)."""
        from hwslim.latency.entries import enumerate_entries

        sigs = [s.signature() for s in enumerate_entries(net, batch, input_size)]
        return sum(1 for sig in sigs if sig not in self.entries), len(sigs)

    def _machine_mismatches(self) -> list[str]:
        from profilers import backend_class, profiler_for_table
        from profilers.base import ProfilerError

        backend = self.meta.get("backend")
        where = self.path or "latency table"
        try:
            cls = backend_class(backend)
            if not cls.is_available():
                return [f"backend {backend} (not available here: {cls.unavailable_reason()})"]
            profiler = profiler_for_table(self)
        except TableError:
            raise
        except ProfilerError as e:
            return [f"backend {backend} ({e})"]
        except KeyError as e:
            raise TableError(f"{where}: metadata lacks {e}; re-run hwslim profile") from None
        except (TypeError, ValueError) as e:
            raise TableError(f"{where}: metadata this hwslim cannot use ({e}); re-run hwslim profile") from None
        try:
            return profiler.mismatches(self.meta)
        except TableError:
            raise
        except KeyError as e:
            raise TableError(f"{where}: metadata lacks {e}; re-run hwslim profile") from None
        except (TypeError, ValueError) as e:
            raise TableError(f"{where}: metadata this hwslim cannot use ({e}); re-run hwslim profile") from None
        finally:
            profiler.close()

    def check_compatible(self, net=None, *, batch: int | None = None, input_size: int | None = None,
                         threads: int | None = None, dtype: str | None = None, backend: str | None = None,
                         force: bool = False) -> None:
        """Refuse (TableError, one line) to use a table measured on another setup, unless ``force``."""
        if force:
            return
        diff = self.mismatches(net, batch=batch, input_size=input_size, threads=threads, dtype=dtype,
                               backend=backend)
        if diff:
            where = self.path or "latency table"
            raise TableError(f"{where} was measured with {'; '.join(diff)}; measure a table for this setup "
                             f"with `hwslim profile`, or pass --force-table to use it anyway")

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        m = self.meta
        return (f"LatencyTable({m.get('model')} x{m.get('width_mult')} {m.get('input_size')}px b{m.get('batch')}, "
                f"{m.get('backend')} on {m.get('device_name')}, {len(self)} entries)")


def prepare_table_location(csv_path: Path, meta_path: Path, e2e_path: Path, *, force: bool = False) -> None:
    """Before a profile measures anything: the location must be writable, temporaries of a
    killed run go, and entry or end-to-end files without their metadata are refused.

    Such files are not a run to resume (the metadata is written before any row): they
    are left from another measurement, maybe of another input size, and their rows
    would be taken for this one's (a stale ``.e2e.csv`` becomes the calibration).
    ``force`` deletes them.
    """
    from hwslim.core.outputs import check_output, remove_stale_temporaries

    check_output(csv_path, kind="file")
    remove_stale_temporaries(csv_path.parent)
    if meta_path.exists():
        return
    orphans = [p for p in (csv_path, e2e_path) if p.exists()]
    if orphans and not force:
        raise TableError(f"{orphans[0]} is left from another measurement (there is no {meta_path.name} beside it), "
                         f"so its rows cannot be trusted for this one; delete it, give another --out, or pass "
                         f"--force to measure from scratch")
    for p in orphans:
        p.unlink()


def new_meta(profiler_meta: Mapping[str, Any], *, model: str, width_mult: float, input_size: int, batch: int,
             entries_expected: int, method: str) -> dict[str, Any]:
    """The metadata of a table being measured (``status: measuring`` until calibrated)."""
    import datetime as dt

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "measuring",
        "model": model, "width_mult": float(width_mult), "input_size": int(input_size), "batch": int(batch),
        "entries_expected": int(entries_expected), "method": method, "hwslim_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "calibration": None,
    }
    meta.update({k: v for k, v in profiler_meta.items() if k not in meta})
    return meta


def reference_meta(level, description: str) -> dict[str, Any]:
    """``meta["reference"]``: the reference's level (a :class:`profilers.base.ReferenceTime`: ms of
    each part and their sum) the table's times are in, and what the reference is."""
    return {"level_ms": round(level.ms, 6), "parts_ms": {k: round(v, 6) for k, v in level.parts},
            "networks": description}


# how far the probe recorded at a format-2 table's start and end may differ for its level to be taken
# from them (:func:`convert_from_probe`): the table must not have been measured across a speed change
PROBE_AGREEMENT = 0.05


def convert_from_probe(path: str | os.PathLike) -> Path:
    """Convert a table measured before hwslim timed a reference (format 1 or 2) to reference units
    where it cannot be measured again: its level is taken from the machine-speed probe recorded at
    the start and end of its profile (``meta["conditions"]``).

    The probe network is the reference's two networks run as one (:func:`profilers.base.reference_specs`
    cuts it in two): on the 2-core AMD EPYC development VM the sum of the two timed apart was
    0.997x the probe at load 2.6 and 1.04x at load 4.4 (medians of 12 and 30 interleaved pairs),
    so a converted level is good to about 4%. The entries and the calibration are kept as they
    are (the table was measured at that level); only the metadata gains ``reference`` (marked
    ``from_probe``, without per-network parts, so no disagreement check applies). On the table's
    own machine ``hwslim profile ... --recalibrate`` is better: it measures the reference.
    Refused (TableError) for a table that has a reference, recorded no probe, or whose two probes
    differ by more than :data:`PROBE_AGREEMENT` (measured across a change of the machine's speed)."""
    table = LatencyTable.load(path)
    if table.reference_level_ms is not None:
        raise TableError(f"{table.path} is already in reference units (level {table.reference_level_ms:.4g} ms)")
    cond = table.meta.get("conditions") or {}
    probes = [float(cond[k]["probe_ms"]) for k in ("start", "end")
              if isinstance(cond.get(k), dict) and _is_number(cond[k].get("probe_ms")) and cond[k]["probe_ms"] > 0]
    if len(probes) < 2:
        raise TableError(f"{table.path} recorded no speed probe at its start and end; measure it again on its "
                         "machine (hwslim profile ... --recalibrate converts it there)")
    if max(probes) / min(probes) - 1 > PROBE_AGREEMENT:
        raise TableError(f"{table.path} was measured across a change of the machine's speed (probe {probes[0]:.3f} "
                         f"-> {probes[1]:.3f} ms); measure it again on its machine")
    level = sum(probes) / len(probes)
    table.meta["reference"] = {"level_ms": round(level, 6), "networks": "the machine-speed probe recorded with the "
                               "table (the reference's two networks run as one: within about 4% of their sum)",
                               "from_probe": {"start_ms": probes[0], "end_ms": probes[1]}}
    table.meta["format_version"] = FORMAT_VERSION
    return table.save(table.path)


def find_table(device: str, model, width_mult: float | None = None, *, batch: int = 1,
               input_size: int | None = None, threads: int | None = None, backend: str | None = None,
               dtype: str | None = None, root: str | os.PathLike | None = None, spec: str | None = None) -> Path:
    """The table for this machine and setup, from the first directory of
    :func:`table_search_path` (``root`` first) that holds one.

    ``model`` is a supernet or a ``--model`` spec (``spec``: how to name it in the hint
    to measure one; default the spec or the model's name). ``None`` means: the model's default
    width multiplier and input size; any thread count (1 preferred); the device's default
    backend; any dtype (float32 preferred).
    """
    import torch

    from hwslim.importing.specs import load_model
    from profilers import backend_class, default_backend

    if isinstance(model, str):
        with torch.device("meta"):
            net = load_model(model, width_mult=width_mult)
    else:
        net = model
    size = input_size if input_size is not None else net.input_size
    backend = backend_class(backend).backend if backend else default_backend(device)  # alias -> name
    name = backend_class(backend).machine_name()
    prefix = f"{net.name}-x{net.width_mult:g}-{size}px-b{batch}-{backend}-t"
    searched = table_search_path(root)
    for folder in (d / f"{device}-{slug(name)}" for d in searched):
        found = []
        if folder.is_dir():
            for p in folder.glob(prefix + "*.csv"):
                if p.name.endswith(".e2e.csv"):
                    continue
                m = re.fullmatch(r"t(\d+)-(\w+)\.csv", p.name[len(prefix) - 1:])
                if not m or (threads is not None and int(m.group(1)) != threads) or (dtype and m.group(2) != dtype):
                    continue
                found.append((int(m.group(1)) != 1, m.group(2) != "float32", p))
        if found:
            return sorted(found)[0][2]
    spec = spec or (model if isinstance(model, str) else net.name)
    cmd = (f"hwslim profile --device {device} --backend {backend} --model {spec} --width-mult {net.width_mult:g} "
           f"--input-size {size} --batch {batch}" + (f" --threads {threads}" if threads else ""))
    raise TableError(f"no latency table for {net.name} x{net.width_mult:g} at {size}px, batch {batch}, "
                     f"on {device} ({name}) in {', '.join(str(d) for d in searched)}; measure one with: {cmd}")


def resolve_table(model, *, table: str | os.PathLike | None = None, device: str | None = None, batch: int = 1,
                  root: str | os.PathLike | None = None, spec: str | None = None) -> LatencyTable:
    """The latency table a search prices latency budgets with, loaded: the file ``table``
    (``--table``), else this machine's table for ``model`` on ``device`` (``--device``:
    :func:`find_table` with ``batch``, ``root`` and ``spec``). Neither given is refused."""
    if table:
        return LatencyTable.load(table)
    if device:
        return LatencyTable.load(find_table(device, model, batch=batch, root=root, spec=spec))
    raise HwslimError("a --latency-ms budget needs --table PATH or --device cpu|cuda")


__all__ = ["COLUMNS", "E2E_COLUMNS", "Calibration", "reference_meta", "convert_from_probe", "timing_fields", "LatencyTable", "RowWriter", "accuracy", "default_table_path", "find_table",
           "fit_calibration", "fit_line", "read_rows", "resolve_table", "spearman", "table_dir", "table_name",
           "table_paths", "table_search_path", "user_table_dir", "checked_table_dir"]
