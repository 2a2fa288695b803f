"""Finetune one searched config as a network of its own (AutoSlim's last step).

The search picks a channel config and scores it with the supernet's *shared* weights;
AutoSlim then trains that config alone. :func:`finetune` does that:

* the student is the config **materialized** (:func:`hwslim.core.materialize.materialize`):
  a plain network of ordinary layers, physically that config's width, starting from the
  supernet's weights at the config (default) or from a seeded random start
  (``from_scratch``, AutoSlim's own protocol);
* it learns from a **teacher** by knowledge distillation (soft cross-entropy to the
  teacher's softmax): the supernet's widest config by default, another hwslim checkpoint,
  or the user's original PyTorch model (``teacher="torchvision:resnet18"`` with
  ``teacher_init`` weights); ``distill=False`` learns from the labels instead;
* on the same data the supernet trained on, minus the same held-out search split, with
  ``train``'s schedule, resume, DDP, AMP/channels-last and progress
  (:class:`hwslim.training.loop.EpochLoop`).

**One representation.** The result is saved as an ordinary supernet checkpoint (format
unchanged): the supernet's weights with the slices the config uses replaced by the
finetuned ones (:func:`hwslim.core.materialize.write_back`), every other element as it
was. So ``hwslim export --checkpoint OUT/checkpoint.pt --config CONFIG`` exports the
finetuned network, and ``eval``, ``verify`` and ``cost`` take it like any checkpoint,
with no new file kind. (A new graph whose full width is the config would lose the
search split's meaning for unit names and make every consumer learn a second format.)
Other configs of the saved checkpoint are not meaningful any more; its ``train_args``
say so: ``train_args["finetune"]`` records the config, the supernet (path and sha256),
the budget (from the config's meta), the teacher and the epochs.

    >>> finetune(FinetuneConfig(checkpoint="runs/r20/checkpoint.pt",
    ...                         config="search/config_latency_ms_0.5.json", epochs=10, out="runs/r20_0.5ms"))
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.core.accuracy import batches
from hwslim.core.config import ChannelConfig
from hwslim.core.materialize import materialize, slice_positions, write_back
from hwslim.core.outputs import check_output, owned, remove_stale_temporaries
from hwslim.core.slimmable import recalibrate_bn
from hwslim.core.supernet import SlimmableNet
from hwslim.importing.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hwslim.importing.data import SMALL_INPUT, mix_seeds
from hwslim.importing.specs import is_module_spec, module_from_spec
from hwslim.runtimes.onnx_file import sha256_file
from hwslim.training import distributed
from hwslim.training.loop import CHECKPOINT_NAME, EpochLoop, TrainError
from hwslim.training.sandwich import soft_cross_entropy
from hwslim.training.train import TrainConfig, TrainResult, open_data

WIDEST_TEACHER = "the supernet's widest config"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``hwslim finetune`` takes. ``None`` means "the default" (see :meth:`resolved`).

    Fields in ``RECIPE`` shape the result; on resume they default to the recorded
    values and may not be changed (``epochs`` may grow).
    """

    checkpoint: str  # the supernet (from `hwslim train`)
    config: str  # a ChannelConfig JSON file on its grid (from `hwslim search`)
    epochs: int
    out: str
    from_scratch: bool | None = None  # True: a seeded random start (default: the supernet's weights at the config)
    teacher: str | None = None  # an hwslim checkpoint or a PyTorch model spec (default: the supernet's widest)
    teacher_init: str | None = None  # the teacher spec's trained weights (state-dict file or weights name)
    distill: bool | None = None  # False: learn from the labels (default True)
    data: str | None = None  # where the supernet's data is now (default: as recorded in the checkpoint)
    batch_size: int | None = None  # global; default 128
    lr: float | None = None  # default 0.01 x batch / 128 from the supernet's weights, 0.1 x from scratch
    momentum: float | None = None  # 0.9
    weight_decay: float | None = None  # 5e-4 for inputs <= 64 px, 4e-5 above
    warmup_epochs: float | None = None  # 0 from the supernet's weights, min(5, 10% of epochs) from scratch
    label_smoothing: float | None = None  # 0.1 (labels only: --no-distill)
    seed: int | None = None  # 0
    device: str | None = None
    workers: int = 4
    download: bool = False
    amp: bool = True
    channels_last: bool = True
    calib_images: int = 2000
    eval_images: int | None = None
    eval_every: int = 0
    progress: bool = True
    stop_after: int | None = None
    resume: bool = False
    force: bool = False

    RECIPE = ("checkpoint", "config", "from_scratch", "teacher", "teacher_init", "distill", "data", "batch_size",
              "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "seed")
    _SHARED = ("epochs", "out", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing",
               "seed", "workers", "calib_images", "eval_images", "eval_every", "stop_after")

    def validate(self) -> None:
        """Raise :class:`TrainError` for a value no run can use: ``train``'s rules for the shared fields."""
        TrainConfig(model="-", data="-", **{k: getattr(self, k) for k in self._SHARED}).validate()
        for name in ("checkpoint", "config", "teacher", "teacher_init", "data"):
            v = getattr(self, name)
            required = name in ("checkpoint", "config")
            if (v is not None or required) and not (isinstance(v, str) and v):
                raise TrainError(f"--{name.replace('_', '-')} must be a non-empty string, got {v!r}")
        if self.teacher_init is not None and not (self.teacher and is_module_spec(self.teacher)):
            raise TrainError("--teacher-init applies to a --teacher imported from PyTorch (torchvision:NAME, "
                             "timm:NAME or package.module:callable)")
        if self.distill is False and (self.teacher is not None):
            raise TrainError("--no-distill learns from the labels: drop --teacher")

    def resolved(self, input_size: int) -> "FinetuneConfig":
        """Fill the defaults; a start from the supernet's trained weights takes a tenth of the LR, no warm-up."""
        bs = self.batch_size if self.batch_size is not None else 128
        scratch = bool(self.from_scratch)
        return replace(
            self, batch_size=bs, from_scratch=scratch, distill=self.distill is not False,
            lr=self.lr if self.lr is not None else (0.1 if scratch else 0.01) * bs / 128,
            momentum=0.9 if self.momentum is None else self.momentum,
            weight_decay=self.weight_decay if self.weight_decay is not None else
            (5e-4 if input_size <= SMALL_INPUT else 4e-5),
            warmup_epochs=self.warmup_epochs if self.warmup_epochs is not None else
            (round(min(5.0, 0.1 * self.epochs), 6) if scratch else 0.0),
            label_smoothing=0.1 if self.label_smoothing is None else self.label_smoothing,
            seed=0 if self.seed is None else self.seed,
        )


# -- inputs, checked before any training ------------------------------------------------------
def load_inputs(cfg: FinetuneConfig) -> tuple[Checkpoint, ChannelConfig]:
    """The supernet checkpoint and the config, the config checked against its grid (one-line errors)."""
    ckpt = load_checkpoint(cfg.checkpoint)
    config = ChannelConfig.load(cfg.config)
    ckpt.check_config(config)  # another model's config, a width off the grid, another checkpoint's config
    if config.input_size != ckpt.model.input_size:
        raise TrainError(f"{cfg.config} is for {config.input_size} px inputs; the supernet {cfg.checkpoint} trains "
                         f"at {ckpt.model.input_size} px")
    if "search_indices" not in ckpt.data:
        raise TrainError(f"{cfg.checkpoint} records no training data; finetune trains on the supernet's data "
                         "(give a checkpoint written by `hwslim train`)")
    return ckpt, config


def load_teacher(cfg: FinetuneConfig, supernet: SlimmableNet) -> tuple[nn.Module | None, str | None]:
    """The teacher module (eval mode, frozen) and its description; refuses one that cannot teach this student."""
    if cfg.distill is False:
        return None, None
    if cfg.teacher is None:
        teacher: nn.Module = copy.deepcopy(supernet)
        teacher.set_config(supernet.full_config())
        name = WIDEST_TEACHER
    elif is_module_spec(cfg.teacher):
        with torch.device("cpu"):
            teacher = module_from_spec(cfg.teacher, cfg.teacher_init)
        name = cfg.teacher + (f" (--teacher-init {cfg.teacher_init})" if cfg.teacher_init else "")
    elif Path(cfg.teacher).is_file():
        teacher = load_checkpoint(cfg.teacher).model
        teacher.set_config(teacher.full_config())
        name = str(Path(cfg.teacher).resolve())
    else:
        raise TrainError(f"--teacher {cfg.teacher!r}: no such file; give an hwslim checkpoint or a PyTorch model "
                         "(torchvision:NAME, timm:NAME or package.module:callable, with --teacher-init WEIGHTS)")
    teacher.eval().requires_grad_(False)
    size = supernet.input_size
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, supernet.in_channels, size, size))
    except Exception as e:  # a user's model: any failure at this size means it cannot teach at it
        raise TrainError(f"--teacher {name} cannot run at the student's {size}x{size} px inputs "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
    if not isinstance(out, torch.Tensor) or out.shape != (1, supernet.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TrainError(f"--teacher {name} outputs {got} per image, the student {supernet.num_classes} classes; "
                         "a teacher must score the same classes")
    return teacher, name


def prepare_teacher(teacher: nn.Module | None, data, cfg: FinetuneConfig, device: torch.device | str) -> None:
    """Ready a supernet teacher to teach: its own (its widest config's) BatchNorm statistics.

    A supernet's running BatchNorm statistics are shared by every config it trained, so they
    fit none: the teacher's are estimated on ``cfg.calib_images`` training images of ``data``
    first, as every evaluation of a config does. Without this a weak supernet's widest config
    teaches confident nonsense (measured: a 2-epoch ResNet-20 finetuned from 19.0% to 10.0%).
    Every trainer distilling from :func:`load_teacher` calls this (``hwslim finetune``, and the
    peers benchmark's finetuning of pruned modules): one teacher for all. Other teachers (a
    checkpoint's own, a user's module) are used as they are."""
    if not isinstance(teacher, SlimmableNet):
        return
    images = data.calibration_images(cfg.calib_images or 2000, cfg.seed).to(device)
    with torch.no_grad():
        recalibrate_bn(teacher, batches(images, 128))
    teacher.eval()


def provenance(cfg: FinetuneConfig, config: ChannelConfig, teacher: str | None) -> dict[str, Any]:
    """What ``train_args["finetune"]`` records: config, supernet (path, sha256), budget, teacher, epochs."""
    return {"config": config.to_dict(), "config_path": str(Path(cfg.config).resolve()),
            "supernet": str(Path(cfg.checkpoint).resolve()), "supernet_sha256": sha256_file(cfg.checkpoint),
            "budget": config.meta.get("budget"), "teacher": teacher, "epochs": cfg.epochs,
            "from_scratch": bool(cfg.from_scratch), "distill": teacher is not None}


# -- the run ---------------------------------------------------------------------------------------
class _Finetune(EpochLoop):
    """One finetuning run on one rank: the materialized config, its teacher and one loss per step."""

    def __init__(self, cfg: FinetuneConfig, world: distributed.World, log: Callable[[str], None],
                 supernet: Checkpoint, config: ChannelConfig, teacher: nn.Module | None, record: dict) -> None:
        super().__init__(world, log, cfg.out)
        resumed = self.check_out_dir(cfg)
        if resumed is not None:
            cfg = self.merge_recorded(cfg, resumed.train_args)
            if resumed.train_args.get("finetune", {}).get("supernet_sha256") != record["supernet_sha256"]:
                raise TrainError(f"--resume: {cfg.checkpoint} is not the supernet {self.ckpt_path} was finetuned "
                                 "from (its sha256 differs); start a new run")
        cfg = cfg.resolved(supernet.model.input_size)
        if cfg.batch_size % world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world.size} processes")
        self.supernet, self.config, self.record = supernet.model.cpu(), config, record
        # the saved checkpoint: the supernet with the config's slices replaced (a copy: the teacher may be it)
        self.base = resumed.model if resumed is not None else copy.deepcopy(self.supernet)
        self.positions = slice_positions(self.base, config)
        if resumed is not None:
            start = resumed.model
        elif cfg.from_scratch:
            torch.manual_seed(mix_seeds(cfg.seed, 99))  # the initial weights follow the seed
            start = SlimmableNet.from_graph(self.supernet.graph_dict())
        else:
            start = self.supernet
        data = open_data(cfg.data or supernet.train_args.get("data") or supernet.data["spec"], config.input_size,
                         world, search_size=len(supernet.data["search_indices"]),
                         seed=int(supernet.data.get("search_seed", 0)), download=cfg.download, workers=cfg.workers,
                         num_val=supernet.train_args.get("synthetic_val"),
                         train_subset=supernet.data.get("train_subset"))
        if data.info["search_indices"] != supernet.data["search_indices"]:
            raise TrainError(f"--data {cfg.data} holds out another search split than {cfg.checkpoint} did; give the "
                             "data the supernet was trained on")
        self.teacher = teacher.to(world.device) if teacher is not None else None
        if self.teacher is not None and self.cuda and cfg.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.setup_optimization(materialize(start, config), cfg, data, resumed)
        prepare_teacher(self.teacher, data, cfg, self.dev)

    def batch_step(self, x: torch.Tensor, y: torch.Tensor, step: int, rng) -> dict[str, Any]:
        """One step: the student learns the teacher's soft output (or the labels without a teacher)."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.ddp(x)
        out = out.float()
        if self.teacher is not None:
            with torch.no_grad(), self.autocast():
                target = F.softmax(self.teacher(x).float(), dim=1)
            loss = soft_cross_entropy(out, target)
        else:
            loss = F.cross_entropy(out, y, label_smoothing=self.cfg.label_smoothing)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return {"loss": loss.detach(), "correct": (out.detach().argmax(1) == y).sum()}

    def save(self, epoch: int, args: dict[str, Any]) -> None:
        write_back(self.base, self.net, self.positions)
        save_checkpoint(self.ckpt_path, self.base, data=self.data.info, train_args={**args, "finetune": self.record},
                        epoch=epoch, training_state=self.training_state(epoch))

    def _score(self, rows: list[tuple[str, SlimmableNet]], progress: bool = False) -> list[dict[str, Any]]:
        out = []
        for name, net in rows:
            net.to(self.dev)
            try:
                out += [{**r, "config": name} for r in self.evaluate(net, [(name, self.config)], progress)]
            finally:
                net.cpu()
        return out

    def periodic_eval(self) -> dict[str, Any]:
        write_back(self.base, self.net, self.positions)
        return {"val_top1": self._score([("finetuned", self.base)])[0]["top1"]}

    def run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        args, end = self.args(), self.end_epoch()
        if world.is_main:
            self.log(f"finetuning {cfg.config} of {self.supernet.name} at {self.config.input_size}px "
                     f"({'from scratch' if cfg.from_scratch else 'from the supernet weights'}; teacher: "
                     f"{self.record['teacher'] or 'none, the labels'}) on {len(self.data):,} training images; "
                     f"{self.steps} steps of {cfg.batch_size} per epoch, epochs {self.start_epoch + 1}-{end} of "
                     f"{cfg.epochs}; {self.dev.type}")
        self.run_epochs(end, args)
        if end < cfg.epochs:  # stopped early: the run continues with --resume
            return TrainResult(self.base, self.ckpt_path if world.is_main else None, end, self.history)
        final: list[dict[str, Any]] = []
        if world.is_main:
            write_back(self.base, self.net, self.positions)
            final = self._score([("supernet (shared weights)", self.supernet), ("finetuned", self.base)], True)
            self.write_results({"epochs": cfg.epochs, "final": final, "evaluated_on": self.evaluated_on,
                                "train_args": args, "finetune": self.record})
        distributed.barrier(world)
        return TrainResult(self.base, self.ckpt_path if world.is_main else None, cfg.epochs, self.history, final,
                           getattr(self, "evaluated_on", {}))


def _log_stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Finetune ``cfg.config`` of the supernet ``cfg.checkpoint`` (see the module docstring).

    Every input is checked before ``out`` is touched or an epoch spent: the checkpoint,
    the config (on the supernet's grid, for its model), the teacher (same classes, runs
    at the student's input size). Writes ``OUT/checkpoint.pt`` every epoch,
    ``OUT/metrics.jsonl`` and, at the end, ``OUT/results.json`` with the config's
    validation top-1 before (shared weights) and after. ``result.model`` is the saved
    supernet: at ``cfg.config`` it computes the finetuned network.
    """
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"finetune() takes a FinetuneConfig, got {type(cfg).__name__}")
    cfg.validate()
    supernet, config = load_inputs(cfg)
    teacher, name = load_teacher(cfg, supernet.model)
    record = provenance(cfg, config, name)
    out = check_output(cfg.out, kind="dir")
    if (out / CHECKPOINT_NAME).resolve() == Path(cfg.checkpoint).resolve():  # even with --force: it is the input
        raise TrainError(f"--out {cfg.out} holds the supernet being finetuned; give another directory")
    with owned(out):  # one run per output folder
        remove_stale_temporaries(out)
        world = distributed.setup(cfg.device)
        try:
            return _Finetune(cfg, world, log or _log_stderr, supernet, config, teacher, record).run()
        finally:
            distributed.teardown(world)


__all__ = ["FinetuneConfig", "finetune", "load_inputs", "load_teacher"]
