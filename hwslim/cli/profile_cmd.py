from __future__ import annotations

import json
import os
import sys

from hwslim.cli import (add_command, add_import_options, nonneg_int, positive_int, print_table,
                        set_threads, threads_note, whole_int, with_header)


def register(sub) -> None:
    p = add_command(sub, "profile", run, run.__doc__)
    from profilers import ALIASES, BACKENDS, DEVICES, backend_names

    p.add_argument("--device", default="cpu", choices=DEVICES, help="device to measure (default: cpu)")
    per_device = "; ".join(f"{d}: {', '.join(backend_names(d))}" for d in DEVICES)
    aliases = ", ".join(f"{a} = {n}" for a, n in ALIASES.items())
    p.add_argument("--backend", choices=[*BACKENDS, *ALIASES],
                   help=f"latency backend ({per_device}; {aliases}); default: the first of its device's that can "
                        "run here (on cuda: trt when TensorRT imports, else torch, with a one-line notice)")
    p.add_argument("--model", default=None, help="a zoo model, graph JSON file, checkpoint, torchvision:NAME, "
                                                 "timm:NAME or package.module:function (default: mobilenet_v2, "
                                                 "a 1.5x supernet)")
    add_import_options(p)
    p.add_argument("--input-size", type=positive_int, help="input height and width (default: the model's)")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="inference batch the table is measured at: a setting of the table, as deployed (default 1)")
    p.add_argument("--threads", type=positive_int,
                   help="intra-op threads of the runtime being measured: a setting of the table, as deployed "
                        "(default 1)")
    p.add_argument("--dtype", default="float32",
                   help="precision: cpu float32 (openvino: bfloat16 too, where the CPU has it); cuda float32, float16 or "
                        "bfloat16 (trt: float32, float16)")
    p.add_argument("--channels-last", action="store_true",
                   help="torch backend: channels-last (NHWC) tensors, as fp16/bf16 deployments use")
    p.add_argument("--out", help="table path, a .csv. Default: ~/.cache/hwslim/latency_tables/<device>-<device name>/"
                                 "<model and settings>.csv; $HWSLIM_TABLE_DIR replaces ~/.cache/hwslim/latency_tables "
                                 "and $XDG_CACHE_HOME replaces ~/.cache when set. search --device finds it there")
    p.add_argument("--calib-configs", type=positive_int, default=16,
                   help="whole configs the calibration is fitted on (at least 3)")
    p.add_argument("--holdout-configs", type=nonneg_int, default=16, help="other whole configs it is checked on")
    p.add_argument("--seed", type=whole_int, default=0)
    p.add_argument("--contexts", type=positive_int,
                   help="designed networks each entry is timed in (backends that time inside networks; "
                        "default: ONNX Runtime 4, the others 2; with --quick 2)")
    p.add_argument("--isolated", action="store_true",
                   help="time every entry alone instead of inside designed networks (slower, less accurate)")
    p.add_argument("--quick", action="store_true", help="a short measurement protocol (smoke tests; noisier)")
    p.add_argument("--force", action="store_true", help="start over where --out holds a table of other settings (measured beside it; "
                        "the old table is replaced only once the new one is complete)")
    p.add_argument("--recalibrate", action="store_true",
                   help="the table these options name exists and is complete: time its calibration configs again "
                        "now and refit its calibration, keeping its entries (minutes; for when the machine's speed "
                        "moved since it was measured)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args) -> int:
    """Measure a latency table: every layer shape a supernet's grids can produce, calibrated.

    Each entry is the unit the runtime executes (conv + folded BN + residual add +
    activation; depthwise convs; pooling; the classifier), keyed by its shape. After the
    grid, whole configs are measured end to end to fit `e2e = a * sum + b`; the summary
    reports that fit's accuracy on configs it was not fitted on.

    Resumable: kill it at any point and run the same command again; finished entries
    are kept. Entries are keyed by layer shape, so shapes already measured for another
    model on this machine and setup are reused (it says how many) and only the missing
    ones are measured. With only `--device cpu` it measures MobileNetV2 1.5x at 224 with ONNX
    Runtime on one thread (about 2,000 entries).

    On a GPU (`--device cuda`) it uses TensorRT when it imports, else PyTorch/cuDNN
    (`--backend torch`, CUDA graphs and events) with a one-line notice.

    `--recalibrate` keeps a complete table's entries and times only its calibration
    configs again, refitting `a` and `b`: a shared machine's speed moves by a few percent
    over hours, and the predictions with it.

    Examples:
      hwslim profile --device cpu --model resnet20 --width-mult 0.5 --input-size 32
      hwslim profile --device cpu --model resnet20 --width-mult 0.5 --input-size 32 --recalibrate
      hwslim profile --device cuda --backend torch --batch 32
    """
    import torch

    from hwslim.importing.specs import load_model
    from hwslim.core.outputs import check_output
    from hwslim.latency.profile import DEFAULT_MODEL, ProfileSettings, profile
    from hwslim.core.resources import check_inference

    if args.out is not None:
        check_output(args.out, kind="file")
    with torch.device("meta"):  # shapes only: refuse sizes this machine cannot run before any work
        shapes = load_model(args.model or DEFAULT_MODEL, width_mult=args.width_mult, input_size=args.input_size,
                            keep=args.keep, fix_unsupported=args.fix_unsupported, outputs=args.outputs)
    check_inference(shapes, batch=args.batch, input_size=args.input_size,
                    dtype=args.dtype if args.dtype in ("float16", "bfloat16") else "float32")
    set_threads(None)  # PyTorch only builds the networks here; the runtime's threads are the table's setting
    n = args.threads or 1
    header = (f"hwslim profile: {n} runtime thread{'s' if n > 1 else ''} (the table's setting"
              f"{'' if args.threads else ', default; --threads N to change'}), {threads_note(None).split(' (')[0]}")

    settings = ProfileSettings(
        device=args.device, backend=args.backend, model=args.model or DEFAULT_MODEL, width_mult=args.width_mult,
        input_size=args.input_size, batch=args.batch, threads=args.threads, dtype=args.dtype, out=args.out,
        calib_configs=args.calib_configs, holdout_configs=args.holdout_configs, seed=args.seed, force=args.force,
        quick=args.quick, in_network=False if args.isolated else None, contexts=args.contexts,
        channels_last=args.channels_last, keep=args.keep, fix_unsupported=args.fix_unsupported, outputs=args.outputs)
    busy = busy_note()
    if busy:
        header += f"\nwarning: {busy}"
    if args.recalibrate:
        return _recalibrate(settings, args, with_header(header))
    result = profile(settings, progress=not args.json, log=with_header(header))
    summary = result.summary()
    notes = []
    if result.noisy:
        notes.append(f"note: {result.noisy} of {result.entries} entries are noisy: their spread stayed above the "
                     "protocol's limit (IQR over 10% of the median) after the retries, usually because other work "
                     "ran on the machine. They are kept (their central value is used) and flagged in the table's "
                     "'noisy' column; for a table you rely on, measure again on a quiet machine (--out NEW.csv).")
    poor = calibration_note(summary, settings.threads or 1, os.cpu_count() or 1)
    if poor:
        notes.append(poor)
    loads = result.meta.get("load_avg_1min") or []
    cores = os.cpu_count() or 1
    if loads and loads[-1] is not None and loads[-1] >= LOADED * cores and not busy:
        notes.append(f"warning: the machine got busy while measuring (load average {loads[-1]:g} on {cores} cores); "
                     "latencies measured under load run slow and noisy")
    for n in notes:
        print(n, file=sys.stderr)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print_table([{k: v for k, v in summary.items() if k not in ("table", "conditions_changed")}])
        print(f"table: {summary['table']}")
    return 0


LOADED = 0.5  # load average per core above which measurements are warned about
POOR_WITHIN_10 = 0.9  # held-out share within +-10% below which a table is warned about


def _recalibrate(settings, args, log) -> int:
    from hwslim.latency.profile import recalibrate

    result = recalibrate(settings, progress=not args.json, log=log)
    summary = result.summary()
    record = result.meta["recalibrations"][-1]
    prev = record.get("previous") or {}
    held = prev.get("holdout") or {}
    poor = calibration_note(summary, settings.threads or 1, os.cpu_count() or 1,
                            remedy="Recalibrate it again or measure it again (--force)")
    if poor:
        print(poor, file=sys.stderr)
    if args.json:
        print(json.dumps({**summary, "previous": prev}, sort_keys=True))
        return 0
    print_table([{k: v for k, v in summary.items() if k not in ("table", "conditions_changed", "measured", "reused")}])
    w5, now5 = held.get("within_5pct"), summary.get("within_5pct")
    print(f"recalibrated: a {prev.get('a', float('nan')):.4g} -> {result.calibration.a:.4g}, "
          f"b {prev.get('b', float('nan')):.4g} -> {result.calibration.b:.4g} ms"
          + (f" (held-out configs within +-5%: {w5:.0%} then, {now5:.0%} now)" if None not in (w5, now5) else "")
          + (f"; the previous end-to-end rows are kept in {record['previous_e2e']}" if record.get("previous_e2e")
             else ""))
    print(f"table: {summary['table']}")
    return 0


def calibration_note(summary: dict, threads: int, cores: int,
                     remedy: str = "Measure it again (--force)") -> str | None:
    """A warning when the table's own held-out configs show it does not predict this machine.

    Measured on the 2-core development machine: with ``--threads 2`` the runtime needs both
    cores at every operator, any other work stalls it, and a MobileNetV2 table's held-out
    configs landed 0% within +-5% (Spearman 0.85; whole-model IQR up to half the median).
    """
    w10, n = summary.get("within_10pct"), summary.get("holdout_n")
    if w10 is None or not n or w10 >= POOR_WITHIN_10:
        return None
    why = (f" With {threads} runtime threads on {cores} cores every operator waits for the slowest core, so "
           "any other work on the machine stalls it: fewer threads than cores, or a machine with nothing else "
           "running, measures steadily." if threads >= cores > 1 else
           " Usually the machine was busy or changing while it was measured.")
    return (f"warning: the table predicts only {w10:.0%} of its {n} held-out configs within +-10% "
            f"(Spearman {summary.get('spearman', float('nan')):.2f}): its predictions do not hold on this machine "
            f"as it was.{why} {remedy} before relying on it.")


def busy_note() -> str | None:
    """A warning when the machine is loaded (1-minute load average >= half its cores), else None."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < LOADED * cores:
        return None
    return (f"the machine is busy (load average {load:.2f} on {cores} cores): latencies measured now hold under "
            "this load only (the table records it, and verify says when it differs); for a table you rely on, "
            "measure as the machine will be used")
