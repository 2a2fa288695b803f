"""The OpenVINO backend (profilers.openvino_cpu), IR export (hwslim.runtimes.openvino_ir) and verify on it.

Real OpenVINO on this CPU (the ``dev`` extra installs it); the shared conformance tests in
test_profilers.py run on it too. Quick protocols: seconds, and the numbers mean little.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from hwslim.cli import main
from hwslim.core.errors import TableError
from hwslim.export.exporter import ExportOptions, export_model
from hwslim.runtimes.onnx_file import max_relative_error
from hwslim.latency.table import LatencyTable
from hwslim.models import create_model
from hwslim.latency.profile import ProfileSettings, profile
from hwslim.latency.verify import verify_model
from profilers import get_profiler
from profilers.base import Protocol

ov = pytest.importorskip("openvino", reason="the openvino package is not installed (pip install 'hwslim[openvino]')")
pytestmark = pytest.mark.openvino

QUICK = Protocol.quick()


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    """A real (quick-protocol) OpenVINO table of a tiny resnet20, layers timed by OpenVINO's counters."""
    out = tmp_path_factory.mktemp("ovtable") / "r20.csv"
    profile(ProfileSettings(backend="openvino", model="resnet20", width_mult=0.5, input_size=8, out=str(out),
                            quick=True, calib_configs=3, holdout_configs=2))
    return out


@pytest.fixture(scope="module")
def exported(table_path, tmp_path_factory, export_setup):
    d = tmp_path_factory.mktemp("ovmodel")
    net, ckpt, cfg, cfg_path = export_setup(d, 1000.0, width_mult=0.5, input_size=8)
    res = export_model(ckpt, cfg_path, d / "m.xml", ExportOptions(format="openvino", table=table_path,
                                                                  check_images=4))
    return net, cfg, ckpt, cfg_path, res


# -- the profiler ---------------------------------------------------------------------------------
def test_layer_owner_charges_conversions_to_their_consumer():
    from profilers.openvino_cpu import layer_owner

    layers = ["stem", "b1/p", "b1/project", "pool", "classifier"]
    assert layer_owner("stem::conv/WithoutBiases", layers) == "stem"
    assert layer_owner("b1/project::conv/WithoutBiases", layers) == "b1/project"  # the longest name
    assert layer_owner("input_abcd_acdb_stem::conv/WithoutBiases", layers) == "stem"
    assert layer_owner("pool::gap_acdb_abcd_b1/project::conv", layers) == "b1/project"  # the consumer
    assert layer_owner("classifier", layers) == "classifier"
    assert layer_owner("classifier/sink_port_0", layers) == "classifier"
    assert layer_owner("stemx::conv", layers) is None and layer_owner("input", layers) is None


def test_network_profile_charges_every_layer_from_the_runtime_counters():
    net = create_model("mobilenet_v3_small", width_mult=1.0, input_size=64)  # SE, hardswish, residuals
    specs = net.layer_specs(net.full_config())  # layers of microseconds: under 1 us a counter reads 0
    with get_profiler("cpu", "openvino", protocol=QUICK) as prof:
        per_layer = prof.profile_network(specs)
    assert set(per_layer) == {s.name for s in specs}
    assert all(len(v) == 1 and v[0] >= 0 for v in per_layer.values())  # one mean per layer and network
    convs = [s.name for s in specs if s.op.kind == "conv"]
    assert all(per_layer[n][0] > 0 for n in convs)  # every conv ran and was charged


def test_counters_are_running_averages_and_the_warm_up_is_taken_out():
    """A node's counter is its average since compile: the first run (one-time costs) stays in it.
    profile_network's per-run mean excludes the warm-up, so it is below the first run's reading."""
    net = create_model("resnet20", width_mult=1.0, input_size=32)
    specs = net.layer_specs(net.full_config())
    from hwslim.core.onnx_build import network_model

    with get_profiler("cpu", "openvino", protocol=QUICK) as prof:
        run = prof._request(prof.compile(network_model(specs), perf_count=True))  # one run
        stem_first = prof._counter_totals(run.request, 1)["stem::conv/WithoutBiases"][0]  # exact after 1 run
        run()
        assert prof._counter_totals(run.request, 2)["stem::conv/WithoutBiases"][0] >= stem_first  # a total
        mean = prof.profile_network(specs)["stem"][0] * 1e3  # us
    assert 0 < mean < stem_first


def test_metadata_records_the_runtime_settings_and_refuses_another_precision():
    with get_profiler("cpu", "openvino", protocol=QUICK) as prof:
        meta = prof.metadata()
        assert meta["backend"] == "openvino" and meta["backend_version"] == ov.get_version()
        assert meta["inference_precision"] == "f32" and meta["performance_hint"] == "LATENCY"
        assert meta["clock"] == "thread_cpu" and meta["threads"] == 1
        assert "PERF_COUNT" in meta["layer_times"]
        assert prof.compile_config() == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY",
                                         "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": False}
        other = {**meta, "inference_precision": "bf16", "dtype": "bfloat16"}
        assert any("dtype" in m for m in prof.mismatches(other))
    with get_profiler("cpu", "openvino", threads=2, protocol=QUICK) as two:
        assert two.clock == "wall" and two.compile_config()["INFERENCE_NUM_THREADS"] == 2
        assert any("threads" in m for m in two.mismatches(meta))


