"""The profiling driver: entry enumeration, designed networks, calibration, resuming after kill -9, CLI."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from hwslim.cli import main
from hwslim.core.errors import HwslimError
from hwslim.latency.table import COLUMNS, LatencyTable, fit_calibration, read_rows, table_paths
from hwslim.models import create_model
from hwslim.latency.profile import CalibrationError, ProfileSettings, SettingsError, calibration_configs, design_configs, profile, recalibrate
from hwslim.latency.entries import enumerate_entries

SMALL = dict(model="resnet20", width_mult=0.25, input_size=16)
SMALL_ARGS = ["--model", "resnet20", "--width-mult", "0.25", "--input-size", "16"]


def _meta_net(name: str, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_mobilenet_v2_default_supernet_has_2032_entries():
    net = _meta_net("mobilenet_v2")
    assert net.width_mult == 1.5
    assert len(enumerate_entries(net, 1, 224)) == 2032


@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("mobilenet_v2_cifar", {"width_mult": 0.35})])
def test_every_config_is_covered_by_the_entries(name, kw):
    net = _meta_net(name, **kw)
    entries = {s.signature() for s in enumerate_entries(net)}
    assert len(entries) == len(enumerate_entries(net))  # one spec per signature
    rng = random.Random(0)
    for cfg in [net.min_config(), net.full_config(), *net.uniform_configs(), *(net.random_config(rng) for _ in range(20))]:
        assert {s.signature() for s in net.layer_specs(cfg)} <= entries


def test_designed_networks_contain_every_entry_twice():
    net = _meta_net("mobilenet_v2_cifar", width_mult=0.35)
    wanted = {s.signature() for s in enumerate_entries(net)}
    configs = design_configs(net, wanted, contexts=2)
    seen: dict = {}
    for cfg in configs:
        for s in net.layer_specs(cfg):
            seen[s.signature()] = seen.get(s.signature(), 0) + 1
    assert set(seen) == wanted and min(seen.values()) >= 2
    assert len(configs) < len(wanted)  # far fewer networks than entries


def test_calibration_configs_are_distinct_valid_and_never_uniform():
    net = _meta_net("mobilenet_v2")
    cfgs = calibration_configs(net, 30, seed=3)
    keys = {json.dumps(c.widths, sort_keys=True) for c in cfgs}
    uniform = {json.dumps(c.widths, sort_keys=True) for c in net.uniform_configs()}
    assert len(keys) == 30 and not keys & uniform
    for c in cfgs:
        net.validate(c)
    sizes = sorted(sum(c.widths.values()) for c in cfgs)
    assert sizes[0] < 0.5 * sizes[-1]  # narrow and wide configs both appear


def test_profile_writes_a_complete_calibrated_table_and_a_rerun_measures_nothing(tmp_path):
    out = tmp_path / "t.csv"
    settings = ProfileSettings(**SMALL, out=str(out), quick=True, calib_configs=3, holdout_configs=2)
    result = profile(settings)
    net = _meta_net("resnet20", width_mult=0.25, input_size=16)
    assert result.entries == result.measured == len(enumerate_entries(net, 1, 16))
    table = LatencyTable.load(out)
    meta = table.meta
    assert meta["status"] == "complete" and meta["model"] == "resnet20" and meta["width_mult"] == 0.25
    assert meta["input_size"] == 16 and meta["backend"] == "ort" and meta["threads"] == 1
    assert meta["calibration"]["n_fit"] == 3 and meta["calibration"]["holdout"]["n"] == 2
    for key in ("device_name", "backend_version", "hwslim_version", "created", "dtype", "batch"):
        assert meta[key] not in (None, "")
    e2e = pd.read_csv(table_paths(out)[2])
    assert sorted(e2e["role"]) == ["fit"] * 3 + ["holdout"] * 2 and (e2e["median_ms"] > 0).all()
    assert table.predict_ms(net.layer_specs(net.min_config(), input_size=16)) > 0
    again = profile(settings)
    assert again.measured == 0 and again.reused == result.entries
    assert len(pd.read_csv(out)) == result.entries


def test_calibration_rounds_are_spread_over_the_entries_and_run_after_them_on_a_resume(tmp_path, monkeypatch):
    """The whole configs' rounds run while the entries are measured (one before the first
    entry, the last after the last), so layers and whole models see the same stretch of the
    machine's time; a rerun that only calibrates times them after the entries."""
    from profilers.base import E2E_ROUNDS, InterleavedRuns

    out = tmp_path / "s.csv"
    seen: list[int] = []  # entries in the table when each round starts
    real_round = InterleavedRuns.round

    def round_(self, *a, **kw):
        seen.append(len(read_rows(out, COLUMNS)[0]) if out.exists() else 0)
        return real_round(self, *a, **kw)

    monkeypatch.setattr(InterleavedRuns, "round", round_)
    settings = ProfileSettings(**SMALL, out=str(out), quick=True, calib_configs=3, holdout_configs=1)
    result = profile(settings)
    assert len(seen) == E2E_ROUNDS and seen[0] == 0 and seen[-1] == result.entries and seen == sorted(seen)
    # spread: most rounds ran while entries were still being measured
    assert sum(0 < n < result.entries for n in seen) + seen.count(0) >= E2E_ROUNDS // 2
    meta = LatencyTable.load(out).meta
    assert meta["calibration_plan"]["timed"] == "spread over the entries"
    assert len(pd.read_csv(table_paths(out)[2])) == 4 and meta["calibration"]["n_fit"] == 3
    table_paths(out)[2].unlink()
    seen.clear()
    profile(settings)
    assert seen == [result.entries] * E2E_ROUNDS  # nothing left to measure beside them
    assert LatencyTable.load(out).meta["calibration_plan"]["timed"] == "after the entries"


