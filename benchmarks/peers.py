"""hwslim against Torch-Pruning and ModelOpt FastNAS: accuracy at equal measured latency, after equal training.

One run, one machine, one table (issue 33). For each network (CIFAR-10 ResNet-20 and
MobileNetV2-CIFAR, the supernets of ``benchmarks/assets``) and each latency budget (55, 65
and 75% of the full model's *measured* latency):

* **methods**: ``hwslim`` (the latency-aware search on the committed ONNX Runtime table of
  this CPU when it matches the machine, else on one profiled here, then ``hwslim finetune``); ``torch-pruning`` (magnitude and group-norm
  importance, round_to 8 and 16, global and local pruning, a swept pruning ratio);
  ``modelopt`` (FastNAS, channel divisor 8 and 16, a swept FLOPs target); ``uniform`` (the
  supernet's uniform widths); and the ``full`` model as the reference.
* **same start**: every method starts from the supernet's trained weights; the peers prune
  its widest config materialized as a plain network (``hwslim.core.materialize``).
* **same budget**: a peer's variants and targets are swept; per budget the candidate whose
  *measured* latency fits and that scores best on the search split (BN recalibrated on
  training images) is kept. (Per variant only the least pruned fitting candidate is scored:
  more pruning of the same variant only loses accuracy.) hwslim's budget is the same
  fraction of the full model's latency measured in the same run (at the table's level,
  ``hwslim.latency.verify.config_timer``), met with ``hwslim search --measure``: the table
  proposes, end-to-end times near each budget correct it (``fit_to_measured``).
  ``--hwslim-table-only``: the fraction of the table's predicted full latency, the table
  alone (how the earlier results were made).
* **same measurement**: every network (hwslim's configs materialized, the peers' pruned
  modules) is exported with ``hwslim.runtimes.onnx_file.export_onnx`` and timed with the
  table's ONNX Runtime profiler, all in the same interleaved rounds
  (``Profiler.time_onnx_many``); latencies are reported as ratios to the full model timed
  in those rounds.
* **same training**: every finalist and the full model are finetuned with the same recipe
  (``hwslim finetune``'s defaults: SGD Nesterov, LR 0.01 x batch/128, cosine, no warm-up),
  epochs, seeds, data and distillation from the supernet's widest config: hwslim's configs
  (and uniform and full, which are configs of the supernet too) with ``hwslim finetune``
  itself, the peers' modules with the same ``EpochLoop`` and the same loss
  (:class:`PlainFinetune`).
* **scoring**: top-1 on the test images (all 10,000 by default) with its standard error,
  paired tests (per-image differences) of hwslim against the best peer, and the training
  compute in its own columns (the supernet's epochs, which every method's start cost, and
  the finetuning epochs x images).

Run from the repository root (needs ``pip install 'hwslim[peers]'``)::

    python benchmarks/peers.py --quick          # smoke test: about 100 s at load 5 on the 2-core CPU
    python benchmarks/peers.py                  # both networks, 1 epoch on 5,000 images: about 2 hours (*)
    python benchmarks/peers.py --reduced        # the run in docs/peers.md: ResNet-20 only, 39 minutes
    python benchmarks/peers.py --train-images 0 --epochs 5 --seeds 0 1 2   # the full protocol (a GPU)

(*) estimated from the reduced run (39 minutes for ResNet-20 on the 2-core CPU at load 5-10)
for a quiet 2-core CPU; MobileNetV2-CIFAR trains about 2.5x slower and has not been timed.

Results: a table per network and ``benchmarks/results/peers_<models>[_<tag>].csv``, every
row stamped with the machine, the load average and what was reduced.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

from benchmarks.common import print_table, write_csv
from hwslim.core.errors import TableError
from hwslim.core.materialize import materialize
from hwslim.core.slimmable import recalibrate_bn
from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.importing.data import build_data, search_split, validation_split
from hwslim.latency.table import LatencyTable
from hwslim.latency.verify import config_timer
from hwslim.runtimes.onnx_file import export_onnx
from hwslim.search.greedy import (
    CRITERIA,
    DEFAULT_CRITERION,
    Budget,
    SearchOptions,
    config_costs,
    greedy_search,
)
from hwslim.training import distributed
from hwslim.training.finetune import FinetuneConfig, load_teacher, prepare_teacher
from hwslim.training.loop import EpochLoop
from hwslim.training.train import open_data, soft_cross_entropy
from profilers import profiler_for_table

ASSETS = ROOT / "benchmarks" / "assets"
DATA = ROOT.parent.parent / "shared" / "data" / "cifar10"  # /work/shared/data/cifar10 from a worktree
if not DATA.is_dir():
    DATA = ROOT.parent / "shared" / "data" / "cifar10"
TABLES = {"resnet20": "latency_tables/cpu-amd-epyc/resnet20-x1-32px-b1-ort-t1-float32.csv",
          "mobilenet_v2_cifar": "latency_tables/cpu-amd-epyc/mobilenet_v2_cifar-x1-32px-b1-ort-t1-float32.csv"}
PEERS_MISSING = ("the peers are not installed: pip install 'hwslim[peers]' (torch-pruning==1.6.1, "
                 "nvidia-modelopt==0.47.0; ModelOpt on CPU also needs requests huggingface_hub torchprofile==0.0.4)")
TP_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
MO_FLOPS = (40, 50, 60, 70, 80, 90)
FT_CALIB_IMAGES = 1000  # training images the finetuning teacher's BN statistics are estimated on (every method)


def peers_missing() -> str | None:
    """None when Torch-Pruning and ModelOpt import, else the one line saying how to install them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.prune  # noqa: F401
            import torch_pruning  # noqa: F401
    except ImportError:
        return PEERS_MISSING
    return None


