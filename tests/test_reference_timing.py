"""Times against an interleaved reference (issue 34): tables in reference units, verdicts at the table's level.

The normalization and the fit are driven by a simulated machine (:class:`SteppedMachine`): a
backend whose every run returns a known time multiplied by the machine's speed, which steps
from 1.0 to 1.4 at a chosen moment, as a shared VM's did (issue 34: 1.39x in one window). The
reference networks run on the same simulated machine. A small real ONNX Runtime check times
the real reference.
"""
from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest

from hwslim.latency.conditions import (MAX_LEVEL_CHANGE, REFERENCE_DISAGREEMENT, Conditions, compare_to_table,
                                       reference_reasons)
from hwslim.latency.entries import enumerate_entries
from hwslim.latency.profile import ProfileSettings, design_configs, profile, recalibrate
from hwslim.latency.table import COLUMNS, LatencyTable, fit_calibration, table_paths
from hwslim.latency.verify import VerifyResult, measure_at_level
from hwslim.models import create_model
from profilers.base import InterleavedRuns, Profiler, Protocol, reference_specs

STEP = 1.4
REF_PARTS = {"dense": 0.5, "dwpw": 0.5}  # ms of each reference at speed 1.0: the level is 1.0 ms
SMALL = dict(model="resnet20", width_mult=0.5, input_size=8)


class SteppedMachine(Profiler):
    """A simulated machine: every run takes its known time x :attr:`speed`, plus 1% noise.

    ``step_at``: the run count at which the speed becomes ``step`` (None: steady; ``dense_step``:
    the dense reference's speed then, where it moves apart from the rest). The
    reference networks (``_probe_runner``) and whole models (``_onnx_runner``: ``path`` is a
    known time in ms, as text) run on it like everything else."""

    backend: ClassVar[str] = "stepped"
    device: ClassVar[str] = "cpu"

    def __init__(self, step_at: int | None = None, step: float = STEP, dense_step: float | None = None) -> None:
        super().__init__(e2e_protocol=Protocol.quick())
        self.runs, self.step_at, self.step, self.dense_step = 0, step_at, step, dense_step
        self._rng = random.Random(0)

    def speed(self, kind: str = "") -> float:
        stepped = self.step_at is not None and self.runs >= self.step_at
        if stepped and kind == "dense" and self.dense_step is not None:
            return self.dense_step  # the dense reference moves apart from the rest
        return self.step if stepped else 1.0

    def run_ms(self, ms: float, kind: str = "") -> float:
        self.runs += 1
        return ms * self.speed(kind) * (1 + self._rng.uniform(-0.01, 0.01))

    def _probe_runner(self, specs, workdir: str) -> Callable[[], float]:
        kind = "dense" if len(specs) == 1 else "dwpw"
        return lambda: self.run_ms(REF_PARTS[kind], kind)

    def _onnx_runner(self, path: str, input_shape) -> Callable[[], float]:
        return lambda: self.run_ms(float(path))

    def profile_network(self, net_specs, true_ms: dict) -> tuple[dict[str, list[float]], set]:
        """12 runs of a designed network: each layer's samples (as ONNX Runtime's profiler gives them)."""
        out: dict[str, list[float]] = {s.name: [] for s in net_specs}
        for _ in range(12):
            for s in net_specs:
                out[s.name].append(self.run_ms(true_ms[s.signature()]))
        return out, set()


def _true_times(net) -> dict[tuple, float]:
    rng = random.Random(1)
    return {s.signature(): 0.005 + 0.05 * rng.random() for s in enumerate_entries(net, 1, 8)}


def _measure_table(step_at: int | None, level: bool) -> tuple[dict[tuple, float], list[float], Any]:
    """Entries (median ms by signature) and the whole configs' times of a simulated profile."""
    import numpy as np

    net = create_model("resnet20", width_mult=0.5, input_size=8)
    true_ms = _true_times(net)
    prof = SteppedMachine(step_at)
    prof.reference_runner()  # loaded and warmed up (for a wall-clock while): the step counts runs from here
    prof.runs = 0
    if level:
        prof.use_reference(sum(REF_PARTS.values()))  # the level: the reference at speed 1.0
    configs = design_configs(net, set(true_ms), 1, 8, contexts=4)
    networks = [net.layer_specs(c, input_size=8) for c in configs]
    entries = {spec.signature(): float(np.median(samples)) for spec, samples, _, _ in
               prof._pool_networks(list(enumerate_entries(net, 1, 8)), networks,
                                   lambda n: prof.profile_network(n, true_ms))}
    rng = random.Random(2)
    cal = [net.random_config(rng) for _ in range(12)]
    # whole models: 1.1 x their layer sum + 0.02 ms (launch gaps)
    e2e = [1.1 * sum(true_ms[s.signature()] for s in net.layer_specs(c, input_size=8)) + 0.02 for c in cal]
    runs = InterleavedRuns(prof, [(f"{ms:.6f}", (1, 3, 8, 8)) for ms in e2e])
    runs.warm_up()
    while runs.rounds_left:
        runs.round()
    return entries, [t.median_ms for t in runs.timings()], (net, cal)


