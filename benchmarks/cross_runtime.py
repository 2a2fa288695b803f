"""Does each runtime want its own config? Search with each runtime's table, measure on every runtime.

For one supernet (ResNet-20 at 32 px by default) and three latency budgets: take a latency
table per runtime (ONNX Runtime and OpenVINO on this CPU, same threads and batch), run the
greedy search once per runtime with that runtime's table, then measure every chosen config
end to end on every runtime (each runtime's own protocol, all configs interleaved, medians).
The budgets are the same milliseconds for every runtime, chosen between the slowest
runtime's narrowest config and the fastest runtime's full config, so each is feasible on
each runtime.

The result is the (searched-for runtime x measured-on runtime) table: for each budget, each
config's measured latency on each runtime and whether it holds the budget (+3%), next to its
accuracy on the search split. A config chosen for one runtime can be over budget on another,
or use less of the budget there (less accurate than that runtime's own choice); or the
runtimes agree. Writes ``benchmarks/results/cross_runtime_<model>.csv`` (long form: one row
per config and runtime measured on).

The supernet is ``--checkpoint PATH`` (a trained one, for accuracy that means something),
else an untrained one scored on synthetic images: latency depends only on the channel
counts, so the latency columns hold either way, but accuracy then means nothing (the
column says "untrained").

Tables: ``--table RUNTIME=PATH``, else the table in ``--table-dir`` (default
``runs/cross_runtime/tables``), measured there when missing (resumable). The cache and
hwslim's own ``latency_tables/`` are not searched: the tables compared should be measured
in one quiet session.

    python benchmarks/cross_runtime.py                                       # ort vs openvino, ResNet-20@32
    python benchmarks/cross_runtime.py --model mobilenet_v2 --checkpoint runs/mnv2/checkpoint.pt
    python benchmarks/cross_runtime.py --quick                               # a smoke run: nothing written
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/cross_runtime.py` from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_csv  # noqa: E402
from profilers.base import E2E_ROUNDS  # noqa: E402

MODELS = {"resnet20": (1.0, 32), "mobilenet_v2": (1.5, 224), "mobilenet_v2_cifar": (1.0, 32)}
BUDGET_SLACK = 0.03


def budgets_between(lo: float, hi: float, fractions: list[float]) -> list[float]:
    """Budgets at ``fractions`` of the way from ``lo`` to ``hi`` (3 significant digits)."""
    return [float(f"{lo + f * (hi - lo):.3g}") for f in fractions]


def common_budgets(ranges: dict[str, tuple[float, float]], fractions: list[float]) -> list[float]:
    """Budgets every runtime can meet: between the slowest runtime's narrowest config and the
    fastest runtime's full config (``ranges``: runtime -> (narrowest, full) predicted ms)."""
    lo = max(r[0] for r in ranges.values())
    hi = min(r[1] for r in ranges.values())
    if hi <= lo:
        raise SystemExit(f"no latency is feasible on every runtime and binding on all of them "
                         f"(narrowest up to {lo:.4g} ms, full from {hi:.4g} ms): {ranges}")
    return budgets_between(lo, hi, fractions)


def table_for(runtime: str, args, net, log):
    """The runtime's table: ``--table``, else ``--table-dir``'s, measured there when missing."""
    from hwslim.latency.table import LatencyTable, default_table_path
    from hwslim.latency.profile import ProfileSettings, profile
    from profilers import backend_class

    if runtime in args.table:
        return LatencyTable.load(args.table[runtime])
    cls = backend_class(runtime)
    path = default_table_path("cpu", cls.machine_name(), net.name, net.width_mult, net.input_size, args.batch,
                              cls.backend, args.threads, "float32", root=args.table_dir)
    try:
        return LatencyTable.load(path)
    except Exception:  # missing or incomplete: measure (or finish) it
        pass
    log(f"{runtime}: measuring {path}")
    res = profile(ProfileSettings(device="cpu", backend=runtime, model=args.model, width_mult=net.width_mult,
                                  input_size=net.input_size, batch=args.batch, threads=args.threads,
                                  out=str(path), quick=args.quick,
                                  **({"calib_configs": 4, "holdout_configs": 2} if args.quick else {})),
                  progress=not args.quiet, log=log)
    return LatencyTable.load(res.path)


