"""Export of networks with several outputs (a segmenter's dict, a detector's levels): one ONNX graph output
each, the structure in the metadata, parity checked per output; eval refuses them, verify times them."""
from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import hwslim
from hwslim.cli import main
from hwslim.core.errors import HwslimError
from hwslim.core.materialize import materialize
from hwslim.export.exporter import ExportJob
from hwslim.latency.profile import ProfileSettings, profile
from hwslim.runtimes.onnx_file import OUTPUT_NAME, max_relative_error, metadata_outputs, onnx_metadata

SIZE = 16


class TwoMaps(nn.Module):
    """A user's CNN with two heads at two resolutions, returned as a dict (or a tuple)."""

    def __init__(self, as_dict: bool = True) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.seg = nn.Conv2d(32, 5, 1)
        self.box = nn.Conv2d(32, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.body(x)
        seg, box = self.seg(y) * 100.0, self.box(y)  # scales 100x apart: each output is checked on its own
        return {"seg": seg, "box": box} if self.as_dict else (seg, box)


def ort_run(path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, (torch.from_numpy(o) for o in sess.run(None, {"input": x.numpy()}))))


def supernet(as_dict: bool = True):
    torch.manual_seed(0)
    net = hwslim.import_model(TwoMaps(as_dict), torch.randn(1, 3, SIZE, SIZE))
    for m in net.modules():  # non-trivial BN statistics, so folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("as_dict", [True, False])
