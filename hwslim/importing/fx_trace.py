"""Import a user's ``nn.Module``: trace it, map it onto hwslim's operators, find its channel units.

``import_model(module, example_input)`` returns a :class:`~hwslim.core.supernet.SlimmableNet`
that at its full config computes what ``module`` computes (eval mode), with the module's
weights copied in::

    >>> import torchvision
    >>> net = import_model(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    >>> net.units["layer1/0/conv1"].grid            # doctest: +SKIP
    (8, 16, 24, 32, 40, 48, 56, 64)

How:

1. **Trace** with ``torch.fx.symbolic_trace`` and record every tensor's shape
   (``ShapeProp`` on the example input). Where fx cannot trace the forward (Python
   control flow on a tensor's shape), ``torch.export`` records it on the example input
   and its ATen graph is rewritten into the same form (:mod:`hwslim.importing.torch_export`); a branch
   on a shape then follows the example's shape.
2. **Group** the traced nodes into hwslim operators, asking each registered operator's import
   rule (:meth:`~hwslim.core.ops.Op.from_torch`) in turn: a conv with the BatchNorm after it,
   the residual add after that and the activation after both (the fused unit a runtime
   executes); the squeeze-and-excitation pattern (pool, 1x1 conv, activation, 1x1 conv,
   gate, multiply); standalone BatchNorm/GroupNorm/PReLU/activation/add; a product of two
   branches (a gate); scalar arithmetic; upsampling; concatenation; pools; flatten;
   linear (with its activation); ShuffleNet's channel shuffle (view, transpose, view)
   and slices of the channels (``chunk``, ``split``, ``x[:, a:b]``): an equal split of a
   dense conv's output makes that conv's output in parts, each slimmable (YOLOv8's C2f);
   a transposed conv (a learned upsampling); YOLO11's attention, kept whole as one
   fixed-width operator.
   Dropout, identity and stochastic depth are the identity at inference; after
   ``y.add_(x)``, ``y`` reads the sum. Anything else is refused with the graph node, the
   module type, the source line and what is missing (:class:`ImportRefused`); so is a
   module called more than once (its weights would be split into independent layers).
3. **Units** come from a union-find over channel dimensions: a dense conv or linear
   layer starts a new one; a depthwise or grouped conv keeps its input's (a grouped
   conv's width then moves in multiples of its group width); both sides of an add, a
   residual or SE's multiply are merged; a concatenation's channels are its parts'.
   Fixed, never slimmed: the image channels, the network's outputs (every one of a
   tuple, list or dict of them), and the outputs of
   modules whose qualified name matches ``keep``. A shuffle or slice moves channels to
   other positions, so the units it reads or feeds cannot slim: with ``fix_unsupported``
   they are fixed and listed (:func:`fixed_units`), else the import is refused.
4. **Weights** are copied module by module; the supernet's unit names follow the module
   that first produces the unit (``layer1.0.conv1`` -> ``layer1/0/conv1``).
"""
from __future__ import annotations

import contextlib
import io
import math
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hwslim.core.errors import ModelError
from hwslim.core.graph import INPUT, Graph, Node, UnitDef
from hwslim.core.activations import LEAKY_SLOPES, leaky_name
from hwslim.core.ops import (OPS, ChannelPart, ChannelShuffle, ChannelSlice, Claim, Conv, GlobalAvgPool, Op,
                             SqueezeExcite, is_batch_norm, square)


class ImportRefused(ModelError):
    """The module has an operation hwslim cannot express (or cannot slim): it names the node."""


# -- what fx nodes are ---------------------------------------------------------------------------------
_ACT_MODULES: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                                 nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                                 nn.GELU: "gelu"}
_ACT_FUNCTIONS: dict[Any, str] = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                                  F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
                                  F.sigmoid: "sigmoid", F.gelu: "gelu", torch.relu_: "relu", F.relu_: "relu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_IDENTITY_MODULES = (nn.Identity,)
_ADD = (operator.add, operator.iadd, torch.add)
_MUL = (operator.mul, operator.imul, torch.mul)
_SPLITS = {torch.chunk: "chunk", torch.split: "split", torch.tensor_split: "tensor_split"}  # and their methods
_RESHAPES = ("view", "reshape", "flatten")
# what a refusal says hwslim lacks, by the module class or function name no operator claimed
_REFUSALS = {"view": "a reshape that mixes channels", "reshape": "a reshape that mixes channels",
             "transpose": "a transpose (channel shuffle)", "permute": "a permute (channels-last blocks)",
             "chunk": "splitting channels (chunk)", "split": "splitting channels (split)",
             "split_with_sizes": "splitting channels (split)", "tensor_split": "splitting channels (split)",
             "getitem": "indexing or slicing a tensor (x[:, a:b])", "layer_norm": "LayerNorm",
             "pad": "explicit padding (F.pad)", "leaky_relu": "the activation leaky_relu with this slope",
             "LeakyReLU": "the activation LeakyReLU with this slope", "LayerNorm": "LayerNorm",
             "LayerNorm2d": "LayerNorm"}


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
        return stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None


def _scope(node: fx.Node) -> str:
    """The qualified name of the module whose forward made ``node`` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return str(last[0] if isinstance(last, tuple) else last)


def _where(node: fx.Node, gm: fx.GraphModule) -> str:
    """``node 'layer1.0.conv1' (Conv2d, torchvision/models/resnet.py:92)`` for messages; an ATen operator
    torch.export left is named by the module that called it: ``module 'model.10' (Upsample, ...)``."""
    stack = node.meta.get("stack_trace") or ""
    line = ""
    for m in re.finditer(r'File "([^"]+)", line (\d+)', stack):
        if not re.search(r"site-packages/torch/", m.group(1)):  # torch's own frames (the tracer, containers)
            line = f", {m.group(1).split('site-packages/')[-1]}:{m.group(2)}"
    caller = _aten_caller(node)
    if node.meta.get("hwslim_exported"):  # torch.export names nodes after ATen operators: name the module
        caller = (str(node.target), _what(node, gm)) if node.op == "call_module" else _caller(node)
    if caller is not None:
        return f"module {caller[0] or '(the model)'!r} ({caller[1]}{line})"
    owner = _caller(node)  # a function or method inside a submodule's forward: name that module too
    inside = f"module {owner[0]!r} ({owner[1]}), " if owner is not None and owner[0] else ""
    return f"{inside}node {node.name!r} ({_what(node, gm)}{line})"


def _aten_caller(node: fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the module whose forward called ``node``, when ``node`` is an
    ATen operator torch.export recorded (its name says nothing to the model's author), else None."""
    if node.op != "call_function" or not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    return _caller(node)


