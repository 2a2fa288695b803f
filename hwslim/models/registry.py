"""Model registry (timm-style): a builder registers under its function's name.

``create_model`` drops ``None`` keyword arguments, so a CLI default of ``None`` never
overrides a model's own default (MobileNets default to a 1.5x supernet, ResNets 1.0x).
"""
from __future__ import annotations

from typing import Callable

from hwslim.core.errors import ModelError
from hwslim.core.report import did_you_mean
from hwslim.core.supernet import SlimmableNet

_MODELS: dict[str, Callable[..., SlimmableNet]] = {}
# torchvision's names for a zoo model at a fixed multiplier: name -> (model, default kwargs)
_ALIASES: dict[str, tuple[str, dict]] = {"mnasnet1_0": ("mnasnet", {"width_mult": 1.0})}


def register_model(fn: Callable[..., SlimmableNet]) -> Callable[..., SlimmableNet]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_builder(name: str) -> Callable[..., SlimmableNet]:
    if name in _ALIASES:
        return _MODELS[_ALIASES[name][0]]
    try:
        return _MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r};{did_you_mean(name, [*list_models(), *_ALIASES])} "
                         f"available: {', '.join(list_models())}") from None



def create_model(name: str, **kwargs) -> SlimmableNet:
    """Build a registered supernet: ``create_model("mobilenet_v2", width_mult=1.5)``."""
    builder = model_builder(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name in _ALIASES:
        kwargs = {**_ALIASES[name][1], **kwargs}
    wm = kwargs.get("width_mult")
    if wm is not None and not (0.0 < float(wm) <= 4.0):
        raise ModelError(f"width multiplier must be in (0, 4], got {wm}")
    return builder(**kwargs)
