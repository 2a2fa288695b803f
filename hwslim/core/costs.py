"""Cost models: pure functions of layer specs (no hooks, no forward pass).

``model_costs(model, config, input_size, batch, dtype)`` is the entry point; each
function below takes the :class:`~hwslim.core.graph.LayerSpec` list of one config.

Conventions (they match torchvision and the AutoSlim paper):

* **MACs** count conv and linear layers only, SE's two 1x1 convs included (the paper's
  "FLOPs" are MACs; torch's FlopCounterMode counts the same): conv
  ``batch * cout * cin/groups * k*k * out_h * out_w``, linear ``batch * cin * cout``.
  BatchNorm, activations, adds, multiplies, concatenation and pooling are not counted.
* **Parameters** count conv weights (and biases), BatchNorm's weight and bias (not its
  running statistics), and linear weights and biases. Each operator states its own
  (:meth:`hwslim.core.ops.Op.macs`, :meth:`~hwslim.core.ops.Op.params`).
* **Peak activation memory** is the largest number of activation bytes alive at once
  while the network runs its layers in execution order, as in inference: the input
  tensor is owned by the caller and alive throughout; each layer's output is allocated
  while its inputs are still alive; a tensor is freed right after its last reader, so
  a residual input is held until its add; the add and the activation run in place on
  the conv's output (BatchNorm folded); standalone activations, adds and SE scaling run
  in place on a dying input; flatten and inference-time dropout are views. Weights and runtime scratch space are not
  activations and are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from hwslim.core.config import ChannelConfig
from hwslim.core.graph import INPUT, LayerSpec

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "int8": 1}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def layer_macs(s: LayerSpec) -> int:
    return s.op.macs(s)


def layer_params(s: LayerSpec) -> int:
    return s.op.params(s)


def macs(specs: Sequence[LayerSpec]) -> int:
    return sum(layer_macs(s) for s in specs)


def params(specs: Sequence[LayerSpec]) -> int:
    return sum(layer_params(s) for s in specs)


def activation_trace(specs: Sequence[LayerSpec], dtype: str | torch.dtype = "float32",
                     in_channels: int | None = None) -> list[int]:
    """Activation bytes alive while each layer runs (its inputs, its output, held tensors).

    A view (flatten, dropout at inference) shares its input's memory; an in-place op
    (standalone activation, add, SE's scaling) writes into its first input when that
    tensor dies there and shares memory with nothing alive, as :func:`hwslim.core.graph.run_graph`
    executes it.
    """
    if not specs:
        return []
    nbytes = dtype_bytes(dtype)
    first = specs[0]
    c_in = first.cin if in_channels is None else in_channels
    last: dict[str, int] = {}
    for i, s in enumerate(specs):
        for t in s.inputs:
            last[t] = i
    root = {INPUT: INPUT}  # tensor -> the buffer holding it
    buffers = {INPUT: first.batch * c_in * first.in_h * first.in_w * nbytes}
    alive = {INPUT}
    trace = []
    for i, s in enumerate(specs):
        x = s.inputs[0]
        sharing = [t for t in alive if root[t] == root[x] and t != x]
        if s.op.view:
            root[s.name] = root[x]
            trace.append(sum(buffers.values()))
        elif s.op.inplace and x != INPUT and last[x] == i and not sharing and s.inputs.count(x) == 1:
            root[s.name] = root[x]
            trace.append(sum(buffers.values()))
        else:
            root[s.name] = s.name
            buffers[s.name] = s.out_elements * nbytes
            trace.append(sum(buffers.values()))
        alive.add(s.name)
        for t in set(s.inputs):
            if last[t] == i and t != INPUT:
                alive.discard(t)
        for b in [b for b in buffers if b != INPUT and not any(root[t] == b for t in alive)]:
            del buffers[b]
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