@dataclass(frozen=True)
class Size:
    """What one run spends: the knobs ``--quick`` and the reduced runs turn down."""

    models: tuple[str, ...] = ("resnet20", "mobilenet_v2_cifar")
    fractions: tuple[float, ...] = (0.55, 0.65, 0.75)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 1
    train_images: int | None = 5_000  # finetuning images per epoch (class-balanced subset); None: the 45,000
    batch_size: int = 128
    test_images: int | None = None  # None: all 10,000
    search_images: int | None = None  # hwslim's search split images (None: as `hwslim search`)
    select_images: int = 2000  # search-split images that pick a peer's best candidate
    calib_images: int = 500  # training images for BN recalibration before that scoring
    score_images: int = 500  # search-split images ModelOpt's own search scores with
    tp_ratios: tuple[float, ...] = TP_RATIOS
    mo_flops: tuple[int, ...] = MO_FLOPS
    mo_divisors: tuple[int, ...] = (8, 16)
    rounds: int = 24  # interleaved timing rounds of the final measurement

    def reduced(self) -> str:
        """What this run leaves out of the full protocol (CSV column and report)."""
        full = Size(train_images=None, seeds=(0, 1, 2))
        notes = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(full, k)]
        return "; ".join(notes) or "none"


QUICK = Size(models=("resnet20",), fractions=(0.65,), epochs=1, train_images=128, batch_size=64, test_images=200,
             search_images=40, select_images=100, calib_images=64, score_images=32, tp_ratios=(0.3,),
             mo_flops=(60,), mo_divisors=(8,), rounds=2)

# the run reported in docs/peers.md: about 45 minutes on the loaded 2-core CPU
REDUCED = Size(models=("resnet20",), epochs=1, train_images=4000, search_images=1000, select_images=1000,
               calib_images=250, score_images=250, mo_flops=(50, 60, 70, 80))


