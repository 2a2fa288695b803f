"""The GPU backends: torch_cuda and trt. Their graph builders run on the CPU here; timing is
marked ``gpu`` (and ``tensorrt``) and skips with a reason where those are absent."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from hwslim.runtimes.onnx_file import export_onnx
from hwslim.core.graph import layer_spec
from hwslim.core.ops import Concat, Conv, GlobalAvgPool, Linear, MaxPool, SqueezeExcite
from hwslim.core.materialize import materialize
from hwslim.models import create_model
from profilers import available_backends, get_profiler
from profilers.base import ProfilerError, Protocol, Timing, plain_net_from_specs
from profilers.gpu_info import parse_smi_csv
from profilers.torch_cuda import entry_callable, load_network, network_callable
from profilers.trt import entry_onnx, onnx_to_fp16
from profilers.trt_attribution import onnx_node_owners

QUICK = Protocol.quick()


def _tiny(name: str = "mobilenet_v2", **kw):
    kw = kw or dict(width_mult=0.35, input_size=32)
    net = create_model(name, **kw).eval()
    return net, materialize(net, net.full_config(), fold_bn=True).eval()


# -- CPU: what the backends build -------------------------------------------------------------------
@pytest.mark.parametrize("model,kw", [("mobilenet_v2", dict(width_mult=0.35, input_size=32)),
                                      ("mobilenet_v3_small", dict(width_mult=0.35, input_size=32)),
                                      ("resnet20", dict(width_mult=0.25, input_size=8))])
def test_network_built_from_specs_computes_what_its_onnx_model_does_in_onnx_runtime(tmp_path, model, kw):
    import onnxruntime as ort

    net, _ = _tiny(model, **kw)
    size = kw["input_size"]
    specs = net.layer_specs(net.uniform_configs()[3], batch=2, input_size=size)  # a narrower designed network
    plain = plain_net_from_specs(specs, seed=1)
    path = export_onnx(plain, tmp_path / "n.onnx", batch=2, input_size=size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    got = network_callable(plain, (2, 3, size, size), device="cpu", seed=3)()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_whole_model_files_hold_the_network_torch_cuda_runs(tmp_path):
    _, plain = _tiny("resnet20", width_mult=0.25, input_size=8)
    torch.save(plain, tmp_path / "m.pt")  # what TorchCudaProfiler.write_model writes
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_network(tmp_path / "m.pt")(x), plain(x))
    bare = export_onnx(plain, tmp_path / "bare.onnx", input_size=8)  # no hwslim metadata: no network to run
    with pytest.raises(ProfilerError, match="hwslim export"):
        load_network(bare)


def test_entry_callable_is_conv_bias_add_act():
    spec = layer_spec("c", Conv(3, 2, 1, act="relu6"), (8, 16), 6, out=16)
    fn, nbytes = entry_callable(spec, device="cpu", seed=1)
    with torch.no_grad():
        y = fn()
    assert y.shape == (1, 16, 3, 3) and float(y.min()) >= 0 and float(y.max()) <= 6
    assert nbytes == 4 * (8 * 36 + 16 * 9 + 16 * 8 * 9 + 16 + 16 * 9)  # input, skip, weight, bias, output
    shapes = {"p": (1, 8, 2, 2), "g": (1, 8), "f": (1, 10), "se": (1, 8, 4, 4), "cat": (1, 16, 4, 4)}
    for spec in (layer_spec("p", MaxPool(3, 2, 1), 8, 4), layer_spec("g", GlobalAvgPool(), 8, 4),
                 layer_spec("f", Linear(), 8, 1, out=10, flat=True),
                 layer_spec("se", SqueezeExcite("relu", "hardsigmoid"), 8, 4, mid=8),
                 layer_spec("cat", Concat(), (8, 8), 4)):
        fn, _ = entry_callable(spec, device="cpu", dtype="bfloat16", channels_last=True)
        out = fn()
        assert tuple(out.shape) == shapes[spec.name] and out.dtype == torch.bfloat16


def test_network_from_specs_exports_the_names_attribution_reads(tmp_path):
    net, _ = _tiny()
    cfg = net.uniform_configs()[3]  # a narrower config: widths below the maximum
    specs = net.layer_specs(cfg, batch=1, input_size=32)
    path = export_onnx(plain_net_from_specs(specs), tmp_path / "n.onnx", input_size=32)
    owners = onnx_node_owners(onnx.load(str(path)), specs)
    assert set(owners.values()) == {s.name for s in specs}


def test_fp16_graph_keeps_fp32_io_and_computes_the_same(tmp_path):
    import onnxruntime as ort

    _, plain = _tiny("resnet20", width_mult=0.25, input_size=8)
    model = onnx.load(str(export_onnx(plain, tmp_path / "r.onnx", input_size=8)))
    half = onnx_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_entry_onnx_models_check_and_run():
    import onnxruntime as ort

    specs = [layer_spec("c", Conv(3, 2, 1, act="relu6"), (8, 16), 6, out=16),
             layer_spec("d", Conv(3, 1, 1, group_width=1, act="relu"), 16, 6),
             layer_spec("p", MaxPool(3, 2, 1), 8, 4), layer_spec("g", GlobalAvgPool(), 8, 4),
             layer_spec("f", Linear(), 8, 1, out=10, flat=True),
             layer_spec("se", SqueezeExcite("silu", "sigmoid"), 8, 4, mid=8)]
    for spec in specs:
        model = entry_onnx(spec)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.ones([d for d in i.shape], np.float32) for i in sess.get_inputs()}
        (out,) = sess.run(None, feeds)
        assert list(out.shape) == ([1, spec.cout] if spec.op.flattens else
                                   [1, spec.cout, spec.out_h, spec.out_w])


def test_nvidia_smi_output_is_parsed():
    line = "NVIDIA H100 80GB HBM3, 550.54.15, 1980, 2619, 1980, 2619, [N/A], P0, 34, 700.00, Enabled, 0x0000000000000000\n"
    got = parse_smi_csv(line)
    assert got == {"gpu_name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15", "sm_mhz": 1980,
                   "mem_mhz": 2619, "max_sm_mhz": 1980, "max_mem_mhz": 2619, "pstate": "P0", "temperature_c": 34,
                   "power_limit_w": 700.0, "persistence_mode": "Enabled", "throttle_reasons": "0x0000000000000000"}


def test_gpu_backends_are_listed_only_where_they_can_run():
    cuda = available_backends("cuda")
    assert ("torch_cuda" in cuda) == torch.cuda.is_available()
    if "trt" in cuda:
        assert torch.cuda.is_available()


# -- GPU: torch_cuda ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_prof():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible")
    with get_profiler("cuda", "torch", protocol=QUICK, e2e_protocol=QUICK) as prof:
        yield prof


BIG = layer_spec("big", Conv(3, 1, 1, act="relu"), 256, 56, out=256)
SMALL = layer_spec("small", Conv(3, 1, 1, group_width=1, act="relu6"), 32, 14)


@pytest.mark.gpu
def test_torch_cuda_times_an_entry(torch_prof):
    t = torch_prof.time_entry(SMALL)
    assert isinstance(t, Timing) and 0 < t.median_ms <= t.p90_ms < 10 and t.n >= QUICK.min_reps
    meta = torch_prof.metadata()
    for key in ("gpu_name", "driver_version", "cuda_runtime", "cudnn_version", "precision", "clocks_at_start"):
        assert key in meta
    assert meta["backend"] == "torch_cuda" and meta["precision"] == "float32"


@pytest.mark.gpu
def test_graph_replay_computes_what_eager_computes():
    fn, _ = entry_callable(SMALL, device="cuda", seed=2)
    with torch.no_grad():
        eager = fn().clone()
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)


@pytest.mark.gpu
def test_graph_replay_and_eager_agree_where_launches_do_not_matter():
    # a large conv (~3.7 GFLOP) runs long enough that launch overhead is noise: both ways agree
    with get_profiler("cuda", "torch", protocol=QUICK, cuda_graphs=True) as g, \
            get_profiler("cuda", "torch", protocol=QUICK, cuda_graphs=False) as e:
        tg, te = g.time_entry(BIG), e.time_entry(BIG)
    assert 0.75 < tg.median_ms / te.median_ms < 1.25


@pytest.mark.gpu
def test_torch_cuda_measures_many_entries_and_whole_models(torch_prof, tmp_path):
    net, plain = _tiny("resnet20", width_mult=0.25, input_size=8)
    specs = net.layer_specs(net.full_config(), batch=1, input_size=8)
    got = dict((s.signature(), t) for s, t in torch_prof.measure_entries(specs))
    assert set(got) == {s.signature() for s in specs} and all(t.median_ms > 0 for t in got.values())
    path = torch_prof.write_model(plain, tmp_path / "m", input_size=8)
    t = torch_prof.time_onnx(path, (1, 3, 8, 8))
    assert 0 < t.median_ms < 100


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_cuda_half_precisions_and_channels_last(dtype):
    with get_profiler("cuda", "torch", dtype=dtype, channels_last=True, protocol=QUICK) as prof:
        t = prof.time_entry(SMALL)
        assert t.median_ms > 0 and prof.metadata()["channels_last"] is True


# -- TensorRT ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_trt_profiles_a_tiny_network_and_times_it_end_to_end(tmp_path, dtype):
    net, plain = _tiny("resnet20", width_mult=0.25, input_size=8)
    specs = net.layer_specs(net.full_config(), batch=1, input_size=8)
    with get_profiler("cuda", "trt", dtype=dtype, protocol=QUICK, e2e_protocol=QUICK, network_runs=5,
                      timing_cache=str(tmp_path / "cache")) as prof:
        per_spec, _ = prof.profile_network(specs)
        assert set(per_spec) == {s.name for s in specs}
        assert all(len(v) == 5 and min(v) >= 0 for v in per_spec.values())
        got = dict((s.signature(), t) for s, t in prof.measure_entries(specs, networks=[specs]))
        assert set(got) == {s.signature() for s in specs}
        path = export_onnx(plain, tmp_path / "m.onnx", input_size=8)
        t = prof.time_onnx(path, (1, 3, 8, 8))
        assert 0 < t.median_ms < 100
        assert prof.metadata()["precision_mode"] in ("fp32", "BuilderFlag.FP16", "strongly typed fp16 ONNX")
    assert (tmp_path / "cache").is_file()  # the shared timing cache was written
