"""The whole pipeline in one command, on this CPU, with no download: ``hwslim demo``.

1. **Train** a small slimmable supernet (ResNet-20 at 24 px) on the built-in
   ``synthetic`` data, 20 classes so that width matters (:mod:`hwslim.training.train`; sandwich
   rule, in-place distillation);
2. **profile** this CPU for the trained supernet: an ONNX Runtime latency table, calibrated end to
   end (:mod:`hwslim.latency.profile`);
3. **search** it at three latency budgets between the narrowest and the full config's
   predicted latency (:func:`hwslim.search.greedy.greedy_search`), each budget fitted to
   end-to-end times of the walk's configs near it, as ``hwslim search --measure`` does (a
   quick table's small error would otherwise decide the verdicts);
4. **export** each config to ONNX, checked against PyTorch (:mod:`hwslim.export.exporter`);
5. **measure** each exported model with the table's protocol and score it on held-out
   images with ONNX Runtime (:mod:`hwslim.latency.verify`). The machine's conditions (load, a
   speed probe; :mod:`hwslim.latency.conditions`) are taken before and after and compared with
   the table's: where they differ, the verdicts are ``UNRELIABLE``, and each such verdict gets
   one line with its measured p50 and p90, their ratio to the budget and the one probe that decided;
6. print budget / predicted / measured (p50, p90, ratio to the budget) / accuracy / parameters,
   and save the accuracy-latency plot, each exported model labelled with its budget.

Everything lands in one folder (default ``hwslim-demo/``): ``train/checkpoint.pt``,
``table/``, ``search/``, ``models/*.onnx``, ``results.csv``, ``demo.json`` (provenance)
and ``accuracy_latency.png``. An existing non-empty folder is refused unless ``force``,
which deletes the demo's own files there first (:data:`OUTPUTS`), so the run starts from
scratch: a new training run and a new table. ``quick`` is a smoke run (a tinier model,
one epoch, a short protocol) whose numbers mean nothing, and it says so.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hwslim.core.version import __version__
from hwslim.core.config import atomic_write_text
from hwslim.core.outputs import owned
from hwslim.core.errors import BudgetError, ConfigError, OutputExistsError


@dataclass(frozen=True)
class Recipe:
    """What the demo trains, profiles and searches."""

    model: str
    width_mult: float
    input_size: int
    data: str  # synthetic:N training images
    search_size: int  # held out of training for the search
    epochs: int
    batch_size: int
    lr: float
    val_images: int  # synthetic validation images (accuracy of the exported models)
    calib_images: int  # BN recalibration images for training's final evaluation
    profile_quick: bool
    calib_configs: int
    holdout_configs: int
    check_images: int  # ONNX Runtime vs PyTorch comparison at export
    rounds: int  # interleaved end-to-end measurements per exported model
    fractions: tuple[float, ...] = (0.3, 0.55, 0.8)
    num_random: int | None = None  # random configs per training step (None: training's default, 2)


# ResNet-20 at 24 px: 0.23 ms (narrowest) to 0.44 ms (full config) under ONNX Runtime on one
# core of the 2-core development machine, twice the 16 px model's 0.11-0.20 ms, whose
# layers of a few microseconds each were mostly per-kernel overhead and whole-microsecond
# rounding. Training costs 2.25x as much per step, so each step trains one random config
# besides the widest and narrowest instead of two (one seed: 86.5% widest, 84.0% narrowest
# held-out top-1, against 59.2% / 49.4% with two; 32 px stayed at chance within the time).
# Widths in multiples of 16: lr 0.1 and 0.2 stayed at chance at 16 px, 0.05 learns.
# 20 synthetic classes, not 10: with 10 every width learned the task (83.5% widest, 78.9% narrowest,
# widths in multiples of 16) and the exported configs showed no trade-off; with 20 a narrow last stage
# holds too few features. Measured in one demo run (widths in multiples of 8, held-out top-1): the
# supernet 47.4% widest, 26.2% at 6/12, 20.3% narrowest; the exported configs 32.0%, 39.5%, 46.1%.
FULL = Recipe("resnet20", 1.0, 24, "synthetic:2600:20", 200, 5, 64, 0.05, 1000, 500, False, 8, 8, 8, 3,
              num_random=1)
# A smoke run: a tinier model whose latencies (~0.03 ms) are mostly overhead, so budgets stay high.
QUICK = Recipe("resnet20", 1.0, 8, "synthetic:300", 44, 1, 32, 0.05, 64, 64, True, 3, 2, 2, 1, (0.5, 0.7, 0.9))


# what the demo writes in its folder; --force deletes these (and nothing else) before a run
OUTPUTS = ("train", "table", "search", "models", "results.csv", "demo.json", "accuracy_latency.png")


def clear_outputs(out: Path) -> None:
    """Delete the demo's own files in ``out`` (:data:`OUTPUTS`): a forced run starts from scratch."""
    import shutil

    for name in OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("hwslim-demo")
    quick: bool = False
    force: bool = False
    threads: int = 1  # ONNX Runtime intra-op threads for the table and the measurements
    # PyTorch intra-op threads for training and search. These models are small: one thread
    # loses little, and more threads than free cores makes PyTorch spin (10x slower measured
    # on a busy 2-core machine).
    torch_threads: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1 or self.torch_threads < 1:
            raise ConfigError(f"thread counts must be >= 1, got --threads {self.threads} "
                              f"--torch-threads {self.torch_threads}")


