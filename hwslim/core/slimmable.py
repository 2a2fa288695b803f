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

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.core.activations import apply_act, fresh


class SlimmableConv2d(nn.Conv2d):
    """A conv that runs with the active part of its full-width weights.

    Dense (``group_width=None``): the first ``out_channels`` filters over the input's
    channels (the first ``x.shape[1]``, or ``index``: the kept channels of a
    concatenation, as positions in the full layout). Grouped with ``group_width`` input
    channels per group (``1``: depthwise): the output is tied to the input, so the
    active filters are the ones of the kept input channels and the group count is
    ``channels / group_width``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = False,
                 group_width: int | None = None, depthwise: bool = False,
                 dilation: int | tuple[int, int] = 1) -> None:
        if depthwise:
            group_width = 1
        groups = 1
        if group_width is not None:
            if in_channels != out_channels or in_channels % group_width:
                raise ValueError(f"a grouped conv needs in == out channels, a multiple of the group width "
                                 f"{group_width}; got {in_channels} and {out_channels}")
            groups = in_channels // group_width
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=groups, bias=bias)
        self.group_width = group_width

    @property
    def depthwise(self) -> bool:
        return self.group_width == 1

    def active_weight(self, cin: int, cout: int | None, index: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight, bias, groups) for the given active widths (views unless ``index`` gathers); ``rows``:
        the kept filters of a dense conv when they are not the first ``cout`` (an output in parts)."""
        if self.group_width is not None:
            weight = self.weight[:cin] if index is None else self.weight[index]
            bias = None if self.bias is None else (self.bias[:cin] if index is None else self.bias[index])
            return weight, bias, cin // self.group_width
        cout = self.out_channels if cout is None else cout
        w = self.weight[:cout] if rows is None else self.weight.index_select(0, rows)
        bias = None if self.bias is None else (self.bias[:cout] if rows is None else self.bias[rows])
        return (w[:, :cin] if index is None else w.index_select(1, index)), bias, 1

    def forward(self, x: torch.Tensor, out_channels: int | None = None,
                index: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias, groups = self.active_weight(x.shape[1], out_channels, index, rows)
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


class SlimmableConvBN(nn.Module):
    """Conv then (optional) BatchNorm: the unit a runtime executes (the graph adds the rest)."""

    def __init__(self, conv: SlimmableConv2d, bn: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = conv
        self.bn = SlimmableBatchNorm2d(conv.out_channels, eps=eps) if bn else None

    def forward(self, x: torch.Tensor, out_channels: int | None = None, index: torch.Tensor | None = None,
                training: bool | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x, out_channels, index, rows)
        if self.bn is None:
            return y
        if rows is None and index is not None and self.conv.group_width is not None:  # tied: the kept channels
            rows = index
        if rows is not None:
            return sliced_batch_norm(self.bn, y, rows, self.training if training is None else training)
        return self.bn(y)


class SlimmableSE(nn.Module):
    """Squeeze-and-excitation at full width: ``fc1`` reduces to ``mid``, ``fc2`` expands back."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, mid, 1)
        self.fc2 = nn.Conv2d(mid, channels, 1)

    def scale(self, x: torch.Tensor, mid: int | None, index: torch.Tensor | None, act: str, gate: str
              ) -> torch.Tensor:
        c = x.shape[1]
        mid = self.fc1.out_channels if mid is None else mid
        w1 = self.fc1.weight[:mid, :c] if index is None else self.fc1.weight[:mid].index_select(1, index)
        w2 = self.fc2.weight[:c, :mid] if index is None else self.fc2.weight[index, :mid]
        b2 = self.fc2.bias[:c] if index is None else self.fc2.bias[index]
        f = fresh()
        h = apply_act(act, F.conv2d(x.mean((2, 3), keepdim=True), w1, self.fc1.bias[:mid]), f)
        return apply_act(gate, F.conv2d(h, w2, b2), f)


class PlainSE(nn.Module):
    """The materialized SE block (two biased 1x1 convs; the op applies pool, activations and scale)."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, mid, 1)
        self.fc2 = nn.Conv2d(mid, channels, 1)


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_inputs(batch: Any) -> Any:
    """The network input of a batch as data loaders give it: the first item of a tuple or list
    (``(images, targets)``), else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
                   inputs: Callable[[Any], Any] | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics for the model's current config.

    Resets the statistics, then runs ``batches`` in train mode with a cumulative moving
    average (``momentum=None``), so the result is the exact mean over the batches seen.
    Channels the current config does not use are reset too: recalibrate again before
    evaluating another config. ``batches``: any iterable (a DataLoader); ``inputs(batch)``
    gives the network's input (default :func:`batch_inputs`; move it to the device there).
    Returns the number of batches used.
    """
    inputs = inputs or batch_inputs
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
            model(inputs(x))
            n += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return n


def sliced_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, index: torch.Tensor | None, training: bool) -> torch.Tensor:
    """``bn`` over the first ``x.shape[1]`` channels, or the channels ``index`` keeps (running
    statistics of those channels updated in training)."""
    c = x.shape[1]
    factor = 0.0
    if training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if index is None:
        rm, rv = bn.running_mean[:c], bn.running_var[:c]
        w, b = bn.weight[:c], bn.bias[:c]
        return F.batch_norm(x, rm, rv, w, b, training or not bn.track_running_stats, factor, bn.eps)
    # gathered channels: the statistics are updated through a copy, then written back
    rm, rv = bn.running_mean[index], bn.running_var[index]
    y = F.batch_norm(x, rm, rv, bn.weight[index], bn.bias[index], training or not bn.track_running_stats,
                     factor, bn.eps)
    if training and bn.track_running_stats:
        bn.running_mean[index] = rm
        bn.running_var[index] = rv
    return y
