"""torch.export's ATen graph, rewritten as the torch.fx graph :mod:`hwslim.importing.fx_trace` groups.

``torch.fx.symbolic_trace`` fails on a forward with Python control flow on tensors
(``if x.shape[-1] > 16:``). ``torch.export`` runs the forward on the example input
instead, so such a branch is specialized to the example's shapes, and records ATen
operators (``aten.conv2d``, ``aten.batch_norm``, ``aten.add.Tensor``...) with the
parameters lifted to graph inputs. :func:`exported_graph` turns that graph back into the
form the fx path produces, so one importer groups both:

* a conv, BatchNorm or linear call on a module's parameters becomes a call of that
  module (``call_module``, named by the parameters' owner: ``stem.0``); a module whose
  own forward does more than the one call (timm's ``BatchNormAct2d``, whose activation
  ATen records as a node of its own) is replaced by the plain layer holding the same
  parameters;
* PReLU and GroupNorm calls on a module's parameters become calls of that module;
* activations, adds, multiplies, pooling, upsampling (at the size the example gives),
  concatenation, reshapes, slices and splits become the ``torch`` /
  ``torch.nn.functional`` calls or tensor methods fx records;
* a module an operator claims by class name (YOLO11's ``Attention``) becomes one call of it;
* any other ATen operator stays as it is, and the importer refuses it by name.

Every node keeps its source line (``stack_trace``) and module (``nn_module_stack``), so
refusals and names read as on the fx path.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# ATen operator packet -> (what fx records: "call_function" target or "call_method" name, argument rewrite)
_Same = None  # arguments unchanged


def _slice_index(x, dim=0, start=None, end=None, step=1):
    """``aten.slice(x, dim, start, end, step)`` as the index ``x[:, start:end]`` fx records."""
    end = None if end is not None and end >= 2 ** 62 else end  # ATen's "to the end"
    return (x, (slice(None),) * dim + (slice(start, end, None if step == 1 else step),))


def _whole(x, dim=0, start=None, end=None, step=1) -> bool:
    """Whether ``aten.slice`` keeps the whole dimension (``x[:]``)."""
    return start in (None, 0) and (end is None or end >= 2 ** 62) and step == 1


_FUNCTIONS: dict[Any, tuple[Callable, Callable | None]] = {
    aten.relu: (torch.relu, _Same), aten.relu_: (torch.relu, _Same),
    aten.sigmoid: (torch.sigmoid, _Same), aten.sigmoid_: (torch.sigmoid, _Same),
    aten.hardswish: (F.hardswish, _Same), aten.hardswish_: (F.hardswish, _Same),
    aten.hardsigmoid: (F.hardsigmoid, _Same), aten.hardsigmoid_: (F.hardsigmoid, _Same),
    aten.silu: (F.silu, _Same), aten.silu_: (F.silu, _Same),
    aten.hardtanh: (F.hardtanh, _Same), aten.hardtanh_: (F.hardtanh, _Same),
    aten.gelu: (F.gelu, _Same),
    aten.leaky_relu: (F.leaky_relu, _Same), aten.leaky_relu_: (F.leaky_relu, _Same),
    aten.mul: (operator.mul, _Same), aten.mul_: (operator.mul, _Same),
    aten.sub: (operator.sub, _Same), aten.div: (operator.truediv, _Same),
    aten.adaptive_avg_pool2d: (F.adaptive_avg_pool2d, _Same),
    aten.max_pool2d: (F.max_pool2d, _Same),  # (x, kernel, stride, padding, dilation, ceil_mode): F's order
    aten.avg_pool2d: (F.avg_pool2d, _Same),  # (x, kernel, stride, padding, ceil, count_include_pad, divisor)
    aten.flatten: (torch.flatten, _Same),
    aten.cat: (torch.cat, _Same),
    aten.transpose: (torch.transpose, _Same),
    aten.dropout: (F.dropout, lambda x, p=0.5, train=False: (x, p, train)),
    aten.dropout_: (F.dropout, lambda x, p=0.5, train=False: (x, p, train)),
    aten.slice: (operator.getitem, _slice_index),
}
_METHODS: dict[Any, tuple[str, Callable | None]] = {
    aten.view: ("view", lambda x, shape: (x, *shape)),
    aten.reshape: ("reshape", lambda x, shape: (x, *shape)),
    aten._unsafe_view: ("view", lambda x, shape: (x, *shape)),
    aten.permute: ("permute", _Same),
    aten.mean: ("mean", _Same),
    aten.chunk: ("chunk", _Same),
    aten.split: ("split", _Same),
    aten.split_with_sizes: ("split", _Same),
    aten.narrow: ("narrow", _Same),
    aten.expand_as: ("expand_as", _Same),
    aten.expand: ("expand", lambda x, size, **kw: (x, *size)),
    aten.clone: ("contiguous", lambda x, **kw: (x,)),
    aten.contiguous: ("contiguous", lambda x, **kw: (x,)),
    aten.alias: ("contiguous", lambda x: (x,)),
    aten.detach: ("contiguous", lambda x: (x,)),
}


_Refused = object()  # what a module replacement returns for a call it cannot express


def _packet(target):
    return getattr(target, "overloadpacket", target)


class _Rewriter:
    def __init__(self, module: nn.Module, ep, whole: frozenset[str] = frozenset()) -> None:
        self.module = module
        self.ep = ep
        self.whole: dict[fx.Node, tuple[str, fx.Node]] = {}  # a kept module's output node -> (its path, its input)
        self.inside: set[fx.Node] = set()  # the other nodes of the modules kept whole
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.modules: dict[str, nn.Module] = {}  # call_module targets -> the module the rewritten graph calls
        self.params: dict[str, str] = {}  # placeholder name -> qualified parameter/buffer name
        self.user_inputs: list[str] = []
        self.constants: dict[str, Any] = {}  # placeholder name -> a tensor the forward creates or holds
        for spec in ep.graph_signature.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER"):
                self.params[spec.arg.name] = spec.target
            elif kind == "USER_INPUT":
                self.user_inputs.append(spec.arg.name)
            elif kind == "CONSTANT_TENSOR" and spec.target in ep.constants:
                self.constants[spec.arg.name] = ep.constants[spec.target]

    # -- helpers ------------------------------------------------------------------------------------
    def owner(self, arg) -> str | None:
        """The qualified name of the module owning the parameter ``arg`` (a placeholder), else None."""
        if isinstance(arg, fx.Node) and arg.name in self.params:
            return self.params[arg.name].rpartition(".")[0]
        return None

    def mapped(self, a):
        return fx.node.map_arg(a, self.value)

    def value(self, n: fx.Node) -> fx.Node:
        """The rewritten node of ``n``; a parameter read by an operator left as ATen becomes an attribute."""
        if n not in self.env and n.name in self.params:
            qualified = self.params[n.name]
            name = "_param_" + qualified.replace(".", "_")
            owner, _, attr = qualified.rpartition(".")
            self.modules[name] = getattr(self.module.get_submodule(owner), attr)
            self.env[n] = self.graph.get_attr(name)
        return self.env[n]

    def emit(self, n: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
        new = self.graph.create_node(op, target, self.mapped(tuple(args)), self.mapped(dict(kwargs or {})),
                                     name=n.name)
        for key in ("stack_trace", "nn_module_stack"):
            if key in n.meta:
                new.meta[key] = n.meta[key]
        new.meta["hwslim_exported"] = True  # a refusal names its module: the node's name is torch.export's
        return new

    def layer(self, n: fx.Node, kind: type | tuple[type, ...], weight,
              make: Callable[[nn.Module], Any]) -> fx.Node | None:
        """``n`` as a call of the ``kind`` module owning ``weight``: the module itself when its settings
        match the call (``make`` returns None for it), else a plain ``kind`` holding its parameters
        (``_Refused``: none; ``n`` stays an ATen call, refused by name)."""
        path = self.owner(weight)
        if not path:
            return None
        try:
            m = self.module.get_submodule(path)
        except AttributeError:
            return None
        if not isinstance(m, kind):
            return None
        replacement = make(m)
        if replacement is _Refused:
            return None
        self.modules[path] = m if replacement is None else replacement
        return self.emit(n, "call_module", path, (n.args[0],))

    def keep_whole(self, whole: frozenset[str]) -> None:
        """Each call of a module whose class (qualified name) is in ``whole`` becomes one call of that
        module, as the fx tracer keeps it (:attr:`hwslim.core.ops.Op.torch_module_names`), when it
        reads one tensor and one value leaves it; else its nodes stay, refused by name if unmapped."""
        calls: dict[str, list[fx.Node]] = {}
        for n in self.ep.graph.nodes:
            for path, cls in (n.meta.get("nn_module_stack") or {}).values() if n.op == "call_function" else ():
                if (cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}") in whole:
                    calls.setdefault(str(path), []).append(n)  # the outermost such module
                    break
        for path, members in calls.items():
            inside = set(members)
            reads = list(dict.fromkeys(a for m in members for a in m.all_input_nodes if a not in inside and
                                       a.name not in self.params and a.name not in self.constants))
            leaves = [m for m in members if any(u not in inside for u in m.users)]
            if len(reads) == 1 and len(leaves) == 1:
                self.whole[leaves[0]] = (path, reads[0])
                self.inside |= inside - {leaves[0]}

    # -- the rewrite ---------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                if n.name in self.user_inputs:
                    self.env[n] = self.graph.placeholder(n.name)
                elif n.name in self.constants:  # read by a node the importer refuses by name, if at all
                    self.modules[f"_constant_{n.name}"] = self.constants[n.name]
                    self.env[n] = self.graph.get_attr(f"_constant_{n.name}")
                continue
            if n.op == "output":
                self.graph.output(self.mapped(n.args[0][0] if len(n.args[0]) == 1 else n.args[0]))
                continue
            if n.op != "call_function":
                raise ValueError(f"unexpected {n.op} node {n.name!r} in the exported graph")
            if n in self.whole:
                path, x = self.whole[n]
                self.modules[path] = self.module.get_submodule(path)
                self.env[n] = self.emit(n, "call_module", path, (x,))
            elif n not in self.inside:
                self.env[n] = self.node(n)
        return fx.GraphModule(self.modules, self.graph)

    def node(self, n: fx.Node) -> Any:
        t, p = n.target, _packet(n.target)
        args, kwargs = list(n.args), dict(n.kwargs)
        if t is operator.getitem:
            src = self.env[args[0]]
            if isinstance(src, tuple):  # a tuple-returning ATen op rewritten to one node (batch norm's outputs)
                return src[args[1]]
            return self.emit(n, "call_function", operator.getitem, args)
        if p is aten.conv2d:
            new = self.layer(n, nn.Conv2d, args[1], lambda m: _conv_replacement(m, n))
            if new is not None:
                return new
        elif p is aten.conv_transpose2d:  # the module's own call: its settings are the ATen call's
            new = self.layer(n, nn.ConvTranspose2d, args[1], lambda m: _deconv_replacement(m, n))
            if new is not None:
                return new
        elif p is aten.linear:
            new = self.layer(n, nn.Linear, args[1], lambda m: _linear_replacement(m, n))
            if new is not None:
                return new
        elif p in (aten.prelu, aten._prelu_kernel, aten.group_norm):  # their modules' own forward: one call
            kind, weight = (nn.GroupNorm, args[2]) if p is aten.group_norm else (nn.PReLU, args[1])
            new = self.layer(n, kind, weight, lambda m: None if _is_forward_of(m, kind) else _Refused)
            if new is not None:
                return new
        elif p in (aten.batch_norm, aten._native_batch_norm_legit_no_training):
            weight = args[1] if args[1] is not None else args[3]
            training = args[5] if p is aten.batch_norm else False
            if not training:
                new = self.layer(n, (nn.BatchNorm2d, nn.BatchNorm1d), weight, lambda m: _bn_replacement(m, n, p))
                if new is not None:
                    return new if p is aten.batch_norm else (new, None, None)
        elif p in (aten.add, aten.add_) and kwargs.get("alpha", 1) == 1 and len(args) == 2:
            return self.emit(n, "call_function", operator.add, args)
        elif p in (aten.upsample_nearest2d, aten.upsample_bilinear2d):
            # the size the example gives: the importer reads the factor from the shapes
            mode = "nearest" if p is aten.upsample_nearest2d else "bilinear"
            align = bool(args[2]) if mode == "bilinear" and len(args) > 2 else None
            return self.emit(n, "call_function", F.interpolate, args[:1],
                             {"size": tuple(n.meta["val"].shape[2:]), "mode": mode, "align_corners": align})
        elif p is aten.elu and all(v == 1 for v in args[2:4]):  # not scaled (SELU's form stays ATen)
            return self.emit(n, "call_function", F.elu, args[:2])
        elif p is aten.slice and _whole(*args, **kwargs):
            return self.emit(n, "call_method", "contiguous", args[:1])  # x[:] on some dimension: the identity
        elif p in _FUNCTIONS:
            fn, rewrite = _FUNCTIONS[p]
            if rewrite is not None:
                args, kwargs = list(rewrite(*args, **kwargs)), {}
            return self.emit(n, "call_function", fn, args, kwargs)
        elif p in _METHODS:
            name, rewrite = _METHODS[p]
            if rewrite is not None:
                args, kwargs = list(rewrite(*args, **kwargs)), {}
            return self.emit(n, "call_method", name, args, kwargs)
        elif p in (aten.sym_size, aten.sym_numel) or str(p).startswith("aten._assert"):
            return None  # shape bookkeeping of a static export: nothing reads it
        # anything else stays an ATen call: it runs, and the importer refuses it by name
        return self.emit(n, "call_function", p, args, kwargs)


def _same(a, b) -> bool:
    a = tuple(a) if isinstance(a, (list, tuple)) else (a,)
    b = tuple(b) if isinstance(b, (list, tuple)) else (b,)
    return a == b or (len(a) == 1 and a * len(b) == b) or (len(b) == 1 and b * len(a) == a)


def _is_forward_of(m: nn.Module, base: type) -> bool:
    return type(m).forward is base.forward


def _conv_replacement(m: nn.Conv2d, n: fx.Node) -> nn.Module | None:
    args = list(n.args) + [None] * 7
    stride, padding, dilation, groups = (args[3] or 1), (args[4] if args[4] is not None else 0), \
        (args[5] or 1), (args[6] or 1)
    bias_used = args[2] is not None
    same = _same(stride, m.stride) and _same(padding, m.padding) and _same(dilation, m.dilation) and \
        groups == m.groups and bias_used == (m.bias is not None) and m.padding_mode == "zeros"
    if same and _is_forward_of(m, nn.Conv2d):
        return None
    if isinstance(padding, str):
        return None  # 'same'/'valid' padding: leave the module, the importer names it
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride, padding, dilation, groups, bias=bias_used)
    conv.weight = m.weight
    if bias_used:
        conv.bias = m.bias
    return conv


def _deconv_replacement(m: nn.ConvTranspose2d, n: fx.Node) -> Any:
    """None (call ``m`` itself) when ``n`` is ``m``'s own forward with its settings, else ``_Refused``."""
    args = list(n.args) + [None] * 8
    stride, padding, output_padding, groups, dilation = (args[3] or 1), (args[4] or 0), (args[5] or 0), \
        (args[6] or 1), (args[7] or 1)
    same = _same(stride, m.stride) and _same(padding, m.padding) and _same(output_padding, m.output_padding) and \
        groups == m.groups and _same(dilation, m.dilation) and (args[2] is not None) == (m.bias is not None)
    return None if same and _is_forward_of(m, nn.ConvTranspose2d) else _Refused