def test_kill_9_mid_run_then_rerun_completes_without_duplicates(tmp_path):
    out = tmp_path / "k.csv"
    args = ["profile", "--model", "resnet20", "--width-mult", "0.5", "--input-size", "8", "--out", str(out),
            "--quick", "--isolated", "--calib-configs", "3", "--holdout-configs", "1", "--json"]
    code = f"import sys; from hwslim.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(read_rows(out, COLUMNS)[0]) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "profile finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with open(out, "a") as f:
        f.write("conv,3,1,1,1,8,8,8")  # a row torn by the kill
    kept = {tuple(r.values()) for r in read_rows(out, COLUMNS)[0]}
    assert kept
    with pytest.raises(Exception, match="incomplete"):
        LatencyTable.load(out)

    settings = ProfileSettings(model="resnet20", width_mult=0.5, input_size=8, out=str(out), quick=True,
                               in_network=False, calib_configs=3, holdout_configs=1)
    result = profile(settings)
    net = _meta_net("resnet20", width_mult=0.5, input_size=8)
    expected = {s.signature() for s in enumerate_entries(net, 1, 8)}
    assert result.reused == len(kept) and result.measured == len(expected) - len(kept)
    df = pd.read_csv(out)
    sigs = [tuple(r) for r in df[list(COLUMNS[:12])].itertuples(index=False)]
    assert len(sigs) == len(set(sigs)) == len(expected)  # no duplicate, no torn row
    assert len(LatencyTable.load(out)) == len(expected)


def test_rerun_with_other_settings_is_refused_unless_forced(tmp_path):
    out = tmp_path / "t.csv"
    profile(ProfileSettings(**SMALL, out=str(out), quick=True, calib_configs=3, holdout_configs=1))
    other = ProfileSettings(model="resnet20", width_mult=0.25, input_size=8, out=str(out), quick=True,
                            calib_configs=3, holdout_configs=1)
    with pytest.raises(Exception, match="other settings.*--force"):
        profile(other)
    profile(ProfileSettings(**{**other.__dict__, "force": True}))
    assert LatencyTable.load(out).meta["input_size"] == 8


