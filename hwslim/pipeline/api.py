"""The Python API: one call per step, each returning what a PyTorch user works with.

``hwslim`` exposes these as lazy attributes (``hwslim.load``, ...), so ``import hwslim``
stays cheap. Each is a thin front on the library's own functions, the ones the CLI calls::

    >>> net = hwslim.load("runs/r20/checkpoint.pt")                       # doctest: +SKIP
    >>> small = net.module("search/config_latency_ms_0.5.json")           # a plain nn.Module, BN folded
    >>> configs = hwslim.search_configs("runs/r20/checkpoint.pt", params_m=0.1)   # [ChannelConfig]
    >>> hwslim.export_model("runs/r20/checkpoint.pt", configs[0], "r20.onnx")   # ExportResult

Your own training loop, any task (README "Your own training loop", docs/training.md)::

    >>> supernet = hwslim.import_model(MySegmenter(), torch.randn(1, 3, 256, 256))   # doctest: +SKIP
    >>> r = hwslim.sandwich_step(supernet, batch, my_loss, optimizer)     # in your loop
    >>> configs = hwslim.search_configs(supernet, params_m=1.0, score_fn=my_miou, calib=loader)
    >>> hwslim.export_model(supernet, configs[0], "seg.onnx", calib=loader)

Not ``hwslim.search`` / ``hwslim.export``: those are the stages' subpackages, and importing a
subpackage sets the package attribute of its name, so a function there would be replaced.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from hwslim.core.accuracy import batches, preserved_bn_stats
from hwslim.core.config import ChannelConfig
from hwslim.core.costs import Costs, model_costs
from hwslim.core.materialize import materialize
from hwslim.core import slimmable
from hwslim.core.supernet import SlimmableNet
from hwslim.importing.checkpoint import Checkpoint, finetuned_config, load_checkpoint
from hwslim.pipeline.heldout import EXPORT_CALIB_BATCH
from hwslim.training.sandwich import sandwich_step  # noqa: F401  (the API's training step)

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Loaded:
    """A checkpoint from ``hwslim train`` or ``hwslim finetune``, loaded (:func:`load`)."""

    checkpoint: Checkpoint

    @property
    def supernet(self) -> SlimmableNet:
        """The slimmable supernet: ``with net.using(config): net(x)`` runs it at a config."""
        return self.checkpoint.model

    def config(self, config: ChannelConfig | PathLike | None = None) -> ChannelConfig:
        """``config`` (a ChannelConfig or its JSON file) checked against the supernet; None: a finetuned
        checkpoint's own config, else the full width."""
        if config is None:
            config = finetuned_config(self.checkpoint) or self.supernet.full_config()
        elif not isinstance(config, ChannelConfig):
            config = ChannelConfig.load(config)
        return self.checkpoint.check_config(config)

    def configs(self) -> list[ChannelConfig]:
        """The 12 uniform-width configs, narrowest first: every unit at i/12 of its width."""
        return self.supernet.uniform_configs()

    def module(self, config: ChannelConfig | PathLike | None = None, fold_bn: bool = True,
               calib_images: int = 512) -> nn.Module:
        """A plain PyTorch network of ordinary layers holding only ``config``'s channels
        (:meth:`config`), in eval mode. Its BatchNorm statistics are recalibrated at the config on
        ``calib_images`` images of the checkpoint's search split, as ``hwslim export`` does, so it
        computes what the exported model computes (the supernet's shared statistics suit its
        widest config only); 0, or a checkpoint without data: the supernet's statistics, and it
        computes what the supernet computes at that config. The supernet is left as it was."""
        from hwslim.export.exporter import checkpoint_images

        cfg, net = self.config(config), self.supernet
        calib = checkpoint_images(self.checkpoint, "search", calib_images)[0] if calib_images else None
        if calib is not None:
            net = copy.deepcopy(net)
            with net.using(cfg):
                slimmable.recalibrate_bn(net, batches(calib, EXPORT_CALIB_BATCH))
        return materialize(net.eval(), cfg, fold_bn=fold_bn).eval()

    def costs(self, config: ChannelConfig | PathLike | None = None) -> Costs:
        """MACs, parameters (BatchNorm counted) and peak activation bytes at ``config``."""
        return model_costs(self.supernet, self.config(config))


