"""Slimmable supernet training: the sandwich rule with in-place distillation.

Each step runs the same batch through several channel configs and sums their
gradients before one optimizer step (Yu & Huang's *sandwich rule*, as AutoSlim trains):

1. the **widest** config, learning from the labels (label smoothing 0.1);
2. the **narrowest** config and ``num_random`` **random** configs (each unit's width
   drawn independently from its grid), learning from the widest config's detached
   soft output (*in-place distillation*: soft cross-entropy to the teacher's softmax).
   During the LR warm-up they learn from the labels instead (``distill_after_warmup``):
   a teacher that has learned nothing yet only teaches noise, and in short runs that
   held the widest config back too.

Training the extremes every step bounds every config in between; distillation gives
narrow configs a smoother target than the labels. SGD with Nesterov momentum, linear
warm-up then cosine decay per step, no weight decay on BatchNorm, biases and depthwise
weights (they are few and decay only hurts them). On CUDA: mixed precision (bf16, or
fp16 with loss scaling) and channels-last.

**A trained start.** For a model imported from PyTorch (``torchvision:NAME``, ``timm:NAME``,
``package.module:callable``), ``init`` names its trained weights (a state-dict file, or a
torchvision/timm weights name). The supernet starts from them with every unit's channels
sorted by importance (:func:`hwslim.importing.importance.sort_channels`: the full network computes
what the trained one does, and the first k channels of a unit are its k most important),
then the sandwich rule fine-tunes it. ``keep`` (a regular expression over module names)
keeps those modules' outputs whole; ``fix_unsupported`` keeps the units that reach a
channel shuffle or slice whole instead of refusing the model. From Python, the same start is::

    net = import_model(trained, torch.randn(1, 3, 224, 224))   # hwslim.importing.fx_trace
    sort_channels(net)                                          # hwslim.importing.importance

Runs on one CPU, one GPU, or many through ``torchrun`` (DistributedDataParallel;
``batch_size`` is the *global* batch, split across ranks; only rank 0 writes).
Each epoch's metrics go to ``OUT/metrics.jsonl`` and, as a JSON line, to ``train(cfg, log=...)``
(stderr by default; the library prints nothing on stdout).
Every epoch ends with an atomic checkpoint; ``resume=True`` continues from it and gives
the same result as an uninterrupted run: each epoch's shuffling, augmentation, random
configs and dropout are seeded from (seed, epoch), and the optimizer, scheduler,
loss-scaler and RNG states are restored.

    >>> result = train(TrainConfig(model="resnet20", data="synthetic", epochs=30, out="runs/r20"))
    >>> result.final                    # accuracy of widest / uniform / narrowest configs
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import random
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.training import distributed
from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.core.config import ChannelConfig
from hwslim.importing.data import SMALL_INPUT, mix_seeds, build_data, validation_split
from hwslim.core.errors import CheckpointError, HwslimError, OutputExistsError
from hwslim.importing.specs import is_module_spec, load_model
from hwslim.core.outputs import check_output, remove_stale_temporaries
from hwslim.core.resources import check_training
from hwslim.core.slimmable import BN_TYPES, SlimmableConv2d
from hwslim.core.supernet import SlimmableNet

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
# uniform grid steps evaluated at the end besides widest (12) and narrowest: 3/4, 1/2, 1/4
FINAL_UNIFORM_STEPS = (9, 6, 3)


class TrainError(HwslimError):
    """Training arguments that cannot work (or that contradict the run being resumed)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``hwslim train`` takes. ``None`` means "the default" (see :meth:`resolved`).

    Fields marked *recipe* shape the result; on resume they default to the recorded
    values and may not be changed. ``epochs`` may grow on resume (the cosine decay then
    stretches over the new total).
    """

    model: str
    data: str
    epochs: int
    out: str
    # model (recipe)
    width_mult: float | None = None
    input_size: int | None = None
    num_classes: int | None = None
    divisor: int | None = None
    # a trained start (recipe): weights for an imported model (torchvision:/timm:/module:callable), whose
    # channels are then sorted by importance (hwslim.importing.importance); ``keep``: modules whose outputs stay whole
    init: str | None = None  # a state-dict file, or a torchvision/timm weights name (IMAGENET1K_V1; downloads)
    keep: str | None = None  # a regular expression over the module's qualified names
    fix_unsupported: bool | None = None  # units reaching a channel shuffle or slice keep their width (default: refuse)
    sort: bool | None = None  # sort the --init weights' channels by importance (default True; False: measure it)
    # optimization (recipe)
    batch_size: int | None = None  # global, across all ranks; default 128
    lr: float | None = None  # default 0.1 * batch_size / 128
    momentum: float | None = None  # 0.9
    weight_decay: float | None = None  # 5e-4 for inputs <= 64 px, 4e-5 above (MobileNet on ImageNet)
    warmup_epochs: float | None = None  # min(5, 10% of epochs)
    num_random: int | None = None  # 2
    label_smoothing: float | None = None  # 0.1
    search_size: int | None = None  # images held out of training for the search
    train_subset: int | None = None  # use only this many training images (class-balanced, seeded), search split included
    distill_after_warmup: bool | None = None  # True: narrow configs learn from labels until warm-up ends
    seed: int | None = None  # 0
    # execution (free to change between runs)
    device: str | None = None  # cpu | cuda; default: cuda when available
    workers: int = 4
    download: bool = False
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    calib_images: int = 2000  # training images for BN recalibration at evaluation (0: none)
    eval_images: int | None = None  # validation images scored at the end (default: all, 5000 when streaming)
    eval_every: int = 0  # also score widest/narrowest every N epochs (0: only at the end)
    progress: bool = True
    stop_after: int | None = None  # leave after this many epochs of this invocation (time-limited jobs)
    resume: bool = False
    force: bool = False
    synthetic_val: int | None = None  # validation images of `synthetic` (default 2000)

    RECIPE = ("model", "data", "width_mult", "input_size", "num_classes", "divisor", "batch_size", "lr", "momentum",
              "weight_decay", "warmup_epochs", "num_random", "label_smoothing", "search_size", "seed",
              "distill_after_warmup", "train_subset", "init", "keep", "sort", "fix_unsupported")

    def validate(self) -> None:
        """Raise :class:`TrainError` for a value no run can use (before anything is read or written)."""
        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise TrainError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        check("epochs", is_int(self.epochs) and self.epochs >= 1, "a whole number of at least 1")
        for name in ("input_size", "num_classes", "batch_size", "stop_after", "train_subset"):
            v = getattr(self, name)
            check(name, v is None or (is_int(v) and v >= 1), "a whole number of at least 1")
        check("workers", is_int(self.workers) and self.workers >= 0, "a whole number, 0 or more")
        for name in ("num_random", "search_size", "eval_every"):
            v = getattr(self, name)
            check(name, v is None or (is_int(v) and v >= 0), "a whole number, 0 or more")
        check("calib_images", is_int(self.calib_images) and self.calib_images >= 0, "a whole number, 0 or more")
        check("eval_images", self.eval_images is None or (is_int(self.eval_images) and self.eval_images >= 1),
              "a whole number of at least 1")
        check("synthetic_val", self.synthetic_val is None or (is_int(self.synthetic_val) and self.synthetic_val >= 1),
              "a whole number of at least 1")
        for name in ("width_mult", "lr"):
            v = getattr(self, name)
            check(name, v is None or (is_num(v) and v > 0), "a positive number")
        for name in ("weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            check(name, v is None or (is_num(v) and v >= 0), "a number, 0 or more")
        check("momentum", self.momentum is None or (is_num(self.momentum) and 0 <= self.momentum < 1),
              "at least 0 and below 1")
        check("label_smoothing", self.label_smoothing is None or
              (is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1), "at least 0 and below 1")
        check("seed", self.seed is None or is_int(self.seed), "a whole number")
        for name in ("init", "keep"):
            v = getattr(self, name)
            check(name, v is None or (isinstance(v, str) and v != ""), "a non-empty string")
            if v is not None and not is_module_spec(self.model):
                what = ("--resume continues a run from its checkpoint" if self.model.endswith((".pt", ".pth"))
                        else "zoo models and graph files start from random weights")
                raise TrainError(f"--{name} applies to a model imported from PyTorch (--model torchvision:NAME, "
                                 f"timm:NAME or package.module:callable), not {self.model!r}; {what}")
        if self.fix_unsupported and not is_module_spec(self.model):
            raise TrainError(f"--fix-unsupported applies to a model imported from PyTorch (--model torchvision:NAME, "
                             f"timm:NAME or package.module:callable), not {self.model!r}")
        if self.sort is not None and self.init is None:
            raise TrainError("--no-sort applies to a start from trained weights; add --init WEIGHTS")
        if self.keep is not None:
            try:
                re.compile(self.keep)
            except re.error as e:
                raise TrainError(f"--keep {self.keep!r} is not a regular expression ({e})") from None

    def resolved(self, input_size: int, num_classes: int) -> "TrainConfig":
        """Fill defaults that depend on the model's input size and the data."""
        bs = self.batch_size if self.batch_size is not None else 128
        return replace(
            self,
            input_size=input_size,
            num_classes=num_classes,
            batch_size=bs,
            lr=self.lr if self.lr is not None else 0.1 * bs / 128,
            momentum=0.9 if self.momentum is None else self.momentum,
            weight_decay=self.weight_decay if self.weight_decay is not None else
            (5e-4 if input_size <= SMALL_INPUT else 4e-5),
            # rounded: 0.1 * 3 is 0.30000000000000004 in binary, and the value is recorded
            warmup_epochs=self.warmup_epochs if self.warmup_epochs is not None else round(min(5.0, 0.1 * self.epochs),
                                                                                        6),
            num_random=2 if self.num_random is None else self.num_random,
            label_smoothing=0.1 if self.label_smoothing is None else self.label_smoothing,
            seed=0 if self.seed is None else self.seed,
            distill_after_warmup=True if self.distill_after_warmup is None else self.distill_after_warmup,
            sort=(self.sort is not False) if self.init is not None else None,
        )

    def recipe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RECIPE}


