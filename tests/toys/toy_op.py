"""A toy operator in one file: a learned scale per channel, ``x * w[c]``, with its import rule.

Registering :class:`ChannelScale` (importing this file) is all hwslim needs: the importer claims
:class:`ScaleModule` in a user's module, and costs, the supernet, materialization, ONNX and the
designed networks ask the operator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from hwslim.core.ops import Claim, Op, register_op, spec_index


class ScaleModule(nn.Module):
    """The user's layer: each channel times its own weight."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


def _kept(weight: torch.Tensor, index: torch.Tensor | None, n: int) -> torch.Tensor:
    return weight.index_select(0, index.to(weight.device)) if index is not None else weight[:n]


@register_op
@dataclass(frozen=True)
class ChannelScale(Op):
    """``x * w[c]``: channel-wise, so its output follows its input's channels."""

    kind: ClassVar[str] = "toy_scale"
    torch_modules: ClassVar[tuple[type, ...]] = (ScaleModule,)

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        return Claim(cls(), site.tensor_args(node)[:1], {"scale": m}) if isinstance(m, ScaleModule) else None

    def params(self, s):
        return s.cin

    def onnx(self, s, g, inputs, out):
        g.node("Mul", [inputs[0], g.weight(f"{s.name}.weight", (1, s.cin, 1, 1), 0.5)], [out], f"{s.name}::mul")

    def build(self, node, cin, cout, mid):
        return ScaleModule(cin)

    def run(self, module, xs, ctx):
        x = xs[0]
        return x * _kept(module.weight, ctx.index, x.shape[1]).view(1, -1, 1, 1)

    def plain(self, s, src):
        m = ScaleModule(s.cin)
        if src is not None:
            with torch.no_grad():
                m.weight.copy_(_kept(src.weight, spec_index(s), s.cin))
        return m

    def run_plain(self, module, xs, s, inplace, training):
        return module(xs[0])

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        if in_perms[0] is not None:
            with torch.no_grad():
                module.weight.copy_(module.weight[in_perms[0].to(module.weight.device)])

    def load_weights(self, module, sources):
        with torch.no_grad():
            module.weight.copy_(sources["scale"].weight)
