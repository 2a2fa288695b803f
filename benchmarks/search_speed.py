"""Search speed: the whole greedy walk, every candidate scored in full with BN recalibrated (the old
default) against the default scoring (BN batch statistics, successive halving), side by side, and
whether the faster walk decides as well.

One supernet (``--checkpoint``, else a fresh one on synthetic data for a smoke run), its search
split, and a walk from the full config to the narrowest (a MACs budget at the narrowest config's
MACs; with ``--table``, a latency budget at the narrowest config's predicted latency). Sections,
each printed as a table and written to ``benchmarks/results/search_speed_<model>_<section>.csv``:

* ``walk``: both walks run in lockstep, one greedy step of each in turn (the order alternating),
  so drifting machine load hits both alike; seconds per walk and per step, the load average.
* ``decisions``: the units the two walks chose on their first ``--compare-steps`` (10) steps.
* ``levers``: each way of scoring faster, alone and together, and the full scoring again, decides
  one step from each of the full walk's first ``--lever-steps`` configs, in a rotating order:
  seconds per step, the median per-step speedup over the full scoring, and how often it chose the
  unit the full scoring chose (a measured ranking stability).
* ``heldout``: top-1 on the checkpoint's held-out split (BN recalibrated as ``hwslim eval`` does) of
  each walk's first config within three budgets (``--fractions`` of the way from the narrowest to
  the full cost), with its standard error; and the budget filling at the middle budget, scored the
  old way (each widening in a full pass) and the new way: seconds and top-1.

    python benchmarks/search_speed.py --checkpoint CKPT [--table TABLE] [--threads 1] [--val-images N]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/search_speed.py` from the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import print_table, write_csv  # noqa: E402
from hwslim.importing.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from hwslim.importing.data import search_split, synthetic_data_info  # noqa: E402
from hwslim.pipeline.heldout import evaluate_configs_heldout  # noqa: E402
from hwslim.search.evaluator import Scoring  # noqa: E402
from hwslim.models import create_model  # noqa: E402
from hwslim.search.greedy import Budget, Step, config_costs, fill_budget, pick_steps, slim  # noqa: E402

SECTIONS = ("walk", "levers", "heldout", "fill")
# every candidate on every image, BN recalibrated on all of them (in the default chunks)
OLD = Scoring(bn="recal", calib_images=None, screen_images=None)
NEW = Scoring()  # hwslim search's defaults


def levers(n: int) -> dict[str, tuple[Scoring, int] | tuple[Scoring, int, slice]]:
    """Each way of scoring faster, alone and together: name -> (scoring, PyTorch threads[, images]).

    The first is a yardstick, not a lever: full scoring on every other image of the split. How
    often it agrees with full scoring on all of them says how much of a step's decision is noise."""
    one = min(n, 1000)
    return {
        "yardstick: full on every other image": (OLD, 1, slice(0, None, 2)),
        "recal on 250 images": (replace(OLD, calib_images=250), 1),
        "recal on 100 images": (replace(OLD, calib_images=100), 1),
        "bn batch, chunks of 250": (replace(OLD, bn="batch", batch_size=250), 1),
        f"bn batch, chunks of {one}": (replace(OLD, bn="batch", batch_size=one), 1),
        "halving 200 keep 3": (replace(OLD, screen_images=200, keep=3), 1),
        "bn batch 250 + halving 200 keep 3 (the defaults before)": (
            replace(OLD, bn="batch", batch_size=250, screen_images=200, keep=3), 1),
        f"bn batch {one} + halving 200 keep 3": (replace(OLD, bn="batch", batch_size=one, screen_images=200, keep=3), 1),
        f"bn batch {one} + halving 400 keep 3": (replace(OLD, bn="batch", batch_size=one, screen_images=400, keep=3), 1),
        f"default (bn batch, default chunks + halving {NEW.screen_images} keep {NEW.keep})": (NEW, 1),
        "default, 2 threads": (NEW, 2),
    }


class _Pause(Exception):
    pass


@dataclass
class Walker:
    """One greedy walk, advanced a step at a time (``slim`` continues from its own path)."""

    name: str
    scoring: Scoring
    score_candidates: object = None
    score: object = None
    path: list[Step] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    done: bool = False

    def advance(self, net, cost_fn, target) -> None:
        def pause(step: Step) -> None:
            self.path.append(step)
            raise _Pause

        t0 = time.perf_counter()
        try:
            slim(net, self.score_candidates, self.score, cost_fn, [target], replay=list(self.path), on_step=pause)
            self.done = True
        except _Pause:
            self.times.append(time.perf_counter() - t0)


