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
from profilers.base import sample  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--input-size", type=int)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--budget-ms", type=float, default=300.0, help="timing budget of each model per turn")
    args = p.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
