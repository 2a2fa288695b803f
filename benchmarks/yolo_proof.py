"""Proof on a detector (issue 29, item 5): YOLOv8n through hwslim's own-training-loop API.

1. **Data**: :mod:`benchmarks.shapes_det`, filled shapes (4 classes) on textured
   backgrounds at 160 px, generated here, deterministic by seed: a train split, a search
   split (the search's ``score_fn``) and a held-out val split (the reported mAP).
2. **Supernet**: Ultralytics' YOLOv8n (``yolov8n.yaml``, 4 classes, random weights) imported
   with its raw head (``hwslim.import_model(..., outputs="raw")``: three per-level maps),
   trained with ``hwslim.sandwich_step`` and Ultralytics' own loss (``v8DetectionLoss`` fed
   the raw maps in the format ``Detect`` returns in training).
3. **mAP@0.5**: the raw maps decoded by Ultralytics' own ``Detect`` decode (DFL, anchors,
   ``dist2bbox``) and ``non_max_suppression``, scored by torchmetrics'
   ``MeanAveragePrecision(iou_thresholds=[0.5])``.
4. **Latency**: an ONNX Runtime table of the supernet on this CPU (1 thread, ``hwslim.latency.
   profile``; resumable and kept in ``--work``, so a rerun reuses it); the greedy search
   (``hwslim.search_configs``, ``score_fn`` = search-split mAP@0.5) at three fractions of the
   full model's predicted latency; every searched config, the full model and the 12 uniform
   widths measured end to end in the same interleaved ONNX Runtime rounds
   (``Profiler.time_onnx_many``); each searched config is compared with the uniform config
   whose *measured* latency is the closest at or below its own. Every config's BN statistics
   are recalibrated on training images before it is scored; the exported ONNX model of each
   searched config is checked against PyTorch (per output).

Needs ``pip install ultralytics torchmetrics pycocotools`` (optional extras of this script
only). Run from the repository root::

    python benchmarks/yolo_proof.py --quick      # smoke run, under 2 minutes
    python benchmarks/yolo_proof.py              # the run in docs/own_model.md

Writes ``benchmarks/results/yolo_proof.csv`` (``--quick``: nothing unless ``--write``),
stamped with the machine and the load average.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

import hwslim  # noqa: E402
from benchmarks.common import print_table, write_csv  # noqa: E402
from benchmarks.shapes_det import CLASSES, make_split  # noqa: E402
from hwslim.core.config import ChannelConfig  # noqa: E402
from hwslim.training.loop import param_groups  # noqa: E402


def missing() -> str | None:
    """Why this script cannot run here (an optional extra is missing), or None."""
    for mod, pkg in (("ultralytics", "ultralytics"), ("torchmetrics", "torchmetrics"), ("pycocotools", "pycocotools")):
        try:
            __import__(mod)
        except ImportError:
            return f"{pkg} is not installed (pip install ultralytics torchmetrics pycocotools)"
    return None


# -- data -------------------------------------------------------------------------------------------
def batches(images: torch.Tensor, targets: list[dict], batch: int, shuffle: torch.Generator | None = None
            ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], list[dict]]]:
    """``(images float [0, 1], Ultralytics' batch dict, torchmetrics targets)`` batches. The dict is
    what ``v8DetectionLoss`` reads: ``batch_idx``, ``cls`` (n, 1), ``bboxes`` (n, 4) normalized xywh."""
    order = torch.randperm(len(images), generator=shuffle) if shuffle is not None else torch.arange(len(images))
    size = images.shape[-1]
    out = []
    for s in range(0, len(order), batch):
        idx = order[s:s + batch].tolist()
        tg = [targets[i] for i in idx]
        boxes = torch.cat([t["boxes"] for t in tg])
        xywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / size
        d = {"batch_idx": torch.cat([torch.full((len(t["labels"]),), j, dtype=torch.float32) for j, t in enumerate(tg)]),
             "cls": torch.cat([t["labels"] for t in tg]).float()[:, None], "bboxes": xywh}
        out.append((images[idx].float() / 255, d, tg))
    return out


# -- the model, its loss and its decode -------------------------------------------------------------
def build_yolo(nc: int, seed: int) -> torch.nn.Module:
    """YOLOv8n with ``nc`` classes, random weights (no download), its loss hyperparameters set."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.args = get_cfg()  # Ultralytics' defaults: box 7.5, cls 0.5, dfl 1.5 (the trainer sets these)
    return model


def head_dict(maps: Sequence[torch.Tensor], reg_max: int, nc: int) -> dict[str, Any]:
    """The raw per-level maps (box channels, then class channels) in the format ``Detect``
    returns during training: ``{"boxes": (b, 4*reg_max, A), "scores": (b, nc, A), "feats": maps}``."""
    b = maps[0].shape[0]
    return {"boxes": torch.cat([m[:, :4 * reg_max].reshape(b, 4 * reg_max, -1) for m in maps], -1),
            "scores": torch.cat([m[:, 4 * reg_max:].reshape(b, nc, -1) for m in maps], -1),
            "feats": list(maps)}


class YoloTask:
    """Ultralytics' loss and decode around the imported supernet's raw maps."""

    def __init__(self, model: torch.nn.Module) -> None:
        from ultralytics.utils.loss import v8DetectionLoss

        self.detect = copy.deepcopy(model.model[-1]).eval()  # its DFL conv, strides and anchors decode
        self.nc, self.reg_max = self.detect.nc, self.detect.reg_max
        self.criterion = v8DetectionLoss(model)

    def loss(self, maps, batch) -> torch.Tensor:
        """Ultralytics' detection loss (box, cls, DFL, gains applied, times the batch size), summed
        as its trainer does."""
        loss, _ = self.criterion(head_dict(maps, self.reg_max, self.nc), batch[1])
        return loss.sum()

    @torch.no_grad()
    def predict(self, maps) -> list[torch.Tensor]:
        """Per image ``(n, 6)``: xyxy, confidence, class, after Ultralytics' decode and NMS."""
        from ultralytics.utils.nms import non_max_suppression

        decoded = self.detect._inference(head_dict(maps, self.reg_max, self.nc))
        return non_max_suppression(decoded, conf_thres=0.001, iou_thres=0.7, max_det=100)

    @torch.no_grad()
    def map50(self, model, data) -> float:
        """mAP@0.5 (torchmetrics) of ``model`` on ``data`` (:func:`batches`), in percent."""
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_thresholds=[0.5])
        for x, _, tg in data:
            preds = [{"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5].long()} for p in self.predict(model(x))]
            metric.update(preds, tg)
        return 100 * float(metric.compute()["map"])


# -- training ---------------------------------------------------------------------------------------
def train(supernet, task: YoloTask, images, targets, args, monitor=None) -> list[dict]:
    """The sandwich rule with Ultralytics' loss and its recipe for a small run: AdamW at
    0.002 * 5 / (4 + nc), the summed gradients' norm clipped at 10 (``sandwich_step(clip_grad_norm=10)``),
    a linear warm-up over at least 100 steps, then cosine; one row per epoch. The supernet trains
    in train mode (the first default run trained it in the eval mode ``import_model`` returns:
    BN kept its initial statistics, the loss stalled at 8.5 per image and mAP@0.5 was 0).
    ``monitor(supernet)``: the full model's val mAP@0.5 after each epoch (BN recalibrated on a
    copy), printed so that a run shows whether it learns."""
    opt = torch.optim.AdamW(param_groups(supernet, 5e-4), lr=args.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * math.ceil(len(images) / args.batch)
    warm = max(1, min(100, steps // 3), int(0.1 * steps))  # Ultralytics warms up over at least 100 steps
    step, rows = 0, []
    for epoch in range(args.epochs):
        supernet.train()  # import_model returns it in eval mode: BN would keep its initial statistics
        t0, sums = time.time(), [0.0, 0.0]
        data = batches(images, targets, args.batch, gen)
        for batch in data:
            f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            for g in opt.param_groups:
                g["lr"] = args.lr * f
            r = hwslim.sandwich_step(supernet, batch, task.loss, opt, num_random=args.num_random,
                                     distill=args.distill, clip_grad_norm=10.0)
            sums[0] += float(r.widest) / len(batch[0])
            sums[1] += float(r.narrowest) / len(batch[0])
            step += 1
            if step % 25 == 0:
                print(f"  step {step}/{steps}: loss per image widest {float(r.widest) / len(batch[0]):.2f}, "
                      f"narrowest {float(r.narrowest) / len(batch[0]):.2f}", file=sys.stderr, flush=True)
        rows.append({"epoch": epoch + 1, "loss_widest": sums[0] / len(data), "loss_narrowest": sums[1] / len(data),
                     "s": time.time() - t0, "map50_full": monitor(supernet) if monitor is not None else float("nan")})
        print(f"epoch {epoch + 1}/{args.epochs}: loss per image widest {rows[-1]['loss_widest']:.3f}, narrowest "
              f"{rows[-1]['loss_narrowest']:.3f} ({rows[-1]['s']:.0f} s); full model's mAP@0.5 on "
              f"{args.monitor} val images {rows[-1]['map50_full']:.1f}", flush=True)
    return rows


# -- latency ----------------------------------------------------------------------------------------
def latency_table(supernet, args):
    """The ONNX Runtime table of the supernet's shapes (1 thread): profiled into ``--work`` once,
    reused afterwards (entries are keyed by layer shape, so the weights do not matter)."""
    from hwslim.latency.profile import ProfileSettings, profile
    from hwslim.latency.table import LatencyTable

    work = Path(args.work)
    ckpt = work / f"shapes_d{args.divisor}_{args.size}.pt"  # a fixed path: the table's setting names it
    out = work / "table" / f"v8n_{args.size}_d{args.divisor}{'_quick' if args.quick else ''}.csv"
    if not ckpt.exists():
        hwslim.save(supernet, ckpt)
    t0 = time.time()
    settings = ProfileSettings(model=str(ckpt), input_size=args.size, threads=1, out=str(out), quick=True,
                               contexts=1, calib_configs=8 if not args.quick else 3,
                               holdout_configs=8 if not args.quick else 0)
    profile(settings, progress=False, log=lambda m: print(m, file=sys.stderr))
    print(f"latency table {out}: {time.time() - t0:.0f} s", flush=True)
    return LatencyTable.load(out), out


def measure(table, supernet, configs: list[ChannelConfig], size: int, rounds: int | None) -> list[float]:
    """Median end-to-end ms of each config's exported ONNX model, all timed in the same interleaved rounds."""
    from hwslim.latency.profile import measure_configs
    from profilers import profiler_for_table

    with profiler_for_table(table) as profiler:
        return [t.median_ms for t in measure_configs(profiler, supernet, configs, input_size=size, rounds=rounds)]


# -- evaluation and export --------------------------------------------------------------------------
def evaluate(net, task: YoloTask, cfg: ChannelConfig, calib, val) -> float:
    """mAP@0.5 on ``val`` at ``cfg`` after recalibrating BN on ``calib`` (``net`` is a copy of the supernet)."""
    hwslim.recalibrate_bn(net, calib, cfg)
    with net.using(cfg):
        return task.map50(net.eval(), val)


def export_and_check(supernet, cfg: ChannelConfig, path: Path, calib) -> str:
    """Export ``cfg`` (BN recalibrated on ``calib``) with ``hwslim.export_model``, which checks every
    output against PyTorch; returns the worst output's ONNX Runtime relative error."""
    res = hwslim.export_model(supernet, cfg, path, calib=calib, force=True)
    return f"{res.max_rel_error:.1e}"


def uniform_match(measured_ms: float, uniform: list[tuple[ChannelConfig, float]]) -> tuple[ChannelConfig, float] | None:
    """The uniform config whose measured latency is the closest to ``measured_ms`` without exceeding it."""
    fitting = [(c, ms) for c, ms in uniform if ms <= measured_ms]
    return max(fitting, key=lambda t: t[1]) if fitting else None


def short(cfg: ChannelConfig, supernet) -> str:
    """A config in a line: its mean width fraction over the units."""
    full = supernet.full_config().widths
    return f"{sum(cfg.widths[u] / full[u] for u in full) / len(full):.2f} mean width"


# -- the run ----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000, help="training images")
    ap.add_argument("--search", type=int, default=24, help="search-split images (the search's score_fn)")
    ap.add_argument("--val", type=int, default=300, help="held-out val images (the reported mAP)")
    ap.add_argument("--monitor", type=int, default=100,
                    help="the first val images on which the full model's mAP is printed after each epoch")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--classes", type=int, default=len(CLASSES), choices=range(1, len(CLASSES) + 1))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.25e-3,
                    help="AdamW peak learning rate (Ultralytics' own choice for 4 classes: 0.002 * 5 / (4 + nc))")
    ap.add_argument("--num-random", type=int, default=1, help="random configs per sandwich step")
    ap.add_argument("--distill", action="store_true",
                    help="narrower configs learn the widest's raw maps (default distill loss, MSE) instead of the labels")
    ap.add_argument("--divisor", type=int, default=32,
                    help="channel divisor of the supernet's grid (16: finer uniform widths, but the search took over 22 minutes here)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7],
                    help="latency budgets, fractions of the full model's predicted latency")
    ap.add_argument("--calib", type=int, default=16, help="training images BN is recalibrated on per config")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: the profiler's)")
    ap.add_argument("--fill", action="store_true", help="spend each budget's slack after the walk (more evaluations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "yolo_proof"), help="checkpoint, table and ONNX files")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sets, 1 epoch, 1 budget (< 2 minutes)")
    ap.add_argument("--write", action="store_true", help="with --quick: write the CSV anyway (yolo_proof_quick.csv)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.search, args.val, args.size, args.epochs, args.batch = 64, 8, 16, 64, 1, 16
        args.budgets, args.calib, args.rounds, args.divisor, args.monitor = [0.9], 8, 2, 32, 16
    return args


def search(supernet, task, table, table_path, full_ms: float, search_data, calib, args) -> list[ChannelConfig]:
    """One greedy walk for every budget, each candidate scored by search-split mAP@0.5."""
    t0 = time.time()
    calls = [0]

    def score(model) -> float:
        calls[0] += 1
        return task.map50(model, search_data)

    configs = hwslim.search_configs(supernet, latency_ms=[round(f * full_ms, 3) for f in args.budgets],
                                    table=table_path, score_fn=score, calib=calib, fill=args.fill)
    print(f"search: {calls[0]} candidates scored in {time.time() - t0:.0f} s", flush=True)
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if (why := missing()) is not None:
        print(f"yolo_proof: {why}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t_start, load0 = time.time(), os.getloadavg()[0]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_set = make_split(args.train, args.size, args.seed, "train", args.classes)
    search_set = make_split(args.search, args.size, args.seed, "search", args.classes)
    val_set = make_split(args.val, args.size, args.seed, "val", args.classes)
    print(f"data: {args.train} train, {args.search} search, {args.val} val images at {args.size} px, "
          f"{args.classes} classes ({time.time() - t0:.0f} s)", flush=True)
    model = build_yolo(args.classes, args.seed)
    task = YoloTask(model)
    supernet = hwslim.import_model(model, torch.randn(1, 3, args.size, args.size), outputs="raw",
                                   divisor=args.divisor)
    table, table_path = latency_table(supernet, args)
    calib = [(x, d, tg) for x, d, tg in batches(*train_set, args.calib)[:1]]
    search_data, val = batches(*search_set, 64), batches(*val_set, 64)
    full = supernet.full_config()
    watch = batches(val_set[0][:args.monitor], val_set[1][:args.monitor], 64)
    t0 = time.time()
    epochs = train(supernet, task, *train_set, args,
                   monitor=lambda net: evaluate(copy.deepcopy(net), task, full, calib, watch))
    t_train = time.time() - t0  # the per-epoch monitoring included
    hwslim.save(supernet, Path(args.work) / "checkpoint.pt")
    full_ms = table.predict_ms(supernet.layer_specs(full, input_size=args.size))
    searched = search(supernet, task, table, table_path, full_ms, search_data, calib, args)
    t0 = time.time()
    uniform = supernet.uniform_configs()
    everything = [full, *searched, *uniform]
    ms = measure(table, supernet, everything, args.size, args.rounds)
    full_measured, searched_ms, uniform_ms = ms[0], ms[1:1 + len(searched)], list(zip(uniform, ms[1 + len(searched):]))
    print(f"measured {len(everything)} configs interleaved ({time.time() - t0:.0f} s)", flush=True)
    evalnet = copy.deepcopy(supernet)
    rows = [row("full", "", full, supernet, table, full_measured, full_measured,
                evaluate(evalnet, task, full, calib, val), args)]
    for frac, cfg, m in zip(args.budgets, searched, searched_ms):
        parity = export_and_check(supernet, cfg, Path(args.work) / f"hwslim_{frac:.2f}.onnx", calib)
        rows.append(row("hwslim", frac, cfg, supernet, table, m, full_measured,
                        evaluate(evalnet, task, cfg, calib, val), args, parity))
        match = uniform_match(m, uniform_ms)
        if match is not None:
            ucfg, um = match
            rows.append(row("uniform", frac, ucfg, supernet, table, um, full_measured,
                            evaluate(evalnet, task, ucfg, calib, val), args))
    print_table(rows, ["method", "budget", "config", "predicted_ms", "measured_ms", "measured_frac", "map50_val",
                       "onnx_parity"])
    wall = time.time() - t_start
    print(f"\n{wall:.0f} s in all (training {t_train:.0f} s, {len(epochs)} epochs); load average (1 min) "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}; 1 PyTorch thread, ONNX Runtime 1 thread")
    if not args.quick or args.write:
        load = f"{load0:.1f}->{os.getloadavg()[0]:.1f}"
        extra = {"load_avg": load, "wall_s": round(wall), "train_s": round(t_train), "epochs": args.epochs,
                 "train_images": args.train, "distill": args.distill,
                 "map50_full_per_epoch": " ".join(f"{e['map50_full']:.1f}" for e in epochs)}
        path = write_csv([{**r, **extra} for r in rows], "yolo_proof" + ("_quick" if args.quick else ""))
        print(f"wrote {path}")
    return 0


def row(method: str, budget, cfg: ChannelConfig, supernet, table, measured: float, full_measured: float,
        map50: float, args, parity: str = "") -> dict[str, Any]:
    return {"method": method, "budget": budget, "config": short(cfg, supernet),
            "predicted_ms": round(table.predict_ms(supernet.layer_specs(cfg, input_size=args.size)), 3),
            "measured_ms": round(measured, 3), "measured_frac": round(measured / full_measured, 3),
            "map50_val": round(map50, 2), "onnx_parity": parity,
            "widths": " ".join(f"{u}={w}" for u, w in sorted(cfg.widths.items()))}


if __name__ == "__main__":
    sys.exit(main())
