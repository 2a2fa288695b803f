from __future__ import annotations

import json

import torch

from hwslim.cli import (add_command, add_import_options, note_fixed_units, positive_int,
                        print_table, retired)
from hwslim.core.config import ChannelConfig
from hwslim.core.costs import model_costs
from hwslim.core.errors import ConfigError
from hwslim.importing.specs import load_model
from hwslim.core.resources import check_inference


def register(sub) -> None:
    p = add_command(sub, "cost", run, run.__doc__)
    p.add_argument("--model", help="a zoo model (`hwslim models`), a graph JSON file, a checkpoint, "
                                   "torchvision:NAME, timm:NAME or package.module:function; taken from --config "
                                   "if omitted (zoo models only)")
    add_import_options(p)
    p.add_argument("--config", help="a ChannelConfig JSON file (default: the full-width config)")
    p.add_argument("--input-size", type=positive_int, help="input height and width (default: the config's or model's)")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="inference batch: the costs, and a table's latency, are for this many images at once "
                        "(default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--table", help="a latency table: adds the predicted latency_ms")
    p.add_argument("--force-table", action="store_true", help="use a latency table measured on another setup")
    retired(p, "--force", "--force-table", "use a latency table measured on another setup; --force only ever "
                                           "means starting over, replacing outputs")
    p.add_argument("--units", action="store_true",
                   help="also list the channel units: each group of channels that slims together, its width at "
                        "the config and the widths it can take")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (keys macs, params, peak_activation_bytes[, latency_ms][, units"
                        "[, fixed_units]])")


def run(args) -> int:
    """Print MACs, parameters and peak activation bytes of a model at a channel config
    (--units: and its channel units, the widths each can take).

    MACs count conv and linear layers; parameters include BatchNorm's weight and bias;
    peak activation memory is the most activation bytes alive at once in execution
    order (see hwslim.core.costs). With --table, also the latency that table predicts.
    """
    config = ChannelConfig.load(args.config) if args.config else None
    name = args.model or (config.model if config else None)
    if name is None:
        raise ConfigError("give --model NAME or --config FILE")
    width_mult = args.width_mult if args.width_mult is not None else (config.width_mult if config else None)
    input_size = args.input_size if args.input_size is not None else (config.input_size if config else None)
    with torch.device("meta"):
        net = load_model(name, width_mult=width_mult, input_size=input_size, keep=args.keep,
                         fix_unsupported=args.fix_unsupported, outputs=args.outputs)
    note_fixed_units(net)
    if config is not None:
        net.validate(config)
    check_inference(net, config, batch=args.batch, input_size=input_size, dtype=args.dtype)
    costs = model_costs(net, config, input_size=input_size, batch=args.batch, dtype=args.dtype)
    out = costs.as_dict()
    if args.table:
        from hwslim.latency.table import LatencyTable

        table = LatencyTable.load(args.table)
        table.check_compatible(net, batch=args.batch, input_size=input_size, dtype=args.dtype,
                               force=args.force_table)
        specs = net.layer_specs(config, batch=args.batch, input_size=input_size)
        out["latency_ms"] = table.predict_ms(specs)
    widths = (config or net.full_config()).widths
    units = [{"unit": name, "width": widths[name], "max": unit.max_width, "grid": " ".join(map(str, unit.grid))}
             for name, unit in net.units.items()]
    from hwslim.importing.fx_trace import fixed_unit_rows

    fixed = fixed_unit_rows(net)  # imported models: units an operator (or --fix-unsupported) keeps at one width
    if args.json:
        listed = {"units": units, **({"fixed_units": fixed} if fixed else {})}
        print(json.dumps({**out, **listed} if args.units else out, sort_keys=True))
        return 0
    print_table([{"model": net.name, "width_mult": net.width_mult, **out}])
    if args.units:
        print(f"\n{len(units)} channel units (channels that must keep one width: both sides of an add, a "
              "depthwise conv's input and output):")
        print_table(units)
        if fixed:
            print(f"\n{len(fixed)} fixed unit(s) (they keep their width):")
            print_table(fixed)
    return 0
