"""Is a table's depthwise slope worth its parameter? Refit its calibration both ways and compare.

For a latency table (its NAME.e2e.csv calibration configs) and a `lut_accuracy.py` run's
``*_configs.csv`` (held-out configs measured end to end), this prints and records: the
correlation of the depthwise and the other layers' table time across the calibration configs,
the one-slope and two-slope fits (on the fitted configs and on all 32), their leave-one-out RMS
relative error, their share of held-out configs within +-5% / +-10%, and the best line fitted on
the held-out configs themselves (what no calibration can beat). Measures nothing: seconds.

    python benchmarks/calibration_refit.py --model mobilenet_v3_large \\
        --table latency_tables/cpu-amd-epyc/mobilenet_v3_large-x1-224px-b1-ort-t1-float32.csv \\
        --configs benchmarks/results/lut_accuracy_cpu_ort_b1_mobilenet_v3_large_quiet_configs.csv

Writes benchmarks/results/calibration_refit_<model>.csv.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere as a script

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import print_table, write_csv  # noqa: E402
from hwslim.latency.table import LatencyTable, _fit_two, _loo_rms, fit_line, table_paths  # noqa: E402
from hwslim.models import create_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--table", required=True)
    p.add_argument("--configs", required=True, help="a lut_accuracy *_configs.csv of this model")
    args = p.parse_args()
    net = create_model(args.model, width_mult=args.width_mult).eval()
    table = LatencyTable.load(args.table)
    size, batch = table.meta["input_size"], table.meta["batch"]

    def sums(widths: str) -> tuple[float, float]:
        specs = net.layer_specs(net.config_of(json.loads(widths)), batch=batch, input_size=size)
        return table.sum_ms(specs), table.depthwise_ms(specs)

    calib = pd.read_csv(table_paths(table.path)[2])
    calib[["s", "d"]] = [sums(w) for w in calib.widths]
    check = pd.read_csv(args.configs)
    check = check[check.model == args.model]
    check[["s", "d"]] = [sums(w) for w in check.widths]
    corr = float(np.corrcoef(calib.d, calib.s - calib.d)[0, 1])

    def share(pred) -> dict:
        err = np.abs(np.asarray(pred) / check.measured_ms.to_numpy() - 1)
        return {"within_5pct": round(float(np.mean(err <= 0.05)), 3), "within_10pct": round(float(np.mean(err <= 0.10)), 3)}

    rows = []
    for fit_on, sub in (("fit configs", calib[calib.role == "fit"]), ("all calibration configs", calib)):
        s, d, y = (sub[c].to_numpy(float) for c in ("s", "d", "median_ms"))
        a, b = fit_line(s, y)
        rows.append({"fit_on": fit_on, "model_form": "one slope", "a": round(a, 3), "a_dw": None, "b": round(b, 3),
                     "loo_rms_pct": round(100 * _loo_rms(s, d, y, False), 2), **share(a * check.s + b)})
        a2, a_dw, b2 = _fit_two(s, d, y)
        rows.append({"fit_on": fit_on, "model_form": "two slopes", "a": round(a2, 3), "a_dw": round(a_dw, 3),
                     "b": round(b2, 3), "loo_rms_pct": round(100 * _loo_rms(s, d, y, True), 2),
                     **share(a2 * (check.s - check.d) + a_dw * check.d + b2)})
    a, b = fit_line(check.s, check.measured_ms)
    rows.append({"fit_on": "held-out configs themselves (the best line)", "model_form": "one slope", "a": round(a, 3),
                 "a_dw": None, "b": round(b, 3), "loo_rms_pct": None, **share(a * check.s + b)})
    rows = [{"model": args.model, "table": args.table, "corr_dw_vs_rest": round(corr, 3), **r} for r in rows]
    print(f"correlation of depthwise and other layer time over the calibration configs: {corr:.3f}")
    print_table(rows, ["fit_on", "model_form", "a", "a_dw", "b", "loo_rms_pct", "within_5pct", "within_10pct"])
    print(f"results: {write_csv(rows, f'calibration_refit_{args.model}')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
