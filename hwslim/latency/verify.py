"""Does an exported model meet its budget on the device? Measure it and compare.

:func:`verify_model` takes an ONNX file written by ``hwslim export`` and the latency
table the config was searched with. It reads the channel config from the file's
metadata, predicts the latency with the table (the same prediction the search used),
measures the file end to end on the table's backend with the table's protocol
(device, threads, precision, warm-up and repetitions: the profiler is rebuilt from
the table's own settings, so the measurement is comparable to the table), and
compares both with the budget::

    >>> r = verify_model("r20_2ms.onnx", "tables/r20_cpu.json")     # doctest: +SKIP
    >>> r.ok, r.predicted_ms, r.measured_ms, r.budget_ms            # doctest: +SKIP
    (True, 1.93, 1.97, 2.0)

The budget is ``budget_ms`` when given, else the latency budget the search recorded
in the config (``meta["budget"]``). It *holds* when the measured median is at most
``budget * (1 + tolerance)``; the default tolerance (3%) absorbs run-to-run noise of
a shared machine. With no latency budget anywhere, the result only reports.

A table with a reference level (format 3, :attr:`hwslim.latency.table.LatencyTable.reference_level_ms`)
is checked at that level: the model is timed in rounds with the reference beside it
(:func:`measure_at_level`) and its median brought to the table's level (``at_level_ms``);
the verdict is taken on that, and a change of the machine's speed is corrected rather than
doubted. UNRELIABLE then means the correction cannot be trusted: another CPU, a reference
level more than :data:`hwslim.latency.conditions.MAX_LEVEL_CHANGE` away, or references that
moved apart (:data:`hwslim.latency.conditions.REFERENCE_DISAGREEMENT`). For older tables:

Before measuring, the conditions are taken again (CPU, load, the machine-speed probe
with the table's own settings; :mod:`hwslim.latency.conditions`) and compared with those the
table recorded. When they differ markedly the verdict is ``UNRELIABLE`` instead of a
confident OK or OVER, and one line per verdict gives the measured p50 and p90, their
ratio to the budget and the one difference that decided (``the speed probe before
measuring ran 1.31x slower than when the table was measured (1.31 vs 1.00 ms): verdict
unreliable``); ``hwslim verify`` then exits with status 3 (:data:`EXIT_UNRELIABLE`).
Unless the model is far over its budget: a measurement above :data:`CLEARLY_OVER` times
the budget (with its tolerance) is ``OVER`` (exit 1) however the conditions differ, since
no plausible change of the machine's speed level (a busy or throttled machine runs tens of
percent slower, not 2x) could turn it into OK.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hwslim.core import jsonio
from hwslim.core.config import ChannelConfig
from hwslim.core.errors import ConfigError, TableError
from hwslim.core.resources import check_inference

DEFAULT_TOLERANCE = 0.03
# exit status of `hwslim verify` / `export --verify` when no confident verdict was possible
EXIT_UNRELIABLE = 3
# measured above this many times the budget (with its tolerance): OVER even when the conditions differ from
# the table's; the largest level change seen between a table and its check on shared machines was 1.3x
CLEARLY_OVER = 2.0


@dataclass(frozen=True)
class VerifyResult:
    """Predicted vs measured latency of one exported model, and its budget."""

    model: Path
    table: Path
    config: ChannelConfig
    backend: str
    batch: int
    predicted_ms: float
    measured_ms: float  # median
    iqr_ms: float
    p90_ms: float
    n: int
    noisy: bool
    budget_ms: float | None
    tolerance: float
    conditions: Any = None  # hwslim.latency.conditions.ConditionCheck: now vs the table's; None: not compared
    # the median brought to the table's reference level (None: the table has no reference; the
    # verdict is then on measured_ms), the reference's time now and at the table's level
    at_level_ms: float | None = None
    level_now_ms: float | None = None
    level_table_ms: float | None = None

    @property
    def judged_ms(self) -> float:
        """The median the verdict is taken on: at the table's reference level where it has one."""
        return self.measured_ms if self.at_level_ms is None else self.at_level_ms

    @property
    def level_ratio(self) -> float | None:
        """The reference's time now / at the table's level (1.3: the machine runs 1.3x slower)."""
        return None if self.level_now_ms is None or not self.level_table_ms else self.level_now_ms / self.level_table_ms

    @property
    def judged_range(self) -> tuple[float, float]:
        """Where the judged median lies: :attr:`judged_ms` twice, except where the references moved
        unevenly since the table (``conditions.uneven``): the model's time then follows neither
        exactly but lies between the two, so the median brought to the table's level by each
        reference alone bounds it (:data:`hwslim.latency.conditions.REFERENCE_DISAGREEMENT`)."""
        c = self.conditions
        ratios = [v for _, v in getattr(c, "reference_ratios", ())]
        if self.at_level_ms is None or not self.level_ratio or not getattr(c, "uneven", None) or not ratios:
            return self.judged_ms, self.judged_ms
        # at_level_ms is the median brought down by the references' sum (level_ratio); by one alone:
        return self.at_level_ms * self.level_ratio / max(ratios), self.at_level_ms * self.level_ratio / min(ratios)

    @property
    def limit_ms(self) -> float | None:
        """The budget with its tolerance (None: no budget)."""
        return None if self.budget_ms is None else self.budget_ms * (1 + self.tolerance)

    @property
    def ok(self) -> bool:
        """The budget holds (or there is none), as judged (the top of :attr:`judged_range`); see
        :attr:`reliable`."""
        return self.limit_ms is None or self.judged_range[1] <= self.limit_ms

    @property
    def bracketed(self) -> bool:
        """The references moved unevenly, yet the verdict is the same by each alone: confident."""
        return bracketed(self.judged_range, self.limit_ms, self.conditions)

    @property
    def reliable(self) -> bool:
        """The conditions compare with the table's, so the measurement can be trusted against it."""
        return self.conditions is None or self.conditions.reliable

    @property
    def clearly_over(self) -> bool:
        """Measured over :data:`CLEARLY_OVER` times the budget: OVER whatever the conditions."""
        return self.limit_ms is not None and self.judged_range[0] > CLEARLY_OVER * self.limit_ms

    @property
    def verdict(self) -> str:
        """``OK``, ``OVER``, ``UNRELIABLE`` (conditions differ from the table's) or ``no budget``."""
        return verdict_of(self.judged_range, self.limit_ms, self.conditions)

    @property
    def budget_ratio(self) -> float | None:
        """judged median / budget: above 1 + tolerance is over (None: no budget)."""
        return None if self.budget_ms is None else self.judged_ms / self.budget_ms

    @property
    def message(self) -> str | None:
        """One line for a verdict that is not OK, or is OK by each reference alone (:attr:`bracketed`):
        the model, its numbers and the one thing that decided it."""
        if self.verdict == "OK" and self.bracketed:
            lo, hi = self.judged_range
            return (f"{self.model.name}: OK: {lo:.3f}-{hi:.3f} ms at the table's level by each reference alone, within "
                    f"its {self.budget_ms:g} ms budget and {100 * self.tolerance:g}% tolerance either way; "
                    f"{self.conditions.uneven_move}")
        if self.verdict not in ("UNRELIABLE", "OVER"):
            return None
        numbers = (f"measured p50 {self.measured_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
                   + (f"{self.at_level_ms:.3f} ms at the table's level (the reference ran {self.level_ratio:.2f}x "
                      f"its time there), " if self.at_level_ms is not None and self.level_ratio else "")
                   + f"{self.budget_ratio:.2f}x its {self.budget_ms:g} ms budget")
        if self.verdict == "OVER":
            why = "" if self.reliable else (
                f"; over by each reference alone, although {self.conditions.uneven_move}"
                if self.bracketed else f"; more than {CLEARLY_OVER:g}x over, which no change of the machine's "
                                       "conditions explains, so OVER although they differ from the table's")
            return (f"{self.model.name}: OVER: {numbers}; the median exceeds the budget by more than the "
                    f"{100 * self.tolerance:g}% tolerance{why}")
        return f"{self.model.name}: UNRELIABLE: {numbers}; {self.conditions.line()}"

    @property
    def prediction_error(self) -> float:
        """(predicted - judged) / judged: both at the table's level."""
        return (self.predicted_ms - self.judged_ms) / self.judged_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model), "table": str(self.table), "backend": self.backend, "batch": self.batch,
            "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms, "p50_ms": self.measured_ms,
            "iqr_ms": self.iqr_ms, "p90_ms": self.p90_ms, "budget_ratio": self.budget_ratio, "message": self.message,
            "n": self.n, "noisy": self.noisy, "budget_ms": self.budget_ms,
            "tolerance": self.tolerance, "within_budget": self.ok,
            "prediction_error_pct": 100 * self.prediction_error, "verdict": self.verdict, "reliable": self.reliable,
            "conditions": None if self.conditions is None else self.conditions.as_dict(),
            "at_table_level_ms": self.at_level_ms, "reference_now_ms": self.level_now_ms,
            "reference_table_ms": self.level_table_ms, "level_ratio": self.level_ratio,
            "at_table_level_range_ms": list(self.judged_range) if self.bracketed else None,
        }


