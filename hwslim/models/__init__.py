"""The model zoo: slimmable supernets built by their registered builders.

Importing this package registers every zoo model (``hwslim models`` lists them). A
model is data (a graph, see :mod:`hwslim.core.graph`); :func:`hwslim.importing.specs.load_model`
turns any ``--model`` spec (a zoo name, a graph file, a checkpoint, an imported module)
into a supernet.
"""
from __future__ import annotations

from hwslim.models.registry import create_model, list_models, model_builder, register_model  # noqa: F401
from hwslim.models import (densenet, efficientnet, mnasnet, mobilenet_v1, mobilenet_v2,  # noqa: F401  (registration)
                           mobilenet_v3, regnet, resnet)

__all__ = ["create_model", "list_models", "register_model"]
