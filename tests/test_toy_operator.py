"""A new operator is one class in one file (tests/toys/toy_op.py): registering it makes the importer,
costs, the supernet, materialization, ONNX and the designed networks work with no other change."""
from __future__ import annotations

import importlib
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hwslim.core.costs import model_costs
from hwslim.core.materialize import materialize
from hwslim.core.ops import OPS
from hwslim.importing.fx_trace import import_model


@pytest.fixture(scope="module")
def toy():
    """The toy file, imported (which registers its operator) for these tests only: the registry
    holds hwslim's own operators again afterwards (test_ops.py checks it is exactly those)."""
    mod = importlib.reload(sys.modules["toys.toy_op"]) if "toys.toy_op" in sys.modules else \
        importlib.import_module("toys.toy_op")
    yield mod
    OPS.pop(mod.ChannelScale.kind)


class ScaledNet(nn.Module):
    def __init__(self, toy) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.scale = toy.ScaleModule(16)
        self.conv = nn.Conv2d(16, 24, 3, 2, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.conv(self.scale(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _imported(toy):
    torch.manual_seed(0)
    theirs = ScaledNet(toy).eval()
    with torch.no_grad():
        theirs.scale.weight.uniform_(0.5, 1.5)
    return theirs, import_model(theirs, torch.randn(1, 3, 16, 16), name="scaled")


def test_toy_operator_imports_with_its_weights(toy):
    theirs, net = _imported(toy)
    assert [n.op.kind for n in net.nodes] == ["conv", "toy_scale", "conv", "gap", "flatten", "linear"]
    assert list(net.units) == ["stem/0", "conv"]  # the scale follows its input's unit
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_toy_operator_costs_supernet_materialized_and_onnx(toy, tmp_path):
    import onnx
    import onnxruntime as ort

    from hwslim.core.onnx_build import network_model
    from hwslim.runtimes.onnx_file import export_onnx

    _, net = _imported(toy)
    cfg = net.config_of({"stem/0": 8, "conv": 16})
    plain = materialize(net, cfg).eval()
    assert model_costs(net, cfg).params == sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), net.using(cfg):
        want = net(x)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-6)
    path = export_onnx(plain, tmp_path / "m.onnx", batch=2, input_size=16)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
    model = network_model(net.layer_specs(net.random_config(random.Random(0))))  # a profiler's designed network
    onnx.checker.check_model(model, full_check=True)
    (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ones((1, 3, 16, 16), np.float32)})
    assert out.shape == (1, 10)
