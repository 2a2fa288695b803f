from __future__ import annotations

import json
import sys
from pathlib import Path

from hwslim.cli import add_command, nonneg_int, positive_int, print_table, set_threads, threads_note


def register(sub) -> None:
    p = add_command(sub, "eval", run, run.__doc__)
    p.add_argument("models", nargs="*", metavar="MODEL.onnx",
                   help="ONNX files written by `hwslim export` (run with ONNX Runtime)")
    p.add_argument("--checkpoint", help="the supernet checkpoint (with --config; for ONNX files: default the one "
                                        "their metadata names)")
    p.add_argument("--config", nargs="+", default=[], metavar="CFG", help="ChannelConfig JSON files (from `hwslim search`)")
    p.add_argument("--calib-images", type=nonneg_int, default=512,
                   help="--config: search-split images to recalibrate BN at each config, as export does "
                        "(default 512; 0: the supernet's statistics)")
    p.add_argument("--max-images", type=positive_int, help="score at most this many held-out images (default: all)")
    p.add_argument("--threads", type=positive_int,
                   help="PyTorch CPU threads (default 1: measured fastest here, benchmarks/results/threads.csv)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Held-out top-1 of searched configs or exported models.

    With --checkpoint and --config: each config of the supernet, on the validation (or
    test) split the checkpoint records, after recalibrating BatchNorm at the config on
    the search split, as `hwslim export` does. With ONNX files: each exported model as
    it is (its BatchNorm was recalibrated and folded at export) with ONNX Runtime, on the
    held-out split of the checkpoint its metadata names. One table (or --json) for all.

    Examples:
      hwslim eval --checkpoint runs/r20/checkpoint.pt --config search/config_latency_ms_*.json
      hwslim eval r20_0.5ms.onnx
    """
    from hwslim.importing.checkpoint import load_checkpoint
    from hwslim.latency.verify import resolve_model
    from hwslim.core.config import ChannelConfig
    from hwslim.core.errors import ConfigError
    from hwslim.pipeline.heldout import (check_classifier, check_exported, evaluate_configs_heldout,
                                         evaluate_exported, percent)

    # `--config a.json b.json model.onnx`: argparse gives the ONNX file to --config; it is a model
    args.models = list(args.models) + [c for c in args.config if c.endswith(".onnx")]
    args.config = [c for c in args.config if not c.endswith(".onnx")]
    if not args.models and not args.config:
        raise ConfigError("give --checkpoint CKPT --config CFG [CFG ...], or MODEL.onnx files written by "
                          "`hwslim export`")
    if args.config and not args.checkpoint:
        raise ConfigError("--config needs --checkpoint (the supernet the config was searched on)")
    set_threads(args.threads)
    configs = [(c, ChannelConfig.load(c)) for c in args.config]  # every file is read before any work
    models = [(m, *resolve_model(m)) for m in args.models]
    ckpts: dict[str, object] = {}

    def checkpoint(path: str):
        if path not in ckpts:
            ckpts[path] = load_checkpoint(path)
        return ckpts[path]

    if args.checkpoint:
        for c, cfg in configs:  # a config for another model, size or off the grid: one line, before any work
            ckpt = checkpoint(args.checkpoint)
            check_classifier(len(ckpt.model.outputs), args.checkpoint)
            ckpt.check_config(cfg)
            if int(ckpt.data.get("input_size", cfg.input_size)) != cfg.input_size:
                raise ConfigError(f"{c} is a config at {cfg.input_size}px, but {args.checkpoint}'s data is "
                                  f"{ckpt.data['input_size']}px; give a config searched on this checkpoint")
    for _, path, meta in models:  # every refusal before the first progress bar
        check_exported(path, meta, checkpoint, args.checkpoint)
    print(f"hwslim eval: {threads_note(args.threads)}", file=sys.stderr)

    rows, evaluated_on = [], {}
    if configs:
        ckpt = checkpoint(args.checkpoint)
        scored, on = evaluate_configs_heldout(ckpt, [(str(Path(c)), cfg) for c, cfg in configs],
                                              calib_images=args.calib_images, max_images=args.max_images,
                                              progress=not args.no_progress)
        evaluated_on[args.checkpoint] = on
        for (c, cfg), r in zip(configs, scored):
            rows.append({"model": c, "kind": "config", "top1": r["top1"],
                         "search_acc": percent(cfg.meta.get("search_acc")), "latency_ms": cfg.meta.get("latency_ms"),
                         "params": r["params"], "macs": r["macs"], "checkpoint": args.checkpoint})
    exported, on = evaluate_exported(models, checkpoint, checkpoint=args.checkpoint, max_images=args.max_images,
                                     progress=not args.no_progress)
    rows += exported
    evaluated_on.update(on)
    if args.json:
        print(json.dumps({"results": rows, "evaluated_on": evaluated_on}, indent=2, sort_keys=True))
        return 0
    for where, on in evaluated_on.items():
        print(f"{where}: top-1 on {on['images']:,} images of the {on['split']} split; BN {on['bn']}")
    print_table([{"model": r["model"], "top1 %": r["top1"], "search acc %": r["search_acc"],
                  "predicted ms": r["latency_ms"] if r["latency_ms"] is not None else "",
                  "params": r["params"], "macs": r["macs"]} for r in rows])
    return 0

