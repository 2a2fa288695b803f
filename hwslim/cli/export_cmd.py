from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from hwslim.cli import (add_command, nonneg_int, parse_number, positive_float, positive_int, set_threads, threads_note,
                        with_header)


def opset_type(text: str) -> int:
    """argparse type: an ONNX opset this hwslim can write (17 .. the installed onnx's newest)."""
    from hwslim.runtimes.onnx_file import MIN_OPSET, max_opset

    v = parse_number(text, whole=True)
    if not MIN_OPSET <= v <= max_opset():
        raise argparse.ArgumentTypeError(f"must be between {MIN_OPSET} and {max_opset()} "
                                         f"(the newest the installed onnx supports), got {v}")
    return v


def register(sub) -> None:
    from hwslim.export.formats import FORMATS, format_class

    p = add_command(sub, "export", run, run.__doc__)
    p.add_argument("--checkpoint", required=True, help="the supernet checkpoint (from `hwslim train`)")
    p.add_argument("--config", help="a ChannelConfig JSON (from `hwslim search`; default for a checkpoint from "
                                    "`hwslim finetune`: the config it was finetuned at)")
    formats = [format_class(name) for name in FORMATS]
    p.add_argument("--format", default="onnx", choices=list(FORMATS), help="; ".join(f.help for f in formats))
    p.add_argument("--out", required=True,
                   help=f"output file ({'; '.join(f.out_help for f in formats)})")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (the optimal one with --dynamic-batch)")
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension")
    p.add_argument("--fp16", action="store_true",
                   help="half precision (TensorRT 10: builder flag; TensorRT 11 and ONNX: an fp16 graph)")
    p.add_argument("--opset", type=opset_type, default=17,
                   help="ONNX opset (17 up to the newest the installed onnx supports; default 17)")
    p.add_argument("--check-images", type=positive_int, default=32,
                   help="images compared between ONNX Runtime and PyTorch (default 32)")
    p.add_argument("--calib-images", type=nonneg_int, default=512,
                   help="search-split images to recalibrate BatchNorm at the config (0: keep the supernet's)")
    p.add_argument("--verify", action="store_true",
                   help="then measure the model on the table's backend against its budget")
    p.add_argument("--table", help="the latency table the config was searched with (recorded; used by --verify; "
                                   "default: the one the config names)")
    p.add_argument("--budget-ms", type=positive_float,
                   help="--verify: the budget (default: the config's latency budget)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--force-table", action="store_true", help="--verify: use a table measured on another setup")
    p.add_argument("--threads", type=positive_int, help="PyTorch CPU threads (default 1: measured fastest on a "
                                                          "shared machine, benchmarks/results/threads.csv)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Export a searched config as a plain, smaller network: ONNX, TensorRT, OpenVINO, ExecuTorch or torch.

    The supernet's weights are sliced to the config's channels, BatchNorm is
    recalibrated at the config on the search split (as the search scored it) and
    folded into the convolutions. The ONNX file is checked with the ONNX checker and
    against PyTorch with ONNX Runtime on real images (fp32: max relative error <= 1e-4,
    else nothing is written), and its metadata_props name what produced it (model,
    checkpoint and its sha256, config, table, hwslim version). --format tensorrt builds
    the engine from that ONNX (kept beside it, with a .json provenance file) through
    the TensorRT Python API, else trtexec. --format openvino converts that ONNX (kept
    beside it) to OpenVINO IR (.xml + .bin, provenance in its rt_info and a .json file)
    and checks the IR against PyTorch like the ONNX file. --format executorch lowers the
    same network to an ExecuTorch program (.pte, XNNPACK delegate; the ONNX and a .json
    beside it) and checks it the same way. Existing files are kept unless --force.

    Example:
      hwslim export --checkpoint runs/r20/checkpoint.pt --config search/config_latency_ms_0.5.json \\
          --out r20_0.5ms.onnx --verify      # --verify: the table the search used, from the config
    """
    from hwslim.export.exporter import export_model
    from hwslim.core.outputs import check_output

    check_output(args.out, kind="file")  # before anything is loaded
    set_threads(args.threads)
    ckpt, config = _checkpoint_and_config(args)
    opts = _options(args, config)
    _check_fits(args, ckpt, config)
    tbl = None
    if args.verify:  # everything --verify needs is checked before anything is written
        from hwslim.latency.verify import table_for

        tbl = table_for(opts.table, ckpt.model, config, batch=args.batch, budget_ms=args.budget_ms,
                        force=args.force_table)
    # with --json, stdout carries the JSON object only: anything the library prints goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    log = with_header(f"hwslim export: {threads_note(args.threads)}", (lambda msg: None) if args.json else print)
    with quiet:
        res = export_model(ckpt, Path(args.config) if args.config else config, args.out, opts, log=log)
    out = res.as_dict()
    if not args.json:
        print(f"wrote {res.path}" + (f" (and {', '.join(map(str, res.beside))})" if res.beside else ""))
    status = 0
    if args.verify:
        from hwslim.latency.verify import exit_status, verify_model

        with quiet:
            v = verify_model(res.verify_path, tbl, budget_ms=args.budget_ms, force=args.force_table,
                             progress=not args.json)
        out["verify"] = v.as_dict()
        status = exit_status([v])
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return status
    if args.verify:
        from hwslim.latency.verify import print_verify

        print_verify([v])
    return status


def _options(args, config):
    """The ExportOptions of the command line; --verify without --table: the table the config names."""
    from hwslim.core.errors import ConfigError
    from hwslim.export.exporter import ExportOptions

    table = args.table
    if args.verify and not table:  # the table the search used, as recorded in the config
        table = config.meta.get("table")
        if not table:
            raise ConfigError("--verify needs --table TABLE (the config names no latency table)")
    return ExportOptions(format=args.format, batch=args.batch, dynamic_batch=args.dynamic_batch, fp16=args.fp16,
                         opset=args.opset, force=args.force, check_images=args.check_images,
                         calib_images=args.calib_images, table=Path(table) if table else None)


def _checkpoint_and_config(args):
    """The checkpoint and the config to export: --config, else the config a finetuned checkpoint records."""
    from hwslim.core.config import ChannelConfig
    from hwslim.core.errors import ConfigError
    from hwslim.importing.checkpoint import finetuned_config, load_checkpoint

    config = ChannelConfig.load(args.config) if args.config else None  # a bad config fails before loading
    ckpt = load_checkpoint(args.checkpoint)
    if config is None:
        config = finetuned_config(ckpt)
        if config is None:
            raise ConfigError(f"{args.checkpoint} is a supernet: give --config (a config from `hwslim search`)")
    ckpt.check_config(config)
    return ckpt, config


def _check_fits(args, ckpt, config) -> None:
    """Refuse an export this machine's memory cannot hold."""
    from hwslim.core.resources import check_fits, inference_bytes

    # the check runs the supernet and ONNX Runtime on batches of --batch images (and PyTorch keeps
    # a copy of all of them): refuse a batch this machine cannot hold before any work
    images = max(args.batch, args.check_images) * ckpt.model.in_channels * config.input_size ** 2 * 4
    check_fits(2 * inference_bytes(ckpt.model, config, batch=args.batch, input_size=config.input_size) + 3 * images,
               f"exporting {config.model} at {config.input_size}x{config.input_size} px with batch {args.batch:,}",
               "lower --batch")