def _linear_replacement(m: nn.Linear, n: fx.Node) -> nn.Module | None:
    bias_used = len(n.args) > 2 and n.args[2] is not None
    if bias_used == (m.bias is not None) and _is_forward_of(m, nn.Linear):
        return None
    lin = nn.Linear(m.in_features, m.out_features, bias=bias_used)
    lin.weight = m.weight
    if bias_used:
        lin.bias = m.bias
    return lin


def _bn_replacement(m: nn.BatchNorm2d, n: fx.Node, p) -> nn.Module | None:
    eps = n.args[7] if p is aten.batch_norm else n.args[6]
    cls = nn.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else nn.BatchNorm2d
    if _is_forward_of(m, cls) and eps == m.eps and m.affine and m.track_running_stats:
        return None
    bn = cls(m.num_features, eps=eps, affine=m.affine, track_running_stats=m.track_running_stats)
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(m, name, None) is not None:
            bn.register_buffer(name, getattr(m, name))
    return bn.eval()


def exported_graph(module: nn.Module, example: torch.Tensor, whole: frozenset[str] = frozenset()) -> fx.GraphModule:
    """``module`` exported with ``torch.export`` on ``example`` (eval mode), rewritten as the graph
    ``torch.fx`` would have recorded (see the module docstring); each call of a module whose class's
    qualified name is in ``whole`` is one call of it. Raises what torch.export raises."""
    import contextlib
    import io
    import logging
    import warnings

    # torch.export logs and prints whole graphs to stderr when it gives up; the importer's refusal
    # says why in one line
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ep = torch.export.export(module.eval(), (example,))
    finally:
        logging.disable(before)
    rewriter = _Rewriter(module, ep)
    rewriter.keep_whole(whole)
    return rewriter.run()


__all__ = ["exported_graph"]
