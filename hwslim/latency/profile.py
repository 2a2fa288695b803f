"""Measure a latency table for a supernet: every entry its grids can produce, then calibrate.

``profile(ProfileSettings(device="cpu", model="mobilenet_v2"))`` does, resumably:

1. **Enumerate** (:func:`hwslim.latency.entries.enumerate_entries`): for every node, every combination of the
   grid widths of its input and output units; deduplicated by signature, so a shape that
   several layers share is measured once. MobileNetV2 1.5x at 224 has 2,032 entries.
2. **Measure** them with a :mod:`profilers` backend. Backends that time layers inside
   whole networks (ONNX Runtime here, TensorRT later) get a small set of configs that
   together contain every entry ``contexts`` times (:func:`design_configs`, a greedy
   covering: about 142 networks per round for MobileNetV2 1.5x; ONNX Runtime's default is
   4 rounds, the other in-network backends' 2, ``--contexts`` to change);
   the others time each entry alone. Each entry is appended to the CSV with flush +
   fsync as soon as it is final, so a killed run (even ``kill -9``) loses at most the
   entries in flight (for in-network backends: those whose last network had not been
   timed yet), and the next run skips what is done.
3. **Calibrate**: measure whole configs end to end (the exported ONNX model of the
   materialized network, same backend and protocol, interleaved; when entries are
   measured in this run, in rounds spread over the time they take, so layers and whole
   models see the same stretch of the machine's time: :class:`_SpreadCalibration`), fit
   ``e2e = a * sum + b`` (depthwise layers on their own slope where that fits) on
   ``calib_configs`` of them and report accuracy on ``holdout_configs`` others. These
   are random configs of random width ranges (narrow to wide), never the uniform ones,
   so the uniform widths stay available as a held-out check.

Every time is measured against a reference (:func:`profilers.base.reference_specs`): its
level is timed at the start (``meta["reference"]``) and the reference again between the
designed networks, the entries timed alone and the calibration turns; each time is brought
to the level by the reference times beside it, so the table is in reference units: ms at
its level, whatever the machine's speed did meanwhile (:meth:`profilers.base.Profiler.use_reference`).

The conditions the table is measured under (CPU and its flags, load, a machine-speed
probe; :mod:`hwslim.latency.conditions`) are taken at the start and at the end and recorded in
``meta["conditions"]``; when they changed markedly in between (the probe, the other
running threads), ``meta["conditions"]["changed"]`` says how and a warning is logged:
the table may be unreliable. Entries of other tables are borrowed only from tables
whose conditions compare.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from hwslim.core import jsonio
from hwslim.core.outputs import owned
from hwslim.core.config import ChannelConfig, atomic_write_text
from hwslim.core.errors import HwslimError, TableError
from hwslim.core.graph import LayerSpec, Node
from hwslim.latency.entries import enumerate_entries, node_entries, spec_fn
from hwslim.latency.table import (COLUMNS, E2E_COLUMNS, FORMAT_VERSION, Calibration, LatencyTable, RowWriter,
                                  accuracy, default_table_path, entry_row, fit_calibration, new_meta,
                                  prepare_table_location, read_rows, reference_meta, signature_from_row, table_paths,
                                  timing_fields, timing_from_row)
from hwslim.core.units import GRID_STEPS

if TYPE_CHECKING:
    from profilers.base import Timing

DEFAULT_MODEL = "mobilenet_v2"


@dataclass(frozen=True)
class ProfileSettings:
    """What ``hwslim profile`` measures and how. ``None`` means the default."""

    device: str = "cpu"
    backend: str | None = None
    model: str = DEFAULT_MODEL
    width_mult: float | None = None
    input_size: int | None = None
    batch: int = 1
    threads: int | None = None
    dtype: str = "float32"
    out: str | None = None
    calib_configs: int = 16
    holdout_configs: int = 16
    seed: int = 0
    force: bool = False
    quick: bool = False  # short protocol (tests, smoke runs)
    in_network: bool | None = None  # None: the backend's default
    contexts: int | None = None  # networks each entry is timed in (in-network backends); None: the backend's
    # default (Profiler.default_contexts: ONNX Runtime 4, others 2), --quick: 2
    channels_last: bool = False  # torch_cuda: NHWC tensors
    keep: str | None = None  # imported models: modules whose name matches keep their width
    fix_unsupported: bool = False  # imported models: units reaching a channel shuffle or slice keep their width
    outputs: str = "full"  # imported models: "raw" leaves a detector's decoding out

    def __post_init__(self) -> None:
        """Refuse impossible settings before anything is measured or any file is touched."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [("batch", self.batch, 1, False), ("input_size", self.input_size, 1, True),
                  ("threads", self.threads, 1, True), ("calib_configs", self.calib_configs, 3, False),
                  ("holdout_configs", self.holdout_configs, 0, False), ("contexts", self.contexts, 1, True)]
        for name, value, low, optional in checks:
            if value is None and optional:
                continue
            if not whole(value) or value < low:
                flag = "--" + name.replace("_", "-")
                raise SettingsError(f"{flag} must be a whole number >= {low}, got {value!r}")
        if self.width_mult is not None and not (isinstance(self.width_mult, (int, float))
                                                and 0 < self.width_mult < float("inf")):
            raise SettingsError(f"--width-mult must be a positive number, got {self.width_mult!r}")


class SettingsError(HwslimError):
    """Profile settings that cannot be measured (a negative input size, too few calibration configs)."""


