"""Fused Triton conv kernels and the graph runner, against PyTorch in float64.

Without a CUDA GPU these run through Triton's CPU interpreter: ``TRITON_INTERPRET=1``
must be set before the kernels are first imported, so it is set here, before any
``hwslim.kernels`` import (the interpreter is slow, hence the small shapes). The same
checks at full size run on a GPU (``@pytest.mark.gpu``).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from hwslim import kernels  # noqa: E402
from hwslim.core.graph import INPUT, run_graph  # noqa: E402
from hwslim.kernels import conv as K  # noqa: E402
from hwslim.models.registry import create_model  # noqa: E402
from hwslim.core.slimmable import recalibrate_bn  # noqa: E402
from hwslim.core.supernet import GraphBuilder, SlimmableNet  # noqa: E402
from fakes import randomize_bn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "output has NaN/inf (an element was not written?)"
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def reference(x, w, scale, shift, *, stride, cin, cout, act=None, residual=None, depthwise=False):
    """float64 PyTorch: F.conv2d on the sliced weight, BN scale/shift, residual, activation."""
    k = w.shape[2]
    xs = x[:, :cin].double()
    if depthwise:
        y = F.conv2d(xs, w[:cin].double(), None, stride, (k - 1) // 2, groups=cin)
    else:
        y = F.conv2d(xs, w[:cout, :cin].double(), None, stride, (k - 1) // 2)
    y = y * scale[:cout].double().view(1, -1, 1, 1) + shift[:cout].double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual[:, :cout].double()
    if act == "relu":
        y = y.clamp_min(0)
    elif act == "relu6":
        y = y.clamp(0, 6)
    return y


def layer(cin_max, cout_max, k, depthwise=False, device=DEVICE):
    w = torch.randn(cin_max if depthwise else cout_max, 1 if depthwise else cin_max, k, k, device=device)
    c = w.shape[0]
    return w, torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)


# -- the kernels -------------------------------------------------------------------------------
DENSE_CASES = [
    # k, stride, cin, cout, act, residual  (full widths are cin+5, cout+7: never the active ones,
    # except where the active width is the full one, marked by cout_max=None)
    (1, 1, 19, 37, "relu", True),
    (1, 1, 1, 1, None, False),
    (3, 1, 16, 33, "relu6", True),
    (3, 2, 5, 20, "relu6", False),
    (5, 2, 7, 9, "relu", False),
    (7, 2, 3, 8, None, False),
]


@pytest.mark.parametrize("k,stride,cin,cout,act,res", DENSE_CASES)
def test_dense_conv_matches_pytorch_fp32(k, stride, cin, cout, act, res):
    x = torch.randn(2, cin + 3, 9, 7, device=DEVICE)
    w, sc, sh = layer(cin + 5, cout + 7, k)
    oh, ow = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    r = torch.randn(2, cout, oh, ow, device=DEVICE) if res else None
    out = torch.full((2, cout, oh, ow), float("nan"), device=DEVICE)  # poisoned: every element must be written
    y = K.conv_bn_act(x, w, sc, sh, stride=stride, act=act, residual=r, cin=cin, cout=cout, out=out, tf32=False)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, reference(x, w, sc, sh, stride=stride, cin=cin, cout=cout, act=act, residual=r)) < 1e-4


@pytest.mark.parametrize("k,stride,c,act", [(3, 1, 13, "relu6"), (3, 2, 1, None), (5, 2, 40, "relu"),
                                            (3, 1, 24, None)])
def test_depthwise_conv_matches_pytorch_fp32(k, stride, c, act):
    full = 24 if c == 24 else c + 6  # 24: the active width is the full width
    x = torch.randn(2, full, 8, 9, device=DEVICE)
    w, sc, sh = layer(full, full, k, depthwise=True)
    y = K.conv_bn_act(x, w, sc, sh, stride=stride, act=act, depthwise=True, cin=c)
    assert y.shape[1] == c and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, reference(x, w, sc, sh, stride=stride, cin=c, cout=c, act=act, depthwise=True)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("depthwise", [False, True])
def test_half_precision_inputs(dtype, depthwise):
    x = torch.randn(2, 21, 7, 7, device=DEVICE).to(dtype)
    w, sc, sh = layer(21, 30, 3, depthwise=depthwise)
    r = torch.randn(2, 17, 7, 7, device=DEVICE).to(dtype)
    y = K.conv_bn_act(x, w, sc, sh, act="relu", residual=r, depthwise=depthwise, cin=17, cout=17)
    assert y.dtype == dtype
    assert rel_err(y, reference(x, w, sc, sh, stride=1, cin=17, cout=17, act="relu", residual=r,
                                depthwise=depthwise)) < 1e-2


def test_nchw_and_channels_last_inputs_agree():
    x = torch.randn(2, 12, 6, 6, device=DEVICE)
    w, sc, sh = layer(12, 16, 3)
    a = K.conv_bn_act(x, w, sc, sh, cout=10, tf32=False)
    b = K.conv_bn_act(x.contiguous(memory_format=torch.channels_last), w, sc, sh, cout=10, tf32=False)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_multi_config_slices_match_single_configs():
    """Three configs of one layer in one launch, with shared input slices and NaN padding."""
    batch, cmax_in, cmax_out = 2, 20, 28
    x = torch.randn(2 * batch, cmax_in, 7, 7, device=DEVICE)  # two input slices
    x[:batch, 11:] = float("nan")  # input slice 0 is only valid up to 11 channels: must never be read
    w, sc, sh = layer(cmax_in, cmax_out, 3)
    res = torch.randn(2 * batch, cmax_out, 7, 7, device=DEVICE)
    rows = [(11, 28, 0, 1, 0), (20, 5, 1, 0, 0), (7, 17, 0, 0, 0)]  # cin, cout, x_slice, res_slice, bn_row
    meta = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    y = K.conv_bn_act_multi(x, w, sc, sh, meta, batch=batch, cout_alloc=28, act="relu6", residual=res, tf32=False)
    assert y.shape == (3 * batch, 28, 7, 7)
    for s, (cin, cout, xs, rs, _) in enumerate(rows):
        ys = y[s * batch:(s + 1) * batch]
        ref = reference(x[xs * batch:(xs + 1) * batch], w, sc, sh, stride=1, cin=cin, cout=cout, act="relu6",
                        residual=res[rs * batch:(rs + 1) * batch])
        assert rel_err(ys[:, :cout], ref) < 1e-4
        assert (ys[:, cout:] == 0).all()  # zero padding up to cout_alloc


def test_multi_config_per_slice_bn_rows_depthwise():
    batch = 1
    x = torch.randn(batch, 16, 6, 6, device=DEVICE)
    w, _, _ = layer(16, 16, 3, depthwise=True)
    scale = torch.rand(2, 16, device=DEVICE) + 0.5
    shift = torch.randn(2, 16, device=DEVICE)
    meta = torch.tensor([[9, 9, 0, 0, 0], [16, 16, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    y = K.conv_bn_act_multi(x, w, scale, shift, meta, batch=batch, cout_alloc=16, stride=2, depthwise=True,
                            bn_per_slice=True)
    for s, c in enumerate((9, 16)):
        ref = reference(x, w, scale[s], shift[s], stride=2, cin=c, cout=c, depthwise=True)
        assert rel_err(y[s:s + 1, :c], ref) < 1e-4
    assert (y[0, 9:] == 0).all()


@pytest.mark.parametrize("stride,dtype", [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
def test_fused_depthwise_project_matches_two_kernels(stride, dtype):
    x = torch.randn(2, 40, 7, 7, device=DEVICE).to(dtype)
    wd, dsc, dsh = layer(40, 40, 3, depthwise=True)
    wp, sc, sh = layer(40, 30, 1)
    oh = (7 - 1) // stride + 1
    r = torch.randn(2, 19, oh, oh, device=DEVICE).to(dtype)
    y = K.dw_project_bn_act(x, wd, dsc, dsh, wp, sc, sh, stride=stride, dw_act="relu6", residual=r, cin=33,
                            cout=19, tf32=False)
    hidden = reference(x, wd, dsc, dsh, stride=stride, cin=33, cout=33, act="relu6", depthwise=True)
    ref = reference(hidden.to(dtype), wp, sc, sh, stride=1, cin=33, cout=19, residual=r)
    assert y.shape == (2, 19, oh, oh)
    assert rel_err(y, ref) < TOL[dtype]


def test_fused_depthwise_project_multi_config():
    """Two 1x1 slices read two depthwise slices, which read one shared input slice."""
    batch = 1
    x = torch.randn(batch, 24, 6, 6, device=DEVICE)
    wd, dsc, dsh = layer(24, 24, 3, depthwise=True)
    wp, sc, sh = layer(24, 16, 1)
    dmeta = torch.tensor([[24, 24, 0, 0, 0], [16, 16, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    meta = torch.tensor([[24, 16, 0, 0, 0], [16, 8, 1, 0, 0], [16, 16, 1, 0, 0]], dtype=torch.int32, device=DEVICE)
    y = K.dw_project_bn_act(x, wd, dsc, dsh, wp, sc, sh, meta=meta, dw_meta=dmeta, batch=batch, cout_alloc=16,
                            width_align=8, tf32=False)
    for s, (c, cout) in enumerate(((24, 16), (16, 8), (16, 16))):
        hidden = reference(x, wd, dsc, dsh, stride=1, cin=c, cout=c, act="relu6", depthwise=True)
        assert rel_err(y[s:s + 1, :cout], reference(hidden, wp, sc, sh, stride=1, cin=c, cout=cout)) < 1e-4
    assert (y[1, 8:] == 0).all()


def test_batch_statistics_bn_matches_train_mode_batch_norm():
    x = torch.randn(3, 10, 7, 7, device=DEVICE) * 2 + 3  # a mean far from zero tests the variance's precision
    w, _, _ = layer(10, 12, 3)
    gamma, beta = torch.rand(12, device=DEVICE) + 0.5, torch.randn(12, device=DEVICE)
    y, mean, var = K.conv_stats(x, w, cin=10, cout=12, tf32=False)
    raw = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert rel_err(mean[0], raw.mean((0, 2, 3))) < 1e-5
    assert rel_err(var[0], raw.var((0, 2, 3), unbiased=False)) < 1e-5
    bn = torch.nn.BatchNorm2d(12).to(DEVICE)
    bn.weight.data, bn.bias.data = gamma, beta
    K.bn_act_(y, *K.batch_bn_scale_shift(bn, mean, var), act="relu")
    ref = F.relu(F.batch_norm(raw, None, None, gamma.double(), beta.double(), True, 0.0, bn.eps))
    assert rel_err(y, ref) < 1e-4


def test_bad_widths_and_inputs_raise():
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    w, sc, sh = layer(8, 8, 3)
    with pytest.raises(ValueError, match="do not fit"):
        K.conv_bn_act(x, w, sc, sh, cin=9)
    with pytest.raises(ValueError, match="square"):
        K.conv_bn_act(x, w[:, :, :, :1], sc, sh)
    with pytest.raises(TypeError, match="float32"):
        K.conv_bn_act(x, w, sc.double(), sh.double())
    with pytest.raises(TypeError, match="dtype"):
        K.conv_bn_act(x.double(), w, sc, sh)
    meta = torch.tensor([[8, 8, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="width_align"):
        K.conv_bn_act_multi(x, w, sc, sh, meta, batch=1, cout_alloc=8, width_align=3)
    with pytest.raises(ValueError, match="width_align"):
        K.conv_bn_act_multi(x, w, sc, sh, meta, batch=1, cout_alloc=6, width_align=4)


# -- the runner --------------------------------------------------------------------------------
@pytest.fixture
def tiny_net():
    """``tiny_net(device)``: every node kind the zoo uses, at toy widths: convs 1x1/3x3/5x5, depthwise,
    residual, pool; non-trivial BN so folding is exercised."""
    def build(device=DEVICE) -> SlimmableNet:
        return randomize_bn(_tiny_graph_net().to(device), mean=0.5, var=(0.5, 2.0))

    return build


def _tiny_graph_net() -> SlimmableNet:
    g = GraphBuilder()
    a, b, c = g.unit("a", 24), g.unit("b", 40), g.unit("c", 16)
    x = g.conv("stem", INPUT, 3, a, 3, 2, act="relu6")
    h = g.conv("expand", x, a, b, 1, act="relu6")
    h = g.conv("dw", h, b, None, 3, 1, depthwise=True, act="relu6")
    x = g.conv("project", h, b, a, 1, act=None, residual=x)
    x = g.maxpool("pool", x, a, 3, 2, 1)
    x = g.conv("down", x, a, c, 5, 2, act="relu")
    x = g.gap("gap", x, c)
    g.linear("fc", x, c, 10)
    return SlimmableNet("tiny", g, width_mult=1.0, input_size=12, num_classes=10)


def float64_twin(net: SlimmableNet, make) -> SlimmableNet:
    twin = make("cpu")
    twin.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    return twin.double().eval()


def pytorch_logits(twin: SlimmableNet, cfg, x: torch.Tensor, train_bn: bool = False) -> torch.Tensor:
    twin.train(train_bn)
    with twin.using(cfg), torch.no_grad():
        return twin(x.double().cpu())


def test_triton_forward_matches_supernet_and_resumes(tiny_net):
    net = tiny_net()
    twin = float64_twin(net, tiny_net)
    cfg = net.config_of({"a": 16, "b": 32, "c": 8})
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    assert kernels.fusable_pairs(net.nodes) == {2}  # dw -> project
    y = kernels.triton_forward(net, x, cfg, tf32=False)
    assert y.dtype == torch.float32 and y.shape == (2, 10)
    assert rel_err(y.cpu(), pytorch_logits(twin, cfg, x)) < 1e-4
    assert rel_err(kernels.triton_forward(net, x, cfg, fuse=False, tf32=False).cpu(),
                   pytorch_logits(twin, cfg, x)) < 1e-4
    # resumable like run_graph: a prefix env from either runner resumes in the other
    assert kernels.fusable_pairs(net.nodes, 0, 3) == set()  # a pair split by stop is not fused
    env = kernels.triton_forward(net, x, cfg, stop=4, tf32=False)
    assert set(env) == {"project"}
    assert rel_err(kernels.triton_forward(net, None, cfg, start=4, env=env, tf32=False).cpu(),
                   pytorch_logits(twin, cfg, x)) < 1e-4
    with net.using(cfg), torch.no_grad():
        torch_env = run_graph(net.nodes, net._layer, x, stop=4)
    assert rel_err(kernels.triton_forward(net, None, cfg, start=4, env=torch_env, tf32=False).cpu(),
                   pytorch_logits(twin, cfg, x)) < 1e-4


def test_triton_forward_batch_bn_matches_train_mode(tiny_net):
    net = tiny_net()
    twin = float64_twin(net, tiny_net)
    cfg = net.min_config()
    x = torch.randn(3, 3, 12, 12, device=DEVICE)
    y = kernels.triton_forward(net, x, cfg, bn="batch", tf32=False)
    assert rel_err(y.cpu(), pytorch_logits(twin, cfg, x, train_bn=True)) < 1e-4


def greedy_candidates(net: SlimmableNet, current):
    """One grid step narrower per unit, as one greedy step scores them."""
    steps = {u: unit.narrower(current.widths[u]) for u, unit in net.units.items()}
    return [net.config_of({**current.widths, u: w}) for u, w in steps.items() if w is not None]


def test_multi_forward_runs_a_greedy_step_in_one_pass(tiny_net):
    net = tiny_net()
    twin = float64_twin(net, tiny_net)
    cands = greedy_candidates(net, net.full_config())
    plan = kernels.plan_multi(net, cands)
    # the stem is shared by the candidates that keep unit "a"; "a" itself diverges there
    assert plan.slices[0] == 2 and max(plan.slices) == len(cands)
    assert plan.work_fraction(net) < 1.0
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    logits = kernels.multi_forward(net, x, plan, tf32=False)  # fused depthwise+project (the unfused
    assert logits.shape == (len(cands), 2, 10)                 # multi path: the calibrate test's "batch")
    for k, cfg in enumerate(cands):
        assert rel_err(logits[k].cpu(), pytorch_logits(twin, cfg, x)) < 1e-4


def test_multi_calibrate_matches_recalibrate_bn(tiny_net):
    net = tiny_net()
    twin = float64_twin(net, tiny_net)
    cands = [net.config_of({"a": 8, "b": 40, "c": 16}), net.config_of({"a": 24, "b": 16, "c": 8})]
    chunks = [torch.randn(3, 3, 8, 8, device=DEVICE), torch.randn(2, 3, 8, 8, device=DEVICE)]
    mbn = kernels.multi_calibrate(net, chunks, cands, tf32=False)
    assert mbn.batches == 2
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    logits = kernels.multi_forward(net, x, cands, bn=mbn, tf32=False)
    batch_logits = kernels.multi_forward(net, x, cands, bn="batch", tf32=False)
    for k, cfg in enumerate(cands):
        with twin.using(cfg):
            recalibrate_bn(twin, [c.double().cpu() for c in chunks])
        assert rel_err(logits[k].cpu(), pytorch_logits(twin, cfg, x)) < 1e-4
        assert rel_err(batch_logits[k].cpu(), pytorch_logits(twin, cfg, x, train_bn=True)) < 1e-4


def test_step_logits_recal_matches_recalibrated_supernet(tiny_net):
    net = tiny_net()
    twin = float64_twin(net, tiny_net)
    cands = greedy_candidates(net, net.full_config())[:2]
    chunks = [torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(3, 3, 8, 8, device=DEVICE)]
    outs = kernels.step_logits(net, chunks, cands, bn="recal", tf32=False)
    assert [tuple(o.shape) for o in outs] == [(2, 2, 10), (2, 3, 10)]
    for k, cfg in enumerate(cands):
        with twin.using(cfg):
            recalibrate_bn(twin, [c.double().cpu() for c in chunks])
        assert rel_err(outs[1][k].cpu(), pytorch_logits(twin, cfg, chunks[1])) < 1e-4
    with pytest.raises(ValueError, match="bn must be"):
        kernels.step_logits(net, chunks, cands, bn="eval")


def test_folded_bn_cache_follows_buffer_updates(tiny_net):
    net = tiny_net()
    before = kernels.folded_bn(net)["stem"][1].clone()
    with torch.no_grad():
        net.layers["stem"].bn.running_mean.add_(1.0)
    after = kernels.folded_bn(net)["stem"][1]
    assert not torch.allclose(before, after)


def test_supports_and_device_checks(tiny_net):
    assert kernels.supports(tiny_net())
    g = GraphBuilder()
    a = g.unit("a", 8)
    x = g.conv("stem", INPUT, 3, a, 3)
    g.conv("grouped", x, a, None, 3, group_width=2)
    grouped = SlimmableNet("grouped", g, width_mult=1.0, input_size=8, num_classes=8)
    assert not kernels.supports(grouped)
    assert kernels.unsupported(grouped) == "node 'grouped' (conv)"
    assert not kernels.supports(torch.nn.Conv2d(3, 3, 1))
    if not kernels.interpreting():
        with pytest.raises(kernels.KernelUnavailableError, match="CUDA"):
            kernels.check_device("cpu")
    with pytest.raises(ValueError, match="bn must be"):
        kernels.triton_forward(tiny_net(), torch.randn(1, 3, 12, 12, device=DEVICE), bn="eval")


def test_single_config_runner_falls_back_to_pytorch_for_nodes_it_cannot_compute():
    """SE and a grouped conv have no kernel: triton_forward runs them with PyTorch, the rest fused."""
    g = GraphBuilder()
    a, b, r = g.unit("a", 16), g.unit("b", 32, quantum=8), g.unit("r", 8)
    x = g.conv("stem", INPUT, 3, a, 3, 2, act="relu")
    h = g.conv("expand", x, a, b, 1, act="relu")
    h = g.conv("group", h, b, None, 3, group_width=8, act="relu")
    h = g.se("se", h, r, act="relu", gate="hardsigmoid")
    x = g.conv("project", h, b, a, 1, act=None, residual=x)
    g.linear("fc", g.gap("gap", x, a), a, 10)
    net = SlimmableNet("se_net", g, width_mult=1.0, input_size=12, num_classes=10).to(DEVICE).eval()
    assert kernels.unsupported(net) == "node 'group' (conv)"  # the first node without a kernel
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    cfg = net.config_of({"a": 8, "b": 16, "r": 8})
    with torch.no_grad(), net.using(cfg):
        want = net(x)
    got = kernels.triton_forward(net, x, cfg)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4)


# -- full size, on a GPU ---------------------------------------------------------------------------
MBV2_LAYERS = [  # MobileNetV2 1.5x at 224: (name, k, stride, cin, cout, h, depthwise)
    ("stem", 3, 2, 3, 48, 224, False), ("b1/expand", 1, 1, 24, 144, 112, False),
    ("b1/dw", 3, 2, 144, 144, 112, True), ("b3/dw", 3, 1, 216, 216, 56, True),
    ("b7/expand", 1, 1, 96, 576, 14, False), ("b8/project", 1, 1, 576, 96, 14, False),
    ("head", 1, 1, 480, 1920, 7, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,k,stride,cin,cout,h,dw", MBV2_LAYERS)
def test_full_size_layers_on_gpu(name, k, stride, cin, cout, h, dw, dtype):
    x = torch.randn(8, cin, h, h, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    w, sc, sh = layer(cin, cout, k, depthwise=dw, device="cuda")
    for c_in, c_out in ((cin, cout), (max(1, cin * 7 // 12), max(1, cout * 5 // 12))):
        c_out = c_in if dw else c_out
        y = K.conv_bn_act(x, w, sc, sh, stride=stride, act="relu6", depthwise=dw, cin=c_in, cout=c_out,
                          tf32=False)
        ref = reference(x, w, sc, sh, stride=stride, cin=c_in, cout=c_out, act="relu6", depthwise=dw)
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_greedy_step_on_gpu(dtype):
    net = create_model("mobilenet_v2").cuda().eval()
    twin = copy.deepcopy(net).double()
    cands = greedy_candidates(net, net.uniform_config(9))
    x = torch.randn(4, 3, 224, 224, device="cuda")
    logits = kernels.multi_forward(net, x.to(dtype), cands, tf32=False)
    for k in random.Random(0).sample(range(len(cands)), 5):
        with twin.using(cands[k]), torch.no_grad():
            ref = twin(x.double())
        assert rel_err(logits[k], ref) < TOL[dtype] * 5  # 50 layers of bf16 rounding compound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,cout,h,stride", [(216, 48, 56, 1), (216, 48, 56, 2), (1440, 240, 7, 1)])
def test_full_size_fused_depthwise_project_on_gpu(hidden, cout, h, stride, dtype):
    x = torch.randn(8, hidden, h, h, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    wd, dsc, dsh = layer(hidden, hidden, 3, depthwise=True, device="cuda")
    wp, sc, sh = layer(hidden, cout, 1, device="cuda")
    c, co = hidden * 2 // 3 // 8 * 8, cout * 2 // 3 // 8 * 8
    y = K.dw_project_bn_act(x, wd, dsc, dsh, wp, sc, sh, stride=stride, cin=c, cout=co, tf32=False)
    hid = reference(x, wd, dsc, dsh, stride=stride, cin=c, cout=c, act="relu6", depthwise=True)
    assert rel_err(y, reference(hid.to(dtype), wp, sc, sh, stride=1, cin=c, cout=co)) < TOL[dtype]


def test_search_evaluator_with_triton_kernels_matches_torch():
    """The search's StepEvaluator gives the same scores through the kernels as through PyTorch."""
    from hwslim.search.evaluator import StepEvaluator
    from hwslim.core.graph import INPUT as _IN

    torch.manual_seed(0)
    g = GraphBuilder()
    a, b = g.unit("a", 16), g.unit("b", 16)
    x = g.conv("stem", _IN, 3, a, 3, 1)
    h = g.conv("c1", x, a, b, 3, 1)
    x = g.conv("c2", h, b, a, 1, act="relu", residual=x)
    x = g.gap("pool", x, a)
    g.linear("fc", x, a, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = SlimmableNet("tiny", g, width_mult=1.0, input_size=6, num_classes=4).to(device)
    x, y = torch.randn(8, 3, 6, 6, device=device), torch.randint(0, 4, (8,), device=device)
    cfg = net.full_config()
    cands = [(u, cfg.replace(**{u: 8})) for u in ("a", "b")]
    for bn in ("recal", "batch"):
        ref = StepEvaluator(net, x, y, bn=bn, batch_size=4).score_candidates(cfg, cands)
        tri = StepEvaluator(net, x, y, bn=bn, batch_size=4, kernels="triton").score_candidates(cfg, cands)
        assert [s.acc for s in tri] == [s.acc for s in ref]
        assert max(abs(a.loss - b.loss) for a, b in zip(tri, ref)) < 1e-4
