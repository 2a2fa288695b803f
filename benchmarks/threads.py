"""PyTorch CPU threads: time per train step, search step and export at 1, 2 and PyTorch's default.

Each (workload, threads) pair runs in its own process (PyTorch's thread pool is set
once per process), several rounds in a fresh random order each, so a change in the
machine's load hits every setting alike. Every run warms up first, then times a few
steps; the table keeps the median over all timed steps of all rounds, and records the
CPU, its core count and the load average around each run.

Workloads (the CPU recipes the README uses):

* ``train``: one sandwich step of ``hwslim train`` (widest + narrowest + 2 random
  configs, forward and backward), ResNet-20 at 32 px, batch 128 (``hwslim.training.train``);
* ``search``: one greedy step of ``hwslim search`` (every unit's candidate scored on
  256 search images with BN recalibrated, the fast evaluator), ResNet-20 at 32 px;
* ``export``: one ``hwslim export`` (BN recalibration on 512 images, BN folding, ONNX
  export, the ONNX Runtime vs PyTorch check), ResNet-20 at 32 px.

    python benchmarks/threads.py [--rounds 3] [--workloads train search export]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("1", "2", "default")
WORKLOADS = {"train": (2, 4), "search": (1, 2), "export": (1, 2)}  # (warm-up, timed) steps per run


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _train_steps(warmup: int, timed: int) -> list[float]:

    from hwslim.training import distributed
    from hwslim.training.train import TrainConfig, _Run, sandwich_configs

    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(model="resnet20", data="synthetic:1280", epochs=1, out=d, input_size=32, batch_size=128,
                          device="cpu", workers=0, progress=False, search_size=0)
        world = distributed.setup("cpu")
        run = _Run(cfg, world, lambda m: None)
        rng = random.Random(0)
        times = []
        for i, (x, y) in enumerate(run.data.batches(0, run.local_batch)):
            if i >= warmup + timed:
                break
            t0 = time.perf_counter()
            run.step(x.contiguous(), y, sandwich_configs(run.net, run.cfg.num_random, rng))
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        distributed.teardown(world)
    return times


def _supernet_ckpt():
    from hwslim.importing.checkpoint import Checkpoint
    from hwslim.importing.data import synthetic_data_info
    from hwslim.models import create_model

    net = create_model("resnet20", input_size=32)
    return Checkpoint(net, data=synthetic_data_info(num_train=2000, num_search=512, input_size=32, num_val=64))


def _search_steps(warmup: int, timed: int) -> list[float]:
    from hwslim.importing.data import search_split
    from hwslim.search.evaluator import StepEvaluator

    ckpt = _supernet_ckpt()
    net = ckpt.model
    x, y = search_split(ckpt, max_images=256)
    ev = StepEvaluator(net, x, y, bn="recal", mode="fast")
    cfg = net.full_config()
    cands = [(u, cfg.replace(**{u: unit.narrower(cfg.widths[u])})) for u, unit in net.units.items()
             if unit.narrower(cfg.widths[u]) is not None]
    times = []
    for i in range(warmup + timed):
        t0 = time.perf_counter()
        ev.score_candidates(cfg, cands)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _export_steps(warmup: int, timed: int) -> list[float]:
    from hwslim.export.exporter import ExportOptions, export_model

    ckpt = _supernet_ckpt()
    cfg = ckpt.model.uniform_config(8)
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(warmup + timed):
            t0 = time.perf_counter()
            export_model(ckpt, cfg, Path(d) / f"{i}.onnx", ExportOptions(calib_images=512, check_images=32))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def worker(workload: str, threads: str) -> None:
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    warmup, timed = WORKLOADS[workload]
    fn = {"train": _train_steps, "search": _search_steps, "export": _export_steps}[workload]
    times = fn(warmup, timed)
    print(json.dumps({"times": times, "torch_threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from benchmarks.common import print_table, write_csv
    from hwslim.core.machine import cpu_model

    samples: dict[tuple[str, str], list[float]] = {}
    loads: dict[tuple[str, str], list[float]] = {}
    resolved: dict[tuple[str, str], int] = {}
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for r in range(args.rounds):
        for workload in args.workloads:
            order = list(SETTINGS)
            rng.shuffle(order)
            for threads in order:
                before = _load()
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", workload, threads],
                                      capture_output=True, text=True, env=env, cwd=ROOT)
                if proc.returncode:
                    raise SystemExit(f"{workload} threads={threads} failed:\n{proc.stderr[-2000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                key = (workload, threads)
                samples.setdefault(key, []).extend(out["times"])
                loads.setdefault(key, []).extend([before, _load()])
                resolved[key] = out["torch_threads"]
                print(f"round {r + 1}/{args.rounds} {workload:6s} threads={threads:7s} "
                      f"median {statistics.median(out['times']):.3f} s (load {before})", file=sys.stderr)
    rows = []
    for workload in args.workloads:
        base = statistics.median(samples[(workload, "1")]) if (workload, "1") in samples else None
        for threads in SETTINGS:
            t = samples[(workload, threads)]
            med = statistics.median(t)
            rows.append({"workload": workload, "threads": threads, "torch_threads": resolved[(workload, threads)],
                         "median_s": round(med, 4), "min_s": round(min(t), 4), "max_s": round(max(t), 4),
                         "n": len(t), "vs_1_thread": round(med / base, 3) if base else "",
                         "load_avg_1min": round(statistics.median(loads[(workload, threads)]), 2),
                         "cpu": cpu_model(), "cores": os.cpu_count()})
    print_table(rows, ["workload", "threads", "torch_threads", "median_s", "min_s", "max_s", "n", "vs_1_thread",
                       "load_avg_1min"])
    path = write_csv(rows, "threads")
    print(f"\n{rows[0]['cpu']} x{rows[0]['cores']}; written to {path}")


if __name__ == "__main__":
    main()
