"""The epoch machinery ``hwslim train`` and ``hwslim finetune`` share.

:class:`EpochLoop` holds what does not depend on which network is trained or how one
step computes its loss: the output directory (``--resume``/``--force``), the optimizer
(SGD with Nesterov momentum, no decay on BN, biases and depthwise weights), the
warm-up + cosine schedule per step, DistributedDataParallel under ``torchrun``, mixed
precision and channels-last on CUDA, each epoch's batches with a progress bar (steps,
images/s and an ETA), the metrics file, the training state a checkpoint carries and
its exact restore, and the final scoring with BN recalibration. A subclass builds the
network and the data, then calls :meth:`setup_optimization`; it defines
:meth:`batch_step` (one optimizer step) and :meth:`save` (one checkpoint).

Resume gives the uninterrupted result because every random draw of an epoch derives
from (seed, epoch) and the optimizer, scheduler, loss-scaler and RNG states are restored.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwslim.core.accuracy import accuracy
from hwslim.core.config import ChannelConfig, atomic_write_text
from hwslim.core.errors import CheckpointError, HwslimError, OutputExistsError
from hwslim.core.slimmable import BN_TYPES, SlimmableConv2d
from hwslim.importing.checkpoint import Checkpoint, load_checkpoint
from hwslim.importing.data import mix_seeds, validation_split
from hwslim.training import distributed

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"


class TrainError(HwslimError):
    """Training arguments that cannot work (or that contradict the run being resumed)."""


def _depthwise(m: nn.Module) -> bool:
    if isinstance(m, SlimmableConv2d):
        return m.depthwise
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels  # a materialized network's


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and BN parameters, biases and depthwise weights (no decay)."""
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(m, BN_TYPES) or name == "bias" or _depthwise(m)
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


def evaluate_configs(net, configs: list[tuple[str, ChannelConfig]], images: torch.Tensor,
                     labels: torch.Tensor, calib: torch.Tensor | None, batch_size: int = 256,
                     progress: bool = False, desc: str = "scoring configs",
                     calib_batch_size: int | None = None) -> list[dict[str, Any]]:
    """Top-1 of each config after BN recalibration on ``calib`` (see :mod:`hwslim.core.accuracy`).

    ``calib`` None: no recalibration (the running statistics training left). ``progress``:
    a bar over the configs (with an ETA) on stderr.
    """
    from hwslim.core.costs import model_costs

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