def test_bfloat16_where_the_cpu_has_it():
    from profilers.base import ProfilerError
    from profilers.openvino_cpu import capabilities

    if "BF16" not in capabilities():
        with pytest.raises(ProfilerError, match="cannot run bfloat16"):
            get_profiler("cpu", "openvino", dtype="bfloat16")
        return
    net = create_model("resnet20", width_mult=0.25, input_size=8)
    specs = net.layer_specs(net.full_config())
    with get_profiler("cpu", "openvino", dtype="bfloat16", protocol=QUICK) as prof:
        assert prof.metadata()["inference_precision"] == "bf16"
        assert prof.compile_config()["INFERENCE_PRECISION_HINT"] == "bf16"
        assert all(len(v) == 1 and v[0] >= 0 for v in prof.profile_network(specs).values())


def test_profile_writes_an_openvino_table(table_path):
    table = LatencyTable.load(table_path)
    m = table.meta
    assert m["backend"] == "openvino" and m["method"] == "in_network" and m["status"] == "complete"
    assert m["inference_precision"] == "f32" and "PERF_COUNT" in m["layer_times"]
    assert m["settings"]["in_network"] is True and m["calibration"]["a"] > 0
    assert len(table) == m["entries_expected"] and all(t.median_ms >= 0 for t in table.entries.values())
    net = create_model("resnet20", width_mult=0.5, input_size=8)
    table.check_compatible(net, batch=1)  # this machine, this setup
    with pytest.raises(TableError, match=r"backend openvino \(wanted: ort\)"):
        table.check_compatible(net, batch=1, backend="ort")


# -- IR export, parity, verify ----------------------------------------------------------------------
def test_export_openvino_writes_a_checked_ir_with_provenance(exported):
    net, cfg, ckpt, _, res = exported
    xml = res.path
    assert res.format == "openvino" and xml.suffix == ".xml"
    for p in (xml, xml.with_suffix(".bin"), xml.with_suffix(".onnx"), res.sidecar):
        assert p.is_file(), p
    assert res.engine_error is not None and res.engine_error <= 1e-4 and res.runtime.startswith("OpenVINO ")
    # independent parity check: the saved IR vs the supernet at the config, on fresh inputs
    x = torch.randn(3, 3, 8, 8)
    net.eval()
    with torch.no_grad(), net.using(cfg):
        ref = net(x)
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.cat([torch.from_numpy(compiled(x[i:i + 1].numpy())[compiled.output(0)]) for i in range(3)])
    assert max_relative_error(got, ref) <= 1e-4
    from hwslim.runtimes.openvino_ir import ir_metadata

    meta = ir_metadata(xml)
    assert json.loads(meta["config"])["widths"] == cfg.widths and meta["checkpoint_sha256"]
    side = json.loads(res.sidecar.read_text())
    assert side["onnx"] == str(xml.with_suffix(".onnx").resolve()) and side["openvino_ir"] == str(xml.resolve())


def test_verify_measures_the_ir_on_the_openvino_table(table_path, exported):
    net, cfg, *_, res = exported
    r = verify_model(res.path, table_path)
    assert r.model == res.path and r.backend == "openvino" and r.measured_ms > 0 and r.ok
    assert r.predicted_ms == pytest.approx(LatencyTable.load(table_path).predict_ms(
        net.layer_specs(cfg, batch=1, input_size=8)))


def test_export_openvino_verify_cli(table_path, exported, tmp_path, capsys):
    *_, ckpt, cfg_path, _ = exported
    out = tmp_path / "v.xml"
    args = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "openvino", "--out", str(out),
            "--check-images", "2", "--verify", "--table", str(table_path), "--json"]
    assert main(args) in (0, 3)  # 3: UNRELIABLE where this shared machine's conditions moved since the table
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "openvino" and printed["ir_max_rel_error"] <= 1e-4
    assert printed["verify"]["backend"] == "openvino" and printed["verify"]["model"] == str(out)
    assert printed["verify"]["within_budget"] is True
    rc = main(args[:-1] + ["--budget-ms", "1e-6", "--force"])
    assert rc in (1, 3)  # measured over the budget (3: UNRELIABLE where this shared machine's conditions moved)
    if rc == 1:
        assert "exceeds the budget" in capsys.readouterr().err


def test_export_openvino_refuses_fp16_and_non_xml(exported, tmp_path, capsys):
    *_, ckpt, cfg_path, _ = exported
    base = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "openvino"]
    assert main(base + ["--out", str(tmp_path / "m.onnx")]) == 2
    assert "give --out a .xml path" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "m.xml"), "--fp16"]) == 2
    assert "--fp16 does not apply" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- without the package --------------------------------------------------------------------------------
def test_missing_openvino_is_one_line_naming_the_extra(exported, monkeypatch, refused_without_extra):
    """``import openvino`` failing (sys.modules entry None) as on an install without the extra."""
    *_, ckpt, cfg_path, _ = exported
    monkeypatch.setitem(sys.modules, "openvino", None)
    refused_without_extra("openvino", ckpt, cfg_path, "m.xml")
