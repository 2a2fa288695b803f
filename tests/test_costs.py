import random

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hwslim.core.costs import activation_trace, macs, model_costs, params, peak_activation_bytes
from hwslim.core.graph import INPUT, layer_specs
from hwslim.core.materialize import materialize
from hwslim.models import create_model, list_models
from hwslim.core.supernet import GraphBuilder


def test_hand_computed_costs():
    # input 1x3x8x8 -> conv3x3 s1 to 4ch (+BN, relu) -> dw3x3 -> conv1x1 to 4ch + residual -> gap -> fc 10
    g = GraphBuilder()
    a = g.conv("a", INPUT, 3, 4, 3)
    b = g.conv("b", a, 4, None, 3, depthwise=True)
    c = g.conv("c", b, 4, 4, 1, act=None, residual=a)
    g.linear("fc", g.gap("p", c), 4, 10)
    specs = layer_specs(g.nodes, {}, 8)
    assert macs(specs) == 4 * 3 * 9 * 64 + 4 * 1 * 9 * 64 + 4 * 4 * 64 + 40
    assert params(specs) == (108 + 8) + (36 + 8) + (16 + 8) + 50
    # bytes alive: input 768 B; a: +1024; b: input+a+b; c: input+a+b+c (a is c's residual); then b and a freed
    assert activation_trace(specs) == [768 + 1024, 768 + 2048, 768 + 3072, 768 + 1024 + 16, 768 + 16 + 40]
    assert peak_activation_bytes(specs) == 768 + 3072
    assert peak_activation_bytes(specs, "float16") == (768 + 3072) // 2


def test_costs_scale_with_batch_but_params_do_not():
    net = create_model("resnet20")
    one, four = model_costs(net, batch=1), model_costs(net, batch=4)
    assert four.macs == 4 * one.macs and four.params == one.params
    assert four.peak_activation_bytes == 4 * one.peak_activation_bytes


def test_costs_shrink_with_width():
    net = create_model("mobilenet_v2")
    full, half, low = (model_costs(net, c) for c in (net.full_config(), net.uniform_config(6), net.min_config()))
    assert full.macs > half.macs > low.macs and full.params > half.params > low.params
    assert full.peak_activation_bytes > half.peak_activation_bytes > low.peak_activation_bytes


def measured_peak_bytes(net, x) -> int:
    """Peak activation bytes of one inference, from torch profiler's memory events (CPU)."""
    with torch.inference_mode():
        net(x)  # warm-up: one-time allocations stay out of the measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            net(x)
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak + x.numel() * x.element_size()  # the caller-owned input is alive throughout


@pytest.mark.parametrize("name", list_models())
def test_peak_activation_memory_matches_measurement(name):
    net = create_model(name).eval()
    rng = random.Random(0)
    for cfg in (net.full_config(), net.random_config(rng), net.random_config(rng)):
        plain = materialize(net, cfg, fold_bn=True)
        x = torch.randn(1, 3, net.input_size, net.input_size)
        predicted = model_costs(net, cfg).peak_activation_bytes
        measured = measured_peak_bytes(plain, x)
        assert abs(measured - predicted) <= 0.10 * predicted, (name, cfg.widths, predicted, measured)