def _predictions(entries: dict, e2e: list[float], net, cal) -> list[float]:
    sums = [sum(entries[s.signature()] for s in net.layer_specs(c, input_size=8)) for c in cal]
    a, _, b = fit_calibration(sums, [0.0] * len(sums), e2e)
    return [a * x + b for x in sums]


def test_a_level_step_in_the_middle_of_a_profile_leaves_the_fitted_table_unchanged_within_1pct():
    steady_entries, steady_e2e, (net, cal) = _measure_table(None, level=True)
    half = _count_runs() // 2  # the step comes half-way through the entries' measurement
    stepped_entries, stepped_e2e, _ = _measure_table(half, level=True)
    raw_entries, raw_e2e, _ = _measure_table(half, level=False)
    steady = _predictions(steady_entries, steady_e2e, net, cal)
    stepped = _predictions(stepped_entries, stepped_e2e, net, cal)
    assert max(abs(p / q - 1) for p, q in zip(stepped, steady)) < 0.01
    # per entry too, but for the few timed in the network the step fell in
    off = [abs(stepped_entries[k] / steady_entries[k] - 1) for k in steady_entries]
    assert sorted(off)[int(0.9 * len(off))] < 0.01
    # without the reference, the step moves entries and whole models by up to 1.4x
    raw_off = [raw_entries[k] / steady_entries[k] for k in steady_entries]
    assert max(raw_off) > 1.3 and min(raw_off) < 1.05
    assert max(q / p for p, q in zip(steady_e2e, raw_e2e)) > 1.15


def _count_runs() -> int:
    """The runs the entries of a steady simulated profile take (the designed networks and the
    reference timed between them)."""
    prof = SteppedMachine(None)
    net = create_model("resnet20", width_mult=0.5, input_size=8)
    true_ms = _true_times(net)
    prof.reference_runner()
    prof.runs = 0
    prof.use_reference(1.0)
    networks = [net.layer_specs(c, input_size=8) for c in design_configs(net, set(true_ms), 1, 8, contexts=4)]
    for _ in prof._pool_networks(list(enumerate_entries(net, 1, 8)), networks,
                                 lambda n: prof.profile_network(n, true_ms)):
        pass
    return prof.runs


def test_entries_timed_alone_are_brought_to_the_level_too():
    net = create_model("resnet20", width_mult=0.5, input_size=8)
    specs = list(enumerate_entries(net, 1, 8))[:12]

    class Alone(SteppedMachine):
        def _time_entry(self, spec):
            from profilers.base import Timing

            return Timing.from_samples([self.run_ms(0.1) for _ in range(20)])

    prof = Alone(step_at=None)
    prof.use_reference(1.0)
    prof.step_at = prof.runs  # 1.4x slower from now on
    got = list(prof.measure_entries(specs))
    assert len(got) == len(specs)
    for _, t in got:
        assert t.median_ms == pytest.approx(0.1, rel=0.02) and t.ref_ms == pytest.approx(STEP, rel=0.02)


def _meta_with_reference(level: float = 1.0, parts: dict | None = None) -> dict:
    return {"device": "cpu", "device_name": "x", "reference": {"level_ms": level, "parts_ms": parts or REF_PARTS,
                                                              "networks": "test"},
            "conditions": {"start": Conditions(probe_ms=1.0).to_dict(), "end": Conditions(probe_ms=1.0).to_dict(),
                           "changed": "the speed probe at the end of profiling ran 1.30x slower"}}


