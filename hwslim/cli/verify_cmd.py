from __future__ import annotations

import contextlib
import json
import sys

from hwslim.cli import add_command, nonneg_float, positive_float, retired


def register(sub) -> None:
    p = add_command(sub, "verify", run, run.__doc__)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="files written by `hwslim export`: .onnx, or an engine, OpenVINO IR (.xml) or ExecuTorch "
                        "program (.pte) with its .json beside it")
    p.add_argument("--table", help="the latency table to measure against (default: the one each model's metadata "
                                   "records, as export --verify finds it; else this machine's CPU table for its model)")
    p.add_argument("--budget-ms", type=positive_float,
                   help="the budget (default: the latency budget in each model's config)")
    p.add_argument("--tolerance", type=nonneg_float, default=0.03,
                   help="the budget holds if measured <= budget * (1 + tolerance) (default 0.03)")
    p.add_argument("--force-table", action="store_true", help="use a table measured on another setup")
    retired(p, "--force", "--force-table", "use a latency table measured on another setup; --force only ever "
                                           "means starting over, replacing outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object per model")


def run(args) -> int:
    """Measure exported models on the table's backend: predicted vs measured latency vs budget.

    The config comes from each model's metadata (written by `hwslim export`); the
    prediction from it and the table; the measurement from the table's backend with
    the table's protocol (threads, warm-up, repetitions), so the two are comparable.
    Before measuring, the machine's conditions (CPU, load, a quarter-second speed probe
    with the table's settings) are compared with those the table recorded; where they
    differ markedly the verdict is UNRELIABLE and one line says why.
    An OpenVINO IR or ExecuTorch program is measured itself where the table's backend
    runs it (openvino, executorch), else its ONNX source.
    Exit status: 0 if every budget holds, 1 if one does not, 3 if none is over but a
    verdict is unreliable (the machine's conditions differ from the table's), 2 on a
    usage error.

    Without --table, each model is measured against the table its metadata records
    (the one the search used, as export --verify finds it), else this machine's CPU
    table for its model.

    Example (after the README's workflow):
      hwslim verify r20_0.5ms.onnx
      hwslim verify r20_0.5ms.onnx --table \
          ~/.cache/hwslim/latency_tables/cpu-<this cpu>/resnet20-x1-32px-b1-ort-t1-float32.csv
    """
    from hwslim.core.errors import ConfigError
    from hwslim.latency.verify import exit_status, print_verify, recorded_table, verify_model

    if not 0 <= args.tolerance < float("inf"):
        raise ConfigError(f"--tolerance must be >= 0, got {args.tolerance:g}")
    from hwslim.latency.table import LatencyTable

    # each table loaded once, and every one refused before any measurement
    paths = [args.table or recorded_table(m) for m in args.models]
    tables = {str(p): LatencyTable.load(p) for p in paths}
    # with --json, stdout carries the JSON lines only: anything the library prints goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        results: list = []
        now: dict[str, object] = {}  # the conditions, taken once per table before its first measurement
        for m, p in zip(args.models, paths):
            if not args.table:
                print(f"{m}: measured against {p}", file=sys.stderr)
            r = verify_model(m, tables[str(p)], budget_ms=args.budget_ms, tolerance=args.tolerance,
                             force=args.force_table, progress=True, conditions=now.get(str(p)))
            now.setdefault(str(p), r.conditions.now if r.conditions is not None else None)
            results.append(r)
    if args.json:
        for r in results:
            print(json.dumps(r.as_dict(), sort_keys=True))
    else:
        print_verify(results)
    return exit_status(results)
