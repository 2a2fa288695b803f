"""Hardware-aware greedy slimming (AutoSlim, with real costs).

Start at the full config. Each step, every unit that can shrink proposes its next
narrower grid width that lowers the binding cost (one grid step for MACs, parameters
and memory; more where a latency table is flat, see :func:`_shrink`); each proposal is scored on the checkpoint's held-out search split (BN
recalibrated, :mod:`hwslim.evaluator`) and costed (latency from a table, peak
activation memory, parameters, MACs: :func:`config_costs`). The step keeps the best
proposal by the criterion, and the walk continues until every budget holds. One walk
yields a config for every budget in a list: the first config on the path that meets it.

Criteria:

* ``acc``: the smallest accuracy drop (AutoSlim's rule);
* ``acc-per-cost``: the smallest accuracy drop per unit of cost saved on the budget that
  binds now, the unmet budget with the largest cost/limit ratio (NetAdapt's rule).

Either way only proposals that lower the binding cost are considered, while any does
(with a latency table a narrower layer is not always faster); when none does, the step
takes the best proposal by accuracy. Ties go to the lower search loss, then the larger
saving. The walk always ends: budgets the narrowest config misses are refused up front.

:func:`slim` is the pure driver (a scorer and a cost function in, the path out);
:func:`greedy_search` loads the checkpoint's data, runs it with resume, and writes
the outputs.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hwslim.config import ChannelConfig, atomic_write_text
from hwslim.costs import spec_costs
from hwslim.errors import BudgetError, HwslimError, OutputExistsError
from hwslim.evaluator import Score, StepEvaluator
from hwslim.outputs import check_output, remove_stale_temporaries
from hwslim.supernet import SlimmableNet

BUDGET_KINDS = {  # kind -> (unit shown, cost key)
    "latency_ms": "ms",
    "memory_mb": "MB (10^6 bytes of peak activations)",
    "params_m": "million parameters",
    "macs_m": "million MACs",
}
CRITERIA = ("acc", "acc-per-cost")
DEFAULT_CRITERION = "acc"


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise HwslimError(f"unknown budget kind {self.kind!r}; expected one of {', '.join(BUDGET_KINDS)}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise BudgetError(f"{self.kind} budget must be a positive number, got {self.value}")

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"

    def met(self, costs: Mapping[str, float]) -> bool:
        return costs[self.kind] <= self.value


def config_costs(model: SlimmableNet, config: ChannelConfig, table=None, batch: int = 1) -> dict[str, float]:
    """Every cost the search knows for ``config``: budget keys plus the raw counts."""
    specs = model.layer_specs(config, batch=batch)
    c = spec_costs(specs)
    out = {"memory_mb": c.peak_activation_bytes / 1e6, "params_m": c.params / 1e6, "macs_m": c.macs / 1e6,
           "peak_activation_bytes": c.peak_activation_bytes, "params": c.params, "macs": c.macs}
    if table is not None:
        out["latency_ms"] = table.predict_ms(specs)
    return out


@dataclass
class Step:
    """One point of the greedy path: the config after ``unit`` went from ``old`` to ``new``."""

    step: int
    unit: str | None
    old: int | None
    new: int | None
    acc: float
    loss: float
    costs: dict[str, float]
    binding: str | None = None
    widths: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict:
        return {"step": self.step, "unit": self.unit or "", "old": self.old, "new": self.new, "acc": self.acc,
                "loss": self.loss, "binding": self.binding or "", **self.costs}


def _binding(budgets: Sequence[Budget], costs: Mapping[str, float]) -> Budget | None:
    unmet = [b for b in budgets if not b.met(costs)]
    return max(unmet, key=lambda b: costs[b.kind] / b.value) if unmet else None


def slim(model: SlimmableNet, score_candidates: Callable[[ChannelConfig, list[tuple[str, ChannelConfig]]], list[Score]],
         score: Callable[[ChannelConfig], Score], cost_fn: Callable[[ChannelConfig], dict[str, float]],
         budgets: Sequence[Budget], *, criterion: str = DEFAULT_CRITERION, replay: Sequence[Step] = (),
         on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """The greedy walk. ``replay`` (a saved path prefix) is trusted and continued from."""
    if criterion not in CRITERIA:
        raise HwslimError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if replay:
        path = list(replay)
        config = model.config_of(path[-1].widths)
    else:
        config = model.full_config()
        s = score(config)
        path = [Step(0, None, None, None, s.acc, s.loss, cost_fn(config), widths=dict(config.widths))]
        if on_step:
            on_step(path[0])
    while True:
        current = path[-1]
        binding = _binding(budgets, current.costs)
        if binding is None:
            return path
        candidates, costs = [], []
        for u in model.units:
            found = _shrink(model, config, u, binding.kind, current.costs[binding.kind], cost_fn)
            if found is not None:
                candidates.append((u, found[0]))
                costs.append(found[1])
        if not candidates:  # cannot happen after check_feasible: the narrowest config meets every budget
            raise BudgetError(f"the {binding.label} budget cannot be met: every unit is at its narrowest width")
        # Prefer proposals that lower the binding cost; when none does (every unit is on a
        # plateau to its narrowest width), take the best one anyway and walk on.
        keep = [i for i, c in enumerate(costs) if c[binding.kind] < current.costs[binding.kind]]
        per_cost = criterion == "acc-per-cost" and bool(keep)
        keep = keep or list(range(len(candidates)))
        scores = score_candidates(config, [candidates[i] for i in keep])

        def key(j: int) -> tuple:
            i = keep[j]
            drop = current.acc - scores[j].acc
            saved = current.costs[binding.kind] - costs[i][binding.kind]
            primary = drop / saved if per_cost else drop
            return (primary, scores[j].loss, -saved, i)

        j = min(range(len(keep)), key=key)
        i = keep[j]
        unit_name, config = candidates[i]
        step = Step(len(path), unit_name, current.widths[unit_name], config.widths[unit_name], scores[j].acc,
                    scores[j].loss, costs[i], binding.label, dict(config.widths))
        path.append(step)
        if on_step:
            on_step(step)


def _shrink(model: SlimmableNet, config: ChannelConfig, unit: str, kind: str, current: float,
            cost_fn) -> tuple[ChannelConfig, dict[str, float]] | None:
    """Unit ``unit``'s proposal: its nearest narrower grid width that lowers ``kind``.

    A measured latency table has plateaus: a runtime pads channels to its vector block
    (ONNX Runtime's NCHWc block is 16 channels with AVX-512), so one 8-channel grid step
    may save nothing while two do. Walking down to the first width that saves lets the
    greedy step take such two-step moves. Costs that fall with every step (MACs,
    parameters, memory) stop at one step, exactly AutoSlim's proposal. With no saving
    width at all, the proposal is the plain one-step shrink (None at the narrowest).
    """
    first = None
    width = config.widths[unit]
    while (width := model.units[unit].narrower(width)) is not None:
        cand = config.replace(**{unit: width})
        c = cost_fn(cand)
        if first is None:
            first = (cand, c)
        if c[kind] < current:
            return cand, c
    return first


def check_feasible(model: SlimmableNet, budgets: Sequence[Budget], cost_fn) -> dict[str, float]:
    """Refuse budgets below what the narrowest config achieves; returns the narrowest config's costs."""
    floor = cost_fn(model.min_config())
    for b in budgets:
        if b.kind not in floor:
            raise HwslimError(f"a {b.kind} budget needs a latency table: pass --table PATH or --device")
        if not b.met(floor):
            raise BudgetError(f"no config can meet {b.label}: the smallest achievable {b.kind} on this "
                              f"supernet's grid is {floor[b.kind]:.4g} (the narrowest config); raise the budget")
    return floor


def pick_configs(model: SlimmableNet, path: Sequence[Step], budgets: Sequence[Budget]) -> list[ChannelConfig]:
    """For each budget, the first config on the path that meets it, with its costs and accuracy in meta."""
    out = []
    for b in budgets:
        step = next(s for s in path if b.met(s.costs))
        out.append(model.config_of(step.widths, budget={"kind": b.kind, "value": b.value}, search_step=step.step,
                                   search_acc=step.acc, **{k: v for k, v in step.costs.items()}))
    return out


# -- I/O layer ------------------------------------------------------------------------------------
STATE_NAME = "search_state.json"
OUTPUT_NAMES = (STATE_NAME, "path.csv", "uniform.csv", "search.png")


def existing_outputs(out: Path) -> list[Path]:
    """The files of ``out`` a search would write (or resume from) that already exist."""
    if not out.is_dir():
        return []
    return [out / n for n in OUTPUT_NAMES if (out / n).exists()] + sorted(out.glob("config_*.json"))


def _checked_replay(model: SlimmableNet, steps: list[Step], cost_fn, state_file: Path) -> list[Step]:
    """The saved path, refused (one line) unless it is a walk this search could have made.

    Every step must be one valid config of this supernet, the first the full config,
    each next one narrowing exactly the unit it names; the costs are recomputed (so a
    resumed path has exactly an uninterrupted run's values, in the same order) and must
    equal the saved ones.
    """
    def bad(i: int, problem: str) -> HwslimError:
        return HwslimError(f"{state_file}: step {i} {problem}; the file was edited or damaged: delete it or "
                           "pass --force to start over")

    if not steps:
        raise bad(0, "is missing")
    out: list[Step] = []
    prev: dict[str, int] | None = None
    for i, st in enumerate(steps):
        if st.step != i:
            raise bad(i, f"is numbered {st.step!r}")
        if not isinstance(st.widths, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in st.widths.values()):
            raise bad(i, "has widths that are not whole numbers")
        for name in ("acc", "loss"):
            v = getattr(st, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (name == "acc" and v > 1):
                raise bad(i, f"has {name}={v!r}")
        try:
            config = model.validate(model.config_of(st.widths))
        except HwslimError as e:
            raise bad(i, f"is not a config of this supernet ({e})") from None
        if prev is None:
            if st.widths != dict(model.full_config().widths) or st.unit is not None:
                raise bad(i, "is not the full config")
        else:
            changed = [u for u in st.widths if st.widths[u] != prev[u]]
            if changed != [st.unit] or st.old != prev[st.unit] or st.new != st.widths[st.unit] \
                    or not st.new < st.old:
                raise bad(i, f"does not narrow exactly its unit {st.unit!r} from the step before")
        costs = cost_fn(config)
        saved = st.costs if isinstance(st.costs, dict) else {}
        for k, v in costs.items():
            have = saved.get(k)
            if isinstance(have, bool) or not isinstance(have, (int, float)) or \
                    not math.isclose(have, v, rel_tol=1e-9, abs_tol=1e-12):
                raise bad(i, f"has {k}={have!r}, but that config's {k} is {v!r}")
        out.append(Step(st.step, st.unit, st.old, st.new, float(st.acc), float(st.loss), costs,
                        st.binding or None, dict(st.widths)))
        prev = st.widths
    return out


@dataclass
class SearchResult:
    configs: list[ChannelConfig]
    path: "object"  # pandas.DataFrame
    steps: list[Step]
    out_dir: Path | None = None
    uniform: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the config file of each budget (when out_dir is given)


def config_file(out_dir: str | Path, budget: Budget) -> Path:
    """Where a search writes the config of ``budget``: ``OUT/config_<kind>_<value>.json``."""
    return Path(out_dir) / f"config_{budget.kind}_{budget.value:g}.json"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def greedy_search(checkpoint, budgets: Sequence[Budget], *, table=None, criterion: str = DEFAULT_CRITERION,
                  out_dir: str | Path | None = None, resume: bool = False, force: bool = False,
                  device: str = "cpu", evaluator: str = "fast", bn: str = "recal", batch_size: int = 250,
                  kernels: str = "torch",
                  max_images: int | None = None, batch: int = 1, progress: bool = True,
                  plot: bool = True, images=None, labels=None, force_table: bool = False,
                  log: Callable[[str], None] | None = None) -> SearchResult:
    """Search ``checkpoint``'s supernet for every budget; see the module docstring.

    ``out_dir`` receives one ChannelConfig JSON per budget, ``path.csv`` (the whole
    walk), ``search_state.json`` (for ``resume``) and ``search.png``. The search split
    comes from the checkpoint (``hwslim.data.search_split``) unless ``images``/``labels``
    are given. ``force_table`` uses a ``table`` measured on another setup (``--force``).
    ``log`` gets a line saying what is scored, once every check has passed.
    """
    import pandas as pd

    from hwslim import distributed_search as dist

    log = log or (lambda msg: print(msg, file=sys.stderr))
    budgets = list(budgets)
    if not budgets:
        raise HwslimError("give at least one budget (--latency-ms, --memory-mb, --params-m or --macs-m)")
    model: SlimmableNet = checkpoint.model.to(device)
    if table is not None:
        table.check_compatible(model, batch=batch, force=force_table)
    cost_fn = lambda cfg: config_costs(model, cfg, table, batch)  # noqa: E731
    check_feasible(model, budgets, cost_fn)
    out = Path(out_dir) if out_dir is not None else None
    settings = {
        "checkpoint": str(getattr(checkpoint, "path", "") or ""),
        "checkpoint_sha256": _file_digest(checkpoint.path) if getattr(checkpoint, "path", None) else "",
        "budgets": [asdict(b) for b in budgets], "criterion": criterion, "bn": bn, "batch": batch,
        "batch_size": batch_size, "max_images": max_images,
        "table": str(table.path) if table is not None and getattr(table, "path", None) else None,
    }
    replay: list[Step] = []
    state_file = out / STATE_NAME if out is not None else None
    if out is not None:
        check_output(out, kind="dir")
        remove_stale_temporaries(out)  # left by a search killed while saving its state
    if state_file is not None and state_file.exists():
        if resume:
            try:
                state = json.loads(state_file.read_text())
                steps_saved = [Step(**st) for st in state["steps"]]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise HwslimError(f"{state_file} is not a readable search state ({type(e).__name__}); "
                                  "delete it or pass --force to start over") from None
            if state.get("settings") != settings:
                raise HwslimError(f"{state_file} was written by a search with other settings; "
                                  "start a new --out directory or repeat the original command")
            replay = _checked_replay(model, steps_saved, cost_fn, state_file)
        elif not force:
            raise OutputExistsError(f"{out} already holds a search; pass --resume to continue it "
                                    "or --force to start over")
    elif out is not None:
        found = existing_outputs(out)
        if found and not force:  # outputs of a finished search whose state is gone, or anyone's files
            raise OutputExistsError(f"{out} already holds {', '.join(p.name for p in found[:4])}"
                                    f"{' ...' if len(found) > 4 else ''} (and no {STATE_NAME} to resume); "
                                    "pass --force to replace them or give another --out")
        if resume:
            log(f"note: nothing to resume in {out} (no {STATE_NAME}): starting the search")
    if images is None:
        from hwslim.data import search_split

        images, labels = search_split(checkpoint, device=device, max_images=max_images)
    ev = StepEvaluator(model, images.to(device), labels.to(device), bn=bn, mode=evaluator, batch_size=batch_size,
                       kernels=kernels)
    if log is not None and dist.is_writer():
        log(f"searching {', '.join(b.label for b in budgets)}: each candidate scored on {len(labels):,} search-split "
            f"images (BN {'recalibrated per candidate' if bn == 'recal' else 'batch statistics'}, {evaluator} "
            f"evaluator, {device})" + (f"; resuming after step {len(replay) - 1}" if replay else ""))
    score_candidates = dist.sharded(ev.score_candidates)
    is_writer = dist.is_writer()

    bar = None
    full_costs = cost_fn(model.full_config())

    def done_pct(costs: Mapping[str, float]) -> int:
        """How far the walk is, in % of the way from the full config to the budget it meets last
        (costs fall about evenly per step, so the bar's rate gives a fair ETA)."""
        fracs = [min(1.0, max(0.0, (full_costs[b.kind] - costs[b.kind]) / (full_costs[b.kind] - b.value)))
                 if full_costs[b.kind] > b.value else 1.0 for b in budgets]
        return int(100 * min(fracs))

    if progress and is_writer:
        from tqdm.auto import tqdm

        bar = tqdm(desc="greedy search (% of the way to the budgets)", total=100, unit="%", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}% [{elapsed}<{remaining}{postfix}]")
        if replay:
            bar.update(done_pct(replay[-1].costs))

    steps: list[Step] = list(replay)

    def on_step(step: Step) -> None:
        steps.append(step)
        if state_file is not None and is_writer:
            atomic_write_text(state_file, json.dumps({"settings": settings, "steps": [asdict(s) for s in steps]},
                                                     sort_keys=True))
        if bar is not None:
            shown = {k: round(step.costs[k], 3) for k in ("latency_ms", "memory_mb", "params_m", "macs_m")
                     if k in step.costs}
            bar.set_postfix(step=step.step, acc=f"{step.acc:.3f}", **shown)
            bar.update(max(0, done_pct(step.costs) - bar.n))

    try:
        path = slim(model, score_candidates, ev.score, cost_fn, budgets, criterion=criterion, replay=replay,
                    on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    configs = pick_configs(model, path, budgets)
    frame = pd.DataFrame([s.row() for s in path])
    result = SearchResult(configs, frame, path, out, files=[config_file(out, b) for b in budgets] if out else [])
    if out is not None and is_writer:
        provenance = {"produced_by": "hwslim search", "checkpoint": settings["checkpoint"],
                      "checkpoint_sha256": settings["checkpoint_sha256"], "table": settings["table"],
                      "criterion": criterion, "bn": bn}
        for b, cfg in zip(budgets, configs):
            cfg.with_meta(**provenance).save(config_file(out, b), force=True)
        frame.to_csv(out / "path.csv", index=False)
        if plot:
            uniform = list(enumerate(model.uniform_configs(), start=1))
            if progress:
                from tqdm.auto import tqdm

                uniform = tqdm(uniform, desc="scoring uniform-width configs (for search.png)", unit="config",
                               dynamic_ncols=True)
            result.uniform = [{"step": s, "acc": (sc := ev.score(u)).acc, "loss": sc.loss, **cost_fn(u)}
                              for s, u in uniform]
            pd.DataFrame(result.uniform).to_csv(out / "uniform.csv", index=False)
            plot_path(frame, pd.DataFrame(result.uniform), budgets, out / "search.png")
    return result


AXIS_LABELS = {  # budget kind -> axis label
    "latency_ms": "latency (ms, predicted by the table)",
    "memory_mb": "peak activation memory (MB)",
    "params_m": "parameters (millions)",
    "macs_m": "MACs (millions)",
}


def path_figure(path, uniform, budgets: Sequence[Budget]):
    """The figure of :func:`plot_path` (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = budgets[0].kind
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(path[kind], 100 * path["acc"], "-", lw=1.2, label="greedy path")
    if uniform is not None and len(uniform):
        ax.plot(uniform[kind], 100 * uniform["acc"], "s--", ms=4, label="uniform width")
    for i, b in enumerate(b for b in budgets if b.kind == kind):
        ax.axvline(b.value, color="grey", ls=":", lw=1, label="budgets" if i == 0 else None)
        ax.annotate(f"{b.value:g}", (b.value, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel(AXIS_LABELS[kind])
    ax.set_ylabel("search-split accuracy (%)")
    others = sorted({b.kind for b in budgets} - {kind})
    if others:
        ax.set_title(f"against {kind}; budgets on {', '.join(others)} are not drawn", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_path(path, uniform, budgets: Sequence[Budget], png: Path) -> Path:
    """Accuracy against the first budget's cost along the path, with uniform-width configs."""
    import matplotlib.pyplot as plt

    fig = path_figure(path, uniform, budgets)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
