"""Every operator: costs, supernet vs materialized, BN folding, ONNX, memory, the fast evaluator, JSON."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hwslim.core.costs import activation_trace, model_costs
from hwslim.search.evaluator import StepEvaluator, mixing_start
from hwslim.runtimes.onnx_file import export_onnx
from hwslim.core.graph import INPUT, layer_spec
from hwslim.core.materialize import materialize
from hwslim.core.ops import (OPS, Attention, ChannelPart, Conv, ConvTranspose, GroupNorm, Linear, MaxPool, Mul, PReLU,
                             Resize, Scale, SqueezeExcite, Unflatten)
from hwslim.core.supernet import GraphBuilder, SlimmableNet
from fakes import randomize_bn


def every_op_net(input_size: int = 16) -> SlimmableNet:
    """A small network using every registered operator (and a conv without BN, with a bias)."""
    g = GraphBuilder()
    a, b, r = g.unit("a", 16, quantum=4), g.unit("b", 32, quantum=8), g.unit("r", 8)
    c, d = g.unit("c", 16), g.unit("d", 24)
    h0 = g.conv("stem", INPUT, 3, a, 3, 2, act="hardswish")
    h = g.conv("expand", h0, a, b, 1, act="silu")
    h = g.conv("group", h, b, None, 3, group_width=8, act="relu6")
    h = g.se("se", h, r, act="relu", gate="hardsigmoid")
    h = g.conv("project", h, b, a, 1, act=None)
    x = g.add("add", h, h0, act="relu")
    # resampling, dilated and 1xk windows, normalizations with weights, a gate built from Linear layers
    u = g.node("up", Resize(2), x)
    u = g.node("wide", Conv((1, 3), 1, (0, 2), act="elu", dilation=(1, 2)), u, out=a)
    u = g.node("dmp", MaxPool(2, 2, 1, dilation=2), u)
    u = g.node("gn", GroupNorm(4), g.node("prelu", PReLU(), u))
    u = g.avgpool("down", g.node("bilinear", Resize((2, 2), "bilinear", align_corners=True), u), 2, 2)
    gate = g.node("sfc1", Linear("relu", bias=False), g.bn("bn1d", g.gap("sgap", u)), out=r)
    gate = g.node("sfc2", Linear("sigmoid", bias=False), gate, out=a)
    u = g.node("gate", Mul(), u, g.node("unflat", Unflatten(), gate))
    x = g.add("add2", x, g.node("scaled", Scale(0.5, 0.1), u), act="leaky_relu0.1")
    # a learned upsampling (YOLOv8-seg's prototypes), pooled back and added
    x = g.add("add3", x, g.maxpool("deconv_pool", g.node("deconv", ConvTranspose(2, 2, act="relu"), x, out=a), a, 2, 2))
    side = g.conv("side", x, a, c, 3, act=None, bn=False, bias=True)
    side = g.act("side_act", side, "gelu")
    x = g.concat("cat", x, side)  # channels: a then c
    x = g.bn("bn", x, act="sigmoid")
    x = g.conv("mix", x, None, d, 1, act="relu")  # reads the concatenation
    # a conv's output in two equal parts (C2f's chunk): the unit r slims in pairs
    halves = g.node("halves", Conv(1, act="silu", parts=2), x, out=r)
    halfsum = g.add("halfsum", g.node("half0", ChannelPart(0), halves), g.node("half1", ChannelPart(1), halves))
    x = g.conv("unhalve", halfsum, r, d, 1, act="relu", residual=x)
    # ShuffleNetV2's bookkeeping on fixed channels: slices (views), a shuffle, and an in-place
    # activation on a slice while the tensor it is a view of is still read later
    f = g.conv("fixed", x, d, 16, 1, act=None)
    f = g.node("attn", Attention(num_heads=2, key_dim=4), f)  # YOLO11's C2PSA attention: fixed width
    lo, hi = g.channel_slice("lo", f, 0, 8), g.channel_slice("hi", f, 8, 16)
    hi = g.act("hi_act", hi, "hardswish")
    f = g.shuffle("shuffle", g.concat("cat2", lo, hi, f), 4)
    x = g.conv("unfix", f, 32, d, 1, act="relu", residual=x)
    x = g.maxpool("mp", x, d, 3, 2, 1)
    x = g.avgpool("ap", x, 2, 2)
    x = g.gap("gap", x, d, flatten=False)
    x = g.flatten("flat", x)
    x = g.dropout("drop", x, 0.1)
    g.linear("fc", x, d, 10)
    net = SlimmableNet("every_op", g, width_mult=1.0, input_size=input_size, num_classes=10)
    return randomize_bn(net, mean=0.5, var=(0.5, 2.0))  # non-trivial BN statistics: slicing and folding exercised


def test_every_registered_operator_is_in_the_test_network():
    assert {n.op.kind for n in every_op_net().nodes} == set(OPS)


def test_sorting_channels_keeps_every_operators_function():
    from hwslim.importing.importance import sort_channels

    net = every_op_net()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = net(x)
    perms = sort_channels(net)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)


def test_in_place_ops_never_write_into_a_tensor_still_read():
    """Without autograd, ops write into dying inputs; a channel slice is a view at an offset of a
    tensor read later, so the result must equal the out-of-place run (autograd on)."""
    net = every_op_net()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fast = net(x)
    torch.testing.assert_close(fast, net(x).detach(), rtol=0, atol=0)


def test_shuffle_and_slice_move_fixed_channels():
    from hwslim.core.ops import ChannelShuffle, ChannelSlice, Slice

    x = torch.arange(6.0).view(1, 6, 1, 1)
    y = ChannelShuffle(2).run(None, [x], Slice())
    assert y.flatten().tolist() == [0, 3, 1, 4, 2, 5]  # the two groups interleaved
    assert ChannelSlice(2, 5).run(None, [x], Slice()).flatten().tolist() == [2, 3, 4]
    g = GraphBuilder()
    a = g.unit("a", 8)
    h = g.conv("c", INPUT, 3, a, 1)
    with pytest.raises(ValueError, match="shuffle moves channels to other positions.*unit\\(s\\) 'a'"):
        g.shuffle("s", h, 2)
    with pytest.raises(ValueError, match="channels 4..9 of a tensor of 8"):
        g.channel_slice("s", g.conv("f", h, a, 8, 1), 4, 10)


def test_operator_costs_by_hand():
    se = layer_spec("se", SqueezeExcite("relu", "sigmoid"), 32, 8, mid=8)
    assert (se.op.macs(se), se.op.params(se)) == (2 * 32 * 8, 2 * 32 * 8 + 8 + 32)
    g = layer_spec("g", Conv(3, 1, 1, group_width=8), 32, 8)  # 4 groups of 8
    assert g.groups == 4 and g.op.macs(g) == 32 * 8 * 9 * 64 and g.op.params(g) == 32 * 8 * 9 + 2 * 32
    plain = layer_spec("p", Conv(1, bn=False, bias=True), 16, 4, out=24)
    assert plain.op.params(plain) == 16 * 24 + 24


def test_group_width_sets_the_grid_and_the_group_count():
    net = every_op_net()
    assert net.units["b"].grid == (8, 16, 24, 32)
    specs = {s.name: s for s in net.layer_specs(net.config_of({**net.full_config().widths, "b": 16}))}
    assert specs["group"].groups == 2 and specs["group"].cin == specs["group"].cout == 16


def test_concatenation_reader_keeps_each_parts_kept_channels():
    net = every_op_net()
    cfg = net.config_of({**net.full_config().widths, "a": 8, "c": 8})
    mix = next(s for s in net.layer_specs(cfg) if s.name == "mix")
    assert mix.cin == 16 and mix.in_parts == ((0, 8), (16, 8))  # a's first 8, then c's first 8 (c starts at 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_materialized_equals_supernet_and_folding_keeps_the_function(seed):
    net = every_op_net()
    rng = random.Random(seed)
    x = torch.randn(3, 3, 16, 16)
    for cfg in (net.full_config(), net.min_config(), net.random_config(rng)):
        with torch.no_grad(), net.using(cfg):
            want = net(x)
        with torch.no_grad():
            got = materialize(net, cfg).eval()(x)
            folded = materialize(net, cfg, fold_bn=True)(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(folded, want, rtol=1e-4, atol=1e-5)


def test_costs_of_the_materialized_network_match_its_modules():
    net = every_op_net()
    cfg = net.random_config(random.Random(3))
    plain = materialize(net, cfg)
    n_params = sum(p.numel() for p in plain.parameters())
    assert model_costs(net, cfg).params == n_params


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort

    net = every_op_net()
    cfg = net.random_config(random.Random(4))
    plain = materialize(net, cfg, fold_bn=True).eval()
    path = export_onnx(plain, tmp_path / "m.onnx", batch=2, input_size=16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = plain(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_designed_network_of_every_operator_runs_in_onnx_runtime():
    import onnx
    import onnxruntime as ort

    from hwslim.core.onnx_build import network_model

    net = every_op_net()
    specs = net.layer_specs(net.random_config(random.Random(5)))
    model = network_model(specs)
    onnx.checker.check_model(model, full_check=True)
    (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ones((1, 3, 16, 16), np.float32)})
    assert out.shape == (1, 10)


def test_activation_memory_of_views_and_in_place_ops():
    net = every_op_net()
    specs = net.layer_specs(net.full_config())
    trace = dict(zip((s.name for s in specs), activation_trace(specs)))
    by = {s.name: s for s in specs}
    # flatten and inference dropout are views: no new bytes; SE scales its input in place
    assert trace["flat"] == trace["drop"]
    assert trace["se"] == trace["group"] - 4 * by["expand"].out_elements  # expand died, se wrote into group's output
    # channel slices are views; the activation on one is not in place, since the tensor it views lives on
    assert trace["lo"] == trace["hi"] == trace["fixed"]
    assert trace["hi_act"] == trace["hi"] + 4 * by["hi_act"].out_elements


def test_fast_evaluator_agrees_with_reference_across_every_operator():
    net = every_op_net()
    assert mixing_start(net, "r") == [n.name for n in net.nodes].index("se")  # SE's reduce width starts at SE
    assert mixing_start(net, "c") == [n.name for n in net.nodes].index("mix")  # concat and BN are channel-wise
    torch.manual_seed(0)
    images, labels = torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,))
    current = net.full_config()
    cands = [(u, current.replace(**{u: unit.narrower(unit.max_width)})) for u, unit in net.units.items()
             if unit.narrower(unit.max_width) is not None]
    fast = StepEvaluator(net, images, labels, mode="fast", batch_size=16).score_candidates(current, cands)
    ref = StepEvaluator(net, images, labels, mode="reference", batch_size=16).score_candidates(current, cands)
    for f, r in zip(fast, ref):
        assert f.acc == pytest.approx(r.acc) and f.loss == pytest.approx(r.loss, rel=1e-4, abs=1e-5)


def test_fast_evaluator_scores_wider_and_several_unit_candidates_as_the_reference():
    """The budget filling's candidates (wider), candidates changing several units, and the current
    config itself, from a config in the middle of every grid: the envelope prefix is exact."""
    net = every_op_net()
    torch.manual_seed(1)
    images, labels = torch.randn(40, 3, 16, 16), torch.randint(0, 10, (40,))
    mid = net.config_of({u: unit.grid[(len(unit.grid) - 1) // 2] for u, unit in net.units.items()})
    wider = [(u, mid.replace(**{u: unit.grid[-1]})) for u, unit in net.units.items() if mid.widths[u] < unit.max_width]
    narrower = [(u, mid.replace(**{u: unit.grid[0]})) for u, unit in net.units.items() if mid.widths[u] > unit.grid[0]]
    units = list(net.units)
    several = [("two", mid.replace(**{units[0]: net.units[units[0]].max_width, units[-1]: net.units[units[-1]].grid[0]}))]
    cands = [*wider, *narrower, *several, ("current", mid)]
    assert len(wider) == sum(len(unit.grid) > 1 for unit in net.units.values()) == 4 and len(narrower) >= 2
    for bn, calib in (("recal", None), ("recal", 12), ("batch", None)):
        fast_ev = StepEvaluator(net, images, labels, mode="fast", batch_size=16, bn=bn, calib_images=calib)
        ref = StepEvaluator(net, images, labels, mode="reference", batch_size=16, bn=bn,
                            calib_images=calib).score_candidates(mid, cands)
        fast = fast_ev.score_candidates(mid, cands)
        for (name, _), f, r in zip(cands, fast, ref):
            assert f.acc == pytest.approx(r.acc), (bn, name)
            assert f.loss == pytest.approx(r.loss, rel=1e-4, abs=1e-5), (bn, name)
        whole = fast_ev.score(mid)  # the current config, scored alone
        assert fast[-1].acc == whole.acc and fast[-1].loss == pytest.approx(whole.loss, rel=1e-5)


def test_graph_json_round_trip_rebuilds_the_same_network():
    import json

    net = every_op_net()
    data = json.loads(json.dumps(net.graph_dict()))
    again = SlimmableNet.from_graph(data)
    again.load_state_dict(net.state_dict())
    again.eval()
    x = torch.randn(2, 3, 16, 16)
    cfg = net.random_config(random.Random(6))
    with torch.no_grad(), net.using(cfg), again.using(cfg):
        torch.testing.assert_close(again(x), net(x))
    assert {u: unit.grid for u, unit in again.units.items()} == {u: unit.grid for u, unit in net.units.items()}


def test_bad_graphs_are_refused_with_the_node_named():
    g = GraphBuilder()
    a, b = g.unit("a", 8), g.unit("b", 8)
    x = g.conv("x", INPUT, 3, a, 3)
    y = g.conv("y", INPUT, 3, b, 3)
    with pytest.raises(ValueError, match="sum: cannot combine channels of units"):
        g.add("sum", x, y)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        g.act("z", x, "swish")


def test_flatten_of_a_spatial_map_keeps_each_channels_positions(tmp_path):
    """VGG/AlexNet: a 4x4 map flattened channel-major into a linear layer; slimming the map's unit
    keeps 16 features per kept channel, in the fast evaluator, materialized and in ONNX."""
    import onnxruntime as ort

    g = GraphBuilder()
    a, h = g.unit("a", 16), g.unit("h", 32)
    x = g.conv("stem", INPUT, 3, a, 3, 2, act="relu")
    x = g.linear("fc1", g.dropout("drop", g.flatten("flat", x), 0.5), None, h, act="relu")
    g.linear("fc2", x, h, 10)
    net = SlimmableNet("flat_net", g, width_mult=1.0, input_size=8, num_classes=10).eval()
    assert net.layers["fc1"].in_features == 16 * 16
    cfg = net.config_of({"a": 8, "h": 16})
    spec = {s.name: s for s in net.layer_specs(cfg)}["fc1"]
    assert spec.cin == 8 * 16 and spec.op.macs(spec) == 8 * 16 * 16
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), net.using(cfg):
        want = net(x)
    plain = materialize(net, cfg, fold_bn=True).eval()
    torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)
    path = export_onnx(plain, tmp_path / "f.onnx", batch=4, input_size=8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    cands = [("a", net.full_config().replace(a=8))]
    fast = StepEvaluator(net, images, labels, mode="fast", batch_size=16).score_candidates(net.full_config(), cands)
    ref = StepEvaluator(net, images, labels, mode="reference", batch_size=16).score_candidates(net.full_config(), cands)
    assert fast[0].loss == pytest.approx(ref[0].loss, rel=1e-4)


def test_windows_resampling_and_weighted_norms_costs_and_table_keys_by_hand():
    """A 1x5 dilated conv counts 5 taps; its key keeps the height's columns and says the rest in
    ``extra``; a square undilated conv's JSON and key are as before (stored graphs and tables)."""
    wide = layer_spec("w", Conv((1, 5), 1, (0, 4), dilation=(1, 2)), 8, 16, out=4)
    assert (wide.out_h, wide.out_w) == (16, 16) and wide.op.macs(wide) == 4 * 8 * 5 * 256
    assert wide.signature()[1:4] == (1, 1, 0) and wide.signature()[-1] == "k=1x5;p=0x4;d=1x2"
    assert Conv(3, 1, 1).to_dict() == {"kind": "conv", "kernel": 3, "stride": 1, "padding": 1, "group_width": None,
                                       "act": None, "bn": True, "bias": False, "eps": 1e-5}
    assert Conv((3, 3), (1, 1), [1, 1]) == Conv(3, 1, 1) and layer_spec("c", Conv(3, 1, 1), 8, 8, out=8).signature() \
        == ("conv", 3, 1, 1, 1, 8, 8, 8, 8, "none", False, 1, "")
    up = layer_spec("u", Resize((2, 4), "bilinear"), 8, 6)
    assert (up.out_h, up.out_w) == (12, 24) and up.op.macs(up) == 0 and up.signature()[-1] == "bilinear;s=2x4"
    gn = layer_spec("g", GroupNorm(4), 16, 8)
    assert gn.groups == 4 and gn.op.params(gn) == 32 and gn.op.quantum == 4
    assert PReLU().params(layer_spec("p", PReLU(), 16, 8)) == 16 and PReLU(shared=True).params(gn) == 1
    lin = layer_spec("l", Linear(bias=False), 16, 1, out=10, flat=True)
    assert lin.op.params(lin) == 160 and "bias" not in Linear().to_dict()
    assert Linear(bias=False).to_dict()["bias"] is False
    assert MaxPool(2, 2, 1, dilation=2).out_hw([(16, 16)]) == (8, 8) and "dilation" not in MaxPool(2, 2).to_dict()
