"""Operators: one class per kind of graph node, answering everything hwslim asks of it.

A graph (:mod:`hwslim.core.graph`) is a list of nodes; each node holds one operator (an
instance of a class below, with its static attributes: kernel, stride, activation...)
plus the names of the tensors it reads and the units that set its widths. Every
consumer asks the operator, never compares names:

* structure: :meth:`Op.out_layout` (which units make up the output's channels) and
  :meth:`Op.out_hw` (spatial size);
* costs: :meth:`Op.macs`, :meth:`Op.params` (of a concrete :class:`~hwslim.core.graph.LayerSpec`)
  and, for the activation-memory scan, :attr:`Op.inplace` / :attr:`Op.view`;
* latency tables: :meth:`Op.signature` (``None``: free, never timed) and
  :meth:`Op.onnx` (the nodes a profiler's designed network and an entry model hold);
* execution: :meth:`Op.build` (the supernet's slimmable module), :meth:`Op.run`
  (sliced to the current widths), :meth:`Op.plain` (the materialized module holding
  only the kept channels), :meth:`Op.run_plain`, :meth:`Op.folded`;
* channel units: :attr:`Op.mixes` (output channels depend on several input channels:
  the search's fast evaluator shares computation only up to such a node),
  :meth:`Op.unit_ties` (which widths must stay equal) and :attr:`Op.pins` (channels
  change position, so every unit the node reads stays fixed: a channel shuffle, a slice);
* importing a user's module (:mod:`hwslim.importing.fx_trace`): :meth:`Op.from_torch` (the op's
  import rule: what it makes of a traced node), :attr:`Op.torch_modules`, :meth:`Op.load_weights`
  and what it fuses after it (:attr:`Op.fuses_bn`, :attr:`Op.fuses_residual`, :attr:`Op.takes_act`);
* channel order (a trained start, :mod:`hwslim.importing.importance`): :meth:`Op.importance` (scores
  of the channels the node's weights produce) and :meth:`Op.permute` (reorder its weights
  for permuted input, output and inner channels, leaving the function unchanged).

Adding an operator is one class (here, or in a file of its own) registered with
:func:`register_op`, plus its tests; see "Adding an operator" in the README.

Activations are data too: :data:`ACTIVATIONS` maps a name to its PyTorch function, its
in-place form and its ONNX nodes.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.core.activations import ACTIVATIONS, apply_act, check_act, fresh  # noqa: F401  (ops are built from these)
from hwslim.core.slimmable import PlainSE, SlimmableConv2d, SlimmableConvBN, SlimmableSE, sliced_batch_norm

if TYPE_CHECKING:
    from hwslim.core.onnx_build import OnnxGraph
# "LayerSpec" and "Node" in annotations are hwslim.core.graph's, which imports this module: an
# operator only reads their fields, so they are named here, not imported (no import cycle).

# -- importing a user's module: what an operator's import rule sees -----------------------------------
class ImportSite(Protocol):
    """What an operator's import rule (:meth:`Op.from_torch`) may ask the importer
    (:mod:`hwslim.importing.fx_trace`) about a traced node. A node is a ``torch.fx.Node``, read by
    its fields (``op``, ``target``, ``args``, ``kwargs``): the core does not depend on the importer."""

    def module(self, n: Any) -> nn.Module | None:
        """The module a ``call_module`` node calls (None for a function or method call)."""

    def tensor_args(self, n: Any) -> list:
        """The nodes among ``n``'s positional arguments."""

    def shape(self, n: Any) -> tuple[int, ...]:
        """The shape of ``n``'s value on the example input (refused if it is not one tensor)."""

    def has_shape(self, n: Any) -> bool:
        """Whether ``n``'s value is one tensor of known shape."""

    def value(self, v: Any) -> Any:
        """An argument's value on the example input: ``v`` itself, or the int (or ints) a shape expression
        node evaluates to (``x.size()[3]``, ``x.shape[2:]``); None for another node."""

    def act_of(self, n: Any) -> str | None:
        """The activation ``n`` computes (None: not one hwslim knows)."""

    def add_operands(self, n: Any) -> list | None:
        """The two tensors of a plain element-wise add, else None."""

    def norm_act(self, n: Any, m: nn.Module) -> str | None:
        """The activation inside a BatchNorm2d subclass (timm's ``BatchNormAct2d``; None for a
        FrozenBatchNorm2d); refuses what it cannot read."""

    def is_plain(self, m: nn.Module, base: type) -> bool:
        """``m`` computes what ``base`` computes (its own forward, if any, makes the same one call)."""

    def refuse(self, n: Any, missing: str) -> Exception:
        """The error to raise: ``n`` (module, source line) needs an operator hwslim lacks, ``missing``."""


@dataclass
class Claim:
    """What an import rule makes of a traced node: the operator, the nodes whose values it reads
    (in operator order), the modules whose weights :meth:`Op.load_weights` copies (role -> module)
    and, for an op with an inner width, that width. The importer then fuses what follows it
    (:attr:`Op.fuses_bn`, :attr:`Op.fuses_residual`, :attr:`Op.takes_act`)."""

    op: "Op"
    inputs: list
    sources: dict[str, nn.Module] = field(default_factory=dict)
    mid: int = 0


def _plain_layer(node: Any, site: ImportSite, base: type, what: str) -> nn.Module | None:
    """The ``base`` layer ``node`` calls (None: it calls none); refused, saying ``what`` it is, when
    its class's own forward does more than ``base``'s."""
    m = site.module(node)
    if not isinstance(m, base):
        return None
    if not site.is_plain(m, base):
        raise site.refuse(node, f"{type(m).__name__} ({what})")
    return m


def optional(default: Any) -> Any:
    """A field added after graphs were stored: left out of the graph JSON at its default, so every
    stored graph (and its sha256) stays as it was."""
    return field(default=default, metadata={"optional": True})


