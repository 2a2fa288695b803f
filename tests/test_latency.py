"""Latency tables: format round trip, torn rows, prediction, refusal, default paths, cost --table."""
from __future__ import annotations

import copy
from pathlib import Path
import json

import pandas as pd
import numpy as np
import pytest
import torch
from dataclasses import replace

from hwslim.cli import main
from hwslim.core.errors import TableError
from hwslim.latency.table import (COLUMNS, Calibration, LatencyTable, RowWriter, accuracy, default_table_path, find_table,
                            fit_calibration, fit_line, new_meta, read_rows, spearman, table_paths)
from hwslim.models import create_model
from hwslim.core.supernet import SlimmableNet
from profilers import get_profiler
from profilers.base import Timing


@pytest.fixture(scope="module")
def net():
    with torch.device("meta"):
        return create_model("resnet20", width_mult=0.25, input_size=16)


@pytest.fixture(scope="module")
def machine_meta():
    with get_profiler("cpu", "ort") as prof:
        return prof.metadata()


def _ms(i: int) -> float:
    return round(0.01 * (i + 1), 4)


def _expected_sum(specs) -> float:
    first: dict = {}
    for i, s in enumerate(specs):
        first.setdefault(s.signature(), _ms(i))
    return sum(first[s.signature()] for s in specs)


def _table(net, machine_meta, calibration=None) -> LatencyTable:
    specs = net.layer_specs(net.full_config())
    entries = {}
    for i, s in enumerate(specs):  # repeated blocks share a signature: the first one sets it
        entries.setdefault(s.signature(), Timing(_ms(i), 0.001, round(1.1 * _ms(i), 4), 20))
    meta = new_meta(machine_meta, model=net.name, width_mult=net.width_mult, input_size=16, batch=1,
                    entries_expected=len(entries), method="in_network")
    meta.update(status="complete", calibration=calibration.to_dict() if calibration else None)
    return LatencyTable(meta, entries)


def test_round_trip_and_pandas_can_read_it(net, machine_meta, tmp_path):
    table = _table(net, machine_meta, Calibration(1.1, 0.02, 8, {"within_5pct": 1.0}))
    path = table.save(tmp_path / "t.csv")
    again = LatencyTable.load(path)
    assert again.entries == table.entries and again.meta == table.meta
    assert LatencyTable.load(tmp_path / "t.json").entries == table.entries  # any of the files names the table
    df = pd.read_csv(path)
    assert list(df.columns) == list(COLUMNS) and len(df) == len(table)
    assert df["median_ms"].iloc[0] == pytest.approx(0.01)


def test_predict_is_the_calibrated_sum(net, machine_meta):
    specs = net.layer_specs(net.full_config())
    raw = _table(net, machine_meta)
    total = _expected_sum(specs)
    assert raw.sum_ms(specs) == pytest.approx(total)
    assert raw.predict_ms(specs) == pytest.approx(total)  # uncalibrated: the plain sum
    cal = _table(net, machine_meta, Calibration(1.25, 0.5, 8))
    assert cal.predict_ms(specs) == pytest.approx(1.25 * total + 0.5)
    # resnet20 has no depthwise layer, so a depthwise slope changes nothing here
    assert _table(net, machine_meta, Calibration(1.25, 0.5, 8, a_depthwise=3.0)).predict_ms(specs) == \
        pytest.approx(1.25 * total + 0.5)
    assert cal.layer_ms(specs[0]) == pytest.approx(0.01)


def test_a_missing_entry_is_named(net, machine_meta):
    table = _table(net, machine_meta)
    spec = net.layer_specs(net.full_config(), input_size=32)[0]
    with pytest.raises(TableError, match="no entry for layer 'stem'.*in_h=32"):
        table.predict_ms([spec])


def test_missing_corrupt_and_incomplete_tables_are_refused(net, machine_meta, tmp_path):
    with pytest.raises(TableError, match="not found"):
        LatencyTable.load(tmp_path / "nope.csv")
    table = _table(net, machine_meta)
    path = table.save(tmp_path / "t.csv")
    meta_path = table_paths(path)[1]
    meta_path.write_text("{not json")
    with pytest.raises(TableError, match="unreadable"):
        LatencyTable.load(path)
    meta_path.write_text(json.dumps({**table.meta, "status": "measuring"}))
    with pytest.raises(TableError, match="incomplete.*run the same `hwslim profile`"):
        LatencyTable.load(path)
    assert len(LatencyTable.load(path, allow_incomplete=True)) == len(table)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(TableError, match="not a hwslim table"):
        LatencyTable.load(path, allow_incomplete=True)