def bracketed(judged_range: tuple[float, float], limit_ms: float | None, conditions) -> bool:
    """The only doubt about ``conditions`` is that the references moved unevenly, and the judged
    median is on the same side of ``limit_ms`` (a budget with its tolerance) by each reference alone."""
    lo, hi = judged_range
    return (conditions is not None and conditions.only_uneven and limit_ms is not None
            and (hi <= limit_ms or lo > limit_ms))


def verdict_of(judged_range: tuple[float, float], limit_ms: float | None, conditions) -> str:
    """``OK``, ``OVER``, ``UNRELIABLE`` or ``no budget`` for a median judged at the table's level
    (:attr:`VerifyResult.judged_range`) against ``limit_ms``, under ``conditions`` (a
    :class:`hwslim.latency.conditions.ConditionCheck` or None): confident where the conditions
    compare with the table's, where the references moved unevenly but each alone gives the same
    verdict (:func:`bracketed`), or where the median is over :data:`CLEARLY_OVER` times the limit."""
    if limit_ms is None:
        return "no budget"
    lo, hi = judged_range
    reliable = conditions is None or conditions.reliable
    if not reliable and lo <= CLEARLY_OVER * limit_ms and not bracketed(judged_range, limit_ms, conditions):
        return "UNRELIABLE"
    return "OK" if hi <= limit_ms else "OVER"


