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


class UserBlocks(nn.Module):
    """The body of a user's own CNN, shared by the importer's tests: a stem, a grouped block with
    SE and a residual, then a concatenation with a side branch (``features``). Subclasses add
    their pooling and classifier; ``se`` is the test's own SE module class."""

    def __init__(self, se: type[nn.Module], expand_act: type[nn.Module], group_act: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), expand_act())
        self.group = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(32), group_act())
        self.se = se(32, 8)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.side = nn.Conv2d(16, 8, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.project(self.se(self.group(self.expand(x)))) + x)
        return torch.cat([x, torch.relu(self.side(x))], 1)


def check_random_configs(net, x: torch.Tensor, tmp_path, seeds: int = 2) -> None:
    """At ``seeds`` random configs: the materialized network (BN folded) equals the supernet, and so
    does its ONNX file in ONNX Runtime (1e-4 relative)."""
    import random

    import numpy as np
    import onnxruntime as ort

    from hwslim.core.materialize import materialize
    from hwslim.runtimes.onnx_file import export_onnx

    for seed in range(seeds):
        cfg = net.random_config(random.Random(seed))
        with torch.no_grad(), net.using(cfg):
            sliced = net(x)
        plain = materialize(net, cfg, fold_bn=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(x), sliced, rtol=1e-4, atol=1e-5)
        onnx_path = export_onnx(plain, tmp_path / f"m{seed}.onnx", batch=x.shape[0], input_size=x.shape[-1])
        got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]
        assert np.abs(got - sliced.numpy()).max() <= 1e-4 * np.abs(sliced.numpy()).max()