class CalibrationError(TableError):
    """A calibration fit that cannot map layer sums to whole-model latency (the table stays incomplete)."""


@dataclass
class ProfileResult:
    path: Path
    entries: int
    measured: int
    reused: int
    noisy: int
    seconds: float
    calibration: Calibration | None
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        cal = self.calibration
        h = dict(cal.holdout) if cal else {}
        return {"table": str(self.path), "entries": self.entries, "measured": self.measured, "reused": self.reused,
                "noisy": self.noisy, "seconds": round(self.seconds, 1),
                "calib_a": round(cal.a, 4) if cal else None,
                "calib_a_dw": round(cal.a_depthwise, 4) if cal and cal.a_depthwise is not None else None,
                "calib_b_ms": round(cal.b, 4) if cal else None,
                "holdout_n": h.get("n"), "within_5pct": h.get("within_5pct"), "within_10pct": h.get("within_10pct"),
                "spearman": h.get("spearman"),
                "conditions_changed": (self.meta.get("conditions") or {}).get("changed")}
















def design_configs(net, wanted: Iterable[tuple], batch: int = 1, input_size: int | None = None,
                   seed: int = 0, contexts: int = 1) -> list[ChannelConfig]:
    """Configs that together contain every wanted signature ``contexts`` times (greedy covering).

    Each config starts from one uncovered entry of the node with the most uncovered
    entries, then sets every other unit, twice over, to the grid width that covers the
    most still-uncovered entries (ties at random, so contexts vary). An entry timed in
    two different networks averages over its neighbours' effects on caches.
    """
    wanted = set(wanted)
    rounds = [_cover(net, wanted, batch, input_size, seed + 7919 * r) for r in range(max(1, contexts))]
    # interleaved, so entries complete (and are saved) steadily rather than all at the end
    return [c for group in itertools.zip_longest(*rounds) for c in group if c is not None]


def _signer(net, template: LayerSpec, node: Node) -> Callable[[dict], tuple | None]:
    spec_at = spec_fn(net, node, template)
    return lambda widths: spec_at(widths).signature()


def _cover(net, wanted: set, batch: int, input_size: int | None, seed: int) -> list[ChannelConfig]:
    rng = random.Random(seed)
    per_node = node_entries(net, batch, input_size)
    templates = net.layer_specs(net.full_config(), batch=batch, input_size=input_size)
    signers = [_signer(net, t, n) for t, n in zip(templates, net.nodes)]
    uncovered = set(wanted) & {sig for e in per_node for sig in e}
    unit_nodes = net.unit_nodes()
    units = list(net.units)
    configs = []
    while uncovered:
        counts = [sum(1 for sig in e if sig in uncovered) for e in per_node]
        target = max(range(len(counts)), key=counts.__getitem__)
        sig = rng.choice(sorted((s for s in per_node[target] if s in uncovered), key=str))
        widths = {u: rng.choice(net.units[u].grid) for u in units}
        widths.update(per_node[target][sig][1])
        fixed = set(per_node[target][sig][1])
        for _ in range(2):
            rng.shuffle(units)
            for u in units:
                if u in fixed:
                    continue
                best = None
                for w in net.units[u].grid:
                    widths[u] = w
                    got = len({signers[i](widths) for i in unit_nodes[u]} & uncovered)
                    score = (got, rng.random(), w)
                    best = score if best is None or score > best else best
                widths[u] = best[2]
        uncovered -= {sign(widths) for sign in signers}
        configs.append(net.config_of(widths))
    return configs


# Bands of grid steps the range-type calibration configs cycle through: the widest and the
# narrowest networks first, so the fit spans every size a search can pick. Measured on
# MobileNetV3-Large at 224 (2-core AMD EPYC, quiet): whole-model latency / sum of layer
# medians rose from 0.67 (narrow configs) to 0.99 (wide ones), a per-layer overhead that
# a line fitted on mid-size configs only extrapolates wrongly (69% of held-out configs
# within +-5%, the widest 9.6% low).
_CALIB_BANDS = ((GRID_STEPS - 2, GRID_STEPS), (1, 3), None, None)