def test_compatible_setup_passes_and_others_are_refused_in_one_line(net, machine_meta):
    table = _table(net, machine_meta)
    table.check_compatible(net, batch=1, input_size=16)
    with pytest.raises(TableError, match=r"batch 1 \(wanted: 8\).*--force") as e:
        table.check_compatible(net, batch=8, input_size=16)
    assert "\n" not in str(e.value)
    table.check_compatible(net, batch=8, input_size=16, force=True)
    with torch.device("meta"):
        other = create_model("resnet20", width_mult=0.5, input_size=16)
    with pytest.raises(TableError, match="only 13 of the 71 layer shapes of resnet20 x0.5 at 16px "
                                         "\\(it was measured for resnet20 x0.25 at 16px\\)"):
        table.check_compatible(other, batch=1)
    # a table serves any graph whose layer shapes it holds: a graph of the same layers under another name
    from hwslim.latency.entries import enumerate_entries

    full = LatencyTable(table.meta, {s.signature(): Timing(0.01, 0.001, 0.011, 20) for s in enumerate_entries(net)})
    renamed = SlimmableNet(replace(net.graph, name="my_resnet"))
    full.check_compatible(renamed, batch=1, input_size=16)
    with pytest.raises(TableError, match="threads 1 \\(wanted: 2\\)"):
        table.check_compatible(net, batch=1, input_size=16, threads=2)
    moved = LatencyTable({**table.meta, "device_name": "Some Other CPU", "backend_version": "0.1"}, table.entries)
    with pytest.raises(TableError, match="device_name 'Some Other CPU'.*backend_version '0.1'.*--force"):
        moved.check_compatible(net, batch=1, input_size=16)
    gpu = LatencyTable({**table.meta, "device": "cuda", "backend": "trt"}, table.entries)
    if not torch.cuda.is_available():
        with pytest.raises(TableError, match="backend trt"):
            gpu.check_compatible(net, batch=1, input_size=16)


def test_torn_last_row_is_dropped_and_cut_before_appending(tmp_path):
    path = tmp_path / "rows.csv"
    with RowWriter(path, ("a", "b")) as w:
        w.append({"a": 1, "b": "x"})
        w.append({"a": 2, "b": "y"})
    with open(path, "a") as f:
        f.write("3,z-was-being-wri")  # what a kill -9 mid-write leaves
    rows, good = read_rows(path, ("a", "b"))
    assert rows == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}] and good < path.stat().st_size
    with RowWriter(path, ("a", "b")) as w:
        w.append({"a": 3, "b": "z"})
    assert path.read_text() == "a,b\n1,x\n2,y\n3,z\n"


def test_calibration_statistics_by_hand():
    assert fit_line([1, 2, 3, 4], [3, 5, 7, 9]) == pytest.approx((2.0, 1.0))
    sums, dw = [4, 6, 8, 10, 12, 14, 16, 18], [1, 3, 1, 4, 2, 5, 2, 6]
    e2e = [1.0 * (s - d) + 1.5 * d + 0.2 for s, d in zip(sums, dw)]
    assert fit_calibration(sums, dw, e2e) == pytest.approx((1.0, 1.5, 0.2))
    assert fit_calibration(sums, [0] * 8, [2 * s for s in sums]) == pytest.approx((2.0, None, 0.0))
    wild = [1.0 * (s - d) + 9.0 * d for s, d in zip(sums, dw)]  # a slope outside 0.5..2.5: one slope instead
    assert fit_calibration(sums, dw, wild)[1] is None
    # depthwise time proportional to the rest plus noise: a second slope fits the noise, one slope is kept
    rng = np.random.default_rng(0)
    dw_corr = [0.3 * s * (1 + 0.02 * rng.standard_normal()) for s in sums]
    noisy = [s * (1 + 0.02 * rng.standard_normal()) for s in sums]
    a, a_dw, b = fit_calibration(sums, dw_corr, noisy)
    assert a_dw is None and a == pytest.approx(fit_line(sums, noisy)[0])
    assert Calibration(1.0, 0.2, 6, a_depthwise=1.5).apply(10.0, 4.0) == pytest.approx(6.0 + 6.0 + 0.2)
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    acc = accuracy([1.0, 1.04, 1.2, 0.93], [1.0, 1.0, 1.0, 1.0])
    assert acc["within_5pct"] == 0.5 and acc["within_10pct"] == 0.75
    assert acc["max_abs_err_pct"] == pytest.approx(20.0)


def test_find_table_locates_the_default_path_or_says_what_to_run(net, machine_meta, tmp_path):
    with pytest.raises(TableError, match="hwslim profile --device cpu --backend ort --model resnet20 "
                                         "--width-mult 0.25 --input-size 16 --batch 1"):
        find_table("cpu", "resnet20", 0.25, input_size=16, root=tmp_path)
    path = default_table_path("cpu", machine_meta["device_name"], "resnet20", 0.25, 16, 1, "ort", 1, "float32",
                              root=tmp_path)
    _table(net, machine_meta).save(path)
    assert find_table("cpu", "resnet20", 0.25, input_size=16, root=tmp_path) == path
    assert find_table("cpu", "resnet20", 0.25, input_size=16, threads=1, backend="ort", root=tmp_path) == path
    with pytest.raises(TableError):
        find_table("cpu", "resnet20", 0.25, input_size=16, batch=4, root=tmp_path)


