import random

import pytest
import torch
from torch import nn

from hwslim.core.costs import model_costs
from hwslim.core.materialize import materialize
from hwslim.models import create_model, list_models
from hwslim.core.slimmable import PlainSE

SMALL = {name: 64 for name in list_models() if create_model(name).input_size == 224}  # 224 px models at 64 px


def _randomize_bn(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("name", list_models())
def test_materialized_matches_supernet_on_random_configs(name):
    net = create_model(name, input_size=SMALL.get(name)).eval()
    _randomize_bn(net)
    rng = random.Random(0)
    x = torch.randn(2, 3, net.input_size, net.input_size)
    for cfg in [net.min_config()] + [net.random_config(rng) for _ in range(2)]:
        plain = materialize(net, cfg).eval()
        folded = materialize(net, cfg, fold_bn=True)
        with torch.no_grad(), net.using(cfg):
            ref = net(x)
            assert torch.allclose(plain(x), ref, rtol=1e-4, atol=1e-5)
            assert torch.allclose(folded(x), ref, rtol=1e-3, atol=1e-4)
        # physically smaller: exactly the config's parameter count
        assert sum(p.numel() for p in plain.parameters()) == model_costs(net, cfg).params
        assert all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential, nn.ModuleDict, PlainSE,
                                  type(plain))) for m in plain.modules())


def test_materialized_weights_are_copies():
    net = create_model("resnet20")
    plain = materialize(net, net.uniform_config(6))
    w = plain.layers["stem"][0].weight
    assert w.shape == (8, 3, 3, 3)
    w.data.zero_()
    assert net.layers["stem"].conv.weight.abs().sum() > 0
