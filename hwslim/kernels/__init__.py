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

The PyTorch path (``SlimmableNet.forward`` / :func:`hwslim.graph.run_graph`) stays the
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

from hwslim.errors import HwslimError

__all__ = [
    "KernelUnavailableError", "available", "check_device", "interpreting", "supports",
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


def supports(model: torch.nn.Module) -> bool:
    """Whether every node of ``model`` has a kernel (dense or depthwise convs; no other groups)."""
    from hwslim.supernet import SlimmableNet

    if not isinstance(model, SlimmableNet):
        return False
    return all(n.op != "conv" or n.groups == 1 or n.depthwise for n in model.nodes)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"hwslim.kernels.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'hwslim.kernels' has no attribute {name!r}")
