"""How well a latency table predicts the real model: predicted vs measured end-to-end latency.

For each model: take its latency table (the default one under latency_tables/, or measure
it first with `hwslim profile`), then measure, end to end, the exported ONNX model of
50+ random configs and every uniform width, none of them used for the table's
calibration, with the same backend and protocol. Prints the share of configs within
+-5% and +-10%, the Spearman rank correlation and the worst error; writes per-config
rows and a summary to benchmarks/results/.

    python benchmarks/lut_accuracy.py                          # MobileNetV2 1.5x@224 and ResNet-20@32
    python benchmarks/lut_accuracy.py --models mobilenet_v2 --random 50
    python benchmarks/lut_accuracy.py --backend openvino --models mobilenet_v2
    python benchmarks/lut_accuracy.py --threads 2 --batch 8
    python benchmarks/lut_accuracy.py --device cuda --backend torch --batch 32
    python benchmarks/lut_accuracy.py --quick --models resnet20 --backend openvino   # a smoke run
    python benchmarks/lut_accuracy.py --busy-neighbor          # a process spinning on another core throughout

Results go to benchmarks/results/lut_accuracy_<device>_<backend>_b<batch>[_t<threads>][_<dtype>]
[_<models>].csv (and ..._configs.csv): the models are named unless they are the default set,
so a run on a subset never overwrites the default set's file. ``--quick`` is a smoke run:
missing tables are measured with the short protocol in a temporary directory (never in the
table cache, where a later real run would find them), and nothing is written.

Beside the check, the table's own calibration configs are timed again: the median ratio of
their latency now to their latency at table time (``level_vs_table``) is how far the machine's
speed moved since the table, and ``within_5pct_level_adjusted`` the accuracy with predictions
scaled by it (what is left is the table's own error; the headline numbers are unadjusted).

Every row records the condition (``--condition quiet|busy``; ``--busy-neighbor`` starts a
process spinning on another core before anything is measured and stops it at the end),
the CPU, its AVX-512 / AMX flags, the load before and after, and how the machine's speed
probe compares with the table's (hwslim.latency.conditions); the condition ends the file name.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere as a script

from benchmarks.common import busy_neighbor, print_table, write_csv  # noqa: E402
from hwslim.latency.conditions import compare_to_table, measure_conditions  # noqa: E402
from hwslim.core.errors import TableError  # noqa: E402
from hwslim.latency.table import LatencyTable, accuracy, default_table_path, find_table, table_paths  # noqa: E402
from hwslim.models import create_model  # noqa: E402
from hwslim.latency.profile import ProfileSettings, measure_configs, profile  # noqa: E402
from profilers import backend_class, default_backend, get_profiler  # noqa: E402
from profilers.base import E2E_ROUNDS  # noqa: E402

MODELS = {"mobilenet_v2": (1.5, 224), "resnet20": (1.0, 32)}


def condition_columns(args, before, after, check, after_check) -> dict:
    """What every row records about the machine: the condition, CPU, flags, load, the probe vs the table's."""
    flags = before.flags or ()
    return {"condition": args.condition, "cpu": before.cpu, "avx512": "avx512f" in flags,
            "amx": "amx_tile" in flags, "cpu_flags": " ".join(flags), "load_before": before.load_1min,
            "load_after": after.load_1min, "others_running": before.others_running,
            "probe_ratio_vs_table": None if check.probe_ratio is None else round(check.probe_ratio, 3),
            "conditions_vs_table": "comparable" if check.reliable and after_check.reliable else
            check.summary if not check.reliable else f"at the end: {after_check.summary}"}


