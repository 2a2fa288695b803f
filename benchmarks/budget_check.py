"""Do searched-and-exported models meet their latency budgets on this CPU?

For MobileNetV2 1.5x at 224 and a CIFAR-size model (ResNet-20 at 32 by default): take
the ONNX Runtime latency table of this machine (measured with ``hwslim profile``, reused
from ``latency_tables/`` when present, resumable), pick three latency budgets between
the narrowest and the full config's predicted latency, run the greedy search for all
three, export each config with ``hwslim export`` (checked against PyTorch) and measure
the exported ONNX model end to end with the table's backend and protocol
(``hwslim verify``), each model several times interleaved, keeping the median.

Targets: every exported model within its budget + 3%, and predicted within 5% of
measured. Writes ``benchmarks/results/budget_check.csv`` (stamped with the machine).

The supernet is the checkpoint given with ``--checkpoint MODEL=PATH``, else an untrained
one scored on a few synthetic images: latency depends only on the channel counts, so
the latency check holds either way, but the accuracy column then means nothing.

    python benchmarks/budget_check.py                        # both models
    python benchmarks/budget_check.py --models resnet20 --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/budget_check.py` from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, print_table, write_csv  # noqa: E402

MODELS = {  # name -> (width multiplier, input size, search images)
    "mobilenet_v2": (1.5, 224, 2),  # the search only needs to walk: latency is what is checked
    "resnet20": (1.0, 32, 100),
    "mobilenet_v2_cifar": (1.0, 32, 100),
}
BUDGET_SLACK = 0.03
PREDICTION_TOLERANCE = 0.05


def budgets_between(lo: float, hi: float, fractions: list[float]) -> list[float]:
    """Budgets at ``fractions`` of the way from the narrowest (lo) to the full (hi) latency."""
    return [float(f"{lo + f * (hi - lo):.3g}") for f in fractions]


def run_model(name: str, args, log) -> list[dict]:
    import torch

    from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
    from hwslim.importing.data import synthetic_data_info
    from hwslim.search.evaluator import Scoring
    from hwslim.export.exporter import ExportOptions, export_model
    from hwslim.latency.table import LatencyTable
    from hwslim.models import create_model
    from hwslim.latency.profile import ProfileSettings, profile
    from hwslim.search.greedy import Budget, SearchOptions, greedy_search
    from hwslim.latency.verify import verify_model

    width, size, search_images = MODELS[name]
    search_images = args.search_images or search_images
    work = ROOT / "runs" / "budget_check" / name  # checkpoints, searches, ONNX files (not committed)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if name in args.table:  # a table measured elsewhere (e.g. by `hwslim profile`): used as it is
        table_path = Path(args.table[name])
    else:
        prof = profile(ProfileSettings(model=name, width_mult=width, input_size=size, threads=args.threads,
                                       quick=args.quick), progress=True, log=log)
        table_path = Path(prof.path)
    table = LatencyTable.load(table_path)
    log(f"{name}: table {table_path} ({len(table)} entries)")

    ckpt_path = args.checkpoint.get(name)
    trained = ckpt_path is not None
    if ckpt_path is None:
        torch.manual_seed(0)
        net = create_model(name, width_mult=width, input_size=size)
        info = synthetic_data_info(num_train=max(2 * search_images, 64), num_search=search_images, input_size=size,
                                   num_val=16)
        ckpt_path = save_checkpoint(work / "untrained_supernet.pt", net, data=info)
    ckpt = load_checkpoint(ckpt_path)
    net = ckpt.model
    full = table.predict_ms(net.layer_specs(net.full_config()))
    narrow = table.predict_ms(net.layer_specs(net.min_config()))
    values = budgets_between(narrow, full, args.fractions)
    log(f"{name}: predicted {narrow:.3f} ms (narrowest) .. {full:.3f} ms (full); budgets {values} ms")

    t1 = time.perf_counter()
    result = greedy_search(ckpt, [Budget("latency_ms", v) for v in values],
                           SearchOptions(out_dir=work / "search", force=True, scoring=Scoring(bn="batch"),
                                         max_images=search_images, progress=True, plot=False), table=table)
    search_s = time.perf_counter() - t1

    exported = []
    for v, cfg in zip(values, result.configs):
        res = export_model(ckpt, cfg, work / f"{name}_{v:g}ms.onnx",
                           ExportOptions(force=True, table=table_path, check_images=4, calib_images=0))
        exported.append((v, cfg, res))
    # interleaved rounds: a slow spell of the shared machine hits every model, not one
    runs: dict[float, list] = {v: [] for v in values}
    for _ in range(args.rounds):
        for v, _, res in exported:
            runs[v].append(verify_model(res.path, table, budget_ms=v, tolerance=BUDGET_SLACK))
    rows = []
    for v, cfg, res in exported:
        measured = statistics.median(r.measured_ms for r in runs[v])
        predicted = runs[v][0].predicted_ms
        err = (predicted - measured) / measured
        rows.append({
            "model": f"{name} x{width:g} {size}px", "budget_ms": v, "predicted_ms": round(predicted, 4),
            "measured_ms": round(measured, 4),
            "iqr_ms": round(statistics.median(r.iqr_ms for r in runs[v]), 4),
            "over_budget_%": round(100 * (measured / v - 1), 2),
            "within_budget_3%": measured <= v * (1 + BUDGET_SLACK),
            "pred_err_%": round(100 * err, 2), "pred_within_5%": abs(err) <= PREDICTION_TOLERANCE,
            "params": int(cfg.meta.get("params", 0)), "macs": int(cfg.meta.get("macs", 0)),
            "search_acc": round(float(cfg.meta.get("search_acc", float("nan"))), 4) if trained else "untrained",
            "max_rel_error": f"{res.max_rel_error:.1e}", "rounds": args.rounds,
            "search_steps": len(result.steps) - 1, "search_s": round(search_s, 1),
            "threads": table.meta.get("threads"),
            "table": str(table_path.resolve().relative_to(ROOT)) if table_path.resolve().is_relative_to(ROOT)
            else str(table_path),
        })
    log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2,resnet20", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--fractions", default="0.5,0.65,0.8",
                   help="budgets at these fractions between the narrowest and the full latency")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of the table")
    p.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end measurements per model")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="a trained supernet for MODEL (default: untrained, synthetic search images)")
    p.add_argument("--table", action="append", default=[], metavar="MODEL=PATH",
                   help="use this latency table for MODEL (default: measure or reuse one under latency_tables/)")
    p.add_argument("--search-images", type=int, help="search-split images per candidate (default: per model)")
    p.add_argument("--quick", action="store_true", help="short profiling protocol (smoke run; numbers less stable)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="PyTorch threads for the search (default 1: more threads than free cores make it spin)")
    p.add_argument("--name", default="budget_check", help="CSV name under benchmarks/results/")
    args = p.parse_args()
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.checkpoint = dict(kv.split("=", 1) for kv in args.checkpoint)
    args.table = dict(kv.split("=", 1) for kv in args.table)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")

    import torch

    torch.set_num_threads(args.torch_threads)
    rows = []
    for name in names:
        rows += run_model(name, args, lambda msg: print(msg, flush=True))
    cols = ["model", "budget_ms", "predicted_ms", "measured_ms", "iqr_ms", "over_budget_%", "within_budget_3%",
            "pred_err_%", "pred_within_5%", "params", "search_acc"]
    print_table(rows, cols)
    ok_budget = sum(r["within_budget_3%"] for r in rows)
    ok_pred = sum(r["pred_within_5%"] for r in rows)
    print(f"within budget + 3%: {ok_budget}/{len(rows)}; predicted within 5% of measured: {ok_pred}/{len(rows)}")
    print(f"wrote {write_csv(rows, args.name)}")
    return 0 if ok_budget == ok_pred == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