def pair(v: Any) -> tuple[int, int] | None:
    """A kernel/stride/padding/dilation (an int or an (h, w) pair) as an (h, w) pair, else None."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    return None


def _compact(v: Any) -> int | tuple[int, int]:
    """An equal pair as one int (a square window reads, and serializes, as before), else a tuple."""
    h, w = pair(v) or (v, v)
    return h if h == w else (h, w)


def square(v: Any) -> int | None:
    """A square kernel/stride/padding (an int or an equal pair) as one int, else None."""
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1]:
        return int(v[0])
    return None



# -- the execution context the supernet hands an op ------------------------------------------------
@dataclass
class Slice:
    """Active widths of one node in the supernet: what :meth:`Op.run` slices to.

    ``index`` is the kept channels of the first input, as positions in its full-width
    layout (None: the first ``x.shape[1]`` channels), ``parts`` the widths of that layout's
    parts (None: one part), ``out`` the output width (ops that set it), ``mid`` an inner
    width (SE's reduce width).
    """

    out: int | None = None
    mid: int | None = None
    index: torch.Tensor | None = None
    parts: tuple[int, ...] | None = None
    inplace: bool = False
    training: bool = False


# -- registry -------------------------------------------------------------------------------------
OPS: dict[str, type["Op"]] = {}


def register_op(cls: type["Op"]) -> type["Op"]:
    if cls.kind in OPS:
        raise ValueError(f"operator kind {cls.kind!r} registered twice")
    OPS[cls.kind] = cls
    return cls


def op_from_dict(d: dict[str, Any]) -> "Op":
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in OPS:
        raise ValueError(f"unknown operator kind {kind!r}; this hwslim knows {sorted(OPS)}")
    return OPS[kind](**d)


@dataclass(frozen=True)
class Op:
    """Base class. Subclasses are frozen dataclasses whose fields are the static attributes."""

    kind: ClassVar[str] = "op"
    arity: ClassVar[int | None] = 1  # number of inputs (None: any >= 1)
    sets_width: ClassVar[bool] = False  # output channels come from the node's ``out`` unit
    has_mid: ClassVar[bool] = False  # needs the node's ``mid`` unit
    mixes: ClassVar[bool] = False  # an output channel depends on several input channels
    inplace: ClassVar[bool] = False  # may compute into input 0 when that tensor dies here
    view: ClassVar[bool] = False  # the output shares input 0's memory (no new activation bytes)
    flattens: ClassVar[bool] = False  # output is (N, C)
    fuses_residual: ClassVar[bool] = False  # a second input is added before the activation
    # the output's channels are not the input's channels in order (a channel shuffle, a slice of
    # the channels): slimming a unit it reads would move channels to other positions, so every
    # channel it reads must be fixed (the importer fixes such units with ``fix_unsupported``)
    pins: ClassVar[bool] = False
    # a known operator of fixed width (an attention block: its heads split the channels) among those that
    # pin: the importer fixes the units it reads and writes by itself and lists them, naming the module;
    # ``fix_unsupported`` is the user's permission for the operators that move channels in other ways
    fixed_width: ClassVar[bool] = False
    # importing (hwslim.importing.fx_trace): module classes the tracer keeps whole, subclasses too, so
    # that :meth:`from_torch` sees one call (else fx traces into their forward)
    torch_modules: ClassVar[tuple[type, ...]] = ()
    torch_module_names: ClassVar[tuple[str, ...]] = ()  # the same, by qualified name (no import of their package)
    fuses_bn: ClassVar[bool] = False  # a BatchNorm right after it folds into it (:meth:`with_bn`)
    takes_act: ClassVar[bool] = False  # an activation right after it folds into its ``act`` field

    # -- importing -----------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, node: Any, site: ImportSite) -> Claim | None:
        """This operator's import rule: the :class:`Claim` it makes of a traced fx ``node``, None if
        the node is not one of its kind; ``site.refuse(node, ...)`` for one of its kind it cannot express."""
        return None

    def with_act(self, act: str) -> "Op | None":
        """This op with activation ``act`` fused after it (None: it takes none, or has one already)."""
        return replace(self, act=act) if self.takes_act and self.act is None else None  # type: ignore[attr-defined]

    def with_bn(self, eps: float) -> "Op":
        """This op with a BatchNorm of epsilon ``eps`` folded in (ops with :attr:`fuses_bn`)."""
        raise NotImplementedError(f"operator {self.kind!r} does not fuse a BatchNorm")

    def load_weights(self, module: nn.Module | None, sources: dict[str, nn.Module]) -> None:
        """Copy an imported module's weights (:attr:`Claim.sources`) into this op's supernet module."""
        if sources:
            raise NotImplementedError(f"operator {self.kind!r} cannot copy imported weights")

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``kind`` and the fields; a field made with :func:`optional` is left out at its default."""
        d = asdict(self)
        for f in fields(self):
            if f.metadata.get("optional") and d[f.name] == f.default:
                del d[f.name]
        return {"kind": self.kind, **d}

    # -- structure ----------------------------------------------------------------------------
    def out_layout(self, node: "Node", layouts: Sequence[tuple]) -> tuple:
        """The units (or fixed counts) of the output's channels, given the inputs' layouts."""
        if self.sets_width:
            return (node.out,)
        return layouts[0]

    def check_inputs(self, name: str, layouts: Sequence[tuple]) -> None:
        if self.arity is not None and len(layouts) != self.arity:
            raise ValueError(f"{name}: {self.kind} takes {self.arity} input(s), got {len(layouts)}")

    def out_hw(self, hw: Sequence[tuple[int, int]]) -> tuple[int, int]:
        return hw[0]

    def unit_ties(self, node: "Node", layouts: Sequence[tuple]) -> list[tuple]:
        """Pairs of layouts that must have equal widths (checked on every config)."""
        return []

    def groups(self, cin: int) -> int:
        return 1

    @property
    def quantum(self) -> int:
        """What the width of the unit this operator runs on must be a multiple of (a group width)."""
        return 1

    # -- costs --------------------------------------------------------------------------------
    def macs(self, s: "LayerSpec") -> int:
        return 0

    def params(self, s: "LayerSpec") -> int:
        return 0

    # -- latency tables ------------------------------------------------------------------------
    def signature(self, s: "LayerSpec") -> tuple | None:
        """The table key columns (see :data:`hwslim.core.graph.SIGNATURE_FIELDS`); None: not timed."""
        return (self.kind, 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, "")

    def onnx(self, s: "LayerSpec", g: "OnnxGraph", inputs: Sequence[str], out: str) -> None:
        raise NotImplementedError(f"operator {self.kind!r} has no ONNX form")

    # -- execution ------------------------------------------------------------------------------
    def build(self, node: "Node", cin: int, cout: int, mid: int) -> nn.Module | None:
        """The supernet's module at full width (None: no weights)."""
        return None

    def run(self, module: nn.Module | None, xs: Sequence[torch.Tensor], ctx: Slice) -> torch.Tensor:
        raise NotImplementedError

    def plain(self, s: "LayerSpec", src: nn.Module | None) -> nn.Module | None:
        """The materialized module of ``s``: a copy of ``src``'s kept channels (random if None)."""
        return None

    def run_plain(self, module: nn.Module | None, xs: Sequence[torch.Tensor], s: "LayerSpec",
                  inplace: bool, training: bool) -> torch.Tensor:
        return self.run(module, xs, Slice(inplace=inplace, training=training))

    def folded(self, s: "LayerSpec", module: nn.Module | None) -> tuple["Op", nn.Module | None]:
        """The op and module with BatchNorm folded (inference); unchanged by default."""
        return self, module

    # -- channel order ----------------------------------------------------------------------------
    def importance(self, module: nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scores of the channels this node's weights produce: (its output's channels over the
        output's full layout, its inner ``mid`` channels); None where it has none (weightless ops)."""
        return None, None

    def permute(self, module: nn.Module | None, node: "Node", in_perms: Sequence[torch.Tensor | None],
                out_perm: torch.Tensor | None, mid_perm: torch.Tensor | None = None) -> None:
        """Reorder ``module``'s weights, in place, for inputs whose channels were reordered.

        A permutation ``p`` says that new channel ``i`` is old channel ``p[i]``.
        ``in_perms[k]``: input k's channels over its full layout (features, channel-major,
        for a flattened input); ``out_perm`` / ``mid_perm``: the node's ``out`` / ``mid``
        unit. None: unchanged. An op whose output follows its input (a grouped conv, SE,
        BatchNorm) reorders its output by ``in_perms[0]``. After every node has been
        permuted consistently, the network computes what it did before.
        """
        if module is not None:
            raise NotImplementedError(f"operator {self.kind!r} cannot reorder its weights' channels")


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _Window:
    """A sliding window's geometry (a conv's, a pool's): ``kernel``, ``stride``, ``padding`` and
    ``dilation``, each one int (square) or an (h, w) pair: 1x5 kernels, dilated convs."""

    def _compact_window(self) -> None:
        for name in ("kernel", "stride", "padding", "dilation"):
            if hasattr(self, name):
                object.__setattr__(self, name, _compact(getattr(self, name)))

    def window(self) -> tuple[tuple[int, int], ...]:
        """(kernel, stride, padding, dilation) as (h, w) pairs."""
        return tuple(pair(getattr(self, n, 1)) for n in ("kernel", "stride", "padding", "dilation"))

    @property
    def square_window(self) -> bool:
        """A square, undilated window: what the tables' kernel/stride/padding columns say in full."""
        return all(isinstance(getattr(self, n, 1), int) for n in ("kernel", "stride", "padding")) and \
            getattr(self, "dilation", 1) == 1

    def window_out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        k, s, p, d = self.window()
        return (_conv_out(hw[0], k[0], s[0], p[0], d[0]), _conv_out(hw[1], k[1], s[1], p[1], d[1]))

    def window_key(self) -> tuple[tuple[int, int, int], str]:
        """The table's (kernel, stride, padding) columns (the height's) and what the ``extra`` column
        adds for another window: ``"k=1x5;d=2"`` ("" for a square undilated one)."""
        k, s, p, d = self.window()
        extra = [f"{name}={a[0]}x{a[1]}" for name, a in (("k", k), ("s", s), ("p", p)) if a[0] != a[1]]
        if d != (1, 1):
            extra.append(f"d={d[0]}x{d[1]}" if d[0] != d[1] else f"d={d[0]}")
        return (k[0], s[0], p[0]), ";".join(extra)

    def window_attrs(self) -> dict[str, Any]:
        """The ONNX Conv/MaxPool attributes of the window (``dilations`` only when dilated)."""
        k, s, p, d = self.window()
        attrs: dict[str, Any] = {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]]}
        if d != (1, 1):
            attrs["dilations"] = list(d)
        return attrs


def _ceil_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch's pooling output size with ``ceil_mode=True``: a last window must start inside the input."""
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _take(t: torch.Tensor | None, index: torch.Tensor | None, n: int, dim: int = 0) -> torch.Tensor | None:
    """The kept channels of a full-width parameter: ``index`` if given, else the first ``n``."""
    if t is None:
        return None
    if index is not None:
        return t.index_select(dim, index.to(t.device))
    return t.narrow(dim, 0, n)


def _channel_shape(s: "LayerSpec") -> tuple[int, ...]:
    """The shape of a per-channel ONNX constant that broadcasts over ``s``'s input: (1, C) or (1, C, 1, 1)."""
    return (1, s.cin) if s.in_flat else (1, s.cin, 1, 1)


def spec_index(s: "LayerSpec") -> torch.Tensor | None:
    """The kept input channels (features, for a flattened map) of ``s`` in its full-width layout
    (None: the first ``cin``)."""
    if len(s.in_parts) <= 1:
        return None
    k = s.in_per_channel
    return torch.cat([torch.arange(off * k, (off + w) * k) for off, w in s.in_parts])


# -- reordering channels (shared by the ops with weights) ----------------------------------------------
@torch.no_grad()
def _permute_(t: torch.Tensor | None, perm: torch.Tensor | None, dim: int = 0) -> None:
    """Reorder ``t`` along ``dim`` in place: new index i holds old index ``perm[i]``."""
    if t is None or perm is None:
        return
    if len(perm) != t.shape[dim]:
        raise ValueError(f"a permutation of {len(perm)} channels for a dimension of {t.shape[dim]}")
    t.copy_(t.index_select(dim, perm.to(t.device)))


def _permute_bn(bn: nn.BatchNorm2d | None, perm: torch.Tensor | None) -> None:
    if bn is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _permute_(getattr(bn, name), perm)


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """``padding='same'`` as explicit padding (None where it is uneven: an even kernel)."""
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)


