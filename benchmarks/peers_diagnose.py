"""Why hwslim trails Torch-Pruning on ResNet-20: the start, or the architecture the search picks?

For each budget of a finished ``benchmarks/peers.py`` run, Torch-Pruning's pick is rebuilt (the
same variant and ratio from the run's CSV, the same full model) and its widths read as a config
of hwslim's supernet (every Torch-Pruning pick with ``round_to`` 8 lies on the supernet's grid).
Three networks are then compared per budget:

* hwslim's pick (the run's ``search/config_*.json``),
* Torch-Pruning's *widths* as an hwslim config, finetuned from the supernet's weights
  (``hwslim finetune``): Torch-Pruning's architecture with hwslim's start,
* Torch-Pruning's pruned module itself, finetuned as the run finetunes it,

by the table's predicted latency, parameters, search-split top-1 with the supernet's shared
weights (what the search ranks by; BN recalibrated, ``--search-images`` images) and top-1 on the
10,000 test images after the run's finetuning recipe (seed 0). If the second network scores like
the third, hwslim's start is not what loses; if it beats hwslim's pick although the shared
weights rank it lower, the search's score is what misleads.

    python benchmarks/peers_diagnose.py --run runs/peers/resnet20 \\
        --csv benchmarks/results/peers_resnet20_reduced_3seeds.csv
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_csv
from benchmarks.peers import ASSETS, DATA, REDUCED, hwslim_finetune, plain_correct, plain_finetune, recalibrated_top1
from hwslim.core.config import ChannelConfig
from hwslim.core.materialize import materialize
from hwslim.importing.checkpoint import load_checkpoint
from hwslim.importing.data import build_data, search_split, validation_split
from hwslim.latency.table import LatencyTable
from hwslim.search.greedy import config_costs


def conv_widths(module: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


def unit_of_conv(net) -> dict[str, str]:
    """Each conv of the materialized full network -> the supernet unit that sets its width."""
    base = conv_widths(materialize(net, net.full_config()))
    owner: dict[str, str] = {}
    for name, unit in net.units.items():
        widths = dict(net.full_config().widths)
        widths[name] = unit.grid[0]
        for conv, w in conv_widths(materialize(net, net.config_of(widths))).items():
            if w != base[conv]:
                owner.setdefault(conv, name)
    return owner


def tp_pruned(full: nn.Module, variant: str, ratio: float) -> nn.Module:
    """Torch-Pruning's module for a peers.py variant ("magnitude round_to=8 global") and ratio."""
    import torch_pruning as tp

    imp_name, round_to, scope = variant.split()
    m = copy.deepcopy(full).eval()
    imp = tp.importance.MagnitudeImportance(p=2) if imp_name == "magnitude" else tp.importance.GroupMagnitudeImportance(p=2)
    tp.pruner.BasePruner(m, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=ratio,
                         global_pruning=scope == "global", round_to=int(round_to.split("=")[1]),
                         ignored_layers=[x for x in m.modules() if isinstance(x, nn.Linear)]).step()
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a peers.py work folder (runs/peers/resnet20)")
    ap.add_argument("--csv", type=Path, required=True, help="that run's peers_*.csv")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--search-images", type=int, default=0, help="0: the whole search split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()[0]
    ckpt = load_checkpoint(ASSETS / f"cifar10_{args.model}_x1.pt")
    ckpt = replace(ckpt, data={**ckpt.data, "root": str(DATA), "spec": str(DATA)})
    net = ckpt.model.float().eval()
    full = materialize(net, net.full_config()).eval()
    table = LatencyTable.load(args.run / "table.csv")
    full_ms = config_costs(net, net.full_config(), table)["latency_ms"]
    owner = unit_of_conv(net)
    xs, ys = search_split(ckpt, max_images=args.search_images or None)
    calib = build_data(str(DATA), net.input_size, search_size=0, seed=1, train_subset=500).calibration_images(500)
    xv, yv = validation_split(ckpt, max_images=None)
    runs = pd.read_csv(args.csv)
    runs = runs[(runs.model == args.model) & (runs.seed == args.seed)]
    hw_files = sorted((args.run / "search").glob("config_latency_ms_*.json"),
                      key=lambda p: float(p.stem.rsplit("_", 1)[1]))
    rows = []
    for f, hw_file in zip(sorted(runs.budget.unique()), hw_files):
        pick = runs[(runs.budget == f) & (runs.method == "torch-pruning")].iloc[0]
        module = tp_pruned(full, pick.variant, float(pick.target))
        got = conv_widths(module)
        widths: dict[str, int] = {}
        for conv, unit in owner.items():
            widths[unit] = max(widths.get(unit, 0), got[conv])
        nets = [("hwslim pick", ChannelConfig.load(hw_file), None),
                ("Torch-Pruning's widths, hwslim's start", net.config_of(widths), None),
                ("Torch-Pruning's module", None, module)]
        for name, cfg, mod in nets:
            work = args.run.parent / "diagnose" / f"{f:.2f}_{name.split()[0].strip(chr(39))}_{len(rows)}"
            if cfg is not None:
                costs = config_costs(net, cfg, table)
                shared = recalibrated_top1(materialize(net, cfg), xs, ys, calib)
                trained = hwslim_finetune(args.run / "supernet.pt", cfg, REDUCED, args.seed, work, 1)
            else:
                costs = {"latency_ms": float("nan"), "params_m": sum(p.numel() for p in mod.parameters()) / 1e6}
                shared = recalibrated_top1(mod, xs, ys, calib)
                trained = plain_finetune(args.run / "supernet.pt", mod, REDUCED, args.seed, work)
            acc = float(plain_correct(trained, xv, yv).float().mean())
            rows.append({"model": args.model, "budget": f, "network": name,
                         "tp_variant": f"{pick.variant} {pick.target}",
                         "table_latency_ratio": round(costs["latency_ms"] / full_ms, 3),
                         "params_m": round(costs["params_m"], 4),
                         "search_top1_shared": round(100 * shared, 2), "test_top1_finetuned": round(100 * acc, 2),
                         "widths": "" if cfg is None else " ".join(f"{u}={w}" for u, w in cfg.widths.items())})
            print(f"[{time.time() - t0:5.0f} s] {f:.2f} {name}: shared {100 * shared:.2f}, finetuned {100 * acc:.2f}",
                  flush=True)
    print_table(rows, ["budget", "network", "table_latency_ratio", "params_m", "search_top1_shared",
                       "test_top1_finetuned"])
    load = f"{load0:.1f}->{os.getloadavg()[0]:.1f}"
    print(f"{time.time() - t0:.0f} s; load average (1 min) {load}; search split {len(ys)} images; seed {args.seed}")
    print(f"written to {write_csv([{**r, 'load_avg_1min': load} for r in rows], f'peers_diagnose_{args.model}')}")


if __name__ == "__main__":
    main()
