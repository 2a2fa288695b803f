"""Accuracy of one channel config of a supernet, after BN recalibration.

A config the supernet never ran exactly has no valid BatchNorm statistics, so every
evaluation first recalibrates them (reset, then a cumulative average over calibration
batches in train mode; :func:`hwslim.core.slimmable.recalibrate_bn`), then scores in eval
mode. The supernet's own statistics are restored afterwards, so evaluating is free of
side effects::

    >>> acc = accuracy(net, net.uniform_config(6), images, labels, calib_images=images)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from hwslim.core.config import ChannelConfig
from hwslim.core.slimmable import BN_TYPES, recalibrate_bn


@contextlib.contextmanager
def preserved_bn_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics (and momentum) on exit."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    try:
        yield
    finally:
        for m, mean, var, n, momentum in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


@torch.no_grad()
def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> int:
    """Top-1 hits of ``model`` (in its current mode) over ``images``."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct


@torch.no_grad()
def accuracy(model, config: ChannelConfig | None, images: torch.Tensor, labels: torch.Tensor, *,
             calib_images: torch.Tensor | None = None, batch_size: int = 256,
             calib_batch_size: int | None = None, recalibrate: bool = True) -> float:
    """Top-1 accuracy (0..1) of ``model`` at ``config`` after BN recalibration on ``calib_images``.

    ``calib_images`` defaults to ``images``. With ``recalibrate=False`` the supernet's
    running statistics are used as they are.
    """
    config = model.config if config is None else config
    was_training = model.training
    with model.using(config), preserved_bn_stats(model):
        if recalibrate:
            calib = images if calib_images is None else calib_images
            recalibrate_bn(model, batches(calib, calib_batch_size or batch_size))
        model.eval()
        correct = count_correct(model, images, labels, batch_size)
    model.train(was_training)
    return correct / max(1, len(images))