def _checkpoint(checkpoint: PathLike | Checkpoint | SlimmableNet) -> Checkpoint:
    """A checkpoint file, a loaded one, or a supernet in memory (your own training loop's)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, SlimmableNet):
        return Checkpoint(checkpoint)
    return load_checkpoint(checkpoint)


def save(supernet: SlimmableNet, path: PathLike, *, epoch: int = 0, train_args: dict[str, Any] | None = None) -> Path:
    """Save a supernet you trained (:func:`sandwich_step`) as an hwslim checkpoint, atomically: ``hwslim
    cost``, ``export`` and :func:`load` take it; it records no training data, so ``hwslim search`` needs
    your ``score_fn`` (:func:`search_configs`)."""
    from hwslim.importing.checkpoint import save_checkpoint

    return save_checkpoint(path, supernet, epoch=epoch, train_args=train_args)


def recalibrate_bn(supernet: SlimmableNet, batches: Iterable[Any], config: ChannelConfig | None = None, *,
                   inputs: Callable[[Any], Any] | None = None, num_batches: int | None = None) -> int:
    """Set the supernet's BatchNorm running statistics to ``config``'s own (default: its current config),
    estimated on ``batches`` (any iterable: your DataLoader; ``inputs(batch)`` gives the network's input,
    default ``batch[0]`` of a tuple or list), at most ``num_batches`` of them. A config the supernet
    never ran exactly has no valid statistics of its own: do this before evaluating or using it.
    Returns the number of batches used. See :func:`hwslim.core.slimmable.recalibrate_bn`."""
    with supernet.using(config if config is not None else supernet.config):
        return slimmable.recalibrate_bn(supernet, batches, num_batches, inputs)


def load(checkpoint: PathLike) -> Loaded:
    """Load a checkpoint written by ``hwslim train`` or ``hwslim finetune``."""
    return Loaded(load_checkpoint(checkpoint))


def import_model(module: nn.Module, example_input, **options: Any) -> SlimmableNet:
    """The slimmable supernet of your own ``module`` with its weights (torch.fx or torch.export;
    options: ``keep``, ``name``, ``divisor``, ``fix_unsupported``); at full width it computes
    what ``module`` computes. See :func:`hwslim.importing.fx_trace.import_model`."""
    from hwslim.importing.fx_trace import import_model as _import

    return _import(module, example_input, **options)


def search_configs(checkpoint: PathLike | Checkpoint | SlimmableNet, *, latency_ms: Sequence[float] = (),
                   memory_mb: Sequence[float] = (), params_m: Sequence[float] = (), macs_m: Sequence[float] = (),
                   table: PathLike | None = None, out: PathLike | None = None,
                   score_fn: Callable[[nn.Module], float] | None = None, calib: Iterable[Any] | None = None,
                   inputs: Callable[[Any], Any] | None = None, calib_batches: int | None = None,
                   **options: Any) -> list[ChannelConfig]:
    """``hwslim search`` from Python: one config per value of the budget kind given several values
    (each value a number or a list), the other kinds constraints. ``table``: the latency table for
    ``latency_ms``; ``out``: where to write the configs and plots (None: nothing is written);
    ``options``: further :class:`hwslim.search.greedy.SearchOptions` fields.

    ``score_fn(model) -> float`` (higher is better: mAP, mIoU, a negative loss) scores each
    candidate instead of top-1 on the checkpoint's search split; the model it gets is the
    supernet at the candidate's config in eval mode, its BatchNorm recalibrated first on
    ``calib`` (a re-iterable of batches, your DataLoader; ``inputs``, ``calib_batches`` as
    :func:`recalibrate_bn`). ``checkpoint`` may then be the supernet itself."""
    from hwslim.latency.table import LatencyTable
    from hwslim.search.evaluator import ScoreFnScoring
    from hwslim.search.greedy import Budget, SearchOptions, greedy_search

    ckpt = _checkpoint(checkpoint)
    kinds = {"latency_ms": latency_ms, "memory_mb": memory_mb, "params_m": params_m, "macs_m": macs_m}
    budgets = [Budget(kind, float(v)) for kind, values in kinds.items()
               for v in (values if isinstance(values, (list, tuple)) else [values])]
    if score_fn is not None:
        options["scoring"] = ScoreFnScoring(score_fn, calib, inputs, calib_batches)
    opts = SearchOptions(out_dir=out, plot=out is not None, **{"progress": False, **options})
    tbl = LatencyTable.load(table) if table is not None else None
    return greedy_search(ckpt, budgets, opts, table=tbl).configs


def export_model(checkpoint: PathLike | Checkpoint | SlimmableNet, config: ChannelConfig | PathLike, out: PathLike,
                 *, calib: Iterable[Any] | None = None, inputs: Callable[[Any], Any] | None = None,
                 calib_batches: int | None = None, **options: Any):
    """``hwslim export`` from Python: the plain network at ``config`` written to ``out`` and checked
    against PyTorch (``options``: :class:`hwslim.export.formats.ExportOptions` fields, e.g.
    ``format="torch"``); returns the :class:`hwslim.export.exporter.ExportResult`.

    ``calib`` (your batches, as :func:`recalibrate_bn`): the BatchNorm statistics at ``config``
    are estimated on them instead of on the checkpoint's search split; the supernet's own are
    restored afterwards. ``checkpoint`` may be the supernet itself."""
    from hwslim.export.exporter import ExportOptions
    from hwslim.export.exporter import export_model as export

    ckpt = _checkpoint(checkpoint)
    if calib is None:
        return export(ckpt, config, Path(out), ExportOptions(**options))
    cfg = config if isinstance(config, ChannelConfig) else ChannelConfig.load(config)
    with preserved_bn_stats(ckpt.model):
        recalibrate_bn(ckpt.model, calib, ckpt.check_config(cfg), inputs=inputs, num_batches=calib_batches)
        note = f"recalibrated at this config on the caller's batches (calib=, {calib_batches or 'all'} batches)"
        return export(ckpt, cfg, Path(out), ExportOptions(**{**options, "calib_images": 0, "bn_source": note}))


__all__ = ["Loaded", "export_model", "import_model", "load", "recalibrate_bn", "sandwich_step", "save",
           "search_configs"]