@dataclass
class TrainResult:
    model: SlimmableNet
    checkpoint: Path | None
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    final: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluated config
    # what ``final`` was scored on: split, images, BN recalibration images (0: none)
    evaluated_on: dict[str, Any] = field(default_factory=dict)

    def describe_evaluation(self) -> str:
        """``top-1 on 10,000 images of the test split, BN recalibrated on 2,000 training images``."""
        e = self.evaluated_on
        if not e:
            return ""
        bn = (f"BN recalibrated per config on {e['calib_images']:,} training images" if e.get("calib_images")
              else "BN statistics as training left them")
        return f"top-1 on {e['images']:,} images of the {e['split']} split, {bn}"


# -- pieces ------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and BN parameters, biases and depthwise weights (no decay)."""
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(m, BN_TYPES) or name == "bias" or (isinstance(m, SlimmableConv2d) and m.depthwise)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up from ~0 to 1, then half a cosine down to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return factor


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to a soft target: the in-place distillation loss (KL up to a constant)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def sandwich_configs(net: SlimmableNet, num_random: int, rng: random.Random) -> list[ChannelConfig]:
    """[widest, narrowest, num_random random per-unit configs]: the configs of one step."""
    return [net.full_config(), net.min_config()] + [net.random_config(rng) for _ in range(num_random)]


