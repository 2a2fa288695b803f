""":func:`load_model`: a ``--model`` spec to a supernet.

A model is data (a graph, see
:mod:`hwslim.core.graph`); a spec names where that data comes from:

* a zoo name (``hwslim models`` lists them): the zoo's builder writes the graph;
* a graph JSON file (``hwslim models --graph NAME > my.json`` writes one; edit or
  generate your own);
* a checkpoint written by ``hwslim train``: its graph (the weights are not loaded);
* ``torchvision:NAME`` (any torchvision classification model), ``timm:NAME`` (with the
  ``timm`` extra) or ``package.module:callable`` (a function returning an ``nn.Module``;
  a file in the current directory works): the module is imported
  (:func:`hwslim.importing.fx_trace.import_model`) with its weights.
"""
from __future__ import annotations

import contextlib
import functools
import io
import sys
from dataclasses import replace
from pathlib import Path

from hwslim.core import jsonio
from hwslim.models import create_model


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".json", ".pt", ".pth")) or "/" in spec or Path(spec).is_file()


def import_user_module(source: str):
    """The module ``source`` of a ``module:callable`` spec.

    Found on ``sys.path`` as it stands, or else in the current directory (a model file
    beside the user): the cwd is added only for that import, after everything installed
    (so an ``onnxruntime.py`` lying there never shadows the real package), and
    ``sys.path`` is restored afterwards. A module that calls ``sys.exit`` while being
    imported is refused (ImportError), never a silent exit.
    """
    import importlib
    import importlib.util
    import os
    import sys

    try:
        found = importlib.util.find_spec(source) is not None
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        found = False
    saved = list(sys.path)
    if not found:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(source)
    except SystemExit as e:
        raise ImportError(f"importing it called sys.exit({e.code!r})") from None
    finally:
        sys.path[:] = saved