def test_cost_adds_latency_ms_from_a_table(net, machine_meta, tmp_path, capsys):
    path = _table(net, machine_meta, Calibration(2.0, 0.1, 8)).save(tmp_path / "t.csv")
    argv = ["cost", "--model", "resnet20", "--width-mult", "0.25", "--input-size", "16", "--table", str(path)]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_ms"] == pytest.approx(2.0 * _expected_sum(net.layer_specs(net.full_config())) + 0.1)
    assert main(argv + ["--batch", "2"]) == 2
    assert "--force-table" in capsys.readouterr().err


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.pop("device"), "lacks 'device'"),
    (lambda m: m.pop("backend"), "lacks 'backend'"),
    (lambda m: m.pop("settings"), "lacks 'settings'"),
    (lambda m: m.update(settings=[1]), "settings=\\[1\\], not an object"),
    (lambda m: m["settings"].update(threads="two"), "settings.threads='two'"),
    (lambda m: m.update(threads=2), "inconsistent \\(threads=2 but settings.threads=1\\)"),
    (lambda m: m.update(threads="1"), "threads='1'"),
    (lambda m: m.update(batch=None), "batch=None"),
    (lambda m: m.pop("input_size"), "lacks 'input_size'"),
    (lambda m: m.update(calibration={"b": 1}), "calibration lacks 'a'"),
    (lambda m: m.update(calibration={"a": "x", "b": 1}), "calibration.a='x'"),
    (lambda m: m.update(calibration=None), "lacks a 'calibration' object"),
])
def test_garbled_metadata_is_refused_in_one_line(net, machine_meta, tmp_path, capsys, edit, problem):
    path = _table(net, machine_meta, Calibration(1.1, 0.02, 8)).save(tmp_path / "t.csv")
    meta_path = table_paths(path)[1]
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TableError, match=f"t.json: metadata.*{problem}.*re-run hwslim profile"):
        LatencyTable.load(path)
    argv = ["cost", "--model", "resnet20", "--width-mult", "0.25", "--input-size", "16", "--table", str(path), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "re-run hwslim profile" in captured.err


@pytest.mark.parametrize("edit", [lambda m: m.pop("device"), lambda m: m["settings"].update(threads="two"),
                                  lambda m: m.update(settings=["x"])])
def test_machine_check_turns_bad_metadata_into_a_table_error(net, machine_meta, edit):
    table = _table(net, copy.deepcopy(machine_meta))  # not loaded, so not validated: the check must not crash
    edit(table.meta)
    with pytest.raises(TableError, match="re-run hwslim profile"):
        table.check_compatible(net, batch=1, input_size=16)


def test_a_setting_mismatch_names_the_table_and_the_profiler(machine_meta):
    with get_profiler("cpu", "ort") as prof:
        diff = prof.mismatches({**machine_meta, "threads": 2})
    assert diff == ["table measured with threads=2, this profiler is set to threads=1"]


def test_input_size_zero_is_not_the_default(net, machine_meta):
    table = _table(net, machine_meta)
    with pytest.raises(TableError, match="input size 16 \\(wanted: 0\\)"):
        table.check_compatible(net, batch=1, input_size=0)


def test_fit_line_falls_back_to_proportional_where_noise_tilts_the_slope():
    a, b = fit_line([1.0, 2.0, 3.0], [3.0, 2.0, 1.5])  # bigger sums, faster networks: noise
    assert a == pytest.approx(6.5 / 6.0) and b == 0.0


def test_tables_are_found_from_any_directory_in_the_documented_order(net, machine_meta, tmp_path, monkeypatch):
    """--table-dir, then $HWSLIM_TABLE_DIR, then ~/.cache/hwslim/latency_tables ($XDG_CACHE_HOME); not the cwd."""
    from hwslim.latency.table import table_dir, table_search_path, user_table_dir

    monkeypatch.delenv("HWSLIM_TABLE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "hwslim" / "latency_tables"
    assert user_table_dir() == cache and table_dir() == cache  # where `hwslim profile` writes by default
    args = ("cpu", machine_meta["device_name"], "resnet20", 0.25, 16, 1, "ort", 1, "float32")
    written = default_table_path(*args)  # what profile writes without --out
    assert written.is_relative_to(cache)
    _table(net, machine_meta).save(written)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "latency_tables").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert find_table("cpu", "resnet20", 0.25, input_size=16) == written
    env_dir = tmp_path / "env"
    monkeypatch.setenv("HWSLIM_TABLE_DIR", str(env_dir))
    assert find_table("cpu", "resnet20", 0.25, input_size=16) == written  # not in $HWSLIM_TABLE_DIR: the cache
    in_env = _table(net, machine_meta).save(default_table_path(*args, root=env_dir))
    assert find_table("cpu", "resnet20", 0.25, input_size=16) == in_env
    given = _table(net, machine_meta).save(default_table_path(*args, root=tmp_path / "given"))
    assert find_table("cpu", "resnet20", 0.25, input_size=16, root=tmp_path / "given") == given
    assert table_search_path(tmp_path / "given")[:3] == [tmp_path / "given", env_dir, cache]
    assert table_search_path()[-1].name == "latency_tables" and Path.cwd() / "latency_tables" not in \
        table_search_path()
    with pytest.raises(TableError, match=f"in {tmp_path / 'given'}, {env_dir}, {cache}, "):
        find_table("cpu", "resnet20", 0.25, input_size=16, batch=4, root=tmp_path / "given")


def test_search_device_cpu_finds_the_profiled_table_from_another_directory(tmp_path, monkeypatch, capsys,
                                                                           make_table):
    from hwslim.importing.checkpoint import save_checkpoint
    from hwslim.importing.data import synthetic_data_info
    from hwslim.latency.table import LatencyTable

    monkeypatch.delenv("HWSLIM_TABLE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = create_model("resnet20", width_mult=0.25, input_size=8)
    ckpt = save_checkpoint(tmp_path / "ck.pt", model, data=synthetic_data_info(200, 16, input_size=8, num_val=16))
    with get_profiler("cpu", "ort") as prof:
        name = prof.metadata()["device_name"]
    path = make_table(model, default_table_path("cpu", name, "resnet20", 0.25, 8, 1, "ort", 1, "float32"))
    table = LatencyTable.load(path)
    full, narrow = (table.predict_ms(model.layer_specs(c)) for c in (model.full_config(), model.min_config()))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["search", "--checkpoint", str(ckpt), "--latency-ms", f"{narrow + 0.9 * (full - narrow):.6f}", "--device", "cpu",
                 "--no-progress", "--threads", "1", "--out", "s", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["meta"]["table"] == str(path)


def test_tables_at_other_threads_batches_and_backends_are_told_apart(tmp_path, monkeypatch):
    """Real (quick) tables at the settings users deploy with: 2 threads and batch 8 under ONNX
    Runtime, and OpenVINO at 1 thread, batch 1. Each records its setting; find_table picks by them;
    check_compatible refuses each table for any other setting."""
    from hwslim.latency.profile import ProfileSettings, profile
    from profilers import available_backends

    monkeypatch.setenv("HWSLIM_TABLE_DIR", str(tmp_path))
    model = dict(model="resnet20", width_mult=0.5, input_size=8)
    quick = dict(quick=True, calib_configs=3, holdout_configs=2)
    t2b8 = profile(ProfileSettings(threads=2, batch=8, **model, **quick)).path
    meta = LatencyTable.load(t2b8).meta
    assert (meta["threads"], meta["batch"], meta["settings"]["threads"], meta["clock"]) == (2, 8, 2, "wall")
    assert t2b8.name == "resnet20-x0.5-8px-b8-ort-t2-float32.csv"
    find = dict(device="cpu", model="resnet20", width_mult=0.5, input_size=8)
    assert find_table(**find, batch=8, threads=2) == t2b8
    assert find_table(**find, batch=8) == t2b8  # 1 thread preferred, but only 2 measured
    for wrong in (dict(batch=8, threads=1), dict(batch=1), dict(batch=8, backend="openvino")):
        with pytest.raises(TableError, match="no latency table"):
            find_table(**find, **wrong)
    with torch.device("meta"):
        net = create_model("resnet20", width_mult=0.5, input_size=8)
    table = LatencyTable.load(t2b8)
    table.check_compatible(net, batch=8, threads=2, backend="onnxruntime")  # an alias of ort
    for use, said in ((dict(batch=1), r"batch 8 \(wanted: 1\)"), (dict(batch=8, threads=1), r"threads 2 \(wanted: 1\)"),
                      (dict(batch=8, backend="openvino"), r"backend ort \(wanted: openvino\)")):
        with pytest.raises(TableError, match=said):
            table.check_compatible(net, **use)
    if "openvino" in available_backends():
        ov = profile(ProfileSettings(backend="openvino", **model, **quick)).path
        assert ov.name == "resnet20-x0.5-8px-b1-openvino-t1-float32.csv"
        assert find_table(**find, backend="openvino") == ov and find_table(**find, batch=8, backend="ort") == t2b8
        with pytest.raises(TableError, match=r"backend openvino \(wanted: ort\)"):
            LatencyTable.load(ov).check_compatible(net, batch=1, backend="ort")