def test_the_verdict_is_taken_at_the_tables_level():
    prof = SteppedMachine(step_at=0)  # 1.4x slower than when the table (level 1.0 ms) was measured
    raw, at_level, ref_now = measure_at_level(prof, "2.0", (1, 3, 8, 8), 1.0)
    assert raw.median_ms == pytest.approx(2.8, rel=0.02) and at_level.median_ms == pytest.approx(2.0, rel=0.02)
    assert ref_now.ms == pytest.approx(STEP, rel=0.02)
    # the probe and the table's own drift are corrected: no reason left
    check = compare_to_table(_meta_with_reference(), Conditions(probe_ms=1.4), when="before measuring",
                             reference_now=ref_now.as_dict())
    assert check.reliable and check.level_ratio == pytest.approx(STEP, rel=0.02)
    r = VerifyResult(Path("m.onnx"), Path("t.csv"), None, "ort", 1, 2.0, raw.median_ms, raw.iqr_ms, raw.p90_ms,
                     raw.n, False, 2.05, 0.03, check, at_level_ms=at_level.median_ms, level_now_ms=ref_now.ms,
                     level_table_ms=1.0)
    assert r.measured_ms > 2.05 * 1.03 and r.verdict == "OK" and r.ok and abs(r.prediction_error) < 0.02
    d = r.as_dict()
    assert d["measured_ms"] == pytest.approx(2.8, rel=0.02) and d["at_table_level_ms"] == pytest.approx(2.0, rel=0.02)
    assert d["level_ratio"] == pytest.approx(STEP, rel=0.02) and d["reference_table_ms"] == 1.0
    # a table without a reference: as before, the probe decides, the verdict is on what was measured
    old = {k: v for k, v in _meta_with_reference().items() if k != "reference"}
    before = compare_to_table(old, Conditions(probe_ms=1.4), when="before measuring")
    assert not before.reliable and before.level_ratio is None
    assert before.summary.startswith("the table's machine changed while it was measured")


def test_a_change_too_large_or_too_uneven_is_unreliable():
    ratio, why = reference_reasons(_meta_with_reference()["reference"], {"dense": 1.2, "dwpw": 1.2})
    assert ratio == pytest.approx(2.4) and len(why) == 1 and ratio > MAX_LEVEL_CHANGE
    assert why[0] == ("the reference timed beside the model ran 2.40x slower than at the table's level (2.4 vs 1 ms), "
                      "beyond the 2x a correction to the table's level is trusted for")
    ratio, why = reference_reasons(_meta_with_reference()["reference"], {"dense": 0.65, "dwpw": 0.525})
    assert ratio == pytest.approx(1.175) and len(why) == 1 and 0.238 - 1e-3 > REFERENCE_DISAGREEMENT
    assert why[0].startswith("the references timed beside the model moved unevenly since the table (dense 1.30x, "
                             "dwpw 1.05x: 24% apart, more than 20%)")
    assert reference_reasons(_meta_with_reference()["reference"], {"dense": 0.59, "dwpw": 0.5})[1] == []
    # measured on a machine whose dense kernels slowed 1.4x and the rest 1.1x (the model among them)
    prof = SteppedMachine(step_at=0, step=1.1, dense_step=STEP)
    raw, at_level, ref_now = measure_at_level(prof, "1.0", (1, 3, 8, 8), 1.0)
    check = compare_to_table(_meta_with_reference(), Conditions(), reference_now=ref_now.as_dict())
    assert not check.reliable and "moved unevenly" in check.summary and check.only_uneven
    assert dict(check.reference_ratios) == pytest.approx({"dense": 1.4, "dwpw": 1.1}, rel=0.02)

    def verdict(budget: float) -> VerifyResult:
        return VerifyResult(Path("m.onnx"), Path("t.csv"), None, "ort", 1, 1.0, raw.median_ms, raw.iqr_ms,
                            raw.p90_ms, raw.n, False, budget, 0.03, check, at_level_ms=at_level.median_ms,
                            level_now_ms=ref_now.ms, level_table_ms=1.0)

    # brought to the table's level by the sum (0.88 ms), by the dense reference alone (0.79 ms) or by
    # the depthwise block alone (1.0 ms, the truth here): the verdict is confident where all agree
    r = verdict(1.5)
    assert r.judged_ms == pytest.approx(0.88, rel=0.03)
    assert r.judged_range == pytest.approx((1.1 / 1.4, 1.0), rel=0.03)
    assert r.verdict == "OK" and r.bracketed and r.message.startswith("m.onnx: OK: 0.7")
    assert "by each reference alone" in r.message and "moved unevenly" in r.message
    assert r.as_dict()["at_table_level_range_ms"] == pytest.approx([1.1 / 1.4, 1.0], rel=0.03)
    r = verdict(0.7)  # over by either: OVER
    assert r.verdict == "OVER" and "over by each reference alone" in r.message
    r = verdict(0.9)  # within by the dense reference, over by the depthwise one: no confident verdict
    assert r.verdict == "UNRELIABLE" and r.message.endswith("not trustworthy: verdict unreliable")
    assert "at the table's level (the reference ran" in r.message and not r.ok


def _v2_copy(tmp_path: Path, start_ms: float, end_ms: float) -> Path:
    """A copy of a committed table (converted to format 3 by :func:`convert_from_probe`) made back
    into the format-2 table it was: no ``ref_ms`` column, no reference, the given probes."""
    src = Path(__file__).resolve().parent.parent / "latency_tables" / "cpu-amd-epyc" / "resnet20-x1-32px-b1-ort-t1-float32"
    shutil.copy(f"{src}.e2e.csv", tmp_path / "t.e2e.csv")
    with open(f"{src}.csv", newline="") as f, open(tmp_path / "t.csv", "w", newline="") as out:
        w = csv.writer(out, lineterminator="\n")
        for row in csv.reader(f):
            w.writerow(row[:-1])  # the ref_ms column off
    meta = json.loads(Path(f"{src}.json").read_text())
    meta.pop("reference")
    meta["format_version"] = 2
    meta["conditions"]["start"]["probe_ms"], meta["conditions"]["end"]["probe_ms"] = start_ms, end_ms
    (tmp_path / "t.json").write_text(json.dumps(meta))
    return tmp_path / "t.csv"


