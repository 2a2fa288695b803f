"""Activations: each one's PyTorch function (in place where it has one), ONNX form and module.

Operators (:mod:`hwslim.core.ops`) and the slimmable layers (:mod:`hwslim.core.slimmable`)
both apply them by name through :func:`apply_act`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from hwslim.core.onnx_build import OnnxGraph


# -- activations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    inplace_fn: Callable[[torch.Tensor], torch.Tensor] | None
    emit: Callable[["OnnxGraph", str, str, str], None]  # (graph, x, y, node name)
    module: Callable[[], nn.Module]


def _clip(g: "OnnxGraph", x: str, y: str, name: str, lo: float, hi: float) -> None:
    g.node("Clip", [x, g.const(f"clip.{lo:g}", lo), g.const(f"clip.{hi:g}", hi)], [y], name)


def _silu(g: "OnnxGraph", x: str, y: str, name: str) -> None:
    g.node("Sigmoid", [x], [f"{name}.sig"], f"{name}.sig")
    g.node("Mul", [x, f"{name}.sig"], [y], name)


def _gelu(g: "OnnxGraph", x: str, y: str, name: str) -> None:  # exact (erf) form, opset 13+
    g.node("Div", [x, g.const("gelu.sqrt2", math.sqrt(2.0))], [f"{name}.d"], f"{name}.d")
    g.node("Erf", [f"{name}.d"], [f"{name}.e"], f"{name}.e")
    g.node("Add", [f"{name}.e", g.const("gelu.one", 1.0)], [f"{name}.a"], f"{name}.a")
    g.node("Mul", [x, f"{name}.a"], [f"{name}.m"], f"{name}.m")
    g.node("Mul", [f"{name}.m", g.const("gelu.half", 0.5)], [y], name)


# LeakyReLU's negative slopes hwslim knows: PyTorch's default, and those detectors use (YOLO: 0.1)
LEAKY_SLOPES = (0.01, 0.1, 0.2)


def leaky_name(slope: float) -> str:
    """The activation name of LeakyReLU with ``slope``: ``leaky_relu`` (0.01), ``leaky_relu0.1``..."""
    return "leaky_relu" if slope == 0.01 else f"leaky_relu{slope:g}"


def _leaky(slope: float) -> Activation:
    return Activation(leaky_name(slope), lambda t: F.leaky_relu(t, slope), lambda t: F.leaky_relu_(t, slope),
                      lambda g, x, y, n: g.node("LeakyRelu", [x], [y], n, alpha=slope), lambda: nn.LeakyReLU(slope))


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("relu", F.relu, F.relu_, lambda g, x, y, n: g.node("Relu", [x], [y], n), nn.ReLU),
    Activation("relu6", F.relu6, lambda t: t.clamp_(0.0, 6.0), lambda g, x, y, n: _clip(g, x, y, n, 0.0, 6.0),
               nn.ReLU6),
    Activation("hardswish", F.hardswish, lambda t: F.hardswish(t, inplace=True),
               lambda g, x, y, n: g.node("HardSwish", [x], [y], n), nn.Hardswish),
    Activation("hardsigmoid", F.hardsigmoid, lambda t: F.hardsigmoid(t, inplace=True),
               lambda g, x, y, n: g.node("HardSigmoid", [x], [y], n, alpha=1.0 / 6, beta=0.5), nn.Hardsigmoid),
    Activation("silu", F.silu, lambda t: F.silu(t, inplace=True), _silu, nn.SiLU),
    Activation("sigmoid", torch.sigmoid, torch.sigmoid_, lambda g, x, y, n: g.node("Sigmoid", [x], [y], n),
               nn.Sigmoid),
    Activation("gelu", F.gelu, None, _gelu, nn.GELU),
    Activation("elu", F.elu, F.elu_, lambda g, x, y, n: g.node("Elu", [x], [y], n, alpha=1.0), nn.ELU),
    *(_leaky(slope) for slope in LEAKY_SLOPES),
)}


def check_act(act: str | None, what: str = "activation") -> None:
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {act!r}; expected one of {sorted(ACTIVATIONS)}")


def fresh() -> bool:
    """Whether an op may overwrite a tensor it just produced (inference: no autograd graph)."""
    return not torch.is_grad_enabled()


def apply_act(act: str | None, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if act is None:
        return x
    a = ACTIVATIONS[act]
    return a.inplace_fn(x) if inplace and a.inplace_fn is not None else a.fn(x)
