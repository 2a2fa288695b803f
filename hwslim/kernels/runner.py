"""Run a :class:`~hwslim.core.supernet.SlimmableNet` with the fused Triton conv kernels.

Two entry points, both reading the supernet's full-width weights in place (no slicing
copies) and never touching its parameters or buffers:

* :func:`triton_forward` runs one config. It executes ``model.nodes`` like
  :func:`hwslim.core.graph.run_graph`, conv nodes through one fused kernel each
  (``act(bn(conv(x)) + residual)``; a depthwise conv and the 1x1 conv reading it as one
  kernel with ``fuse=True``), max-pool / global pool / classifier through torch.
  It has run_graph's ``start``/``stop``/``env`` resumption, and its environments hold
  ordinary tensors at the config's exact widths (channels-last), so a prefix computed by
  either runner can be resumed by the other.
* :func:`multi_forward` runs K configs in one pass (a greedy step's candidates). A
  :class:`MultiPlan` (built once per candidate set, reusable for every batch of the
  search split) assigns each node's outputs to *slices*: configs whose input, residual
  and widths at a node are identical share one slice, so the shared prefix runs once and
  every divergent layer runs all its distinct variants in one launch.

BatchNorm, as the search's evaluator needs it (``bn=``):

* ``"running"``: eval mode, the supernet's running statistics, folded into the conv
  kernel (one kernel per conv node);
* ``"batch"``: train-mode BN, each batch normalized by its own statistics (a conv kernel
  that also reduces per-channel statistics, then one in-place normalize+residual+act
  kernel);
* a :class:`MultiBN` from :func:`multi_calibrate`: recalibrated statistics per config
  (the exact cumulative average that :func:`hwslim.core.slimmable.recalibrate_bn` computes),
  folded per slice.

Logits are float32 whatever the activation dtype (bf16/fp16 inputs run the convs in
that dtype with fp32 accumulation).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from hwslim.core.config import ChannelConfig
from hwslim.core.costs import layer_macs, macs
from hwslim.core.graph import INPUT, Node, last_uses, resolve
from hwslim.kernels import KernelUnavailableError, check_device, kernel_node, torch_node, unsupported
from hwslim.core.ops import Slice
from hwslim.kernels.conv import (META_COLUMNS, pow2_align, batch_bn_scale_shift, bn_act_, conv_bn_act,
                                 conv_bn_act_multi, conv_stats, dw_project_bn_act, fold_bn)
from hwslim.core.supernet import SlimmableNet

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
        if not kernel_node(n):
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


def _require(model: SlimmableNet, x: torch.Tensor, single: bool = False) -> None:
    """Refuse a model the runner cannot compute (``single``: one config, where other nodes fall
    back to PyTorch, so only a supernet is needed)."""
    from hwslim.core.supernet import SlimmableNet as _Net

    why = unsupported(model) if not single else (None if isinstance(model, _Net) else "not an hwslim supernet")
    if why is not None:
        raise KernelUnavailableError(f"the Triton runner cannot compute {getattr(model, 'name', model)!r}: {why}; "
                                     "use the PyTorch path")
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
    from hwslim.core.ops import GlobalAvgPool

    if isinstance(node.op, GlobalAvgPool):
        return inp.mean(dim=(2, 3), dtype=torch.float32)  # fp32 features for the classifier
    return node.op.run(None, [inp], Slice())


def _residual(node: Node) -> str | None:
    return node.inputs[1] if len(node.inputs) > 1 else None


def _conv_widths(model: SlimmableNet, node: Node, widths: Mapping[str, int]) -> tuple[int, int]:
    """(cin, cout) of a conv node at ``widths`` (a tied conv's output follows its input)."""
    cin = resolve(model.tensor_layout(node.inputs[0])[0], widths)
    return cin, (cin if node.out is None else resolve(node.out, widths))


def fusable_pairs(nodes: Sequence[Node], start: int = 0, stop: int | None = None) -> set[int]:
    """Indices i where depthwise node i feeds 1x1 node i+1 and nothing else reads it.

    Such pairs (an inverted residual block's depthwise + project) run as one fused
    kernel in eval-mode BN, the depthwise output never stored. Pairs crossing ``start``
    or ``stop`` are left alone, so a resumable environment always holds real tensors.
    """
    stop = len(nodes) if stop is None else stop
    readers: dict[str, int] = {}
    for n in nodes:
        for name in n.inputs:
            readers[name] = readers.get(name, 0) + 1
    out = set()
    for i in range(start, stop - 1):
        a, b = nodes[i], nodes[i + 1]
        if (kernel_node(a) and a.op.depthwise and len(a.inputs) == 1 and kernel_node(b)
                and b.op.group_width is None and b.op.kernel == 1 and b.op.stride == 1
                and b.input == a.name and readers.get(a.name) == 1):
            out.add(i)
    return out


def _execute(model: SlimmableNet, env: dict[str, torch.Tensor], start: int, stop: int, conv_fn,
             pair_fn=None, pairs: set[int] | frozenset[int] = frozenset(), fallback: bool = False
             ) -> dict[str, torch.Tensor]:
    """run_graph's loop: ``conv_fn(i, node, inp, residual)`` computes kernel nodes, torch the rest.

    For ``i`` in ``pairs``, ``pair_fn(i, inp, residual)`` computes nodes i and i+1 at once
    (the output of node i+1; node i's is never materialized). With ``fallback`` (one
    config, exact widths), a node the kernels cannot compute runs through the supernet's
    own PyTorch path.
    """
    nodes = model.nodes
    free_after = last_uses(nodes)
    i = start
    while i < stop:
        n = nodes[i]
        inp = env[n.input]
        last = i
        if i in pairs:
            last = i + 1
            nxt = nodes[last]
            res = _residual(nxt)
            y = pair_fn(i, inp, None if res is None else env[res])
            n = nxt
        elif kernel_node(n):
            res = _residual(n)
            y = conv_fn(i, n, inp, None if res is None else env[res])
        elif torch_node(n):
            y = _linear(model, n, inp) if n.op.sets_width else _pool(n, inp)
        elif fallback:
            y = model._layer(n, [env[t] for t in n.inputs], False)
            if y.dim() == 4:
                y = y.contiguous(memory_format=torch.channels_last)
        else:
            raise KernelUnavailableError(f"the Triton runner cannot compute node {n.name!r} ({n.op.kind})")
        env[n.name] = y
        del inp, y
        for j in range(i, last + 1):
            for name in nodes[j].inputs:
                if free_after.get(name) == j:
                    env.pop(name, None)
        i = last + 1
    return env


def _check_bn_mode(bn) -> None:
    if not (bn in BN_MODES or isinstance(bn, MultiBN)):
        raise ValueError(f"bn must be one of {BN_MODES} (or a MultiBN for multi_forward), got {bn!r}")


BN_MODES = ("running", "batch")


@torch.no_grad()
def triton_forward(model: SlimmableNet, x: torch.Tensor | None, config: ChannelConfig | None = None, *,
                   start: int = 0, stop: int | None = None, env: dict[str, torch.Tensor] | None = None,
                   bn: str = "running", fuse: bool = True,
                   tf32: bool | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Logits of ``model`` at ``config`` (default: its current config).

    Same contract as :func:`hwslim.core.graph.run_graph`: runs ``nodes[start:stop]``; with
    ``stop`` set it returns the environment (live tensors by name) that a later call
    resumes with ``start=stop, env=env`` (``x`` may then be None). ``bn`` is
    ``"running"`` (eval mode) or ``"batch"`` (train-mode statistics of this batch; the
    running statistics are not updated). ``fuse`` runs each depthwise + 1x1 pair as one
    kernel (:func:`fusable_pairs`; eval-mode BN only). ``tf32`` as in
    :func:`hwslim.kernels.conv.conv_bn_act`. Raises :class:`KernelUnavailableError`
    off CUDA (unless ``TRITON_INTERPRET=1``) or for a model :func:`supports` rejects.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if env is None:
        if x is None:
            raise ValueError("triton_forward needs x or env")
        env = {INPUT: x.contiguous(memory_format=torch.channels_last)}
    else:
        env = dict(env)
    _require(model, next(iter(env.values())) if x is None else x, single=True)
    widths = _widths(model, config)
    folded = folded_bn(model) if bn == "running" else None

    def conv_fn(i: int, n: Node, inp: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        layer, op = model.layers[n.name], n.op
        cin, cout = _conv_widths(model, n, widths)
        if folded is not None:
            return conv_bn_act(inp, layer.conv.weight, *folded[n.name], stride=op.stride, padding=op.padding,
                               act=op.act, residual=res, depthwise=op.depthwise, cin=cin, cout=cout, tf32=tf32)
        y, mean, var = conv_stats(inp, layer.conv.weight, stride=op.stride, padding=op.padding,
                                  depthwise=op.depthwise, cin=cin, cout=cout, tf32=tf32)
        return bn_act_(y, *batch_bn_scale_shift(layer.bn, mean, var), act=op.act, residual=res)

    def pair_fn(i: int, inp: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        a, b = model.nodes[i], model.nodes[i + 1]
        c, _ = _conv_widths(model, a, widths)
        return dw_project_bn_act(inp, model.layers[a.name].conv.weight, *folded[a.name],
                                 model.layers[b.name].conv.weight, *folded[b.name], stride=a.op.stride,
                                 padding=a.op.padding, dw_act=a.op.act, act=b.op.act, residual=res, cin=c,
                                 cout=_conv_widths(model, b, widths)[1], tf32=tf32)

    stop = len(model.nodes) if stop is None else stop
    pairs = fusable_pairs(model.nodes, start, stop) if fuse and folded is not None else set()
    with model.using(model.config_of(widths)):  # nodes the kernels cannot compute run in PyTorch at these widths
        was = model.training
        model.train(bn == "batch")
        try:
            env = _execute(model, env, start, stop, conv_fn, pair_fn, pairs, fallback=True)
        finally:
            model.train(was)
    return env if stop < len(model.nodes) else env[model.nodes[-1].name]


# -- K configs at once ----------------------------------------------------------------------
@dataclass(frozen=True)
class NodeStep:
    """How one node runs in a multi-config pass.

    ``smap[k]`` is the output slice holding config k's tensor; for conv nodes ``rows``
    are the meta rows ``(cin, cout, x_slice, res_slice, bn_row)`` of the distinct output
    slices, stored at ``meta_offset`` in the plan's device table, ``c_alloc`` is the
    widest output (the allocated channel count) and ``cin_max`` the widest input.
    """

    smap: tuple[int, ...]
    rows: tuple[tuple[int, int, int, int, int], ...] = ()
    meta_offset: int = 0
    c_alloc: int = 0
    cin_max: int = 0
    align: int = 1  # power of two dividing every width in rows (a vectorization hint)


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

    def node_meta(self, i: int) -> torch.Tensor:
        step = self.steps[i]
        return self.meta[step.meta_offset: step.meta_offset + len(step.rows)]

    def work_fraction(self, model: SlimmableNet, input_size: int | None = None) -> float:
        """MACs this plan computes over the MACs of running each config separately."""
        size = input_size or model.input_size
        per = [model.layer_specs(c, 1, size) for c in self.configs]
        separate = sum(macs(specs) for specs in per)
        shared = 0
        for i, step in enumerate(self.steps):
            first: dict[int, int] = {}
            for k, s in enumerate(step.smap):
                first.setdefault(s, k)
            shared += sum(layer_macs(per[k][i]) for k in first.values())
        return shared / separate


def plan_multi(model: SlimmableNet, configs: Sequence[ChannelConfig],
               device: torch.device | str | None = None) -> MultiPlan:
    """Plan a pass evaluating every config of ``configs`` on the same images.

    At each node, configs whose input slice, residual slice and widths agree share an
    output slice; so the configs of one greedy step (each one unit narrower) run their
    common prefix once and diverge where their unit first appears. ``device`` defaults
    to the model's.
    """
    if not configs:
        raise ValueError("plan_multi needs at least one config")
    widths = [model.validate(c).widths for c in configs]
    k = len(configs)
    maps: dict[str, tuple[int, ...]] = {INPUT: (0,) * k}
    steps, table = [], []
    for n in model.nodes:
        in_map = maps[n.input]
        if not kernel_node(n):
            steps.append(NodeStep(in_map))
            maps[n.name] = in_map
            continue
        res = _residual(n)
        res_map = maps[res] if res is not None else (0,) * k
        keys: dict[tuple, int] = {}
        smap = []
        for j in range(k):
            cin, cout = _conv_widths(model, n, widths[j])
            key = (cin, cout, in_map[j], res_map[j], 0)
            smap.append(keys.setdefault(key, len(keys)))
        rows = tuple(keys)
        align = pow2_align(*(w for r in rows for w in r[:2]))
        steps.append(NodeStep(tuple(smap), rows, len(table), max(r[1] for r in rows), max(r[0] for r in rows),
                              align))
        table.extend(rows)
        maps[n.name] = tuple(smap)
    device = device if device is not None else next(model.parameters()).device
    meta = torch.tensor(table or [[0] * len(META_COLUMNS)], dtype=torch.int32).to(device)
    final_index = torch.tensor(steps[-1].smap, dtype=torch.int64).to(device)
    return MultiPlan(model.name, tuple(configs), tuple(steps), meta, final_index)


@dataclass(frozen=True)
class MultiBN:
    """Recalibrated BN of every config of a plan: per conv node, folded ``(S, C)`` rows.

    Row s of node ``name`` is slice s's eval-mode ``(scale, shift)``, from running
    statistics estimated like :func:`hwslim.core.slimmable.recalibrate_bn` does (reset, then
    the cumulative average over the calibration batches of each batch's mean and
    unbiased variance). ``mean``/``var`` keep those statistics, for inspection.
    """

    scale: dict[str, torch.Tensor]
    shift: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    batches: int


def _as_plan(model: SlimmableNet, plan, device: torch.device) -> MultiPlan:
    if not isinstance(plan, MultiPlan):
        plan = plan_multi(model, plan, device)
    if plan.model_name != model.name:
        raise ValueError(f"plan is for {plan.model_name!r}, not {model.name!r}")
    if plan.meta.device != device:
        raise ValueError(f"plan lives on {plan.meta.device}, input on {device}: build it on the input's device")
    return plan


def _multi_pass(model: SlimmableNet, x: torch.Tensor, plan: MultiPlan, bn, tf32: bool | None,
                collect: dict | None = None, fuse: bool = False) -> torch.Tensor:
    batch = x.shape[0]
    folded = folded_bn(model) if bn == "running" else None

    def conv_fn(i: int, n: Node, inp: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        step, weight, op = plan.steps[i], model.layers[n.name].conv.weight, n.op
        meta = plan.node_meta(i)
        kw = dict(batch=batch, cout_alloc=step.c_alloc, stride=op.stride, padding=op.padding,
                  depthwise=op.depthwise, cin_max=step.cin_max, width_align=step.align, tf32=tf32)
        if folded is not None:
            return conv_bn_act_multi(inp, weight, *folded[n.name], meta, act=op.act, residual=res, **kw)
        if isinstance(bn, MultiBN):
            return conv_bn_act_multi(inp, weight, bn.scale[n.name], bn.shift[n.name], meta, act=op.act,
                                     residual=res, bn_per_slice=True, **kw)
        y, mean, var = conv_stats(inp, weight, meta=meta, **kw)
        if collect is not None:
            collect[n.name] = (mean, var, y.numel() // y.shape[1] // len(step.rows))
        return bn_act_(y, *batch_bn_scale_shift(model.layers[n.name].bn, mean, var), act=op.act, residual=res,
                       meta=meta, batch=batch, bn_per_slice=True, width_align=step.align)

    def pair_fn(i: int, inp: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        a, b = model.nodes[i], model.nodes[i + 1]
        sa, sb = plan.steps[i], plan.steps[i + 1]
        if isinstance(bn, MultiBN):
            da, db, per_slice = (bn.scale[a.name], bn.shift[a.name]), (bn.scale[b.name], bn.shift[b.name]), True
        else:
            da, db, per_slice = folded[a.name], folded[b.name], False
        return dw_project_bn_act(inp, model.layers[a.name].conv.weight, *da, model.layers[b.name].conv.weight, *db,
                                 stride=a.op.stride, padding=a.op.padding, dw_act=a.op.act, act=b.op.act, residual=res,
                                 meta=plan.node_meta(i + 1), dw_meta=plan.node_meta(i), batch=batch,
                                 cout_alloc=sb.c_alloc, cin_max=sb.cin_max, bn_per_slice=per_slice,
                                 width_align=min(sa.align, sb.align), tf32=tf32)

    pairs = fusable_pairs(model.nodes) if fuse and bn != "batch" else set()
    env = _execute(model, {INPUT: x.contiguous(memory_format=torch.channels_last)}, 0, len(model.nodes), conv_fn,
                   pair_fn, pairs)
    logits = env[model.nodes[-1].name]
    return logits.view(-1, batch, logits.shape[-1]).index_select(0, plan.final_index)


@torch.no_grad()
def multi_forward(model: SlimmableNet, x: torch.Tensor, plan: MultiPlan | Sequence[ChannelConfig], *,
                  bn: str | MultiBN = "running", fuse: bool = True, tf32: bool | None = None) -> torch.Tensor:
    """Logits of every config of ``plan`` on the images ``x``: shape ``(K, N, classes)``.

    ``plan`` is a :class:`MultiPlan` (reuse it across batches) or a list of configs.
    ``bn``: ``"running"``, ``"batch"`` or a :class:`MultiBN` (see the module doc).
    ``fuse``: depthwise + 1x1 pairs as one kernel (eval-mode BN only).
    Equal, up to float rounding, to ``triton_forward(model, x, configs[k], bn=...)``.
    """
    _check_bn_mode(bn)
    _require(model, x)
    plan = _as_plan(model, plan, x.device)
    return _multi_pass(model, x, plan, bn, tf32, fuse=fuse)


@torch.no_grad()
def multi_calibrate(model: SlimmableNet, batches: Iterable[torch.Tensor], plan: MultiPlan | Sequence[ChannelConfig],
                    *, tf32: bool | None = None) -> MultiBN:
    """Recalibrated BN for every config of ``plan`` over ``batches`` (the search split's chunks).

    Each batch runs in train-mode BN (normalized by its own statistics, as
    ``recalibrate_bn`` runs it), and every (node, slice) keeps the cumulative average of
    its batch means and unbiased variances: exactly PyTorch's ``momentum=None`` running
    statistics. The supernet's own buffers are not touched.
    """
    sums: dict[str, list] = {}
    n_batches = 0
    for x in batches:
        if isinstance(x, (tuple, list)):
            x = x[0]
        _require(model, x)
        if n_batches == 0:
            plan = _as_plan(model, plan, x.device)
        stats: dict = {}
        _multi_pass(model, x, plan, "batch", tf32, collect=stats)
        for name, (mean, var, n) in stats.items():
            unbiased = var.double() * (n / max(n - 1, 1))
            acc = sums.setdefault(name, [torch.zeros_like(mean, dtype=torch.float64),
                                         torch.zeros_like(var, dtype=torch.float64)])
            acc[0] += mean.double()
            acc[1] += unbiased
        n_batches += 1
    if n_batches == 0:
        raise ValueError("multi_calibrate needs at least one batch")
    scale, shift, means, variances = {}, {}, {}, {}
    for name, (msum, vsum) in sums.items():
        bn = model.layers[name].bn
        mean, var = (msum / n_batches), (vsum / n_batches)
        c = mean.shape[-1]
        gamma = bn.weight.detach()[:c].double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach()[:c].double() if bn.bias is not None else torch.zeros_like(mean)
        sc = gamma / torch.sqrt(var + bn.eps)
        scale[name], shift[name] = sc.float().contiguous(), (beta - mean * sc).float().contiguous()
        means[name], variances[name] = mean.float(), var.float()
    return MultiBN(scale, shift, means, variances, n_batches)


EVALUATOR_BN_MODES = ("recal", "batch", "running")


@torch.no_grad()
def step_logits(model: SlimmableNet, chunks: Sequence[torch.Tensor], configs: Sequence[ChannelConfig], *,
                bn: str = "recal", fuse: bool = True, tf32: bool | None = None,
                calib_chunks: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Logits of every config on every chunk, with the search evaluator's BN modes.

    ``bn``: ``"recal"`` (recalibrate each config's BN over all ``chunks``, or over
    ``calib_chunks`` when given, as
    :func:`hwslim.core.slimmable.recalibrate_bn` does, then eval mode), ``"batch"`` (each chunk
    normalized by its own statistics) or ``"running"`` (the supernet's statistics).
    Returns one ``(K, chunk, classes)`` float32 tensor per chunk; config k's scores come
    from ``[out[k] for out in result]``. One plan, one calibration pass and one pass per
    chunk for all K configs::

        >>> outs = step_logits(net, chunks, [cfg for _, cfg in candidates], bn="recal")
    """
    if bn not in EVALUATOR_BN_MODES:
        raise ValueError(f"bn must be one of {EVALUATOR_BN_MODES}, got {bn!r}")
    if not chunks:
        raise ValueError("step_logits needs at least one chunk")
    _require(model, chunks[0])
    plan = plan_multi(model, configs, chunks[0].device)
    mode: str | MultiBN = multi_calibrate(model, calib_chunks or chunks, plan, tf32=tf32) if bn == "recal" else bn
    return [multi_forward(model, x, plan, bn=mode, fuse=fuse, tf32=tf32) for x in chunks]
