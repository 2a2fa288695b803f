from __future__ import annotations

import contextlib
import json
import sys

from hwslim.cli import add_command, nonneg_float, positive_float


def register(sub) -> None:
    p = add_command(sub, "verify", run, run.__doc__)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="files written by `hwslim export`: .onnx, or an engine, OpenVINO IR (.xml) or ExecuTorch "
                        "program (.pte) with its .json beside it")
    p.add_argument("--table", required=True, help="the latency table the configs were searched with")
    p.add_argument("--budget-ms", type=positive_float,
                   help="the budget (default: the latency budget in each model's config)")
    p.add_argument("--tolerance", type=nonneg_float, default=0.03,
                   help="the budget holds if measured <= budget * (1 + tolerance) (default 0.03)")
    p.add_argument("--force", action="store_true", help="use a table measured on another setup")
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

    Example:
      hwslim verify r20_0.5ms.onnx --table latency_tables/cpu-amd-epyc/resnet20-x1-32px-b1-ort-t1-float32.csv
    """
    from hwslim.core.errors import ConfigError
    from hwslim.latency.verify import exit_status, print_verify, verify_model

    if not 0 <= args.tolerance < float("inf"):
        raise ConfigError(f"--tolerance must be >= 0, got {args.tolerance:g}")
    from hwslim.latency.table import LatencyTable

    table = LatencyTable.load(args.table)  # once, and refused before any measurement
    # with --json, stdout carries the JSON lines only: anything the library prints goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        results: list = []
        for m in args.models:  # the conditions are taken once, before the first measurement
            now = results[0].conditions.now if results else None
            results.append(verify_model(m, table, budget_ms=args.budget_ms, tolerance=args.tolerance,
                                        force=args.force, progress=True, conditions=now))
    if args.json:
        for r in results:
            print(json.dumps(r.as_dict(), sort_keys=True))
    else:
        print_verify(results)
    return exit_status(results)
