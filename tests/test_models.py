"""The zoo, checked against torchvision's own models (not copied numbers) where it has them."""
import random

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from hwslim.core.costs import model_costs
from hwslim.core.errors import ModelError
from hwslim.models import create_model, list_models
from fakes import randomize_bn


def torchvision_counts(name: str) -> tuple[int, int]:
    model = getattr(torchvision.models, name)(weights=None).eval()
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    return params, counter.get_total_flops() // 2  # conv + linear FLOPs = 2 * MACs


NEW_FAMILIES = ["mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121"]


@pytest.mark.parametrize("ours,theirs", [("mobilenet_v2", "mobilenet_v2"), ("resnet50", "resnet50"),
                                         ("mnasnet1_0", "mnasnet1_0")] + [(n, n) for n in NEW_FAMILIES])
def test_full_config_matches_torchvision(ours, theirs):
    net = create_model(ours, width_mult=1.0)
    costs = model_costs(net)
    assert (costs.params, costs.macs) == torchvision_counts(theirs)
    assert costs.params == sum(p.numel() for p in net.parameters())


def test_reference_numbers():
    expected = {"mobilenet_v2": (3_504_872, 300_774_272), "resnet50": (25_557_032, 4_089_184_256),
                "mnasnet1_0": (4_383_312, 314_415_872), "mobilenet_v3_large": (5_483_032, 216_589_760),
                "mobilenet_v3_small": (2_542_856, 56_510_400), "efficientnet_b0": (5_288_548, 385_814_752),
                "regnet_y_400mf": (4_344_144, 401_842_848), "densenet121": (7_978_856, 2_834_161_664)}
    for name, (params, macs) in expected.items():
        with torch.device("meta"):
            c = model_costs(create_model(name, width_mult=1.0))
        assert (c.params, c.macs) == (params, macs)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_outputs_equal_torchvisions_with_its_weights(name):
    """torchvision's model, random weights and BN statistics, copied in: the same logits."""
    from hwslim.importing.weights import copy_weights_in_order

    theirs = getattr(torchvision.models, name)(weights=None).eval()
    randomize_bn(theirs)
    ours = create_model(name, width_mult=1.0).eval()
    copy_weights_in_order(theirs, ours)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_mobilenet_v1_matches_paper():
    c = model_costs(create_model("mobilenet_v1", width_mult=1.0))
    assert 4.1e6 < c.params < 4.3e6  # paper: 4.2M
    assert 565e6 < c.macs < 572e6  # paper: 569M


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_its_extreme_and_random_configs(name):
    net = create_model(name, input_size=64 if create_model(name).input_size == 224 else None).eval()
    x = torch.randn(2, 3, net.input_size, net.input_size)
    for cfg in (net.full_config(), net.min_config(), net.random_config(random.Random(1))):
        with torch.no_grad(), net.using(cfg):
            assert net(x).shape == (2, net.num_classes)
    # stem input and classifier output are never slimmed
    specs = net.layer_specs(net.min_config())
    assert specs[0].cin == 3 and specs[-1].cout == net.num_classes
    assert all(unit.grid[-1] == unit.max_width and len(unit.grid) <= 12 for unit in net.units.values())


def test_units_tie_residuals_and_depthwise():
    net = create_model("mobilenet_v2", width_mult=1.0)
    nodes = {n.name: n for n in net.nodes}
    assert nodes["b2/project"].inputs[1] == "b1/project"  # second block of the 24-channel stage
    assert nodes["b2/project"].out == nodes["b1/project"].out == "s2"
    assert net.tensor_layout("b1/expand") == net.tensor_layout("b1/dw") == ("b1/hidden",)  # depthwise: tied
    assert len(net.units) == 25
    r50 = create_model("resnet50")
    assert len(r50.units) == 1 + 4 + 2 * 16


def test_width_multiplier_scales_units():
    assert create_model("mobilenet_v2").units["stem"].max_width == 48  # 1.5x default
    assert create_model("mobilenet_v2", width_mult=1.0).units["head"].max_width == 1280
    assert create_model("mobilenet_v2", width_mult=1.5).units["head"].max_width == 1920


def test_unknown_model_and_bad_multiplier():
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        create_model("vgg")
    with pytest.raises(ModelError, match="width multiplier"):
        create_model("resnet20", width_mult=-1)


def test_divisor_16_grid():
    net = create_model("mobilenet_v2", divisor=16)
    assert all(w % 16 == 0 for u in net.units.values() for w in u.grid[:-1])
