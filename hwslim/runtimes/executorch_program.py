"""Lower a PyTorch network to an ExecuTorch program (``.pte``, XNNPACK delegate), and run one.

ExecuTorch runs programs lowered from ``torch.export``, not ONNX: :func:`lower` exports
the materialized network (BatchNorm folded) with a fixed input shape, lowers every
operator XNNPACK supports to the XNNPACK delegate (``XnnpackPartitioner``; the rest runs
on ExecuTorch's portable kernels) and returns the serialized program. :func:`load` runs
one through ``executorch.runtime``. ``hwslim export --format executorch --out model.pte``
writes the checked ONNX file as for ``--format onnx`` (kept beside it as ``model.onnx``,
with the provenance), then the ``.pte`` lowered from the same network, checked against
PyTorch, and ``model.pte.json`` naming the ONNX source, so ``hwslim verify model.pte``
finds the config.

ExecuTorch is built against particular PyTorch releases; it was checked here with
executorch 1.5.1 beside torch 2.14.1 (installing it changed no other package's version).
Without the ``executorch`` package, :func:`require` refuses with one line naming the extra.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from hwslim.core.errors import HwslimError

INSTALL_HINT = "ExecuTorch is not installed: pip install 'hwslim[executorch]'"
PARTITIONER = "XnnpackPartitioner"


class ExecuTorchError(HwslimError):
    """ExecuTorch missing, or failing to lower or run a model."""


def require():
    """The ``executorch.runtime`` module, or ExecuTorchError naming the extra to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import executorch.runtime as runtime
    except ImportError:
        raise ExecuTorchError(INSTALL_HINT) from None
    return runtime


def version() -> str:
    """``"ExecuTorch 1.5.1 (XNNPACK)"``: what lowered and checked the program."""
    require()
    return f"ExecuTorch {importlib.metadata.version('executorch')} (XNNPACK)"


def pte_paths(out: Path) -> tuple[Path, Path]:
    """For a program ``model.pte``: its ONNX source and provenance JSON."""
    return out.with_suffix(".onnx"), out.with_name(out.name + ".json")


@torch.no_grad()
def lower(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> bytes:
    """The ``.pte`` bytes of ``module`` at the shapes of ``example``, XNNPACK-delegated."""
    return _lower(module, example, trace=False)[0]


@torch.no_grad()
def lower_traced(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> tuple[bytes, list[list[XnnNode]]]:
    """:func:`lower`, plus each XNNPACK delegate's nodes in the order its runtime creates
    operators from them: per delegate, ``XnnNode(kind, owner)`` with ``kind`` the node's
    schema type without its ``XNN`` prefix (``"Conv2d"``, ``"StaticTranspose"``) and
    ``owner`` the dotted path of the ``module`` submodule the exported graph node came from
    (``"entries.3.module"``), or None for nodes the delegate inserted (layout transposes).

    The nodes are read as the delegate serializes them (its ``serialize_xnnpack_binary``
    is wrapped while lowering); a node's debug handle leads back to its graph node and
    that node's ``nn_module_stack``."""
    return _lower(module, example, trace=True)


class XnnNode(NamedTuple):
    kind: str
    owner: str | None


def _lower(module: torch.nn.Module, example: Sequence[torch.Tensor], trace: bool):
    require()
    import logging

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = module.eval()
    quiet = [logging.getLogger(n) for n in ("executorch", "torch._export", "torch.export")]
    levels = [lg.level for lg in quiet]
    graphs: list = []
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), (_xnnpack_graphs(graphs) if trace else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, tuple(example))
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            buffer = edge.to_executorch().buffer
    except ExecuTorchError:
        raise
    except Exception as e:  # export and lowering errors have no common base
        raise ExecuTorchError(f"ExecuTorch could not lower the network: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if not trace:
        return buffer, []
    owners: dict[int, str | None] = {}
    gm = edge.exported_program().graph_module
    for name, child in gm.named_children():
        if name.startswith("lowered_module") and hasattr(child, "original_module"):
            for node in child.original_module.graph.nodes:
                if "debug_handle" in node.meta:
                    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
                    owners[node.meta["debug_handle"]] = stack[-1] if stack else None
    delegates = [[XnnNode(type(x.xnode_union).__name__.removeprefix("XNN"), owners.get(x.debug_handle))
                  for x in g.xnodes] for g in graphs]
    return buffer, delegates


@contextlib.contextmanager
def _xnnpack_graphs(graphs: list):
    """Collect every XNNGraph the XNNPACK delegate serializes while the block runs."""
    from executorch.backends.xnnpack import xnnpack_preprocess as xp

    serialize = xp.serialize_xnnpack_binary

    def keep(graph, *args, **kwargs):
        graphs.append(graph)
        return serialize(graph, *args, **kwargs)

    xp.serialize_xnnpack_binary = keep
    try:
        yield graphs
    finally:
        xp.serialize_xnnpack_binary = serialize


def set_threads(threads: int) -> None:
    """Size ExecuTorch's (process-wide) thread pool, which XNNPACK computes on."""
    require()
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(int(threads))


def load(program: bytes | str | os.PathLike):
    """The ``forward`` method of a program (its bytes or a ``.pte`` path), ready to ``execute``."""
    runtime = require()
    rt = runtime.Runtime.get()
    try:
        prog = rt.load_program(Path(program) if isinstance(program, (str, os.PathLike)) else program)
        return prog.load_method("forward")
    except Exception as e:
        raise ExecuTorchError(f"ExecuTorch could not load the program: {str(e).splitlines()[0][:200]}") from None


def run_program(program, images: torch.Tensor, batch: int) -> torch.Tensor:
    """The program's outputs on ``images``, in batches of ``batch`` (its fixed input shape)."""
    method = load(program)
    return torch.cat([method.execute([images[i:i + batch].contiguous()])[0]
                      for i in range(0, len(images), batch)])


__all__ = ["INSTALL_HINT", "ExecuTorchError", "XnnNode", "load", "lower", "lower_traced", "pte_paths", "require", "run_program", "set_threads",
           "version"]