def _caller(node: fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the innermost module whose forward made ``node``, if recorded."""
    if node.op == "call_module":
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return str(path), str(getattr(cls, "__name__", cls)).rpartition(".")[2]


def _module_of(node: fx.Node, gm: fx.GraphModule) -> str:
    """``module 'model.10.m.0.attn' (Attention)``: the module a claimed node is (the list of fixed units)."""
    caller = (str(node.target), _what(node, gm)) if node.op == "call_module" else _caller(node)
    return f"module {caller[0] or '(the model)'!r} ({caller[1]})" if caller else f"node {node.name!r}"


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    """The module class or function (tensor method) a node calls; for an ATen operator, its caller's class."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    caller = _aten_caller(node)
    return caller[1] if caller is not None else getattr(node.target, "__name__", str(node.target))


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, with every module an operator claims (:attr:`Op.torch_modules`:
    BatchNorm2d, Conv2d, Linear...) kept whole.

    Subclasses of them (timm's ``Linear``; ``BatchNormAct2d``: a BatchNorm with its activation inside;
    ``Conv2dSame``: TensorFlow's input-dependent padding) would otherwise be traced into
    ``F.batch_norm`` on attributes, or fail on the padding's control flow; kept whole, the
    importer maps the ones it understands and refuses the others by name.
    """

    record_stack_traces = True  # refusals name the source line

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        claimed = tuple(t for op in OPS.values() for t in op.torch_modules)
        named = {t for op in OPS.values() for t in op.torch_module_names}
        return isinstance(m, claimed) or f"{type(m).__module__}.{type(m).__qualname__}" in named or \
            super().is_leaf_module(m, qualname)


def _module_act(m: nn.Module) -> str | None:
    """The activation an activation module computes (None: not one hwslim knows).

    Known classes are looked up; any other module (timm's ``Sigmoid``, ``GELU``...) is
    traced on its own and recognized when its forward is exactly one known activation.
    """
    if isinstance(m, nn.GELU):
        return "gelu" if m.approximate == "none" else None
    if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    if isinstance(m, nn.LeakyReLU):
        return _leaky(m.negative_slope)
    if isinstance(m, nn.ELU):
        return "elu" if m.alpha == 1.0 else None
    if type(m) in _ACT_MODULES:
        return _ACT_MODULES[type(m)]
    if type(m).__module__.startswith("torch.nn") or any(True for _ in m.parameters()):
        return None
    try:
        nodes = [n for n in fx.symbolic_trace(m).graph.nodes if n.op not in ("placeholder", "output")]
    except Exception:  # not traceable on its own: not a plain activation
        return None
    if len(nodes) != 1 or nodes[0].op == "call_module":
        return None
    n = nodes[0]
    if n.op == "call_function":
        return _function_act(n)
    return _ACT_METHODS.get(n.target) if n.op == "call_method" else None


def _leaky(slope: float) -> str | None:
    return leaky_name(slope) if slope in LEAKY_SLOPES else None


def _arg(n: fx.Node, i: int, name: str, default: Any) -> Any:
    """Argument ``i`` (keyword ``name``) of a call."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _function_act(n: fx.Node) -> str | None:
    """The activation a ``call_function`` node computes (None: not one hwslim knows)."""
    if n.target is F.gelu:
        return "gelu" if n.kwargs.get("approximate", "none") == "none" else None
    if n.target is F.hardtanh:
        return "relu6" if tuple(n.args[1:3]) == (0.0, 6.0) else None
    if n.target is F.leaky_relu:
        return _leaky(_arg(n, 1, "negative_slope", 0.01))
    if n.target is F.elu:
        return "elu" if _arg(n, 1, "alpha", 1.0) == 1.0 else None
    return _ACT_FUNCTIONS.get(n.target)


def _is_plain(m: nn.Module, base: type) -> bool:
    """``m`` computes what ``base`` computes: its class keeps ``base.forward``, or its own forward
    traces to the one call ``base.forward`` makes on the same parameters and settings (timm's
    ``Linear``, which only adds a TorchScript branch)."""
    if type(m).forward is base.forward:
        return True
    calls = {nn.Linear: (F.linear, ()), nn.Conv2d: (F.conv2d, ("stride", "padding", "dilation", "groups"))}
    if base not in calls:
        return False
    fn, settings = calls[base]
    try:
        nodes = [n for n in fx.symbolic_trace(m).graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    except Exception:  # input-dependent control flow: not the plain layer
        return False
    if len(nodes) != 1 or nodes[0].op != "call_function" or nodes[0].target is not fn:
        return False
    args = list(nodes[0].args) + [nodes[0].kwargs.get(k) for k in ("bias",) if k in nodes[0].kwargs]
    params = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in args[1:3]]
    if params[:1] != ["weight"] or (len(params) > 1 and params[1] not in ("bias", None)):
        return False
    return all(square(a) == square(getattr(m, k)) or a == getattr(m, k) for a, k in zip(args[3:], settings))


@dataclass
class _Group:
    """hwslim operator made of one or more fx nodes."""

    op: Op | None  # None: the identity (an alias of its input)
    members: list[fx.Node]
    inputs: list[fx.Node]  # fx nodes whose values it reads, in operator order
    sources: dict[str, nn.Module] = field(default_factory=dict)  # role -> module holding the weights
    out_channels: int = 0
    mid: int = 0
    name: str = ""
    base: str = ""  # the name to give it (default: its first node's module path or fx name)
    what: str = ""  # an operator that moves channels (ChannelShuffle, ChannelSlice): what it was in the module
    sliced: ChannelSlice | None = None  # a slice read as a whole part of its input (ChannelPart), per flow

    @property
    def last(self) -> fx.Node:
        return self.members[-1]


class _Importer:
    def __init__(self, module: nn.Module, example: torch.Tensor, keep: str | None, name: str | None,
                 fix_unsupported: bool = False) -> None:
        self.root = module.eval()
        self.example = example
        self.fix_unsupported = fix_unsupported
        self.output_mode = "full"  # set by import_model: "raw" when a detector's decoding was cut off
        self.fixed_units: dict[str, dict[str, Any]] = {}  # unit -> width, and the operator that fixed it
        self.keep = compile_keep(keep) if keep else None
        self.kept = 0  # groups --keep matched
        self.name = name or type(module).__name__.lower()
        self.traced_by = "torch.fx"
        try:
            self.gm = fx.GraphModule(self.root, _Tracer().trace(self.root))
        except Exception as e:  # fx raises many kinds for Python control flow on tensors
            fx_error = _first_line(e)
            try:  # torch.export runs the forward instead: a branch on a shape follows the example's
                from hwslim.importing.torch_export import exported_graph

                whole = frozenset(t for op in OPS.values() for t in op.torch_module_names)
                self.gm = exported_graph(self.root, example, whole)
                self.traced_by = "torch.export"
            except Exception as e2:
                raise ImportRefused(f"torch.fx cannot trace {type(module).__name__} ({fx_error}), nor can "
                                    f"torch.export ({_first_line(e2)}); make its forward free of control flow that "
                                    "depends on tensor values") from None
        self.drop_identities()
        self.follow_in_place()
        _propagate(self.gm, example, type(module).__name__)
        self.nodes = list(self.gm.graph.nodes)
        self.users = {n: list(n.users) for n in self.nodes}
        self.consumed: set[fx.Node] = set()
        self.groups: list[_Group] = []
        self.alias: dict[fx.Node, fx.Node] = {}  # identity nodes -> the node whose value they carry

    # -- helpers --------------------------------------------------------------------------------------
    def drop_identities(self) -> None:
        """Remove the modules and calls that are the identity at inference (dropout, ``nn.Identity``,
        stochastic depth): fx records them, torch.export does not; without them both graphs group
        alike and a conv fuses the activation behind an identity (timm's ``drop_block``).
        (``contiguous()`` stays: a ``view`` after it needs it.)"""
        graph = self.gm.graph
        for n in list(graph.nodes):
            if n.op in ("call_module", "call_function") and self.is_identity(n):
                args = [a for a in n.args if isinstance(a, fx.Node)]
                if args:
                    n.replace_all_uses_with(args[0])
                    graph.erase_node(n)
        self.gm.recompile()

    def follow_in_place(self) -> None:
        """After ``y.add_(x)`` (a tensor method ending in ``_``), ``y`` holds the result: later readers of
        ``y`` read that node, so a graph whose values are never overwritten computes the same."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for n in list(self.gm.graph.nodes):
            if n.op != "call_method" or not n.target.endswith("_") or n.target.startswith("_") or \
                    not n.args or not isinstance(n.args[0], fx.Node):
                continue
            y = n.args[0]
            for user in list(y.users):
                if order[user] > order[n]:
                    user.replace_input_with(y, n)
        self.gm.recompile()

    # -- what an operator's import rule may ask (hwslim.core.ops.ImportSite) ----------------------------
    def module(self, n: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(n.target) if n.op == "call_module" else None

    def has_shape(self, n: fx.Node) -> bool:
        return hasattr(n.meta.get("tensor_meta"), "shape")

    def value(self, v: Any) -> Any:
        return fx.node.map_arg(v, lambda n: n.meta.get("hwslim_value"))

    def is_plain(self, m: nn.Module, base: type) -> bool:
        return _is_plain(m, base)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise ImportRefused(f"{_where(n, self.gm)} does not produce one tensor")
        return tuple(tm.shape)

    def act_of(self, n: fx.Node) -> str | None:
        m = self.module(n)
        if m is not None:
            return _module_act(m)
        if n.op == "call_function":
            return _function_act(n)
        if n.op == "call_method":
            return _ACT_METHODS.get(n.target)
        return None

    def sole_user(self, n: fx.Node) -> fx.Node | None:
        u = self.users[n]
        return u[0] if len(u) == 1 and u[0] not in self.consumed else None

    def tensor_args(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.args if isinstance(a, fx.Node)]

    def is_identity(self, n: fx.Node) -> bool:
        m = self.module(n)
        if m is not None:
            return isinstance(m, (*_IDENTITY_MODULES, nn.Dropout, nn.Dropout2d)) or type(m).__name__ == "StochasticDepth"
        if n.op == "call_function":
            return n.target in (F.dropout, F.dropout2d, _stochastic_depth()) and n.target is not None
        if n.op == "call_method":
            return n.target in ("contiguous", "clone")
        return False

    def add_operands(self, n: fx.Node) -> list[fx.Node] | None:
        """The two tensors of a plain element-wise add (``x + y``, ``torch.add``, ``y.add(x)``, ``y.add_(x)``),
        else None."""
        if not self.is_call(n, ("add", "add_"), _ADD) or n.kwargs.get("alpha", 1) != 1:
            return None
        args = self.tensor_args(n)
        return args if len(args) == 2 and len(n.args) == 2 else None

    # -- 1. groups ------------------------------------------------------------------------------------
    def group(self) -> None:
        for n in self.nodes:  # SE first: its convs must not become ordinary conv groups
            if n.op == "call_function" and n.target in _MUL:
                self.try_se(n)
        for n in self.nodes:
            if n in self.consumed or n.op in ("placeholder", "output", "get_attr"):
                continue
            self.one(n)

    def consume(self, *ns: fx.Node) -> None:
        self.consumed.update(ns)

    def back(self, n: fx.Node | None, via: list[fx.Node]) -> fx.Node | None:
        """``n``'s first tensor input, stepping over identity nodes that only it reads (added to ``via``)."""
        args = self.tensor_args(n) if n is not None else []
        if not args:
            return None
        a = args[0]
        while self.is_identity(a) and len(self.users[a]) == 1:
            via.append(a)
            a = self.tensor_args(a)[0]
        return a

    def through_identities(self, n: fx.Node) -> fx.Node:
        while self.is_identity(n):
            n = self.tensor_args(n)[0]
        return n

    def try_se(self, mul: fx.Node) -> None:
        args = self.tensor_args(mul)
        if len(args) != 2:
            return
        for x, gate in (args, args[::-1]):
            via: list[fx.Node] = []
            gate_act = self.act_of(gate)
            if gate_act not in ("sigmoid", "hardsigmoid"):
                continue
            fc2 = self.back(gate, via)
            if fc2 is None or not isinstance(self.module(fc2), nn.Conv2d):
                continue
            act = self.back(fc2, via)
            inner = self.act_of(act) if act is not None else None
            if inner is None:
                continue
            fc1 = self.back(act, via)
            if fc1 is None or not isinstance(self.module(fc1), nn.Conv2d):
                continue
            pool = self.back(fc1, via)
            if pool is None or not GlobalAvgPool.matches(pool, self.module(pool), keepdim=True) or \
                    self.through_identities(self.tensor_args(pool)[0]) is not self.through_identities(x):
                continue
            chain = [pool, fc1, act, fc2, gate, mul]
            if any(len(self.users[c]) != 1 for c in chain[:-1]):
                continue
            m1, m2 = self.module(fc1), self.module(fc2)
            if any(square(m.kernel_size) != 1 or m.groups != 1 or m.bias is None or not _is_plain(m, nn.Conv2d)
                   for m in (m1, m2)):
                continue
            chain = via + chain
            named = chain[1]  # named after the module holding its convs, not its pool
            self.add_group(SqueezeExcite(inner, gate_act), chain, [x], {"fc1": m1, "fc2": m2}, mid=m1.out_channels,
                           base=_clean(str(named.target).rpartition(".")[0] or named.target))
            return

    def refuse(self, n: fx.Node, missing: str) -> ImportRefused:
        return ImportRefused(f"{_where(n, self.gm)}: hwslim has no operator for {missing}")

    def one(self, n: fx.Node) -> None:
        """Group ``n``: the identity; else the first registered operator whose import rule claims it,
        with what follows fused in; else an operation that moves channels; else refused by name."""
        if self.is_identity(n):
            self.alias[n] = self.tensor_args(n)[0]
            return
        for op in OPS.values():
            claim = op.from_torch(n, self)
            if claim is not None:
                self.fuse(n, claim)
                return
        if self.try_resize_identity(n) or self.try_broadcast(n) or self.try_shuffle(n) or self.try_split(n) or \
                self.try_slice(n):
            return
        if "tensor_meta" not in n.meta:
            return  # shape arithmetic (x.size(0) for a flatten): no tensor of its own
        what = _what(n, self.gm)
        raise self.refuse(n, _REFUSALS.get(what, what))

    def add_group(self, op: Op, members: list[fx.Node], inputs: list[fx.Node],
                  sources: dict[str, nn.Module] | None = None, mid: int = 0, **naming: str) -> None:
        self.consume(*members)
        if op.pins and "what" not in naming:  # an operator claimed whole (YOLO11's attention): named in the note
            naming["what"] = f"an {op.kind} block"
        self.groups.append(_Group(op, members, inputs, sources or {}, out_channels=self.shape(members[-1])[1],
                                  mid=mid, **naming))

    def fuse(self, n: fx.Node, claim: Claim) -> None:
        """Fold into a claimed node's operator what a runtime fuses after it, each only when it alone
        reads the value before: a BatchNorm (:attr:`Op.fuses_bn`; a conv), then a residual add while it
        has no activation (:attr:`Op.fuses_residual`), then an activation (:attr:`Op.takes_act`)."""
        op, members, inputs, sources = claim.op, [n], list(claim.inputs), dict(claim.sources)
        u = self.sole_user(n)
        if op.fuses_bn and u is not None and is_batch_norm(self.module(u)):
            bn = sources["bn"] = self.module(u)
            act = self.norm_act(u, bn)
            op = op.with_bn(bn.eps)
            op = op.with_act(act) if act is not None else op
            members.append(u)
        u = self.sole_user(members[-1])
        if op.fuses_residual and getattr(op, "act", None) is None and u is not None and \
                self.add_operands(u) is not None:
            a, b = self.add_operands(u)
            other = b if a is members[-1] else a
            if other is not members[-1] and self.shape(other) == self.shape(u):
                inputs.append(other)
                members.append(u)
        u = self.sole_user(members[-1])
        act = self.act_of(u) if u is not None else None
        if act is not None and op.with_act(act) is not None:
            op = op.with_act(act)
            members.append(u)
        self.add_group(op, members, inputs, sources, claim.mid)

    def try_resize_identity(self, n: fx.Node) -> bool:
        """Adaptive average pooling to the size it reads (VGG, AlexNet at their input size) is the
        identity; to another size (not global: that is :class:`GlobalAvgPool`'s) it is refused."""
        m = self.module(n)
        if not isinstance(m, nn.AdaptiveAvgPool2d) and not (n.op == "call_function" and
                                                             n.target is F.adaptive_avg_pool2d):
            return False
        x = self.tensor_args(n)[0]
        if self.shape(n) != self.shape(x):
            raise self.refuse(n, f"adaptive average pooling to {tuple(self.shape(n)[2:])} from "
                                 f"{tuple(self.shape(x)[2:])}")
        self.alias[n] = x
        return True

    def try_broadcast(self, n: fx.Node) -> bool:
        """``gate.expand_as(x)`` of an (N, C, 1, 1) gate that only products read: the gate itself (a
        product broadcasts it)."""
        if not self.is_call(n, ("expand_as", "expand")) or not self.has_shape(n):
            return False
        g = self.tensor_args(n)[0]
        if not self.has_shape(g) or len(self.shape(g)) != 4 or self.shape(g)[2:] != (1, 1) or \
                self.shape(g)[:2] != self.shape(n)[:2] or \
                not all(self.is_call(u, ("mul", "mul_"), _MUL) for u in self.users[n]):
            return False
        self.alias[n] = g
        return True

    # -- channels that move: ShuffleNetV2's shuffle and split (fixed units, --fix-unsupported) ----------
    def is_call(self, n: fx.Node, names: tuple[str, ...], functions: tuple = ()) -> bool:
        return (n.op == "call_method" and n.target in names) or (n.op == "call_function" and n.target in functions)

    def try_shuffle(self, n: fx.Node) -> bool:
        """``x.view(N, g, C/g, H, W)``, ``transpose(1, 2)`` (or ``permute(0, 2, 1, 3, 4)``), ``contiguous()``,
        back to ``(N, C, H, W)`` by ``view``/``reshape``/``flatten(1, 2)``: a channel shuffle of g groups."""
        if not self.is_call(n, ("view", "reshape"), (torch.reshape,)) or \
                not self.has_shape(n):
            return False
        x = self.tensor_args(n)[0]
        xs, ys = self.shape(x), self.shape(n)
        if len(xs) != 4 or len(ys) != 5 or ys[0] != xs[0] or ys[3:] != xs[2:] or ys[1] * ys[2] != xs[1]:
            return False
        t = self.sole_user(n)
        if t is None:
            return False
        if self.is_call(t, ("transpose",), (torch.transpose,)):
            swapped = {d % 5 for d in t.args[1:3]} == {1, 2}
        elif self.is_call(t, ("permute",), (torch.permute,)):
            dims = t.args[1] if len(t.args) == 2 and isinstance(t.args[1], (tuple, list)) else t.args[1:]
            swapped = [d % 5 for d in dims] == [0, 2, 1, 3, 4]
        else:
            return False
        members, u = [n, t], self.sole_user(t)
        while swapped and u is not None and self.is_identity(u):
            members.append(u)
            u = self.sole_user(u)
        if not swapped or u is None or not self.is_call(u, _RESHAPES, (torch.reshape, torch.flatten)) or \
                not self.has_shape(u) or self.shape(u) != xs:
            return False
        members.append(u)
        self.add_group(ChannelShuffle(ys[1]), members, [x],
                       base=_clean(_scope(n)) + "/shuffle" if _scope(n) else "shuffle", what="a channel shuffle")
        return True

    def try_split(self, n: fx.Node) -> bool:
        """``x.chunk(k, 1)``, ``x.split(sizes, 1)``, ``tensor_split`` read part by part: channel slices."""
        names = tuple(_SPLITS.values())
        if not self.is_call(n, names, tuple(_SPLITS)):
            return False
        x = self.tensor_args(n)[0]
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        metas = n.meta.get("tensor_meta")
        users = self.users[n]
        if not isinstance(dim, int) or len(self.shape(x)) != 4 or dim % 4 != 1 or not isinstance(metas, (tuple, list)) \
                or not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                           for u in users):
            return False  # refused below, by name
        offsets = [0]
        for m in metas:
            offsets.append(offsets[-1] + int(m.shape[1]))
        self.consume(n)
        scope = _clean(_scope(n))
        what = _SPLITS.get(n.target, n.target)
        if self.split_into_parts(x, [int(m.shape[1]) for m in metas]):
            for u in users:
                k = u.args[1] % len(metas)
                self.add_group(ChannelPart(k), [u], [x], base=f"{scope}/{what}{k}" if scope else f"{what}{k}")
            return True
        for u in users:
            k = u.args[1] % len(metas)
            self.add_group(ChannelSlice(offsets[k], offsets[k + 1]), [u], [x],
                           base=f"{scope}/{what}{k}" if scope else f"{what}{k}", what=f"a channel split ({what})")
        return True

    def split_into_parts(self, x: fx.Node, sizes: list[int]) -> bool:
        """Whether a split of ``x`` into ``sizes`` can slim: equal parts of a dense conv's output that
        only the split reads (C2f's ``cv1(x).chunk(2, 1)``). That conv then makes its output in parts
        (:attr:`Conv.parts`), each as wide as its unit: the unit slims in whole sets of parts."""
        x = self.resolve(x)
        conv = next((g for g in self.groups if g.last is x), None)
        if conv is None or len(sizes) < 2 or len(set(sizes)) != 1 or len(self.users[x]) != 1 or \
                not isinstance(conv.op, Conv) or not conv.op.sets_width or conv.op.parts != 1 or len(conv.inputs) != 1:
            return False
        conv.op = replace(conv.op, parts=len(sizes))
        conv.out_channels = sizes[0]
        return True

    def try_slice(self, n: fx.Node) -> bool:
        """``x[:, a:b]`` (trailing full slices allowed) or ``x.narrow(1, a, length)``: a channel slice."""
        if n.op == "call_function" and n.target is operator.getitem:
            x, idx = n.args[0], n.args[1]
            if not isinstance(x, fx.Node) or not self.has_shape(x) or \
                    len(self.shape(x)) != 4 or not isinstance(idx, tuple) or len(idx) < 2:
                return False
            full = slice(None)
            rest = list(idx[2:])
            if rest and rest[-1] is Ellipsis:
                rest.pop()
            sl = idx[1]
            if idx[0] != full or any(r != full for r in rest) or not isinstance(sl, slice) or sl.step not in (None, 1) \
                    or not all(v is None or isinstance(v, int) for v in (sl.start, sl.stop)):
                return False
            start, stop, _ = sl.indices(self.shape(x)[1])
        elif self.is_call(n, ("narrow",), (torch.narrow,)):
            x = self.tensor_args(n)[0]
            dim, start, length = (list(n.args[1:4]) + [None] * 3)[:3]
            if not all(isinstance(v, int) for v in (dim, start, length)) or len(self.shape(x)) != 4 or dim % 4 != 1:
                return False
            start, stop = start % self.shape(x)[1], start % self.shape(x)[1] + length
        else:
            return False
        if stop <= start:
            return False
        if (start, stop) == (0, self.shape(x)[1]):  # every channel: the identity at any width (torch.export drops it)
            self.alias[n] = x
            return True
        scope = _clean(_scope(n))
        self.add_group(ChannelSlice(start, stop), [n], [x], base=f"{scope}/slice" if scope else "slice",
                       what="a channel slice (x[:, a:b])")
        return True

    def norm_act(self, n: fx.Node, m: nn.BatchNorm2d) -> str | None:
        """The activation inside a BatchNorm2d subclass (timm's ``BatchNormAct2d``: ``act(drop(bn(x)))``);
        None for a plain BatchNorm or an identity activation. Refuses a BatchNorm it cannot read."""
        if not isinstance(m, nn.BatchNorm2d):
            return None  # torchvision's FrozenBatchNorm2d: affine, fixed statistics, nothing inside
        if not (m.affine and m.track_running_stats):
            raise self.refuse(n, "BatchNorm without affine parameters or running statistics")
        if _is_plain(m, nn.BatchNorm2d):
            return None
        act, drop = getattr(m, "act", None), getattr(m, "drop", None)
        if isinstance(act, nn.Module) and isinstance(drop, (nn.Identity, nn.Dropout)):
            if isinstance(act, nn.Identity):
                return None
            name = _module_act(act)
            if name is not None:
                return name
            raise self.refuse(n, f"the activation {type(act).__name__} inside {type(m).__name__}")
        raise self.refuse(n, f"{type(m).__name__} (a BatchNorm2d with its own forward that is not "
                             "batch norm, dropout, activation)")

    # -- 2. emission order, names, units --------------------------------------------------------------
    def resolve(self, n: fx.Node) -> fx.Node:
        while n in self.alias:
            n = self.alias[n]
        return n

    def build(self) -> tuple[Graph, dict[str, dict[str, nn.Module]]]:
        """The graph of the groups (in the order their values are made) and, per node, the modules
        whose weights its operator copies (:meth:`Op.load_weights`)."""
        order = {n: i for i, n in enumerate(self.nodes)}
        groups = sorted(self.groups, key=lambda g: order[g.last])
        results = self.outputs()
        tensor = self.name_groups(groups)
        self.refuse_shared(groups)
        for _ in range(len(groups) + 1):
            ch = _Channels()
            try:
                layout, mids, made, pinned = self.channel_flow(groups, tensor, ch)
                break
            except _Resplit as r:  # a conv's output added to a tensor in parts: make that output in parts too
                r.group.op = replace(r.group.op, parts=r.parts)
                r.group.out_channels //= r.parts
        for _, r in results:  # the network's outputs (the classes, a detector's levels) are never slimmed
            ch.fixed.update(layout[tensor(r)])
        self.fix_pinned(pinned, made, ch)
        units, ref = ch.units()
        nodes = [Node(g.name, g.op, tuple(tensor(x) for x in g.inputs),
                      ref(layout[g.name][0]) if g.op.sets_width else None,
                      ref(mids[g.name]) if g.name in mids else None) for g in groups]
        several = len(results) > 1 or results[0][0] != ""
        if not several and tensor(results[0][1]) != nodes[-1].name:
            raise ImportRefused(f"the output of {type(self.root).__name__} is not its last operator's")
        meta: dict[str, Any] = {"imported_from": type(self.root).__qualname__, "traced_by": self.traced_by}
        if self.output_mode != "full":
            meta["outputs"] = self.output_mode
        if self.fixed_units:
            meta["fixed_units"] = self.fixed_units
        outputs = tuple((k, tensor(r)) for k, r in results) if several else ()
        graph = Graph(self.name, nodes, units, int(self.example.shape[-1]), int(self.shape(results[0][1])[1]),
                      int(self.example.shape[1]), 1.0, 8, meta, outputs)
        return graph, {g.name: g.sources for g in groups if g.sources}

    def outputs(self) -> list[tuple[Any, fx.Node]]:
        """What the module returns: ``[("", node)]`` for one tensor; (position or key, node) pairs for a
        tuple, list or dict of tensors (every one keeps its width)."""
        (out_node,) = [n for n in self.nodes if n.op == "output"]
        result = out_node.args[0]
        if isinstance(result, fx.Node):
            return [("", result)]
        pairs = list(result.items()) if isinstance(result, dict) else \
            list(enumerate(result)) if isinstance(result, (tuple, list)) else []
        if not pairs or not all(isinstance(v, fx.Node) and self.has_shape(v) and isinstance(k, (int, str))
                                for k, v in pairs):
            raise ImportRefused(f"{type(self.root).__name__} returns {type(result).__name__}, not one tensor nor a "
                                "tuple, list or dict of tensors")
        return pairs

    def refuse_shared(self, groups: list[_Group]) -> None:
        """A module called more than once in one forward (one set of weights) would become independent
        layers, its weights split to train apart: refused, naming it."""
        def key(m: nn.Module) -> int:  # torch.export may hand a plain layer holding the same parameters
            return id(getattr(m, "weight", None) if getattr(m, "weight", None) is not None else m)

        calls: dict[int, list[_Group]] = {}
        for g in groups:
            for k in {key(m) for m in g.sources.values()}:
                calls.setdefault(k, []).append(g)
        shared = [(k, gs) for k, gs in calls.items() if len(gs) > 1]
        if not shared:
            return
        k, gs = shared[0]
        names = {key(m): (name, type(m).__name__) for name, m in self.root.named_modules(remove_duplicate=False)}
        name, cls = names.get(k, ("?", "module"))
        raise ImportRefused(f"module {name!r} ({cls}) is called {len(gs)} times in one forward "
                            f"({', '.join(g.name for g in gs)}): hwslim would split its one set of weights into "
                            f"{len(gs)} independent layers; give each call its own module")

    def name_groups(self, groups: list[_Group]):
        """Name every group (its ``base``, else its first node's module path or fx name; ``_2``... when
        taken) and return the function from an fx node to the name of the tensor holding its value."""
        placeholder = next(n for n in self.nodes if n.op == "placeholder")
        used: set[str] = {INPUT}
        tensor_of: dict[fx.Node, str] = {placeholder: INPUT}
        for g in groups:
            first = g.members[0]
            base = g.base or _clean(first.target if first.op == "call_module" else first.name)
            name, k = base, 1
            while name in used:
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            g.name = name
            tensor_of[g.last] = name

        def tensor(n: fx.Node) -> str:
            n = self.resolve(n)
            if n not in tensor_of:
                raise ImportRefused(f"{_where(n, self.gm)}: its value is used but was folded into another "
                                    "operator; hwslim cannot split it")
            return tensor_of[n]
        return tensor

    def channel_flow(self, groups: list[_Group], tensor, ch: "_Channels"):
        """Run the operators over channel variables: which make new ones, which must stay equal.

        Returns each tensor's layout (variables), each node's inner variable, the variables a layer's
        weights make (would-be units) and those an operator that moves channels reads or writes."""
        image = ch.new(int(self.example.shape[1]), INPUT)
        ch.fixed.add(image)
        layout: dict[str, list[int]] = {INPUT: [image]}
        mids: dict[str, int] = {}
        made: set[int] = set()
        pinned: list[tuple[int, _Group]] = []
        creator: dict[int, _Group] = {}
        for g in groups:
            in_lays = [tuple(layout[tensor(x)]) for x in g.inputs]
            self.read_part(g, in_lays, ch)
            out = ch.new(g.out_channels, g.name) if g.op.sets_width else None
            if out is not None:
                creator[out] = g
            mid = ch.new(g.mid, f"{g.name}/mid") if g.op.has_mid else None
            made.update(v for v in (out, mid) if v is not None)
            node = Node(g.name, g.op, tuple(tensor(x) for x in g.inputs), out, mid)
            if g.op.pins:  # its channels change position: what it reads and writes stays fixed
                lay = [ch.new(g.out_channels, g.name)]
                pinned += [(v, g) for lay_in in in_lays for v in lay_in] + [(lay[0], g)]
            else:
                lay = list(g.op.out_layout(node, in_lays))
            if g.op.quantum > 1:  # a grouped conv: its unit moves in whole groups
                if len(in_lays[0]) != 1:
                    raise ImportRefused(f"{g.name}: a {g.op.kind} in groups of {g.op.quantum} channels reading a "
                                        "concatenation")
                ch.in_multiples(in_lays[0][0], g.op.quantum)
            for a_lay, b_lay in g.op.unit_ties(node, in_lays):  # element-wise: equal channel units
                if len(a_lay) != len(b_lay):
                    resplit = _resplit(a_lay, b_lay, creator, ch)
                    if resplit is not None:
                        raise resplit
                    # parts that do not line up (ReXNet's partial residual x[:, :c] + shortcut): fixed
                    g.what = g.what or f"a {g.op.kind} of tensors made of different channel groups"
                    pinned += [(v, g) for v in a_lay + b_lay]
                    continue
                for a, b in zip(a_lay, b_lay):
                    ch.union(a, b)
            if mid is not None:
                mids[g.name] = mid
            if self.keep is not None and self.keep.search(_dotted(g)):
                ch.fixed.update(lay)
                self.kept += 1
            layout[g.name] = lay
        return layout, mids, made, pinned

    def read_part(self, g: _Group, in_lays: list[tuple], ch: "_Channels") -> None:
        """A channel slice or split that takes exactly one part of a tensor in parts (MixNet's split of
        a concatenation along its own parts) is that part, slimmable (:class:`ChannelPart`); else it
        stays a slice, its channels fixed. Decided again in every flow: parts change on a resplit."""
        if g.sliced is None and not isinstance(g.op, ChannelSlice):
            return
        g.sliced = g.sliced or g.op
        g.op = g.sliced
        starts = [0]
        for v in in_lays[0]:
            starts.append(starts[-1] + ch.width[ch.find(v)])
        k = starts.index(g.op.start) if g.op.start in starts else len(starts)
        if len(in_lays[0]) > 1 and k + 1 < len(starts) and starts[k + 1] == g.op.stop:
            g.op = ChannelPart(k)

    def fix_pinned(self, pinned: list[tuple[int, _Group]], made: set[int], ch: "_Channels") -> None:
        """Fix the units that reach an operator that moves channels: by themselves where it is a known
        fixed-width operator (:attr:`Op.fixed_width`, an attention block), with ``fix_unsupported``
        for the others, else refuse naming the first such operator."""
        fixed_anyway = {ch.find(v) for v in ch.fixed}
        by: dict[int, _Group] = {}
        for v, g in pinned:
            r = ch.find(v)
            if r not in fixed_anyway and (r not in by or (by[r].op.fixed_width and not g.op.fixed_width)):
                by[r] = g  # a unit an unknown operator also reaches needs the user's permission
        units: dict[str, tuple[int, _Group]] = {}
        for r, g in sorted(by.items()):
            members = [v for v in made if ch.find(v) == r]
            if members:  # a class made of such operators' outputs only is no unit of the module's
                units[ch.owner[min(members)]] = (ch.width[r], g)
        ch.fixed.update(by)
        if not units:
            return
        unknown = {u: (w, g) for u, (w, g) in units.items() if not g.op.fixed_width}
        if unknown and not self.fix_unsupported:
            first = min((g for _, g in unknown.values()), key=lambda g: self.nodes.index(g.members[0]))
            names = list(unknown)
            listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ImportRefused(f"{_where(first.members[0], self.gm)}: hwslim has no slimmable operator for "
                                f"{first.what}, which moves channels to other positions; {len(names)} unit(s) "
                                f"reaching such operations would have to keep their width ({listed}); pass "
                                "--fix-unsupported to import with them fixed")
        self.fixed_units = {u: {"width": w, "by": g.name, "what": g.what,
                                **({"module": _module_of(g.members[0], self.gm)} if g.op.fixed_width else {})}
                            for u, (w, g) in units.items()}


class _Resplit(Exception):
    """Channel flow must start again with ``group``'s conv making its output in ``parts`` parts."""

    def __init__(self, group: _Group, parts: int) -> None:
        super().__init__(group.name)
        self.group, self.parts = group, parts


def _resplit(a: tuple, b: tuple, creator: dict[int, _Group], ch: "_Channels") -> _Resplit | None:
    """When an element-wise op combines a tensor of one channel variable with one of several equal
    parts (GhostNet: a conv's output plus a concatenation of two halves): start again with that
    conv's output in as many parts (:attr:`Conv.parts`); None when no conv can (its channels are fixed)."""
    one, many = (a, b) if len(a) == 1 else (b, a)
    conv = creator.get(one[0]) if len(one) == 1 else None
    widths = {ch.width[v] for v in many}
    if conv is not None and isinstance(conv.op, Conv) and conv.op.sets_width and conv.op.parts == 1 and \
            len(widths) == 1 and conv.out_channels == len(many) * widths.pop():
        return _Resplit(conv, len(many))
    return None


class _Channels:
    """Union-find over channel variables: a variable is the width some tensors' channels share; the
    root of a class that is not fixed becomes a unit, named after the operator that made it first."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.quantum: dict[int, int] = {}
        self.width: dict[int, int] = {}
        self.owner: dict[int, str] = {}
        self.fixed: set[int] = set()

    def new(self, width: int, owner: str) -> int:
        v = len(self.parent)
        self.parent[v], self.quantum[v], self.width[v], self.owner[v] = v, 1, width, owner
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def in_multiples(self, v: int, q: int) -> None:
        r = self.find(v)
        self.quantum[r] = math.lcm(self.quantum[r], q)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.width[a] != self.width[b]:
            raise ImportRefused(f"channels of {self.owner[a]!r} ({self.width[a]}) and {self.owner[b]!r} "
                                f"({self.width[b]}) are combined element-wise but differ in count")
        lo, hi = (a, b) if a < b else (b, a)
        self.parent[hi] = lo
        self.quantum[lo] = math.lcm(self.quantum[lo], self.quantum[hi])
        if hi in self.fixed:
            self.fixed.add(lo)

    def units(self):
        """The units (the classes not fixed) and the function from a variable to its unit's name or,
        for a fixed one, its width."""
        fixed_roots = {self.find(v) for v in self.fixed}
        names = {r: self.owner[r] for r in sorted({self.find(v) for v in self.parent}) if r not in fixed_roots}
        units = {nm: UnitDef(self.width[r], self.quantum[r]) for r, nm in names.items()}

        def ref(v: int):
            r = self.find(v)
            return names.get(r, self.width[r])
        return units, ref


def _propagate(gm: fx.GraphModule, example: torch.Tensor, what: str) -> None:
    """Record every node's value shape (``tensor_meta``) and every shape expression's ints
    (``x.size()[3]``: a pooling kernel) by running ``gm`` on ``example``.

    A failure is one line with its cause (torch's ShapeProp prints a traceback and wraps the
    cause: both are dropped), and suggests another input size, the usual reason."""
    from torch.fx.passes.shape_prop import ShapeProp

    class _Values(ShapeProp):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, int) or (isinstance(result, (tuple, list)) and result and
                                           all(isinstance(v, int) for v in result)):
                n.meta["hwslim_value"] = result if isinstance(result, int) else tuple(result)
            return result

    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            _Values(gm).propagate(example)
    except Exception as e:
        cause = e.__cause__ or e
        size = "x".join(map(str, example.shape[2:]))
        raise ImportRefused(f"running {what} on a {size} example input failed ({_first_line(cause, 400)}); "
                            "if it expects another input size, pass --input-size") from None


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[0].split())[:limit]}" if lines else type(e).__name__


def _clean(target: Any) -> str:
    """A module path or fx name as a node name: ``layer1.0.conv1`` -> ``layer1/0/conv1``."""
    return re.sub(r"[^A-Za-z0-9_/]", "/", str(target).replace(".", "/")).strip("/") or "node"


def _dotted(g: _Group) -> str:
    first = g.members[0]
    return str(first.target) if first.op == "call_module" else first.name


@torch.no_grad()
def _copy_weights(net, weights: dict[str, dict[str, nn.Module]]) -> None:
    for node in net.nodes:
        if node.name in weights:
            node.op.load_weights(net.layers[node.name], weights[node.name])


def import_model(module: nn.Module, example_input: torch.Tensor, *, name: str | None = None,
                 keep: str | None = None, divisor: int = 8, fix_unsupported: bool = False, outputs: str = "full"):
    """The slimmable supernet of ``module`` (see the module docstring), with its weights.

    ``keep``: a regular expression; modules whose qualified name matches it keep their
    output channels. ``name``: the supernet's name (default: the module's class name).
    ``fix_unsupported``: units that reach an operation that moves channels to other
    positions (a channel shuffle, a slice or split of the channels) keep their width and
    are listed in ``net.graph.meta["fixed_units"]`` (:func:`fixed_units`); without it
    such a module is refused, naming the first such node. ``outputs="raw"``: a detector's
    decoding is left out and its raw head maps are the outputs
    (:func:`hwslim.importing.raw_outputs.raw_outputs`; recorded as ``net.graph.meta["outputs"]``).
    Raises :class:`ImportRefused` (one line: the node, the module type and source line,
    what is missing) for what hwslim cannot express; nothing is built then.
    """

    from hwslim.core.supernet import SlimmableNet

    if not isinstance(module, nn.Module):
        raise ImportRefused(f"expected an nn.Module, got {type(module).__name__}")
    from hwslim.importing.raw_outputs import raw_outputs

    try:
        module = raw_outputs(module, outputs)
    except ModelError as e:
        raise ImportRefused(str(e)) from None
    example = example_input.detach().to("cpu")
    if example.dim() != 4 or example.shape[-1] != example.shape[-2]:
        raise ImportRefused(f"the example input must be (N, C, S, S) images, got shape {tuple(example.shape)}")
    was_training = module.training
    try:
        imp = _Importer(module, example, keep, name, fix_unsupported)
        imp.output_mode = outputs
        imp.group()
        graph, weights = imp.build()
    finally:
        module.train(was_training)
    net = SlimmableNet(replace(graph, divisor=divisor))
    if keep and not imp.kept:
        raise ImportRefused(f"--keep {keep!r} matches no module of {imp.name} (it is searched in qualified module "
                            "names such as layer1.0.conv1); nothing would be kept")
    if keep and not net.units:
        raise ImportRefused(f"--keep {keep!r} keeps every unit of {imp.name} at its width: nothing is left to slim")
    _copy_weights(net, weights)
    return net.eval()


def compile_keep(keep: str) -> "re.Pattern[str]":
    """``--keep``'s regular expression, or ImportRefused (one line) for one Python cannot compile
    (``(``, or ``a{99999999999}``, whose repetition overflows)."""
    try:
        return re.compile(keep)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise ImportRefused(f"--keep {keep!r} is not a usable regular expression ({e})") from None


def fixed_units(net) -> dict[str, dict[str, Any]]:
    """The units the import kept fixed: name -> width, the operator that fixed it (and, for a known
    fixed-width operator that fixed them by itself, ``module``: the module it is)."""
    return dict(net.graph.meta.get("fixed_units") or {})


def fixed_unit_rows(net) -> list[dict[str, Any]]:
    """The fixed units as rows (``hwslim cost --units``): unit, width, and why it is fixed."""
    return [{"unit": u, "width": f["width"],
             "fixed": f"{f['what']}, {f['module']}" if f.get("module") else f"--fix-unsupported: {f['what']}"}
            for u, f in fixed_units(net).items()]


def fixed_units_note(net) -> str | None:
    """One line for the CLI: which units the import kept fixed, and why (None: none)."""
    fixed = fixed_units(net)
    if not fixed:
        return None
    known = {u: f for u, f in fixed.items() if f.get("module")}
    asked = {u: f for u, f in fixed.items() if u not in known}
    notes = []
    if asked:
        kinds = sorted({f["what"].split(" (")[0] for f in asked.values()})
        notes.append(f"--fix-unsupported: {len(asked)} unit(s) reaching {' and '.join(kinds)} keep their width, "
                     f"{len(net.units)} slim: " + ", ".join(f"{u} ({f['width']})" for u, f in asked.items()))
    if known:
        notes.append(f"{len(known)} unit(s) fixed by the fixed-width operator they reach, {len(net.units)} slim: " +
                     ", ".join(f"{u} ({f['width']}: {f['what']}, {f['module']})" for u, f in known.items()))
    return "; ".join(notes)


__all__ = ["ImportRefused", "fixed_unit_rows", "fixed_units", "fixed_units_note", "import_model"]