def one_step(net, scorer, score, cost_fn, target, prefix: list[Step]) -> tuple[Step, float]:
    """The step ``scorer`` takes from the last config of ``prefix``, and its seconds."""
    taken: list[Step] = []

    def pause(step: Step) -> None:
        taken.append(step)
        raise _Pause

    t0 = time.perf_counter()
    try:
        slim(net, scorer, score, cost_fn, [target], replay=list(prefix), on_step=pause)
    except _Pause:
        pass
    return taken[0], time.perf_counter() - t0


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained supernet (default: a fresh ResNet-20 on synthetic data)")
    ap.add_argument("--model", default="resnet20", help="without --checkpoint: the zoo model")
    ap.add_argument("--images", type=int, help="search-split images (default: the checkpoint's whole split; "
                                               "1,000 for the synthetic one)")
    ap.add_argument("--table", help="a latency table: walk (and set the held-out budgets) on predicted latency")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-steps", type=int, default=10)
    ap.add_argument("--lever-steps", type=int, default=10)
    ap.add_argument("--fill-steps", type=int, default=5, help="widening steps timed in the fill section")
    ap.add_argument("--fractions", type=float, nargs=3, default=[0.75, 0.5, 0.3],
                    help="held-out budgets at these fractions of the way from the narrowest to the full cost")
    ap.add_argument("--val-images", type=int, help="held-out images (default: the whole held-out split)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="what to measure (default all; levers and heldout need walk)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        n = args.images or 1000
        ckpt = Checkpoint(create_model(args.model), data=synthetic_data_info(num_train=4 * n, num_search=n))
    net = ckpt.model
    x, y = search_split(ckpt, max_images=args.images)
    table = None
    if args.table:
        from hwslim.latency.table import LatencyTable

        table = LatencyTable.load(args.table)
        table.check_compatible(net)
    kind = "latency_ms" if table is not None else "macs_m"
    cost_fn = lambda c: config_costs(net, c, table)  # noqa: E731
    lo, hi = cost_fn(net.min_config())[kind], cost_fn(net.full_config())[kind]
    target = Budget(kind, lo)
    model = f"{net.name}@{net.width_mult:g}x{net.input_size}px"
    common = {"model": model, "images": len(y), "threads": args.threads}
    print(f"{model}: {len(y):,} search images, walk to {target.label} (the narrowest config), "
          f"{args.threads} thread(s); load {load()}")

    if "walk" in args.sections:
        # -- walk: old and new in lockstep ---------------------------------------------------------------
        walkers = [Walker("old: every candidate in full", OLD), Walker("new: default scoring", NEW)]
        for w in walkers:
            w.score_candidates, w.score = w.scoring.build(net, x, y)
        load_before, t0, r = load(), time.time(), 0
        while not all(w.done for w in walkers):
            for w in (walkers if r % 2 == 0 else walkers[::-1]):
                if not w.done:
                    w.advance(net, cost_fn, target)
                    if len(w.path) % 5 == 1:
                        print(f"  {w.name}: step {len(w.path) - 1}, {sum(w.times):.0f} s so far", flush=True)
            r += 1
        load_after = load()
        rows = [{"walk": w.name, "steps": len(w.path) - 1, "walk_s": sum(w.times),
                 "median_step_s": statistics.median(w.times[1:]), "first_step_s": w.times[1],
                 "load_before": load_before, "load_after": load_after, **{k: v for k, v in asdict(w.scoring).items()
                                                                            if k not in ("mode", "kernels")},
                 "chunk": w.scoring.chunk(x)}
                for w in walkers]
        speedup = rows[0]["walk_s"] / rows[1]["walk_s"]
        print()
        print_table(rows)
        write_csv([{**common, **r, "speedup": speedup} for r in rows], f"search_speed_{net.name}_walk")
        old, new = walkers

        # -- decisions --------------------------------------------------------------------------------------
        k = min(args.compare_steps, len(old.path) - 1, len(new.path) - 1)
        drows = [{"step": i, "old_unit": f"{old.path[i].unit} {old.path[i].old}->{old.path[i].new}",
                  "new_unit": f"{new.path[i].unit} {new.path[i].old}->{new.path[i].new}",
                  "same_unit": old.path[i].unit == new.path[i].unit, "same_config": old.path[i].widths == new.path[i].widths}
                 for i in range(1, k + 1)]
        same_first = all(d["same_unit"] for d in drows)
        print()
        print_table(drows)
        write_csv([{**common, **d} for d in drows], f"search_speed_{net.name}_decisions")

        # -- levers: one step from each of the full walk's first configs, every lever in turn -------------
        lrows = []
        if "levers" in args.sections:
            m = min(args.lever_steps, len(old.path) - 1)
            variants = {"full (old default)": (OLD, args.threads), **levers(len(y))}
            built = {name: v[0].build(net, x[v[2]], y[v[2]]) if len(v) > 2 else v[0].build(net, x, y)
                     for name, v in variants.items()}
            times: dict[str, list[float]] = {name: [] for name in variants}
            same = dict.fromkeys(variants, 0)
            for i in range(m):
                names = list(variants)
                names = names[i % len(names):] + names[:i % len(names)]  # a rotating order: load drift hits all
                for name in names:
                    torch.set_num_threads(variants[name][1])
                    step, secs = one_step(net, *built[name], cost_fn, target, old.path[:i + 1])
                    torch.set_num_threads(args.threads)
                    same[name] += step.widths == old.path[i + 1].widths
                    times[name].append(secs)
                print(f"  levers: step {i + 1} of {m} (load {load()})", flush=True)
            for name, (scoring, threads, *_) in variants.items():
                ratio = statistics.median(f / t for f, t in zip(times["full (old default)"], times[name]))
                lrows.append({"lever": name, "threads": threads, "steps": m,
                              "median_step_s": statistics.median(times[name]), "same_as_full": same[name],
                              "speedup_vs_full": ratio})
            print()
            print_table(lrows)
            write_csv([{**common, **r, "load": load()} for r in lrows], f"search_speed_{net.name}_levers")

        # -- held-out accuracy at three budgets -------------------------------------------------------------
        within: list[bool] = []
        not_worse: list[bool] = []  # the new walk no more than one standard error below the old
        budgets = [Budget(kind, float(f"{lo + f * (hi - lo):.4g}")) for f in args.fractions]
        if "heldout" in args.sections:
            configs = []
            for w in walkers:
                for b, st in zip(budgets, pick_steps(w.path, budgets)):
                    configs.append((w.name, b.label, st))
            rows_cfg = [(f"{name} | {label}", net.config_of(st.widths)) for name, label, st in configs]
            t0 = time.perf_counter()
            scored, on = evaluate_configs_heldout(ckpt, rows_cfg, max_images=args.val_images)
            print(f"held-out scoring: {time.perf_counter() - t0:.0f} s on {on['images']:,} {on['split']} images")
            n_val = on["images"]
            hrows = []
            for (name, label, st), row in zip(configs, scored):
                top1 = row["top1"]
                p = top1 / 100
                hrows.append({"walk": name, "budget": label, "step": st.step, kind: st.costs[kind],
                              "search_acc": st.acc, "heldout_top1": top1, "se": 100 * math.sqrt(p * (1 - p) / n_val)})
            for b in budgets:
                a, c = (next(h for h in hrows if h["walk"] == w.name and h["budget"] == b.label) for w in walkers)
                within.append(abs(a["heldout_top1"] - c["heldout_top1"]) <= max(a["se"], c["se"]))
                not_worse.append(c["heldout_top1"] >= a["heldout_top1"] - max(a["se"], c["se"]))
            print()
            print_table(hrows)
            write_csv([{**common, "heldout_images": n_val, **h} for h in hrows], f"search_speed_{net.name}_heldout")
        print(f"\nwalk: {rows[0]['walk_s']:.0f} s (old) vs {rows[1]['walk_s']:.0f} s (new), {speedup:.2f}x; "
              f"load {load_before} -> {load_after}")
        print(f"first {k} steps: {'the same units' if same_first else 'different units'} "
              f"({sum(d['same_unit'] for d in drows)}/{k} steps chose the same unit, "
              f"{sum(d['same_config'] for d in drows)}/{k} reached the same config)")
        print(f"held-out top-1 within one standard error at {sum(within)} of {len(budgets)} budgets; "
              f"the new walk no more than one standard error below the old at {sum(not_worse)} of {len(budgets)}")

    # -- fill: the budget filling from uniform width 6/12 under a MACs budget 25% above it ------------------
    if "fill" in args.sections:
        start_cfg = net.uniform_config(6)
        c0 = cost_fn(start_cfg)
        fill_target = Budget("macs_m", float(f"{1.25 * c0['macs_m']:.4g}"))
        old_sc, old_score = OLD.build(net, x, y)
        new_sc, new_score = NEW.build(net, x, y)
        ways = {"old: each widening in a full pass (main before this change)":
                (lambda cur, cands, rank=None: [old_score(c) for _, c in cands], old_score),
                "old scoring, prefix shared with wider candidates": (old_sc, old_score),
                "new: default scoring": (new_sc, new_score)}
        frows = []
        for name, (scorer, score) in ways.items():
            s0 = score(start_cfg)
            begin = Step(0, None, None, None, s0.acc, s0.loss, c0, widths=dict(start_cfg.widths), move="start")
            t0 = time.perf_counter()
            steps = fill_budget(net, scorer, cost_fn, begin, fill_target, max_steps=args.fill_steps)
            secs = time.perf_counter() - t0
            end = steps[-1] if steps else begin
            frows.append({"fill": name, "budget": fill_target.label, "widenings": len(steps), "seconds": secs,
                          "s_per_widening": secs / max(1, len(steps)), "units": " ".join(st.unit for st in steps),
                          "used": end.costs["macs_m"] / fill_target.value, "search_acc": end.acc, "load": load()})
            print(f"  fill, {name}: {secs:.1f} s (load {load()})", flush=True)
        print()
        print_table(frows)
        write_csv([{**common, **r} for r in frows], f"search_speed_{net.name}_fill")

if __name__ == "__main__":
    main()
