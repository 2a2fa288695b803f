"""Weights from a module whose layers come in the same order as a zoo supernet's.

The zoo's builders add nodes in the order torchvision registers its modules, so a
torchvision model's state dict lines up tensor by tensor with the supernet's (BatchNorm's
``num_batches_tracked`` aside). :func:`copy_weights_in_order` checks every shape and
copies; the tests use it to show that a zoo model computes what torchvision's computes.
"""
from __future__ import annotations

import torch
from torch import nn

from hwslim.core.errors import ModelError


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]


@torch.no_grad()
def copy_weights_in_order(src: nn.Module, net: nn.Module) -> int:
    """Copy ``src``'s parameters and buffers into ``net`` pairwise in order; returns how many."""
    a, b = _tensors(src), _tensors(net)
    if len(a) != len(b):
        raise ModelError(f"{type(src).__name__} has {len(a)} weight tensors, the supernet {len(b)}")
    dst = net.state_dict()
    for (ka, va), (kb, vb) in zip(a, b):
        if va.shape != vb.shape:
            raise ModelError(f"{ka} {tuple(va.shape)} does not fit {kb} {tuple(vb.shape)}")
        dst[kb].copy_(va)
    return len(a)