# -- shared pieces: data, scoring ---------------------------------------------------------------
def bench_checkpoints(model: str, size: Size, out: Path, data: Path):
    """(the supernet with its data at ``data`` for the search, the path of the one finetuning reads).

    The finetuning checkpoint records ``train_images`` class-balanced training images (seed 0,
    nothing held out) as its data when the run is reduced: ``hwslim finetune`` and
    :class:`PlainFinetune` then read the same subset."""
    ckpt = load_checkpoint(ASSETS / f"cifar10_{model}_x1.pt")
    net = ckpt.model.float()
    search_data = {**ckpt.data, "root": str(data), "spec": str(data)}
    search_ckpt = replace(ckpt, data=search_data)
    ft_data = search_data
    if size.train_images is not None:
        ft_data = build_data(str(data), net.input_size, search_size=0, seed=0, train_subset=size.train_images).info
    path = out / model / "supernet.pt"
    save_checkpoint(path, net, data=ft_data, train_args={**ckpt.train_args, "data": str(data)}, epoch=ckpt.epoch)
    return search_ckpt, path


def plain_correct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Per-image correctness (bool) of ``module`` in eval mode."""
    module.eval()
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(y), batch)])


def recalibrated_top1(module: nn.Module, x: torch.Tensor, y: torch.Tensor, calib: torch.Tensor) -> float:
    """Top-1 on (x, y) after BN recalibration on ``calib`` (a copy: ``module`` is untouched)."""
    m = copy.deepcopy(module)
    recalibrate_bn(m, (calib[i:i + 250] for i in range(0, len(calib), 250)))
    return float(plain_correct(m, x, y).float().mean())


# -- the peers -----------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One network a method proposes: its module, how it was made, and later its measurements."""

    method: str
    variant: str
    target: float  # the knob swept: pruning ratio, FLOPs %, or uniform width step
    module: nn.Module
    config: Any = None  # a ChannelConfig where the network is a config of the supernet
    measured_ms: float = float("nan")
    select_top1: float | None = None


def torch_pruning_candidates(full: nn.Module, size: Size, x: torch.Tensor) -> list[Candidate]:
    """Torch-Pruning's ``BasePruner``, one-shot, for every variant and ratio (the classifier kept whole)."""
    import torch_pruning as tp

    out = []
    for imp_name in ("magnitude", "group-norm"):
        for round_to in (8, 16):
            for glob in (False, True):
                for ratio in size.tp_ratios:
                    m = copy.deepcopy(full).eval()
                    imp = tp.importance.MagnitudeImportance(p=2) if imp_name == "magnitude" \
                        else tp.importance.GroupMagnitudeImportance(p=2)
                    ignored = [layer for layer in m.modules() if isinstance(layer, nn.Linear)]
                    tp.pruner.BasePruner(m, x, importance=imp, pruning_ratio=ratio, global_pruning=glob,
                                         round_to=round_to, ignored_layers=ignored).step()
                    variant = f"{imp_name} round_to={round_to} {'global' if glob else 'local'}"
                    out.append(Candidate("torch-pruning", variant, ratio, m))
    return out


def modelopt_candidates(full: nn.Module, size: Size, x: torch.Tensor, calib: torch.Tensor,
                        score: tuple[torch.Tensor, torch.Tensor], work: Path) -> list[Candidate]:
    """ModelOpt FastNAS (``mtp.prune``) per divisor and FLOPs target; its sensitivity pass runs once per
    divisor (the search checkpoint is shared by the targets)."""
    import modelopt.torch.prune as mtp

    loader = [calib[i:i + 64] for i in range(0, len(calib), 64)]
    out = []
    for div in size.mo_divisors:
        mode = [("fastnas", {"nn.Conv2d": {"*": {"channel_divisor": div}},
                             "nn.BatchNorm2d": {"*": {"feature_divisor": div}}})]
        for flops in size.mo_flops:
            m = copy.deepcopy(full)
            cfg = {"data_loader": loader, "collect_func": lambda b: b, "checkpoint": str(work / f"fastnas_d{div}.pth"),
                   "score_func": lambda mod: float(plain_correct(mod, *score).float().mean()), "verbose": False}
            try:
                with _quiet():
                    sub, _ = mtp.prune(m, mode=mode, constraints={"flops": f"{flops}%"}, dummy_input=x, config=cfg)
            except ValueError:  # "NOT all constraints can be satisfied within the search space"
                print(f"modelopt: FLOPs {flops}% is out of reach with divisor {div}", flush=True)
                continue
            out.append(Candidate("modelopt", f"fastnas divisor={div}", flops, sub))
    return out


