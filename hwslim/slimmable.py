"""Slimmable layers: each runs with the first k channels of its full-width weights.

The active input width is the incoming tensor's channel count; the active output width
is passed to ``forward`` by the caller (the supernet, from its current
``ChannelConfig``). The layers keep no width state, so one set of weights can serve any
number of configs, and two differently configured supernets can share a process.

>>> conv = SlimmableConv2d(32, 64, 3, padding=1)
>>> conv(torch.zeros(1, 16, 8, 8), out_channels=24).shape
torch.Size([1, 24, 8, 8])
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class SlimmableConv2d(nn.Conv2d):
    """A conv whose first ``cin`` inputs and ``out_channels`` outputs are used.

    ``depthwise=True`` ties the output width to the input width (groups = channels).
    A grouped conv with a fixed number of groups uses ``weight[:cout, :cin // groups]``,
    so active widths must be multiples of ``groups``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False, depthwise: bool = False) -> None:
        if depthwise:
            if in_channels != out_channels:
                raise ValueError(f"a depthwise conv needs in == out channels, got {in_channels} and {out_channels}")
            groups = in_channels
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.depthwise = depthwise

    def active_weight(self, cin: int, cout: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight, bias, groups) for the given active widths, as views of the full ones."""
        if self.depthwise:
            weight, groups, cout = self.weight[:cin], cin, cin
        else:
            cout = self.out_channels if cout is None else cout
            weight, groups = self.weight[:cout, : cin // self.groups], self.groups
        bias = None if self.bias is None else self.bias[:cout]
        return weight, bias, groups

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        weight, bias, groups = self.active_weight(x.shape[1], out_channels)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SlimmableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels (C taken from the input).

    Running statistics are shared across widths: channel c's statistics are updated by
    every config that keeps channel c. Use :func:`recalibrate_bn` before evaluating a
    config so its statistics match its own activations.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean[:c] if self.running_mean is not None else None,
            self.running_var[:c] if self.running_var is not None else None,
            self.weight[:c] if self.weight is not None else None,
            self.bias[:c] if self.bias is not None else None,
            use_batch_stats,
            factor,
            self.eps,
        )


class SlimmableLinear(nn.Linear):
    """A linear layer reading the first ``in`` features (its outputs are never slimmed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class SlimmableConvBN(nn.Module):
    """Conv followed by BatchNorm: the unit a runtime executes (activation is applied by the graph)."""

    def __init__(self, conv: SlimmableConv2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = SlimmableBatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        return self.bn(self.conv(x, out_channels))


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics for the model's current config.

    Resets the statistics, then runs ``batches`` in train mode with a cumulative moving
    average (``momentum=None``), so the result is the exact mean over the batches seen.
    Channels the current config does not use are reset too: recalibrate again before
    evaluating another config. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x in batches:
            if num_batches is not None and n >= num_batches:
                break
            if isinstance(x, (tuple, list)):
                x = x[0]
            model(x)
            n += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return n