@dataclass
class DemoResult:
    out: Path
    rows: list[dict[str, Any]]
    plot: Path
    checkpoint: Path
    table: Path
    seconds: dict[str, float] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)  # now vs the table's (ConditionCheck.as_dict())


def budgets_between(lo: float, hi: float, fractions) -> list[float]:
    """Budgets (3 significant digits) at ``fractions`` of the way from ``lo`` to ``hi``."""
    return [float(f"{lo + f * (hi - lo):.3g}") for f in fractions]


def channel_divisor(threads: int = 1) -> int:
    """The width divisor that suits ONNX Runtime on this CPU: its blocked-layout channel block.

    ONNX Runtime pads channels to its NCHWc block (16 with AVX-512, 8 with AVX2), so
    between two multiples of the block a narrower layer is no faster. Widths on the block
    make every grid step of the search a real saving.
    """
    from profilers import get_profiler

    from hwslim.core.rounding import DEFAULT_DIVISOR, DIVISORS

    with get_profiler("cpu", "ort", threads=threads) as prof:
        block = prof.nchwc_block() if hasattr(prof, "nchwc_block") else 0
    return block if block in DIVISORS else DEFAULT_DIVISOR


def onnx_accuracy(path: Path, images, labels, batch: int = 1) -> float:
    """Top-1 (0..1) of an exported model on ``images`` with ONNX Runtime (its fixed batch)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.numpy()
    n = len(x) // batch * batch
    logits = np.concatenate([sess.run(None, {"input": x[i:i + batch]})[0] for i in range(0, n, batch)])
    return float((logits.argmax(1) == labels[:n].numpy()).mean())


def run_demo(opts: DemoOptions | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Run the pipeline; see the module docstring."""
    import torch

    opts = opts or DemoOptions()
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.torch_threads))
    try:
        with owned(opts.out, flag="--out"):  # one demo per folder
            return _run(opts, log)
    finally:
        torch.set_num_threads(before)