class _quiet:
    """Silence a peer's prints and warnings (ModelOpt prints its search)."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._out = open(os.devnull, "w")
        self._saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self._out

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        self._out.close()
        self._w.__exit__(*exc)


# -- measurement ---------------------------------------------------------------------------------
def latency_table(model: str, net, work: Path, quick: bool, table_path: Path | None = None
                  ) -> tuple[LatencyTable, str]:
    """The committed ORT table of this CPU if it matches this machine, else one profiled here (about a
    minute); ``quick`` (a smoke test) takes the committed one whatever the machine."""
    if table_path is not None:
        return LatencyTable.load(table_path), str(table_path)
    table = LatencyTable.load(ROOT / TABLES[model])
    try:
        table.check_compatible(net, batch=1, force=quick)
        return table, f"committed {TABLES[model]}"
    except TableError as e:
        print(f"{TABLES[model]} does not match this machine ({str(e).split(';')[0].split(' with ')[-1]}): "
              "profiling a table here", flush=True)
    path = work / "table.csv"
    cmd = [sys.executable, "-m", "hwslim", "profile", "--model", model, "--input-size", str(net.input_size),
           "--threads", "1", "--out", str(path), "--force"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return LatencyTable.load(path), "profiled here (hwslim profile --threads 1)"


# -- measurement ------------------------------------------------------------------------------
def measure(prof, modules: list[nn.Module], shape: tuple[int, ...], rounds: int, work: Path) -> list[float]:
    """Median ms of each module, exported the same way and timed in the same interleaved rounds."""
    paths = []
    for i, m in enumerate(modules):
        with _quiet():
            paths.append((export_onnx(m.eval(), work / f"m{i}.onnx"), shape))
    timings = prof.time_onnx_many(paths, rounds=rounds)
    for p, _ in paths:
        p.unlink()
    return [t.median_ms for t in timings]


def select(cands: list[Candidate], budget_ms: float, top1: Callable[[nn.Module], float]) -> Candidate | None:
    """The most accurate candidate on the search split among those whose measured latency fits;
    per variant only the least pruned fitting one is scored."""
    best: dict[str, Candidate] = {}
    for c in cands:
        if c.measured_ms <= budget_ms and (c.variant not in best or c.measured_ms > best[c.variant].measured_ms):
            best[c.variant] = c
    for c in best.values():
        if c.select_top1 is None:
            c.select_top1 = top1(c.module)
    return max(best.values(), key=lambda c: c.select_top1, default=None)


# -- training ---------------------------------------------------------------------------------
def finetune_recipe(ckpt_path: Path, size: Size, seed: int, out: Path) -> FinetuneConfig:
    """The FinetuneConfig of a peer's training: ``hwslim finetune``'s, with its defaults."""
    return FinetuneConfig(checkpoint=str(ckpt_path), config="-", epochs=size.epochs, out=str(out), seed=seed,
                          batch_size=size.batch_size, device="cpu", progress=False, force=True,
                          calib_images=FT_CALIB_IMAGES)


def hwslim_finetune(ckpt_path: Path, config, size: Size, seed: int, out: Path, threads: int) -> nn.Module:
    """``hwslim finetune`` (the CLI) of ``config``; returns the finetuned network, materialized."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    config.save(cfg_path)
    cmd = [sys.executable, "-m", "hwslim", "finetune", "--checkpoint", str(ckpt_path), "--config", str(cfg_path),
           "--epochs", str(size.epochs), "--out", str(out / "run"), "--seed", str(seed), "--batch-size",
           str(size.batch_size), "--device", "cpu", "--threads", str(threads), "--eval-images", "100",
           "--calib-images", str(FT_CALIB_IMAGES), "--no-progress", "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"hwslim finetune failed:\n{proc.stderr[-3000:]}")
    model = load_checkpoint(out / "run" / "checkpoint.pt").model.float()
    return materialize(model, config).eval()


def plain_finetune(ckpt_path: Path, module: nn.Module, size: Size, seed: int, out: Path) -> nn.Module:
    """A peer's pruned module finetuned as ``hwslim finetune`` trains a config (:class:`PlainFinetune`)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = finetune_recipe(ckpt_path, size, seed, out).resolved(ckpt.model.input_size)
    world = distributed.setup("cpu")
    try:
        data = open_data(ckpt.train_args["data"], ckpt.model.input_size, world,
                         search_size=len(ckpt.data["search_indices"]), seed=int(ckpt.data.get("search_seed", 0)),
                         workers=cfg.workers, num_val=None, train_subset=ckpt.data.get("train_subset"))
        teacher, _ = load_teacher(cfg, ckpt.model.float())
        out.mkdir(parents=True, exist_ok=True)
        loop = PlainFinetune(world, lambda line: None, out)
        loop.teacher = teacher
        loop.setup_optimization(copy.deepcopy(module), cfg, data, None)
        prepare_teacher(teacher, data, cfg, "cpu")  # as hwslim finetune does: the same teacher for every method
        loop.run_epochs(cfg.epochs, loop.args())
        return loop.net.eval()
    finally:
        distributed.teardown(world)


class PlainFinetune(EpochLoop):
    """``hwslim finetune``'s step (distillation from the supernet's widest config) for any plain module."""

    teacher: nn.Module

    def batch_step(self, x: torch.Tensor, y: torch.Tensor, step: int, rng) -> dict[str, Any]:
        self.opt.zero_grad(set_to_none=True)
        out = self.ddp(x).float()
        with torch.no_grad():
            target = F.softmax(self.teacher(x).float(), dim=1)
        loss = soft_cross_entropy(out, target)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": loss.detach(), "correct": (out.detach().argmax(1) == y).sum()}

    def save(self, epoch: int, args: dict[str, Any]) -> None:  # the benchmark keeps the module in memory
        pass


# -- one network ---------------------------------------------------------------------------------
def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean difference in points, its standard error) of per-image correctness a - b."""
    d = a.float() - b.float()
    return 100 * float(d.mean()), 100 * float(d.std() / len(d) ** 0.5)