def run(args, log) -> list[dict]:
    import torch

    from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
    from hwslim.importing.data import synthetic_data_info
    from hwslim.models import create_model
    from hwslim.latency.profile import measure_configs
    from hwslim.search.greedy import Budget, SearchOptions, greedy_search
    from profilers import profiler_for_table

    width, size = MODELS[args.model]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trained = args.checkpoint is not None
    if trained:
        ckpt_path = args.checkpoint
    else:
        torch.manual_seed(0)
        net = create_model(args.model, width_mult=width, input_size=size)
        info = synthetic_data_info(num_train=max(2 * args.search_images, 64), num_search=args.search_images,
                                   input_size=size, num_val=16)
        ckpt_path = save_checkpoint(work / f"untrained_{args.model}.pt", net, data=info)
    ckpt = load_checkpoint(ckpt_path)
    net = ckpt.model.eval()

    tables = {rt: table_for(rt, args, net, log) for rt in args.runtimes}
    for rt, t in tables.items():
        t.check_compatible(net, batch=args.batch, threads=args.threads, backend=rt)
    ranges = {rt: (t.predict_ms(net.layer_specs(net.min_config(), batch=args.batch)),
                   t.predict_ms(net.layer_specs(net.full_config(), batch=args.batch))) for rt, t in tables.items()}
    budgets = common_budgets(ranges, args.fractions)
    log("predicted narrowest .. full: " + "; ".join(f"{rt} {lo:.4g} .. {hi:.4g} ms" for rt, (lo, hi)
                                                     in ranges.items()) + f"; budgets {budgets} ms")

    chosen: dict[tuple[float, str], object] = {}  # (budget, searched for) -> config
    search_s = {}
    for rt, table in tables.items():
        t0 = time.perf_counter()
        result = greedy_search(ckpt, [Budget("latency_ms", b) for b in budgets],
                               SearchOptions(out_dir=work / f"search_{rt}", force=True, max_images=args.search_images,
                                             batch=args.batch, progress=not args.quiet, plot=False),
                               table=table, log=log)
        search_s[rt] = round(time.perf_counter() - t0, 1)
        for b, cfg in zip(budgets, result.configs):
            chosen[(b, rt)] = cfg

    # every distinct config once, measured on every runtime, interleaved within each runtime
    key = lambda c: tuple(sorted(c.widths.items()))  # noqa: E731
    distinct = list({key(c): c for c in chosen.values()}.values())
    measured: dict[tuple[tuple, str], object] = {}
    load = {}
    for rt, table in tables.items():
        import os

        before = os.getloadavg()[0]
        prof = profiler_for_table(table)
        try:
            log(f"measuring {len(distinct)} configs end to end on {rt}")
            timings = measure_configs(prof, net, distinct, args.batch, size, rounds=args.rounds,
                                      progress=not args.quiet)
        finally:
            prof.close()
        load[rt] = f"{before:.1f}->{os.getloadavg()[0]:.1f}"
        for cfg, t in zip(distinct, timings):
            measured[(key(cfg), rt)] = t

    rows = []
    for (b, searched_for), cfg in chosen.items():
        for on, table in tables.items():
            t = measured[(key(cfg), on)]
            pred = table.predict_ms(net.layer_specs(cfg, batch=args.batch))
            rows.append({
                "model": f"{args.model} x{width:g} {size}px", "budget_ms": b, "searched_for": searched_for,
                "measured_on": on, "predicted_ms": round(pred, 4), "measured_ms": round(t.median_ms, 4),
                "iqr_ms": round(t.iqr_ms, 4), "noisy": t.noisy,
                "budget_used_%": round(100 * t.median_ms / b, 1),
                "within_budget_3%": t.median_ms <= b * (1 + BUDGET_SLACK),
                "own_choice": searched_for == on,
                "search_acc": round(float(cfg.meta.get("search_acc", float("nan"))), 4) if trained else "untrained",
                "params": int(cfg.meta.get("params", 0)), "macs": int(cfg.meta.get("macs", 0)),
                "all_runtimes_same_config": len({key(chosen[(b, r)]) for r in args.runtimes}) == 1,
                "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
                "search_s": search_s[searched_for], "load_avg_1min": load[on],
                "backend_version": table.meta.get("backend_version"), "table": str(table.path),
                "widths": ",".join(f"{u}={w}" for u, w in sorted(cfg.widths.items())),
            })
    return rows


