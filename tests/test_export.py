"""hwslim.export.exporter and hwslim.runtimes.tensorrt_engine: checked ONNX export with provenance; TensorRT build logic."""
from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.cli import main
from hwslim.core.config import ChannelConfig
from hwslim.core.errors import ConfigError, OutputExistsError
from hwslim.export.exporter import ExportCheckError, ExportOptions, export_model
from hwslim.export.formats import FORMATS
from hwslim.runtimes.onnx_file import config_from_metadata, export_onnx, max_relative_error, onnx_metadata, sha256_file
from hwslim.core.materialize import materialize
from hwslim.models import create_model
from hwslim.runtimes.tensorrt_engine import (INSTALL_HINT, EngineSpec, TensorRTError, find_builder, parse_trtexec_version,
                                   precision_plan, trtexec_command)


@pytest.fixture
def setup(tmp_path, export_setup):
    """A small supernet checkpoint (no data recorded) and a non-uniform config of it."""
    return export_setup(tmp_path, 1.5)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def test_export_matches_supernet_and_records_provenance(setup, tmp_path):
    net, ckpt, cfg, cfg_path = setup
    res = export_model(ckpt, cfg_path, tmp_path / "m.onnx")
    assert res.max_rel_error <= 1e-4 and res.tolerance == 1e-4
    assert "random inputs" in res.check and "no training data" in res.check
    # independent check: ONNX Runtime vs the supernet at the config, on fresh inputs
    x = torch.randn(1, 3, 32, 32)
    net.eval()
    with torch.no_grad(), net.using(cfg):
        ref = net(x)
    assert max_relative_error(_ort(res.path, x), ref) <= 1e-4
    model = onnx.load(str(res.path))
    assert model.opset_import[0].version >= 17
    assert model.producer_name == "hwslim"
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    stem = next(i for i in model.graph.initializer if i.name == convs[0].input[1])
    assert stem.dims[0] == cfg.widths[net.nodes[0].out] < net.units[net.nodes[0].out].max_width  # physically sliced to the chosen channels
    meta = onnx_metadata(res.path)
    assert meta["model"] == "resnet20" and meta["width_mult"] == "1"
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["checkpoint_sha256"] == sha256_file(ckpt)
    assert meta["config_path"] == str(cfg_path.resolve())
    assert meta["version"] and meta["batch"] == "1" and meta["precision"] == "fp32"
    assert meta["num_classes"] == "10" and meta["divisor"] == "8"
    back = config_from_metadata(meta)
    assert back == cfg and back.meta["budget"] == {"kind": "latency_ms", "value": 1.5}
    assert float(meta["max_rel_error"]) == pytest.approx(res.max_rel_error, rel=1e-3)


def test_existing_output_is_kept_unless_force(setup, tmp_path):
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        export_model(ckpt, cfg_path, out)
    assert out.read_bytes() == b"precious"
    export_model(ckpt, cfg_path, out, ExportOptions(force=True))
    onnx.checker.check_model(str(out))