def test_cli_profile_prints_a_summary_and_user_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "c.csv"
    argv = ["profile", *SMALL_ARGS, "--out", str(out), "--quick", "--calib-configs", "3", "--holdout-configs", "1"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == summary["measured"] > 0 and summary["table"] == str(out)
    assert main(["profile", *SMALL_ARGS, "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwslim profile: error:") and "\n" not in err


TINY = dict(model="resnet20", width_mult=0.25, input_size=8, quick=True, calib_configs=3, holdout_configs=1)
TINY_ARGS = ["--model", "resnet20", "--width-mult", "0.25", "--input-size", "8", "--quick", "--calib-configs", "3",
             "--holdout-configs", "1"]


def _snapshot(out):
    return {p.name: p.read_bytes() for p in table_paths(out) if p.exists()}


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """A complete tiny table (copied per test: tests overwrite or break it)."""
    out = tmp_path_factory.mktemp("tiny") / "t.csv"
    profile(ProfileSettings(**TINY, out=str(out)))
    return _snapshot(out)


def _put(tmp_path, files):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path / "t.csv"


@pytest.mark.parametrize("bad", [dict(input_size=-3), dict(input_size=0), dict(batch=0), dict(threads=0),
                                 dict(calib_configs=2), dict(holdout_configs=-1), dict(contexts=0),
                                 dict(width_mult=-1.0)])
def test_impossible_settings_are_refused_before_anything_runs(bad):
    with pytest.raises(SettingsError, match="must be"):
        ProfileSettings(**{**TINY, **bad})
    assert issubclass(SettingsError, HwslimError)


@pytest.mark.parametrize("flag,value", [("--input-size", "-3"), ("--input-size", "0"), ("--batch", "0"),
                                        ("--threads", "0"), ("--calib-configs", "2"), ("--holdout-configs", "-1"),
                                        ("--contexts", "0")])
def test_cli_bad_settings_with_force_leave_the_existing_table_untouched(tiny_table, tmp_path, capsys, flag, value):
    out = _put(tmp_path, tiny_table)
    argv = ["profile", *TINY_ARGS, "--out", str(out), "--force", flag, value]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage error
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err
    assert _snapshot(out) == tiny_table
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(tiny_table)


def test_forced_rerun_that_fails_keeps_the_old_table_and_one_that_completes_replaces_it(tiny_table, tmp_path,
                                                                                        monkeypatch):
    out = _put(tmp_path, tiny_table)
    other = ProfileSettings(**{**TINY, "input_size": 12}, out=str(out), force=True)
    monkeypatch.setattr("hwslim.latency.profile.fit_calibration", lambda *a: (-1.0, None, 0.0))
    with pytest.raises(CalibrationError, match="degenerate.*stays incomplete"):
        profile(other)
    assert _snapshot(out) == tiny_table  # the old table is whole; the new one waits beside it
    assert LatencyTable.load(out).meta["input_size"] == 8
    monkeypatch.undo()
    result = profile(other)  # resumes the forced run: the entries measured before are reused
    assert result.reused == result.entries and result.path == out
    table = LatencyTable.load(out)
    assert table.meta["input_size"] == 12 and table.meta["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.e2e.csv", "t.json"]
    e2e = pd.read_csv(table_paths(out)[2])
    assert len(e2e) == 4


def test_recalibrate_refits_on_the_same_configs_timed_again_and_keeps_the_entries_and_the_old_rows(tiny_table,
                                                                                                   tmp_path):
    out = _put(tmp_path, tiny_table)
    csv_path, meta_path, e2e_path = table_paths(out)
    before = json.loads(meta_path.read_text())
    result = recalibrate(ProfileSettings(**TINY, out=str(out)))
    assert csv_path.read_bytes() == tiny_table["t.csv"]  # the entries stay
    meta = json.loads(meta_path.read_text())
    (rec,) = meta["recalibrations"]
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # noqa: E731 (NaN != NaN)
    assert same(rec["previous"], before["calibration"]) and same(meta["calibration"], result.calibration.to_dict())
    assert (tmp_path / rec["previous_e2e"]).read_bytes() == tiny_table["t.e2e.csv"]  # the old rows are kept
    old, new = pd.read_csv(tmp_path / rec["previous_e2e"]), pd.read_csv(e2e_path)
    assert list(new["widths"]) == list(old["widths"]) and list(new["role"]) == list(old["role"])  # the same configs
    assert (new["median_ms"] > 0).all() and not new["median_ms"].equals(old["median_ms"])  # timed again
    fit = new[new["role"] == "fit"]
    a, _, b = fit_calibration(list(fit["sum_ms"]), [0.0] * len(fit), list(fit["median_ms"]))
    assert (result.calibration.a, result.calibration.b) == pytest.approx((a, b))  # refitted on the new rows
    assert same({k: v for k, v in meta.items() if k not in ("calibration", "recalibrations")},
                {k: v for k, v in before.items() if k != "calibration"})
    assert rec["conditions"]["start"]["probe_ms"] > 0 and rec["seconds"] > 0
    assert LatencyTable.load(out).calibration.a == pytest.approx(a)
    recalibrate(ProfileSettings(**TINY, out=str(out)))
    assert len(json.loads(meta_path.read_text())["recalibrations"]) == 2
    assert not list(tmp_path.glob(".*"))  # no work file left


def test_recalibrate_refuses_a_missing_incomplete_or_other_setup_table_in_one_line_touching_nothing(
        tiny_table, tmp_path, capsys):
    argv = ["profile", *TINY_ARGS, "--recalibrate", "--out"]
    assert main(argv + [str(tmp_path / "none.csv")]) == 2
    assert "no latency table at" in capsys.readouterr().err
    out = _put(tmp_path, tiny_table)
    meta_path = table_paths(out)[1]
    for change, says in ((dict(backend_version="0.0"), "another setup (backend_version '0.0'"),
                         (dict(status="measuring"), "is not complete")):
        meta_path.write_text(json.dumps({**json.loads(tiny_table["t.json"]), **change}))
        files = _snapshot(out)
        assert main(argv + [str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and err.startswith("hwslim profile: error:")
        assert _snapshot(out) == files and sorted(p.name for p in tmp_path.iterdir()) == sorted(tiny_table)


def test_cli_recalibrate_says_how_the_fit_moved(tiny_table, tmp_path, capsys):
    out = _put(tmp_path, tiny_table)
    assert main(["profile", *TINY_ARGS, "--recalibrate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    kept = json.loads(table_paths(out)[1].read_text())["recalibrations"][0]["previous_e2e"]
    assert "recalibrated: a " in text and " -> " in text and f"kept in {kept}" in text
    assert f"table: {out}" in text


@pytest.mark.parametrize("fit", [(0.0, None, 1.0), (-2.0, None, 0.0), (float("nan"), None, 0.0),
                                 (float("inf"), None, 0.0)])
def test_a_degenerate_calibration_leaves_the_table_incomplete(tmp_path, monkeypatch, fit):
    out = tmp_path / "d.csv"
    monkeypatch.setattr("hwslim.latency.profile.fit_calibration", lambda *a: fit)
    with pytest.raises(CalibrationError, match="degenerate"):
        profile(ProfileSettings(**TINY, out=str(out), in_network=False))
    assert json.loads(table_paths(out)[1].read_text())["status"] == "measuring"
    with pytest.raises(HwslimError, match="incomplete"):
        LatencyTable.load(out)


def test_metadata_that_is_not_json_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "r.csv"
    meta = table_paths(out)[1]
    meta.write_bytes(bytes(range(128, 256)) * 4)
    argv = ["profile", *TINY_ARGS, "--out", str(out), "--isolated"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "not a latency table's metadata" in err and "--force" in err and "\n" not in err
    assert meta.read_bytes() == bytes(range(128, 256)) * 4 and not out.exists()
    meta.write_text("[1, 2]")
    assert main(argv) == 2
    assert "not a latency table's metadata" in capsys.readouterr().err


def test_cli_profile_names_its_progress_bars_for_what_they_do(tmp_path, capsys):
    assert main(["profile", *TINY_ARGS, "--out", str(tmp_path / "t.csv")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("hwslim profile: 1 runtime thread (the table's setting, default; --threads N to change), "
                          "1 PyTorch CPU thread\n")
    assert "building whole-config models (ONNX): 100%" in err and "4/4" in err
    # the end-to-end calibration's rounds run inside the entries' measurement (spread over it):
    # the entries' bar covers them
    assert "entries: 100%" in err
    assert "export:" not in err


def test_a_busy_machine_is_warned_about(monkeypatch):
    from hwslim.cli.profile_cmd import busy_note

    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1 * cores, 0.0, 0.0))
    assert busy_note() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5 * cores, 0.0, 0.0))
    assert f"the machine is busy (load average {1.5 * cores:.2f} on {cores} cores)" in busy_note()


def test_a_table_whose_holdout_it_does_not_predict_is_warned_about():
    from hwslim.cli.profile_cmd import calibration_note

    good = {"holdout_n": 16, "within_10pct": 1.0, "within_5pct": 0.94, "spearman": 0.99}
    assert calibration_note(good, 1, 2) is None
    assert calibration_note({"holdout_n": 0, "within_10pct": None}, 1, 2) is None
    # the 2-thread MobileNetV2 table measured on the 2-core development machine
    bad = {"holdout_n": 16, "within_10pct": 0.3125, "within_5pct": 0.0, "spearman": 0.85}
    note = calibration_note(bad, 2, 2)
    assert note.startswith("warning: the table predicts only 31% of its 16 held-out configs within +-10% "
                           "(Spearman 0.85)") and "2 runtime threads on 2 cores" in note and "\n" not in note
    assert "busy or changing" in calibration_note(bad, 1, 2)
