"""Does the latency-aware search pay off? Accuracy at equal latency, CPU-sized.

One supernet (trained here on the built-in synthetic data unless --checkpoint), one
latency table of this CPU (profiled here unless --table), three latency budgets
between the narrowest and the full config. For each budget it compares, on the
*validation* split (never seen by the search), after BN recalibration:

* ``latency/acc``          latency budgets, AutoSlim's smallest-accuracy-drop rule, BN recalibrated,
                           the budget filled after the walk (the default, ``fill_budget``)
* ``latency/acc-per-cost`` latency budgets, NetAdapt's drop-per-ms-saved rule
* ``latency/acc bn=recal`` (``--bn-variant``) as the first, BN recalibrated per candidate instead of batch statistics
* ``... no-fill``          each of the three as the walk chose it, before the budget filling
                           (the same search: the walk's config is on its path)
* ``macs/acc``             a MACs-driven walk (the paper's), cut where its predicted latency meets the budget
* ``uniform``              the widest uniform-width config within the budget

and measures every chosen config end to end with the table's backend (ONNX Runtime).
``used`` is the predicted latency over the budget, ``measured_used`` the measured one.

    python benchmarks/search_quality.py [--model resnet20] [--epochs 8] [--checkpoint CKPT] [--table TABLE] [--threads 2]

Every row records the PyTorch threads the walks ran on and the machine's load at the start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the repo root

from benchmarks.common import print_table, write_csv  # noqa: E402
from hwslim.importing.checkpoint import load_checkpoint  # noqa: E402
from hwslim.importing.data import search_split, validation_split  # noqa: E402
from hwslim.core.accuracy import accuracy  # noqa: E402
from hwslim.search.evaluator import Scoring  # noqa: E402
from hwslim.runtimes.onnx_file import export_onnx  # noqa: E402
from hwslim.latency.table import LatencyTable  # noqa: E402
from hwslim.core.materialize import materialize  # noqa: E402
from hwslim.search.greedy import Budget, SearchOptions, Target, config_costs, greedy_search, slim  # noqa: E402


@dataclass(frozen=True)
class MacsWalkUntil(Target):
    """A walk whose binding budget is MACs (each step shrinks the unit whose MACs-lowering
    shrink hurts accuracy least, the paper's walk) that stops once ``until`` holds."""

    until: Budget | None = None

    def met(self, costs) -> bool:  # or the MACs floor: the walk ends there whatever the latency
        return self.until.met(costs) or self.budget.met(costs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-images", type=int, default=1800)
    ap.add_argument("--search-images", type=int, default=500)
    ap.add_argument("--val-images", type=int, default=None,
                    help="validation/test images to score on (default: all of them; 10,000 for CIFAR-10)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="search-split images the walks score on (default: as `hwslim search`)")
    ap.add_argument("--checkpoint")
    ap.add_argument("--bn-variant", action="store_true",
                    help="also walk with BN recalibrated per candidate (the default scores with batch statistics)")
    ap.add_argument("--table")
    ap.add_argument("--out", default="runs/search_quality")
    ap.add_argument("--quick", action="store_true", help="a short profiling protocol (smoke runs)")
    ap.add_argument("--fractions", type=float, nargs=3, default=[0.75, 0.5, 0.3],
                    help="budgets at these fractions of the way from the narrowest to the full latency")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads for training and the walks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.checkpoint:
        ckpt_path = Path(args.checkpoint)
    else:
        from hwslim.training.train import TrainConfig, train

        # the recipe measured for short CPU runs on synthetic data (tests/test_train.py)
        res = train(TrainConfig(model=args.model, width_mult=args.width_mult, input_size=args.input_size,
                                data=f"synthetic:{args.train_images + args.search_images}", epochs=args.epochs,
                                out=str(out / "train"), search_size=args.search_images, device="cpu",
                                batch_size=64, lr=0.1, warmup_epochs=1.5, num_random=1, force=True,
                                eval_images=1000, progress=False))
        ckpt_path = res.checkpoint
    ckpt = load_checkpoint(ckpt_path)
    net = ckpt.model
    print(f"supernet ready ({time.time() - t0:.0f} s)")
    if args.table:
        table_path = Path(args.table)
    else:
        from hwslim.latency.profile import ProfileSettings, profile

        res = profile(ProfileSettings(device="cpu", model=net.name, width_mult=net.width_mult,
                                      input_size=net.input_size, threads=1, out=str(out / "table.csv"),
                                      force=True, quick=args.quick), progress=True)
        table_path = res.path
    table = LatencyTable.load(table_path)
    print(f"table ready ({time.time() - t0:.0f} s)")
    lo = config_costs(net, net.min_config(), table)["latency_ms"]
    hi = config_costs(net, net.full_config(), table)["latency_ms"]
    budgets = [Budget("latency_ms", float(f"{lo + f * (hi - lo):.3g}")) for f in args.fractions]
    chosen: dict[str, list] = {}
    runs = {"latency/acc": dict(criterion="acc"), "latency/acc-per-cost": dict(criterion="acc-per-cost")}
    if args.bn_variant:  # the walk scored with BN recalibrated per candidate instead of batch statistics
        runs["latency/acc bn=recal"] = dict(criterion="acc", scoring=Scoring(bn="recal"))
    for name, kw in runs.items():
        ts = time.time()
        opts = SearchOptions(out_dir=out / name.replace("/", "_").replace(" ", "_").replace("=", "-"), force=True,
                             progress=False, plot=False, max_images=args.max_images, **kw)
        r = greedy_search(load_checkpoint(ckpt_path), budgets, opts, table=table)
        chosen[name] = r.configs
        chosen[f"{name} no-fill"] = [net.config_of(r.steps[c.meta["search_step"]].widths) for c in r.configs]
        widened = [c.meta["fill_steps"] for c in r.configs]
        print(f"{name}: {len(r.steps) - 1} steps, then {widened} widening steps, in {time.time() - ts:.0f} s")
    # the paper's MACs-driven walk, read at the points where its predicted latency meets each budget;
    # it walks only as far as the lowest budget (not down to the MACs floor), scored as the others
    ts = time.time()
    floor = Budget("macs_m", config_costs(net, net.min_config())["macs_m"])
    xw, yw = search_split(ckpt, max_images=args.max_images)
    path = slim(net, *Scoring().build(net, xw, yw), lambda c: config_costs(net, c, table),
                [MacsWalkUntil(floor, until=min(budgets, key=lambda b: b.value))], criterion="acc")
    chosen["macs/acc"] = [net.config_of(next(s for s in path if s.costs["latency_ms"] <= b.value).widths)
                          for b in budgets]
    print(f"macs/acc: {len(path) - 1} steps in {time.time() - ts:.0f} s")
    uniform = net.uniform_configs()
    chosen["uniform"] = [max((u for u in uniform if config_costs(net, u, table)["latency_ms"] <= b.value),
                             key=lambda u: config_costs(net, u, table)["latency_ms"]) for b in budgets]

    xs, ys = search_split(ckpt, max_images=2000)  # BN recalibration images (spread over the split)
    xv, yv = validation_split(ckpt, max_images=args.val_images)
    from profilers import profiler_for_table

    rows, scored = [], {}
    with profiler_for_table(table) as prof, tempfile.TemporaryDirectory() as tmp:
        for bi, b in enumerate(budgets):
            for name, cfgs in chosen.items():
                cfg = cfgs[bi]
                onnx = export_onnx(materialize(net, cfg, fold_bn=True), Path(tmp) / "m.onnx")
                measured = prof.time_onnx(onnx, (1, 3, net.input_size, net.input_size)).median_ms
                c = config_costs(net, cfg, table)
                key = json.dumps(cfg.widths, sort_keys=True)
                if key not in scored:  # methods often pick the same config: score each once
                    scored[key] = accuracy(net, cfg, xv, yv, calib_images=xs)
                acc = scored[key]
                rows.append({"budget_ms": b.value, "method": name, "val_acc": 100 * acc,
                             # binomial standard error of an accuracy on len(yv) images
                             "val_se": 100 * (acc * (1 - acc) / len(yv)) ** 0.5, "val_images": len(yv),
                             "predicted_ms": c["latency_ms"], "measured_ms": measured,
                             "used": c["latency_ms"] / b.value, "measured_used": measured / b.value,
                             "macs_m": c["macs_m"], "params_m": c["params_m"]})
            print_table(rows[-len(chosen):])
    print()
    print_table(rows)
    load = f"{load_before:.1f}->{os.getloadavg()[0]:.1f}"
    path = write_csv([{**r, "model": f"{net.name}@{net.width_mult:g}", "checkpoint": str(ckpt_path),
                       "table": str(table_path), "threads": args.threads, "load_avg_1min": load} for r in rows],
                     f"search_quality_{net.name}")
    print(f"\nwritten to {path} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
