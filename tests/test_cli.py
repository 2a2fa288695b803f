import json
import subprocess
import sys

import pytest

from hwslim.cli import main


@pytest.mark.parametrize("model,params,macs", [
    ("mobilenet_v2", 3_504_872, 300_774_272),
    ("resnet50", 25_557_032, 4_089_184_256),
    ("mnasnet1_0", 4_383_312, 314_415_872),
])
def test_cost_json(model, params, macs, capsys):
    assert main(["cost", "--model", model, "--width-mult", "1.0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == params and out["macs"] == macs and out["peak_activation_bytes"] > 0


def test_console_script_user_error_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "hwslim", "cost", "--model", "nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_models_lists_the_zoo(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"mobilenet_v1", "mobilenet_v2", "mnasnet", "resnet50", "resnet20", "resnet56",
            "mobilenet_v2_cifar"} <= set(rows)
    assert rows["mobilenet_v2"]["width_mult"] == 1.5


@pytest.mark.parametrize("argv", [
    ["cost", "--model", "resnet20", "--batch", "-1"],
    ["cost", "--model", "resnet20", "--batch", "0"],
    ["cost", "--model", "resnet20", "--input-size", "0"],
    ["search", "--checkpoint", "x.pt", "--latency-ms", "-1"],
    ["search", "--checkpoint", "x.pt", "--params-m", "1", "--max-images", "-5"],
    ["cost", "--model", "resnet20", "--divisor-typo", "7"],
])
def test_bad_numbers_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "error" in err[0]


def test_cost_uses_the_configs_input_size(tmp_path, capsys):
    from hwslim.core.config import ChannelConfig
    from hwslim.models import create_model

    net = create_model("resnet20")
    cfg = ChannelConfig("resnet20", 1.0, 16, net.full_config().widths)
    cfg.save(tmp_path / "c.json")
    assert main(["cost", "--config", str(tmp_path / "c.json"), "--json"]) == 0
    at16 = json.loads(capsys.readouterr().out)
    assert main(["cost", "--model", "resnet20", "--input-size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == at16


@pytest.mark.parametrize("argv", [["models", "--json"], ["models"], ["cost", "--model", "resnet20", "--json"]])
def test_a_closed_stdout_ends_quietly(argv):
    """`hwslim models --json | head -1`: the reader leaves; no traceback, status 141 (SIGPIPE's)."""
    import os

    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: every write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "hwslim", *argv], stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.stderr == ""
    assert p.returncode == 141


# -- flags mean one thing everywhere (first contact, round 2) --------------------------------------
def _refused(argv, capsys) -> str:
    """The one line of a command line refused as a usage error (exit 2)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits through SystemExit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,new", [
    (["search", "--checkpoint", "c.pt", "--params-m", "1", "--keep", "3"], "--keep-candidates"),  # a count, not a REGEX
    (["verify", "m.onnx", "--force"], "--force-table"),  # --force replaces outputs everywhere else
    (["cost", "--model", "resnet20", "--force"], "--force-table"),
])
def test_old_spellings_that_changed_meaning_are_refused_naming_the_new_flag(argv, new, capsys):
    err = _refused(argv, capsys)
    old = argv[[i for i, a in enumerate(argv) if a in ("--keep", "--force")][0]]
    assert f"{old} is now {new}: " in err


def test_search_splits_force_from_force_table_and_keep_from_keep_candidates(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--force-table" in text and "--keep-candidates K" in text
    assert "--force start over even if --out holds a search --force-table use a latency table" in text
    assert "--keep K" not in text


@pytest.mark.parametrize("command", ["cost", "profile"])
def test_batch_has_help_in_cost_and_profile(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch BATCH inference batch" in text


def test_profile_out_help_names_where_it_really_writes(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: ~/.cache/hwslim/latency_tables/<device>-<device name>/<model and settings>.csv" in text
    assert "default: latency_tables/" not in text


def test_verify_help_example_uses_no_committed_amd_table(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    assert "cpu-amd" not in text and "hwslim verify r20_0.5ms.onnx\n" in text


@pytest.mark.parametrize("argv,hint", [
    (["search", "--checkpoint", "c.pt", "--lantency-ms", "1"], "unrecognized arguments: --lantency-ms; did you mean "
                                                               "'--latency-ms'?"),
    (["search", "--chekpoint", "c.pt", "--params-m", "1"], "did you mean '--checkpoint'?"),  # before "required"
    (["cost", "--model", "resnet20", "--bach", "2"], "did you mean '--batch'?"),
])
def test_a_mistyped_flag_gets_a_did_you_mean(argv, hint, capsys):
    assert hint in _refused(argv, capsys)


@pytest.mark.parametrize("name,hint", [("resnet2", "resnet20"), ("mobilenetv2", "mobilenet_v2")])
def test_a_mistyped_model_name_gets_a_did_you_mean(name, hint, capsys):
    assert main(["cost", "--model", name]) == 2
    assert f"unknown model {name!r}; did you mean {hint!r}? available: " in capsys.readouterr().err


def test_cost_units_lists_the_channel_units(capsys):
    assert main(["cost", "--model", "resnet20", "--units"]) == 0
    out = capsys.readouterr().out
    assert "12 channel units" in out and "l3b2/mid" in out and "8 16 24 32 40 48 56 64" in out
    assert main(["cost", "--model", "resnet20", "--units", "--json"]) == 0
    units = json.loads(capsys.readouterr().out)["units"]
    assert len(units) == 12 and {"unit", "width", "max", "grid"} <= set(units[0])
