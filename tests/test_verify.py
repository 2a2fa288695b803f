"""hwslim.verify: an exported model measured on its table's backend, against its budget."""
from __future__ import annotations

import json

import pytest

from hwslim.checkpoint import save_checkpoint
from hwslim.cli import main
from hwslim.errors import ConfigError
from hwslim.export import ExportOptions, export_model, export_onnx
from hwslim.latency import LatencyTable
from hwslim.materialize import materialize
from hwslim.models import create_model
from hwslim.profile import ProfileSettings, profile
from hwslim.verify import VerifyResult, budget_from_config, verify_model


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


def test_cli_exit_status(table_path, exported, tmp_path, capsys):
    _, _, path = exported
    assert main(["verify", str(path), "--table", str(table_path)]) == 0
    out = capsys.readouterr().out
    assert "predicted_ms" in out and "measured_ms" in out and "OK" in out
    assert main(["verify", str(path), "--table", str(table_path), "--budget-ms", "1e-6", "--json"]) == 1
    row = json.loads(capsys.readouterr().out)
    assert row["within_budget"] is False and row["budget_ms"] == 1e-6
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
    assert main(args + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verify"]["within_budget"] is True and printed["verify"]["measured_ms"] > 0
    assert main(args[:-2] + ["--force"]) == 2  # --verify without --table, and the config names none
    assert "--table" in capsys.readouterr().err
    # the table the search recorded in the config is the default
    named = cfg.with_meta(table=str(table_path)).save(tmp_path / "named.json")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(named), "--out", str(tmp_path / "n.onnx"),
                 "--check-images", "2", "--verify", "--json"]) == 0
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
                 "--check-images", "2", "--verify", "--table", str(table_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["verify"]["measured_ms"] > 0