def _table(args, model: str, wm: float, size: int) -> tuple[LatencyTable, float | None]:
    out = None
    if args.table_dir:  # only a table of --table-dir will do (one measured under this run's condition)
        backend = backend_class(args.backend).backend if args.backend else default_backend(args.device)
        out = default_table_path(args.device, backend_class(backend).machine_name(), model, wm, size, args.batch,
                                 backend, args.threads or 1, args.dtype, root=args.table_dir)
    try:
        if out is not None and not out.exists():
            raise TableError(f"no table {out}")
        path = out or find_table(args.device, model, wm, batch=args.batch, input_size=size, threads=args.threads,
                                 dtype=args.dtype, backend=args.backend)
        return LatencyTable.load(path), None
    except TableError as e:
        if not args.measure_missing:
            raise
        print(f"{e}\n-> measuring it now", file=sys.stderr)
    t0 = time.perf_counter()
    res = profile(ProfileSettings(device=args.device, backend=args.backend, model=model, width_mult=wm,
                                  input_size=size, batch=args.batch, threads=args.threads, dtype=args.dtype,
                                  out=None if out is None else str(out), quick=args.quick,
                                  **({"calib_configs": 4, "holdout_configs": 2} if args.quick else {})),
                  progress=True,
                  log=lambda m: print(m, file=sys.stderr))
    return LatencyTable.load(res.path), time.perf_counter() - t0