class EpochLoop:
    """One run on one rank: output directory, optimizer, schedule, epochs, checkpoints' training state.

    The config (``self.cfg``) is a frozen dataclass with the fields both commands share:
    ``out, epochs, resume, force, seed, batch_size, lr, momentum, weight_decay,
    warmup_epochs, amp, channels_last, progress, stop_after, calib_images, eval_images``
    and a ``RECIPE`` tuple of the fields a resume may not change.
    """

    TOP1_KEY = "train_top1"  # the metrics row's name for the training top-1 of the step's first output
    LOSS_KEYS: tuple[str, ...] = ("loss",)

    def __init__(self, world: distributed.World, log: Callable[[str], None], out: str | Path) -> None:
        self.world = world
        self.log = log
        self.dev = world.device
        self.cuda = self.dev.type == "cuda"
        self.ckpt_path, self.metrics_path = Path(out) / CHECKPOINT_NAME, Path(out) / METRICS_NAME

    # -- output directory and resume ------------------------------------------------------
    def check_out_dir(self, cfg) -> Checkpoint | None:
        """The checkpoint to resume from (None: a new run); refuses to overwrite without ``force``."""
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

    def merge_recorded(self, cfg, recorded: dict[str, Any]):
        """``cfg`` with its recipe fields taken from a resumed run's record; a changed one is refused."""
        changes = {}
        for k in type(cfg).RECIPE:
            mine, theirs = getattr(cfg, k), recorded.get(k)
            if mine is not None and theirs is not None and mine != theirs:
                raise TrainError(f"--resume: {k} is {theirs!r} in {self.ckpt_path} but {mine!r} now; "
                                 "drop the option or start a new run")
            changes[k] = theirs if theirs is not None else mine
        return replace(cfg, **changes)

    def setup_optimization(self, net: nn.Module, cfg, data, resumed: Checkpoint | None) -> None:
        """Put ``net`` on the device, build optimizer, schedule, loss scaler and DDP; restore a resumed run."""
        self.cfg, self.data = cfg, data
        self.local_batch = cfg.batch_size // self.world.size
        self.steps = data.steps_per_epoch(self.local_batch, self.world.size)
        if self.steps < 1:
            raise TrainError(f"{len(data)} training images make no full batch of {cfg.batch_size}; "
                             "lower --batch-size")
        self.net = net.to(self.dev)
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
        if self.world.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.dev.index] if self.cuda else None)
        self.start_epoch, self.history = 0, []
        if resumed is not None:
            self._restore(resumed)

    def _restore(self, ckpt: Checkpoint) -> None:
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

    def training_state(self, epoch: int) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly after ``epoch`` epochs."""
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
        atomic_write_text(self.metrics_path, "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    # -- one epoch ---------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def batch_step(self, x: torch.Tensor, y: torch.Tensor, step: int, rng: random.Random) -> dict[str, Any]:
        """One optimizer step on a batch; returns :attr:`LOSS_KEYS` and ``correct`` as device tensors."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.net.train()
        # every random draw of this epoch derives from (seed, epoch): resume reproduces it
        torch.manual_seed(mix_seeds(cfg.seed, epoch, self.world.rank, 1))
        rng = random.Random(mix_seeds(cfg.seed, epoch, 2))  # same on every rank: all ranks train the same configs
        bar = self._bar(epoch)
        sums = {k: torch.zeros((), device=self.dev) for k in (*self.LOSS_KEYS, "correct")}
        seen, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(self.data.batches(epoch, self.local_batch, self.world.rank, self.world.size,
                                                     cfg.seed)):
            if self.cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous()
            r = self.batch_step(x, y, epoch * self.steps + i, rng)
            for k in sums:
                sums[k] += r[k]  # on the device; read once per epoch (and for the progress bar)
            seen += len(y)
            if bar is not None:
                bar.update(1)
                if i % 20 == 0 or i == self.steps - 1:
                    bar.set_postfix(loss=f"{float(r[self.LOSS_KEYS[0]]):.3f}",
                                    img_s=f"{seen * self.world.size / (time.perf_counter() - t0):.0f}",
                                    lr=f"{self.sched.get_last_lr()[0]:.3g}")
        if bar is not None:
            bar.close()
        sums = {k: float(v) for k, v in sums.items()}  # synchronizes: the epoch's time includes all its work
        diverged = [k for k in self.LOSS_KEYS if not math.isfinite(sums[k])]
        if diverged:  # before this epoch is saved: the last good checkpoint stays
            kept = (f"{self.ckpt_path} keeps the last good epoch" if self.ckpt_path.exists()
                    else "no epoch was saved")
            raise TrainError(f"epoch {epoch + 1}: the training loss became {sums[diverged[0]]} ({diverged[0]}); "
                             f"training stopped and {kept}. Lower --lr, or check the data and the starting weights")
        dt = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": self.sched.get_last_lr()[0], "epoch_time_s": round(dt, 3),
               "images_per_s": round(seen * self.world.size / dt, 1),
               self.TOP1_KEY: round(100 * sums["correct"] / max(1, seen), 2)}
        row.update({k: round(v / self.steps, 5) for k, v in sums.items() if k != "correct"})
        return row

    def _bar(self, epoch: int):
        if not (self.cfg.progress and self.world.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step", leave=False,
                    dynamic_ncols=True)

    # -- the loop -------------------------------------------------------------------------------
    def save(self, epoch: int, args: dict[str, Any]) -> None:
        """Write the checkpoint after ``epoch`` epochs (rank 0 only)."""
        raise NotImplementedError

    def periodic_eval(self) -> dict[str, Any]:
        """Metrics added to the row of an epoch that ``eval_every`` selects (rank 0)."""
        return {}

    def run_epochs(self, end: int, args: dict[str, Any]) -> None:
        """Epochs ``start_epoch`` to ``end``: each one's row logged and saved with a checkpoint."""
        cfg, world = self.cfg, self.world
        for epoch in range(self.start_epoch, end):
            row = self.epoch(epoch)
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and world.is_main:
                row.update(self.periodic_eval())
            self.history.append(row)
            if world.is_main:
                self.save(epoch + 1, args)
                self._write_metrics()
                self.log(json.dumps(row, sort_keys=True))
            distributed.barrier(world)

    def args(self) -> dict[str, Any]:
        """The run's arguments as recorded: the config's fields, the world size and what was used."""
        from dataclasses import fields

        return {**{f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}, "world_size": self.world.size,
                **self.used()}

    def end_epoch(self) -> int:
        cfg = self.cfg
        return cfg.epochs if cfg.stop_after is None else min(cfg.epochs, self.start_epoch + cfg.stop_after)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, net, configs: list[tuple[str, ChannelConfig]], progress: bool = False) -> list[dict[str, Any]]:
        """Top-1 of ``net`` (a supernet) at ``configs`` on the validation split, BN recalibrated per config."""
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
        with self.autocast():
            n, split = len(self._val[1]), self.evaluated_on["split"]
            return evaluate_configs(net, configs, *self._val, self._calib,
                                    progress=progress and cfg.progress and self.world.is_main,
                                    desc=f"scoring on {n:,} {split} images")

    def used(self) -> dict[str, Any]:
        """What this run actually uses where the arguments only ask (recorded instead of the request):
        mixed precision and channels-last apply on CUDA only."""
        return {"device": self.dev.type, "amp": self.amp_dtype is not None,
                "amp_dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else None,
                "channels_last": self.cuda and self.cfg.channels_last,
                "threads": torch.get_num_threads() if not self.cuda else None}

    def write_results(self, doc: dict[str, Any]) -> None:
        atomic_write_text(Path(self.cfg.out) / RESULTS_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
