"""The model zoo, and :func:`load_model`: a ``--model`` spec to a supernet.

Importing this package registers every zoo model. A model is data (a graph, see
:mod:`hwslim.graph`); a spec names where that data comes from:

* a zoo name (``hwslim models`` lists them): the zoo's builder writes the graph;
* a graph JSON file (``hwslim models --graph NAME > my.json`` writes one; edit or
  generate your own);
* a checkpoint written by ``hwslim train``: its graph (the weights are not loaded).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hwslim.models.registry import create_model, list_models, model_builder, register_model  # noqa: F401
from hwslim.models import (densenet, efficientnet, mnasnet, mobilenet_v1, mobilenet_v2,  # noqa: F401  (registration)
                           mobilenet_v3, regnet, resnet)

__all__ = ["create_model", "list_models", "load_model", "register_model"]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".json", ".pt", ".pth")) or "/" in spec or Path(spec).is_file()


def load_model(spec: str, *, width_mult: float | None = None, input_size: int | None = None,
               num_classes: int | None = None, divisor: int | None = None):
    """The supernet a ``--model`` spec names (see the module docstring), on the current device.

    For a zoo name the keyword arguments are the builder's (``None``: its default). A
    graph file or checkpoint fixes the architecture: ``input_size`` and ``divisor`` may
    be changed, ``width_mult``/``num_classes`` must match it if given.
    """
    from hwslim.errors import ModelError
    from hwslim.graph import GraphFormatError, graph_from_dict
    from hwslim.supernet import SlimmableNet

    if not _is_file_spec(spec):
        return create_model(spec, width_mult=width_mult, input_size=input_size, num_classes=num_classes,
                            divisor=divisor)
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model {spec!r}: no such file (give a zoo name from `hwslim models`, a graph JSON file "
                         "or a checkpoint)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: not a readable graph JSON file ({type(e).__name__})") from None
    else:
        from hwslim.checkpoint import read_graph

        data = read_graph(path)
    try:
        graph = graph_from_dict(data)
    except GraphFormatError as e:
        raise ModelError(f"{path}: {e}") from None
    if width_mult is not None and abs(float(width_mult) - graph.width_mult) > 1e-9:
        raise ModelError(f"{path} describes a x{graph.width_mult:g} supernet; --width-mult {width_mult:g} cannot "
                         "change a graph file (build another one)")
    if num_classes is not None and int(num_classes) != graph.num_classes:
        raise ModelError(f"{path} has {graph.num_classes} classes, not {num_classes}")
    if input_size is not None:
        graph = replace(graph, input_size=int(input_size))
    if divisor is not None:
        graph = replace(graph, divisor=int(divisor))
    try:
        return SlimmableNet(graph)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: the graph does not build ({e})") from None