def budget_from_config(config: ChannelConfig) -> float | None:
    """The latency budget (ms) a search recorded in the config's meta, if any."""
    b = config.meta.get("budget")
    if isinstance(b, dict) and b.get("kind") == "latency_ms":
        return float(b["value"])
    return None


def resolve_model(path: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """The ONNX file to measure and its hwslim metadata.

    ``path`` is an ONNX file from ``hwslim export``, or a TensorRT engine or OpenVINO IR
    whose JSON provenance file (``ENGINE.json``, ``MODEL.xml.json``) names the ONNX it was
    built from.
    """
    from hwslim.runtimes.onnx_file import onnx_metadata

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model file {path} not found")
    if path.suffix != ".onnx":
        sidecar = path.with_name(path.name + ".json")
        if not sidecar.is_file():
            raise ConfigError(f"{path} is not an ONNX file and has no {sidecar.name} naming its ONNX source; "
                              "give the .onnx file `hwslim export` wrote")
        try:
            source = jsonio.load(sidecar)
        except (OSError, ValueError) as e:  # ValueError: malformed, not UTF-8 or too deep
            raise ConfigError(f"{sidecar} is not readable JSON ({type(e).__name__}); re-run hwslim export") from None
        if not isinstance(source, dict) or not isinstance(source.get("onnx"), str) or not source["onnx"]:
            raise ConfigError(f"{sidecar} does not name the ONNX file the engine was built from (no \"onnx\"); "
                              "give the .onnx file `hwslim export` wrote")
        path = Path(source["onnx"])
        if not path.is_file():
            raise ConfigError(f"{sidecar} names {path} as the engine's ONNX source, but it does not exist")
    return path, onnx_metadata(path)


# metadata numbers an exported model carries -> the smallest value that makes sense
_META_INTS = {"batch": 1, "num_classes": 1, "divisor": 1}


def metadata_int(meta: dict[str, str], key: str, source: str, default: int | None = None) -> int | None:
    """A whole-number field of an exported model's hwslim metadata; ConfigError if garbled."""
    if key not in meta:
        return default
    text = meta[key]
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: metadata hwslim.{key}={text!r} is not a whole number; "
                          "re-export the model with `hwslim export`") from None
    if v < _META_INTS.get(key, 1):
        raise ConfigError(f"{source}: metadata hwslim.{key}={v} must be at least {_META_INTS.get(key, 1)}; "
                          "re-export the model with `hwslim export`")
    return v


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_budget(budget_ms: float | None) -> None:
    """Refuse (ConfigError) a budget that is not a finite positive number."""
    if budget_ms is not None and not (0 < float(budget_ms) < float("inf")):
        raise ConfigError(f"--budget-ms must be a positive number, got {budget_ms:g}")