PEERS = ("torch-pruning", "modelopt", "uniform")


def peer_candidates(net, full: nn.Module, methods: tuple[str, ...], size: Size, calib: torch.Tensor, search_ckpt,
                    work: Path, log) -> tuple[list[Candidate], dict[str, float]]:
    """Every candidate network of the peers in ``methods`` and each method's wall time."""
    x1 = torch.randn(1, 3, net.input_size, net.input_size)
    makers = {"torch-pruning": lambda: torch_pruning_candidates(full, size, x1),
              "modelopt": lambda: modelopt_candidates(full, size, x1, calib,
                                                      search_split(search_ckpt, max_images=size.score_images), work),
              "uniform": lambda: [Candidate("uniform", "uniform", i + 1, materialize(net, u).eval(), u)
                                  for i, u in enumerate(net.uniform_configs()[:-1])]}
    cands, timings = [], {}
    for method in methods:
        if method in makers:
            ts = time.time()
            made = makers[method]()
            timings[method] = time.time() - ts
            log(f"{method}: {len(made)} candidates in {timings[method]:.0f} s")
            cands += made
    return cands, timings


def run_model(model: str, size: Size, args, out: Path) -> list[dict]:
    """Every method's pick per budget for ``model``, finetuned per seed and scored: the result rows."""
    t0 = time.time()
    work = out / model
    work.mkdir(parents=True, exist_ok=True)
    search_ckpt, ft_path = bench_checkpoints(model, size, out, args.data)
    net = search_ckpt.model.float().eval()
    shape = (1, 3, net.input_size, net.input_size)
    full = materialize(net, net.full_config()).eval()
    table, table_note = latency_table(model, net, work, args.quick, args.table)
    xs, ys = search_split(search_ckpt, max_images=size.select_images)
    calib = build_data(str(args.data), net.input_size, search_size=0, seed=1,
                       train_subset=size.calib_images).calibration_images(size.calib_images)
    log = lambda msg: print(f"[{model} {time.time() - t0:5.0f} s] {msg}", flush=True)

    cands, timings = peer_candidates(net, full, args.methods, size, calib, search_ckpt, work, log)
    with profiler_for_table(table) as prof:
        ms = measure(prof, [full] + [c.module for c in cands], shape, max(4, size.rounds // 2), work)
    full_ms0 = ms[0]
    for c, m in zip(cands, ms[1:]):
        c.measured_ms = m
    log(f"measured {len(ms)} networks (full {full_ms0:.3f} ms)")

    # hwslim: each budget the fraction of the full model's latency, measured at the table's level (--measure)
    # or, --hwslim-table-only, predicted by the table
    ts = time.time()
    timer = None if args.hwslim_table_only else config_timer(table, net)
    full_level = config_costs(net, net.full_config(), table)["latency_ms"] if timer is None else \
        timer([net.full_config()])[0]
    budgets = [Budget("latency_ms", round(f * full_level, 4)) for f in size.fractions]
    res = greedy_search(search_ckpt, budgets, SearchOptions(out_dir=work / "search", force=True, progress=False,
                                                           plot=False, max_images=size.search_images,
                                                           criterion=args.criterion, force_table=args.quick,
                                                           measure=timer),
                        table=table, log=log if timer is not None else lambda m: None)
    timings["hwslim"] = time.time() - ts
    log(f"hwslim search{'' if timer is None else ' --measure'}: {len(res.steps) - 1} steps in "
        f"{timings['hwslim']:.0f} s; budgets {[b.value for b in budgets]} ms at the table's level "
        f"(full model {'predicted' if timer is None else 'measured'} {full_level:.4g} ms)")
    variant = f"latency/{args.criterion}" + ("" if timer is None else " measured")

    # per budget: each method's pick
    def top1(m):
        return recalibrated_top1(m, xs, ys, calib)

    picks: list[tuple[float, Candidate]] = []
    for f, cfg in zip(size.fractions, res.configs):
        picks.append((f, Candidate("hwslim", variant, f, materialize(net, cfg).eval(), cfg)))
        for method in PEERS:
            if method not in args.methods:
                continue
            c = select([c for c in cands if c.method == method], f * full_ms0, top1)
            if c is None:
                log(f"{method}: nothing within {f:.0%} of the full latency")
            else:
                picks.append((f, c))
    for _, c in picks:
        if c.select_top1 is None:
            c.select_top1 = top1(c.module)
    # the final measurement: every pick and the full model in the same rounds
    with profiler_for_table(table) as prof:
        ms = measure(prof, [full] + [c.module for _, c in picks], shape, size.rounds, work)
    full_ms = ms[0]
    for (_, c), m in zip(picks, ms[1:]):
        c.measured_ms = m
    log(f"final measurement: full {full_ms:.3f} ms; picks {[f'{m / full_ms:.2f}' for m in ms[1:]]}")

    # finetuning, every seed, the same recipe; scoring on the test images
    xv, yv = validation_split(search_ckpt, max_images=size.test_images)
    rows = []
    sup_epochs = int(search_ckpt.train_args.get("epochs", 0))
    for seed in size.seeds:
        ts = time.time()
        ft = hwslim_finetune(ft_path, net.full_config(), size, seed, work / f"ft_s{seed}" / "full", args.threads)
        ref = plain_correct(ft, xv, yv)
        correct: dict[tuple[float, str], torch.Tensor] = {}
        for f, c in picks:
            d = work / f"ft_s{seed}" / f"{c.method}_{f:.2f}"
            if c.config is not None:
                trained = hwslim_finetune(ft_path, c.config, size, seed, d, args.threads)
            else:
                trained = plain_finetune(ft_path, c.module, size, seed, d)
            correct[(f, c.method)] = plain_correct(trained, xv, yv)
        torch.save({"labels": yv, "full": ref, **{f"{k[1]}@{k[0]}": v for k, v in correct.items()}},
                   work / f"correct_s{seed}.pt")  # per-image results: paired tests against another run
        log(f"seed {seed}: {len(picks) + 1} networks finetuned and scored in {time.time() - ts:.0f} s")
        rows += result_rows(model, seed, picks, correct, ref, full_ms, size, sup_epochs, timings, len(yv))
    return [{**r, "table": table_note} for r in rows]


def result_rows(model: str, seed: int, picks, correct, ref, full_ms: float, size: Size, sup_epochs: int,
                timings: dict[str, float], n: int) -> list[dict]:
    """One row per (budget, method) and one for the full model; hwslim's paired difference to each."""
    ft_images = size.train_images or 45_000

    def row(f, method, variant, target, ms, sel, c):
        acc = float(c.float().mean())
        return {"model": model, "seed": seed, "budget": f, "method": method, "variant": variant, "target": target,
                "measured_ms": round(ms, 4), "latency_ratio": round(ms / full_ms, 4),
                "select_top1": None if sel is None else round(100 * sel, 2),
                "test_top1": round(100 * acc, 2), "test_se": round(100 * (acc * (1 - acc) / n) ** 0.5, 2),
                "test_images": n, "supernet_epochs": sup_epochs, "finetune_epochs": size.epochs,
                "finetune_images": ft_images, "search_s": round(timings.get(method, 0.0), 1),
                "hwslim_minus": "", "paired_se": ""}  # vs hwslim: filled for the other methods

    rows = [row(1.0, "full", "", "", full_ms, None, ref)]
    for f, c in picks:
        r = row(f, c.method, c.variant, c.target, c.measured_ms, c.select_top1, correct[(f, c.method)])
        if c.method != "hwslim" and (f, "hwslim") in correct:
            r["hwslim_minus"], r["paired_se"] = (round(v, 2) for v in paired(correct[(f, "hwslim")],
                                                                              correct[(f, c.method)]))
        rows.append(r)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, budget, method): the seeds' mean top-1, and hwslim's margin over the best peer."""
    out = []
    keys = sorted({(r["model"], r["budget"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "hwslim"))
    for model, b, method in keys:
        rs = [r for r in rows if (r["model"], r["budget"], r["method"]) == (model, b, method)]

        def mean(k: str, rs: list[dict] = rs) -> float:
            return round(sum(r[k] for r in rs) / len(rs), 3)

        out.append({"model": model, "budget": b, "method": method, "variant": rs[0]["variant"],
                    "latency_ratio": mean("latency_ratio"), "top1": mean("test_top1"),
                    "se": round(mean("test_se") / len(rs) ** 0.5, 2),
                    "hwslim_minus": mean("hwslim_minus") if rs[0]["hwslim_minus"] != "" else "",
                    "paired_se": round(mean("paired_se") / len(rs) ** 0.5, 2) if rs[0]["paired_se"] != "" else "",
                    "compute": f"{rs[0]['supernet_epochs']} sn ep + {rs[0]['finetune_epochs']} x "
                               f"{rs[0]['finetune_images']:,} img"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: ResNet-20, one budget, tiny subsets, the committed table forced (about 100 s at load 5)")
    ap.add_argument("--reduced", action="store_true",
                    help="the reported CPU run: ResNet-20, 1 seed, 1 epoch on 4,000 images (about 45 minutes)")
    ap.add_argument("--models", nargs="+", choices=list(TABLES))
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--train-images", type=int, help="finetuning images per epoch (0: all 45,000)")
    ap.add_argument("--test-images", type=int)
    ap.add_argument("--search-images", type=int, help="search-split images hwslim's search scores on (0: all)")
    ap.add_argument("--methods", nargs="+", default=("hwslim",) + PEERS, choices=("hwslim",) + PEERS,
                    help="hwslim and the full model always run")
    ap.add_argument("--mo-divisors", type=int, nargs="+", help="ModelOpt FastNAS channel divisors (default 8 16)")
    ap.add_argument("--criterion", default=DEFAULT_CRITERION, choices=CRITERIA, help="hwslim's greedy rule")
    ap.add_argument("--hwslim-table-only", action="store_true",
                    help="hwslim's budgets as fractions of the table's predicted full latency, met on the table "
                         "alone (the earlier results); default: fractions of the full model's measured latency, "
                         "met with hwslim search --measure")
    ap.add_argument("--table", type=Path, help="the latency table (one model; default: the committed one if it "
                                               "matches this machine, else one profiled here)")
    ap.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 as an ImageFolder tree")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (1: fastest on the loaded 2-core machine)")
    ap.add_argument("--out", type=Path, default=Path("runs/peers"))
    ap.add_argument("--tag", default="", help="added to the result file's name")
    ap.add_argument("--no-write", action="store_true", help="print only (the --quick test)")
    args = ap.parse_args()
    missing = peers_missing()
    if missing:
        print(missing)
        raise SystemExit(2)
    size = QUICK if args.quick else REDUCED if args.reduced else Size()
    given = {"models": args.models and tuple(args.models), "seeds": args.seeds and tuple(args.seeds),
             "epochs": args.epochs, "test_images": args.test_images}
    size = replace(size, **{k: v for k, v in given.items() if v is not None})
    if args.search_images is not None:
        size = replace(size, search_images=args.search_images or None)
    if args.mo_divisors:
        size = replace(size, mo_divisors=tuple(args.mo_divisors))
    if args.train_images is not None:
        size = replace(size, train_images=args.train_images or None)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    print(f"peers: {', '.join(size.models)}; budgets {size.fractions} of the full model's measured latency; "
          f"finetuning {size.epochs} epoch(s) on {size.train_images or 45_000:,} training images, seeds "
          f"{size.seeds}; test images: {size.test_images or 'all 10,000'}; reduced: {size.reduced()}", flush=True)
    t0 = time.time()
    rows = []
    for model in size.models:
        rows += run_model(model, size, args, args.out)
    load = f"{load_before:.1f}->{os.getloadavg()[0]:.1f}"
    summ = summary(rows)
    print()
    print_table(summ, ["model", "budget", "method", "variant", "latency_ratio", "top1", "se", "hwslim_minus",
                       "paired_se", "compute"])
    print(f"\n{time.time() - t0:.0f} s in all; load average (1 min) {load}; {torch.get_num_threads()} thread(s)")
    if not args.no_write:
        extra = {"threads": args.threads, "load_avg_1min": load, "reduced": size.reduced(),
                 "wall_s": round(time.time() - t0)}
        name = "peers_" + "_".join(size.models) + (f"_{args.tag}" if args.tag else "")
        print(f"written to {write_csv([{**r, **extra} for r in rows], name)}")
        write_csv([{**r, **extra} for r in summ], name + "_summary")


if __name__ == "__main__":
    main()