def pivot(rows: list[dict], runtimes: list[str]) -> list[dict]:
    """One line per (budget, searched for): measured ms and verdict on each runtime, accuracy."""
    out: dict[tuple, dict] = {}
    for r in rows:
        line = out.setdefault((r["budget_ms"], r["searched_for"]), {
            "budget_ms": r["budget_ms"], "searched_for": r["searched_for"], "search_acc": r["search_acc"],
            "params": r["params"]})
        verdict = "ok" if r["within_budget_3%"] else "OVER"
        line[f"on_{r['measured_on']}_ms"] = f"{r['measured_ms']:.4g} {verdict} ({r['budget_used_%']:.0f}%)"
    return list(out.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=list(MODELS))
    p.add_argument("--runtimes", default="ort,openvino", help="comma-separated CPU backends (default ort,openvino)")
    p.add_argument("--fractions", default="0.3,0.55,0.8",
                   help="budgets at these fractions between the slowest narrowest and the fastest full latency")
    p.add_argument("--threads", type=int, default=1, help="runtime threads of every table")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpoint", help="a trained supernet of --model (default: untrained, synthetic images)")
    p.add_argument("--table", action="append", default=[], metavar="RUNTIME=PATH", help="use this runtime's table")
    p.add_argument("--table-dir", default=str(ROOT / "runs" / "cross_runtime" / "tables"),
                   help="where tables are looked up and measured when missing")
    p.add_argument("--work", default=str(ROOT / "runs" / "cross_runtime"), help="checkpoints and searches")
    p.add_argument("--search-images", type=int, default=200, help="search-split images per candidate")
    p.add_argument("--rounds", type=int, default=E2E_ROUNDS, help="interleaved end-to-end rounds per runtime")
    p.add_argument("--torch-threads", type=int, default=1, help="PyTorch threads for the search")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: short protocol, tables and searches in a temporary directory, nothing written")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.table = dict(kv.split("=", 1) for kv in args.table)

    import torch

    torch.set_num_threads(args.torch_threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="hwslim-cross-") as tmp:
        if args.quick:
            args.table_dir, args.work = f"{tmp}/tables", f"{tmp}/work"
            args.search_images = min(args.search_images, 32)
            args.rounds = min(args.rounds, 2)
        rows = run(args, log)
    print_table(pivot(rows, args.runtimes))
    over = [r for r in rows if not r["own_choice"] and not r["within_budget_3%"]]
    own_over = [r for r in rows if r["own_choice"] and not r["within_budget_3%"]]
    same = sum(1 for r in rows if r["own_choice"] and r["all_runtimes_same_config"])
    print(f"configs over budget on a runtime they were not searched for: {len(over)} of "
          f"{sum(not r['own_choice'] for r in rows)}; on their own runtime: {len(own_over)} of "
          f"{sum(r['own_choice'] for r in rows)}; budgets where every runtime chose the same config: "
          f"{same // len(args.runtimes)} of {len(rows) // len(args.runtimes) ** 2}")
    if args.quick:
        print("--quick: a smoke run, nothing written")
        return 0
    print(f"wrote {write_csv(rows, f'cross_runtime_{args.model}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
