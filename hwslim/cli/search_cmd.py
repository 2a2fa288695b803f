from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hwslim.cli import (
    add_command,
    nonneg_int,
    positive_float,
    positive_int,
    print_table,
    retired,
    set_threads,
    threads_note,
    with_header,
)
from hwslim.core.errors import HwslimError
from hwslim.search.evaluator import (
    CHUNK_IMAGES,
    DEFAULT_BN,
    DEFAULT_KEEP,
    DEFAULT_SCREEN_IMAGES,
    MIN_CHUNK_IMAGES,
    Scoring,
)
from hwslim.search.greedy import (
    CRITERIA,
    DEFAULT_CRITERION,
    DEFAULT_FILL_STEPS,
    Budget,
    SearchOptions,
    greedy_search,
    targets_of,
)


def register(sub) -> None:
    p = add_command(sub, "search", run, run.__doc__)
    p.add_argument("--checkpoint", required=True, help="a supernet checkpoint written by `hwslim train`")
    p.add_argument("--latency-ms", type=positive_float, nargs="+", action="extend", default=[], metavar="MS",
                   help="latency budgets in ms, predicted by a latency table")
    p.add_argument("--memory-mb", type=positive_float, nargs="+", action="extend", default=[], metavar="MB",
                   help="peak activation memory budgets in MB (10^6 bytes)")
    p.add_argument("--params-m", type=positive_float, nargs="+", action="extend", default=[], metavar="M",
                   help="parameter budgets in millions")
    p.add_argument("--macs-m", type=positive_float, nargs="+", action="extend", default=[], metavar="M",
                   help="MAC budgets in millions. The kind given several values gives one config per value; "
                        "each other kind (one value) is a constraint every config meets; several values for "
                        "two kinds are refused")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--table", help="latency table (from `hwslim profile`)")
    g.add_argument("--device", choices=["cpu", "cuda"],
                   help="find this machine's table for the checkpoint's model: in --table-dir, $HWSLIM_TABLE_DIR, "
                        "~/.cache/hwslim/latency_tables ($XDG_CACHE_HOME), then hwslim's own latency_tables/")
    p.add_argument("--table-dir", metavar="DIR", help="with --device: look here first")
    p.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                   help=f"acc: smallest accuracy drop (AutoSlim); acc-per-cost: smallest drop per cost saved "
                        f"(NetAdapt). Default {DEFAULT_CRITERION}")
    p.add_argument("--no-fill", action="store_true",
                   help="keep the walk's first config meeting each budget; by default its slack is spent by "
                        "widening units while every budget holds (best accuracy gain per budget spent)")
    p.add_argument("--fill-steps", type=positive_int, default=DEFAULT_FILL_STEPS, metavar="N",
                   help=f"at most N widening steps per config when filling the budget (default {DEFAULT_FILL_STEPS})")
    p.add_argument("--measure", action="store_true",
                   help="fit each --latency-ms budget to end-to-end times on this machine: after the walk, time "
                        "a few of its configs predicted near the budget and the full model with the table's "
                        "profiler (at the table's level), divide the budget by their median measured/predicted "
                        "(capped to 0.8-1.25) for the pick and fill, time the chosen configs and re-pick any that "
                        "measures over (or, once bracketed, well under) the budget, up to 3 times; each config records "
                        "budget, predicted and measured ms and the correction (a minute or so more)")
    p.add_argument("--out", default="search_out", help="output directory (default: search_out)")
    p.add_argument("--finetune-epochs", type=positive_int, metavar="N",
                   help="then finetune each chosen config for N epochs as a network of its own, as `hwslim "
                        "finetune` does by default (the supernet's weights at the config, distilled from its "
                        "widest config), into OUT/finetuned/NAME/ (export it with --checkpoint "
                        "OUT/finetuned/NAME/checkpoint.pt --config OUT/config_NAME.json); --resume and --force "
                        "apply to these runs too")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a search")
    p.add_argument("--force-table", action="store_true", help="use a latency table measured on another setup")
    p.add_argument("--batch", type=positive_int, default=1, help="inference batch the budgets refer to (default 1)")
    s = p.add_argument_group("scoring (defaults measured with benchmarks/search_speed.py)")
    s.add_argument("--bn", choices=["recal", "batch"], default=DEFAULT_BN,
                   help="BatchNorm statistics for scoring: batch: each chunk of --chunk images (spread over the "
                        "split) normalized by its own statistics, one pass (default); recal: recalibrated per "
                        "candidate, then scored in eval mode, two passes (as export recalibrates)")
    s.add_argument("--calib-images", type=nonneg_int, metavar="N",
                   help="with --bn recal: recalibrate on N images spread over the search split, then score on "
                        "all of them (default: all)")
    s.add_argument("--chunk", type=positive_int, default=None, metavar="N",
                   help=f"images per forward pass when scoring, chunks spread over the split; with --bn batch also "
                        f"the images each BN statistic is taken over (default {CHUNK_IMAGES:,}, fewer for images "
                        f"larger than 32 px so a chunk holds no more pixels, at least {MIN_CHUNK_IMAGES}: one "
                        f"1,000-image chunk kept the decisions of --bn recal 9 times in 10, chunks of 250 5 times)")
    s.add_argument("--screen-images", type=nonneg_int, default=DEFAULT_SCREEN_IMAGES, metavar="N",
                   help=f"successive halving: score every candidate of a step on N images spread over the "
                        f"search split, and only the best --keep-candidates on all of them (default {DEFAULT_SCREEN_IMAGES}; "
                        f"0: every candidate on every image)")
    s.add_argument("--keep-candidates", type=positive_int, default=DEFAULT_KEEP, metavar="K",
                   help=f"candidates per step scored on the whole split after screening (default {DEFAULT_KEEP})")
    retired(p, "--keep", "--keep-candidates", "the candidates scored on the whole split; elsewhere --keep is a "
                                              "REGEX of modules that keep their width")
    s.add_argument("--evaluator", choices=["fast", "reference"], default="fast",
                   help="fast shares each step's common computation; reference runs every candidate in full")
    s.add_argument("--kernels", choices=["torch", "triton"], default="torch",
                   help="triton: fused multi-config Triton kernels for the evaluations (CUDA only; "
                        "not yet measured on a GPU, so torch stays the default)")
    s.add_argument("--max-images", type=positive_int, help="use at most this many search-split images "
                                                           "(spread over the split)")
    p.add_argument("--eval-device", default=None, help="where to run the search's evaluations (and "
                                                        "--finetune-epochs' training; default: cuda if "
                                                        "available, else cpu)")
    p.add_argument("--threads", type=positive_int, help="PyTorch CPU threads for the evaluations (default 1: measured "
                                                          "fastest on a shared machine, benchmarks/results/threads.csv)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the chosen configs as JSON")