def _prints_to_stderr(fn):
    """A model builder's prints (Ultralytics' summary line) go to stderr: stdout is the CLI's (``--json``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args, **kwargs)
    return wrapper


@_prints_to_stderr
def module_from_spec(spec: str, init: str | None = None):
    """The ``nn.Module`` a ``torchvision:NAME``, ``timm:NAME`` or ``module:callable`` spec names.

    ``init``: a state-dict file to load into it, or (torchvision, timm) a weights name
    (``IMAGENET1K_V1``, ``DEFAULT``; those download).
    """
    from torch import nn

    from hwslim.core.errors import ModelError

    source, _, name = spec.partition(":")
    if init is not None and Path(init).is_dir():
        raise ModelError(f"--init {init} is a directory; give a state-dict file")
    weights_name = init if init is not None and not Path(init).is_file() else None
    if init is not None and weights_name is not None and source not in ("torchvision", "timm"):
        raise ModelError(f"--init {init}: no such file (a weights name works only for torchvision: and timm: models)")
    try:
        if source == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                from hwslim.core.report import did_you_mean

                raise ModelError(f"torchvision has no model {name!r};"
                                 f"{did_you_mean(name, torchvision.models.list_models())} "
                                 "see torchvision.models.list_models()")
            weights = _torchvision_weights(name, weights_name) if weights_name is not None else None
            module = torchvision.models.get_model(name, weights=weights)
        elif source == "timm":
            try:
                import timm
            except ImportError:
                raise ModelError("timm: models need timm: pip install 'hwslim[timm]'") from None
            if name not in timm.list_models():
                raise ModelError(f"timm has no model {name!r}; see timm.list_models()")
            module = timm.create_model(name, pretrained=weights_name is not None)
        else:
            if "" in (source, name):
                raise ModelError(f"model {spec!r}: expected package.module:function")
            try:
                mod = import_user_module(source)
            except Exception as e:
                raise ModelError(f"model {spec!r}: cannot import {source!r} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
            fn = getattr(mod, name, None)
            if not callable(fn):
                raise ModelError(f"model {spec!r}: {source} has no callable {name!r}")
            try:
                module = fn()
            except Exception as e:
                raise ModelError(f"model {spec!r}: calling {name}() failed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
            except SystemExit as e:  # never a silent exit 0 with nothing done
                raise ModelError(f"model {spec!r}: calling {name}() called sys.exit({e.code!r}); a model builder "
                                 "must return an nn.Module") from None
    except ModelError:
        raise
    except Exception as e:  # a weights download without network, a broken model builder
        raise ModelError(f"model {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                         ) from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model {spec!r}: {name}() returned {type(module).__name__}, not an nn.Module")
    if init is not None and weights_name is None:
        load_init(module, init, spec)
    return module


def load_init(module, init: str, spec: str) -> None:
    """Load the state-dict file ``init`` into ``module``, or ModelError (one line) naming what is wrong:
    the first keys missing or unexpected and the first shapes that differ, weights that are not finite."""
    import warnings

    import torch

    from hwslim.core.errors import ModelError

    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(init, map_location="cpu", weights_only=True)
    except Exception:
        raise ModelError(f"--init {init}: not a readable PyTorch state-dict file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--init {init}: not a state dict (a mapping of parameter names to tensors)")
    own = module.state_dict()
    problems = [f"{what} {_first(keys)}" for what, keys in (
        ("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
        ("shapes differ (file vs model):", [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                                            for k, v in own.items() if k in state and state[k].shape != v.shape]))
        if keys]
    if problems:
        raise ModelError(f"--init {init} does not fit {spec}: {'; '.join(problems)}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ModelError(f"--init {init}: {bad} holds NaN or infinite values; nothing can be trained from it")
    module.load_state_dict(state)


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _torchvision_weights(name: str, weights_name: str):
    """torchvision's weights ``weights_name`` (``IMAGENET1K_V1``, ``ResNet18_Weights.IMAGENET1K_V1``, ``DEFAULT``)
    of model ``name``, checked to be loadable here: in torch.hub's cache, or downloadable now.

    torchvision loads them with ``torch.hub.load_state_dict_from_url``, which reads
    ``$TORCH_HOME/hub/checkpoints/<file name of the URL>`` when that file exists and downloads it
    otherwise; a machine without network works once the file is there.
    """
    import os
    from urllib.parse import urlparse

    import torch
    import torchvision

    from hwslim.core.errors import ModelError

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ModelError(f"--init {weights_name}: no such file, and torchvision's {name} has no named "
                         "weights") from None
    try:
        weights = enum.verify(weights_name)
    except (KeyError, ValueError, TypeError):
        raise ModelError(f"--init {weights_name}: no such file, and not a weights name of torchvision's {name} (it has "
                         f"{', '.join(w.name for w in enum)}, DEFAULT)") from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.isfile(cached):
        said = io.StringIO()  # torch.hub's "Downloading: ..." line: shown once the download worked
        try:
            with contextlib.redirect_stdout(said):
                weights.get_state_dict(progress=False, check_hash=True)  # downloads into the cache
            print(said.getvalue(), end="", file=sys.stderr)
        except Exception as e:
            raise ModelError(f"--init {weights_name}: {type(weights).__name__}.{weights.name} is not in torch.hub's "
                             f"cache and downloading it failed ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
                             f"download {weights.url} where there is network and put it at {cached}, or pass a "
                             "state-dict file") from None
    return weights


def is_module_spec(spec: str) -> bool:
    """Whether ``spec`` names a module to import (``torchvision:``, ``timm:`` or ``module:callable``)."""
    return ":" in spec and not _is_file_spec(spec)


# an imported module is traced by running it on an example input; above this many bytes of input its size is
# checked against the machine's memory first (on a 224 px trace), so a huge --input-size is refused, not allocated
PROBE_ABOVE_BYTES = 64 << 20


def load_model(spec: str, *, width_mult: float | None = None, input_size: int | None = None,
               num_classes: int | None = None, divisor: int | None = None, init: str | None = None,
               keep: str | None = None, fix_unsupported: bool = False, outputs: str = "full"):
    """The supernet a ``--model`` spec names (see the module docstring), on the current device.

    For a zoo name the keyword arguments are the builder's (``None``: its default). A
    graph file or checkpoint fixes the architecture: ``input_size`` and ``divisor`` may
    be changed, ``width_mult``/``num_classes`` must match it if given. ``keep`` and
    ``fix_unsupported`` and ``outputs`` ("raw": a detector's raw head maps) apply to an imported
    module (:func:`hwslim.importing.fx_trace.import_model`); a graph file or checkpoint already
    records them.
    """
    from hwslim.core.errors import ModelError
    from hwslim.core.graph import GraphFormatError, graph_from_dict
    from hwslim.core.supernet import SlimmableNet

    if not is_module_spec(spec) and (keep is not None or fix_unsupported or outputs != "full"):  # refused, not ignored
        flag = "--keep" if keep is not None else "--fix-unsupported" if fix_unsupported else f"--outputs {outputs}"
        raise ModelError(f"{flag} applies to a model imported from PyTorch (--model torchvision:NAME, "
                         f"timm:NAME or package.module:callable), not {spec!r}")
    if is_module_spec(spec):
        import torch

        from hwslim.importing.fx_trace import import_model

        if width_mult is not None and abs(float(width_mult) - 1.0) > 1e-9:
            raise ModelError(f"{spec}: an imported model is its own full width; --width-mult cannot change it")
        with torch.device("cpu"):  # the module's own weights, even when shapes are asked on "meta"
            module = module_from_spec(spec, init)
            size = input_size or 224
            name = spec.replace(":", "_").replace(".", "_")
            if 3 * size * size * 4 > PROBE_ABOVE_BYTES:  # tracing runs the forward: check the memory it needs first
                from hwslim.core.resources import check_inference

                probe = import_model(module, torch.randn(1, 3, 224, 224), name=name, keep=keep,
                                     divisor=divisor or 8, fix_unsupported=fix_unsupported,
                               outputs=outputs)
                check_inference(probe, input_size=size, what=f"importing {spec} at {size}x{size} px")
            net = import_model(module, torch.randn(1, 3, size, size), name=name,
                               keep=keep, divisor=divisor or 8, fix_unsupported=fix_unsupported,
                               outputs=outputs)
        if num_classes is not None and int(num_classes) != net.num_classes:
            raise ModelError(f"{spec} has {net.num_classes} classes, not {num_classes}")
        return net
    if not _is_file_spec(spec):
        return create_model(spec, width_mult=width_mult, input_size=input_size, num_classes=num_classes,
                            divisor=divisor)
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model {spec!r}: no such file (give a zoo name from `hwslim models`, a graph JSON file "
                         "or a checkpoint)")
    if path.suffix == ".json":
        try:
            data = jsonio.load(path)
        except (OSError, ValueError) as e:  # ValueError: malformed, not UTF-8 or too deep
            raise ModelError(f"{path}: not a readable graph JSON file ({type(e).__name__})") from None
    else:
        from hwslim.importing.checkpoint import read_graph

        data = read_graph(path)
    try:
        graph = graph_from_dict(data)
    except GraphFormatError as e:
        raise ModelError(f"{path}: {e}") from None
    if width_mult is not None and abs(float(width_mult) - graph.width_mult) > 1e-9:
        raise ModelError(f"{path} describes a x{graph.width_mult:g} supernet; --width-mult {width_mult:g} cannot "
                         "change a graph file (build another one)")
    if num_classes is not None and int(num_classes) != graph.num_classes:
        raise ModelError(f"{path} has {graph.num_classes} classes, not {num_classes}")
    if input_size is not None:
        graph = replace(graph, input_size=int(input_size))
    if divisor is not None:
        graph = replace(graph, divisor=int(divisor))
    try:
        return SlimmableNet(graph)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: the graph does not build ({e})") from None
