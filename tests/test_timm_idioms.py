"""timm's idioms, written out by hand (no timm needed): MixNet's split of a concatenation along
its own parts, ReXNet's partial residual; and timm's models themselves when timm is installed."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from torch import nn

from fakes import check_random_configs, randomize_bn
from hwslim.core.costs import model_costs
from hwslim.core.materialize import materialize
from hwslim.importing.fx_trace import ImportRefused, import_model


def _conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class MixedPw(nn.Module):
    """MixNet's block (timm ``MixedConv2d``): a 1x1 conv in two groups, concatenated; the next
    mixed conv splits that concatenation along the same two parts, one kernel size each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.pw = nn.ModuleList([_conv_bn(4, 12), _conv_bn(4, 12)])
        self.dw = nn.ModuleList([_conv_bn(12, 12, 3, groups=12), _conv_bn(12, 12, 5, groups=12)])
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [4, 4], 1)
        y = torch.cat([self.pw[0](a), self.pw[1](b)], 1)
        y = torch.cat([c(p) for c, p in zip(self.dw, torch.split(y, [12, 12], 1))], 1)
        return self.head(y.mean((2, 3)))


class PartialResidual(nn.Module):
    """ReXNet's block: the shortcut is added to the first channels of a wider output only,
    ``cat([x[:, :cin] + shortcut, x[:, cin:]])``; twice, so the second adds a tensor in parts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.b1, self.b2 = _conv_bn(8, 12, 3), _conv_bn(12, 16, 3)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        for block, c in ((self.b1, 8), (self.b2, 12)):  # its input's width, a number (timm: in_channels)
            y = block(x)
            x = torch.cat([y[:, 0:c] + x, y[:, c:]], dim=1)
        return self.head(x.mean((2, 3)))


def _parity(theirs: nn.Module, net, x: torch.Tensor, tmp_path) -> None:
    """Full width equals the original, parameters too; at random configs the materialized network
    and its ONNX Runtime run equal the supernet."""
    with torch.no_grad():
        want = theirs(x)
        assert (net(x) - want).abs().max() <= 1e-5 * want.abs().max()
    assert model_costs(net, net.full_config()).params == sum(p.numel() for p in theirs.parameters())
    check_random_configs(net, x, tmp_path)


def test_a_split_of_a_concatenation_along_its_parts_slims(tmp_path):
    torch.manual_seed(0)
    theirs = randomize_bn(MixedPw()).eval()
    x = torch.randn(2, 3, 16, 16)
    net = import_model(theirs, x[:1])  # no --fix-unsupported: nothing is fixed
    assert "fixed_units" not in net.graph.meta
    assert [n.op.kind for n in net.nodes].count("part") == 4  # stem halves (equal parts), then the cat's parts
    assert {"pw/0/0", "pw/1/0"} <= set(net.units)  # the two groups slim apart, each with its dw conv
    _parity(theirs, net, x, tmp_path)


def test_a_partial_residual_keeps_its_channels_fixed(tmp_path):
    torch.manual_seed(0)
    theirs = randomize_bn(PartialResidual()).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ImportRefused, match=r"^node 'getitem' .*channel slice .*3 unit.*--fix-unsupported"):
        import_model(theirs, x[:1])
    net = import_model(theirs, x[:1], fix_unsupported=True)
    assert set(net.graph.meta["fixed_units"]) == {"stem/0", "b1/0", "b2/0"}
    _parity(theirs, net, x, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (pip install hwslim[timm])")
@pytest.mark.parametrize("name", ["mixnet_s", "rexnet_100"])
def test_timm_models_import_with_parity(name):
    import timm

    torch.manual_seed(0)
    theirs = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    net = import_model(theirs, x, fix_unsupported=True)
    with torch.no_grad():
        want = theirs(x)
        assert (net(x) - want).abs().max() <= 1e-4 * want.abs().max()
    assert model_costs(net, net.full_config()).params == sum(p.numel() for p in theirs.parameters())
    cfg = net.random_config(random.Random(0))
    with torch.no_grad(), net.using(cfg):
        torch.testing.assert_close(materialize(net, cfg).eval()(x), net(x), rtol=1e-4, atol=1e-5)
