from __future__ import annotations

import json

import torch

from hwslim.cli import add_command, print_table
from hwslim.costs import model_costs
from hwslim.models import create_model, list_models


def register(sub) -> None:
    p = add_command(sub, "models", run, run.__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    """List the model zoo: each supernet's default multiplier, input size, units and full-width costs."""
    rows = []
    for name in list_models():
        with torch.device("meta"):
            net = create_model(name)
        c = model_costs(net)
        rows.append({"model": name, "width_mult": net.width_mult, "input_size": net.input_size,
                     "classes": net.num_classes, "units": len(net.units), "params": c.params, "macs": c.macs})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0
