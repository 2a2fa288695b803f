"""A trained start: reorder every unit's channels so that the first k are the k most important.

A slimmable supernet keeps the *first* k channels of a unit. A network trained at one
width has its important channels anywhere, so before fine-tuning it with the sandwich
rule, each unit's channels are sorted by an importance score. The reorder is applied to
every layer that produces or reads the unit (each operator reorders its own weights:
:meth:`hwslim.core.ops.Op.permute`), so the full network computes exactly what it did::

    >>> import torchvision
    >>> from hwslim.importing.fx_trace import import_model
    >>> from hwslim.importing.importance import sort_channels, unit_importance
    >>> trained = torchvision.models.resnet18()
    >>> trained.load_state_dict(torch.load("weights.pth"))          # doctest: +SKIP
    >>> net = import_model(trained, torch.randn(1, 3, 224, 224))
    >>> perms = sort_channels(net)      # net(x) is unchanged; narrow configs keep the best channels
    >>> perms["layer1/0/conv1"][:4]                                 # doctest: +SKIP
    tensor([17, 42, 3, 60])             # old channels now at positions 0..3
    >>> bool((unit_importance(net)["layer1/0/conv1"].diff() <= 0).all())
    True

``hwslim train --model torchvision:resnet18 --init weights.pth`` does this before training.

**Score** (:func:`unit_importance`): the sum, over the layers whose weights produce the
unit's channels, of each layer's per-channel score (:meth:`hwslim.core.ops.Op.importance`):
``|gamma|`` of the layer's BatchNorm where it has one, else the L2 norm of its output
filters; SE's inner unit scores by its reduce conv's filters. A layer reading a
concatenation contributes to each part's unit at that part's offset.

**Order** (:func:`sort_channels`): descending score, ties kept in place. A unit whose
width moves in whole groups (a grouped conv's) is sorted group by group, by each group's
summed score, so every group stays whole.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hwslim.core.supernet import SlimmableNet


def _width(net: SlimmableNet, ref) -> int:
    return net.units[ref].max_width if isinstance(ref, str) else int(ref)


def layout_perm(net: SlimmableNet, tensor: str, perms: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The order of ``tensor``'s channels (features, channel-major, for a flattened map) over its
    full layout, given each unit's permutation; None when none of its units moves.

    A unit's permutation applies at every position of the unit in the layout (a
    concatenation's parts at their offsets); fixed widths stay in place.
    """
    lay = net.tensor_layout(tensor)
    if not any(isinstance(r, str) and r in perms for r in lay):
        return None
    parts, off = [], 0
    for r in lay:
        w = _width(net, r)
        p = perms.get(r) if isinstance(r, str) else None
        parts.append(off + (torch.arange(w) if p is None else p.cpu()))
        off += w
    channels = torch.cat(parts)
    k = net.per_channel(tensor)
    return channels if k == 1 else (channels[:, None] * k + torch.arange(k)).reshape(-1)


@torch.no_grad()
def unit_importance(net: SlimmableNet) -> dict[str, torch.Tensor]:
    """Each unit's per-channel score (float, on the CPU), in the unit's current channel order."""
    scores = {u: torch.zeros(unit.max_width) for u, unit in net.units.items()}
    for n in net.nodes:
        out, mid = n.op.importance(net.layers[n.name] if n.name in net.layers else None)
        if out is not None:
            lay = net.tensor_layout(n.name)
            widths = [_width(net, r) for r in lay]
            if len(out) != sum(widths):
                raise ValueError(f"{n.name}: {len(out)} channel scores for an output of {sum(widths)} channels")
            off = 0
            for r, w in zip(lay, widths):
                if isinstance(r, str):
                    scores[r] += out[off:off + w]
                off += w
        if mid is not None and isinstance(n.mid, str):
            scores[n.mid] += mid
    return scores


def _order(score: torch.Tensor, group: int) -> torch.Tensor:
    """Positions by descending score (ties in place); whole blocks of ``group`` channels for a grouped unit."""
    if group <= 1:
        return torch.argsort(score, descending=True, stable=True)
    blocks = torch.argsort(score.view(-1, group).sum(1), descending=True, stable=True)
    return (blocks[:, None] * group + torch.arange(group)).reshape(-1)


@torch.no_grad()
def sort_channels(net: SlimmableNet, importance: Mapping[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Reorder every unit's channels by descending ``importance`` (default :func:`unit_importance`).

    Changes ``net``'s weights in place; the full config computes what it did before (up
    to float rounding), and the first k channels of each unit are its k most important.
    Returns each unit's permutation (new channel i is old channel ``perm[i]``); passing
    the same ``importance`` to another copy of the same weights replays the reorder.
    """
    scores = unit_importance(net) if importance is None else importance
    perms: dict[str, torch.Tensor] = {}
    for u, unit in net.units.items():
        s = torch.as_tensor(scores[u], dtype=torch.float32).cpu()
        if s.shape != (unit.max_width,):
            raise ValueError(f"unit {u!r}: {tuple(s.shape)} importance scores for {unit.max_width} channels")
        perms[u] = _order(s, max(1, net.graph.units[u].quantum))
    moved = {u: p for u, p in perms.items() if not torch.equal(p, torch.arange(len(p)))}
    if moved:
        for n in net.nodes:
            if n.name not in net.layers:
                continue
            in_perms = [layout_perm(net, t, moved) for t in n.inputs]
            out_perm = moved.get(n.out) if isinstance(n.out, str) else None
            mid_perm = moved.get(n.mid) if isinstance(n.mid, str) else None
            if out_perm is None and mid_perm is None and all(p is None for p in in_perms):
                continue
            n.op.permute(net.layers[n.name], n, in_perms, out_perm, mid_perm)
    return perms


__all__ = ["layout_perm", "sort_channels", "unit_importance"]