def _run(opts: DemoOptions, log: Callable[[str], None]) -> DemoResult:
    """The demo's steps in order, each timed (``seconds``)."""
    r = QUICK if opts.quick else FULL
    out = _prepare_out(opts)
    seconds: dict[str, float] = {}
    t_all = t = time.perf_counter()
    ckpt_path = _train(r, opts, out, log)
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    table_path, table = _profile(r, opts, out, ckpt_path, log)
    seconds["profile"] = time.perf_counter() - t
    t = time.perf_counter()
    ckpt, values, result = _search(r, opts, out, ckpt_path, table, log)
    seconds["search"] = time.perf_counter() - t
    t = time.perf_counter()
    exported = _export(r, opts, out, ckpt, values, result, table_path, log)
    seconds["export"] = time.perf_counter() - t
    t = time.perf_counter()
    rows, conditions = _measure(r, out, ckpt, exported, table, log)
    seconds["measure"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all

    plot = plot_accuracy_latency(result, rows, values, out / "accuracy_latency.png",
                                 title=f"{r.model} x{r.width_mult:g} {r.input_size}px, ONNX Runtime on this CPU")
    _write_results(out, rows, r, opts, ckpt_path, table_path, seconds, conditions)
    return DemoResult(out, rows, plot, ckpt_path, table_path, {k: round(s, 1) for k, s in seconds.items()},
                      conditions)


def _prepare_out(opts: DemoOptions) -> Path:
    """The demo's folder, created; refused when it holds other files (unless ``force``: the demo's own are cleared)."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder for the demo's files")
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to run the demo there again "
                                "(it replaces the demo's files) or give another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if opts.force:
            clear_outputs(out)
    except OSError as e:  # a parent is a file, no permission, ...
        raise ConfigError(f"cannot create the --out folder {out} ({e.strerror or type(e).__name__}); "
                          "give another --out") from None
    return out


def _train(r: Recipe, opts: DemoOptions, out: Path, log: Callable[[str], None]) -> Path:
    """Step 1: train the supernet, widths on ONNX Runtime's channel block; its checkpoint."""
    from hwslim.training.train import TrainConfig, train

    divisor = channel_divisor(opts.threads)
    log(f"[1/5] training a slimmable {r.model} x{r.width_mult:g} at {r.input_size}px on {r.data} "
        f"({r.epochs} epochs; widths in multiples of {divisor}, ONNX Runtime's channel block here)")
    trained = train(TrainConfig(
        model=r.model, data=r.data, epochs=r.epochs, out=str(out / "train"), width_mult=r.width_mult,
        divisor=divisor,
        input_size=r.input_size, batch_size=r.batch_size, lr=r.lr, search_size=r.search_size, seed=opts.seed,
        device="cpu", workers=0, calib_images=r.calib_images, synthetic_val=r.val_images,
        num_random=r.num_random, progress=opts.progress, force=opts.force))
    return Path(trained.checkpoint)


def _profile(r: Recipe, opts: DemoOptions, out: Path, ckpt_path: Path, log: Callable[[str], None]):
    """Step 2: this CPU's ONNX Runtime table for the trained supernet (its grids and its classifier,
    20 classes wide); its path and the table."""
    from hwslim.latency.profile import ProfileSettings, profile
    from hwslim.latency.table import LatencyTable

    log(f"[2/5] profiling this CPU for it (ONNX Runtime, {opts.threads} thread(s))")
    prof = profile(ProfileSettings(device="cpu", backend="ort", model=str(ckpt_path), width_mult=r.width_mult,
                                   input_size=r.input_size, threads=opts.threads,
                                   out=str(out / "table" / "latency.csv"), calib_configs=r.calib_configs,
                                   holdout_configs=r.holdout_configs, seed=opts.seed, force=opts.force,
                                   quick=r.profile_quick), progress=opts.progress, log=log)
    table_path = Path(prof.path)
    return table_path, LatencyTable.load(table_path)


def _search(r: Recipe, opts: DemoOptions, out: Path, ckpt_path: Path, table, log: Callable[[str], None]):
    """Step 3: search three latency budgets between the narrowest and the full config's;
    the checkpoint, the budgets searched and the search's result."""
    from hwslim.importing.checkpoint import load_checkpoint
    from hwslim.latency.verify import config_timer
    from hwslim.search.greedy import Budget, SearchOptions, greedy_search

    ckpt = load_checkpoint(ckpt_path)
    net = ckpt.model
    full = table.predict_ms(net.layer_specs(net.full_config()))
    narrow = table.predict_ms(net.layer_specs(net.min_config()))
    # On a noisy table (the quick run's tiny model) the full config can predict faster than
    # the narrowest; budgets above the narrowest stay feasible either way.
    top = max(full, 1.2 * narrow)
    values = budgets_between(narrow, top, r.fractions)
    log(f"[3/5] searching at {', '.join(f'{v:g}' for v in values)} ms (predicted: narrowest {narrow:.3f} ms, "
        f"full {full:.3f} ms)")
    search_opts = SearchOptions(out_dir=out / "search", force=True, max_images=r.search_size,
                                progress=opts.progress, plot=True, measure=config_timer(table, net))
    # The greedy walk only takes steps that lower the predicted latency; on a noisy table
    # it can stall above the narrowest config's latency. Budgets nearer the full config
    # stay reachable, so on a stall the demo retries higher ones.
    for retry in (None, (0.7, 0.8, 0.9), (0.85, 0.92, 0.99)):
        if retry is not None:
            values = budgets_between(narrow, top, retry)
            log(f"note: {stall}; searching at {', '.join(f'{v:g}' for v in values)} ms instead")
        try:
            result = greedy_search(ckpt, [Budget("latency_ms", v) for v in values], search_opts, table=table)
            return ckpt, values, result
        except BudgetError as e:
            stall = e
    raise stall


def _export(r: Recipe, opts: DemoOptions, out: Path, ckpt, values, result, table_path: Path,
            log: Callable[[str], None]) -> list[tuple]:
    """Step 4: each config to ONNX, checked against PyTorch; ``(budget, config, export result)`` each."""
    from hwslim.export.exporter import ExportOptions, export_model

    log("[4/5] exporting each config to ONNX (checked against PyTorch)")
    models = out / "models"
    exported = []
    for v, cfg in zip(values, result.configs):
        res = export_model(ckpt, cfg, models / f"{r.model}_{v:g}ms.onnx",
                           ExportOptions(force=opts.force, table=table_path, check_images=r.check_images,
                                         calib_images=r.search_size))
        exported.append((v, cfg, res))
    return exported


def _measure(r: Recipe, out: Path, ckpt, exported, table, log: Callable[[str], None]):
    """Step 5: measure the exported models with the table's protocol and score them on held-out images,
    under the machine's conditions checked before and after; the results' rows and the conditions."""
    from hwslim.importing.data import validation_split
    from hwslim.latency.conditions import compare_to_table, conditions_for_table
    from hwslim.latency.verify import verify_model

    log("[5/5] measuring the exported models and scoring them on held-out images")
    now = conditions_for_table(table)  # before measuring: the verdicts hold only under the table's conditions
    check = compare_to_table(table.meta, now, when="before measuring")
    log(f"conditions before measuring: {now.describe()}")
    images, labels = validation_split(ckpt, max_images=r.val_images)
    runs: dict[float, list] = {v: [] for v, _, _ in exported}
    for _ in range(r.rounds):  # interleaved, so a slow spell of the machine hits every model alike
        for v, _, res in exported:
            runs[v].append(verify_model(res.path, table, budget_ms=v, conditions=now))
    # and after: a machine that changed while the models were measured gives no confident verdict either
    later = conditions_for_table(table)
    after = compare_to_table(table.meta, later, when="after measuring")
    log(f"conditions after measuring: {later.describe()}")
    if check.reliable and not after.reliable:
        check = after
    if check.reliable:  # the reference timed beside a model may say its correction cannot be trusted
        check = next((x.conditions for v in runs for x in runs[v] if not x.reliable), check)
    rows = [_row(v, cfg, res, runs[v], check, out, onnx_accuracy(res.path, images, labels))
            for v, cfg, res in exported]
    conditions = {**check.as_dict(), "now": now.to_dict(), "after": later.to_dict(),
                  "table": table.meta.get("conditions")}
    return rows, conditions


def _row(budget: float, cfg, res, runs, check, out: Path, accuracy: float) -> dict[str, Any]:
    """One exported model's row: its budget, the medians of its rounds (p50 at the table's reference
    level, as the verdict takes it, and as measured; p90; the ratio to the budget), the verdict and
    the one line that says why a verdict is not OK."""
    from hwslim.latency.verify import bracketed, verdict_of

    p50 = statistics.median(x.judged_ms for x in runs)
    p90 = statistics.median(x.p90_ms for x in runs)
    first = runs[0]
    ratio = p50 / budget
    limit = budget * (1 + first.tolerance)
    # by each reference alone, where they moved unevenly (else p50 twice): VerifyResult.judged_range
    lo, hi = (statistics.median(x.judged_range[i] for x in runs) for i in (0, 1))
    verdict = verdict_of((lo, hi), limit, check)
    numbers = f"measured p50 {p50:.3f} ms, p90 {p90:.3f} ms, {ratio:.2f}x its {budget:g} ms budget"
    either = (f"; {lo:.3f}-{hi:.3f} ms by each reference alone, although {check.uneven_move}"
              if bracketed((lo, hi), limit, check) else "")
    message = {"OK": f"{res.path.name}: OK: {numbers}{either}" if either else None,
               "OVER": f"{res.path.name}: OVER: {numbers}, above the {100 * first.tolerance:g}% tolerance{either}",
               "UNRELIABLE": f"{res.path.name}: UNRELIABLE: {numbers}; {check.line()}"}[verdict]
    return {
        "budget_ms": budget,
        "predicted_ms": round(first.predicted_ms, 4),
        "measured_ms": round(p50, 4),  # at the table's reference level (as measured where it has none)
        "raw_ms": round(statistics.median(x.measured_ms for x in runs), 4),
        "level_x": round(statistics.median(x.level_ratio for x in runs), 3) if first.level_ratio else None,
        "p90_ms": round(p90, 4),
        "x_budget": float(f"{ratio:.4g}"),
        "verdict": verdict,
        "accuracy_%": round(100 * accuracy, 1),
        "search_acc_%": round(100 * float(cfg.meta.get("search_acc", float("nan"))), 1),
        "params": int(cfg.meta.get("params", 0)),
        "macs": int(cfg.meta.get("macs", 0)),
        "model": str(res.path.relative_to(out)),
        "message": message,
    }


def _write_results(out: Path, rows, recipe: Recipe, opts: DemoOptions, ckpt: Path, table: Path,
                   seconds: dict[str, float], conditions: dict[str, Any] | None = None) -> None:
    import pandas as pd

    provenance = {"produced_by": f"hwslim demo (hwslim {__version__})", "recipe": asdict(recipe),
                  "quick": opts.quick, "threads": opts.threads, "checkpoint": str(ckpt.resolve()),
                  "table": str(table.resolve()), "seconds": {k: round(s, 1) for k, s in seconds.items()},
                  "conditions": conditions}
    atomic_write_text(out / "demo.json", json.dumps({**provenance, "rows": rows}, indent=2, sort_keys=True) + "\n")
    frame = pd.DataFrame(rows)
    frame["produced_by"] = provenance["produced_by"]
    frame["checkpoint"] = provenance["checkpoint"]
    frame["table"] = provenance["table"]
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))