def table_for(table: str | os.PathLike | Any, net, config: ChannelConfig, *, batch: int,
              budget_ms: float | None = None, force: bool = False):
    """The latency table to verify ``config`` of ``net`` against, checked before any work.

    Loads ``table`` (a path, or an already loaded table), refuses one measured on another
    setup (model, batch, input size; unless ``force``) and a budget that is not positive
    (``budget_ms``, else the config's). ``hwslim export --verify`` runs this before it
    writes anything, so a bad table or budget leaves existing files as they were.
    """
    from hwslim.latency.table import LatencyTable

    tbl = table if not isinstance(table, (str, os.PathLike)) else LatencyTable.load(table)
    net.validate(config)
    tbl.check_compatible(net, batch=batch, input_size=config.input_size, force=force)
    check_budget(budget_ms if budget_ms is not None else budget_from_config(config))
    return tbl


def profiler_for_table(table):
    """A profiler measuring with the table's backend and protocol (its recorded settings)."""
    from profilers import profiler_for_table

    return profiler_for_table(table)


def config_timer(table, net, *, batch: int = 1, input_size: int | None = None, rounds: int | None = None
                 ) -> Callable[[Sequence[ChannelConfig]], list[float]]:
    """``time(configs) -> [ms]``: configs of ``net`` timed end to end on ``table``'s backend with its
    protocol, interleaved (:func:`hwslim.latency.profile.measure_configs`), each median at the table's
    reference level (:meth:`profilers.base.Profiler.use_reference`; as measured for a table without one),
    so the times compare with the table's predictions. ``hwslim search --measure`` fits its latency
    budgets to them (``SearchOptions.measure``): the search may not run a profiler itself."""
    import copy

    from hwslim.latency.profile import measure_configs

    def time_configs(configs: Sequence[ChannelConfig]) -> list[float]:
        # the search may have moved the supernet to a GPU; the profiler exports from the CPU
        cpu_net = net if all(p.device.type == "cpu" for p in net.parameters()) else copy.deepcopy(net).cpu()
        with profiler_for_table(table) as prof:
            prof.use_reference(table.reference_level_ms)
            return [t.median_ms for t in measure_configs(prof, cpu_net, list(configs), batch, input_size,
                                                         rounds=rounds)]

    return time_configs


