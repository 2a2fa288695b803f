"""Test helpers shared by test files: trained-looking weights for freshly built modules."""
from __future__ import annotations

from torch import nn
import torch


def randomize_bn(module: nn.Module, *, mean: float = 0.2, var: tuple[float, float] = (0.5, 1.5),
                 scale: tuple[float, float] = (0.5, 1.5), biases: bool = False) -> nn.Module:
    """Distinct BatchNorm statistics and affine parameters (uniform in the given ranges; shifts in
    +-0.2), so slicing, folding and sorting channels are exercised; ``biases``: conv and linear
    biases too. Returns the module in eval mode."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-mean, mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*scale)
                m.bias.uniform_(-0.2, 0.2)
            elif biases and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    return module.eval()
