"""``--outputs raw``: a detector without its decoding, its raw head maps as the model's outputs.

A detection head's post-processing (Ultralytics' ``Detect``: per-level ``view``, a
concatenation over the anchors, anchor points and strides, the DFL softmax, the class
sigmoid) is no network layer: deployment flows export the per-level maps and decode them
outside the network. :func:`raw_outputs` returns a copy of the model whose heads return
those maps, as Ultralytics' own raw export does:

* ``Detect`` (and ``Segment``, ``Pose``, ``OBB``, which subclass it): one tensor per level,
  the level's box, class (and mask-coefficient, keypoint or angle) convs concatenated on
  the channels; a ``Segment`` head adds its mask prototypes as the last output;
* ``Classify``: the logits (its softmax is the post-processing).

Only Ultralytics' heads are known; ``ultralytics`` is imported only when a model holds
one of its modules (it is an optional extra, never a dependency).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from hwslim.core.errors import ModelError

OUTPUTS = ("full", "raw")
OUTPUTS_HELP = ("imported models: 'raw' leaves a detector's decoding out (Ultralytics Detect/Segment/Pose/OBB heads: "
                "the per-level head maps are the outputs; Classify: the logits); default 'full'")


def _detect_raw(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """A ``Detect`` head's per-level maps: its heads' convs on each level, concatenated on the channels."""
    heads = [h for h in (self.one2one if getattr(self, "end2end", False) else self.one2many).values() if h is not None]
    out = [torch.cat([h[i](x[i]) for h in heads], 1) for i in range(self.nl)]
    proto = getattr(self, "proto", None)
    return out + [proto(x[0])] if proto is not None else out


def _classify_raw(self, x) -> torch.Tensor:
    """A ``Classify`` head's logits (before its softmax)."""
    if isinstance(x, list):
        x = torch.cat(x, 1)
    return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))


def raw_outputs(module: nn.Module, outputs: str = "raw") -> nn.Module:
    """``module`` itself for ``outputs="full"``; for ``"raw"``, a copy whose detection and
    classification heads return their raw maps (see the module docstring). Raises
    :class:`ModelError` (one line) when ``module`` holds no head this knows."""
    if outputs not in OUTPUTS:
        raise ModelError(f"--outputs {outputs!r}: expected one of {', '.join(OUTPUTS)}")
    if outputs == "full":
        return module
    heads = _known_heads()
    raw = copy.deepcopy(module)
    found = 0
    for m in raw.modules():
        for cls, forward in heads:
            if isinstance(m, cls):
                # this copy only (the user's module is unchanged); a subclass, not an instance attribute:
                # torch.export then records the head's submodules under their qualified names
                base = type(m)
                m.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                            "__qualname__": base.__qualname__})
                found += 1
                break
    if not found:
        raise ModelError(f"--outputs raw: {type(module).__name__} has no detection head hwslim knows how to cut "
                         "(Ultralytics Detect, Segment, Pose, OBB or Classify); import it with --outputs full")
    return raw


def _known_heads() -> list[tuple[type, object]]:
    """(head class, its raw forward); Ultralytics' only when the model's code already imported it."""
    if "ultralytics" not in sys.modules:
        return []
    from ultralytics.nn.modules.head import Classify, Detect

    return [(Detect, _detect_raw), (Classify, _classify_raw)]


__all__ = ["OUTPUTS", "OUTPUTS_HELP", "raw_outputs"]