def net_from_metadata(meta: Mapping[str, str], config, source: str):
    """The supernet an exported model came from: its graph in the metadata (older files: the zoo)."""
    from hwslim.core.errors import ConfigError
    from hwslim.core.graph import GraphFormatError, graph_from_dict
    from hwslim.models import create_model
    from hwslim.core.supernet import SlimmableNet

    extra = {k: metadata_int(meta, k, source) for k in ("num_classes", "divisor") if k in meta}
    if "graph" not in meta:
        return create_model(config.model, width_mult=config.width_mult, input_size=config.input_size, **extra)
    try:
        from dataclasses import replace

        graph = replace(graph_from_dict(jsonio.loads(meta["graph"])), input_size=int(config.input_size))
        net = SlimmableNet.from_graph(graph)
    except (ValueError, KeyError, TypeError, GraphFormatError) as e:
        raise ConfigError(f"{source}: its hwslim.core.graph metadata is unusable ({type(e).__name__}: {e})") from None
    for key, value in extra.items():
        if getattr(net, key) != value:
            raise ConfigError(f"{source}: its metadata says {key} {value} but its graph has {getattr(net, key)}; "
                              "the file was edited: export it again")
    return net


def recorded_table(model: str | os.PathLike) -> Path:
    """The latency table to verify an exported model against, found as ``export --verify`` finds
    it: the table its metadata records (``hwslim export`` writes it), else the one its config was
    searched with, else this machine's CPU table for its model (:func:`find_table`)."""
    import torch

    from hwslim.latency.table import find_table
    from hwslim.runtimes.onnx_file import config_from_metadata

    onnx_path, meta = resolve_model(model)
    config = config_from_metadata(meta, str(onnx_path))
    for recorded in (meta.get("table"), config.meta.get("table")):
        if isinstance(recorded, str) and recorded and Path(recorded).is_file():
            return Path(recorded)
    with torch.device("meta"):
        net = net_from_metadata(meta, config, str(onnx_path))
    return find_table("cpu", net, batch=metadata_int(meta, "batch", str(onnx_path), 1),
                      input_size=config.input_size, spec=config.model)


def verify_model(model: str | os.PathLike, table: str | os.PathLike | Any, *, budget_ms: float | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, force: bool = False, progress: bool = False,
                 log: Callable[[str], None] | None = None, conditions=None) -> VerifyResult:
    """Predict (config from the model's metadata + table), measure on the table's backend, compare.

    ``conditions`` (:class:`hwslim.latency.conditions.Conditions`) are this machine's, taken
    with the table's profiler just before (callers verifying several models take them
    once); by default they are measured here, before the model. With ``progress``, a
    line saying what is measured goes to ``log`` (default: stderr, so that a caller's
    stdout stays its own, e.g. ``--json``).
    """
    from hwslim.latency.conditions import compare_to_table, measure_conditions
    import torch

    from hwslim.runtimes.onnx_file import config_from_metadata

    check_budget(budget_ms)
    onnx_path, meta = resolve_model(model)
    config = config_from_metadata(meta, str(onnx_path))
    batch = metadata_int(meta, "batch", str(onnx_path), 1)
    with torch.device("meta"):  # shapes only: no weights needed to predict
        net = net_from_metadata(meta, config, str(onnx_path))
    check_inference(net, config, batch=batch, input_size=config.input_size,
                    what=f"measuring {onnx_path} (batch {batch:,} at {config.input_size}x{config.input_size} px)")
    tbl = table_for(table, net, config, batch=batch, budget_ms=budget_ms, force=force)
    table_path = Path(getattr(tbl, "path", None) or (table if isinstance(table, (str, os.PathLike)) else "<table>"))
    predicted = float(tbl.predict_ms(net.layer_specs(config, batch=batch, input_size=config.input_size)))
    if budget_ms is None:
        budget_ms = budget_from_config(config)
    profiler = profiler_for_table(tbl)
    # the artifact itself where the backend reads it (OpenVINO IR on openvino), else its ONNX source
    target = Path(model) if Path(model).suffix in profiler.model_suffixes else onnx_path
    if progress:
        (log or _stderr)(f"measuring {target} end to end with {getattr(profiler, 'backend', '?')} "
                         f"({getattr(profiler, 'threads', '?')} thread(s), the table's protocol) ...")
    shape = (batch, net.in_channels, config.input_size, config.input_size)
    level = getattr(tbl, "reference_level_ms", None)
    try:
        if conditions is None:
            conditions = measure_conditions(profiler)
        t, at_level, ref_now = measure_at_level(profiler, target, shape, level)
    finally:
        profiler.close()
    check = compare_to_table(tbl.meta, conditions, when="before measuring",
                             reference_now=None if ref_now is None else ref_now.as_dict())
    backend = str(tbl.meta.get("backend", "?"))
    if t.median_ms <= 0:
        raise TableError(f"the {backend} profiler returned a non-positive time for {onnx_path}")
    return VerifyResult(target, table_path, config, backend, batch, predicted, float(t.median_ms),
                        float(t.iqr_ms), float(t.p90_ms), int(t.n), bool(t.noisy), budget_ms, tolerance, check,
                        at_level_ms=None if at_level is None else float(at_level.median_ms),
                        level_now_ms=None if ref_now is None else ref_now.ms, level_table_ms=level)


