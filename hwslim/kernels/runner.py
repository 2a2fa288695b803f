"""Run a :class:`~hwslim.supernet.SlimmableNet` with the fused Triton conv kernels.

Two entry points, both eval-mode (BN from running statistics) and both reading the
supernet's full-width weights in place:

* :func:`triton_forward` runs one config. It executes ``model.nodes`` like
  :func:`hwslim.graph.run_graph`, conv nodes through one fused kernel each
  (``act(bn(conv(x)) + residual)``), max-pool / global pool / classifier through torch.
  It has run_graph's ``start``/``stop``/``env`` resumption, and its environments hold
  ordinary tensors at the config's exact widths (channels-last), so a prefix computed by
  either runner can be resumed by the other.
* :func:`multi_forward` runs K configs in one pass (a greedy step's candidates). A
  :class:`MultiPlan` (built once per candidate set, reusable for every batch of the
  search split) assigns each node's outputs to *slices*: configs whose input, residual
  and widths at a node are identical share one slice, so the shared prefix runs once and
  every divergent layer runs all its distinct variants in one launch.

Logits are float32 whatever the activation dtype (bf16/fp16 inputs run the convs in
that dtype with fp32 accumulation).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from hwslim.config import ChannelConfig
from hwslim.costs import layer_macs, macs
from hwslim.graph import INPUT, Node, last_uses, resolve
from hwslim.kernels import KernelUnavailableError, check_device, supports
from hwslim.kernels.conv import META_COLUMNS, conv_bn_act, conv_bn_act_multi, fold_bn
from hwslim.supernet import SlimmableNet

# model -> {node name: (bn version key, scale, shift)}; weak so models can be freed
_FOLD_CACHE: "weakref.WeakKeyDictionary[SlimmableNet, dict]" = weakref.WeakKeyDictionary()


def _bn_key(bn: torch.nn.BatchNorm2d) -> tuple:
    # In-place updates (recalibration, training, load_state_dict) bump _version.
    return tuple((id(t), t._version, t.device) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)
                 if t is not None)


def folded_bn(model: SlimmableNet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every conv node's folded BN ``(scale, shift)`` (full width, float32), cached.

    Recomputed for a node only when its BN buffers or parameters changed since the last
    call (tracked through the tensors' version counters).
    """
    cache = _FOLD_CACHE.setdefault(model, {})
    out = {}
    for n in model.nodes:
        if n.op != "conv":
            continue
        bn = model.layers[n.name].bn
        key = _bn_key(bn)
        hit = cache.get(n.name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, *fold_bn(bn))
            cache[n.name] = hit
        out[n.name] = (hit[1], hit[2])
    return out


def _require(model: SlimmableNet, x: torch.Tensor) -> None:
    if not supports(model):
        raise KernelUnavailableError(f"the Triton runner does not support {getattr(model, 'name', model)!r} "
                                     "(it has grouped convs); use the PyTorch path")
    check_device(x.device)
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) input, got shape {tuple(x.shape)}")


def _widths(model: SlimmableNet, config: ChannelConfig | None) -> Mapping[str, int]:
    return model.config.widths if config is None else model.validate(config).widths


def _linear(model: SlimmableNet, node: Node, feat: torch.Tensor) -> torch.Tensor:
    lin = model.layers[node.name]
    c = feat.shape[1]  # exact width, or zero-padded (padding contributes nothing)
    return F.linear(feat.float(), lin.weight[:, :c].float(), None if lin.bias is None else lin.bias.float())


def _pool(node: Node, inp: torch.Tensor) -> torch.Tensor:
    if node.op == "maxpool":
        return F.max_pool2d(inp, node.kernel, node.stride, node.padding)
    return inp.mean(dim=(2, 3), dtype=torch.float32)  # gap: fp32 features for the classifier