def final_configs(net: SlimmableNet) -> list[tuple[str, ChannelConfig]]:
    """The configs reported at the end: widest, a few uniform widths, narrowest."""
    out = [("widest", net.full_config())]
    out += [(f"uniform {s}/12", net.uniform_config(s)) for s in FINAL_UNIFORM_STEPS]
    out.append(("narrowest", net.min_config()))
    return out


def evaluate_configs(net: SlimmableNet, configs: list[tuple[str, ChannelConfig]], images: torch.Tensor,
                     labels: torch.Tensor, calib: torch.Tensor | None, batch_size: int = 256,
                     progress: bool = False, desc: str = "scoring configs",
                     calib_batch_size: int | None = None) -> list[dict[str, Any]]:
    """Top-1 of each config after BN recalibration on ``calib`` (see :mod:`hwslim.core.accuracy`).

    ``calib`` None: no recalibration (the running statistics training left). ``progress``:
    a bar over the configs (with an ETA) on stderr.
    """
    from hwslim.core.costs import model_costs
    from hwslim.core.accuracy import accuracy

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc=desc, unit="config", dynamic_ncols=True)
    rows = []
    try:
        for name, cfg in configs:
            acc = accuracy(net, cfg, images, labels, calib_images=calib, batch_size=batch_size,
                           calib_batch_size=calib_batch_size, recalibrate=calib is not None)
            c = model_costs(net, cfg)
            rows.append({"config": name, "top1": round(100 * acc, 2), "macs": c.macs, "params": c.params})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- the run -----------------------------------------------------------------------------