def calibration_configs(net, n: int, seed: int = 0, exclude: Iterable[ChannelConfig] = ()) -> list[ChannelConfig]:
    """``n`` distinct random configs, never uniform: half with every unit anywhere on its grid,
    half with widths from a range of grid steps, cycling through the widest steps, the
    narrowest steps and random ranges (:data:`_CALIB_BANDS`)."""
    rng = random.Random(seed)
    seen = {json.dumps(c.widths, sort_keys=True) for c in list(exclude) + net.uniform_configs()}
    out = []
    for i in range(100 * n + 100):
        if len(out) == n:
            break
        if i % 2:  # every unit anywhere on its grid: the mixed widths a search visits
            cfg = net.random_config(rng)
        else:
            band = _CALIB_BANDS[(len(out) // 2) % len(_CALIB_BANDS)]
            if band is None:
                hi = rng.randint(1, GRID_STEPS)
                lo = rng.randint(1, hi)
            else:
                lo, hi = band
            cfg = net.config_of({u: unit.step(rng.randint(lo, hi)) for u, unit in net.units.items()})
        key = json.dumps(cfg.widths, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


# -- end to end -------------------------------------------------------------------------------------
def measure_config(profiler, net, config: ChannelConfig, batch: int = 1, input_size: int | None = None,
                   workdir: str | os.PathLike | None = None) -> "Timing":
    """End-to-end Timing of ``config``: materialize (BN folded), write the backend's model file
    (ONNX; ExecuTorch: ``.pte``), time it."""
    from hwslim.core.materialize import materialize

    size = input_size if input_size is not None else net.input_size
    plain = materialize(net, config, fold_bn=True).eval()
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = profiler.write_model(plain, Path(d) / "model", batch=batch, input_size=size)
        return profiler.time_onnx(path, (batch, net.in_channels, size, size))


def measure_configs(profiler, net, configs: Sequence[ChannelConfig], batch: int = 1, input_size: int | None = None,
                    workdir: str | os.PathLike | None = None, rounds: int | None = None, progress: bool = False
                    ) -> list["Timing"]:
    """End-to-end Timings of many configs, measured interleaved (``Profiler.time_onnx_many``)."""
    from hwslim.core.materialize import materialize

    from profilers.base import E2E_ROUNDS

    rounds = E2E_ROUNDS if rounds is None else rounds
    size = input_size if input_size is not None else net.input_size
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        kind = profiler.model_suffixes[0].lstrip(".").upper()  # ONNX; PTE for ExecuTorch
        bar = _bar(progress, len(configs), f"building whole-config models ({kind})", unit="model")
        paths = []
        for i, cfg in enumerate(configs):
            paths.append(profiler.write_model(materialize(net, cfg, fold_bn=True).eval(), Path(d) / f"{i}",
                                              batch=batch, input_size=size))
            bar.update(1)
        bar.close()
        shape = (batch, net.in_channels, size, size)
        # warm-up plus `rounds` interleaved turns per model
        bar = _bar(progress, len(paths) * (rounds + 1), "timing whole configs end to end", unit="turn")
        try:
            return profiler.time_onnx_many([(p, shape) for p in paths], rounds=rounds,
                                           on_progress=lambda done, total: bar.update(done - bar.n))
        finally:
            bar.close()


# -- the driver -------------------------------------------------------------------------------------
def _settings_kwargs(s: ProfileSettings) -> dict[str, Any]:
    from profilers.base import Protocol

    kw: dict[str, Any] = {"threads": s.threads, "dtype": s.dtype}
    if s.quick:
        kw.update(protocol=Protocol.quick(), e2e_protocol=Protocol.quick())
    if s.in_network is not None:
        kw["in_network"] = s.in_network
    if s.channels_last:
        kw["channels_last"] = True
    return kw


def _same_setup(old: dict, new: dict) -> list[str]:
    keys = ("model", "width_mult", "input_size", "batch", "device", "device_name", "backend", "backend_version",
            "threads", "dtype", "clock", "nchwc_block", "method", "driver_version", "cuda_runtime",
            "cudnn_version", "precision_mode", "channels_last", "allow_tf32", "cuda_graphs", "inference_precision",
            "performance_hint", "delegate", "torch_version")
    return [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in keys if k in new and old.get(k) != new.get(k)]


_MODEL_KEYS = ("model", "width_mult", "input_size")


def _borrow_entries(csv_path: Path, meta: dict, wanted: set, now=None,
                    log: Callable[[str], None] | None = None) -> dict[tuple, Any]:
    """Entries of ``wanted`` that other tables beside ``csv_path`` measured with this setup.

    A table's rows are keyed by layer shape, so a shape another model's table holds (same
    machine, backend and version, threads, batch, dtype, method) is the same measurement,
    if it was measured under the same conditions: with ``now`` (the conditions of this
    run), a table whose recorded conditions do not compare lends nothing.
    """
    from hwslim.latency.conditions import compare_to_table

    if not wanted or not csv_path.parent.is_dir():
        return {}
    setup = {k: v for k, v in meta.items() if k not in _MODEL_KEYS and k != "conditions"}
    found: dict[tuple, Any] = {}
    for other in sorted(csv_path.parent.glob("*.json")):
        other_csv = other.with_suffix(".csv")
        if other_csv == csv_path or not other_csv.is_file() or other.name.startswith("."):
            continue
        try:
            old = jsonio.load(other)
            if not isinstance(old, dict) or _same_setup(old, setup):
                continue
            check = compare_to_table(old, now) if now is not None else None
            if check is not None and not check.reliable:
                if log is not None:
                    log(f"not reusing entries of {other_csv.name}: {check.line('measured under other conditions')}")
                continue
            scale = _level_scale(meta, old)
            if scale is None:
                continue
            rows, _ = read_rows(other_csv, COLUMNS)
            for r in rows:
                sig = signature_from_row(r)
                if sig in wanted and sig not in found:
                    t = timing_from_row(r)
                    found[sig] = replace(t, median_ms=t.median_ms * scale, iqr_ms=t.iqr_ms * scale,
                                         p90_ms=t.p90_ms * scale)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TableError):
            continue  # a table that cannot be read lends nothing
    return found


def _level_scale(meta: Mapping[str, Any], other: Mapping[str, Any]) -> float | None:
    """The factor that brings another table's times to this one's reference level: 1 where
    neither has a reference (times as measured, as before references), None (lends nothing)
    where one has a reference and the other not, or their references differ."""
    mine, theirs = meta.get("reference"), other.get("reference")
    if mine is None and theirs is None:
        return 1.0
    if not isinstance(mine, dict) or not isinstance(theirs, dict) or mine.get("networks") != theirs.get("networks"):
        return None
    try:
        return float(mine["level_ms"]) / float(theirs["level_ms"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _use_reference(profiler, run: "_Resumed", meta: dict, log: Callable[[str], None]) -> None:
    """Set the reference level the table's times are brought to (:meth:`Profiler.use_reference`):
    a resumed table keeps its own; a new one measures it now (``meta["reference"]``). A table
    an older hwslim started without a reference is finished without one (times as measured)."""
    from profilers.base import REFERENCE_DESCRIPTION

    if run.resumed and run.reference is None:
        log("note: this table was started by an older hwslim, without a reference: it is finished as it was "
            "begun, with times as measured; measure it again with --force for times in reference units")
        return
    if run.reference is not None:
        meta["reference"] = run.reference
    else:
        level = profiler.measure_reference()
        if level is None:  # a backend that cannot run the reference: times as measured
            return
        meta["reference"] = reference_meta(level, REFERENCE_DESCRIPTION)
    profiler.use_reference(meta["reference"]["level_ms"])
    log(f"reference level {meta['reference']['level_ms']:.4g} ms: every time is brought to it "
        f"by the reference timed beside it")


def _read_old_meta(meta_path: Path, csv_path: Path, force: bool) -> dict | None:
    """The metadata already at ``meta_path``; None where it is unreadable and ``force`` is set."""
    try:
        old = jsonio.load(meta_path)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
        return old
    except (OSError, UnicodeDecodeError, ValueError):  # json.JSONDecodeError is a ValueError
        if force:
            return None
        raise TableError(f"{meta_path} is not a latency table's metadata (so {csv_path} cannot be resumed); "
                         f"delete it or pass --force") from None


def _seconds(value: Any) -> float:
    try:
        v = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return v if v == v and v >= 0 else 0.0


@dataclass
class _Resumed:
    """Where a run writes its table and what it keeps of an earlier run of the same table.

    ``final``: with ``--force`` over another table, that table's paths; the new one is
    measured beside them and replaces them once complete. ``recorded``: the conditions a
    resumed table recorded; ``first``: those of its first run.
    """

    csv_path: Path
    meta_path: Path
    e2e_path: Path
    final: tuple[Path, Path, Path] | None = None
    spent_before: float = 0.0
    recorded: dict | None = None
    first: Any = None
    resumed: bool = False  # an earlier run of this table is continued
    reference: dict | None = None  # the reference that earlier run recorded


def _resume(settings: ProfileSettings, csv_path: Path, meta_path: Path, e2e_path: Path, meta: dict) -> _Resumed:
    """Check the table already at ``csv_path`` against ``meta`` and take over what it keeps."""
    from hwslim.latency.conditions import Conditions

    run = _Resumed(csv_path, meta_path, e2e_path)
    prepare_table_location(csv_path, meta_path, e2e_path, force=settings.force)
    if not meta_path.exists():
        return run
    old = _read_old_meta(meta_path, csv_path, settings.force)
    diff = _same_setup(old, meta) if old is not None else ["unreadable metadata"]
    if diff and not settings.force:
        raise TableError(f"{csv_path} holds a table measured with other settings ({'; '.join(diff[:3])}); "
                         f"give another --out, or pass --force to measure it again from scratch")
    if diff:
        # the old table stays in place until the new one is complete
        run.final = (csv_path, meta_path, e2e_path)
        run.csv_path, run.meta_path, run.e2e_path = table_paths(csv_path.with_name(f".{csv_path.stem}.new.csv"))
        partial = _read_old_meta(run.meta_path, run.csv_path, True) if run.meta_path.exists() else None
        if partial is None or _same_setup(partial, meta):  # not a forced run of these settings: start over
            for p in (run.csv_path, run.meta_path, run.e2e_path):
                p.unlink(missing_ok=True)
            partial = None
        old = partial or {}
    if not diff or run.final is not None and old:
        meta["created"] = old.get("created", meta["created"])
        run.spent_before = _seconds(old.get("profile_seconds"))
        run.recorded = old.get("conditions") if isinstance(old.get("conditions"), dict) else None
        run.first = Conditions.from_dict(run.recorded.get("start")) if run.recorded else None
        run.resumed = run.csv_path.exists() and run.csv_path.stat().st_size > 0
        run.reference = old.get("reference") if isinstance(old.get("reference"), dict) else None
    return run


def _start_conditions(profiler, first, log: Callable[[str], None]):
    """The conditions now; a resumed table keeps those of its first run (warning where they differ)."""
    from hwslim.latency.conditions import compare, measure_conditions

    cond_start = measure_conditions(profiler)  # before measuring anything
    log(f"conditions: {cond_start.describe()}")
    if first is None:
        return cond_start
    check = compare(first, cond_start, than="when this table's first entries were measured")
    if not check.reliable:
        log(f"warning: {check.line('the resumed table may be unreliable')}")
    return first


def _done_entries(run: _Resumed, meta: dict, entries: Sequence[LayerSpec], cond_start,
                  log: Callable[[str], None]) -> dict[tuple, Any]:
    """The entries already measured: this table's rows, and those borrowed from other tables (appended)."""
    done: dict[tuple, Any] = {}
    if run.csv_path.exists():
        rows, _ = read_rows(run.csv_path, COLUMNS)
        done = {signature_from_row(r): timing_from_row(r) for r in rows}
    meta["conditions"] = {"start": cond_start.to_dict()}
    atomic_write_text(run.meta_path, json.dumps({**meta, "status": "measuring"}, indent=2, sort_keys=True) + "\n")
    borrowed = _borrow_entries(run.csv_path, meta, {s.signature() for s in entries} - set(done), now=cond_start,
                               log=log)
    if borrowed:
        with RowWriter(run.csv_path, COLUMNS) as writer:
            for sig, timing in borrowed.items():
                writer.append(entry_row(sig, timing))
        done.update(borrowed)
        log(f"reused {len(borrowed)} entries measured for other models with this setup "
            f"(under {run.csv_path.parent})")
    return done


def _measure(settings: ProfileSettings, net, profiler, todo: list, done: dict, run: _Resumed, meta: dict,
             progress: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Time the ``todo`` entries into the table (and into ``done``), with the calibration rounds
    spread over them; the calibration configs' timings, by config key, where they were spread."""
    size = net.input_size
    networks = None
    if todo and profiler.in_network:
        contexts = settings.contexts or (2 if settings.quick else profiler.default_contexts)
        meta["contexts"] = contexts
        configs = design_configs(net, {s.signature() for s in todo}, settings.batch, size, settings.seed,
                                 contexts=contexts)
        log(f"timing them inside {len(configs)} designed networks")
        networks = (net.layer_specs(c, batch=settings.batch, input_size=size) for c in configs)
    spread, measured = None, None
    if todo:  # the calibration configs' end-to-end rounds, spread over the entries' measurement
        plan, have = calibration_plan(net, settings, run.e2e_path)
        cal = [c for _, c in plan if _config_key(c) not in have]
        if cal:
            log(f"calibration: timing {len(cal)} whole configs end to end in rounds spread over the entries")
            spread = _SpreadCalibration(profiler, net, cal, settings.batch, size, progress=progress)
    meta["calibration_plan"]["timed"] = "spread over the entries" if spread else "after the entries"
    if spread is not None:  # in-network backends finish most entries late: follow their networks too
        profiler.on_network = lambda n, total: spread.progress(n / total)
    try:
        bar = _bar(progress, len(todo), "entries")
        with RowWriter(run.csv_path, COLUMNS) as writer:
            for k, (spec, timing) in enumerate(profiler.measure_entries(todo, networks), 1):
                writer.append(entry_row(spec, timing))
                done[spec.signature()] = timing
                bar.update(1)
                if spread is not None:
                    spread.progress(k / len(todo))
        bar.close()
        if spread is not None:
            measured = {_config_key(c): t for c, t in zip(cal, spread.timings())}
    finally:
        profiler.on_network = None
        if spread is not None:
            spread.close()
    return measured


def _finish(settings: ProfileSettings, net, profiler, done: dict, measured_entries: bool, run: _Resumed,
            meta: dict, cond_start, measured: dict[str, Any] | None, load_start: float | None,
            start: float, progress: bool, log: Callable[[str], None]) -> tuple[Path, Calibration]:
    """Calibrate, record the conditions and the time spent, write the metadata and put the
    table in place: (its entries CSV, its calibration)."""
    from hwslim.latency.conditions import drift, measure_conditions

    table = LatencyTable(meta, done, run.csv_path)
    e2e_before = run.e2e_path.stat().st_size if run.e2e_path.exists() else -1
    calibration = calibrate(table, profiler, net, settings, run.e2e_path, progress=progress, log=log,
                            measured=measured)
    meta.update(status="complete", entries=len(done), noisy_entries=sum(t.noisy for t in done.values()),
                calibration=calibration.to_dict(), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # a shared machine's load changes latencies: record it next to them
    meta["load_avg_1min"] = [load_start, _load()]
    cond_end = measure_conditions(profiler)
    changed = drift(cond_start, cond_end)
    measured_now = measured_entries or (run.e2e_path.stat().st_size if run.e2e_path.exists() else -1) != e2e_before
    if not measured_now and isinstance(run.recorded, dict) and run.recorded.get("end"):
        # nothing was measured in this run: the table's conditions stay those it was measured under
        meta["conditions"] = run.recorded
    else:
        meta["conditions"] = {"start": cond_start.to_dict(), "end": cond_end.to_dict(),
                              "changed": None if changed.reliable else changed.summary}
    if measured_now and not changed.reliable and meta.get("reference"):
        log(f"note: {changed.line('its times were brought to the reference level as they were measured')}")
    elif measured_now and not changed.reliable:
        log(f"warning: {changed.line('the table may be unreliable; measure it again (--force) when the machine is steady')}")
    # time spent on this table over all (resumed) runs
    meta["profile_seconds"] = round(run.spent_before + time.perf_counter() - start, 1)
    atomic_write_text(run.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if run.final is None:
        return run.csv_path, calibration
    # the new table is complete: it replaces the old one (metadata last)
    for new_file, old_file in zip((run.csv_path, run.e2e_path, run.meta_path),
                                  (run.final[0], run.final[2], run.final[1])):
        if new_file.exists():
            os.replace(new_file, old_file)
        else:
            old_file.unlink(missing_ok=True)
    return run.final[0], calibration


def profile(settings: ProfileSettings, progress: bool = False,
            log: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure (or finish measuring) the table ``settings`` describe; see the module docstring."""
    log = log or (lambda msg: None)
    start = time.perf_counter()
    load_start = _load()
    net, profiler = _open(settings, log)
    size = net.input_size
    lock = ExitStack()
    try:
        pmeta = profiler.metadata()
        entries = enumerate_entries(net, settings.batch, size)
        csv_path, meta_path, e2e_path, meta = _table_for(settings, net, profiler, pmeta, len(entries))
        lock.enter_context(owned(csv_path, flag="--out" if settings.out else "the table"))  # rows: only under it
        if hasattr(profiler, "run_overhead_ms"):
            meta["run_overhead_ms"] = profiler.run_overhead_ms()
        meta["calibration_plan"] = {"fit": settings.calib_configs, "holdout": settings.holdout_configs,
                                    "seed": settings.seed}
        run = _resume(settings, csv_path, meta_path, e2e_path, meta)
        cond_start = _start_conditions(profiler, run.first, log)
        _use_reference(profiler, run, meta, log)
        done = _done_entries(run, meta, entries, cond_start, log)
        todo = [s for s in entries if s.signature() not in done]
        random.Random(settings.seed).shuffle(todo)  # spread slow periods of a busy machine over layers
        reused = len(entries) - len(todo)
        log(f"{len(entries)} entries ({reused} already measured) for {net.name} x{net.width_mult:g} at {size}px, "
            f"batch {settings.batch}, {profiler.backend} on {pmeta['device_name']} ({meta['method']})")
        measured = _measure(settings, net, profiler, todo, done, run, meta, progress, log)
        csv_path, calibration = _finish(settings, net, profiler, done, bool(todo), run, meta, cond_start, measured,
                                        load_start, start, progress, log)
        return ProfileResult(csv_path, len(done), len(todo), reused, meta["noisy_entries"],
                             time.perf_counter() - start, calibration, meta)
    finally:
        lock.close()
        profiler.close()


def _open(settings: ProfileSettings, log: Callable[[str], None]):
    """The supernet ``settings`` name (in eval mode) and the profiler that measures it."""
    from hwslim.importing.fx_trace import fixed_units_note
    from hwslim.importing.specs import load_model
    from profilers import get_profiler

    net = load_model(settings.model, width_mult=settings.width_mult, input_size=settings.input_size,
                     keep=settings.keep, fix_unsupported=settings.fix_unsupported,
                     outputs=settings.outputs).eval()
    if fixed_units_note(net) is not None:
        log(fixed_units_note(net))
    return net, get_profiler(settings.device, settings.backend, **_settings_kwargs(settings))


def _table_for(settings: ProfileSettings, net, profiler, pmeta: Mapping[str, Any], n_entries: int):
    """(entries CSV, metadata JSON, end-to-end CSV, fresh metadata) of the table ``settings`` describe."""
    size = net.input_size
    out = Path(settings.out) if settings.out else default_table_path(
        profiler.device, pmeta["device_name"], net.name, net.width_mult, size, settings.batch,
        profiler.backend, profiler.threads, profiler.dtype)
    csv_path, meta_path, e2e_path = table_paths(out)
    meta = new_meta(pmeta, model=net.name, width_mult=net.width_mult, input_size=size, batch=settings.batch,
                    entries_expected=n_entries, method="in_network" if profiler.in_network else "isolated")
    return csv_path, meta_path, e2e_path, meta


def recalibrate(settings: ProfileSettings, progress: bool = False,
                log: Callable[[str], None] | None = None) -> ProfileResult:
    """Time a complete table's calibration configs end to end again, now, and refit its calibration.

    A shared or virtual machine's speed moves (2-5% between a table and its check on this
    project's development VMs, once 21% within ten minutes), and a table's predictions move
    with the level its calibration was fitted at; the entries' relative times hold. It fits
    the level of the minutes it runs in: for a lasting change, not a passing spell. This
    times the table's fit and held-out configs again (the same ones: its ``calibration_plan``)
    and refits ``a``, ``a_depthwise`` and ``b``, in minutes where the entries took tens of
    them; the entries stay. The previous end-to-end rows are kept beside the table as
    ``NAME.e2e.<when>.csv`` and the metadata's ``recalibrations`` list records each
    recalibration (when, the conditions, the previous fit). Only a complete table of the
    same setup (machine, backend and its version, threads, batch, dtype, model) is
    recalibrated: it cannot make another machine's table valid here.
    """
    from hwslim.latency.conditions import drift, measure_conditions

    log = log or (lambda msg: None)
    start = time.perf_counter()
    load_start = _load()
    net, profiler = _open(settings, log)
    lock = ExitStack()
    try:
        pmeta = profiler.metadata()
        csv_path, meta_path, e2e_path, now = _table_for(settings, net, profiler, pmeta, 0)
        lock.enter_context(owned(csv_path, flag="--out" if settings.out else "the table"))  # one run per table
        again = "measure it first with the same hwslim profile command, without --recalibrate"
        if not meta_path.exists() or not csv_path.exists():
            raise TableError(f"no latency table at {csv_path} to recalibrate; {again}")
        old = _read_old_meta(meta_path, csv_path, False)
        if old.get("status") != "complete":
            raise TableError(f"{csv_path} is not complete (status {old.get('status')!r}), so it has no calibration "
                             f"to refit; finish it first: run the same hwslim profile command without --recalibrate")
        diff = _same_setup(old, {k: v for k, v in now.items() if k != "method"})  # whole configs: any method
        if diff:
            raise TableError(f"{csv_path} was measured with another setup ({'; '.join(diff[:3])}); a recalibration "
                             f"refits a table's level on the setup it was measured with; {again}")
        table = LatencyTable.load(csv_path)
        same_plan = replace(settings, **recorded_plan(old.get("calibration_plan"), settings, meta_path))
        cond_start = measure_conditions(profiler)
        log(f"conditions: {cond_start.describe()}")
        reference = _recalibration_reference(profiler, old, log)
        new_e2e = e2e_path.with_name(f".{e2e_path.name}.recalibrating.csv")
        new_e2e.unlink(missing_ok=True)  # a killed recalibration starts over: it takes minutes
        log(f"recalibrating {csv_path.name}: its {same_plan.calib_configs + same_plan.holdout_configs} calibration "
            f"configs timed again end to end; its {len(table.entries)} entries stay")
        try:
            calibration = calibrate(table, profiler, net, same_plan, new_e2e, progress=progress, log=log)
        except BaseException:
            new_e2e.unlink(missing_ok=True)
            raise
        cond_end = measure_conditions(profiler)
        changed = drift(cond_start, cond_end, "the recalibration")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = e2e_path.with_name(f"{csv_path.stem}.e2e.{stamp}.csv")
        if e2e_path.exists():
            os.replace(e2e_path, kept)
        os.replace(new_e2e, e2e_path)
        meta = dict(old)
        meta["recalibrations"] = [*(old.get("recalibrations") or []), {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "previous": old.get("calibration"),
            "previous_e2e": kept.name if kept.exists() else None, "load_avg_1min": [load_start, _load()],
            "seconds": round(time.perf_counter() - start, 1),
            "conditions": {"start": cond_start.to_dict(), "end": cond_end.to_dict(),
                           "changed": None if changed.reliable else changed.summary}}]
        meta["calibration"] = calibration.to_dict()
        if reference is not None:
            meta.update(reference=reference, format_version=max(FORMAT_VERSION, int(meta.get("format_version", 0))))
        atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if not changed.reliable:
            log(f"warning: {changed.line('the recalibration may be unreliable; run it again when the machine is steady')}")
        return ProfileResult(csv_path, len(table.entries), 0, len(table.entries), int(meta.get("noisy_entries") or 0),
                             time.perf_counter() - start, calibration, meta)
    finally:
        lock.close()
        profiler.close()


def _recalibration_reference(profiler, old: Mapping[str, Any], log: Callable[[str], None]) -> dict | None:
    """The reference a recalibration times the whole configs against: the table's own level; for
    a table without one (format 1 and 2) the level now, which converts it: its entries keep
    their relative times and the refitted calibration maps them to ms at that level."""
    from profilers.base import REFERENCE_DESCRIPTION

    ref = old.get("reference")
    if isinstance(ref, dict) and ref.get("networks") == REFERENCE_DESCRIPTION:
        profiler.use_reference(ref["level_ms"])
        return ref
    level = profiler.measure_reference()
    if level is None:
        return None
    ref = reference_meta(level, REFERENCE_DESCRIPTION)
    profiler.use_reference(ref["level_ms"])
    log(f"converting the table to reference units: the whole configs are timed against the reference, "
        f"its level now ({ref['level_ms']:.4g} ms) becomes the table's")
    return ref


# a recorded plan beyond this many configs is crafted: a real one has tens (default 16 + 16)
MAX_PLAN_CONFIGS = 1000


def recorded_plan(plan: Any, settings: ProfileSettings, meta_path: Path) -> dict[str, int]:
    """The ``calibration_plan`` a table's metadata records, as ProfileSettings fields; a field
    missing keeps ``settings``' value. A value of the wrong type or out of range (a crafted
    file: ``fit`` of 10^9 would time a billion configs) is refused with one line naming the
    field and the file, never a flag the user did not give."""
    if plan is None:
        plan = {}
    if not isinstance(plan, dict):
        raise TableError(f"{meta_path}: calibration_plan is not a JSON object; measure the table again (--force)")
    bounds = {"fit": ("calib_configs", 3, MAX_PLAN_CONFIGS), "holdout": ("holdout_configs", 0, MAX_PLAN_CONFIGS),
              "seed": ("seed", 0, 2**32 - 1)}
    out = {}
    for key, (field_name, low, high) in bounds.items():
        value = plan.get(key, getattr(settings, field_name))
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise TableError(f"{meta_path}: calibration_plan.{key} must be a whole number from {low} to {high}, "
                             f"got {value!r}; measure the table again (--force)")
        out[field_name] = value
    return out


def calibration_plan(net, settings: ProfileSettings, e2e_path: Path) -> tuple[list, dict[str, dict]]:
    """The calibration plan (``(role, config)`` pairs, fit and held-out interleaved) and the
    rows ``e2e_path`` already holds, by config key."""
    fit_cfgs = calibration_configs(net, settings.calib_configs + settings.holdout_configs, seed=settings.seed + 1)
    roles = ["fit"] * settings.calib_configs + ["holdout"] * settings.holdout_configs
    random.Random(settings.seed).shuffle(roles)  # interleaved: a slow spell of the machine hits both
    have: dict[str, dict] = {}
    if e2e_path.exists():
        rows, _ = read_rows(e2e_path, E2E_COLUMNS)
        have = {r["widths"]: r for r in rows}
    return list(zip(roles, fit_cfgs)), have


def _config_key(c: ChannelConfig) -> str:
    return json.dumps(c.widths, sort_keys=True, separators=(",", ":"))


class _SpreadCalibration:
    """The calibration configs' end-to-end rounds, spread over the entries' measurement.

    The whole models are written and loaded up front, warmed up, and timed in one round
    before the first entry; :meth:`progress` runs further rounds as the measurement
    advances (round ``k`` once ``k / (rounds - 1)`` of the entries, or of an in-network
    backend's designed networks, are done) and :meth:`timings` the rest after the last. Holding the loaded models costs memory (MobileNetV2 1.5x: 32 models),
    not time.
    """

    def __init__(self, profiler, net, configs: Sequence[ChannelConfig], batch: int, size: int,
                 rounds: int | None = None, progress: bool = False) -> None:
        from hwslim.core.materialize import materialize

        from profilers.base import E2E_ROUNDS, InterleavedRuns

        self._dir = tempfile.TemporaryDirectory(prefix="hwslim-calibration-")
        try:
            kind = profiler.model_suffixes[0].lstrip(".").upper()  # ONNX; PTE for ExecuTorch
            bar = _bar(progress, len(configs), f"building whole-config models ({kind})", unit="model")
            paths = []
            for i, c in enumerate(configs):
                paths.append(profiler.write_model(materialize(net, c, fold_bn=True).eval(),
                                                  Path(self._dir.name) / f"{i}", batch=batch, input_size=size))
                bar.update(1)
            bar.close()
            shape = (batch, net.in_channels, size, size)
            self.runs = InterleavedRuns(profiler, [(p, shape) for p in paths], rounds=rounds or E2E_ROUNDS)
            self.runs.warm_up()
            self.runs.round()
        except BaseException:
            self._dir.cleanup()
            raise

    def progress(self, fraction: float) -> None:
        """Run the rounds due once ``fraction`` of the entries are measured (the last waits for the end)."""
        due = 1 + int(min(max(fraction, 0.0), 1.0) * (self.runs.rounds - 1))
        while self.runs.rounds_done < min(due, self.runs.rounds - 1):
            self.runs.round()

    def timings(self) -> list:
        """Every round run, the Timings of the configs in order; the files are removed."""
        while self.runs.rounds_left:
            self.runs.round()
        self.close()
        return self.runs.timings()

    def close(self) -> None:
        self.runs.runners.clear()  # loaded models first, then their files
        self._dir.cleanup()


def calibrate(table: LatencyTable, profiler, net, settings: ProfileSettings, e2e_path: Path,
              progress: bool = False, log: Callable[[str], None] | None = None,
              measured: Mapping[str, Any] | None = None) -> Calibration:
    """Measure the fit and held-out configs end to end (resumably) and fit ``e2e = a * sum + b``.

    ``measured`` (config key -> Timing) holds configs already timed (spread over the
    entries' measurement); the others are timed now, interleaved."""
    size, batch = table.meta["input_size"], table.meta["batch"]
    plan, have = calibration_plan(net, settings, e2e_path)
    todo = [(role, c) for role, c in plan if _config_key(c) not in have]
    if todo:
        measured = dict(measured or {})
        log = log or (lambda msg: None)
        rest = [(role, c) for role, c in todo if _config_key(c) not in measured]
        with RowWriter(e2e_path, E2E_COLUMNS) as writer, tempfile.TemporaryDirectory() as work:
            if rest:
                log(f"calibration: timing {len(rest)} whole configs end to end, interleaved")
                timings = measure_configs(profiler, net, [c for _, c in rest], batch, size, workdir=work,
                                          progress=progress)
                measured.update({_config_key(c): t for (_, c), t in zip(rest, timings)})
            for role, cfg in todo:
                t = measured[_config_key(cfg)]
                s = table.sum_ms(net.layer_specs(cfg, batch=batch, input_size=size))
                row = {"role": role, "widths": _config_key(cfg), "sum_ms": f"{s:.6f}", **timing_fields(t)}
                writer.append(row)
                have[row["widths"]] = row
    results: dict[str, tuple[list, list, list]] = {"fit": ([], [], []), "holdout": ([], [], [])}
    for role, cfg in plan:
        specs = net.layer_specs(cfg, batch=batch, input_size=size)
        results[role][0].append(table.sum_ms(specs))
        results[role][1].append(table.depthwise_ms(specs))
        results[role][2].append(float(have[_config_key(cfg)]["median_ms"]))
    a, a_dw, b = fit_calibration(*results["fit"])
    n_fit = len(results["fit"][0])
    if n_fit < 2 or not all(math.isfinite(v) for v in (a, b, 0.0 if a_dw is None else a_dw)) or a <= 0 \
            or (a_dw is not None and a_dw <= 0):
        raise CalibrationError(
            f"the calibration fit is degenerate (n_fit={n_fit}, a={a:.4g}, b={b:.4g}"
            + (f", a_depthwise={a_dw:.4g}" if a_dw is not None else "") + f"), so {e2e_path.name} cannot calibrate "
            f"the table, which stays incomplete; delete {e2e_path} to measure the whole configs again, or run with "
            f"more --calib-configs")
    fitted = Calibration(a, b, n_fit, a_depthwise=a_dw)
    sums, dws, e2e = results["holdout"]
    holdout = accuracy([fitted.apply(x, d) for x, d in zip(sums, dws)], e2e) if sums else {}
    return replace(fitted, holdout=holdout)


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class _NoBar:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str, unit: str | None = None):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit or ("entry" if desc == "entries" else "model"), dynamic_ncols=True)


__all__ = ["CalibrationError", "ProfileResult", "ProfileSettings", "SettingsError", "calibrate", "calibration_configs",
           "calibration_plan", "design_configs", "recalibrate",
           "measure_config", "profile"]