@torch.no_grad()
def triton_forward(model: SlimmableNet, x: torch.Tensor, config: ChannelConfig | None = None, *,
                   start: int = 0, stop: int | None = None, env: dict[str, torch.Tensor] | None = None,
                   tf32: bool | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Logits of ``model`` at ``config`` (default: its current config), eval-mode BN.

    Same contract as :func:`hwslim.graph.run_graph`: runs ``nodes[start:stop]``; with
    ``stop`` set it returns the environment (live tensors by name) that a later call
    resumes with ``start=stop, env=env``. ``tf32`` as in
    :func:`hwslim.kernels.conv.conv_bn_act`. Raises :class:`KernelUnavailableError`
    off CUDA (unless ``TRITON_INTERPRET=1``) or for a model :func:`supports` rejects.
    """
    _require(model, x)
    widths = _widths(model, config)
    nodes = model.nodes
    bn = folded_bn(model)
    env = {INPUT: x.contiguous(memory_format=torch.channels_last)} if env is None else dict(env)
    free_after = last_uses(nodes)
    stop = len(nodes) if stop is None else stop
    for i in range(start, stop):
        n = nodes[i]
        inp = env[n.input]
        if n.op == "conv":
            conv = model.layers[n.name].conv
            cin = resolve(n.cin, widths)
            scale, shift = bn[n.name]
            y = conv_bn_act(inp, conv.weight, scale, shift, stride=n.stride, padding=n.padding, act=n.act,
                            residual=None if n.residual is None else env[n.residual], depthwise=n.depthwise,
                            cin=cin, cout=cin if n.depthwise else resolve(n.cout, widths), tf32=tf32)
        elif n.op == "linear":
            y = _linear(model, n, inp)
        else:
            y = _pool(n, inp)
        env[n.name] = y
        del inp, y
        for name in (n.input, n.residual):
            if name is not None and free_after.get(name) == i:
                env.pop(name, None)
    if stop < len(nodes):
        return env
    return env[nodes[-1].name]


# -- K configs at once ----------------------------------------------------------------------
@dataclass(frozen=True)
class NodeStep:
    """How one node runs in a multi-config pass.

    ``smap[k]`` is the output slice holding config k's tensor; for conv nodes ``rows``
    are the meta rows ``(cin, cout, x_slice, res_slice, bn_row)`` of the distinct output
    slices, stored at ``meta_offset`` in the plan's device table, and ``c_alloc`` is the
    widest output (the allocated channel count).
    """

    smap: tuple[int, ...]
    rows: tuple[tuple[int, int, int, int, int], ...] = ()
    meta_offset: int = 0
    c_alloc: int = 0
    cin_max: int = 0


@dataclass(frozen=True)
class MultiPlan:
    """A multi-config pass, planned once per set of configs (see :func:`plan_multi`)."""

    model_name: str
    configs: tuple[ChannelConfig, ...]
    steps: tuple[NodeStep, ...]
    meta: torch.Tensor  # int32 (total rows, 5) on the device
    final_index: torch.Tensor  # int64 (K,): config k's slice of the logits

    @property
    def slices(self) -> list[int]:
        """Distinct variants computed per node (1 where all configs agree)."""
        return [len(set(s.smap)) for s in self.steps]

    def work_fraction(self, model: SlimmableNet, input_size: int | None = None) -> float:
        """MACs this plan computes over the MACs of running each config separately."""
        size = input_size or model.input_size
        per = [model.layer_specs(c, 1, size) for c in self.configs]
        separate = sum(macs(specs) for specs in per)
        shared = 0
        for i, step in enumerate(self.steps):
            seen = {}
            for k, s in enumerate(step.smap):
                seen.setdefault(s, k)
            shared += sum(layer_macs(per[k][i]) for k in seen.values())
        return shared / separate


def plan_multi(model: SlimmableNet, configs: Sequence[ChannelConfig],
               device: torch.device | str | None = None) -> MultiPlan:
    """Plan a pass evaluating every config of ``configs`` on the same images.

    At each node, configs whose input slice, residual slice and widths agree share an
    output slice; so the configs of one greedy step (each one unit narrower) run their
    common prefix once and diverge where their unit first appears.
    """
    if not configs:
        raise ValueError("plan_multi needs at least one config")
    widths = [model.validate(c).widths for c in configs]
    k = len(configs)
    maps: dict[str, tuple[int, ...]] = {INPUT: (0,) * k}
    steps, table = [], []
    for n in model.nodes:
        in_map = maps[n.input]
        if n.op != "conv":
            steps.append(NodeStep(in_map))
            maps[n.name] = in_map
            continue
        res_map = maps[n.residual] if n.residual is not None else (0,) * k
        keys: dict[tuple, int] = {}
        smap = []
        for j in range(k):
            cin = resolve(n.cin, widths[j])
            cout = cin if n.depthwise else resolve(n.cout, widths[j])
            key = (cin, cout, in_map[j], res_map[j], 0)
            smap.append(keys.setdefault(key, len(keys)))
        rows = tuple(keys)
        steps.append(NodeStep(tuple(smap), rows, len(table), max(r[1] for r in rows), max(r[0] for r in rows)))
        table.extend(rows)
        maps[n.name] = tuple(smap)
    device = device if device is not None else next(model.parameters()).device
    meta = torch.tensor(table or [[0] * len(META_COLUMNS)], dtype=torch.int32).to(device)
    final_index = torch.tensor(steps[-1].smap, dtype=torch.int64).to(device)
    return MultiPlan(model.name, tuple(configs), tuple(steps), meta, final_index)


@torch.no_grad()
def multi_forward(model: SlimmableNet, x: torch.Tensor, plan: MultiPlan | Sequence[ChannelConfig], *,
                  tf32: bool | None = None) -> torch.Tensor:
    """Logits of every config of ``plan`` on the images ``x``: shape ``(K, N, classes)``.

    ``plan`` is a :class:`MultiPlan` (reuse it across batches) or a list of configs.
    Equal, up to float rounding, to ``triton_forward(model, x, configs[k])`` for each k.
    """
    _require(model, x)
    if not isinstance(plan, MultiPlan):
        plan = plan_multi(model, plan, x.device)
    if plan.model_name != model.name:
        raise ValueError(f"plan is for {plan.model_name!r}, not {model.name!r}")
    if plan.meta.device != x.device:
        raise ValueError(f"plan lives on {plan.meta.device}, input on {x.device}: plan on the input's device")
    batch = x.shape[0]
    bn = folded_bn(model)
    env = {INPUT: x.contiguous(memory_format=torch.channels_last)}
    nodes = model.nodes
    free_after = last_uses(nodes)
    for i, (n, step) in enumerate(zip(nodes, plan.steps)):
        inp = env[n.input]
        if n.op == "conv":
            conv = model.layers[n.name].conv
            scale, shift = bn[n.name]
            meta = plan.meta[step.meta_offset: step.meta_offset + len(step.rows)]
            y = conv_bn_act_multi(inp, conv.weight, scale, shift, meta, batch=batch, cout_alloc=step.c_alloc,
                                  stride=n.stride, padding=n.padding, act=n.act,
                                  residual=None if n.residual is None else env[n.residual],
                                  depthwise=n.depthwise, cin_max=step.cin_max, tf32=tf32)
        elif n.op == "linear":
            y = _linear(model, n, inp)
        else:
            y = _pool(n, inp)
        env[n.name] = y
        del inp, y
        for name in (n.input, n.residual):
            if name is not None and free_after.get(name) == i:
                env.pop(name, None)
    logits = env[nodes[-1].name]
    return logits.view(-1, batch, logits.shape[-1]).index_select(0, plan.final_index)
