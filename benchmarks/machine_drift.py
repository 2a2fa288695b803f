"""How steady is this machine's speed? The speed probe and whole models, timed back to back for minutes.

A latency table predicts the machine as it was while it was measured; on a shared (virtual)
machine, other tenants' memory traffic slows models whose weights and activations leave the
core's caches, without any sign inside the guest (load average, other threads). This script
times, in turn, every ``--every`` seconds for ``--seconds``: hwslim's speed probe
(hwslim.latency.conditions, what `verify` compares with the table's) and the exported full and
narrowest-uniform configs of ``--model``, and reports each one's spread over time and how
well the probe follows the models (a probe that does not move when the models do cannot
tell `verify` that the machine is slower than the table's).

    python benchmarks/machine_drift.py                                  # MobileNetV3-Large, 3 minutes
    python benchmarks/machine_drift.py --model mobilenet_v2 --width-mult 1.5 --seconds 300

Writes benchmarks/results/machine_drift_<model>.csv (one row per turn) and ..._summary.csv.

``--duet`` measures instead what timing against an interleaved reference buys (issue 34): three
network shapes (``--duet-models``, default MobileNetV2 1.5x at 224, ResNet-50 0.5x at 112,
ResNet-20 at 32), each turn of each one between two timings of hwslim's reference
(``profilers.base.reference_specs``), for ``--seconds``; per ``--window`` seconds the median
of each model's times as measured and brought to the reference level (times level / the mean
of the reference times around the turn; the level: the reference's median over the run), and
over the windows each series' coefficient of variation and its largest window / smallest
window. Writes benchmarks/results/machine_drift_duet.csv (one row per window and model) and
machine_drift_duet_summary.csv, each row stamped with the machine and the load.

    python benchmarks/machine_drift.py --duet --seconds 240 --window 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere as a script

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_csv  # noqa: E402
from hwslim.latency.conditions import measure_conditions  # noqa: E402
from hwslim.core.materialize import materialize  # noqa: E402
from hwslim.models import create_model  # noqa: E402
from profilers import get_profiler  # noqa: E402
from profilers.base import normalized, sample  # noqa: E402

DUET_MODELS = "mobilenet_v2:1.5:224,resnet50:0.5:112,resnet20:1:32"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--input-size", type=int)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--budget-ms", type=float, default=300.0, help="timing budget of each model per turn")
    p.add_argument("--duet", action="store_true", help="absolute vs reference-normalized stability (see above)")
    p.add_argument("--duet-models", default=DUET_MODELS, help="model:width_mult:input_size, comma-separated")
    p.add_argument("--window", type=float, default=20.0, help="--duet: seconds per window")
    args = p.parse_args()
    if args.duet:
        return duet(args)
    net = create_model(args.model, width_mult=args.width_mult).eval()
    size = args.input_size or net.input_size
    configs = {"full": net.full_config(), "narrowest": net.uniform_configs()[0]}
    rows = []
    with get_profiler("cpu", "ort", threads=1) as prof, tempfile.TemporaryDirectory() as d:
        runs = {}
        for name, cfg in configs.items():
            path = prof.write_model(materialize(net, cfg, fold_bn=True).eval(), Path(d) / name, batch=1,
                                    input_size=size)
            runs[name] = prof._onnx_runner(str(path), (1, net.in_channels, size, size))
        proto = replace(prof.e2e_protocol, budget_ms=args.budget_ms, min_reps=20, warmup_runs=2, warmup_ms=10.0)
        t0 = time.time()
        while time.time() - t0 < args.seconds:
            c = measure_conditions(prof)
            row = {"t_s": round(time.time() - t0, 1), "probe_ms": round(c.probe_ms, 4), "load_1min": c.load_1min,
                   "others_running": c.others_running}
            for name, run in runs.items():
                row[f"{name}_ms"] = round(statistics.median(sample(run, proto)), 4)
            rows.append(row)
            print(" ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr, flush=True)
    summary = []
    probe = np.array([r["probe_ms"] for r in rows])
    for col in ["probe_ms"] + [f"{n}_ms" for n in configs]:
        x = np.array([r[col] for r in rows])
        med = float(np.median(x))
        summary.append({"model": f"{args.model} x{net.width_mult:g} @{size}", "series": col, "turns": len(x),
                        "median_ms": round(med, 4), "p5_over_median": round(float(np.percentile(x, 5)) / med, 3),
                        "p95_over_median": round(float(np.percentile(x, 95)) / med, 3),
                        "max_over_median": round(float(x.max()) / med, 3),
                        "turns_over_1.05x": int((x > 1.05 * med).sum()),
                        "corr_with_probe": round(float(np.corrcoef(x, probe)[0, 1]), 3) if col != "probe_ms" else None})
    print_table(summary)
    write_csv(rows, f"machine_drift_{args.model}")
    print(f"results: {write_csv(summary, f'machine_drift_{args.model}_summary')}")
    return 0


def _duet_turns(args, prof, runs: dict) -> list[dict]:
    """Each model's turns, between two reference timings: (t, model, raw median, adjacent reference)."""
    proto = replace(prof.e2e_protocol, budget_ms=args.budget_ms / 4, min_reps=5, warmup_runs=1, warmup_ms=0.0)
    ref = prof.reference_runner()
    turns = []
    t0 = time.time()
    before = ref.time().ms
    while time.time() - t0 < args.seconds:
        for name, run in runs.items():
            raw = statistics.median(sample(run, proto))
            after = ref.time().ms
            turns.append({"t_s": time.time() - t0, "model": name, "raw_ms": raw, "ref_ms": (before + after) / 2})
            before = after
    return turns


