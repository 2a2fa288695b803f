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