def evaluate(args, model: str) -> tuple[dict, list[dict]]:
    wm, size = MODELS.get(model, (None, None))
    net = create_model(model, width_mult=wm).eval()
    size = size or net.input_size
    table, took = _table(args, model, net.width_mult, size)
    table.check_compatible(net, batch=args.batch, input_size=size)
    used, then = set(), []
    e2e_path = table_paths(table.path)[2]
    if e2e_path.exists():
        import pandas as pd

        calib = pd.read_csv(e2e_path)
        used = set(calib["widths"])
        # the table's own calibration configs, measured again beside the check: how far the
        # machine's speed moved since the table (a level shift, not the table's error)
        then = [(net.config_of(json.loads(w)), float(m)) for w, m in zip(calib["widths"], calib["median_ms"])]
    rng = random.Random(args.seed)
    configs = [("uniform", c) for c in net.uniform_configs()]
    while len(configs) < 12 + args.random:
        configs.append(("random", net.random_config(rng)))
    key = lambda c: json.dumps(c.widths, sort_keys=True, separators=(",", ":"))  # noqa: E731
    assert not {key(c) for _, c in configs} & used, "an evaluation config was used for calibration"
    rng.shuffle(configs)
    rows = []
    load_before = os.getloadavg()[0]
    with get_profiler(table.meta["device"], table.meta["backend"], **table.meta.get("settings", {})) as prof:
        before = measure_conditions(prof)
        check = compare_to_table(table.meta, before)
        if not check.reliable:
            print(f"{model}: {check.line('accuracy measured under other conditions than the table')}", file=sys.stderr)
        t0 = time.perf_counter()
        # a table with a reference level (format 3): the configs are timed with the reference beside
        # them and brought to the table's level, as `hwslim verify` does (older tables: as measured)
        prof.use_reference(table.reference_level_ms)
        # interleaved rounds: every config sees the same mix of quiet and busy spells of the machine
        timings = measure_configs(prof, net, [c for _, c in configs] + [c for c, _ in then], args.batch, size,
                                  rounds=args.rounds, progress=True)
        again, timings = timings[len(configs):], timings[: len(configs)]
        drift = statistics.median(t.median_ms / m for t, (_, m) in zip(again, then)) if then else None
        for (kind, cfg), t in zip(configs, timings):
            pred = table.predict_ms(net.layer_specs(cfg, batch=args.batch, input_size=size))
            rows.append({"model": model, "width_mult": net.width_mult, "input_size": size, "batch": args.batch,
                         "kind": kind, "predicted_ms": round(pred, 4), "measured_ms": round(t.median_ms, 4),
                         "iqr_ms": round(t.iqr_ms, 4), "n": t.n, "noisy": t.noisy,
                         "err_pct": round((pred / t.median_ms - 1) * 100, 2), "widths": key(cfg)})
        seconds = time.perf_counter() - t0
        after = compare_to_table(table.meta, measure_conditions(prof))  # did the machine change meanwhile?
    machine = condition_columns(args, before, after.now, check, after)
    machine["probe_ratio_after"] = None if after.probe_ratio is None else round(after.probe_ratio, 3)
    rows = [{**r, **machine} for r in rows]
    acc = accuracy([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
    m = table.meta
    summary = {"model": f"{model} x{net.width_mult:g} @{size}", "backend": m["backend"], "threads": m["threads"],
               "batch": args.batch, "configs": acc["n"], "within_5pct": round(acc["within_5pct"], 3),
               "within_10pct": round(acc["within_10pct"], 3), "spearman": round(acc["spearman"], 4),
               "mean_abs_err_pct": round(acc["mean_abs_err_pct"], 2), "max_abs_err_pct": round(acc["max_abs_err_pct"], 2),
               "noisy_e2e": sum(r["noisy"] for r in rows),
               # the calibration configs now / at table time (median ratio), and the accuracy with
               # predictions scaled by it: what is left is the table's own error
               "level_vs_table": None if drift is None else round(drift, 4),
               "within_5pct_level_adjusted": None if drift is None else round(accuracy(
                   [r["predicted_ms"] * drift for r in rows], [r["measured_ms"] for r in rows])["within_5pct"], 3),
               "table_entries": len(table),
               "table_s": m.get("profile_seconds") if took is None else round(took, 1),
               "eval_s": round(seconds, 1),
               # the machine is shared: its load during the table's and this measurement matters
               "load_avg_1min": f"{load_before:.1f}->{os.getloadavg()[0]:.1f}",
               "calib_a": round(m["calibration"]["a"], 4),
               "calib_a_dw": m["calibration"].get("a_depthwise"),
               "calib_b_ms": round(m["calibration"]["b"], 4), "table_measured": m.get("finished", ""), **machine}
    return summary, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", default="float32", help="table precision (cuda: float16, bfloat16 too)")
    p.add_argument("--random", type=int, default=50, help="random configs per model (plus the 12 uniform ones)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--rounds", type=int, default=E2E_ROUNDS, help="interleaved rounds of end-to-end timing")
    p.add_argument("--no-measure", dest="measure_missing", action="store_false",
                   help="fail instead of measuring a missing table")
    p.add_argument("--table-dir", help="use (or measure) the tables in this folder only: e.g. one per condition")
    p.add_argument("--condition", choices=["quiet", "busy"], default="quiet",
                   help="what else runs on the machine (recorded in every row and the file name)")
    p.add_argument("--busy-neighbor", action="store_true",
                   help="start a process spinning on another core first, stop it at the end (implies --condition busy)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: missing tables measured with the short protocol in a temporary directory "
                        "(unless --table-dir); prints, writes no result")
    args = p.parse_args()
    if args.busy_neighbor:
        args.condition = "busy"
    with tempfile.TemporaryDirectory(prefix="hwslim-lut-") as tmp:
        if args.quick and not args.table_dir:
            args.table_dir = tmp
        with busy_neighbor(args.busy_neighbor):
            return run(args)


def result_name(device: str, backend: str, batch: int, threads: int, dtype: str, models: list[str],
                condition: str = "quiet") -> str:
    """``lut_accuracy_<device>_<backend>_b<batch>[_t<threads>][_<dtype>][_<models>]_<condition>``: the
    models are named unless they are the default set, the threads unless 1, the dtype unless float32."""
    tag = f"{device}_{backend}_b{batch}" + ("" if threads == 1 else f"_t{threads}")
    tag += "" if dtype == "float32" else f"_{dtype}"
    tag += "" if sorted(models) == sorted(MODELS) else "_" + "_".join(models)
    return f"lut_accuracy_{tag}_{condition}"


def run(args) -> int:
    summaries, rows = [], []
    for model in args.models:
        s, r = evaluate(args, model)
        summaries.append(s)
        rows += r
        print_table([s])
    print()
    print_table(summaries, ["model", "condition", "configs", "within_5pct", "within_10pct", "spearman",
                            "mean_abs_err_pct", "max_abs_err_pct", "noisy_e2e", "level_vs_table",
                            "within_5pct_level_adjusted", "table_entries", "table_s",
                            "load_avg_1min", "probe_ratio_vs_table", "probe_ratio_after"])
    if args.quick:
        print("--quick: a smoke run, nothing written")
        return 0
    name = result_name(args.device, summaries[0]["backend"], args.batch, summaries[0]["threads"], args.dtype,
                       args.models, args.condition)
    write_csv(rows, f"{name}_configs")
    path = write_csv(summaries, name)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
