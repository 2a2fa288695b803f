"""Ultralytics' YOLO models (an optional extra, never a dependency): built from their yaml with random
weights (no download), imported with the raw head (``--outputs raw``) at 128 px."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install hwslim[ultralytics])")

from hwslim.core.materialize import materialize  # noqa: E402
from hwslim.importing.fx_trace import ImportRefused, fixed_units, fixed_units_note, import_model  # noqa: E402
from hwslim.importing.raw_outputs import raw_outputs  # noqa: E402
from hwslim.runtimes.onnx_file import export_onnx  # noqa: E402

SIZE = 128


def yolo(name: str) -> nn.Module:
    from ultralytics import YOLO

    torch.manual_seed(0)
    return YOLO(f"{name}.yaml", verbose=False).model.eval()


def reference(module: nn.Module) -> tuple[int, int]:
    """(MACs, parameters of the modules the forward runs) of ``module`` at SIZE px: FlopCounterMode // 2."""
    from torch.utils.flop_counter import FlopCounterMode

    called: list[nn.Module] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: called.append(m))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(torch.randn(1, 3, SIZE, SIZE))
    finally:
        handle.remove()
    params = {id(p): p.numel() for m in called for p in m.parameters(recurse=False)}
    return counter.get_total_flops() // 2, sum(params.values())


def ort_outputs(path, x: torch.Tensor) -> list[torch.Tensor]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def v8n():
    model = yolo("yolov8n")
    return model, import_model(model, torch.randn(1, 3, SIZE, SIZE), outputs="raw")


def test_yolov8n_with_the_raw_head_imports_with_equal_costs_and_parity(v8n, tmp_path):
    model, net = v8n
    raw = raw_outputs(model).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = raw(x), net(x)
    # the three per-level maps: 64 box + 80 class channels at strides 8, 16, 32
    assert [tuple(t.shape) for t in want] == [(2, 144, 16, 16), (2, 144, 8, 8), (2, 144, 4, 4)]
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))  # full width: difference 0
    assert net.graph.meta["outputs"] == "raw" and not fixed_units(net)  # no --fix-unsupported needed
    macs, params = reference(raw)
    costs = net.layer_specs()
    assert sum(s.op.params(s) for s in costs) == params == 3_157_184  # the DFL conv (16) is decoding: not run
    assert sum(s.op.macs(s) for s in costs) == macs
    cfg = net.random_config(random.Random(0))
    assert cfg.widths != net.full_config().widths
    x1 = x[:1]
    with torch.no_grad(), net.using(cfg):
        want = net(x1)
    path = export_onnx(materialize(net, cfg).eval(), tmp_path / "v8n.onnx", input_size=SIZE)
    got = ort_outputs(path, x1)
    assert len(got) == 3 and max(rel(g, w) for g, w in zip(got, want)) < 1e-4


def test_c2f_units_slim_in_pairs(v8n):
    """C2f's chunk: its cv1 makes its output in two equal parts, both the width of one unit."""
    _, net = v8n
    halves = [n for n in net.nodes if getattr(n.op, "parts", 1) == 2]
    assert [n.name for n in halves] == [f"model/{i}/cv1/conv" for i in (2, 4, 6, 8, 12, 15, 18, 21)]
    cfg = net.config_of({**net.full_config().widths, "model/6/cv1/conv": 24})
    spec = next(s for s in net.layer_specs(cfg) if s.name == "model/6/cv1/conv")
    assert spec.cout == 2 * 24


def test_classifier_imports_with_its_logits():
    model = yolo("yolov8n-cls")
    net = import_model(model, torch.randn(1, 3, SIZE, SIZE), outputs="raw")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        probs, logits = model(x)  # Ultralytics' eval output: (softmax, logits)
        got = net(x)
    assert torch.equal(got, logits) and net.units
    assert sum(s.op.params(s) for s in net.layer_specs()) == reference(raw_outputs(model))[1] == 2_719_288


