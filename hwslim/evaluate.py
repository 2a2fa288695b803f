"""Accuracy of one channel config of a supernet, after BN recalibration.

A config the supernet never ran exactly has no valid BatchNorm statistics, so every
evaluation first recalibrates them (reset, then a cumulative average over calibration
batches in train mode; :func:`hwslim.slimmable.recalibrate_bn`), then scores in eval
mode. The supernet's own statistics are restored afterwards, so evaluating is free of
side effects::

    >>> acc = accuracy(net, net.uniform_config(6), images, labels, calib_images=images)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from hwslim.config import ChannelConfig
from hwslim.slimmable import BN_TYPES, recalibrate_bn



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


# -- held-out accuracy of searched configs and exported models (``hwslim eval``) ---------------------
EXPORT_CALIB_BATCH = 128  # hwslim.export recalibrates BN in batches of 128: the same statistics here


def heldout_split(ckpt, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The validation (or test) images the checkpoint's data record names, and what they are."""
    from hwslim.data import validation_split

    images, labels = validation_split(ckpt, max_images=max_images)
    return images, labels, {"split": ckpt.data.get("val_split", "val"), "images": len(labels)}


def evaluate_configs_heldout(ckpt, configs: list[tuple[str, ChannelConfig]], *, calib_images: int = 512,
                             max_images: int | None = None, progress: bool = False) -> tuple[list[dict], dict]:
    """Top-1 (%) of each config of ``ckpt``'s supernet on its held-out split, after BN
    recalibration at the config on ``calib_images`` images of the search split, exactly as
    ``hwslim export`` recalibrates before exporting (0: the supernet's statistics).

    Returns ``(rows, evaluated_on)``; the supernet is left as it was.
    """
    from hwslim.export import checkpoint_images
    from hwslim.train import evaluate_configs

    net = ckpt.model
    for _, cfg in configs:
        net.validate(cfg)
    images, labels, on = heldout_split(ckpt, max_images)
    calib, why = checkpoint_images(ckpt, "search", calib_images)
    on["bn"] = f"recalibrated per config on {why}" if calib is not None else f"the supernet's statistics ({why})"
    on["calib_images"] = 0 if calib is None else len(calib)
    rows = evaluate_configs(net, configs, images, labels, calib, progress=progress,
                            desc=f"scoring on {len(labels):,} {on['split']} images", calib_batch_size=EXPORT_CALIB_BATCH)
    return rows, on


def onnx_top1(path, images: torch.Tensor, labels: torch.Tensor, batch: int = 1, dynamic: bool = False) -> float:
    """Top-1 (0..1) of an ONNX model with ONNX Runtime (``hwslim.export``'s session settings);
    a fixed batch larger than the images left over is padded, and the padding not scored."""
    from hwslim.export import _ort_outputs

    n = len(images)
    pad = 0 if dynamic else (-n) % batch
    if pad:
        images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
    logits = _ort_outputs(path, images.float().contiguous(), batch, dynamic)[:n]
    return float((logits.argmax(1) == labels).float().mean()) if n else 0.0