def run(args) -> int:
    """Greedy-slim a trained supernet under latency, memory, parameter or MAC budgets.

    The budget kind given several values yields one config per value; every other kind
    given is a constraint each of those configs also meets: `--latency-ms 20 15 10
    --memory-mb 5` gives three configs, each within its latency and within 5 MB;
    `--latency-ms 0.45 --params-m 0.1` gives one config meeting both. Several values for
    two kinds are refused (run one search per value of the second kind).

    One pass walks from the full config, each step narrowing the unit whose shrink
    hurts search-split accuracy least, until every config's budgets hold together; each
    config is the first on the path that meets its budget and every constraint. Then each
    config's slack is spent (unless --no-fill): units are widened back, best search-split
    accuracy gain per budget spent first, while every budget still holds; the table shows
    the budget used (predicted cost / budget) and the search-split accuracy with and
    without this filling. Writes to --out one ChannelConfig JSON per config (named after
    its budget), fill.csv (the widening steps), path.csv (the whole walk), uniform.csv
    and search.png (accuracy against cost, with the uniform-width configs) and
    search_state.json (for --resume).

    Scoring (the walk's candidates and the filling's widenings alike): every candidate
    is screened on 200 search-split images and the best 4 are scored on the whole split
    (successive halving: --screen-images, --keep-candidates), each chunk of up to 1,000 images
    normalized by its own BN statistics (--bn, --chunk); --screen-images 0 --bn recal scores every
    candidate in full with BN recalibrated, as before (about 3x slower).

    Example: hwslim search --checkpoint runs/sn/checkpoint.pt --latency-ms 20 15 10 --memory-mb 5 --device cpu
    """
    from hwslim.core.outputs import check_output
    from hwslim.core.resources import check_inference
    from hwslim.importing.checkpoint import load_checkpoint

    check_output(args.out, kind="dir")  # before anything is loaded or scored
    if args.finetune_epochs:
        _check_finetune_outputs(args)
    budgets = [Budget(kind, v) for kind, values in (("latency_ms", args.latency_ms), ("memory_mb", args.memory_mb),
                                                    ("params_m", args.params_m), ("macs_m", args.macs_m))
               for v in values]
    if not budgets:
        raise HwslimError("give at least one budget: --latency-ms, --memory-mb, --params-m or --macs-m")
    targets_of(budgets)  # refuses several values for two kinds before anything is loaded
    if args.measure and not any(b.kind == "latency_ms" for b in budgets):
        raise HwslimError("--measure fits --latency-ms budgets to end-to-end measurements, and this search has "
                          "none; add a --latency-ms budget or drop --measure")
    if args.table and not any(b.kind == "latency_ms" for b in budgets):  # never silently ignored
        raise HwslimError(f"--table {args.table} prices --latency-ms budgets, and this search has none; drop "
                          "--table or add a --latency-ms budget")
    set_threads(args.threads)
    opts = _options(args)
    ckpt = load_checkpoint(args.checkpoint)
    check_inference(ckpt.model, batch=args.batch)
    table = None
    header = f"hwslim search: {threads_note(args.threads)}"
    if any(b.kind == "latency_ms" for b in budgets):
        from hwslim.latency.table import resolve_table

        table = resolve_table(ckpt.model, table=args.table, device=args.device, batch=args.batch,
                              root=args.table_dir, spec=args.checkpoint)
        header += f"\nlatency table: {table.path}"  # which table priced the budgets, once it passed its checks
        if args.measure:
            from hwslim.latency.verify import config_timer

            opts = replace(opts, measure=config_timer(table, ckpt.model, batch=args.batch))
    log = with_header(header)
    result = greedy_search(ckpt, budgets, opts, table=table, log=log)
    if not args.json:
        _print_result(result, args)
    if args.finetune_epochs:
        ckpt.model.cpu()  # each finetuning run loads the supernet itself
    finetuned = _finetune_all(result.files, args, log) if args.finetune_epochs else None
    if args.json:
        _print_result(result, args, finetuned)
    elif finetuned:
        print(f"\nfinetuned for {args.finetune_epochs} epoch(s) (validation top-1 %, before: the supernet's shared "
              "weights):")
        print_table(finetuned)
    return 0


