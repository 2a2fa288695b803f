"""hwslim eval: held-out top-1 of searched configs (PyTorch, BN recalibrated as export does) and of
exported ONNX models (ONNX Runtime); both agree on the same config."""
from __future__ import annotations

import json

import pytest
import torch

from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.cli import main
from hwslim.importing.data import search_split, synthetic_data_info, validation_split
from hwslim.core.accuracy import accuracy
from hwslim.export.exporter import ExportOptions, export_model
from hwslim.models import create_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = create_model("resnet20", input_size=8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    ckpt = save_checkpoint(tmp / "ck.pt", net,
                           data=synthetic_data_info(num_train=300, num_search=40, input_size=8, num_val=50))
    cfgs = [net.uniform_config(6).with_meta(search_acc=0.25).save(tmp / "u6.json"),
            net.uniform_config(12).save(tmp / "u12.json")]
    onnx = export_model(ckpt, cfgs[0], tmp / "u6.onnx", ExportOptions(check_images=4)).path
    return tmp, ckpt, cfgs, onnx


def test_eval_configs_and_the_exported_model_agree(setup, capsys):
    tmp, ckpt, cfgs, onnx = setup
    assert main(["eval", "--checkpoint", str(ckpt), "--config", *map(str, cfgs), str(onnx), "--json",
                 "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    u6, u12, exported = doc["results"]
    assert [r["kind"] for r in doc["results"]] == ["config", "config", "onnx"]
    assert doc["evaluated_on"][str(ckpt)] == {"split": "val", "images": 50, "calib_images": 40,
                                              "bn": "recalibrated per config on 40 images of the checkpoint's "
                                                    "search split"}
    # by hand: BN recalibrated on the search split (batches of 128, as export), scored on the validation split
    loaded = load_checkpoint(ckpt)
    x, y = validation_split(loaded)
    calib, _ = search_split(loaded, max_images=512)
    want = accuracy(loaded.model, loaded.model.uniform_config(6), x, y, calib_images=calib, calib_batch_size=128)
    assert u6["top1"] == round(100 * want, 2) and u6["search_acc"] == 25.0
    assert exported["top1"] == u6["top1"]  # ONNX Runtime on the exported file: the same predictions
    assert (exported["params"], exported["macs"]) == (u6["params"], u6["macs"])
    assert u12["params"] > u6["params"] and 0 <= u12["top1"] <= 100


def test_eval_onnx_alone_finds_the_checkpoint_in_its_metadata_and_prints_a_table(setup, capsys):
    tmp, ckpt, cfgs, onnx = setup
    assert main(["eval", str(onnx), "--no-progress", "--max-images", "20"]) == 0
    cap = capsys.readouterr()
    assert f"{onnx}: top-1 on 20 images of the val split" in cap.out
    assert "top1 %" in cap.out and str(onnx) in cap.out.splitlines()[-1]
    assert "1 PyTorch CPU thread (default" in cap.err


@pytest.mark.parametrize("argv, problem", [
    ([], "give --checkpoint"),
    (["--config", "x.json"], "--config needs --checkpoint"),
    (["missing.onnx"], "not found"),
])
def test_eval_user_errors_are_one_line(argv, problem, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert problem in err[-1] and len([e for e in err if "error" in e]) == 1
