"""The entries of a latency table: every layer signature any config of a supernet can
produce, with one choice of unit widths that produces it.

Profiling measures these (:mod:`hwslim.latency.profile`); a table checks its coverage
and its lower bound against them (:mod:`hwslim.latency.table`).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from typing import Callable, Mapping, Sequence

from hwslim.core.graph import LayerSpec, resolve


_BRUTE_FORCE = 20000  # widths combinations of one node enumerated directly; beyond, sums of parts


def spec_fn(net, node, template: LayerSpec) -> Callable[[Mapping[str, int]], LayerSpec]:
    """A fast ``widths -> spec`` for one node (the covering search calls it a lot)."""
    lays = [net.tensor_layout(t) for t in node.inputs]
    out_lay = net.tensor_layout(node.name)
    op = node.op

    def spec(widths: Mapping[str, int]) -> LayerSpec:
        cins = tuple(sum(resolve(r, widths) for r in lay) for lay in lays)
        return replace(template, cin=cins[0], in_channels=cins, cout=sum(resolve(r, widths) for r in out_lay),
                       mid=resolve(node.mid, widths) if node.mid is not None else 0, groups=op.groups(cins[0]))

    return spec


def _layout_sums(net, layout: Sequence, rng: random.Random | None = None) -> dict[int, dict[str, int]]:
    """Every total width a (concatenated) layout can have, each with one choice of widths."""
    sums: dict[int, dict[str, int]] = {0: {}}
    for r in layout:
        grid = [r] if isinstance(r, int) else list(net.units[r].grid)
        nxt: dict[int, dict[str, int]] = {}
        for total, ws in sums.items():
            for w in (rng.sample(grid, len(grid)) if rng else grid):
                nxt.setdefault(total + w, ws if isinstance(r, int) else {**ws, r: w})
        sums = nxt
    return sums


def _width_choices(net, node) -> list[dict[str, int]]:
    """Unit widths producing every distinct spec of ``node`` (one choice each, roughly)."""
    refs = net.node_units(node)
    size = math.prod(len(net.units[r].grid) for r in refs)
    if size <= _BRUTE_FORCE:
        return [dict(zip(refs, combo)) for combo in itertools.product(*(net.units[r].grid for r in refs))]
    # a concatenation's consumer: only each input's total width matters, plus the node's own units
    per_input = [list(_layout_sums(net, net.tensor_layout(t)).values()) for t in node.inputs]
    own = [r for r in node.refs() if not any(r in net.tensor_layout(t) for t in node.inputs)]
    out = []
    for parts in itertools.product(*per_input, *([{r: w} for w in net.units[r].grid] for r in own)):
        merged: dict[str, int] = {}
        for p in parts:
            merged.update(p)
        out.append(merged)
    return out


def node_entries(net, batch: int = 1, input_size: int | None = None) -> list[dict[tuple, tuple[LayerSpec, dict]]]:
    """Per node of ``net``: every table signature it can have -> (spec, unit widths producing it);
    untimed nodes have none."""
    templates = net.layer_specs(net.full_config(), batch=batch, input_size=input_size)
    out = []
    for node, template in zip(net.nodes, templates):
        entries: dict[tuple, tuple[LayerSpec, dict]] = {}
        if template.signature() is not None:
            spec_at = spec_fn(net, node, template)
            for widths in _width_choices(net, node):
                spec = spec_at(widths)
                entries.setdefault(spec.signature(), (spec, widths))
        out.append(entries)
    return out


def enumerate_entries(net, batch: int = 1, input_size: int | None = None) -> list[LayerSpec]:
    """One spec per distinct signature any config of ``net`` can produce (node order)."""
    seen: dict[tuple, LayerSpec] = {}
    for entries in node_entries(net, batch, input_size):
        for sig, (spec, _) in entries.items():
            seen.setdefault(sig, spec)
    return list(seen.values())