FINETUNED = "finetuned"  # OUT/finetuned/NAME/: search --finetune-epochs' runs, one per config


def _finetune_dir(out, config_file) -> Path:
    return Path(out) / FINETUNED / Path(config_file).stem.removeprefix("config_")


def _check_finetune_outputs(args) -> None:
    """Refuse, before the search, finetuned runs of an earlier search that neither --resume nor --force names."""
    from hwslim.training.loop import CHECKPOINT_NAME

    found = sorted((Path(args.out) / FINETUNED).glob(f"*/{CHECKPOINT_NAME}"))
    if found and not (args.resume or args.force):
        raise HwslimError(f"{found[0].parent} already holds a finetuned run; pass --resume to continue them, "
                          "--force to start over, or give another --out")


def _finetune_all(files, args, log) -> list[dict]:
    """``hwslim finetune`` with its defaults for every config the search wrote (``--finetune-epochs``):
    per config, its validation top-1 before (shared weights) and after, and the finetuned checkpoint."""
    from hwslim.core import jsonio
    from hwslim.core.config import ChannelConfig
    from hwslim.importing.checkpoint import load_checkpoint
    from hwslim.training.finetune import FinetuneConfig, finetune
    from hwslim.training.loop import CHECKPOINT_NAME, RESULTS_NAME

    rows = []
    for f in files:
        out = _finetune_dir(args.out, f)
        ckpt, widths = out / CHECKPOINT_NAME, ChannelConfig.load(f).widths
        try:  # a finished run (its results written) is kept on --resume; anything else is (re)run
            done = jsonio.load(out / RESULTS_NAME) if args.resume and ckpt.exists() else {}
        except (OSError, ValueError):
            done = {}
        final = done.get("final") if isinstance(done, dict) else None
        finished = (isinstance(final, list) and done.get("epochs") == args.finetune_epochs
                    and all(isinstance(r, dict) and {"config", "top1"} <= r.keys() for r in final))
        if args.resume and ckpt.exists():  # a run of another config (the search picked again) is not continued
            record = done.get("finetune") if finished else load_checkpoint(ckpt).train_args.get("finetune")
            if (record or {}).get("config", {}).get("widths") != widths:
                raise HwslimError(f"{out} holds a finetuned run of another config than {f} (the search picked "
                                  "again); pass --force to replace it, or give another --out")
        if finished:
            log(f"{out}: already finetuned for {args.finetune_epochs} epoch(s); kept")
        else:
            cfg = FinetuneConfig(checkpoint=str(Path(args.checkpoint).resolve()), config=str(Path(f).resolve()),
                                 epochs=args.finetune_epochs, out=str(out), progress=not args.no_progress,
                                 resume=args.resume, force=args.force, device=args.eval_device)
            cfg.validate()
            final = finetune(cfg, log=log).final
        top1 = {r["config"]: r["top1"] for r in final}
        rows.append({"config": str(f), "before_top1": top1.get("supernet (shared weights)"),
                     "finetuned_top1": top1.get("finetuned"), "checkpoint": str(ckpt)})
    return rows