class _Run:
    """One training run on one rank: model, data, optimizer and the epoch loop."""

    def __init__(self, cfg: TrainConfig, world: distributed.World, log: Callable[[str], None]) -> None:
        self.world = world
        self.log = log
        self.dev = world.device
        out = Path(cfg.out)
        self.ckpt_path, self.metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
        resumed = self._check_out_dir(cfg)
        if resumed is not None:
            cfg = self._merge_recorded(cfg, resumed.train_args)
        # the model fixes input size and class count; the data must fit them
        seed = 0 if cfg.seed is None else cfg.seed
        init = cfg.init if resumed is None else None  # a resumed run's weights come from its checkpoint
        with torch.device("meta"):  # refuse sizes this machine cannot train before any allocation
            shapes = load_model(cfg.model, width_mult=cfg.width_mult, input_size=cfg.input_size,
                                num_classes=cfg.num_classes, divisor=cfg.divisor, keep=cfg.keep,
                                fix_unsupported=bool(cfg.fix_unsupported))
        check_training(shapes, batch=max(1, (cfg.batch_size or 128) // world.size))
        torch.manual_seed(mix_seeds(seed, 99))  # the initial weights follow the seed too
        net = load_model(cfg.model, width_mult=cfg.width_mult, input_size=cfg.input_size,
                         num_classes=cfg.num_classes, divisor=cfg.divisor, init=init, keep=cfg.keep,
                         fix_unsupported=bool(cfg.fix_unsupported))
        fetch = cfg.download and world.distributed  # rank 0 downloads, the others wait, then read
        if fetch and not world.is_main:
            distributed.barrier(world)
        self.data = build_data(cfg.data, net.input_size, search_size=cfg.search_size, seed=seed,
                               download=cfg.download and world.is_main, device=self.dev, workers=cfg.workers,
                               num_val=cfg.synthetic_val, train_subset=cfg.train_subset)
        if fetch and world.is_main:
            distributed.barrier(world)
        n_cls = int(self.data.info["num_classes"])
        if cfg.num_classes is None and n_cls != net.num_classes:
            net = load_model(cfg.model, width_mult=cfg.width_mult, input_size=net.input_size,
                             num_classes=n_cls, divisor=cfg.divisor, init=init, keep=cfg.keep,
                             fix_unsupported=bool(cfg.fix_unsupported))
        elif n_cls > net.num_classes:
            raise TrainError(f"the data has {n_cls} classes but --num-classes is {net.num_classes}")
        cfg = cfg.resolved(net.input_size, net.num_classes)
        if cfg.batch_size % world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world.size} processes")
        self.cfg = cfg
        self.local_batch = cfg.batch_size // world.size
        self.steps = self.data.steps_per_epoch(self.local_batch, world.size)
        if self.steps < 1:
            raise TrainError(f"{len(self.data)} training images make no full batch of {cfg.batch_size}; "
                             "lower --batch-size")
        if world.is_main and net.graph.meta.get("fixed_units"):
            from hwslim.importing.fx_trace import fixed_units_note

            log(fixed_units_note(net))
        if resumed is not None:
            net.load_state_dict(resumed.model.state_dict())
        elif init is not None and cfg.sort is not False:  # the first k channels of every unit become its k best
            from hwslim.importing.importance import sort_channels

            moved = sum(not torch.equal(p, torch.arange(len(p))) for p in sort_channels(net).values())
            if world.is_main:
                log(f"started from {init}; channels sorted by importance in {moved} of {len(net.units)} units")
        elif init is not None and world.is_main:
            log(f"started from {init}; channels in their trained order (no sort)")
        self.net = net.to(self.dev)
        self.cuda = self.dev.type == "cuda"
        if self.cuda and cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.amp_dtype = None
        if self.cuda and cfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.opt = torch.optim.SGD(param_groups(self.net, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.momentum > 0)
        self.warm_steps = warm = int(round(cfg.warmup_epochs * self.steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(cfg.epochs * self.steps, warm))
        self.ddp: nn.Module = self.net
        if world.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.dev.index] if self.cuda else None)
        self.start_epoch, self.history = 0, []
        if resumed is not None:
            self._restore(resumed)

    # -- output directory and resume ------------------------------------------------------
    def _check_out_dir(self, cfg: TrainConfig):
        exists = self.ckpt_path.exists()
        if cfg.resume:
            if not exists:  # killed before its first checkpoint: there is nothing to lose, start it
                if self.world.is_main:
                    self.log(f"note: {self.ckpt_path} does not exist (no epoch was finished); starting the run")
                return None
            ckpt = load_checkpoint(self.ckpt_path, map_location="cpu")
            if ckpt.training_state is None:
                raise CheckpointError(f"{self.ckpt_path} holds no training state to resume from")
            if cfg.epochs < int(ckpt.epoch):
                raise TrainError(f"--epochs {cfg.epochs} is fewer than the {ckpt.epoch} epochs {self.ckpt_path} "
                                 f"has done; give --epochs {ckpt.epoch} or more, or start a new run")
            return ckpt
        if exists and not cfg.force:
            raise OutputExistsError(f"{self.ckpt_path} exists; pass --resume to continue that run or --force to "
                                    "start over (it is replaced only when the first epoch is done)")
        return None

    def _merge_recorded(self, cfg: TrainConfig, recorded: dict[str, Any]) -> TrainConfig:
        changes = {}
        for k in TrainConfig.RECIPE:
            mine, theirs = getattr(cfg, k), recorded.get(k)
            if mine is not None and theirs is not None and mine != theirs:
                raise TrainError(f"--resume: {k} is {theirs!r} in {self.ckpt_path} but {mine!r} now; "
                                 "drop the option or start a new run")
            changes[k] = theirs if theirs is not None else mine
        return replace(cfg, **changes)

    def _restore(self, ckpt) -> None:
        state = ckpt.training_state
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(ckpt.epoch)
        self.history = list(state.get("history", []))
        _set_rng_state(state["rng"], self.dev)
        if state.get("world_size", 1) != self.world.size and self.world.is_main:
            self.log(f"note: resuming a {state.get('world_size')}-process run on {self.world.size}; "
                     "batches are split differently from here on")
        if self.world.is_main:  # the metrics file must match the checkpoint, not a later crashed epoch
            self._write_metrics()

    def _training_state(self, epoch: int) -> dict[str, Any]:
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": {"seed": self.cfg.seed, "epoch": epoch},  # DistributedSampler state: (seed, epoch)
            "rng": _rng_state(self.dev),
            "world_size": self.world.size,
            "step": epoch * self.steps,
            "history": self.history,
        }

    def _write_metrics(self) -> None:
        from hwslim.core.config import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    # -- one step and one epoch -------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor, configs: list[ChannelConfig],
             distill: bool = True) -> dict[str, float]:
        """One sandwich step: forward/backward every config, one optimizer step.

        ``configs[0]`` (the widest) learns from the labels; the others from its soft
        output when ``distill``, else from the labels too.
        """
        self.opt.zero_grad(set_to_none=True)
        # losses stay on the device: reading them every step would stall the GPU's queue
        teacher, losses, correct = None, [], None
        for i, cfg in enumerate(configs):
            self.net.set_config(cfg)
            last = i == len(configs) - 1
            # DDP: reduce gradients once, after the last config's backward
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp(x)
                out = out.float()
                if teacher is None or not distill:
                    loss = F.cross_entropy(out, y, label_smoothing=self.cfg.label_smoothing)
                else:
                    loss = soft_cross_entropy(out, teacher)
                if teacher is None:
                    teacher = F.softmax(out.detach(), dim=1)
                    correct = (out.detach().argmax(1) == y).sum()
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        self.net.set_config(configs[0])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        zero = torch.zeros((), device=losses[0].device)
        return {"loss_widest": losses[0], "loss_narrowest": losses[1] if len(losses) > 1 else zero,
                "loss_random": sum(losses[2:], zero) / max(1, len(losses) - 2), "correct": correct}

    def epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.net.train()
        # every random draw of this epoch derives from (seed, epoch): resume reproduces it
        torch.manual_seed(mix_seeds(cfg.seed, epoch, self.world.rank, 1))
        rng = random.Random(mix_seeds(cfg.seed, epoch, 2))  # same on every rank: all ranks train the same configs
        bar = self._bar(epoch)
        keys = ("loss_widest", "loss_narrowest", "loss_random", "correct")
        sums = {k: torch.zeros((), device=self.dev) for k in keys}
        seen, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(self.data.batches(epoch, self.local_batch, self.world.rank, self.world.size,
                                                     cfg.seed)):
            # the widest's output is noise until it has learned something: before the
            # warm-up ends, distilling it would teach the narrow configs noise and, through
            # the shared weights, hold the widest back (slower start measured on synthetic data)
            distill = not cfg.distill_after_warmup or epoch * self.steps + i >= self.warm_steps
            if self.cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous()
            r = self.step(x, y, sandwich_configs(self.net, cfg.num_random, rng), distill)
            for k in sums:
                sums[k] += r[k]  # on the device; read once per epoch (and for the progress bar)
            seen += len(y)
            if bar is not None:
                bar.update(1)
                if i % 20 == 0 or i == self.steps - 1:
                    bar.set_postfix(loss=f"{float(r['loss_widest']):.3f}",
                                    img_s=f"{seen * self.world.size / (time.perf_counter() - t0):.0f}",
                                    lr=f"{self.sched.get_last_lr()[0]:.3g}")
        if bar is not None:
            bar.close()
        sums = {k: float(v) for k, v in sums.items()}  # synchronizes: the epoch's time includes all its work
        dt = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": self.sched.get_last_lr()[0], "epoch_time_s": round(dt, 3),
               "images_per_s": round(seen * self.world.size / dt, 1),
               "train_top1_widest": round(100 * sums["correct"] / max(1, seen), 2)}
        row.update({k: round(v / self.steps, 5) for k, v in sums.items() if k != "correct"})
        return row

    def _bar(self, epoch: int):
        if not (self.cfg.progress and self.world.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step", leave=False,
                    dynamic_ncols=True)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, configs: list[tuple[str, ChannelConfig]], progress: bool = False) -> list[dict[str, Any]]:
        cfg = self.cfg
        if not hasattr(self, "_val"):
            n = cfg.eval_images if cfg.eval_images is not None else (None if self.data.in_memory else 5000)
            self._val = validation_split(self.data.info, self.dev, max_images=n)
            # calib_images 0: score with the running statistics training left (no recalibration)
            self._calib = self.data.calibration_images(cfg.calib_images, cfg.seed) if cfg.calib_images else None
            if self.cuda and cfg.channels_last:
                self._val = (self._val[0].contiguous(memory_format=torch.channels_last), self._val[1])
                if self._calib is not None:
                    self._calib = self._calib.contiguous(memory_format=torch.channels_last)
        self.evaluated_on = {"split": self.data.info.get("val_split", "val"), "images": len(self._val[1]),
                             "calib_images": 0 if self._calib is None else len(self._calib)}
        with self._autocast():
            n, split = len(self._val[1]), self.evaluated_on["split"]
            return evaluate_configs(self.net, configs, *self._val, self._calib,
                                    progress=progress and cfg.progress and self.world.is_main,
                                    desc=f"scoring on {n:,} {split} images")

    def used(self) -> dict[str, Any]:
        """What this run actually uses where the arguments only ask (recorded instead of the request):
        mixed precision and channels-last apply on CUDA only."""
        return {"device": self.dev.type, "amp": self.amp_dtype is not None,
                "amp_dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else None,
                "channels_last": self.cuda and self.cfg.channels_last,
                "threads": torch.get_num_threads() if not self.cuda else None}

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        args = {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "world_size": world.size,
                **self.used()}
        end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, self.start_epoch + cfg.stop_after)
        if world.is_main:
            info = self.data.info
            subset = f" (a class-balanced subset of {info['train_subset']:,})" if info.get("train_subset") else ""
            self.log(f"training {self.net.name} x{self.net.width_mult:g} at {self.net.input_size}px on {cfg.data}: "
                     f"{len(self.data):,} training images{subset}, {len(info['search_indices']):,} held out for the "
                     f"search; {self.steps} steps of {cfg.batch_size} per epoch, epochs {self.start_epoch + 1}-{end}"
                     f" of {cfg.epochs}; {self.dev.type}" + (f", {torch.get_num_threads()} PyTorch CPU thread(s)"
                                                              if not self.cuda else ""))
        for epoch in range(self.start_epoch, end):
            row = self.epoch(epoch)
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and world.is_main:
                net = self.net
                for r in self.evaluate([("widest", net.full_config()), ("narrowest", net.min_config())]):
                    row[f"val_top1_{r['config']}"] = r["top1"]
            self.history.append(row)
            if world.is_main:
                save_checkpoint(self.ckpt_path, self.net, data=self.data.info, train_args=args, epoch=epoch + 1,
                                training_state=self._training_state(epoch + 1))
                self._write_metrics()
                self.log(json.dumps(row, sort_keys=True))
            distributed.barrier(world)
        final: list[dict[str, Any]] = []
        if end < cfg.epochs:  # stopped early: the run continues with --resume
            return TrainResult(self.net, self.ckpt_path if world.is_main else None, end, self.history, final)
        evaluated_on: dict[str, Any] = {}
        if world.is_main:
            final = self.evaluate(final_configs(self.net), progress=True)
            evaluated_on = self.evaluated_on
            from hwslim.core.config import atomic_write_text

            atomic_write_text(Path(cfg.out) / RESULTS_NAME,
                              json.dumps({"epochs": cfg.epochs, "final": final, "evaluated_on": evaluated_on,
                                          "train_args": args}, indent=2, sort_keys=True) + "\n")
        distributed.barrier(world)
        return TrainResult(self.net, self.ckpt_path if world.is_main else None, cfg.epochs, self.history, final,
                           evaluated_on)


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a slimmable supernet; see the module docstring.

    Writes ``OUT/checkpoint.pt`` every epoch, ``OUT/metrics.jsonl`` (one JSON object per
    epoch) and, at the end, ``OUT/results.json`` with the widest, uniform and narrowest
    configs' validation top-1 after BN recalibration. Progress (each epoch's metrics as a
    JSON line, notes) goes to ``log`` on rank 0: stderr by default; nothing is printed
    on stdout. Raises :class:`TrainError` for values no run can use, before touching ``out``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    out = check_output(cfg.out, kind="dir")  # before an epoch is spent
    remove_stale_temporaries(out)  # left by a run killed while saving
    world = distributed.setup(cfg.device)
    try:
        return _Run(cfg, world, log or _log_stderr).run()
    finally:
        distributed.teardown(world)