def test_every_output_is_a_graph_output_with_parity_and_recorded(as_dict, tmp_path):
    net = supernet(as_dict)
    cfg = net.config_of({u: net.units[u].grid[0] for u in net.units})  # the narrowest config
    res = hwslim.export_model(net, cfg, tmp_path / "two.onnx")
    assert res.max_rel_error < 1e-4
    names = ["seg", "box"] if as_dict else ["output0", "output1"]
    assert [o.name for o in onnx.load(str(res.path)).graph.output] == names
    meta = onnx_metadata(res.path)
    keys = ["seg", "box"] if as_dict else [0, 1]
    assert metadata_outputs(meta) == list(zip(keys, names))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = materialize(net, cfg).eval()(x)
    want = list(want.values()) if as_dict else list(want)
    got = ort_run(res.path, x)
    assert [tuple(got[n].shape) for n in names] == [(1, 5, SIZE, SIZE), (1, 4, SIZE // 2, SIZE // 2)]
    assert all(max_relative_error(got[n], w) < 1e-4 for n, w in zip(names, want))


def test_parity_is_per_output_and_names_the_one_that_disagrees():
    ref = (torch.full((2, 3), 100.0), torch.full((2, 4), 1e-3))
    logged: list[str] = []
    job = ExportJob(nn.Identity(), torch.zeros(2, 3, 4, 4), ref, "test inputs", 1e-4, None, logged.append,
                    ("seg", "box"))
    assert job.parity("X", [ref[0], ref[1] * (1 + 1e-6)]) < 1e-5
    assert "per output seg 0.00e+00, box" in logged[-1]
    # 2e-3 absolute on the small map is nothing against the large one's scale, but 2x its own
    with pytest.raises(HwslimError, match=r"^X and PyTorch disagree \(box\): max relative error 2\.000e\+00"):
        job.parity("X", [ref[0], ref[1] + 2e-3])
    with pytest.raises(HwslimError, match="returned 1 output"):
        job.parity("X", ref[0])


def test_one_output_keeps_its_name_and_no_outputs_metadata(tmp_path):
    from hwslim.models import create_model

    net = create_model("resnet20", width_mult=0.5, input_size=8)
    res = hwslim.export_model(net, net.uniform_config(6), tmp_path / "r.onnx", check_images=2)
    assert [o.name for o in onnx.load(str(res.path)).graph.output] == [OUTPUT_NAME] == ["logits"]
    assert "outputs" not in onnx_metadata(res.path)


def test_openvino_and_torch_formats_pass_every_output_through(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed")
    net = supernet()
    cfg = net.uniform_config(6)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = materialize(net, cfg).eval()(x)
    ir = hwslim.export_model(net, cfg, tmp_path / "two.xml", format="openvino")
    assert ir.engine_error < 1e-4
    from hwslim.runtimes.openvino_ir import run_outputs

    got = run_outputs(ir.path, x.numpy(), 1)
    assert all(max_relative_error(torch.from_numpy(g), w) < 1e-4 for g, w in zip(got, want.values()))
    pt2 = hwslim.export_model(net, cfg, tmp_path / "pt" / "two.pt2", format="torch")
    assert pt2.engine_error < 1e-4
    run = torch.export.load(str(pt2.path)).module()
    with torch.no_grad():
        got = run(x[:1])
    assert list(got) == ["seg", "box"] and all(max_relative_error(got[k], want[k][:1]) < 1e-4 for k in got)


def test_a_format_that_reads_one_output_refuses_in_one_line(tmp_path, capsys):
    net = supernet()
    ckpt = hwslim.save(net, tmp_path / "ck.pt")
    net.uniform_config(6).save(tmp_path / "cfg.json")
    code = main(["export", "--checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.json"),
                 "--out", str(tmp_path / "m.pte"), "--format", "executorch"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--format executorch exports a network with one output; this one has 2 (seg, box)" in err
    assert not list(tmp_path.glob("m.*"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The two-output supernet saved, a quick ONNX Runtime table of it, and a narrow config exported
    with the CLI against that table."""
    d = tmp_path_factory.mktemp("multi")
    ckpt = hwslim.save(supernet(), d / "ck.pt")
    table = d / "t.csv"
    profile(ProfileSettings(model=str(ckpt), out=str(table), quick=True, calib_configs=3, holdout_configs=1))
    cfg = hwslim.load(ckpt).supernet.uniform_config(4)
    cfg.save(d / "cfg.json")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(d / "cfg.json"), "--out", str(d / "m.onnx"),
                 "--table", str(table), "--check-images", "4"]) == 0
    return ckpt, table, d / "cfg.json", d / "m.onnx"


def test_cli_export_and_verify_time_a_model_with_several_outputs(exported, capsys):
    ckpt, table, cfg, path = exported
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["seg", "box"]
    capsys.readouterr()
    assert main(["verify", str(path), "--table", str(table), "--json"]) in (0, 3)  # 3: a busy machine's verdict
    out = json.loads(capsys.readouterr().out)
    assert out["measured_ms"] > 0 and out["predicted_ms"] > 0


def test_eval_refuses_several_outputs_in_one_line(exported, capsys):
    ckpt, _, cfg, path = exported
    for args in (["eval", str(path)], ["eval", "--checkpoint", str(ckpt), "--config", str(cfg)]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "has 2 outputs: hwslim eval scores a classifier's top-1" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


# -- YOLOv8n, the raw head (an optional extra) --------------------------------------------------------
YOLO_SIZE = 128


@pytest.fixture(scope="module")
def v8n():
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (pip install hwslim[ultralytics])")
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml", verbose=False).model.eval()
    return hwslim.import_model(model, torch.randn(1, 3, YOLO_SIZE, YOLO_SIZE), outputs="raw").eval()


def test_yolov8n_raw_head_exports_three_levels_with_parity(v8n, tmp_path, capsys):
    net = v8n
    cfg = net.uniform_config(4)
    assert cfg.widths != net.full_config().widths
    res = hwslim.export_model(net, cfg, tmp_path / "v8n.onnx", check_images=2)
    assert res.max_rel_error < 1e-4
    names = [f"output{i}" for i in range(3)]
    assert [n for _, n in metadata_outputs(onnx_metadata(res.path))] == names
    x = torch.randn(1, 3, YOLO_SIZE, YOLO_SIZE)
    with torch.no_grad():
        want = materialize(net, cfg).eval()(x)
    got = ort_run(res.path, x)
    assert [tuple(got[n].shape) for n in names] == [(1, 144, 16, 16), (1, 144, 8, 8), (1, 144, 4, 4)]
    assert all(max_relative_error(got[n], w) < 1e-4 for n, w in zip(names, want))
    # the CLI, from a checkpoint of it
    ckpt = hwslim.save(net, tmp_path / "v8n.pt")
    cfg.save(tmp_path / "cfg.json")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.json"),
                 "--out", str(tmp_path / "cli.onnx"), "--check-images", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_rel_error"] < 1e-4
    assert [o.name for o in onnx.load(str(tmp_path / "cli.onnx")).graph.output] == names
