from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from hwslim.cli import add_command, positive_int, print_table

# measured on the 2-core development machine at load 8 to 9 (tests/test_demo.py runs it three times)
QUICK_NOTE = "its accuracies and verdicts mean nothing (25 to 40 s)"


def register(sub) -> None:
    p = add_command(sub, "demo", run, run.__doc__)
    p.add_argument("--out", default="hwslim-demo", help="folder for everything the demo writes (default hwslim-demo)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run that checks the pipeline runs: a tiny model, one epoch; {QUICK_NOTE}")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="ONNX Runtime threads for the table and measurements")
    p.add_argument("--torch-threads", type=positive_int, default=1,
                   help="PyTorch threads for training and search (default 1: the models are small)")
    p.add_argument("--force", action="store_true",
                   help="run in a non-empty --out folder: the demo's files there are deleted first and everything "
                        "(training, table) is done again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result rows as one JSON object")


def run(args) -> int:
    """The whole pipeline on this CPU, offline: 452 s measured on a 2-core machine at load 7 to 8.

    Training is 344 s of that; a quiet machine takes less. Trains a small slimmable
    supernet (ResNet-20, 24 px) on the built-in synthetic data (20 classes),
    profiles this CPU for it (ONNX Runtime latency table), searches it at three latency
    budgets, exports each config to ONNX (checked against PyTorch), measures every
    exported model with the table's protocol, and prints budget, predicted and
    measured latency, held-out accuracy and parameters. Writes everything under --out,
    including accuracy_latency.png. A verdict is OK when the measured latency is within
    the budget + 3%, OVER when not, and UNRELIABLE when the machine's conditions (load,
    a speed probe) differ from those the table was measured under.

    Example:
      hwslim demo --out hwslim-demo
    """
    from hwslim.pipeline.demo import DemoOptions, run_demo
    from hwslim.core.outputs import check_output

    check_output(args.out, kind="dir")
    quiet = args.json
    opts = DemoOptions(out=Path(args.out), quick=args.quick, force=args.force, threads=args.threads,
                       torch_threads=args.torch_threads,
                       progress=not (args.no_progress or quiet))
    if quiet:  # stdout carries the JSON object only: progress lines, and anything the library prints, to stderr
        with contextlib.redirect_stdout(sys.stderr):
            res = run_demo(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    else:
        res = run_demo(opts, log=lambda msg: print(msg, flush=True))
    if args.json:
        note = {"note": f"--quick: {QUICK_NOTE}"} if args.quick else {}
        print(json.dumps({**note, "rows": res.rows, "plot": str(res.plot), "seconds": res.seconds,
                          "conditions": {k: v for k, v in res.conditions.items() if k not in ("now", "after", "table")}},
                         sort_keys=True))
        return 0
    print()
    print_table(res.rows, ["budget_ms", "predicted_ms", "measured_ms", "p90_ms", "x_budget", "verdict", "accuracy_%",
                           "params", "model"])
    print("\naccuracy: top-1 of the exported ONNX model on held-out synthetic images; "
          "measured_ms, p90_ms: median and 90th percentile end-to-end time with the table's protocol; "
          "x_budget: measured_ms / budget_ms")
    for row in res.rows:  # one line per verdict that is not OK: its numbers and the one thing that decided it
        if row.get("message"):
            print(row["message"])
    if args.quick:
        print(f"--quick: a smoke run of a tiny model trained for one epoch: {QUICK_NOTE}")
    print(f"plot: {res.plot}\nresults: {res.out / 'results.csv'}  (provenance: {res.out / 'demo.json'})")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items()))
    return 0