def _options(args) -> SearchOptions:
    """The search's options from the flags, refusing the combinations that make no sense."""
    import torch

    eval_device = args.eval_device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(eval_device)
    except RuntimeError:
        raise HwslimError(f"--eval-device {eval_device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HwslimError("--eval-device cuda, but no CUDA GPU is visible; use --eval-device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise HwslimError(f"--eval-device {eval_device!r}: only cpu and cuda are supported")
    if args.table_dir and not args.device:
        raise HwslimError("--table-dir is where --device looks for this machine's table; add --device cpu|cuda "
                          "(or give the table itself with --table)")
    if args.table_dir:
        from hwslim.latency.table import checked_table_dir

        checked_table_dir(args.table_dir, "--table-dir", must_exist=True)  # never a silent fallback
    if args.bn == "batch" and args.calib_images is not None:
        raise HwslimError("--calib-images is for --bn recal (--bn batch normalizes each chunk by its own statistics)")
    scoring = Scoring(bn=args.bn, mode=args.evaluator, kernels=args.kernels, keep=args.keep_candidates, batch_size=args.chunk,
                      calib_images=args.calib_images or None, screen_images=args.screen_images or None)
    return SearchOptions(criterion=args.criterion, out_dir=args.out, resume=args.resume, force=args.force,
                         device=eval_device, scoring=scoring, max_images=args.max_images, batch=args.batch,
                         progress=not args.no_progress, force_table=args.force_table, fill=not args.no_fill,
                         fill_steps=args.fill_steps)


def _print_result(result, args, finetuned: list[dict] | None = None) -> None:
    """The chosen configs: as JSON (``--json``: each as its file holds it, where that file is and, with
    --finetune-epochs, its finetuned run) or a table."""
    files = result.files or [None] * len(result.configs)
    if args.json:
        from hwslim.core.config import ChannelConfig

        runs = [{"finetuned": {k: v for k, v in r.items() if k != "config"}} for r in finetuned or ()]
        print(json.dumps([{**(ChannelConfig.load(f).to_dict() if f is not None else c.to_dict()),
                           **({"file": str(f)} if f is not None else {}), **(runs[i] if runs else {})}
                          for i, (c, f) in enumerate(zip(result.configs, files))], indent=2, sort_keys=True))
        return
    rows = []
    for t, c, f in zip(result.targets, result.configs, files):
        m = c.meta
        row = {"budget": t.budget.label, "constraints": " ".join(b.label for b in t.constraints) or "-",
               "step": m["search_step"], "used": m["budget_used"], "search_acc": m["search_acc"]}
        if not args.no_fill:
            row.update(unfilled_used=m["budget_used_unfilled"], unfilled_acc=m["search_acc_unfilled"],
                       widened=m["fill_steps"])
        if "latency_ms" in m:
            row["latency_ms"] = m["latency_ms"]
        if "measured" in m:  # --measure: at the table's level
            fit = m["measured"]
            row.update(measured_ms=fit["measured_ms"], correction=fit["correction"],
                       table_budget_ms=fit["table_budget_ms"])
        row.update(memory_mb=m["memory_mb"], params_m=m["params_m"], macs_m=m["macs_m"], file=str(f or "-"))
        rows.append(row)
    print_table(rows)