def _filter_norms(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter (row) of a weight."""
    return w.detach().float().flatten(1).norm(dim=1).cpu()




def _plain_bn(src: nn.BatchNorm2d | None, c: int, index: torch.Tensor | None,
              cls: type[nn.modules.batchnorm._BatchNorm] = nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = cls(c)
    if src is not None:
        bn.eps, bn.momentum = src.eps, src.momentum if src.momentum is not None else 0.1
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(_take(getattr(src, name), index, c))
            bn.num_batches_tracked.copy_(src.num_batches_tracked)
        bn = bn.to(src.weight.device, src.weight.dtype)
    return bn


@torch.no_grad()
def _load(dst: nn.Module, src: nn.Module, names: Sequence[str] = ("weight", "bias")) -> None:
    """Copy ``src``'s tensors ``names`` into ``dst``'s (a None bias stays as it is)."""
    for name in names:
        if getattr(src, name) is not None:
            getattr(dst, name).copy_(getattr(src, name))


def _load_bn(dst: nn.BatchNorm2d, src: nn.Module) -> None:
    """Copy a BatchNorm's affine parameters and statistics (a FrozenBatchNorm2d has no counter nor momentum)."""
    _load(dst, src, ("weight", "bias", "running_mean", "running_var"))
    if hasattr(src, "num_batches_tracked"):
        _load(dst, src, ("num_batches_tracked",))
    dst.eps = src.eps
    dst.momentum = getattr(src, "momentum", dst.momentum)


FROZEN_BN = "torchvision.ops.misc.FrozenBatchNorm2d"  # torchvision's detectors' BatchNorm with fixed statistics


def is_batch_norm(m: nn.Module | None) -> bool:
    """A 2-D BatchNorm in eval mode's sense: ``nn.BatchNorm2d`` (subclasses too) or torchvision's
    ``FrozenBatchNorm2d`` (named, so the core does not import torchvision)."""
    return isinstance(m, nn.BatchNorm2d) or (m is not None and _qualname(type(m)) == FROZEN_BN)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- convolution -------------------------------------------------------------------------------------
@register_op
@dataclass(frozen=True)
class Conv(_Window, Op):
    """``act(bn(conv(x)) [+ skip])``: the unit a runtime executes as one fused kernel.

    ``group_width`` None is a dense conv; otherwise the conv is grouped with
    ``group_width`` input channels per group and its output tied to its input width
    (``1``: depthwise; RegNet / ResNeXt: 8, 16...), so its width moves in multiples of
    the group width and the group count follows the width. ``bn`` False with ``bias``
    True is a plain biased conv (SE's convs, detection heads...). A second input is a
    residual added before the activation. ``kernel``, ``stride``, ``padding`` and ``dilation``
    are one int or an (h, w) pair (1x5 kernels, dilated convs of segmentation heads).
    """

    kind: ClassVar[str] = "conv"
    arity: ClassVar[int | None] = None
    fuses_residual: ClassVar[bool] = True
    torch_modules: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    fuses_bn: ClassVar[bool] = True
    takes_act: ClassVar[bool] = True
    kernel: int | tuple[int, int] = 1
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    group_width: int | None = None
    act: str | None = None
    bn: bool = True
    bias: bool = False
    eps: float = 1e-5  # BatchNorm's epsilon (MobileNetV3: 1e-3)
    dilation: int | tuple[int, int] = optional(1)
    # the output is ``parts`` equal parts, each as wide as the node's ``out`` unit, each keeping its first
    # channels: a split into equal parts (YOLOv8's C2f chunk) then slims the unit in whole sets of parts
    parts: int = optional(1)

    def __post_init__(self) -> None:
        check_act(self.act)
        self._compact_window()
        if self.parts > 1 and self.tied:
            raise ValueError("a grouped conv's output follows its input: it has no parts of its own")

    @classmethod
    def from_torch(cls, node, site):
        m = _plain_layer(node, site, nn.Conv2d, "a Conv2d with its own forward, e.g. TensorFlow 'same' padding "
                                                "that depends on the input size")
        if m is None:
            return None
        k, s, d = pair(m.kernel_size), pair(m.stride), pair(m.dilation)
        p = _same_padding(k, d) if m.padding == "same" else (0, 0) if m.padding == "valid" else pair(m.padding)
        if p is None or m.padding_mode != "zeros":
            raise site.refuse(node, f"a convolution with kernel {m.kernel_size}, padding {m.padding!r}, dilation "
                                    f"{m.dilation}, padding mode {m.padding_mode!r} (hwslim's are zero-padded, "
                                    "the same on both sides)")
        group_width = None
        if m.groups > 1:
            if m.in_channels != m.out_channels:
                raise site.refuse(node, f"a grouped convolution whose output ({m.out_channels}) differs from its "
                                        f"input ({m.in_channels})")
            group_width = m.in_channels // m.groups
        op = cls(k, s, p, group_width, None, False, m.bias is not None, dilation=d)
        return Claim(op, site.tensor_args(node)[:1], {"conv": m})

    def with_bn(self, eps):
        return replace(self, bn=True, eps=eps)

    def load_weights(self, module, sources):
        _load(module.conv, sources["conv"])
        if "bn" in sources:
            _load_bn(module.bn, sources["bn"])

    @property
    def tied(self) -> bool:
        return self.group_width is not None

    @property
    def mixes(self) -> bool:  # type: ignore[override]
        return not self.tied

    @property
    def sets_width(self) -> bool:  # type: ignore[override]
        return not self.tied

    def check_inputs(self, name: str, layouts: Sequence[tuple]) -> None:
        if len(layouts) not in (1, 2):
            raise ValueError(f"{name}: conv takes an input and an optional residual, got {len(layouts)} inputs")

    def out_layout(self, node, layouts):
        return (node.out,) * self.parts if self.sets_width else layouts[0]

    def _rows(self, full: int, width: int, device: torch.device) -> torch.Tensor | None:
        """The kept filters of an output in parts: the first ``width`` of each part of ``full`` (None: a prefix)."""
        if self.parts == 1 or width == full:
            return None
        starts = torch.arange(self.parts, device=device)[:, None] * full
        return (starts + torch.arange(width, device=device)).reshape(-1)

    def unit_ties(self, node, layouts):
        return [(self.out_layout(node, layouts), layouts[1])] if len(layouts) == 2 else []

    def out_hw(self, hw):
        return self.window_out_hw(hw[0])

    def groups(self, cin: int) -> int:
        return 1 if self.group_width is None else max(1, cin // self.group_width)

    @property
    def quantum(self) -> int:  # type: ignore[override]
        return self.group_width or 1

    @property
    def depthwise(self) -> bool:
        return self.group_width == 1

    @property
    def taps(self) -> int:
        """Weights per filter and input channel: kernel height times width."""
        (kh, kw), *_ = self.window()
        return kh * kw

    def macs(self, s):
        return s.batch * s.cout * (s.cin // s.groups) * self.taps * s.out_h * s.out_w

    def params(self, s):
        n = s.cout * (s.cin // s.groups) * self.taps
        return n + (s.cout if self.bias else 0) + (2 * s.cout if self.bn else 0)

    def signature(self, s):
        # BN folds into the conv and a bias is free, so they do not change the runtime kernel
        (k, st, p), extra = self.window_key()
        return ("conv", k, st, p, s.groups, s.in_h, s.in_w, s.cin, s.cout, self.act or "none", len(s.inputs) > 1,
                s.batch, extra)

    def onnx(self, s, g, inputs, out):
        fan_in = s.cin // s.groups * self.taps
        w = g.weight(f"{s.name}.weight", (s.cout, s.cin // s.groups, *self.window()[0]), 1 / math.sqrt(fan_in))
        b = g.weight(f"{s.name}.bias", (s.cout,), 0.1)
        cur = g.tmp(s.name, "conv", last=len(inputs) == 1 and self.act is None, out=out)
        g.node("Conv", [inputs[0], w, b], [cur], f"{s.name}::conv", group=s.groups, **self.window_attrs())
        if len(inputs) > 1:
            nxt = g.tmp(s.name, "add", last=self.act is None, out=out)
            g.node("Add", [cur, inputs[1]], [nxt], f"{s.name}::add")
            cur = nxt
        if self.act is not None:
            ACTIVATIONS[self.act].emit(g, cur, out, f"{s.name}::act")

    def build(self, node, cin, cout, mid):
        k, st, p, d = self.window()
        conv = SlimmableConv2d(cin, cin if self.tied else cout * self.parts, k, st, p, bias=self.bias,
                               group_width=self.group_width, dilation=d)
        return SlimmableConvBN(conv, bn=self.bn, eps=self.eps)

    def run(self, module, xs, ctx):
        out, rows = ctx.out, None
        if self.parts > 1:
            full = module.conv.out_channels // self.parts
            rows = self._rows(full, full if out is None else out, xs[0].device)
            out = None if rows is None else len(rows)
        y = module(xs[0], out, ctx.index, ctx.training, rows)
        return self._tail(y, xs, fresh())

    def _tail(self, y, xs, inplace):  # y is the conv's own output: writable without autograd
        if len(xs) > 1:
            y = y.add_(xs[1]) if inplace else y + xs[1]
        return apply_act(self.act, y, inplace)

    def plain(self, s, src):
        index = spec_index(s)
        k, st, p, d = self.window()
        conv = nn.Conv2d(s.cin, s.cout, k, st, p, d, groups=s.groups, bias=self.bias)
        if src is None:
            return nn.Sequential(conv, nn.BatchNorm2d(s.cout, eps=self.eps)) if self.bn else conv
        with torch.no_grad():
            w = src.conv.weight
            if self.tied:  # rows follow the kept input channels
                conv.weight.copy_(_take(w, index, s.cout))
                out_index = index
            else:
                out_index = self._rows(len(w) // self.parts, s.cout // self.parts, w.device)
                conv.weight.copy_(_take(_take(w, out_index, s.cout), index, s.cin, dim=1))
            if self.bias:
                conv.bias.copy_(_take(src.conv.bias, out_index, s.cout))
        conv = conv.to(w.device, w.dtype)
        if not self.bn:
            return conv
        return nn.Sequential(conv, _plain_bn(src.bn, s.cout, out_index))

    def run_plain(self, module, xs, s, inplace, training):
        return self._tail(module(xs[0]), xs, fresh())

    def importance(self, module):  # |BN scale|, else the filters' L2 norms
        if self.bn:
            return module.bn.weight.detach().float().abs().cpu(), None
        return _filter_norms(module.conv.weight), None

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        conv, p_in = module.conv, in_perms[0]
        if self.tied:  # the output is the input's channels: whole groups move, their filters with them
            _check_whole_groups(p_in, self.group_width, node.name, "a grouped conv")
            rows = p_in
        else:
            _permute_(conv.weight, p_in, 1)
            rows = out_perm
            if out_perm is not None and self.parts > 1:  # every part moves as the unit does
                rows = torch.cat([out_perm + k * len(out_perm) for k in range(self.parts)])
        _permute_(conv.weight, rows)
        _permute_(conv.bias, rows)
        _permute_bn(module.bn, rows)

    def folded(self, s, module):
        if not self.bn:
            return self, module
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        conv, bn = module[0], module[1]
        return replace(self, bn=False, bias=True), fuse_conv_bn_eval(conv.eval(), bn.eval())


# -- squeeze-and-excitation -----------------------------------------------------------------------------
@register_op
@dataclass(frozen=True)
class SqueezeExcite(Op):
    """``x * gate(expand(act(reduce(avgpool(x)))))``: the reduce width is the node's ``mid`` unit.

    Both 1x1 convs have biases (torchvision's ``SqueezeExcitation``, timm's ``SEModule``);
    ``gate`` is ``sigmoid`` (EfficientNet, RegNet) or ``hardsigmoid`` (MobileNetV3).
    """

    kind: ClassVar[str] = "se"
    has_mid: ClassVar[bool] = True
    mixes: ClassVar[bool] = True
    inplace: ClassVar[bool] = True
    act: str = "relu"
    gate: str = "sigmoid"

    def __post_init__(self) -> None:
        check_act(self.act)
        check_act(self.gate, "gate")

    def macs(self, s):
        return s.batch * 2 * s.cin * s.mid

    def params(self, s):
        return 2 * s.cin * s.mid + s.mid + s.cin

    def signature(self, s):
        return ("se", 1, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, self.act, False, s.batch,
                f"mid={s.mid};gate={self.gate}")

    def onnx(self, s, g, inputs, out):
        n, x = s.name, inputs[0]
        g.node("GlobalAveragePool", [x], [f"{n}::pool"], f"{n}::pool")
        w1 = g.weight(f"{n}.fc1.weight", (s.mid, s.cin, 1, 1), 1 / math.sqrt(s.cin))
        w2 = g.weight(f"{n}.fc2.weight", (s.cin, s.mid, 1, 1), 1 / math.sqrt(s.mid))
        g.node("Conv", [f"{n}::pool", w1, g.weight(f"{n}.fc1.bias", (s.mid,), 0.1)], [f"{n}::fc1"], f"{n}::fc1",
               kernel_shape=[1, 1])
        ACTIVATIONS[self.act].emit(g, f"{n}::fc1", f"{n}::act", f"{n}::act")
        g.node("Conv", [f"{n}::act", w2, g.weight(f"{n}.fc2.bias", (s.cin,), 0.1)], [f"{n}::fc2"], f"{n}::fc2",
               kernel_shape=[1, 1])
        ACTIVATIONS[self.gate].emit(g, f"{n}::fc2", f"{n}::gate", f"{n}::gate")
        g.node("Mul", [x, f"{n}::gate"], [out], f"{n}::mul")

    def build(self, node, cin, cout, mid):

        return SlimmableSE(cin, mid)

    def run(self, module, xs, ctx):
        x = xs[0]
        scale = module.scale(x, ctx.mid, ctx.index, self.act, self.gate)
        return x.mul_(scale) if ctx.inplace else x * scale

    def plain(self, s, src):

        m = PlainSE(s.cin, s.mid)
        if src is not None:
            index = spec_index(s)
            with torch.no_grad():
                m.fc1.weight.copy_(_take(src.fc1.weight[: s.mid], index, s.cin, dim=1))
                m.fc1.bias.copy_(src.fc1.bias[: s.mid])
                m.fc2.weight.copy_(_take(src.fc2.weight[:, : s.mid], index, s.cin))
                m.fc2.bias.copy_(_take(src.fc2.bias, index, s.cin))
            m = m.to(src.fc1.weight.device, src.fc1.weight.dtype)
        return m

    def load_weights(self, module, sources):
        _load(module.fc1, sources["fc1"])
        _load(module.fc2, sources["fc2"])

    def importance(self, module):  # the gate scales its input: only the reduce channels are its own
        return None, _filter_norms(module.fc1.weight)

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        p = in_perms[0]  # the output follows the input
        _permute_(module.fc1.weight, p, 1)
        _permute_(module.fc1.weight, mid_perm)
        _permute_(module.fc1.bias, mid_perm)
        _permute_(module.fc2.weight, mid_perm, 1)
        _permute_(module.fc2.weight, p)
        _permute_(module.fc2.bias, p)

    def run_plain(self, module, xs, s, inplace, training):
        x = xs[0]
        f = fresh()
        scale = apply_act(self.gate, module.fc2(apply_act(self.act, module.fc1(x.mean((2, 3), keepdim=True)), f)), f)
        return x.mul_(scale) if inplace else x * scale


# -- element-wise and channel-wise ops ---------------------------------------------------------------------
@register_op
@dataclass(frozen=True)
class Add(Op):
    """``act(a + b [+ ...])``: a standalone element-wise add (its inputs' widths are tied)."""

    kind: ClassVar[str] = "add"
    arity: ClassVar[int | None] = None
    inplace: ClassVar[bool] = True
    takes_act: ClassVar[bool] = True
    act: str | None = None

    def __post_init__(self) -> None:
        check_act(self.act)

    @classmethod
    def from_torch(cls, node, site):
        operands = site.add_operands(node)
        return Claim(cls(), operands) if operands is not None else None

    def check_inputs(self, name, layouts):
        if len(layouts) < 2:
            raise ValueError(f"{name}: add takes at least two inputs, got {len(layouts)}")

    def unit_ties(self, node, layouts):
        return [(layouts[0], other) for other in layouts[1:]]

    def signature(self, s):
        return ("add", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, self.act or "none", False, s.batch,
                f"n={len(s.inputs)}")

    def onnx(self, s, g, inputs, out):
        cur = inputs[0]
        for k, other in enumerate(inputs[1:], start=1):
            last = k == len(inputs) - 1 and self.act is None
            nxt = out if last else f"{s.name}::add{k}"
            g.node("Add", [cur, other], [nxt], f"{s.name}::add{k}")
            cur = nxt
        if self.act is not None:
            ACTIVATIONS[self.act].emit(g, cur, out, f"{s.name}::act")

    def run(self, module, xs, ctx):
        y = xs[0]
        for k, other in enumerate(xs[1:]):
            y = y.add_(other) if (ctx.inplace or (k > 0 and fresh())) else y + other
        return apply_act(self.act, y, ctx.inplace or fresh())


@register_op
@dataclass(frozen=True)
class Act(Op):
    """A standalone activation."""

    kind: ClassVar[str] = "act"
    inplace: ClassVar[bool] = True
    act: str = "relu"

    def __post_init__(self) -> None:
        check_act(self.act)

    @classmethod
    def from_torch(cls, node, site):
        act = site.act_of(node)
        return Claim(cls(act), site.tensor_args(node)[:1]) if act is not None else None

    def signature(self, s):
        return ("act", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, self.act, False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        ACTIVATIONS[self.act].emit(g, inputs[0], out, f"{s.name}::act")

    def run(self, module, xs, ctx):
        return apply_act(self.act, xs[0], ctx.inplace)


@register_op
@dataclass(frozen=True)
class BatchNorm(Op):
    """``act(bn(x))`` on its own (pre-activation blocks: DenseNet's norm-relu-conv); on (N, C) features
    it is a BatchNorm1d (a classifier head's)."""

    kind: ClassVar[str] = "bn"
    torch_modules: ClassVar[tuple[type, ...]] = (nn.BatchNorm2d,)
    torch_module_names: ClassVar[tuple[str, ...]] = (FROZEN_BN,)
    takes_act: ClassVar[bool] = True
    act: str | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        check_act(self.act)

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        x = site.tensor_args(node)[:1]
        if isinstance(m, nn.BatchNorm1d):
            if len(site.shape(x[0])) != 2 or not (m.affine and m.track_running_stats):
                raise site.refuse(node, "BatchNorm1d on a sequence, or without affine parameters or running "
                                        "statistics (hwslim's normalizes (N, C) features)")
            return Claim(cls(None, m.eps), x, {"bn": m})
        if not is_batch_norm(m):
            return None
        return Claim(cls(site.norm_act(node, m), m.eps), x, {"bn": m})

    def load_weights(self, module, sources):
        _load_bn(module, sources["bn"])

    def params(self, s):
        return 2 * s.cin

    def signature(self, s):
        return ("bn", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, self.act or "none", False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        shape = _channel_shape(s)
        scale = g.weight(f"{s.name}.scale", shape, 0.1)
        shift = g.weight(f"{s.name}.shift", shape, 0.1)
        cur = f"{s.name}::mul"
        g.node("Mul", [inputs[0], scale], [cur], f"{s.name}::mul")
        nxt = out if self.act is None else f"{s.name}::add"
        g.node("Add", [cur, shift], [nxt], f"{s.name}::add")
        if self.act is not None:
            ACTIVATIONS[self.act].emit(g, nxt, out, f"{s.name}::act")

    def build(self, node, cin, cout, mid):
        return nn.BatchNorm2d(cin, eps=self.eps)

    def run(self, module, xs, ctx):
        return apply_act(self.act, sliced_batch_norm(module, xs[0], ctx.index, ctx.training), fresh())

    def plain(self, s, src):
        cls = nn.BatchNorm1d if s.in_flat else nn.BatchNorm2d
        return _plain_bn(src, s.cin, spec_index(s), cls) if src is not None else cls(s.cin, eps=self.eps)

    def importance(self, module):
        return module.weight.detach().float().abs().cpu(), None

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        _permute_bn(module, in_perms[0])

    def run_plain(self, module, xs, s, inplace, training):
        return apply_act(self.act, module(xs[0]), fresh())


@register_op
@dataclass(frozen=True)
class Concat(Op):
    """Channel concatenation: the output's channels are its parts' channels, in order."""

    kind: ClassVar[str] = "concat"
    arity: ClassVar[int | None] = None

    @classmethod
    def from_torch(cls, node, site):
        if node.op != "call_function" or node.target is not torch.cat:
            return None
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3) or not all(isinstance(p, type(node)) for p in parts):
            raise site.refuse(node, f"a concatenation along dimension {dim} (only channels, dim 1)")
        return Claim(cls(), list(parts))

    def check_inputs(self, name, layouts):
        if len(layouts) < 1:
            raise ValueError(f"{name}: concat needs inputs")

    def out_layout(self, node, layouts):
        return tuple(ref for lay in layouts for ref in lay)

    def out_hw(self, hw):
        if len(set(hw)) != 1:
            raise ValueError(f"concat of tensors of different sizes {list(hw)}")
        return hw[0]

    def signature(self, s):
        return ("concat", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch,
                "parts=" + "+".join(str(c) for c in s.in_channels))

    def onnx(self, s, g, inputs, out):
        g.node("Concat", list(inputs), [out], f"{s.name}::concat", axis=1)

    def run(self, module, xs, ctx):
        return torch.cat(list(xs), 1)


@dataclass(frozen=True)
class _Pool(_Window, Op):
    """A pooling window (``F.max_pool2d``, ``F.avg_pool2d``; their modules): ``kernel``, ``stride``
    and ``padding`` are one int or an (h, w) pair."""

    kernel: int | tuple[int, int] = 2
    stride: int | tuple[int, int] = 2
    padding: int | tuple[int, int] = 0
    torch_pool: ClassVar[tuple[type, Any]] = (nn.Module, None)  # the module class and function it claims
    options: ClassVar[tuple[str, ...]] = ()  # their settings after kernel_size, stride, padding

    def __post_init__(self) -> None:
        self._compact_window()

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        module_cls, fn = cls.torch_pool
        if not isinstance(m, module_cls) and not (node.op == "call_function" and node.target is fn):
            return None
        names = ("kernel_size", "stride", "padding") + cls.options
        if m is not None:
            opt = {k: getattr(m, k) for k in names}
        else:
            opt = dict(zip(names, node.args[1:]))
            opt.update({k: v for k, v in node.kwargs.items() if k in names})
        derived = isinstance(opt["kernel_size"], torch.fx.Node)  # F.avg_pool2d(x, x.size()[3])
        opt = {k: site.value(v) for k, v in opt.items()}
        k = pair(opt["kernel_size"])
        s = pair(opt.get("stride") or opt["kernel_size"])  # stride None or () means the kernel
        p = pair(opt.get("padding", 0))
        x = site.tensor_args(node)[0]
        if derived and k == tuple(site.shape(x)[2:]) and s == k and p == (0, 0):
            return Claim(GlobalAvgPool(flatten=False), [x])  # a window as large as the input, at any size
        op = None if None in (k, s, p) else cls._imported(k, s, p, opt, node, site)
        if op is None:
            raise site.refuse(node, "this pooling (ceil-mode average, average without counting padding, or a "
                                    "custom divisor)")
        return Claim(op, [x])

    @classmethod
    def _imported(cls, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], opt: dict[str, Any], node: Any,
                  site: ImportSite) -> "_Pool | None":
        """The op for a window (``(h, w)`` pairs) with settings ``opt`` (None: one this op cannot express)."""
        raise NotImplementedError

    def out_hw(self, hw):
        return self.window_out_hw(hw[0])

    def signature(self, s):
        (k, st, p), extra = self.window_key()
        return (self.kind, k, st, p, s.cin, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, extra)


@register_op
@dataclass(frozen=True)
class MaxPool(_Pool):
    """Max pooling; ``ceil_mode`` as PyTorch's (a last partial window counts; GoogLeNet, SqueezeNet)."""

    kind: ClassVar[str] = "maxpool"
    torch_pool: ClassVar[tuple[type, Any]] = (nn.MaxPool2d, F.max_pool2d)
    options: ClassVar[tuple[str, ...]] = ("dilation", "ceil_mode")
    ceil_mode: bool = False
    dilation: int | tuple[int, int] = optional(1)

    @classmethod
    def _imported(cls, k, s, p, opt, node, site):
        d = pair(opt.get("dilation") or 1)
        return None if d is None else cls(k, s, p, bool(opt.get("ceil_mode", False)), d)

    def out_hw(self, hw):
        if not self.ceil_mode:
            return super().out_hw(hw)
        k, s, p, d = self.window()
        return tuple(_ceil_out(n, d[i] * (k[i] - 1) + 1, s[i], p[i]) for i, n in enumerate(hw[0]))

    def signature(self, s):
        sig = super().signature(s)
        return sig[:-1] + (";".join(x for x in (sig[-1], "ceil") if x),) if self.ceil_mode else sig

    def onnx(self, s, g, inputs, out):
        g.node("MaxPool", [inputs[0]], [out], f"{s.name}::pool", ceil_mode=int(self.ceil_mode), **self.window_attrs())

    def run(self, module, xs, ctx):
        return F.max_pool2d(xs[0], self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


@register_op
@dataclass(frozen=True)
class AvgPool(_Pool):
    """Average pooling (zero padding counted, PyTorch's default ``count_include_pad=True``)."""

    kind: ClassVar[str] = "avgpool"
    torch_pool: ClassVar[tuple[type, Any]] = (nn.AvgPool2d, F.avg_pool2d)
    options: ClassVar[tuple[str, ...]] = ("ceil_mode", "count_include_pad", "divisor_override")

    @classmethod
    def _imported(cls, k, s, p, opt, node, site):
        if opt.get("divisor_override") is not None or not (opt.get("count_include_pad", True) or p == (0, 0)):
            return None  # without padding there is nothing to count
        if opt.get("ceil_mode", False):
            # ceil mode changes nothing when the windows tile the input exactly (timm's ResNet-D
            # shortcut: AvgPool2d(2, 2, ceil_mode=True) on an even size)
            x = site.tensor_args(node)[0]
            if site.shape(node)[2:] != tuple((h + 2 * p[i] - k[i]) // s[i] + 1
                                             for i, h in enumerate(site.shape(x)[2:])):
                return None
        return cls(k, s, p)

    def onnx(self, s, g, inputs, out):
        g.node("AveragePool", [inputs[0]], [out], f"{s.name}::pool", count_include_pad=1, **self.window_attrs())

    def run(self, module, xs, ctx):
        return F.avg_pool2d(xs[0], self.kernel, self.stride, self.padding)


@register_op
@dataclass(frozen=True)
class GlobalAvgPool(Op):
    """Global average pooling; ``flatten`` gives (N, C) for a classifier."""

    kind: ClassVar[str] = "gap"
    flatten: bool = True

    @classmethod
    def from_torch(cls, node, site):
        for keepdim in (True, False):
            if cls.matches(node, site.module(node), keepdim):
                return Claim(cls(flatten=not keepdim), site.tensor_args(node)[:1])
        return None

    @staticmethod
    def matches(node: Any, module: nn.Module | None, keepdim: bool) -> bool:
        """Whether the fx ``node`` (calling ``module``) pools globally, keeping (N, C, 1, 1) or not."""
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return square(module.output_size) == 1 and keepdim
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            return square(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) == 1 and keepdim
        if node.op == "call_method" and node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            kd = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            return isinstance(dims, (tuple, list)) and tuple(sorted(d % 4 for d in dims)) == (2, 3) and \
                bool(kd) == keepdim
        return False

    @property
    def flattens(self) -> bool:  # type: ignore[override]
        return self.flatten

    def out_hw(self, hw):
        return (1, 1)

    def signature(self, s):
        # the old tables' key for a flattening global pool: kernel = input height
        return ("gap", s.in_h, 1, 0, s.cin, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch,
                "" if self.flatten else "keepdim")

    def onnx(self, s, g, inputs, out):
        if not self.flatten:
            g.node("GlobalAveragePool", [inputs[0]], [out], f"{s.name}::gap")
            return
        g.node("GlobalAveragePool", [inputs[0]], [f"{s.name}::gap"], f"{s.name}::gap")
        g.node("Flatten", [f"{s.name}::gap"], [out], f"{s.name}::flatten", axis=1)

    def run(self, module, xs, ctx):
        y = F.adaptive_avg_pool2d(xs[0], 1)
        return torch.flatten(y, 1) if self.flatten else y


@register_op
@dataclass(frozen=True)
class Flatten(Op):
    """(N, C, H, W) -> (N, C*H*W), channel-major: a view, free.

    Each channel becomes H*W consecutive features (VGG, AlexNet: 512 x 7 x 7 into a
    linear layer), so keeping channel c keeps features ``c*H*W .. (c+1)*H*W - 1`` and the
    linear layer reading it slices its weights that way (``LayerSpec.in_per_channel``).
    """

    kind: ClassVar[str] = "flatten"
    view: ClassVar[bool] = True
    flattens: ClassVar[bool] = True

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if isinstance(m, nn.Flatten):
            ok = m.start_dim == 1 and m.end_dim == -1
        elif not (site.has_shape(node) and len(site.shape(node)) == 2):
            ok = False
        elif node.op == "call_function" and node.target is torch.flatten:
            ok = (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)) == 1
        elif node.op == "call_method" and node.target in ("flatten", "view", "reshape"):
            x = site.shape(site.tensor_args(node)[0])
            ok = len(x) == 4 and site.shape(node)[0] == x[0]
        else:
            ok = False
        return Claim(cls(), site.tensor_args(node)[:1]) if ok else None

    def out_hw(self, hw):
        return (1, 1)

    def signature(self, s):
        return None

    def onnx(self, s, g, inputs, out):
        g.node("Flatten", [inputs[0]], [out], f"{s.name}::flatten", axis=1)

    def run(self, module, xs, ctx):
        return torch.flatten(xs[0], 1)


@register_op
@dataclass(frozen=True)
class Dropout(Op):
    """Dropout: identity at inference (free), active while training."""

    kind: ClassVar[str] = "dropout"
    view: ClassVar[bool] = True
    p: float = 0.0

    def signature(self, s):
        return None

    def onnx(self, s, g, inputs, out):
        g.node("Identity", [inputs[0]], [out], f"{s.name}::identity")

    def run(self, module, xs, ctx):
        return F.dropout(xs[0], self.p, True) if ctx.training and self.p > 0 else xs[0]


# -- channel bookkeeping on fixed channels (ShuffleNetV2; imported with --fix-unsupported) ----------
class _Pinned(Op):
    """An op that moves channels to other positions: it reads fixed channels only (:attr:`Op.pins`)."""

    pins: ClassVar[bool] = True

    def check_inputs(self, name, layouts):
        super().check_inputs(name, layouts)
        units = [r for lay in layouts for r in lay if not isinstance(r, int)]
        if units:
            raise ValueError(f"{name}: a {self.kind} moves channels to other positions, so it reads fixed channels "
                             f"only; it reads unit(s) {', '.join(map(repr, units))}")

    def out_layout(self, node, layouts):
        return (self.out_channels(sum(layouts[0])),)

    def out_channels(self, cin: int) -> int:
        return cin


@register_op
@dataclass(frozen=True)
class ChannelShuffle(_Pinned):
    """ShuffleNet's channel shuffle: ``x.view(N, g, C/g, H, W).transpose(1, 2).reshape(N, C, H, W)``.

    Output channel ``j`` is input channel ``(j % g) * C/g + j // g``: the ``g`` groups are
    interleaved. Its input's channels are fixed (:attr:`Op.pins`); no MACs, no weights.
    """

    kind: ClassVar[str] = "shuffle"
    n_groups: int = 2

    def check_inputs(self, name, layouts):
        super().check_inputs(name, layouts)
        if self.n_groups < 1 or sum(layouts[0]) % self.n_groups:
            raise ValueError(f"{name}: a shuffle of {sum(layouts[0])} channels in {self.n_groups} groups")

    def signature(self, s):
        return ("shuffle", 0, 1, 0, self.n_groups, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        n, c, k = s.name, s.cin, self.n_groups
        g.node("Reshape", [inputs[0], g.ints(f"{n}::split_shape", [0, k, c // k, s.in_h, s.in_w])], [f"{n}::split"],
               f"{n}::split")
        g.node("Transpose", [f"{n}::split"], [f"{n}::t"], f"{n}::transpose", perm=[0, 2, 1, 3, 4])
        g.node("Reshape", [f"{n}::t", g.ints(f"{n}::shape", [0, c, s.in_h, s.in_w])], [out], f"{n}::merge")

    def run(self, module, xs, ctx):
        x = xs[0]
        n, c, h, w = x.shape
        return x.reshape(n, self.n_groups, c // self.n_groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@register_op
@dataclass(frozen=True)
class ChannelSlice(_Pinned):
    """Channels ``start .. stop - 1`` of the input: ``x[:, start:stop]``, one part of a ``chunk`` or ``split``.

    A view (no new activation bytes in PyTorch; ONNX Runtime copies it). Its input's
    channels are fixed (:attr:`Op.pins`): a narrower input would shift which channels
    fall in the range.
    """

    kind: ClassVar[str] = "slice"
    view: ClassVar[bool] = True
    start: int = 0
    stop: int = 1

    def check_inputs(self, name, layouts):
        super().check_inputs(name, layouts)
        if not 0 <= self.start < self.stop <= sum(layouts[0]):
            raise ValueError(f"{name}: channels {self.start}..{self.stop - 1} of a tensor of {sum(layouts[0])}")

    def out_channels(self, cin):
        return self.stop - self.start

    def signature(self, s):
        return ("slice", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, f"start={self.start}")

    def onnx(self, s, g, inputs, out):
        n = s.name
        g.node("Slice", [inputs[0], g.ints(f"{n}::start", [self.start]), g.ints(f"{n}::stop", [self.stop]),
                         g.ints("slice.axis1", [1])], [out], f"{n}::slice")

    def run(self, module, xs, ctx):
        return xs[0].narrow(1, self.start, self.stop - self.start)


@register_op
@dataclass(frozen=True)
class Linear(Op):
    """``act(x @ W.T + b)`` on (N, C) features; its output width is the node's ``out``."""

    kind: ClassVar[str] = "linear"
    sets_width: ClassVar[bool] = True
    mixes: ClassVar[bool] = True
    flattens: ClassVar[bool] = True
    torch_modules: ClassVar[tuple[type, ...]] = (nn.Linear,)
    takes_act: ClassVar[bool] = True
    act: str | None = None
    dropout: float = 0.0  # applied to the input while training (torchvision's classifier dropout)
    bias: bool = optional(True)

    def __post_init__(self) -> None:
        check_act(self.act)

    @classmethod
    def from_torch(cls, node, site):
        m = _plain_layer(node, site, nn.Linear, "a Linear with its own forward")
        if m is None:
            return None
        x = site.tensor_args(node)[0]
        if len(site.shape(x)) != 2:
            raise site.refuse(node, f"a linear layer on a {len(site.shape(x))}-D tensor (channels-last blocks)")
        return Claim(cls(bias=m.bias is not None), [x], {"linear": m})

    def load_weights(self, module, sources):
        _load(module, sources["linear"])

    def out_hw(self, hw):
        return (1, 1)

    def macs(self, s):
        return s.batch * s.cin * s.cout

    def params(self, s):
        return s.cin * s.cout + (s.cout if self.bias else 0)

    def signature(self, s):
        return ("linear", 1, 1, 0, 1, 1, 1, s.cin, s.cout, self.act or "none", False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        w = g.weight(f"{s.name}.weight", (s.cout, s.cin), 0.01)
        b = [g.weight(f"{s.name}.bias", (s.cout,), 0.0)] if self.bias else []
        cur = out if self.act is None else f"{s.name}::gemm"
        g.node("Gemm", [inputs[0], w, *b], [cur], f"{s.name}::gemm", transB=1)
        if self.act is not None:
            ACTIVATIONS[self.act].emit(g, cur, out, f"{s.name}::act")

    def build(self, node, cin, cout, mid):
        return nn.Linear(cin, cout, bias=self.bias)

    def run(self, module, xs, ctx):
        x = xs[0]
        if ctx.training and self.dropout:
            x = F.dropout(x, self.dropout, True)
        out = ctx.out if ctx.out is not None else module.out_features
        w = _take(module.weight[:out], ctx.index, x.shape[1], dim=1)
        return apply_act(self.act, F.linear(x, w, None if module.bias is None else module.bias[:out]), fresh())

    def importance(self, module):
        return _filter_norms(module.weight), None

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        _permute_(module.weight, in_perms[0], 1)  # features: a flattened map's positions per channel
        _permute_(module.weight, out_perm)
        _permute_(module.bias, out_perm)

    def plain(self, s, src):
        lin = nn.Linear(s.cin, s.cout, bias=self.bias)
        if src is not None:
            with torch.no_grad():
                lin.weight.copy_(_take(src.weight[: s.cout], spec_index(s), s.cin, dim=1))
                if self.bias:
                    lin.bias.copy_(src.bias[: s.cout])
            lin = lin.to(src.weight.device, src.weight.dtype)
        return lin

    def run_plain(self, module, xs, s, inplace, training):
        x = xs[0]
        if training and self.dropout:
            x = F.dropout(x, self.dropout, True)
        return apply_act(self.act, module(x), fresh())


@register_op
@dataclass(frozen=True)
class ConvTranspose(Op):
    """``act(conv_transpose2d(x, W, b, stride))``: a learned upsampling, dense and unpadded (YOLOv8-seg's
    mask prototypes: kernel 2, stride 2). Its output width is the node's ``out``; the weight is
    (in, out, k, k), so its input channels are rows and its output channels columns."""

    kind: ClassVar[str] = "deconv"
    sets_width: ClassVar[bool] = True
    mixes: ClassVar[bool] = True
    torch_modules: ClassVar[tuple[type, ...]] = (nn.ConvTranspose2d,)
    takes_act: ClassVar[bool] = True
    kernel: int = 2
    stride: int = 2
    act: str | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        check_act(self.act)

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if not isinstance(m, nn.ConvTranspose2d):
            return None
        k, st = square(m.kernel_size), square(m.stride)
        if type(m).forward is not nn.ConvTranspose2d.forward or len(node.args) != 1 or node.kwargs or k is None or \
                st is None or square(m.padding) != 0 or square(m.output_padding) != 0 or \
                square(m.dilation) != 1 or m.groups != 1 or m.padding_mode != "zeros":
            raise site.refuse(node, f"{type(m).__name__} (padded, grouped, dilated, non-square or with an "
                                    "output size; a plain one maps)")
        return Claim(cls(k, st, bias=m.bias is not None), site.tensor_args(node)[:1], {"deconv": m})

    def load_weights(self, module, sources):
        _load(module, sources["deconv"])

    def out_hw(self, hw):
        return tuple((v - 1) * self.stride + self.kernel for v in hw[0])

    def macs(self, s):
        return s.batch * s.cin * s.cout * self.kernel ** 2 * s.in_h * s.in_w

    def params(self, s):
        return s.cin * s.cout * self.kernel ** 2 + (s.cout if self.bias else 0)

    def signature(self, s):
        return ("deconv", self.kernel, self.stride, 0, 1, s.in_h, s.in_w, s.cin, s.cout, self.act or "none", False,
                s.batch, "")

    def onnx(self, s, g, inputs, out):
        k = self.kernel
        w = g.weight(f"{s.name}.weight", (s.cin, s.cout, k, k), 1 / math.sqrt(s.cin * k * k))
        b = [g.weight(f"{s.name}.bias", (s.cout,), 0.1)] if self.bias else []
        cur = out if self.act is None else f"{s.name}::deconv"
        g.node("ConvTranspose", [inputs[0], w, *b], [cur], f"{s.name}::deconv", kernel_shape=[k, k],
               strides=[self.stride, self.stride])
        if self.act is not None:
            ACTIVATIONS[self.act].emit(g, cur, out, f"{s.name}::act")

    def build(self, node, cin, cout, mid):
        return nn.ConvTranspose2d(cin, cout, self.kernel, self.stride, bias=self.bias)

    def run(self, module, xs, ctx):
        x = xs[0]
        out = ctx.out if ctx.out is not None else module.out_channels
        w = _take(module.weight[:, :out], ctx.index, x.shape[1])
        b = None if module.bias is None else module.bias[:out]
        return apply_act(self.act, F.conv_transpose2d(x, w, b, self.stride), fresh())

    def importance(self, module):
        return _filter_norms(module.weight.transpose(0, 1)), None

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        _permute_(module.weight, in_perms[0])
        _permute_(module.weight, out_perm, 1)
        _permute_(module.bias, out_perm)

    def plain(self, s, src):
        m = nn.ConvTranspose2d(s.cin, s.cout, self.kernel, self.stride, bias=self.bias)
        if src is not None:
            with torch.no_grad():
                m.weight.copy_(_take(src.weight[:, : s.cout], spec_index(s), s.cin))
                if self.bias:
                    m.bias.copy_(src.bias[: s.cout])
            m = m.to(src.weight.device, src.weight.dtype)
        return m

    def run_plain(self, module, xs, s, inplace, training):
        return apply_act(self.act, module(xs[0]), fresh())


# -- resampling, normalization with weights, element-wise combinations (detectors, segmenters) ---------------
@register_op
@dataclass(frozen=True)
class Resize(Op):
    """Nearest or bilinear upsampling by a whole factor per side (``nn.Upsample``, ``F.interpolate``:
    an FPN's top-down path, YOLO's neck, a segmenter's output). ``scale``: one int or (h, w).

    Imported from the sizes the example input gives, so ``size=`` and ``scale_factor=`` read the
    same; no MACs (like pooling), no weights; channel-wise.
    """

    kind: ClassVar[str] = "resize"
    modes: ClassVar[tuple[str, ...]] = ("nearest", "bilinear")
    scale: int | tuple[int, int] = 2
    mode: str = "nearest"
    align_corners: bool = False  # bilinear only

    def __post_init__(self) -> None:
        if self.mode not in self.modes:
            raise ValueError(f"resize mode {self.mode!r}; expected one of {list(self.modes)}")
        object.__setattr__(self, "scale", _compact(self.scale))

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if isinstance(m, nn.Upsample):
            mode, align = m.mode, m.align_corners
        elif node.op == "call_function" and node.target is F.interpolate:
            opt = dict(zip(("size", "scale_factor", "mode", "align_corners"), node.args[1:]), **node.kwargs)
            mode, align = opt.get("mode", "nearest"), opt.get("align_corners")
            if opt.get("antialias"):
                raise site.refuse(node, "resizing with antialias")
        else:
            return None
        x = site.tensor_args(node)[0]
        (ih, iw), (oh, ow) = site.shape(x)[2:], site.shape(node)[2:]
        if mode not in cls.modes or oh % ih or ow % iw:
            raise site.refuse(node, f"resizing {ih}x{iw} to {oh}x{ow} ({mode}; hwslim's: nearest or bilinear "
                                    "upsampling by whole factors)")
        return Claim(cls((oh // ih, ow // iw), mode, bool(align) and mode == "bilinear"), [x])

    def out_hw(self, hw):
        sh, sw = pair(self.scale)
        return (hw[0][0] * sh, hw[0][1] * sw)

    def signature(self, s):
        sh, sw = pair(self.scale)
        extra = [self.mode] + ([f"s={sh}x{sw}"] if sh != sw else []) + (["align_corners"] if self.align_corners else [])
        return ("resize", sh, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, ";".join(extra))

    def onnx(self, s, g, inputs, out):
        sh, sw = pair(self.scale)
        scales = g.floats(f"resize.scales.{sh}x{sw}", [1.0, 1.0, float(sh), float(sw)])
        if self.mode == "nearest":  # PyTorch's nearest: floor(dst / scale)
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        else:
            attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if self.align_corners
                         else "half_pixel")
        g.node("Resize", [inputs[0], "", scales], [out], f"{s.name}::resize", **attrs)

    def run(self, module, xs, ctx):
        return F.interpolate(xs[0], scale_factor=pair(self.scale), mode=self.mode,
                             align_corners=self.align_corners if self.mode == "bilinear" else None)


@register_op
@dataclass(frozen=True)
class PReLU(Op):
    """``max(x, 0) + a[c] * min(x, 0)`` with a learned slope per channel (``shared``: one slope): the
    slopes follow the channels they scale, so they slim with the unit."""

    kind: ClassVar[str] = "prelu"
    shared: bool = False

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if not isinstance(m, nn.PReLU):
            return None
        return Claim(cls(m.num_parameters == 1), site.tensor_args(node)[:1], {"prelu": m})

    def load_weights(self, module, sources):
        _load(module, sources["prelu"], ("weight",))

    def params(self, s):
        return 1 if self.shared else s.cin

    def signature(self, s):
        return ("prelu", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch,
                "shared" if self.shared else "")

    def onnx(self, s, g, inputs, out):
        shape = (1,) if self.shared else _channel_shape(s)[1:]
        g.node("PRelu", [inputs[0], g.weight(f"{s.name}.slope", shape, 0.1)], [out], f"{s.name}::prelu")

    def build(self, node, cin, cout, mid):
        return nn.PReLU(1 if self.shared else cin)

    def _slopes(self, w: torch.Tensor, index: torch.Tensor | None, c: int) -> torch.Tensor:
        return w if self.shared else _take(w, index, c)

    def run(self, module, xs, ctx):
        return F.prelu(xs[0], self._slopes(module.weight, ctx.index, xs[0].shape[1]))

    def plain(self, s, src):
        m = nn.PReLU(1 if self.shared else s.cin)
        if src is not None:
            with torch.no_grad():
                m.weight.copy_(self._slopes(src.weight, spec_index(s), s.cin))
            m = m.to(src.weight.device, src.weight.dtype)
        return m

    def run_plain(self, module, xs, s, inplace, training):
        return module(xs[0])

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        if not self.shared:
            _permute_(module.weight, in_perms[0])


@register_op
@dataclass(frozen=True)
class GroupNorm(Op):
    """``nn.GroupNorm`` in groups of ``group_size`` channels: its unit keeps a multiple of the group
    size (the group count follows the width, as a grouped conv's)."""

    kind: ClassVar[str] = "gn"
    mixes: ClassVar[bool] = True  # a channel's output depends on its group's
    group_size: int = 1
    eps: float = 1e-5

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if not isinstance(m, nn.GroupNorm):
            return None
        if not m.affine:
            raise site.refuse(node, "GroupNorm without affine parameters")
        return Claim(cls(m.num_channels // m.num_groups, m.eps), site.tensor_args(node)[:1], {"gn": m})

    def load_weights(self, module, sources):
        _load(module, sources["gn"])

    @property
    def quantum(self) -> int:  # type: ignore[override]
        return self.group_size

    def groups(self, cin: int) -> int:
        return max(1, cin // self.group_size)

    def params(self, s):
        return 2 * s.cin

    def signature(self, s):
        return ("gn", 0, 1, 0, s.groups, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        n, k = s.name, s.groups
        g.node("Reshape", [inputs[0], g.ints(f"{n}::grouped_shape", [0, k, -1])], [f"{n}::grouped"], f"{n}::group")
        g.node("InstanceNormalization", [f"{n}::grouped", g.floats(f"{n}::ones", [1.0] * k),
                                         g.floats(f"{n}::zeros", [0.0] * k)], [f"{n}::norm"], f"{n}::norm",
               epsilon=self.eps)
        g.node("Reshape", [f"{n}::norm", g.ints(f"{n}::shape", [0, s.cin, s.in_h, s.in_w])], [f"{n}::ungrouped"],
               f"{n}::ungroup")
        g.node("Mul", [f"{n}::ungrouped", g.weight(f"{n}.weight", (1, s.cin, 1, 1), 0.1)], [f"{n}::mul"],
               f"{n}::mul")
        g.node("Add", [f"{n}::mul", g.weight(f"{n}.bias", (1, s.cin, 1, 1), 0.1)], [out], f"{n}::add")

    def build(self, node, cin, cout, mid):
        return nn.GroupNorm(cin // self.group_size, cin, self.eps)

    def run(self, module, xs, ctx):
        x = xs[0]
        c = x.shape[1]
        return F.group_norm(x, c // self.group_size, _take(module.weight, ctx.index, c),
                            _take(module.bias, ctx.index, c), self.eps)

    def plain(self, s, src):
        m = nn.GroupNorm(s.cin // self.group_size, s.cin, self.eps)
        if src is not None:
            with torch.no_grad():
                for name in ("weight", "bias"):
                    getattr(m, name).copy_(_take(getattr(src, name), spec_index(s), s.cin))
            m = m.to(src.weight.device, src.weight.dtype)
        return m

    def run_plain(self, module, xs, s, inplace, training):
        return module(xs[0])

    def importance(self, module):
        return module.weight.detach().float().abs().cpu(), None

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        _check_whole_groups(in_perms[0], self.group_size, node.name, "a GroupNorm")
        for name in ("weight", "bias"):
            _permute_(getattr(module, name), in_perms[0])


@register_op
@dataclass(frozen=True)
class Mul(Op):
    """``a * b`` of two branches, channel by channel: a gate (LRASPP's, an SE built from Linear layers
    or one conv: ``b`` is (N, C, 1, 1)) or an element-wise product. Both inputs' widths are tied."""

    kind: ClassVar[str] = "mul"
    arity: ClassVar[int | None] = 2
    inplace: ClassVar[bool] = True

    @classmethod
    def from_torch(cls, node, site):
        if not _is_binary(node, ("mul", "mul_"), (operator.mul, operator.imul, torch.mul)):
            return None
        xs = site.tensor_args(node)
        if len(xs) != 2 or not all(site.has_shape(x) and x.op != "get_attr" for x in xs):
            return None  # a product with a parameter (a layer scale) is refused by name
        a, b = sorted(xs, key=lambda x: site.shape(x) != site.shape(node))  # the full-size one first
        sa, sb = site.shape(a), site.shape(b)
        if sa != site.shape(node) or len(sa) not in (2, 4) or sb[:2] != sa[:2] or \
                not (sb == sa or (len(sb) == 4 and sb[2:] == (1, 1))):
            raise site.refuse(node, f"a product of tensors shaped {sa} and {sb} (hwslim's: channel by channel, "
                                    "the second the same size or (N, C, 1, 1))")
        return Claim(cls(), [a, b])

    def unit_ties(self, node, layouts):
        return [(layouts[0], layouts[1])]

    def signature(self, s):
        gate = s.in_sizes[1:] == ((1, 1),) and (s.in_h, s.in_w) != (1, 1)
        return ("mul", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, "gate" if gate else "")

    def onnx(self, s, g, inputs, out):
        g.node("Mul", list(inputs), [out], f"{s.name}::mul")

    def run(self, module, xs, ctx):
        return xs[0].mul_(xs[1]) if ctx.inplace else xs[0] * xs[1]


@register_op
@dataclass(frozen=True)
class Scale(Op):
    """``x * mul + add`` with constants: ``x + 0`` (MobileOne), ``0.2 * y`` (a scaled residual), ``x / 2``."""

    kind: ClassVar[str] = "scale"
    inplace: ClassVar[bool] = True
    mul: float = 1.0
    add: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mul", float(self.mul))
        object.__setattr__(self, "add", float(self.add))

    @classmethod
    def from_torch(cls, node, site):
        name = next((k for k, fns in _SCALAR_OPS.items() if _is_binary(node, (k, k + "_"), fns)), None)
        args = list(node.args)
        if name is None or node.kwargs or sum(isinstance(a, torch.fx.Node) for a in args) != 1:
            return None
        x, c = (args[0], args[1]) if isinstance(args[0], torch.fx.Node) else (args[1], args[0])
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not site.has_shape(x):
            return None
        first = x is args[0]
        ops = {"add": cls(1.0, c), "mul": cls(c), "sub": cls(1.0, -c) if first else cls(-1.0, c),
               "truediv": cls(1.0 / c) if first and c else None}  # c / x is not linear
        return Claim(ops[name], [x]) if ops[name] is not None else None

    def signature(self, s):
        return ("scale", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, "")

    def onnx(self, s, g, inputs, out):
        cur = inputs[0]
        if self.mul != 1.0:
            nxt = out if self.add == 0.0 else f"{s.name}::mul"
            g.node("Mul", [cur, g.const(f"{s.name}.mul", self.mul)], [nxt], f"{s.name}::mul")
            cur = nxt
        if self.add != 0.0 or cur == inputs[0]:
            g.node("Add", [cur, g.const(f"{s.name}.add", self.add)], [out], f"{s.name}::add")

    def run(self, module, xs, ctx):
        x = xs[0]
        if ctx.inplace:
            return x.mul_(self.mul).add_(self.add)
        return x * self.mul + self.add if self.mul != 1.0 else x + self.add


@register_op
@dataclass(frozen=True)
class Unflatten(Op):
    """(N, C) -> (N, C, 1, 1): ``y.view(N, C, 1, 1)`` before a gate multiplies a map (an SE built from
    Linear layers). Free; channel-wise."""

    kind: ClassVar[str] = "unflatten"

    @classmethod
    def from_torch(cls, node, site):
        if not _is_binary(node, ("view", "reshape", "unflatten"), (torch.reshape,), any_args=True) or \
                not site.has_shape(node):
            return None
        x = site.tensor_args(node)[0]
        xs, ys = site.shape(x), site.shape(node)
        return Claim(cls(), [x]) if len(xs) == 2 and ys == (*xs, 1, 1) else None

    def out_hw(self, hw):
        return (1, 1)

    def signature(self, s):
        return None

    def onnx(self, s, g, inputs, out):
        g.node("Reshape", [inputs[0], g.ints("unflatten.shape", [0, -1, 1, 1])], [out], f"{s.name}::reshape")

    def run(self, module, xs, ctx):
        x = xs[0]
        return x.reshape(*x.shape, 1, 1)


@register_op
@dataclass(frozen=True)
class ChannelPart(Op):
    """Part ``part`` of a tensor made of parts (a conv's output in equal parts, a concatenation): one
    piece of an equal ``chunk``/``split`` along the channels, slimmable. Its output is that part's
    kept channels; a view (ONNX Runtime copies it)."""

    kind: ClassVar[str] = "part"
    view: ClassVar[bool] = True
    part: int = 0

    def check_inputs(self, name, layouts):
        super().check_inputs(name, layouts)
        if not 0 <= self.part < len(layouts[0]):
            raise ValueError(f"{name}: part {self.part} of a tensor of {len(layouts[0])} part(s)")

    def out_layout(self, node, layouts):
        return (layouts[0][self.part],)

    def _range(self, widths: Sequence[int]) -> tuple[int, int]:
        return sum(widths[: self.part]), widths[self.part]

    def signature(self, s):
        return ("part", 0, 1, 0, 1, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch, f"part={self.part}")

    def onnx(self, s, g, inputs, out):
        start, width = self._range([w for _, w in s.in_parts])
        g.node("Slice", [inputs[0], g.ints(f"{s.name}::start", [start]), g.ints(f"{s.name}::stop", [start + width]),
                         g.ints("slice.axis1", [1])], [out], f"{s.name}::slice")

    def run(self, module, xs, ctx):
        start, width = self._range(ctx.parts) if ctx.parts is not None else (0, xs[0].shape[1])
        return xs[0].narrow(1, start, width)

    def run_plain(self, module, xs, s, inplace, training):
        start, width = self._range([w for _, w in s.in_parts])
        return xs[0].narrow(1, start, width)


ULTRALYTICS_ATTENTION = "ultralytics.nn.modules.block.Attention"  # YOLO11's C2PSA attention (by name: no import)


def _conv_bn(cin: int, cout: int, kernel: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class PlainAttention(nn.Module):
    """YOLO11's attention (Ultralytics ``Attention`` in ``C2PSA``) at its one width: a 1x1 ``qkv``
    conv, multi-head softmax attention over the pixels, a depthwise 3x3 ``pe`` of the values added,
    a 1x1 ``proj``; each conv with its BatchNorm (one conv with a bias once folded)."""

    def __init__(self, c: int, num_heads: int, key_dim: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.head_dim = num_heads, key_dim, c // num_heads
        self.qkv = _conv_bn(c, c + 2 * num_heads * key_dim, 1)
        self.pe = _conv_bn(c, c, 3, c)
        self.proj = _conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # Ultralytics' own order of operations: equal results
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.key_dim ** -0.5).transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w)))


@register_op
@dataclass(frozen=True)
class Attention(_Pinned):
    """Multi-head self-attention over the pixels, as YOLO11's ``C2PSA`` computes it (:class:`PlainAttention`).

    A fixed-width layer: its heads split the channels, so what it reads and writes keeps its
    width (:attr:`Op.pins`); a known one (:attr:`Op.fixed_width`): the importer fixes and lists
    those units by itself, no ``fix_unsupported`` needed.
    Costs: its three convs (BatchNorm parameters counted) and the two matrix products.
    """

    kind: ClassVar[str] = "attention"
    mixes: ClassVar[bool] = True
    fixed_width: ClassVar[bool] = True
    torch_module_names: ClassVar[tuple[str, ...]] = (ULTRALYTICS_ATTENTION,)
    num_heads: int = 1
    key_dim: int = 8

    @classmethod
    def from_torch(cls, node, site):
        m = site.module(node)
        if m is None or _qualname(type(m)) != ULTRALYTICS_ATTENTION:
            return None
        convs = [getattr(m, k, None) for k in ("qkv", "pe", "proj")]
        if getattr(m, "format", None) is not None or not all(
                isinstance(getattr(c, "conv", None), nn.Conv2d) and is_batch_norm(getattr(c, "bn", None)) and
                isinstance(getattr(c, "act", None), nn.Identity) for c in convs):
            raise site.refuse(node, f"{type(m).__name__} (an attention whose convs are not conv + BatchNorm)")
        sources = {f"{k}.{part}": getattr(c, part) for k, c in zip(("qkv", "pe", "proj"), convs)
                   for part in ("conv", "bn")}
        return Claim(cls(m.num_heads, m.key_dim), site.tensor_args(node)[:1], sources)

    def check_inputs(self, name, layouts):
        super().check_inputs(name, layouts)
        if self.num_heads < 1 or self.key_dim < 1 or sum(layouts[0]) % self.num_heads:
            raise ValueError(f"{name}: attention over {sum(layouts[0])} channels in {self.num_heads} heads")

    def _qkv(self, c: int) -> int:
        return c + 2 * self.num_heads * self.key_dim

    def macs(self, s):
        n = s.in_h * s.in_w
        convs = n * s.cin * (self._qkv(s.cin) + 9 + s.cin)
        return s.batch * (convs + self.num_heads * n * n * self.key_dim + s.cin * n * n)

    def params(self, s):
        c, h = s.cin, self._qkv(s.cin)
        return c * h + 2 * h + 9 * c + 2 * c + c * c + 2 * c

    def signature(self, s):
        return ("attention", 1, 1, 0, self.num_heads, s.in_h, s.in_w, s.cin, s.cout, "none", False, s.batch,
                f"key={self.key_dim}")

    def onnx(self, s, g, inputs, out):
        n, c, nh, kd, hw = s.name, s.cin, self.num_heads, self.key_dim, s.in_h * s.in_w
        hd, qkv = c // nh, self._qkv(s.cin)

        def conv(name: str, x: str, cout: int, k: int, groups: int, y: str) -> None:
            w = g.weight(f"{n}.{name}.weight", (cout, c // groups, k, k), 1 / math.sqrt(c // groups * k * k))
            g.node("Conv", [x, w, g.weight(f"{n}.{name}.bias", (cout,), 0.1)], [y], f"{n}::{name}", group=groups,
                   kernel_shape=[k, k], pads=[k // 2] * 4)
        conv("qkv", inputs[0], qkv, 1, 1, f"{n}::qkv")
        g.node("Reshape", [f"{n}::qkv", g.ints(f"{n}::heads", [0, nh, 2 * kd + hd, hw])], [f"{n}::h"], f"{n}::heads")
        g.node("Split", [f"{n}::h", g.ints(f"{n}::sizes", [kd, kd, hd])], [f"{n}::q", f"{n}::k", f"{n}::v"],
               f"{n}::split", axis=2)
        g.node("Mul", [f"{n}::q", g.const(f"{n}::scale", kd ** -0.5)], [f"{n}::qs"], f"{n}::scale")
        g.node("Transpose", [f"{n}::qs"], [f"{n}::qt"], f"{n}::qt", perm=[0, 1, 3, 2])
        g.node("MatMul", [f"{n}::qt", f"{n}::k"], [f"{n}::logits"], f"{n}::qk")
        g.node("Softmax", [f"{n}::logits"], [f"{n}::attn"], f"{n}::softmax", axis=-1)
        g.node("Transpose", [f"{n}::attn"], [f"{n}::attn_t"], f"{n}::attn_t", perm=[0, 1, 3, 2])
        g.node("MatMul", [f"{n}::v", f"{n}::attn_t"], [f"{n}::av"], f"{n}::av")
        image = g.ints(f"{n}::image", [0, c, s.in_h, s.in_w])
        g.node("Reshape", [f"{n}::av", image], [f"{n}::y"], f"{n}::y")
        g.node("Reshape", [f"{n}::v", image], [f"{n}::vi"], f"{n}::vi")
        conv("pe", f"{n}::vi", c, 3, c, f"{n}::pe")
        g.node("Add", [f"{n}::y", f"{n}::pe"], [f"{n}::sum"], f"{n}::add")
        conv("proj", f"{n}::sum", c, 1, 1, out)

    def build(self, node, cin, cout, mid):
        return PlainAttention(cin, self.num_heads, self.key_dim)

    def run(self, module, xs, ctx):
        return module(xs[0])

    def plain(self, s, src):
        import copy

        return copy.deepcopy(src) if src is not None else PlainAttention(s.cin, self.num_heads, self.key_dim)

    def folded(self, s, module):
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        import copy

        m = copy.deepcopy(module)
        for k in ("qkv", "pe", "proj"):
            seq = getattr(m, k)
            if len(seq) == 2:
                setattr(m, k, nn.Sequential(fuse_conv_bn_eval(seq[0].eval(), seq[1].eval())))
        return self, m

    def load_weights(self, module, sources):
        for k in ("qkv", "pe", "proj"):
            _load(getattr(module, k)[0], sources[f"{k}.conv"])
            _load_bn(getattr(module, k)[1], sources[f"{k}.bn"])

    def permute(self, module, node, in_perms, out_perm, mid_perm=None):
        if any(p is not None for p in (*in_perms, out_perm)):  # fixed channels are never reordered
            raise NotImplementedError(f"{node.name}: an attention's channels keep their order")


_SCALAR_OPS = {"add": (operator.add, operator.iadd, torch.add), "mul": (operator.mul, operator.imul, torch.mul),
               "sub": (operator.sub, operator.isub, torch.sub), "truediv": (operator.truediv, torch.div)}


def _is_binary(node: Any, methods: tuple[str, ...], functions: tuple, any_args: bool = False) -> bool:
    """``node`` calls one of ``functions`` or tensor ``methods`` (with two arguments unless ``any_args``)."""
    called = (node.op == "call_method" and node.target in methods) or \
        (node.op == "call_function" and node.target in functions)
    return called and (any_args or len(node.args) == 2)


def _check_whole_groups(p: torch.Tensor | None, g: int, name: str, what: str) -> None:
    """Refuse a permutation that moves channels other than in whole groups of ``g``."""
    blocks = None if p is None else p.view(-1, g)
    if g > 1 and blocks is not None and not torch.equal(blocks, blocks[:, :1] + torch.arange(g, device=p.device)):
        raise ValueError(f"{name}: {what}'s channels can move only in whole groups of {g}")


__all__ = ["ACTIVATIONS", "OPS", "Act", "Add", "Attention", "AvgPool", "BatchNorm", "ChannelPart", "ChannelShuffle",
           "ChannelSlice", "Claim", "Concat", "Conv", "ConvTranspose", "Dropout", "Flatten", "GlobalAvgPool",
           "GroupNorm", "Linear", "MaxPool", "Mul", "Op", "PReLU", "PlainAttention", "Resize", "Scale", "Slice",
           "SqueezeExcite", "Unflatten", "apply_act", "op_from_dict", "register_op", "spec_index"]
