"""Conformance of every available latency backend, plus the shared protocol and the ORT graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from hwslim.core.graph import LayerSpec, layer_spec
from hwslim.core.materialize import materialize
from hwslim.models import create_model
from hwslim.core.ops import (Act, Add, AvgPool, BatchNorm, Concat, Conv, GlobalAvgPool, Linear, MaxPool,
                        SqueezeExcite)
from profilers import available_backends, backend_class, get_profiler, profiler_for_table
from profilers.base import Profiler, ProfilerError, Protocol, Timing

BACKENDS = available_backends()
QUICK = Protocol.quick()


def _specs() -> list[LayerSpec]:
    """One spec of each kind an entry can be: dense, depthwise, residual, pools, classifier."""
    return [
        layer_spec("stem", Conv(3, 1, 1, act="relu6"), 3, 16, out=16),
        layer_spec("dw", Conv(3, 2, 1, group_width=1, act="relu6"), 32, 16),
        layer_spec("pw", Conv(1, act=None), (8, 24), 8, out=24),
        layer_spec("pool", MaxPool(3, 2, 1), 24, 8),
        layer_spec("gap", GlobalAvgPool(), 24, 4),
        layer_spec("fc", Linear(), 24, 1, out=10, flat=True),
        # the operators of MobileNetV3 / EfficientNet / RegNet / DenseNet
        layer_spec("se", SqueezeExcite("relu", "hardsigmoid"), 32, 8, mid=8),
        layer_spec("gconv", Conv(3, 1, 1, group_width=8), 32, 8),
        layer_spec("add", Add("relu"), (16, 16), 8),
        layer_spec("cat", Concat(), (16, 8), 8),
        layer_spec("bn", BatchNorm("relu"), 24, 8),
        layer_spec("avg", AvgPool(2, 2), 24, 8),
        layer_spec("hs", Act("hardswish"), 24, 8),
    ]


@pytest.fixture(scope="module", params=BACKENDS or [pytest.param(None, marks=pytest.mark.skip("no backend"))])
def profiler(request):
    backend = request.param
    device = backend_class(backend).device
    with get_profiler(device, backend, protocol=QUICK, e2e_protocol=QUICK) as prof:
        yield prof


def test_ort_is_available_here():
    assert "ort" in BACKENDS  # onnxruntime is a core dependency


def test_time_entry_returns_a_sane_timing(profiler):
    for spec in _specs():
        t = profiler.time_entry(spec)
        assert isinstance(t, Timing)
        assert 0 < t.median_ms <= t.p90_ms < 1000
        assert t.iqr_ms >= 0 and t.n >= QUICK.min_reps


def test_bigger_layer_takes_longer(profiler):
    small = layer_spec("a", Conv(1), 16, 8, out=16)
    big = layer_spec("b", Conv(3, 1, 1), 256, 32, out=256)  # ~1000x the MACs
    assert profiler.time_entry(big).median_ms > 5 * profiler.time_entry(small).median_ms


def test_measure_entries_yields_each_entry_once(profiler):
    specs = _specs()
    got = list(profiler.measure_entries(specs + specs[:2]))
    assert sorted(s.signature() for s, _ in got) == sorted({s.signature() for s in specs})


def test_measure_entries_in_networks_covers_entries_outside_them(profiler):
    net = create_model("resnet20", width_mult=0.25, input_size=8)
    specs = net.layer_specs(net.full_config())
    extra = layer_spec("extra", Conv(1), 16, 8, out=32)  # in no network
    got = dict((s.signature(), t) for s, t in profiler.measure_entries(specs + [extra], networks=[specs]))
    assert set(got) == {s.signature() for s in specs + [extra]}
    assert all(t.median_ms > 0 for t in got.values())


def test_time_onnx_times_a_whole_model(profiler, tmp_path):
    net = create_model("resnet20", width_mult=0.25, input_size=8).eval()
    path = profiler.write_model(materialize(net, fold_bn=True), tmp_path / "m", input_size=8)  # ONNX; .pte...
    assert path.suffix in profiler.model_suffixes
    t = profiler.time_onnx(path, (1, 3, 8, 8))
    assert 0 < t.median_ms < 100 and t.n >= QUICK.min_reps


def test_metadata_identifies_the_setup_and_rebuilds_the_profiler(profiler):
    meta = profiler.metadata()
    for key in ("device", "device_name", "backend", "backend_version", "threads", "dtype", "settings"):
        assert key in meta
    assert profiler.mismatches(meta) == []
    assert profiler.mismatches({**meta, "device_name": "another CPU"}) == [
        f"device_name 'another CPU' (here: {meta['device_name']!r})"]
    again = profiler_for_table(meta)
    try:
        assert type(again) is type(profiler) and again.settings() == profiler.settings()
    finally:
        again.close()


# -- the shared protocol --------------------------------------------------------------------------------
def test_timing_from_samples():
    t = Timing.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (t.median_ms, t.iqr_ms, t.p90_ms, t.n, t.noisy) == (3.0, 2.0, pytest.approx(7.6), 5, False)
    assert t.rel_iqr == pytest.approx(2 / 3)


class _Scripted(Profiler):
    """A backend whose attempts return scripted timings: exercises the base's re-measuring."""

    backend, device = "scripted", "cpu"

    def __init__(self, script):
        super().__init__(protocol=Protocol(retries=2, max_rel_iqr=0.1))
        self.script, self.calls = list(script), 0

    def _time_entry(self, spec):
        self.calls += 1
        return self.script.pop(0)


