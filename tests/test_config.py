import json

import pytest
import torch

from hwslim.cli import main
from hwslim.core.config import SCHEMA_VERSION, ChannelConfig
from hwslim.core.errors import ConfigError
from hwslim.models import create_model


@pytest.fixture(scope="module")
def net():
    with torch.device("meta"):
        return create_model("mobilenet_v2", width_mult=1.0)


def test_json_round_trip_sorted_and_versioned(net, tmp_path):
    cfg = net.uniform_config(7).with_meta(latency_ms=3.5)
    text = cfg.to_json()
    data = json.loads(text)
    assert data["schema_version"] == SCHEMA_VERSION
    assert list(data) == sorted(data) and list(data["widths"]) == sorted(data["widths"])
    back = ChannelConfig.from_json(text)
    assert back == cfg and back.meta["latency_ms"] == 3.5
    path = cfg.save(tmp_path / "c.json")
    assert ChannelConfig.load(path) == cfg
    net.validate(back)


def test_save_refuses_to_overwrite(net, tmp_path):
    p = net.full_config().save(tmp_path / "c.json")
    with pytest.raises(Exception, match="--force"):
        net.min_config().save(p)
    net.min_config().save(p, force=True)
    assert ChannelConfig.load(p) == net.min_config()


def test_validation_names_the_problem(net):
    full = net.full_config()
    with pytest.raises(ConfigError, match="unknown unit 'bogus'"):
        net.validate(full.replace(bogus=8))
    widths = dict(full.widths)
    del widths["head"]
    with pytest.raises(ConfigError, match="lacks unit 'head'"):
        net.validate(full.with_widths(widths))
    with pytest.raises(ConfigError, match=r"unit 'stem': width 20 is not on its grid \[8, 16, 24, 32\]"):
        net.validate(full.replace(stem=20))
    with pytest.raises(ConfigError, match="for model 'resnet50'"):
        net.validate(ChannelConfig("resnet50", 1.0, 224, full.widths))
    with pytest.raises(ConfigError, match="width multiplier 1.5"):
        net.validate(ChannelConfig("mobilenet_v2", 1.5, 224, full.widths))


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 99, "model": "x"}', "schema_version 99"),
    ('{"schema_version": 1, "model": "x"}', "lacks width_mult"),
    ('[1, 2]', "not a channel config"),
])
def test_bad_files_are_user_errors(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        ChannelConfig.load(p)


def test_two_configured_models_in_one_process():
    a, b = create_model("resnet20"), create_model("resnet20")
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    b.set_config(b.uniform_config(6))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert not torch.allclose(ya, yb)
        with a.using(a.uniform_config(6)):
            assert torch.allclose(a(x), yb)
        assert torch.equal(a(x), ya)
    assert a.config == a.full_config()


def test_cli_rejects_invalid_config_with_one_line(net, tmp_path, capsys):
    p = tmp_path / "c.json"
    net.full_config().replace(stem=20).save(p)
    assert main(["cost", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not on its grid" in err[0]
    (tmp_path / "m.json").write_text("{")
    assert main(["cost", "--config", str(tmp_path / "m.json")]) == 2
    assert main(["cost", "--config", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,match", [
    ("width_mult", "abc", "'width_mult' must be a positive number"),
    ("width_mult", -1, "'width_mult' must be a positive number"),
    ("input_size", -8, "'input_size' must be a positive whole number"),
    ("model", 3, "'model' must be a model name"),
])
def test_wrong_types_are_user_errors(net, field, value, match):
    data = net.full_config().to_dict()
    data[field] = value
    with pytest.raises(ConfigError, match=match):
        ChannelConfig.from_dict(data)


def test_zero_width_is_a_user_error(net):
    data = net.full_config().to_dict()
    data["widths"]["stem"] = 0
    with pytest.raises(ConfigError, match="positive integer"):
        ChannelConfig.from_dict(data)