def test_failed_check_writes_nothing(setup, tmp_path):
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportCheckError, match="max relative error"):
        export_model(ckpt, cfg_path, out, ExportOptions(tolerance=0.0, check_images=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "ck.pt"]  # no file, no temporary


def test_config_for_another_model_is_refused(setup, tmp_path):
    _, ckpt, cfg, _ = setup
    other = ChannelConfig("resnet56", cfg.width_mult, 32, cfg.widths)
    with pytest.raises(ConfigError, match="resnet56"):
        export_model(ckpt, other, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_batch_and_fixed_batch(setup, tmp_path):
    net, ckpt, cfg, _ = setup
    dyn = export_model(ckpt, cfg, tmp_path / "dyn.onnx", ExportOptions(dynamic_batch=True, batch=2, check_images=6))
    x = torch.randn(5, 3, 32, 32)
    net.eval()
    with torch.no_grad(), net.using(cfg):
        ref = net(x)
    assert max_relative_error(_ort(dyn.path, x), ref) <= 1e-4
    fixed = export_model(ckpt, cfg, tmp_path / "b4.onnx", ExportOptions(batch=4, check_images=6))
    dims = onnx.load(str(fixed.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 32, 32]
    assert onnx_metadata(fixed.path)["batch"] == "4"


def test_fp16_graph_keeps_fp32_io(setup, tmp_path):
    _, ckpt, cfg, _ = setup
    res = export_model(ckpt, cfg, tmp_path / "h.onnx", ExportOptions(fp16=True))
    model = onnx.load(str(res.path))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in model.graph.initializer if i.name in conv_weights} == {f16}
    assert res.precision == "fp16" and 0 < res.max_rel_error <= 1e-2


def test_export_onnx_low_level_writer_unchanged(tmp_path):
    net = create_model("resnet20", width_mult=0.25).eval()
    plain = materialize(net, net.uniform_config(3), fold_bn=True)
    path = export_onnx(plain, tmp_path / "p.onnx", batch=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_relative_error(_ort(path, x), plain(x)) <= 1e-4


def test_max_relative_error_is_relative_to_output_scale():
    ref = torch.tensor([[10.0, -20.0, 0.0]])
    assert max_relative_error(ref + torch.tensor([[0.0, 0.0, 0.002]]), ref) == pytest.approx(1e-4)
    assert max_relative_error(ref, ref) == 0.0


def test_cli_export_json_and_user_errors(setup, tmp_path, capsys):
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "cli.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out) and printed["max_rel_error"] <= 1e-4
    # a second run without --force: one line on stderr, exit 2, file kept
    before = out.read_bytes()
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err and out.read_bytes() == before
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--config", str(cfg_path),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_MODEL_TABLE = os.path.join(REPO, "latency_tables", "cpu-amd-epyc",
                                 "mobilenet_v2-x1.5-224px-b1-ort-t1-float32.csv")


def _exit_code(argv) -> int:
    """``hwslim ARGV``'s exit status (argparse usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_line_error(capsys) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err and err.count("\n") == 0 and "Traceback" not in cap.err, cap.err
    return err


def test_export_verify_refuses_a_bad_table_or_budget_before_writing(setup, tmp_path, capsys):
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.onnx"
    export_model(ckpt, cfg_path, out, ExportOptions(check_images=2, calib_images=0))
    before = out.read_bytes()
    junk = tmp_path / "junk.csv"
    junk.write_bytes(os.urandom(256))
    junk.with_suffix(".json").write_bytes(os.urandom(256))
    base = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(out), "--force",
            "--check-images", "2", "--verify"]
    for extra in (["--table", str(junk)], ["--table", OTHER_MODEL_TABLE],
                  ["--table", OTHER_MODEL_TABLE.replace("mobilenet_v2-x1.5-224px", "resnet20-x1-32px"),
                   "--budget-ms", "-1"]):
        assert _exit_code(base + extra) == 2, extra
        _one_line_error(capsys)
        assert out.read_bytes() == before, extra  # refused before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "ck.pt", "junk.csv", "junk.json", "m.onnx"]


def test_opset_outside_the_supported_range_is_refused(setup, tmp_path, capsys):
    _, ckpt, _, cfg_path = setup
    for opset in ("99", "16"):
        assert _exit_code(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out",
                           str(tmp_path / "o.onnx"), "--opset", opset]) == 2
        assert "--opset" in _one_line_error(capsys)
    with pytest.raises(ConfigError, match="opset"):
        ExportOptions(opset=99)
    net = create_model("resnet20", width_mult=0.25).eval()
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(materialize(net, net.full_config(), fold_bn=True), tmp_path / "p.onnx", opset=99)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "ck.pt"]


def test_export_onnx_fallback_writes_one_self_contained_file(tmp_path, monkeypatch):
    """When the TorchScript exporter fails, the torch.export one writes a single file (no .data beside it)."""
    real = torch.onnx.export

    def no_torchscript(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("TorchScript exporter unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    net = create_model("resnet20", width_mult=0.25, input_size=8).eval()
    plain = materialize(net, net.min_config(), fold_bn=True)
    path = export_onnx(plain, tmp_path / "f.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["f.onnx"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert max_relative_error(_ort(path, x), plain(x)) <= 1e-4


def test_export_onnx_failure_leaves_no_temporary(tmp_path, monkeypatch):
    def fails_after_writing(model, args, f, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        with open(str(f) + ".data", "wb") as fh:
            fh.write(b"weights")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fails_after_writing)
    net = create_model("resnet20", width_mult=0.25, input_size=8).eval()
    with pytest.raises(RuntimeError):
        export_onnx(materialize(net, net.min_config(), fold_bn=True), tmp_path / "f.onnx")
    assert list(tmp_path.iterdir()) == []


def test_out_directory_is_refused(setup, tmp_path, capsys):
    _, ckpt, _, cfg_path = setup
    d = tmp_path / "dir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(d), "--force"]) == 2
    assert "directory" in _one_line_error(capsys)
    assert [p.name for p in d.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--check-images", "0"], ["--calib-images", "-1"],
                                 ["--budget-ms", "0"], ["--batch", "two"]])
def test_cli_number_arguments_are_checked(setup, tmp_path, capsys, bad):
    _, ckpt, _, cfg_path = setup
    assert _exit_code(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out",
                       str(tmp_path / "x.onnx"), *bad]) == 2
    assert bad[0] in _one_line_error(capsys)
    assert not (tmp_path / "x.onnx").exists()



def test_a_new_format_is_its_module_and_one_registry_entry(setup, tmp_path, monkeypatch, capsys):
    """tests/toys/toy_format.py, registered by one line, is exported through the library and the CLI."""
    monkeypatch.setitem(FORMATS, "toy", ("toys.toy_format", "ReversedOnnxFormat"))
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.xnno"
    res = export_model(ckpt, cfg_path, out, ExportOptions(format="toy", check_images=4))
    assert res.format == "toy" and res.runtime == "toy 1.0" and res.engine_error <= 1e-4
    assert out.read_bytes() == (tmp_path / "m.onnx").read_bytes()[::-1] and res.onnx_path == tmp_path / "m.onnx"
    side = json.loads(res.sidecar.read_text())
    assert side["reversed_onnx"] == str(out.resolve()) and side["toy"] == "toy 1.0"
    assert float(side["toy_max_rel_error"]) == pytest.approx(res.engine_error, rel=1e-3)
    assert side["checkpoint_sha256"] == sha256_file(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "ck.pt", "m.onnx", "m.xnno", "m.xnno.json"]

    cli = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "toy", "--check-images", "2"]
    assert main(cli + ["--out", str(tmp_path / "c.xnno"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["toy"] == "toy 1.0" and printed["toy_max_rel_error"] <= 1e-4
    assert printed["provenance"] == str(tmp_path / "c.xnno.json")
    assert main(cli + ["--out", str(tmp_path / "t.xnno")]) == 0
    assert f"wrote {tmp_path / 't.xnno'} (and {tmp_path / 't.onnx'}, {tmp_path / 't.xnno.json'})" in \
        capsys.readouterr().out
    assert main(cli + ["--out", str(tmp_path / "t.onnx"), "--force"]) == 2
    assert "give --out a .xnno path" in _one_line_error(capsys)
    assert _exit_code(["export", "--help"]) == 0
    assert "toy (the ONNX bytes reversed)" in " ".join(capsys.readouterr().out.split())

# -- TensorRT: the logic around the build (TensorRT itself cannot run here) ---------------------------

def test_precision_plan_by_tensorrt_version():
    assert precision_plan(10, False) == precision_plan(11, False)
    assert precision_plan(10, False).builder_flags == () and not precision_plan(10, False).onnx_fp16
    p10 = precision_plan(10, True)
    assert p10.builder_flags == ("FP16",) and p10.trtexec_flags == ("--fp16",) and not p10.onnx_fp16
    p11 = precision_plan(11, True)  # strongly typed: no flags, the graph carries fp16
    assert p11.builder_flags == () and p11.trtexec_flags == () and p11.onnx_fp16
    with pytest.raises(TensorRTError, match="too old"):
        precision_plan(8, True)


def test_trtexec_version_banner():
    assert parse_trtexec_version("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec") == (10, 3, 0)
    assert parse_trtexec_version("[TensorRT v110100]") == (11, 1, 0)
    assert parse_trtexec_version("usage: trtexec") is None


def test_trtexec_command_line(tmp_path):
    spec = EngineSpec(tmp_path / "m.onnx", tmp_path / "m.engine", (4, 3, 224, 224), dynamic_batch=True,
                      max_batch=16, fp16=True, workspace_bytes=1 << 30, timing_cache=tmp_path / "tc")
    cmd = trtexec_command("trtexec", spec, 10)
    assert cmd[0] == "trtexec"
    assert f"--onnx={tmp_path / 'm.onnx'}" in cmd and f"--saveEngine={tmp_path / 'm.engine'}" in cmd
    assert "--minShapes=input:1x3x224x224" in cmd and "--optShapes=input:4x3x224x224" in cmd
    assert "--maxShapes=input:16x3x224x224" in cmd
    assert "--memPoolSize=workspace:1024M" in cmd and f"--timingCacheFile={tmp_path / 'tc'}" in cmd
    assert "--fp16" in cmd and "--skipInference" in cmd
    assert "--fp16" not in trtexec_command("trtexec", spec, 11)  # removed in TensorRT 11
    static = EngineSpec(tmp_path / "m.onnx", tmp_path / "m.engine", (1, 3, 32, 32))
    shapes = [a for a in trtexec_command("trtexec", static, 10) if "Shapes=" in a]
    assert shapes == ["--minShapes=input:1x3x32x32", "--optShapes=input:1x3x32x32", "--maxShapes=input:1x3x32x32"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_refuses_with_one_line_without_tensorrt(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtexec
    with pytest.raises(TensorRTError) as e:
        find_builder()
    assert str(e.value) == INSTALL_HINT and "pip install 'hwslim[tensorrt]'" in INSTALL_HINT
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.engine"
    code = main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "tensorrt",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trtexec" in err
    assert not out.exists() and not out.with_suffix(".onnx").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell script")
@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_export_through_trtexec_command(setup, tmp_path, monkeypatch):
    """The trtexec path end to end, with a stand-in trtexec (the real one cannot run here) that
    records its arguments and writes the engine file it is asked for."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "args.txt"
    script = bindir / "trtexec"
    script.write_text(f"""#!/bin/sh
echo '&&&& RUNNING TensorRT.trtexec [TensorRT v110000] # trtexec'
[ "$1" = "--help" ] && exit 0
printf '%s\\n' "$@" > {log}
for a in "$@"; do case "$a" in --saveEngine=*) printf engine > "${{a#--saveEngine=}}";; esac; done
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, ckpt, _, cfg_path = setup
    out = tmp_path / "m.engine"
    res = export_model(ckpt, cfg_path, out, ExportOptions(format="tensorrt", fp16=True, dynamic_batch=True, batch=2))
    assert out.read_bytes() == b"engine" and res.runtime == f"TensorRT 11.0.0 (trtexec at {script})"
    args = log.read_text().splitlines()
    assert "--fp16" not in args and "--optShapes=input:2x3x32x32" in args and "--minShapes=input:1x3x32x32" in args
    assert res.onnx_path == tmp_path / "m.onnx" and res.precision == "fp16"
    assert f"--timingCacheFile={tmp_path / 'cache' / 'hwslim' / 'tensorrt.timing-cache'}" in args
    # TensorRT 11 is strongly typed: the ONNX it was built from is an fp16 graph
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in onnx.load(str(res.onnx_path)).graph.initializer}
    side = json.loads(res.sidecar.read_text())
    assert side["engine"] == str(out.resolve()) and side["checkpoint_sha256"] == sha256_file(ckpt)
    assert side["tensorrt"].startswith("TensorRT 11.0.0") and "config" in side


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_pytorch(setup, tmp_path):
    """Real TensorRT (Python API) on a GPU: build, run through torch CUDA tensors, compare."""
    _, ckpt, _, cfg_path = setup
    res = export_model(ckpt, cfg_path, tmp_path / "m.engine", ExportOptions(format="tensorrt"))
    assert res.engine_error is not None and res.engine_error <= 2e-3
    assert np.isfinite(res.max_rel_error)


def test_export_with_checkpoint_data_recalibrates_bn_and_checks_real_images(tmp_path):
    from hwslim.importing.data import search_split, synthetic_data_info
    from hwslim.core.accuracy import batches
    from hwslim.core.slimmable import recalibrate_bn

    net = create_model("resnet20")
    info = synthetic_data_info(num_train=200, num_search=64, input_size=32, num_val=40)
    ckpt = save_checkpoint(tmp_path / "ck.pt", net, data=info)
    cfg = net.uniform_config(6)
    res = export_model(ckpt, cfg, tmp_path / "m.onnx", ExportOptions(check_images=16, calib_images=64))
    assert res.check == "16 images of the checkpoint's validation split"
    assert res.bn == "recalibrated at this config on 64 images of the checkpoint's search split"
    assert res.max_rel_error <= 1e-4
    # the deployed BN statistics are the config's own, as the search scored it
    loaded = load_checkpoint(ckpt)
    images, _ = search_split(loaded, max_images=64)
    model = loaded.model
    with torch.no_grad(), model.using(cfg):
        recalibrate_bn(model, batches(images, 128))
        model.eval()
        ref = model(images[:4])
    assert max_relative_error(_ort(res.path, images[:1]), ref[:1]) <= 1e-4


def _bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_export_leaves_the_callers_supernet_as_it_was(tmp_path):
    """Recalibrating BN for the export must not overwrite the caller's statistics, mode or device."""
    from hwslim.importing.checkpoint import Checkpoint
    from hwslim.importing.data import synthetic_data_info

    net = create_model("resnet20", input_size=16)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.train()
    before = _bn_state(net)
    ckpt = Checkpoint(net, data=synthetic_data_info(num_train=200, num_search=64, input_size=16, num_val=16))
    res = export_model(ckpt, net.uniform_config(6), tmp_path / "m.onnx", ExportOptions(check_images=8, calib_images=64))
    assert res.bn.startswith("recalibrated")
    after = _bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and next(net.parameters()).device.type == "cpu"
    assert net.config == net.full_config()


@pytest.mark.gpu
def test_export_leaves_a_cuda_supernet_on_its_gpu(tmp_path):
    from hwslim.importing.checkpoint import Checkpoint
    from hwslim.importing.data import synthetic_data_info

    net = create_model("resnet20", input_size=16).cuda().eval()
    before = _bn_state(net)
    ckpt = Checkpoint(net, data=synthetic_data_info(num_train=200, num_search=64, input_size=16, num_val=16))
    export_model(ckpt, net.uniform_config(6), tmp_path / "m.onnx", ExportOptions(check_images=8, calib_images=64))
    assert next(net.parameters()).is_cuda and all(b.is_cuda for b in net.buffers())
    after = _bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before) and not net.training


def test_a_config_paired_with_another_checkpoint_names_the_checkpoint_it_was_searched_on(tmp_path, export_setup,
                                                                                         capsys):
    """Not "unit 's3': width 56 is not on its grid": the config records its checkpoint's sha256, so say that."""
    from hwslim.runtimes.onnx_file import sha256_file

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, ck_a, cfg_a, _ = export_setup(tmp_path / "a", 1.0)
    _, ck_b, _, _ = export_setup(tmp_path / "b", 1.0, divisor=16)  # another grid: the config does not fit it
    sha = sha256_file(ck_a)
    cfg = cfg_a.with_meta(checkpoint=str(ck_a), checkpoint_sha256=sha).save(tmp_path / "cfg.json")
    expected = (f"this config was searched on checkpoint ck.pt, sha256 {sha[:12]}, not on {ck_b}: "
                "give that checkpoint, or search this one")
    for argv in (["export", "--checkpoint", str(ck_b), "--config", str(cfg), "--out", str(tmp_path / "m.onnx")],
                 ["eval", "--checkpoint", str(ck_b), "--config", str(cfg)]):
        assert _exit_code(argv) == 2
        assert _one_line_error(capsys) == f"hwslim {argv[0]}: error: {expected}"
    assert not (tmp_path / "m.onnx").exists()
    # a config that records no checkpoint keeps the grid's own message
    bare = cfg_a.save(tmp_path / "bare.json")
    argv = ["export", "--checkpoint", str(ck_b), "--config", str(bare), "--out", str(tmp_path / "m.onnx")]
    assert _exit_code(argv) == 2
    assert "is not on its grid" in _one_line_error(capsys)


def test_format_torch_writes_a_torch_export_program_that_matches_the_supernet(setup, tmp_path, capsys):
    """--format torch: one module in hwslim/export/, one FORMATS entry; the .pt2 runs without hwslim."""
    from hwslim.export.formats import FORMATS

    net, ckpt, cfg, cfg_path = setup
    assert FORMATS["torch"] == ("hwslim.export.torch_format", "TorchExportFormat")
    out = tmp_path / "m.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out", str(out), "--format", "torch",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pt2_max_rel_error"] <= 1e-4
    assert out.is_file() and out.with_suffix(".onnx").is_file() and (tmp_path / "m.pt2.json").is_file()
    extra = {"hwslim.json": ""}
    program = torch.export.load(str(out), extra_files=extra).module()
    assert json.loads(extra["hwslim.json"])["config"]  # the provenance travels inside the program
    x = torch.randn(1, 3, cfg.input_size, cfg.input_size)
    net.eval()
    with torch.no_grad(), net.using(cfg):
        ref = net(x)
    assert torch.allclose(program(x), ref, atol=1e-4, rtol=1e-4)
    assert _exit_code(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--out",
                       str(tmp_path / "m.onnx"), "--format", "torch"]) == 2
    assert "give --out a .pt2 path" in _one_line_error(capsys)
