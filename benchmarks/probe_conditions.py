"""How much does a busy neighbor move the machine-speed probe? The measurement behind the tolerances.

``hwslim verify`` calls a verdict unreliable when the probe (hwslim.latency.conditions: a fixed small
network timed with the table's backend, threads and clock) differs from the table's by more
than ``PROBE_TOLERANCE``, or when the share of cores busy with other threads differs by
``OTHERS_SHARE``. This script alternates quiet phases and phases with a process spinning
on another core (``python -c 'while True: pass'``), takes the conditions ``--probes``
times per phase, and prints the spread of the probe within each condition and the
busy / quiet ratio.

    python benchmarks/probe_conditions.py                 # 4 quiet/busy pairs, 3 probes each (about 30 s)
    python benchmarks/probe_conditions.py --threads 2     # the probe as a 2-thread table measures it

Results: benchmarks/results/probe_conditions.csv (one row per probe) and
probe_conditions_summary.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere as a script

from benchmarks.common import busy_neighbor, print_table, write_csv  # noqa: E402
from hwslim.latency.conditions import PROBE_TOLERANCE, measure_conditions  # noqa: E402
from profilers import get_profiler  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="quiet/busy phase pairs")
    p.add_argument("--probes", type=int, default=3, help="probes per phase")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = []
    with get_profiler("cpu", "ort", threads=args.threads) as prof:
        for pair in range(1, args.pairs + 1):
            for condition in ("quiet", "busy"):
                with busy_neighbor(condition == "busy"):
                    for i in range(args.probes):
                        c = measure_conditions(prof)
                        rows.append({"pair": pair, "condition": condition, "probe": i + 1, "probe_ms": c.probe_ms,
                                     "probe_iqr_ms": c.probe_iqr_ms, "probe_n": c.probe_n,
                                     "others_running": c.others_running, "load_1min": c.load_1min,
                                     "threads": args.threads, "clock": getattr(prof, "clock", ""), "cpu": c.cpu})
                print_table([{k: v for k, v in rows[-1].items() if k != "cpu"}])
    summary = []
    quiet = [r["probe_ms"] for r in rows if r["condition"] == "quiet"]
    for condition in ("quiet", "busy"):
        vals = [r["probe_ms"] for r in rows if r["condition"] == condition]
        phases = [[r["probe_ms"] for r in rows if r["condition"] == condition and r["pair"] == k]
                  for k in range(1, args.pairs + 1)]
        summary.append({"condition": condition, "probes": len(vals), "median_ms": round(statistics.median(vals), 4),
                        "min_ms": round(min(vals), 4), "max_ms": round(max(vals), 4),
                        "spread_within_phase": round(max(max(v) / min(v) for v in phases if v), 4),
                        "spread_all": round(max(vals) / min(vals), 4),
                        "ratio_to_quiet": round(statistics.median(vals) / statistics.median(quiet), 4),
                        "others_running": round(statistics.median(r["others_running"] for r in rows
                                                                 if r["condition"] == condition), 2),
                        "load": round(statistics.median(r["load_1min"] for r in rows if r["condition"] == condition), 2),
                        "probe_tolerance": PROBE_TOLERANCE, "threads": args.threads})
    write_csv(rows, "probe_conditions")
    path = write_csv(summary, "probe_conditions_summary")
    print()
    print_table(summary)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
