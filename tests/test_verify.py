"""hwslim.latency.verify: an exported model measured on its table's backend, against its budget."""
from __future__ import annotations

import json

import pytest

from hwslim.importing.checkpoint import save_checkpoint
from hwslim.cli import main
from hwslim.core.errors import ConfigError
from hwslim.export.exporter import ExportOptions, export_model
from hwslim.runtimes.onnx_file import export_onnx
from hwslim.latency.table import LatencyTable
from hwslim.core.materialize import materialize
from hwslim.models import create_model
from hwslim.latency.profile import ProfileSettings, profile
from hwslim.latency.verify import VerifyResult, budget_from_config, verify_model


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    """A real (quick-protocol) ONNX Runtime table of a tiny resnet20 on this CPU."""
    out = tmp_path_factory.mktemp("table") / "r20.csv"
    profile(ProfileSettings(model="resnet20", width_mult=0.5, input_size=8, out=str(out), quick=True,
                            calib_configs=3, holdout_configs=2))
    return out


@pytest.fixture(scope="module")
def exported(table_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    net = create_model("resnet20", width_mult=0.5, input_size=8)
    ckpt = save_checkpoint(d / "ck.pt", net)
    cfg = net.uniform_config(6).with_meta(budget={"kind": "latency_ms", "value": 1000.0})
    res = export_model(ckpt, cfg, d / "m.onnx", ExportOptions(table=table_path, check_images=2))
    return net, cfg, res.path


def test_verify_predicts_from_metadata_and_measures(table_path, exported):
    net, cfg, path = exported
    r = verify_model(path, table_path)
    table = LatencyTable.load(table_path)
    assert r.predicted_ms == pytest.approx(table.predict_ms(net.layer_specs(cfg, batch=1, input_size=8)))
    assert r.config == cfg and r.batch == 1 and r.backend == "ort"
    assert r.measured_ms > 0 and r.n >= 5 and r.p90_ms >= r.measured_ms
    assert r.budget_ms == 1000.0 and r.ok  # from the config the search wrote
    tight = verify_model(path, table_path, budget_ms=r.measured_ms / 10)
    assert tight.budget_ms == pytest.approx(r.measured_ms / 10) and not tight.ok
    assert json.loads(json.dumps(tight.as_dict()))["within_budget"] is False


def test_budget_holds_within_tolerance(table_path, exported):
    _, cfg, path = exported
    base = dict(model=path, table=table_path, config=cfg, backend="ort", batch=1, predicted_ms=1.0, iqr_ms=0.0,
                p90_ms=1.0, n=10, noisy=False)
    assert VerifyResult(measured_ms=1.02, budget_ms=1.0, tolerance=0.03, **base).ok
    assert not VerifyResult(measured_ms=1.04, budget_ms=1.0, tolerance=0.03, **base).ok
    assert VerifyResult(measured_ms=5.0, budget_ms=None, tolerance=0.03, **base).ok  # nothing to hold
    assert VerifyResult(measured_ms=0.8, budget_ms=1.0, tolerance=0.0, **base).prediction_error == pytest.approx(0.25)
    assert budget_from_config(cfg) == 1000.0
    assert budget_from_config(cfg.with_meta(budget={"kind": "params_m", "value": 1})) is None


def test_exit_status_a_confident_over_wins_then_unreliable(table_path, exported):
    from hwslim.latency.conditions import Conditions, compare
    from hwslim.latency.verify import exit_status

    _, cfg, path = exported
    steady = compare(Conditions(probe_ms=1.0), Conditions(probe_ms=1.0))
    busy = compare(Conditions(probe_ms=1.0), Conditions(probe_ms=2.0))
    base = dict(model=path, table=table_path, config=cfg, backend="ort", batch=1, predicted_ms=1.0, iqr_ms=0.0,
                p90_ms=1.0, n=10, noisy=False, tolerance=0.03)
    ok = VerifyResult(measured_ms=0.9, budget_ms=1.0, conditions=steady, **base)
    over = VerifyResult(measured_ms=1.5, budget_ms=1.0, conditions=steady, **base)
    unsure = VerifyResult(measured_ms=0.9, budget_ms=1.0, conditions=busy, **base)
    nobudget = VerifyResult(measured_ms=0.9, budget_ms=None, conditions=busy, **base)
    assert [r.verdict for r in (ok, over, unsure, nobudget)] == ["OK", "OVER", "UNRELIABLE", "no budget"]
    assert exit_status([ok]) == 0 and exit_status([ok, unsure]) == 3 and exit_status([unsure, over]) == 1
    assert exit_status([nobudget]) == 0  # no verdict to doubt: it only reports (the line still says why)


def test_cli_exit_status(table_path, exported, tmp_path, capsys):
    """0 within budget, 1 over it; 3 where this shared machine's conditions moved since the table."""
    _, _, path = exported
    code = main(["verify", str(path), "--table", str(table_path)])
    cap = capsys.readouterr()
    assert "predicted_ms" in cap.out and "measured_ms" in cap.out
    assert (code, "OK" in cap.out, "UNRELIABLE" in cap.out) in ((0, True, False), (3, False, True)), cap
    assert ("verdict unreliable" in cap.err) == (code == 3)
    code = main(["verify", str(path), "--table", str(table_path), "--budget-ms", "1e-6", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["within_budget"] is False and row["budget_ms"] == 1e-6
    assert (code, row["verdict"]) in ((1, "OVER"), (3, "UNRELIABLE"))
    assert main(["verify", str(tmp_path / "none.onnx"), "--table", str(table_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_model_without_hwslim_metadata_is_refused(table_path, tmp_path):
    net = create_model("resnet20", width_mult=0.5, input_size=8).eval()
    plain = export_onnx(materialize(net, net.full_config(), fold_bn=True), tmp_path / "bare.onnx")
    with pytest.raises(ConfigError, match="no hwslim config"):
        verify_model(plain, table_path)


def test_export_verify_flag(table_path, exported, tmp_path, capsys):
    net, cfg, _ = exported
    ckpt = save_checkpoint(tmp_path / "ck.pt", net)
    cfg_path = cfg.save(tmp_path / "cfg.json")
    args = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(tmp_path / "v.onnx"),
            "--check-images", "2", "--verify", "--table", str(table_path)]
    code = main(args + ["--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["verify"]["within_budget"] is True and printed["verify"]["measured_ms"] > 0
    assert (code, printed["verify"]["verdict"]) in ((0, "OK"), (3, "UNRELIABLE"))
    assert main(args[:-2] + ["--force"]) == 2  # --verify without --table, and the config names none
    assert "--table" in capsys.readouterr().err
    # the table the search recorded in the config is the default
    named = cfg.with_meta(table=str(table_path)).save(tmp_path / "named.json")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(named), "--out", str(tmp_path / "n.onnx"),
                 "--check-images", "2", "--verify", "--json"]) in (0, 3)
    assert json.loads(capsys.readouterr().out)["verify"]["table"] == str(table_path)


def test_progress_goes_to_log_or_stderr_not_stdout(table_path, exported, capsys):
    _, _, path = exported
    lines = []
    verify_model(path, table_path, progress=True, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("measuring")
    verify_model(path, table_path, progress=True)
    cap = capsys.readouterr()
    assert cap.out == "" and "measuring" in cap.err


def test_verify_refuses_a_non_positive_budget(table_path, exported, capsys):
    _, _, path = exported
    with pytest.raises(ConfigError, match="--budget-ms"):
        verify_model(path, table_path, budget_ms=-1.0)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(path), "--table", str(table_path), "--budget-ms", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_export_verify_json_stdout_is_one_json_object(table_path, exported, tmp_path, capsys):
    net, cfg, _ = exported
    ckpt = save_checkpoint(tmp_path / "ck.pt", net)
    cfg_path = cfg.save(tmp_path / "cfg.json")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(tmp_path / "j.onnx"),
                 "--check-images", "2", "--verify", "--table", str(table_path), "--json"]) in (0, 3)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["verify"]["measured_ms"] > 0


def _edited_table(src, dst_dir, edit):
    """A copy of the table at ``src`` with its recorded conditions edited (data, not a mock)."""
    import shutil

    from hwslim.latency.table import table_paths

    dst_dir.mkdir()
    for p in table_paths(src):
        if p.exists():
            shutil.copy(p, dst_dir / p.name)
    meta_path = table_paths(dst_dir / src.name)[1]
    meta = json.loads(meta_path.read_text())
    # a table without a reference level (format 2), whose verdicts the probe decides; tables with one
    # are corrected to their level (tests/test_reference_timing.py)
    meta.pop("reference")
    meta["conditions"]["changed"] = None
    edit(meta["conditions"]["start"])
    meta["conditions"]["end"] = meta["conditions"]["start"]
    meta_path.write_text(json.dumps(meta))
    return dst_dir / src.name


def test_a_busier_machine_than_the_tables_gives_an_unreliable_verdict_and_exit_3(table_path, exported, tmp_path,
                                                                                    capsys):
    """The table records a probe 2x faster than this machine's: as if it were measured on a quiet machine."""
    net, cfg, path = exported

    def faster(start):  # recorded only the probe: this shared machine's other threads do not enter the test
        start.update(probe_ms=start["probe_ms"] / 2, others_running=None, load_1min=None)

    table = _edited_table(table_path, tmp_path / "t", faster)
    r = verify_model(path, table)
    assert r.ok and not r.reliable and r.verdict == "UNRELIABLE"  # within the budget as measured, but not trusted
    assert 1.5 < r.conditions.probe_ratio < 2.7  # 2x, give or take this machine's noise
    probe = "the speed probe before measuring ran "
    assert r.conditions.line().startswith(probe) and " slower than when the table was measured (" in r.conditions.line()
    assert r.conditions.line().endswith(" ms): verdict unreliable")
    # beside the verdict: the measured p50 and p90 and their ratio to the budget, in one line naming the probe
    assert r.message == (f"m.onnx: UNRELIABLE: measured p50 {r.measured_ms:.3f} ms, p90 {r.p90_ms:.3f} ms, "
                         f"{r.measured_ms / r.budget_ms:.2f}x its {r.budget_ms:g} ms budget; {r.conditions.line()}")
    d = r.as_dict()
    assert d["verdict"] == "UNRELIABLE" and d["reliable"] is False and d["conditions"]["probe_ratio"] > 1.5
    assert d["p50_ms"] == r.measured_ms and d["p90_ms"] == r.p90_ms and d["budget_ratio"] == r.measured_ms / r.budget_ms
    assert d["message"] == r.message and d["conditions"]["decided_by"] == r.conditions.summary
    assert main(["verify", str(path), "--table", str(table)]) == 3
    cap = capsys.readouterr()
    assert "UNRELIABLE" in cap.out and "p90_ms" in cap.out and "x_budget" in cap.out
    lines = [x for x in cap.err.splitlines() if "verdict unreliable" in x]
    assert len(lines) == 1 and lines[0].startswith("m.onnx: UNRELIABLE: measured p50 ") and probe in lines[0]
    # several models: one line per verdict, each naming the one probe that decided it
    assert main(["verify", str(path), str(path), "--table", str(table), "--json"]) == 3
    docs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["verdict"] for d in docs] == ["UNRELIABLE"] * 2
    assert all(d["message"].count("verdict unreliable") == 1 and d["p90_ms"] >= d["p50_ms"] for d in docs)
    ckpt = save_checkpoint(tmp_path / "ck.pt", net)
    cfg_path = cfg.save(tmp_path / "cfg.json")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(tmp_path / "v.onnx"),
                 "--check-images", "2", "--verify", "--table", str(table)]) == 3
    err = capsys.readouterr().err
    assert "v.onnx: UNRELIABLE: measured p50 " in err and "the speed probe before measuring ran " in err

    def slower(start):
        start.update(probe_ms=start["probe_ms"] * 2, others_running=None, load_1min=None)

    r = verify_model(path, _edited_table(table_path, tmp_path / "t2", slower))
    assert r.verdict == "UNRELIABLE" and r.conditions.line().startswith("the speed probe before measuring ran ")
    assert " faster than when the table was measured (" in r.conditions.line()  # measured faster: says faster


def test_conditions_that_match_the_tables_give_a_confident_verdict(table_path, exported, tmp_path):
    from hwslim.latency.conditions import Conditions

    _, _, path = exported
    table = _edited_table(table_path, tmp_path / "t", lambda start: None)
    same = Conditions.from_dict(json.loads(table.with_suffix(".json").read_text())["conditions"]["start"])
    r = verify_model(path, table, conditions=same)
    assert r.reliable and r.verdict == "OK" and r.conditions.probe_ratio == 1.0
    over = verify_model(path, table, conditions=same, budget_ms=r.measured_ms / 10)
    assert over.verdict == "OVER" and over.reliable


def test_verify_finds_the_table_itself_as_export_verify_does(table_path, exported, tmp_path, capsys):
    """No --table: the one the model's metadata records (hwslim export writes it), said on stderr."""
    from hwslim.latency.verify import recorded_table

    _, cfg, path = exported
    assert recorded_table(path) == table_path.resolve()
    assert main(["verify", str(path), "--json"]) in (0, 3)
    cap = capsys.readouterr()
    assert json.loads(cap.out)["table"] == str(table_path.resolve())
    assert f"{path}: measured against {table_path.resolve()}" in cap.err


def test_a_table_with_a_reference_is_verified_at_its_level(table_path, exported):
    """A table measured by this hwslim records its reference level; verify times the model with the
    reference beside it and takes the verdict on the median brought to that level."""
    from hwslim.latency.table import LatencyTable

    _, _, path = exported
    r = verify_model(path, table_path)
    level = LatencyTable.load(table_path).reference_level_ms
    assert level > 0 and r.level_table_ms == level and r.level_now_ms > 0
    assert r.conditions.level_ratio == pytest.approx(r.level_now_ms / level, rel=1e-9)
    # each turn is scaled by the reference beside it: about measured x level / level now
    assert r.at_level_ms == pytest.approx(r.measured_ms * level / r.level_now_ms, rel=0.25)
    assert r.judged_ms == r.at_level_ms and r.budget_ratio == r.at_level_ms / r.budget_ms
    d = r.as_dict()
    assert d["at_table_level_ms"] == r.at_level_ms and d["reference_table_ms"] == level
    # the speed probe is no reason: only the references' own change or disagreement is
    assert r.verdict == "OK" or "timed beside the model" in r.message
