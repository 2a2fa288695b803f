"""hwslim.latency.conditions: what a table was measured under, measured again and compared.

The probe and the machine readings are real measurements on this machine; "another
machine" and "a busier machine" are tables whose recorded conditions are edited (data),
since neither can be produced on demand.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hwslim.latency.conditions import (KERNEL_FLAGS, PROBE_TOLERANCE, Conditions, compare, compare_to_table, cpu_flags,
                               cpu_model, drift, machine_conditions, measure_conditions, table_conditions)
from hwslim.latency.table import LatencyTable, table_paths
from hwslim.latency.profile import ProfileSettings, _borrow_entries, profile
from profilers import get_profiler

SMALL = dict(model="resnet20", width_mult=0.25, input_size=8)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "r20.csv"
    profile(ProfileSettings(**SMALL, out=str(out), quick=True, calib_configs=3, holdout_configs=2))
    return out


def edited_copy(src: Path, dst_dir: Path, edit) -> Path:
    """A copy of the table at ``src`` whose metadata ``edit(meta)`` changed."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in table_paths(src):
        if p.exists():
            shutil.copy(p, dst_dir / p.name)
    dst = dst_dir / src.name
    meta_path = table_paths(dst)[1]
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    return dst


def test_machine_conditions_read_this_machine():
    c = machine_conditions()
    assert c.cpu == cpu_model() and c.cores == os.cpu_count()
    assert c.load_1min == pytest.approx(os.getloadavg()[0], abs=0.5)
    assert c.others_running is not None and c.others_running >= 0
    assert c.probe_ms is None  # no backend asked
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        line = next(x for x in text.splitlines() if x.split(":")[0].strip() in ("flags", "Features"))
        assert set(c.flags) == set(KERNEL_FLAGS) & set(line.split(":", 1)[1].split()) and c.flags == cpu_flags()


def test_the_probe_is_measured_with_the_profilers_settings_and_repeats():
    with get_profiler("cpu", "ort", threads=1) as prof:
        first, second = measure_conditions(prof), measure_conditions(prof)
    for c in (first, second):
        assert c.probe_ms > 0.05 and c.probe_n >= 30 and c.probe_iqr_ms >= 0
        assert c.others_running >= 0 and c.cpu == cpu_model()
    # a quarter of a second each; on a shared machine two probes still agree within a third
    assert 0.75 < second.probe_ms / first.probe_ms < 1.33


def test_conditions_round_trip_and_garbage_reads_as_unknown():
    c = Conditions(cpu="X", flags=("avx2",), cores=2, mhz=2600.0, governor="performance", load_1min=1.0,
                   others_running=0.5, probe_ms=1.0, probe_iqr_ms=0.01, probe_n=250, at="t")
    assert Conditions.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    bad = Conditions.from_dict({"cpu": 3, "flags": "avx", "probe_ms": -1, "load_1min": float("nan"),
                                "others_running": True, "probe_n": 0, "cores": "two"})
    assert bad == Conditions()
    assert Conditions.from_dict("not a dict") is None


def _c(**kw) -> Conditions:
    base = dict(cpu="AMD EPYC", flags=("avx2", "avx512f"), cores=2, load_1min=1.0, others_running=0.0,
                probe_ms=1.0)
    return Conditions(**{**base, **kw})


def test_the_same_conditions_compare():
    check = compare(_c(), _c(probe_ms=1.0 + PROBE_TOLERANCE / 2, others_running=0.3, load_1min=1.4))
    assert check.reliable and check.probe_ratio == pytest.approx(1 + PROBE_TOLERANCE / 2)


def test_a_busier_machine_makes_the_verdict_unreliable_and_says_why_in_one_line():
    check = compare(_c(), _c(probe_ms=1.31, others_running=1.0, load_1min=2.1), when="before measuring")
    assert not check.reliable
    # one plain sentence: the one probe that decided, its numbers, no nested parentheses
    assert check.line() == ("the speed probe before measuring ran 1.31x slower than when the table was measured "
                            "(1.31 vs 1 ms): verdict unreliable")
    assert len(check.reasons) == 2  # the threads differ too: recorded in as_dict(), not a second message
    # a neighbor on one of two cores is enough, even where the probe does not notice it
    neighbor = compare(_c(), _c(others_running=1.0))
    assert neighbor.line() == ("1.0 other threads were running against 0.0 when the table was measured, on 2 cores: "
                               "verdict unreliable")
    # beyond every core busy, more threads change nothing the share can tell
    assert compare(_c(others_running=4.4), _c(others_running=5.0)).reliable
    faster = compare(_c(), _c(probe_ms=0.5))
    assert not faster.reliable and faster.line().startswith("the speed probe ran 2.00x faster than when the table "
                                                            "was measured (0.5 vs 1 ms)")
    quieter = compare(_c(others_running=1.0), _c())
    assert quieter.line().startswith("0.0 other threads were running against 1.0 when the table was measured")
    # the probe decides where the threads disagree: it is the measurement
    assert compare(_c(others_running=2.0), _c(others_running=1.0, probe_ms=2.0)).line().startswith(
        "the speed probe ran 2.00x slower")
    assert compare(_c(), _c(others_running=1.0, probe_ms=0.5)).line().startswith("the speed probe ran 2.00x faster")
    assert compare(_c(governor="performance"), _c(governor="powersave")).line() == (
        "the CPU frequency governor is powersave, it was performance when the table was measured: verdict unreliable")


