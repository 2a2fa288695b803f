from __future__ import annotations

import json

import torch

from hwslim.cli import (FIX_UNSUPPORTED_HELP, add_command, note_fixed_units, positive_float, positive_int,
                        print_table)
from hwslim.core.costs import model_costs
from hwslim.models import create_model, list_models
from hwslim.importing.raw_outputs import OUTPUTS, OUTPUTS_HELP
from hwslim.importing.specs import load_model


def register(sub) -> None:
    p = add_command(sub, "models", run, run.__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--graph", metavar="MODEL",
                   help="print MODEL's graph as JSON (a zoo name, graph file or checkpoint): the model as data, "
                        "which every --model option also reads from a file")
    p.add_argument("--width-mult", type=positive_float, help="with --graph: the supernet width multiplier")
    p.add_argument("--input-size", type=positive_int, help="with --graph: the input size")
    p.add_argument("--keep", metavar="REGEX",
                   help="with --graph of an imported model: modules whose name matches keep their width")
    p.add_argument("--fix-unsupported", action="store_true", help="with --graph: " + FIX_UNSUPPORTED_HELP)
    p.add_argument("--outputs", choices=OUTPUTS, default="full", help="with --graph: " + OUTPUTS_HELP)


def run(args) -> int:
    """List the model zoo: each supernet's default multiplier, input size, units and full-width costs."""
    if args.graph:
        with torch.device("meta"):
            net = load_model(args.graph, width_mult=args.width_mult, input_size=args.input_size, keep=args.keep,
                             fix_unsupported=args.fix_unsupported, outputs=args.outputs)
        note_fixed_units(net)
        print(json.dumps(net.graph_dict(), indent=1, sort_keys=True))
        return 0
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
