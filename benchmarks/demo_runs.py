"""Do the demo's verdicts hold? ``hwslim demo --force`` run N times in a row, quiet or with a busy neighbor.

Each run starts from scratch (``--force``: a new training run, a new latency table, a new
search), in a subprocess, as a user runs it. Per run and budget the CSV records the
verdict (OK: measured <= budget x 1.03; OVER; UNRELIABLE: the machine's conditions differ
from the table's), budget, predicted and measured latency, measured / budget, the run's
time and the load before and after; the summary counts the verdicts and the slowest run.

    python benchmarks/demo_runs.py --runs 5                    # quiet: nothing else running
    python benchmarks/demo_runs.py --runs 5 --busy-neighbor    # a process spinning on another core throughout
    python benchmarks/demo_runs.py --runs 1 --quick            # a smoke test of the script (seconds)

Results: benchmarks/results/demo_runs_<condition>.csv (one row per run and budget) and
demo_runs_<condition>_summary.csv.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere as a script

from benchmarks.common import busy_neighbor, print_table, write_csv  # noqa: E402
from hwslim.latency.conditions import machine_conditions  # noqa: E402


def run_demo(out: Path, quick: bool) -> tuple[dict, float]:
    """One ``hwslim demo --force`` in a subprocess: its JSON result and its wall-clock seconds."""
    cmd = [sys.executable, "-m", "hwslim", "demo", "--force", "--out", str(out), "--json", "--no-progress"]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"hwslim demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--busy-neighbor", action="store_true",
                   help="a process spinning on another core during every run (condition: busy)")
    p.add_argument("--condition", choices=["quiet", "busy"], help="recorded condition (default: from --busy-neighbor)")
    p.add_argument("--quick", action="store_true", help="hwslim demo --quick (a smoke test; its numbers mean little)")
    p.add_argument("--out", help="the demo's folder (default: a temporary one)")
    args = p.parse_args()
    condition = args.condition or ("busy" if args.busy_neighbor else "quiet")
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="hwslim-demo-runs-") as tmp, busy_neighbor(args.busy_neighbor):
        out = Path(args.out) if args.out else Path(tmp) / "demo"
        for run in range(1, args.runs + 1):
            before = machine_conditions()
            result, seconds = run_demo(out, args.quick)
            after = machine_conditions()
            cond = result.get("conditions") or {}
            verdicts = collections.Counter(r["verdict"] for r in result["rows"])
            for r in result["rows"]:
                rows.append({"run": run, "condition": condition, "budget_ms": r["budget_ms"],
                             "predicted_ms": r["predicted_ms"], "measured_ms": r["measured_ms"],
                             "verdict": r["verdict"], "measured_over_budget": round(r["measured_ms"] / r["budget_ms"], 4),
                             "pred_err_pct": round(100 * (r["predicted_ms"] / r["measured_ms"] - 1), 2),
                             "accuracy_%": r["accuracy_%"], "run_s": round(seconds, 1),
                             "load_before": before.load_1min, "load_after": after.load_1min,
                             "others_running_before": before.others_running,
                             "probe_ratio_vs_table": cond.get("probe_ratio"), "conditions_note": cond.get("note") or "",
                             "quick": args.quick, "cpu": before.cpu, "cpu_flags": " ".join(before.flags or ())})
            summary.append({"run": run, "condition": condition, "run_s": round(seconds, 1),
                            **{v: verdicts.get(v, 0) for v in ("OK", "OVER", "UNRELIABLE")},
                            "max_measured_over_budget": max(x["measured_over_budget"] for x in rows if x["run"] == run),
                            "load": f"{before.load_1min}->{after.load_1min}",
                            "probe_ratio_vs_table": cond.get("probe_ratio"),
                            **{f"{k}_s": v for k, v in (result.get("seconds") or {}).items()}})
            print_table([summary[-1]])
    name = f"demo_runs_{condition}" + ("_quick" if args.quick else "")
    path = write_csv(rows, name)
    write_csv(summary, f"{name}_summary")
    print()
    print_table(summary, ["run", "condition", "run_s", "OK", "OVER", "UNRELIABLE", "max_measured_over_budget", "load",
                          "probe_ratio_vs_table"])
    total = collections.Counter(r["verdict"] for r in rows)
    print(f"{args.runs} runs, {condition}: " + ", ".join(f"{v} {n}" for v, n in sorted(total.items()))
          + f"; slowest run {max(s['run_s'] for s in summary):.0f} s")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
