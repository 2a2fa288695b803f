"""The ExecuTorch backend (profilers.executorch_xnnpack), .pte export (hwslim.executorch_build) and verify on it.

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

from hwslim.checkpoint import save_checkpoint
from hwslim.cli import main
from hwslim.export import ExportOptions, export_model, max_relative_error
from hwslim.graph import layer_spec
from hwslim.latency import LatencyTable, new_meta
from hwslim.materialize import materialize
from hwslim.models import create_model
from hwslim.ops import Conv
from hwslim.profile import measure_config
from hwslim.verify import verify_model
from profilers import get_profiler
from profilers.base import Protocol, Timing

HAVE = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAVE, reason="the executorch package is not installed "
                                                       "(pip install 'hwslim[executorch]')")
QUICK = Protocol.quick()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("et")
    torch.manual_seed(0)
    net = create_model("resnet20", width_mult=0.25, input_size=8)
    with torch.no_grad():  # non-trivial BN statistics, so folding them matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(d / "ck.pt", net)
    cfg = net.uniform_config(6).with_meta(budget={"kind": "latency_ms", "value": 1000.0})
    return d, net, ckpt, cfg, cfg.save(d / "cfg.json")


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
    with get_profiler("cpu", "executorch", protocol=QUICK, e2e_protocol=QUICK) as prof:
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
    assert res.format == "executorch" and res.executorch.startswith("ExecuTorch ")
    assert res.engine_error is not None and res.engine_error <= 1e-4
    for p in (res.path, d / "m.onnx", res.sidecar):
        assert p.is_file(), p
    side = json.loads(res.sidecar.read_text())
    assert side["executorch_program"] == str(res.path.resolve()) and json.loads(side["config"])["widths"] == cfg.widths
    # independent parity check of the written program
    from hwslim.executorch_build import run_program

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


def test_missing_executorch_is_one_line_naming_the_extra(setup, tmp_path, monkeypatch, capsys):
    """Real absence where it is not installed; ``import executorch`` failing otherwise."""
    _, _, ckpt, _, cfg_path = setup
    if HAVE:
        monkeypatch.setitem(sys.modules, "executorch", None)
        monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    code = main(["profile", "--backend", "executorch", "--model", "resnet20", "--width-mult", "0.5", "--input-size",
                 "8", "--quick", "--out", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'hwslim[executorch]'" in err, err
    code = main(["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", "executorch",
                 "--out", str(tmp_path / "m.pte")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'hwslim[executorch]'" in err, err
    assert list(tmp_path.iterdir()) == []


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
    from hwslim.conditions import measure_conditions

    with get_profiler("cpu", "executorch") as prof:
        first = measure_conditions(prof)
        again = measure_conditions(prof)
    assert first.probe_ms > 0.05 and first.probe_n >= 30
    assert 0.5 < again.probe_ms / first.probe_ms < 2.0