def test_old_format_tables_load_and_predict_as_measured(tmp_path):
    """A format-2 table (no ref_ms column, no reference) loads; its level is unknown (None)."""
    committed = _v2_copy(tmp_path, 1.0, 1.0)
    table = LatencyTable.load(committed)
    assert table.reference_level_ms is None and table.meta["format_version"] == 2
    with open(committed, newline="") as f:
        assert "ref_ms" not in next(csv.reader(f))
    assert all(t.ref_ms is None for t in table.entries.values())
    # written back, the same entries in this version's columns (ref_ms empty), the same predictions
    (tmp_path / "copy").mkdir()
    for p in table_paths(committed):
        shutil.copy(p, tmp_path / "copy" / p.name)
    committed = tmp_path / "copy" / committed.name
    copy = LatencyTable.load(committed)
    copy.save(committed)
    with open(committed, newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    again = LatencyTable.load(committed)
    assert again.entries == table.entries and again.reference_level_ms is None


def test_profile_records_the_reference_and_recalibrate_converts_an_old_table(tmp_path):
    out = tmp_path / "r.csv"
    settings = ProfileSettings(**SMALL, out=str(out), quick=True, calib_configs=3, holdout_configs=1)
    profile(settings)
    table = LatencyTable.load(out)
    ref = table.meta["reference"]
    assert table.meta["format_version"] == 3 and table.reference_level_ms == ref["level_ms"] > 0
    assert set(ref["parts_ms"]) == set(reference_specs()) and ref["level_ms"] == pytest.approx(
        sum(ref["parts_ms"].values()), rel=1e-4)
    assert all(t.ref_ms is not None and t.ref_ms > 0 for t in table.entries.values())
    e2e = list(csv.DictReader(open(table_paths(out)[2])))
    assert all(float(r["ref_ms"]) > 0 for r in e2e)
    # the same table as an older hwslim wrote it: no reference, no ref_ms column
    meta_path = table_paths(out)[1]
    meta = json.loads(meta_path.read_text())
    del meta["reference"]
    meta["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    rows = list(csv.DictReader(open(out)))
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS[:-1]), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    assert LatencyTable.load(out).reference_level_ms is None
    said: list[str] = []
    recalibrate(settings, log=said.append)
    converted = LatencyTable.load(out)
    assert converted.meta["format_version"] == 3 and converted.reference_level_ms > 0
    assert any(s.startswith("converting the table to reference units") for s in said)


def test_the_real_reference_runs_quickly_with_onnx_runtime():
    import time

    from profilers import get_profiler

    with get_profiler("cpu", threads=1) as prof:
        runner = prof.reference_runner()
        t0 = time.perf_counter()
        t = runner.time()
        took = time.perf_counter() - t0
    assert dict(t.parts).keys() == set(reference_specs()) and all(v > 0 for _, v in t.parts)
    assert took < 0.5  # tens of ms on a quiet core; generous for a shared, busy one


def test_convert_from_probe_keeps_the_table_and_takes_the_level_from_its_probes(tmp_path):
    from hwslim.latency.table import convert_from_probe

    path = _v2_copy(tmp_path, 1.00, 1.02)
    before = LatencyTable.load(path)
    assert before.reference_level_ms is None
    convert_from_probe(path)
    after = LatencyTable.load(path)
    assert after.reference_level_ms == pytest.approx(1.01)
    assert after.meta["format_version"] == 3 and after.meta["reference"]["from_probe"] == {"start_ms": 1.0, "end_ms": 1.02}
    assert {k: t.median_ms for k, t in after.entries.items()} == {k: t.median_ms for k, t in before.entries.items()}
    net = create_model("resnet20", input_size=32)
    specs = net.layer_specs(net.min_config())
    assert after.predict_ms(specs) == before.predict_ms(specs)


def test_convert_from_probe_refuses_a_table_measured_across_a_speed_change(tmp_path):
    from hwslim.core.errors import TableError
    from hwslim.latency.table import convert_from_probe

    path = _v2_copy(tmp_path, 1.00, 1.10)
    with pytest.raises(TableError, match="across a change of the machine's speed"):
        convert_from_probe(path)
    assert LatencyTable.load(path).reference_level_ms is None  # untouched
