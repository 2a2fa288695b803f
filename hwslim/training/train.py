"""Slimmable supernet training: the sandwich rule with in-place distillation.

Each step (:func:`hwslim.training.sandwich.sandwich_step`, the step the Python API gives any
task) runs the same batch through several channel configs and sums their
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

import math
import numbers
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hwslim.core.config import ChannelConfig
from hwslim.core.outputs import check_output, owned, remove_stale_temporaries
from hwslim.core.resources import check_training
from hwslim.core.supernet import SlimmableNet
from hwslim.importing.checkpoint import save_checkpoint
from hwslim.importing.data import SMALL_INPUT, build_data, mix_seeds
from hwslim.importing.specs import is_module_spec, load_model
from hwslim.training import distributed
# re-exported: train's own API since before the loop was shared with finetune
from hwslim.training.loop import (EpochLoop, TrainError, evaluate_configs, param_groups,  # noqa: F401
                                  warmup_cosine)
from hwslim.training.sandwich import sandwich_configs, sandwich_step, soft_cross_entropy  # noqa: F401

# uniform grid steps evaluated at the end besides widest (12) and narrowest: 3/4, 1/2, 1/4
FINAL_UNIFORM_STEPS = (9, 6, 3)


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
    outputs: str | None = None  # "raw": a detector's raw head maps are the outputs (default "full")
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
              "distill_after_warmup", "train_subset", "init", "keep", "sort", "fix_unsupported",
              "outputs")

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
        check("outputs", self.outputs in (None, "full", "raw"), "'full' or 'raw'")
        if (self.fix_unsupported or self.outputs not in (None, "full")) and not is_module_spec(self.model):
            flag = "--fix-unsupported" if self.fix_unsupported else f"--outputs {self.outputs}"
            raise TrainError(f"{flag} applies to a model imported from PyTorch (--model torchvision:NAME, "
                             f"timm:NAME or package.module:callable), not {self.model!r}")
        if self.sort is not None and self.init is None:
            raise TrainError("--no-sort applies to a start from trained weights; add --init WEIGHTS")
        if self.keep is not None:
            from hwslim.importing.fx_trace import compile_keep

            compile_keep(self.keep)

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
def final_configs(net: SlimmableNet) -> list[tuple[str, ChannelConfig]]:
    """The configs reported at the end: widest, a few uniform widths, narrowest."""
    out = [("widest", net.full_config())]
    out += [(f"uniform {s}/12", net.uniform_config(s)) for s in FINAL_UNIFORM_STEPS]
    out.append(("narrowest", net.min_config()))
    return out


# -- the run -----------------------------------------------------------------------------
class _Run(EpochLoop):
    """One training run on one rank: the supernet, its data, and the sandwich step."""

    TOP1_KEY = "train_top1_widest"
    LOSS_KEYS = ("loss_widest", "loss_narrowest", "loss_random")

    def __init__(self, cfg: TrainConfig, world: distributed.World, log: Callable[[str], None]) -> None:
        super().__init__(world, log, cfg.out)
        resumed = self.check_out_dir(cfg)
        if resumed is not None:
            cfg = self.merge_recorded(cfg, resumed.train_args)
        # the model fixes input size and class count; the data must fit them
        seed = 0 if cfg.seed is None else cfg.seed
        init = cfg.init if resumed is None else None  # a resumed run's weights come from its checkpoint
        with torch.device("meta"):  # refuse sizes this machine cannot train before any allocation
            shapes = load_model(cfg.model, width_mult=cfg.width_mult, input_size=cfg.input_size,
                                num_classes=cfg.num_classes, divisor=cfg.divisor, keep=cfg.keep,
                                fix_unsupported=bool(cfg.fix_unsupported), outputs=cfg.outputs or "full")
        check_training(shapes, batch=max(1, (cfg.batch_size or 128) // world.size))
        torch.manual_seed(mix_seeds(seed, 99))  # the initial weights follow the seed too
        net = load_model(cfg.model, width_mult=cfg.width_mult, input_size=cfg.input_size,
                         num_classes=cfg.num_classes, divisor=cfg.divisor, init=init, keep=cfg.keep,
                         fix_unsupported=bool(cfg.fix_unsupported), outputs=cfg.outputs or "full")
        data = open_data(cfg.data, net.input_size, world, search_size=cfg.search_size, seed=seed,
                         download=cfg.download, workers=cfg.workers, num_val=cfg.synthetic_val,
                         train_subset=cfg.train_subset)
        n_cls = int(data.info["num_classes"])
        if cfg.num_classes is None and n_cls != net.num_classes:
            net = load_model(cfg.model, width_mult=cfg.width_mult, input_size=net.input_size,
                             num_classes=n_cls, divisor=cfg.divisor, init=init, keep=cfg.keep,
                             fix_unsupported=bool(cfg.fix_unsupported), outputs=cfg.outputs or "full")
        elif n_cls > net.num_classes:
            raise TrainError(f"the data has {n_cls} classes but --num-classes is {net.num_classes}")
        cfg = cfg.resolved(net.input_size, net.num_classes)
        if cfg.batch_size % world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world.size} processes")
        if world.is_main and net.graph.meta.get("fixed_units"):
            from hwslim.importing.fx_trace import fixed_units_note

            log(fixed_units_note(net))
        if resumed is not None:
            net.load_state_dict(resumed.model.state_dict())
        elif init is not None and cfg.sort is not False:  # the first k channels of every unit become its k best
            from hwslim.importing.importance import sort_channels

            moved = sum(not torch.equal(p, torch.arange(len(p))) for p in sort_channels(net).values())
            if world.is_main:
                log(f"started from {init}; channels sorted by importance in {moved} of {len(net.units)} units: "
                    f"each unit's most important channels now come first, so a narrower width keeps the best "
                    f"ones; {len(net.units) - moved} units were already in that order. The network computes "
                    "exactly what it did")
        elif init is not None and world.is_main:
            log(f"started from {init}; channels in their trained order (no sort)")
        self.setup_optimization(net, cfg, data, resumed)

    # -- one step ---------------------------------------------------------------------------
    def _label_loss(self, out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(out, batch[1], label_smoothing=self.cfg.label_smoothing)

    def step(self, x: torch.Tensor, y: torch.Tensor, configs: list[ChannelConfig],
             distill: bool = True) -> dict[str, Any]:
        """One sandwich step (:func:`hwslim.training.sandwich.sandwich_step`): ``configs[0]`` (the
        widest) learns from the labels (label smoothing), the others from its soft output when
        ``distill``, else from the labels too."""
        r = sandwich_step(self.ddp, (x, y), self._label_loss, self.opt, configs=configs, distill=distill,
                          scaler=self.scaler, autocast=self.autocast)
        self.sched.step()
        return {"loss_widest": r.widest, "loss_narrowest": r.narrowest, "loss_random": r.random,
                "correct": (r.output.argmax(1) == y).sum()}

    def batch_step(self, x: torch.Tensor, y: torch.Tensor, step: int, rng: random.Random) -> dict[str, Any]:
        # the widest's output is noise until it has learned something: before the
        # warm-up ends, distilling it would teach the narrow configs noise and, through
        # the shared weights, hold the widest back (slower start measured on synthetic data)
        distill = not self.cfg.distill_after_warmup or step >= self.warm_steps
        return self.step(x, y, sandwich_configs(self.net, self.cfg.num_random, rng), distill)

    def periodic_eval(self) -> dict[str, Any]:
        net = self.net
        rows = self.evaluate(net, [("widest", net.full_config()), ("narrowest", net.min_config())])
        return {f"val_top1_{r['config']}": r["top1"] for r in rows}

    def save(self, epoch: int, args: dict[str, Any]) -> None:
        save_checkpoint(self.ckpt_path, self.net, data=self.data.info, train_args=args, epoch=epoch,
                        training_state=self.training_state(epoch))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        args = self.args()
        end = self.end_epoch()
        if world.is_main:
            info = self.data.info
            subset = f" (a class-balanced subset of {info['train_subset']:,})" if info.get("train_subset") else ""
            self.log(f"training {self.net.name} x{self.net.width_mult:g} at {self.net.input_size}px on {cfg.data}: "
                     f"{len(self.data):,} training images{subset}, {len(info['search_indices']):,} held out for the "
                     f"search; {self.steps} steps of {cfg.batch_size} per epoch, epochs {self.start_epoch + 1}-{end}"
                     f" of {cfg.epochs}; {self.dev.type}" + (f", {torch.get_num_threads()} PyTorch CPU thread(s)"
                                                              if not self.cuda else ""))
        self.run_epochs(end, args)
        final: list[dict[str, Any]] = []
        if end < cfg.epochs:  # stopped early: the run continues with --resume
            return TrainResult(self.net, self.ckpt_path if world.is_main else None, end, self.history, final)
        evaluated_on: dict[str, Any] = {}
        if world.is_main:
            final = self.evaluate(self.net, final_configs(self.net), progress=True)
            evaluated_on = self.evaluated_on
            self.write_results({"epochs": cfg.epochs, "final": final, "evaluated_on": evaluated_on,
                                "train_args": args})
        distributed.barrier(world)
        return TrainResult(self.net, self.ckpt_path if world.is_main else None, cfg.epochs, self.history, final,
                           evaluated_on)


def open_data(spec: str, input_size: int, world: distributed.World, **kw: Any):
    """:func:`hwslim.importing.data.build_data` on this rank's device; under torchrun with
    ``download``, rank 0 downloads while the others wait, then they read."""
    download = bool(kw.pop("download", False))
    fetch = download and world.distributed
    if fetch and not world.is_main:
        distributed.barrier(world)
    data = build_data(spec, input_size, download=download and world.is_main, device=world.device, **kw)
    if fetch and world.is_main:
        distributed.barrier(world)
    return data


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
    with owned(out):  # one run per output folder: a second one is refused, resumes included
        remove_stale_temporaries(out)  # left by a run killed while saving
        world = distributed.setup(cfg.device)
        try:
            return _Run(cfg, world, log or _log_stderr).run()
        finally:
            distributed.teardown(world)
