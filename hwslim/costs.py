"""Cost models: pure functions of layer specs (no hooks, no forward pass).

``model_costs(model, config, input_size, batch, dtype)`` is the entry point; each
function below takes the :class:`~hwslim.graph.LayerSpec` list of one config.

Conventions (they match torchvision and the AutoSlim paper):

* **MACs** count conv and linear layers only (the paper's "FLOPs" are MACs):
  conv ``batch * cout * cin/groups * k*k * out_h * out_w``, linear ``batch * cin * cout``.
  BatchNorm, activations, adds and pooling are not counted.
* **Parameters** count conv weights (and biases), BatchNorm's weight and bias (not its
  running statistics), and linear weights and biases.
* **Peak activation memory** is the largest number of activation bytes alive at once
  while the network runs its layers in execution order, as in inference: the input
  tensor is owned by the caller and alive throughout; each layer's output is allocated
  while its inputs are still alive; a tensor is freed right after its last reader, so
  a residual input is held until its add; the add and the activation run in place on
  the conv's output (BatchNorm folded). Weights and runtime scratch space are not
  activations and are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from hwslim.config import ChannelConfig
from hwslim.graph import INPUT, LayerSpec

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "int8": 1}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def layer_macs(s: LayerSpec) -> int:
    if s.op == "conv":
        return s.batch * s.cout * (s.cin // s.groups) * s.kernel * s.kernel * s.out_h * s.out_w
    if s.op == "linear":
        return s.batch * s.cin * s.cout
    return 0


def layer_params(s: LayerSpec) -> int:
    if s.op == "conv":
        n = s.cout * (s.cin // s.groups) * s.kernel * s.kernel
        return n + (s.cout if s.bias else 0) + (2 * s.cout if s.bn else 0)
    if s.op == "linear":
        return s.cin * s.cout + (s.cout if s.bias else 0)
    return 0


def macs(specs: Sequence[LayerSpec]) -> int:
    return sum(layer_macs(s) for s in specs)


def params(specs: Sequence[LayerSpec]) -> int:
    return sum(layer_params(s) for s in specs)


def activation_trace(specs: Sequence[LayerSpec], dtype: str | torch.dtype = "float32",
                     in_channels: int | None = None) -> list[int]:
    """Activation bytes alive while each layer runs (its inputs, its output, held tensors)."""
    if not specs:
        return []
    nbytes = dtype_bytes(dtype)
    first = specs[0]
    c_in = first.cin if in_channels is None else in_channels
    sizes = {INPUT: first.batch * c_in * first.in_h * first.in_w * nbytes}
    last = {}
    for i, s in enumerate(specs):
        for t in s.inputs:
            last[t] = i
    live = {INPUT: sizes[INPUT]}
    trace = []
    for i, s in enumerate(specs):
        out = s.out_elements * nbytes
        trace.append(sum(live.values()) + out)
        live[s.name] = out
        for t in s.inputs:
            if last[t] == i and t != INPUT:
                live.pop(t, None)
    return trace


def peak_activation_bytes(specs: Sequence[LayerSpec], dtype: str | torch.dtype = "float32") -> int:
    """See the module docstring for the convention."""
    return max(activation_trace(specs, dtype), default=0)


@dataclass(frozen=True)
class Costs:
    macs: int
    params: int
    peak_activation_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def spec_costs(specs: Sequence[LayerSpec], dtype: str | torch.dtype = "float32") -> Costs:
    return Costs(macs(specs), params(specs), peak_activation_bytes(specs, dtype))


def model_costs(model, config: ChannelConfig | None = None, input_size: int | None = None, batch: int = 1,
                dtype: str | torch.dtype = "float32") -> Costs:
    """MACs, parameters and peak activation bytes of ``model`` at ``config``."""
    return spec_costs(model.layer_specs(config, batch=batch, input_size=input_size), dtype)