def test_c2psa_attention_is_imported_fixed_and_listed():
    """A known fixed-width operator fixes the units it reads and writes by itself: no --fix-unsupported."""
    model = yolo("yolo11n")
    x = torch.randn(1, 3, SIZE, SIZE)
    net = import_model(model, x, outputs="raw")
    assert [n.name for n in net.nodes if n.op.kind == "attention"] == ["model/10/m/0/attn"]
    assert fixed_units(net) == {"model/10/cv1/conv": {"width": 128, "by": "model/10/m/0/attn",
                                                      "what": "an attention block",
                                                      "module": "module 'model.10.m.0.attn' (Attention)"}}
    assert "model/10/cv1/conv" not in net.units and len(net.units) == 59
    assert fixed_units_note(net) == ("1 unit(s) fixed by the fixed-width operator they reach, 59 slim: "
                                     "model/10/cv1/conv (128: an attention block, module 'model.10.m.0.attn' "
                                     "(Attention))")
    assert fixed_units(import_model(model, x, outputs="raw", fix_unsupported=True)) == fixed_units(net)
    with torch.no_grad():
        assert all(torch.equal(g, w) for g, w in zip(net(x), raw_outputs(model)(x)))
    macs, params = reference(raw_outputs(model))
    specs = net.layer_specs()
    assert (sum(s.op.macs(s) for s in specs), sum(s.op.params(s) for s in specs)) == (macs, params)
    attn = next(s for s in specs if s.op.kind == "attention")
    assert attn.op.signature(attn) is not None  # measured in the latency tables


def test_segmenter_imports_with_its_mask_prototypes():
    """YOLOv8n-seg: three level maps (box, class and 32 mask coefficients) and the prototypes, whose
    ConvTranspose2d upsampling slims with its unit."""
    model = yolo("yolov8n-seg")
    net = import_model(model, torch.randn(1, 3, SIZE, SIZE), outputs="raw")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = raw_outputs(model)(x), net(x)
    assert [tuple(t.shape[1:]) for t in want] == [(176, 16, 16), (176, 8, 8), (176, 4, 4), (32, 32, 32)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    deconv = next(n for n in net.nodes if n.op.kind == "deconv")
    assert deconv.name == "model/22/proto/upsample" and deconv.out in net.units
    macs, params = reference(raw_outputs(model))
    specs = net.layer_specs()
    assert (sum(s.op.macs(s) for s in specs), sum(s.op.params(s) for s in specs)) == (macs, params)


def test_cost_units_lists_the_attentions_unit_as_fixed(tmp_path, monkeypatch, capsys):
    import json

    from hwslim.cli import main

    (tmp_path / "y11_user.py").write_text("def build():\n    from ultralytics import YOLO\n\n"
                                          "    return YOLO('yolo11n.yaml', verbose=False).model\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["cost", "--model", "y11_user:build", "--outputs", "raw", "--input-size", str(SIZE), "--units"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["fixed_units"] == [{"unit": "model/10/cv1/conv", "width": 128, "fixed":
                                               "an attention block, module 'model.10.m.0.attn' (Attention)"}]
    assert "model/10/cv1/conv (128: an attention block, module 'model.10.m.0.attn' (Attention))" in err
    assert main(args) == 0
    assert "1 fixed unit(s) (they keep their width):" in capsys.readouterr().out


def test_refusals_are_one_line_naming_the_module():
    import torchvision

    with pytest.raises(ImportRefused, match=r"^--outputs raw: ResNet has no detection head hwslim knows how to cut"):
        import_model(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), outputs="raw")


def test_raw_outputs_leaves_the_users_model_as_it_was():
    model = yolo("yolov8n")
    raw_outputs(model)
    with torch.no_grad():
        y = model(torch.randn(1, 3, SIZE, SIZE))
    assert isinstance(y, tuple) and y[0].shape == (1, 84, 336)  # decoded boxes and scores, as before


def test_cli_imports_with_outputs_raw_and_records_it(tmp_path, monkeypatch, capsys):
    import json

    from hwslim.cli import main

    (tmp_path / "yolo_user.py").write_text("def build():\n    from ultralytics import YOLO\n\n"
                                           "    return YOLO('yolov8n.yaml', verbose=False).model\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["cost", "--model", "yolo_user:build", "--outputs", "raw", "--input-size", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 3_157_184
    assert main(["models", "--graph", "yolo_user:build", "--outputs", "raw", "--input-size", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["outputs"] == "raw"  # a checkpoint's graph records it
    assert main(["cost", "--model", "resnet18", "--outputs", "raw"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("--outputs raw applies to a model imported from PyTorch (--model torchvision:NAME, "
                         "timm:NAME or package.module:callable), not 'resnet18'")


def test_train_config_checks_and_records_outputs():
    from hwslim.training.train import TrainConfig, TrainError

    run = {"data": "synthetic:100", "epochs": 1, "out": "unused"}
    with pytest.raises(TrainError, match=r"^--outputs raw applies to a model imported from PyTorch"):
        TrainConfig(model="resnet18", outputs="raw", **run).validate()
    with pytest.raises(TrainError, match=r"^--outputs must be 'full' or 'raw', got 'decoded'"):
        TrainConfig(model="yolo_user:build", outputs="decoded", **run).validate()
    assert TrainConfig(model="yolo_user:build", outputs="raw", **run).recipe()["outputs"] == "raw"  # kept in the checkpoint