def duet(args) -> int:
    """Absolute vs reference-normalized stability of 3 network shapes (see the module docstring)."""
    import os

    load = [round(os.getloadavg()[0], 2)]
    with get_profiler("cpu", "ort", threads=1) as prof, tempfile.TemporaryDirectory() as d:
        runs = {}
        for spec in args.duet_models.split(","):
            model, wm, size = spec.split(":")
            net = create_model(model, width_mult=float(wm), input_size=int(size)).eval()
            path = prof.write_model(materialize(net, net.full_config(), fold_bn=True).eval(), Path(d) / model,
                                    batch=1, input_size=int(size))
            runs[f"{model} x{float(wm):g} @{size}"] = prof._onnx_runner(str(path), (1, net.in_channels, int(size),
                                                                                    int(size)))
        for run in runs.values():
            sample(run, replace(prof.e2e_protocol, budget_ms=0.0, min_reps=0, max_reps=0))  # warm-up only
        turns = _duet_turns(args, prof, runs)
    load.append(round(os.getloadavg()[0], 2))
    level = float(np.median([t["ref_ms"] for t in turns]))
    rows, summary = [], []
    for name in runs:
        mine = [t for t in turns if t["model"] == name]
        windows = sorted({int(t["t_s"] // args.window) for t in mine})
        for w in windows:
            got = [t for t in mine if int(t["t_s"] // args.window) == w]
            raw = [t["raw_ms"] for t in got]
            norm = [normalized([t["raw_ms"]], level, t["ref_ms"], None)[0][0] for t in got]
            rows.append({"model": name, "window": w, "turns": len(got), "raw_ms": round(float(np.median(raw)), 4),
                         "normalized_ms": round(float(np.median(norm)), 4),
                         "ref_ms": round(float(np.median([t["ref_ms"] for t in got])), 4), "load_1min": load})
        summary.append(_duet_summary(name, [r for r in rows if r["model"] == name], level, load))
    print_table(summary)
    write_csv(rows, "machine_drift_duet")
    print(f"results: {write_csv(summary, 'machine_drift_duet_summary')}")
    return 0


def _duet_summary(name: str, rows: list[dict], level: float, load: list) -> dict:
    def cv(x):
        return round(100 * float(np.std(x) / np.mean(x)), 2)

    raw = np.array([r["raw_ms"] for r in rows])
    norm = np.array([r["normalized_ms"] for r in rows])
    ref = np.array([r["ref_ms"] for r in rows])
    return {"model": name, "windows": len(rows), "reference_level_ms": round(level, 4),
            "reference_max/min": round(float(ref.max() / ref.min()), 3), "raw_cv_%": cv(raw),
            "normalized_cv_%": cv(norm), "raw_max/min": round(float(raw.max() / raw.min()), 3),
            "normalized_max/min": round(float(norm.max() / norm.min()), 3), "load_1min_start_end": load}


if __name__ == "__main__":
    raise SystemExit(main())
