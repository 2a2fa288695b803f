"""Fused Triton kernels for evaluating slimmable supernets fast on CUDA GPUs.

The greedy search runs thousands of forward passes of one supernet at slightly
different widths. The PyTorch path slices the full-width weights for every cuDNN call
(a copy when the slice is not contiguous), runs conv, BN, add and activation as separate
kernels, and runs one config at a time. This package replaces that for conv nodes:

* :func:`conv_bn_act` / :func:`conv_bn_act_multi` (``hwslim.kernels.conv``): one kernel
  per conv node, ``act(bn(conv(x)) + residual)``, reading the full-width weight in place
  at any active width; the multi form runs K width configs of a layer in one launch;
  :func:`dw_project_bn_act` fuses a depthwise conv into the 1x1 conv that reads it.
* :func:`triton_forward` (one config, with ``run_graph``'s ``start``/``stop``/``env``
  resumption) and :func:`multi_forward` + :func:`plan_multi` (all candidates of a greedy
  step in one pass, shared prefix computed once), in ``hwslim.kernels.runner``; BN from
  running statistics, from each batch's statistics, or recalibrated per config
  (:func:`multi_calibrate`), matching the search evaluator's BN modes.

The PyTorch path (``SlimmableNet.forward`` / :func:`hwslim.core.graph.run_graph`) stays the
reference. Triton is imported only when a kernel is used; :func:`available` and
:func:`supports` tell a caller (the search's evaluator) whether to switch::

    >>> from hwslim import kernels
    >>> if kernels.available() and kernels.supports(model):
    ...     logits = kernels.triton_forward(model.eval(), x.cuda(), cfg)

On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* this package's kernels
are first imported to run them through Triton's CPU interpreter (slow; for tests).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import torch

from hwslim.core.errors import HwslimError

__all__ = [
    "KernelUnavailableError", "available", "check_device", "interpreting", "kernel_node", "supports",
    "torch_node", "unsupported",
    "conv_bn_act", "conv_bn_act_multi", "conv_stats", "bn_act_", "dw_project_bn_act", "fold_bn", "BlockConfig",
    "triton_forward", "multi_forward", "multi_calibrate", "plan_multi", "MultiPlan", "MultiBN", "folded_bn",
    "fusable_pairs", "step_logits",
]

_LAZY = {
    "conv_bn_act": "conv", "conv_bn_act_multi": "conv", "conv_stats": "conv", "bn_act_": "conv",
    "dw_project_bn_act": "conv", "fold_bn": "conv", "BlockConfig": "conv",
    "triton_forward": "runner", "multi_forward": "runner", "multi_calibrate": "runner", "plan_multi": "runner",
    "MultiPlan": "runner", "MultiBN": "runner", "folded_bn": "runner", "fusable_pairs": "runner", "step_logits": "runner",
}


class KernelUnavailableError(HwslimError):
    """The Triton kernels cannot run here (no CUDA GPU, no triton, or an unsupported model)."""


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    conv = sys.modules.get("hwslim.kernels.conv")
    if conv is not None:
        return conv.INTERPRETED  # the mode the kernels were decorated in
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Whether the kernels can run: triton installed, and a CUDA GPU (or the interpreter)."""
    return importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or interpreting())


def check_device(device: torch.device | str) -> None:
    """Raise :class:`KernelUnavailableError` unless tensors on ``device`` can run the kernels."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        raise KernelUnavailableError("the fused kernels need Triton: pip install triton (a CUDA build of torch "
                                     "ships it)")
    if device.type == "cuda" or interpreting():
        return
    raise KernelUnavailableError(f"the fused Triton kernels need a CUDA GPU, got a tensor on {device}; "
                                 "use the PyTorch path (or TRITON_INTERPRET=1, the slow CPU interpreter, for tests)")


KERNEL_ACTS = (None, "relu", "relu6")


def kernel_node(node) -> bool:
    """Whether the fused conv kernels compute ``node``: a square undilated BN conv, dense or depthwise, with
    ReLU/ReLU6 or no activation and an optional residual (the Triton kernels' operator set)."""
    from hwslim.core.ops import Conv

    op = node.op
    return (isinstance(op, Conv) and op.bn and not op.bias and op.group_width in (None, 1)
            and op.act in KERNEL_ACTS and len(node.inputs) <= 2 and op.square_window
            and op.parts == 1)


def torch_node(node) -> bool:
    """Whether the runner computes ``node`` with PyTorch on its (multi-config, zero-padded)
    tensors: channel-wise pools, and a classifier without activation."""
    from hwslim.core.ops import GlobalAvgPool, Linear, MaxPool

    op = node.op
    return isinstance(op, MaxPool) or (isinstance(op, GlobalAvgPool) and op.flatten) or \
        (isinstance(op, Linear) and op.act is None)


def unsupported(model: torch.nn.Module) -> str | None:
    """The first node the fused runner cannot compute, described in words (None: all can)."""
    from hwslim.core.supernet import SlimmableNet

    if not isinstance(model, SlimmableNet):
        return f"{type(model).__name__} is not an hwslim supernet"
    for n in model.nodes:
        if any(len(model.tensor_layout(t)) > 1 for t in n.inputs):
            return f"node {n.name!r} reads a concatenation"
        if not (kernel_node(n) or torch_node(n)):
            return f"node {n.name!r} ({n.op.kind})"
    return None


def supports(model: torch.nn.Module) -> bool:
    """Whether every node of ``model`` runs in the fused runner (else: the PyTorch path)."""
    return unsupported(model) is None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"hwslim.kernels.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'hwslim.kernels' has no attribute {name!r}")