def test_wide_spread_is_measured_again_and_the_tightest_attempt_kept():
    wide, tight = Timing(1.0, 0.5, 2.0, 10), Timing(1.1, 0.05, 1.2, 10)
    prof = _Scripted([wide, tight, wide])
    assert prof.time_entry(_specs()[0]) == tight and prof.calls == 2


def test_spread_that_stays_wide_is_flagged_noisy():
    prof = _Scripted([Timing(1.0, 0.5, 2.0, 10), Timing(1.0, 0.4, 2.0, 10), Timing(1.0, 0.3, 2.0, 10)])
    t = prof.time_entry(_specs()[0])
    assert prof.calls == 3 and t.noisy and t.iqr_ms == 0.3


def test_unknown_or_absent_backends_are_explained():
    with pytest.raises(ProfilerError, match="unknown backend 'nope'"):
        get_profiler("cpu", "nope")
    with pytest.raises(ProfilerError, match="measures device 'cpu', not 'cuda'"):
        get_profiler("cuda", "ort")
    if not torch.cuda.is_available():
        with pytest.raises(ProfilerError):
            get_profiler("cuda")


# -- ONNX Runtime specifics ------------------------------------------------------------------------------
def test_entry_models_compute_the_exported_layers():
    from profilers.ort import entry_model

    for spec in _specs():
        model = entry_model(spec)
        onnx.checker.check_model(model, full_check=True)
        (out,) = model.graph.output
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        assert dims == ([1, spec.cout] if spec.op.flattens else [1, spec.cout, spec.out_h, spec.out_w])


def test_entries_run_in_the_layout_they_have_inside_a_network():
    from profilers.ort import NCHWC, entry_model, in_network_layout

    with get_profiler("cpu", "ort", protocol=QUICK) as prof:
        block = prof.nchwc_block()
        if not block:
            pytest.skip("ONNX Runtime uses no blocked layout on this CPU")
        for act in (None, "relu"):  # MobileNetV2's and ResNet's residual layers
            spec = layer_spec("pw", Conv(1, act=act), (32, 64), 14, out=64)
            opt = prof._optimized(entry_model(spec))
            assert {n.op_type for n in opt.graph.node if n.domain == NCHWC} >= {"ReorderInput", "ReorderOutput"}
            edited = in_network_layout(opt, block)
            assert [n.op_type for n in edited.graph.node] == ["Conv"]  # add and act fused, no layout changes
        narrow = layer_spec("pw", Conv(1, act="relu6"), 8, 14, out=64)
        ops = [n.op_type for n in in_network_layout(prof._optimized(entry_model(narrow)), block).graph.node]
        # 8 channels, fewer than an AVX-512 block of 16, arrive through one conversion; with AVX2's
        # block of 8 (AMD EPYC here) they are a whole block and need none
        assert ops == (["ReorderOutput", "Conv"] if block > 8 else ["Conv"])
        assert prof.time_entry(spec).median_ms > 0


def test_network_profile_charges_every_kernel_to_a_layer():
    from profilers.ort import network_model

    net = create_model("mobilenet_v2_cifar", width_mult=0.35, input_size=16)
    specs = net.layer_specs(net.min_config())
    model = network_model(specs)
    onnx.checker.check_model(model)
    with get_profiler("cpu", "ort", protocol=QUICK) as prof:
        per_layer = prof.profile_network(specs)
    assert set(per_layer) == {s.name for s in specs}
    assert all(len(v) == prof.network_runs and min(v) >= 0 for v in per_layer.values())
    assert np.median(per_layer["stem"]) > 0


def test_interquartile_mean_removes_whole_microsecond_rounding_bias():
    """A 2.4 us layer sampled by a clock with 1 us ticks: medians say 2, the interquartile mean ~2.4."""
    import numpy as np

    from profilers.base import Timing

    rng = np.random.default_rng(0)
    start = rng.uniform(0, 1, 4000)  # the layer starts at a random phase of the clock tick
    durs_us = np.floor(start + 2.4) - np.floor(start)  # each timestamp rounded to whole microseconds
    samples_ms = list(durs_us / 1e3)
    assert Timing.from_samples(samples_ms).median_ms == pytest.approx(0.002)
    assert Timing.from_samples(samples_ms, center="iqm").median_ms == pytest.approx(0.0024, abs=0.00005)
    with pytest.raises(ValueError):
        Timing.from_samples(samples_ms, center="mode")


# -- a new backend is one module and its registry entry ------------------------------------------------
def test_a_backend_registered_from_one_module_profiles_through_the_cli(tmp_path, monkeypatch, capsys):
    import json

    import profilers
    from hwslim.cli import main
    from hwslim.latency.table import LatencyTable

    monkeypatch.setattr(profilers, "BACKENDS", dict(profilers.BACKENDS))  # the registration ends with the test
    profilers.register_backend("toy", "toys.toy_backend", "ToyProfiler", "cpu")
    with pytest.raises(ProfilerError, match="already registered"):
        profilers.register_backend("toy", "toys.toy_backend", "ToyProfiler", "cpu")
    with pytest.raises(ProfilerError, match="unknown device"):
        profilers.register_backend("toy2", "toys.toy_backend", "ToyProfiler", "tpu")
    assert "toy" in available_backends("cpu")
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    assert "toy" in capsys.readouterr().out
    out = tmp_path / "toy.csv"
    assert main(["profile", "--backend", "toy", "--model", "resnet20", "--width-mult", "0.25", "--input-size", "8",
                 "--quick", "--calib-configs", "3", "--holdout-configs", "1", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["table"] == str(out)
    table = LatencyTable.load(out)
    assert table.meta["backend"] == "toy" and table.meta["backend_version"].startswith("toy 1")
    assert table.meta["device"] == "cpu" and len(table.entries) > 0
