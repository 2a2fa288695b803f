"""Sorting channels by importance: the full network's function is unchanged, the first k are the best."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hwslim.importing.importance import layout_perm, sort_channels, unit_importance
from hwslim.importing.fx_trace import import_model
from hwslim.models import create_model
from fakes import UserBlocks, randomize_bn


def _randomize(module: nn.Module) -> nn.Module:
    """Trained-looking weights: distinct BN scales and statistics, non-zero biases."""
    return randomize_bn(module, scale=(0.2, 1.5), biases=True)


def _is_identity(p: torch.Tensor) -> bool:
    return torch.equal(p, torch.arange(len(p)))


def _check_sorted(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    before_scores = unit_importance(net)
    with torch.no_grad():
        want = net(x)
    perms = sort_channels(net)
    with torch.no_grad():
        got = net(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    after = unit_importance(net)
    for u, p in perms.items():
        torch.testing.assert_close(after[u], before_scores[u][p])  # scores moved with their channels
        q = net.graph.units[u].quantum
        assert (after[u].view(-1, q).sum(1).diff() <= 1e-6).all(), u  # the first k are the most important
    return perms


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121"])
def test_sorting_zoo_models_keeps_their_function(name):
    net = _randomize(create_model(name, input_size=32, num_classes=10))
    perms = _check_sorted(net, torch.randn(2, 3, 32, 32))
    assert set(perms) == set(net.units)
    assert sum(not _is_identity(p) for p in perms.values()) == len(perms)  # every unit was reordered


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class UserNet(UserBlocks):
    """SE, a grouped conv (groups of 8), a residual, a concatenation, a biased conv without BN,
    a 4x4 map flattened into a hidden linear layer, then the classifier."""

    def __init__(self) -> None:
        super().__init__(SE, nn.ReLU, nn.ReLU)
        self.pool = nn.AvgPool2d(4)
        self.hidden = nn.Linear(24 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.flatten(self.pool(self.features(x)), 1))))


def test_sorting_an_imported_model_keeps_its_function():
    torch.manual_seed(0)
    user = _randomize(UserNet())
    x = torch.randn(3, 3, 32, 32)
    net = import_model(user, x[:1])
    kinds = {n.op.kind for n in net.nodes}
    assert {"se", "concat", "flatten", "linear"} <= kinds
    assert net.graph.units["expand/0"].quantum == 8 and net.per_channel("flatten") == 16
    assert net.tensor_layout("cat") == ("stem/0", "side")
    perms = _check_sorted(net, x)
    assert set(perms) == {"stem/0", "expand/0", "se/mid", "side", "hidden"}
    g = perms["expand/0"].view(-1, 8)  # the grouped conv's unit moved in whole groups
    assert torch.equal(g, g[:, :1] + torch.arange(8)) and not _is_identity(perms["expand/0"])
    # and the reordered supernet still matches the user's module
    with torch.no_grad():
        want = user(x)
    assert (net(x) - want).abs().max() <= 1e-4 * want.abs().max()


def test_layout_perm_expands_concat_parts_and_flattened_positions():
    net = import_model(_randomize(UserNet()), torch.randn(1, 3, 32, 32))
    perms = {"stem/0": torch.arange(16).flip(0), "side": torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])}
    cat = layout_perm(net, "cat", perms)
    assert cat.tolist() == list(range(15, -1, -1)) + [17, 16] + list(range(18, 24))
    flat = layout_perm(net, "flatten", perms)  # 16 positions per channel, channel-major
    assert flat[:16].tolist() == list(range(15 * 16, 16 * 16)) and flat[16 * 16:16 * 17].tolist() == list(
        range(17 * 16, 18 * 16))
    assert layout_perm(net, "hidden", perms) is None


def test_given_importance_sets_the_order():
    net = _randomize(create_model("mobilenet_v3_small", input_size=32, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    rev = {u: torch.arange(unit.max_width, dtype=torch.float32) for u, unit in net.units.items()}
    perms = sort_channels(net, rev)  # ascending scores given: every unit is reversed
    assert all(torch.equal(p, torch.arange(len(p)).flip(0)) for p in perms.values())
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="importance scores"):
        sort_channels(net, {**rev, next(iter(rev)): torch.ones(3)})
