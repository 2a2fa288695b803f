"""Where a latency table's prediction and the measured model part: layer by layer, config by config.

For each config (by default the configs a `lut_accuracy.py` run recorded for the model) this
measures, side by side on the same ONNX Runtime profiler as the table:

* ``table_sum``: the sum of the table's entries for the config's layers (what the prediction sums);
* ``inconfig_sum``: the same layers timed inside the config itself, exactly as the table times
  them inside its designed networks (ONNX Runtime's per-kernel profiler, kernels charged to
  layers): ``inconfig_sum - table_sum`` is what the layers' *context* changes;
* ``network_ms``: that same network run end to end without the profiler:
  ``network_ms - inconfig_sum`` is the time no kernel accounts for (the executor's per-node
  overhead, the profiler's own cost);
* ``exported_ms``: the exported model of the materialized config (what `verify` measures):
  ``exported_ms - network_ms`` is what the export's graph does differently from the
  network built from the operators.

Per layer class (dense conv, depthwise conv, pointwise conv, SE, add, pool, linear, ...)
it reports the table-vs-in-config ratio, so a class the designed networks time wrongly stands out.

    python benchmarks/lut_diagnose.py --model mobilenet_v3_large
    python benchmarks/lut_diagnose.py --model mobilenet_v2 --width-mult 1.5 --table /tmp/t/cpu-amd-epyc/...csv

Writes benchmarks/results/lut_diagnose_<model>[_<tag>].csv (per config) and ..._classes.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_csv  # noqa: E402
from hwslim.latency.table import LatencyTable, find_table  # noqa: E402
from hwslim.models import create_model  # noqa: E402
from profilers import get_profiler  # noqa: E402
from profilers.base import Timing  # noqa: E402
from profilers.ort import network_model  # noqa: E402


def layer_class(spec) -> str:
    """A coarse class of a layer for the breakdown: the operator's kind, with its kernel size and
    whether it is depthwise (``conv_1x1``, ``conv_dw3``, ``se``, ``linear``...)."""
    k = getattr(spec.op, "kernel", None)
    if spec.depthwise:
        return f"{spec.op.kind}_dw{k}"
    return f"{spec.op.kind}_{k}x{k}" if k else spec.op.kind


def iqm(xs) -> float:
    return Timing.from_samples(xs, center="iqm").median_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--input-size", type=int)
    p.add_argument("--table", help="the table (default: the one hwslim search would find)")
    p.add_argument("--configs", help="a lut_accuracy *_configs.csv whose configs to use")
    p.add_argument("--limit", type=int, default=0, help="at most this many configs (0: all)")
    p.add_argument("--repeats", type=int, default=2, help="profiled runs of each config network (pooled)")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    net = create_model(args.model, width_mult=args.width_mult).eval()
    size = args.input_size or net.input_size
    table = LatencyTable.load(args.table or find_table("cpu", args.model, net.width_mult, input_size=size))
    if table.meta["backend"] != "ort" or table.meta.get("method") != "in_network":
        sys.exit(f"{table.path}: lut_diagnose needs an ONNX Runtime table timed in networks "
                 f"(this one: {table.meta['backend']}, {table.meta.get('method')})")
    batch = int(table.meta["batch"])
    if args.configs:
        import pandas as pd

        d = pd.read_csv(args.configs)
        configs = [(r.kind, net.config_of(json.loads(r.widths)), r.err_pct) for r in d.itertuples()]
    else:
        import random

        rng = random.Random(1)
        configs = [("uniform", c, None) for c in net.uniform_configs()]
        configs += [("random", net.random_config(rng), None) for _ in range(20)]
    if args.limit:
        configs = configs[: args.limit]

    rows, per_class = [], {}
    with get_profiler("cpu", table.meta["backend"], **table.meta.get("settings", {})) as prof, \
            tempfile.TemporaryDirectory() as tmp:
        for i, (kind, cfg, err) in enumerate(configs):
            specs = net.layer_specs(cfg, batch=batch, input_size=size)
            samples: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for layer, xs in prof.profile_network(specs).items():
                    samples.setdefault(layer, []).extend(xs)
            inconfig = {s.name: iqm(samples[s.name]) for s in specs if samples.get(s.name)}
            tab = {s.name: table.layer_ms(s) for s in specs}
            for s in specs:
                c = per_class.setdefault(layer_class(s), {"table": 0.0, "inconfig": 0.0, "n": 0})
                c["table"] += tab[s.name]
                c["inconfig"] += inconfig.get(s.name, 0.0)
                c["n"] += 1
            # the spec-built network and the exported model, end to end, interleaved
            npath = os.path.join(tmp, f"n{i}.onnx")
            with open(npath, "wb") as f:
                f.write(network_model(specs).SerializeToString())
            from hwslim.core.materialize import materialize

            epath = prof.write_model(materialize(net, cfg, fold_bn=True).eval(), Path(tmp) / f"e{i}", batch=batch,
                                     input_size=size)
            shape = (batch, net.in_channels, size, size)
            t_net, t_exp = prof.time_onnx_many([(npath, shape), (str(epath), shape)], rounds=3)
            pred = table.predict_ms(specs)  # what search and verify predict
            rows.append({"model": args.model, "kind": kind, "table_sum": round(sum(tab.values()), 4),
                         "table_dw": round(table.depthwise_ms(specs), 4),
                         "inconfig_sum": round(sum(inconfig.values()), 4),
                         "inconfig_dw": round(sum(inconfig.get(s.name, 0.0) for s in specs if s.depthwise), 4),
                         "network_ms": round(t_net.median_ms, 4), "exported_ms": round(t_exp.median_ms, 4),
                         "predicted_ms": round(pred, 4),
                         "err_pct": round((pred / t_exp.median_ms - 1) * 100, 2),
                         "recorded_err_pct": err, "layers": len(specs)})
            r = rows[-1]
            print(f"[{i + 1}/{len(configs)}] {kind:7s} table {r['table_sum']:.3f} in-config {r['inconfig_sum']:.3f} "
                  f"network {r['network_ms']:.3f} exported {r['exported_ms']:.3f} predicted {r['predicted_ms']:.3f} "
                  f"({r['err_pct']:+.1f}%)", file=sys.stderr, flush=True)
    classes = [{"class": k, "layers": v["n"], "table_ms": round(v["table"], 3), "inconfig_ms": round(v["inconfig"], 3),
                "inconfig_over_table": round(v["inconfig"] / v["table"], 3) if v["table"] else None}
               for k, v in sorted(per_class.items(), key=lambda kv: -kv[1]["table"])]
    ratio = lambda a, b: [x / y for x, y in zip(a, b)]  # noqa: E731
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    summary = {
        "inconfig/table": statistics.median(ratio(col("inconfig_sum"), col("table_sum"))),
        "network/inconfig": statistics.median(ratio(col("network_ms"), col("inconfig_sum"))),
        "exported/network": statistics.median(ratio(col("exported_ms"), col("network_ms"))),
        "network-inconfig ms": statistics.median([a - b for a, b in zip(col("network_ms"), col("inconfig_sum"))]),
        "err within 5% (now)": float(np.mean([abs(e) <= 5 for e in col("err_pct")])),
    }
    print_table(classes)
    for k, v in summary.items():
        print(f"{k:24s} {v:.4f}")
    stem = f"lut_diagnose_{args.model}" + (f"_{args.tag}" if args.tag else "")
    print(write_csv(rows, stem))
    print(write_csv(classes, f"{stem}_classes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