def accuracy_latency_figure(result, rows, budgets, title: str = ""):
    """Two panels on one latency axis, each with the budgets: the search's view (predicted
    latency, search-split accuracy: greedy path, uniform widths, the chosen configs) and the
    exported models' (measured latency, held-out accuracy; OVER marks a budget missed). The
    two accuracies are on different images, so they are never drawn on one line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    path = result.path
    if len(path) and "latency_ms" in path:  # (each series is drawn, and so in the legend, only when it has points)
        left.plot(path["latency_ms"], 100 * path["acc"], "-", color="tab:blue", lw=1.2, label="greedy path")
    uniform = [u for u in (result.uniform or []) if "latency_ms" in u]
    if uniform:
        left.plot([u["latency_ms"] for u in uniform], [100 * u["acc"] for u in uniform], "s--", color="tab:gray",
                  ms=4, lw=1, label="uniform widths")
    left.plot([r["predicted_ms"] for r in rows], [r["search_acc_%"] for r in rows], "o", color="tab:blue", ms=7,
              mfc="none", label="chosen configs")
    kinds = (("OK", "o", "tab:green", 8, "exported: within budget"),
             ("UNRELIABLE", "d", "tab:orange", 8, "exported: unreliable, conditions differ from the table's"),
             ("OVER", "X", "tab:red", 10, "exported: OVER budget"))
    for verdict, marker, colour, size, label in kinds:  # only the verdicts shown enter the legend
        shown = [r for r in rows if r["verdict"] == verdict]
        if shown:
            right.plot([r["measured_ms"] for r in shown], [r["accuracy_%"] for r in shown], marker, color=colour,
                       ms=size, label=label)
    for r in rows:  # each exported model says which budget it was searched for
        text = ((f"{r['budget_ms']:g} ms budget" if "budget_ms" in r else "")
                + (", OVER" if r["verdict"] == "OVER" else ""))
        right.annotate(text.lstrip(", "), (r["measured_ms"], r["accuracy_%"]), xytext=(6, 4),
                       textcoords="offset points", fontsize=7,
                       color="tab:red" if r["verdict"] == "OVER" else "black",
                       fontweight="bold" if r["verdict"] == "OVER" else "normal")
    for ax in (left, right):
        for i, b in enumerate(budgets):
            ax.axvline(b, color="tab:red", ls=":", lw=1, label="latency budgets" if i == 0 else None)
            ax.annotate(f"{b:g} ms", (b, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="tab:red")
        ax.grid(alpha=0.3)
        ax.margins(y=0.2)
        ax.legend(fontsize=8, loc="best")
    left.set_title("search: predicted latency, search-split accuracy", fontsize=9)
    left.set_xlabel("predicted latency (ms, batch 1, from the table)")
    left.set_ylabel("search-split top-1 (%)")
    right.set_title("exported ONNX models: measured latency, held-out accuracy", fontsize=9)
    right.set_xlabel("measured latency (ms, batch 1)")
    right.set_ylabel("held-out top-1 (%)")
    right.tick_params(labelbottom=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_latency(result, rows, budgets, png: Path, title: str = "") -> Path:
    """Save :func:`accuracy_latency_figure` as ``png`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = accuracy_latency_figure(result, rows, budgets, title)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120, metadata={"Software": f"hwslim {__version__}", "Title": title,
                                         "Description": "hwslim demo: accuracy vs latency"})
    plt.close(fig)
    tmp.replace(png)
    return png