def test_no_message_contradicts_its_numbers():
    """The first-contact report: "busier (probe 1.41x slower, 3.1 vs 3.1 threads, load 3.8 vs 3.9)" while the
    conditions line showed the probe faster. Every message names one condition and only what its numbers show."""
    import itertools

    for probe, others, load in itertools.product((0.5, 0.95, 1.0, 1.2, 2.0), (0.0, 0.5, 1.0, 3.1), (0.5, 3.8, 3.9)):
        check = compare(_c(others_running=1.0, load_1min=3.9), _c(probe_ms=probe, others_running=others,
                                                                   load_1min=load))
        if check.reliable:
            continue
        line = check.line()
        assert line.count("(") <= 1 and "((" not in line and line.count(")") == line.count("(")
        assert not any(w in line for w in ("busier", "quieter", "machine faster"))
        if "slower" in line:
            assert probe > 1
        if "faster" in line:
            assert probe < 1
        if "other threads" in line:
            assert abs(others - 1.0) >= 0.8 and 0.95 <= probe <= 1.05


def test_another_cpu_or_other_flags_are_another_machine():
    other = compare(_c(), _c(cpu="Intel Xeon"))
    assert not other.reliable and other.line() == ("the table was measured on AMD EPYC, this machine is Intel Xeon: "
                                                   "verdict unreliable")
    flags = compare(_c(), _c(flags=("avx2", "avx512f", "amx_tile")))
    assert not flags.reliable and flags.line() == ("this CPU's kernel flags differ from the table's: new here amx_tile: "
                                                   "verdict unreliable")


def test_tables_without_recorded_conditions_compare_their_load():
    old = {"device": "cpu", "device_name": "AMD EPYC", "load_avg_1min": [0.9, 1.1]}
    then, changed = table_conditions(old)
    assert then == Conditions(cpu="AMD EPYC", load_1min=1.0) and changed is None
    assert compare_to_table(old, _c(others_running=None, load_1min=1.4)).reliable
    busy = compare_to_table(old, _c(others_running=None, load_1min=2.5))
    assert not busy.reliable and busy.line() == ("the load average was 2.5 against 1.0 when the table was measured, "
                                                 "on 2 cores: verdict unreliable")
    assert table_conditions({"device": "cuda"}) == (None, None)


def test_profile_records_the_conditions_at_start_and_end(table):
    meta = LatencyTable.load(table).meta
    rec = meta["conditions"]
    start, end = Conditions.from_dict(rec["start"]), Conditions.from_dict(rec["end"])
    for c in (start, end):
        assert c.cpu == cpu_model() and c.probe_ms > 0 and c.probe_n >= 30 and c.load_1min is not None
    assert (rec["changed"] is None) == drift(start, end).reliable
    assert len(meta["load_avg_1min"]) == 2  # as before: the load average at start and end


def test_a_table_measured_while_the_machine_changed_gives_no_confident_verdict(table):
    # a table without a reference level (format 2): a table with one is corrected instead
    # (tests/test_reference_timing.py)
    meta = json.loads(table_paths(table)[1].read_text())
    meta.pop("reference")
    start = Conditions.from_dict(meta["conditions"]["start"])
    slower = Conditions.from_dict({**meta["conditions"]["start"], "probe_ms": start.probe_ms * 1.2})
    moved = drift(start, slower)
    assert not moved.reliable and moved.summary.startswith("the speed probe at the end of profiling ran 1.20x slower "
                                                           "than at the start of profiling (")
    meta["conditions"] = {"start": start.to_dict(), "end": start.to_dict(), "changed": moved.summary}
    check = compare_to_table(meta, start)
    assert not check.reliable
    assert check.line() == (f"the table's machine changed while it was measured: {moved.summary}: verdict unreliable")
    assert check.line().count("(") == 1  # one sentence, one level of parentheses
    meta["conditions"]["changed"] = None
    assert compare_to_table(meta, start).reliable


def test_entries_are_borrowed_only_from_tables_measured_under_the_same_conditions(table, tmp_path):
    # tables without a reference level (format 2); tables with one lend rescaled entries whatever
    # the probe said (tests/test_reference_timing.py)
    def halve_probe(meta):
        meta["conditions"]["changed"] = None
        meta.pop("reference")
        for k in ("start", "end"):
            meta["conditions"][k]["probe_ms"] /= 2

    def steady(meta):
        meta["conditions"]["changed"] = None
        meta.pop("reference")

    lender = edited_copy(table, tmp_path / "faster", halve_probe)
    meta = LatencyTable.load(lender).meta
    wanted = set(LatencyTable.load(lender).entries)
    now, _ = table_conditions(json.loads(table_paths(table)[1].read_text()))
    here = tmp_path / "faster" / "other.csv"
    said = []
    assert _borrow_entries(here, meta, wanted, now=now, log=said.append) == {}
    assert len(said) == 1 and said[0].startswith("not reusing entries of r20.csv: the speed probe ran 2.00x "
                                                 "slower than when the table was measured (")
    edited_copy(table, tmp_path / "same", steady)
    assert set(_borrow_entries(tmp_path / "same" / "other.csv", meta, wanted, now=now)) == wanted
