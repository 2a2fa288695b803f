"""The ExecuTorch backend (profilers.executorch_xnnpack), .pte export (hwslim.runtimes.executorch_program) and verify on it.

Real ExecuTorch where ``pip install 'hwslim[executorch]'`` installed it (it is not part of the
``dev`` extra: about 460 MB of dependencies, and each entry takes 1-2 s to lower); without it,
the refusals are checked for real. The shared conformance tests in test_profilers.py run on
it too when it is installed.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from hwslim.cli import main
from hwslim.export.exporter import ExportOptions, export_model
from hwslim.runtimes.onnx_file import max_relative_error
from hwslim.core.graph import layer_spec
from hwslim.latency.table import LatencyTable, new_meta
from hwslim.core.materialize import materialize
from hwslim.core.ops import Conv
from hwslim.latency.profile import measure_config
from hwslim.latency.verify import verify_model
from profilers import get_profiler
from profilers.base import Protocol, Timing

HAVE = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAVE, reason="the executorch package is not installed "
                                                       "(pip install 'hwslim[executorch]')")
QUICK = Protocol.quick()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, export_setup):
    d = tmp_path_factory.mktemp("et")
    net, ckpt, cfg, cfg_path = export_setup(d, 1000.0, lambda net: net.uniform_config(6), width_mult=0.25,
                                            input_size=8)
    return d, net, ckpt, cfg, cfg_path


# Excerpts of what executorch 1.5.1 reported here (a MobileNetV3-Large SE block; ResNet-20's stem,
# first blocks and classifier): the XNNPACK delegate's nodes (kinds) and, in order, the operators
# its runtime reported through ETDump for the same program.
MBV3_SE_NODES = ["GlobalAvgPooling2d", "Conv2d", "Conv2d", "StaticTranspose", "Add", "Clamp", "Clamp", "Div",
                 "StaticTranspose", "Multiply", "Conv2d"]
MBV3_SE_OPERATORS = ["Mean (ND) Reduce2 #1", "Fully Connected (NC, F32) GEMM #7", "Fully Connected (NC, F32) GEMM #8",
                     "Transpose (ND, X32) #2", "Add (ND) #3", "Clamp (NC) #1", "Divide (ND) #1",
                     "Transpose (ND, X32) #3", "Multiply (ND) #1", "Fully Connected (NC, F32) GEMM #9"]
RESNET_NODES = ["StaticTranspose", "Conv2d", "Conv2d", "Conv2d", "Add", "Conv2d", "Conv2d", "Add",
                "GlobalAvgPooling2d", "StaticTranspose", "StaticReshape", "FullyConnected"]
RESNET_OPERATORS = ["Transpose (ND, X32) #1", "Convolution (NHWC, F32) IGEMM #1", "Convolution (NHWC, F32) IGEMM #2",
                    "Convolution (NHWC, F32) IGEMM #3", "Add (ND) #1", "Clamp (NC) #1",
                    "Convolution (NHWC, F32) IGEMM #4", "Convolution (NHWC, F32) IGEMM #5", "Add (ND) #2",
                    "Clamp (NC) #2", "Mean (ND) Reduce2 #1", "Transpose (ND, X32) #2", "Static Reshape (NC) #1",
                    "Fully Connected (NC, F32) GEMM #1"]


def test_xnnpack_operators_are_matched_to_the_delegate_nodes_in_order():
    """A clamp the runtime fused into the one before it has no operator (SE block); an add with
    a fused ReLU runs a Clamp operator after it, which belongs to the add (ResNet)."""
    from profilers.executorch_xnnpack import layer_of, match_operators

    assert match_operators(MBV3_SE_NODES, MBV3_SE_OPERATORS) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert match_operators(RESNET_NODES, RESNET_OPERATORS) == [0, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="matches none"):
        match_operators(["Conv2d", "Add"], ["Convolution (NHWC, F32) IGEMM #1", "Multiply (ND) #1"])
    names = ["stem", "b1/se", "head"]
    assert [layer_of(o, names) for o in ("entries.1.module.fc1", "entries.2", "entries.9", "other.1", None)] == \
        ["b1/se", "head", None, None, None]


@needs_executorch
def test_layers_are_timed_inside_a_network_from_its_xnnpack_operators(setup):
    """Every layer of a lowered network gets one sample per run, they add up to about the whole
    program, and a table measured this way says so."""
    d, net, *_ = setup
    cfg = net.full_config()
    specs = net.layer_specs(cfg, input_size=32)  # operators read in whole microseconds: not too small
    with get_profiler("cpu", "executorch", protocol=QUICK, e2e_protocol=QUICK, network_runs=6) as prof:
        assert prof.in_network and "inside designed networks" in prof.metadata()["layer_times"]
        out = prof.profile_network(specs)
        whole = measure_config(prof, net, cfg, input_size=32, workdir=d).median_ms
    assert set(out) == {s.name for s in specs} and all(len(v) == 6 for v in out.values())
    convs = [s.name for s in specs if "conv" in s.name]
    assert convs and all(sorted(out[n])[3] > 0 for n in convs)
    total = sum(sorted(v)[3] for v in out.values())
    assert 0.3 * whole < total <= 1.2 * whole


def _table(net, cfg, path):
    """A table with the real profiler's metadata and made-up entry times for ``cfg``'s layers."""
    with get_profiler("cpu", "executorch", protocol=QUICK, e2e_protocol=QUICK) as prof:
        meta = new_meta(prof.metadata(), model=net.name, width_mult=net.width_mult, input_size=8, batch=1,
                        entries_expected=1, method="isolated")
    entries = {s.signature(): Timing(0.002, 0.0001, 0.0021, 20) for s in net.layer_specs(cfg)}
    meta.update(status="complete", calibration={"a": 1.0, "b": 0.0, "n_fit": 3, "holdout": {}})
    return LatencyTable(meta, entries).save(path)


@needs_executorch
def test_entries_are_timed_alone_and_whole_programs_end_to_end(setup):
    d, net, *_ = setup
    small = layer_spec("a", Conv(1, act="relu"), 16, 8, out=16)
    residual = layer_spec("r", Conv(3, 1, 1, act="relu"), (16, 16), 8, out=16)
    with get_profiler("cpu", "executorch", protocol=QUICK, e2e_protocol=QUICK, in_network=False) as prof:
        meta = prof.metadata()
        assert meta["backend"] == "executorch" and meta["delegate"] == "XnnpackPartitioner"
        assert meta["torch_version"] == torch.__version__ and meta["clock"] == "thread_cpu"
        assert "timed alone" in meta["layer_times"] and prof.in_network is False
        for spec in (small, residual):
            t = prof.time_entry(spec)
            assert 0 < t.median_ms <= t.p90_ms < 100 and t.n >= QUICK.min_reps
        whole = measure_config(prof, net, net.full_config(), input_size=8, workdir=d)
        assert 0 < whole.median_ms < 100
        pte = prof.write_model(materialize(net, net.min_config(), fold_bn=True), d / "min", input_size=8)
        assert pte.suffix == ".pte" and prof.time_onnx(pte, (1, 3, 8, 8)).median_ms > 0
        with pytest.raises(Exception, match="runs .pte programs"):
            prof.time_onnx(d / "ck.pt", (1, 3, 8, 8))


@needs_executorch
def test_export_executorch_writes_a_checked_program_and_verify_measures_it(setup, capsys):
    d, net, ckpt, cfg, cfg_path = setup
    table = _table(net, cfg, d / "t.csv")
    res = export_model(ckpt, cfg_path, d / "m.pte", ExportOptions(format="executorch", table=table, check_images=4))
    assert res.format == "executorch" and res.runtime.startswith("ExecuTorch ")
    assert res.engine_error is not None and res.engine_error <= 1e-4
    for p in (res.path, d / "m.onnx", res.sidecar):
        assert p.is_file(), p
    side = json.loads(res.sidecar.read_text())
    assert side["executorch_program"] == str(res.path.resolve()) and json.loads(side["config"])["widths"] == cfg.widths
    # independent parity check of the written program
    from hwslim.runtimes.executorch_program import run_program

    x = torch.randn(3, 3, 8, 8)
    net.eval()
    with torch.no_grad(), net.using(cfg):
        ref = net(x)
    assert max_relative_error(run_program(res.path, x, 1), ref) <= 1e-4
    r = verify_model(res.path, table)
    assert r.model == res.path and r.backend == "executorch" and r.measured_ms > 0 and r.ok
    assert r.predicted_ms == pytest.approx(LatencyTable.load(table).predict_ms(net.layer_specs(cfg)))
    args = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "executorch",
            "--out", str(d / "v.pte"), "--check-images", "2", "--verify", "--table", str(table), "--json"]
    assert main(args) in (0, 3)  # 3: UNRELIABLE where this shared machine's conditions moved since the table
    printed = json.loads(capsys.readouterr().out)
    assert printed["pte_max_rel_error"] <= 1e-4 and printed["verify"]["backend"] == "executorch"


def test_missing_executorch_is_one_line_naming_the_extra(setup, monkeypatch, refused_without_extra):
    """Real absence where it is not installed; ``import executorch`` failing otherwise."""
    _, _, ckpt, _, cfg_path = setup
    if HAVE:
        monkeypatch.setitem(sys.modules, "executorch", None)
        monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    refused_without_extra("executorch", ckpt, cfg_path, "m.pte")


def test_export_executorch_refuses_fp16_dynamic_batch_and_non_pte(setup, tmp_path, capsys):
    _, _, ckpt, _, cfg_path = setup
    base = ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "executorch"]
    assert main(base + ["--out", str(tmp_path / "m.onnx")]) == 2
    assert "give --out a .pte path" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "m.pte"), "--dynamic-batch"]) == 2
    assert "--dynamic-batch is not supported" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "m.pte"), "--fp16"]) == 2
    assert "--fp16 is not supported" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_executorch
def test_the_speed_probe_runs_as_a_pte_program():
    """The conditions probe (what profile records and verify compares) is lowered to .pte: ExecuTorch
    runs no ONNX, and a program given as bytes must outlive its runs (it once ran freed memory)."""
    from hwslim.latency.conditions import measure_conditions

    with get_profiler("cpu", "executorch") as prof:
        first = measure_conditions(prof)
        again = measure_conditions(prof)
    assert first.probe_ms > 0.05 and first.probe_n >= 30
    assert 0.5 < again.probe_ms / first.probe_ms < 2.0