def measure_at_level(profiler, target: str | os.PathLike, shape: Sequence[int], level_ms: float | None):
    """Time a model end to end: ``(timing as measured, timing at the level, the reference's time
    now)``. With a table's reference level (``level_ms``) the model is timed in interleaved
    rounds with the reference beside it (:class:`profilers.base.InterleavedRuns`), each turn
    brought to the level by the reference times around it; without one (older tables, or a
    backend that cannot run the reference), as before: ``(timing, None, None)``."""
    from profilers.base import InterleavedRuns

    if level_ms is None or profiler.reference_runner() is None:
        return profiler.time_onnx(str(target), shape), None, None
    profiler.use_reference(level_ms)
    runs = InterleavedRuns(profiler, [(str(target), shape)])
    runs.warm_up()
    while runs.rounds_left:
        runs.round()
    return runs.raw_timings()[0], runs.timings()[0], runs.reference_ms()


def exit_status(results: Sequence[VerifyResult]) -> int:
    """0: every budget holds; 1: one is confidently over; 3 (:data:`EXIT_UNRELIABLE`): none is
    over, but a verdict is unreliable (the conditions of its measurement differ from the table's).
    A model without a budget has no verdict to doubt: it only reports."""
    if any(r.verdict == "OVER" for r in results):
        return 1
    if any(r.verdict == "UNRELIABLE" for r in results):
        return EXIT_UNRELIABLE
    return 0


def verify_rows(results: Sequence[VerifyResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rows.append({
            "model": r.model.name,
            "budget_ms": "-" if r.budget_ms is None else r.budget_ms,
            "predicted_ms": r.predicted_ms,
            "measured_ms": r.measured_ms,  # the median, p50, as measured
            "level_x": "-" if r.level_ratio is None else r.level_ratio,  # the reference now / at the table's level
            "at_level_ms": "-" if r.at_level_ms is None else r.at_level_ms,  # measured_ms at the table's level
            "p90_ms": r.p90_ms,
            "x_budget": "-" if r.budget_ratio is None else r.budget_ratio,
            "verdict": r.verdict,
            "pred_err_%": 100 * r.prediction_error,
        })
    return rows


def print_verify(results: Sequence[VerifyResult], file=None, log: Callable[[str], None] | None = None) -> None:
    """Print predicted vs measured vs budget as a table (to ``file``, default stdout).

    The notes after it (a noisy measurement, a budget that does not hold) go to ``log``;
    by default to ``file`` when one is given, else to stderr.
    """
    from hwslim.core.report import print_table

    print_table(verify_rows(results), file=file)
    if log is None:
        log = (lambda msg: print(msg, file=file)) if file is not None else _stderr
    for r in results:  # one line per verdict that is not OK, naming what decided it
        if r.message:
            log(r.message)
        if r.noisy:
            log(f"note: {r.model.name}: the measurement was noisy, IQR {r.iqr_ms:.3g} ms; "
                "re-run on a quieter machine")
