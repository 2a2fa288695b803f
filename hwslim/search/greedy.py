"""Hardware-aware greedy slimming (AutoSlim, with real costs).

Start at the full config. Each step, every unit that can shrink proposes its next
narrower grid width that lowers the binding cost (one grid step for MACs, parameters
and memory; more where a latency table is flat, see :func:`_shrink`); each proposal is scored on the
checkpoint's held-out search split (:mod:`hwslim.search.evaluator`: BN statistics of the config's own, the
shared prefix computed once, successive halving by default) and costed (latency from a table, peak
activation memory, parameters, MACs: :func:`config_costs`). The step keeps the best
proposal by the criterion, and the walk continues until every target holds. One walk
yields a config for every target in a list: the first config on the path that meets it.

Targets and constraints (:func:`targets_of`): the budget kind given several values
yields one target per value; every other kind given is a constraint that each of
those targets also meets (``latency_ms 20 15 10`` with ``memory_mb 5``: three configs,
each within its latency and within 5 MB). Several values for two kinds are refused.

Criteria:

* ``acc``: the smallest accuracy drop (AutoSlim's rule);
* ``acc-per-cost``: the smallest accuracy drop per unit of cost saved on the budget that
  binds now, the unmet budget (of a target not met yet) with the largest cost/limit
  ratio (NetAdapt's rule).

Either way only proposals that lower the binding cost are considered, while any does
(with a latency table a narrower layer is not always faster); when none does, the step
takes the best proposal by accuracy. Ties go to the lower search loss, then the larger
saving. Memory, parameter and MAC budgets below the narrowest config are refused up
front. A latency table is not monotone (the narrowest config is not always the
fastest): when the walk reaches the narrowest config with a target unmet, it jumps to
the best-scoring uniform-width config that meets it and walks on; a target nothing seen
meets is refused with the smallest cost found and the config that has it.

After the walk, :func:`fill_budget` (pure too) spends each target's slack: the first
config on the path that meets a budget often lies well under it, so units are widened
back, best search-split accuracy gain per budget spent, while every budget holds.

With ``SearchOptions.measure`` (``hwslim search --measure``), :func:`fit_to_measured` fits each
latency budget to end-to-end times before the pick and fill: the table proposes, the machine
disposes (the search never runs a profiler; the caller's ``measure`` does).

Any task: ``SearchOptions(scoring=ScoreFnScoring(score_fn, calib))`` scores each proposal
with the user's ``score_fn(model) -> float`` (mAP, mIoU, a negative loss) instead of top-1
on the search split (:class:`hwslim.search.evaluator.ScoreFnEvaluator`; its score is a
step's ``acc``).

:func:`slim` is the pure driver (a scorer and a cost function in, the path out);
:func:`greedy_search` (its options one :class:`SearchOptions`) runs it on a checkpoint
in named steps: the costs checked (:func:`check_feasible`), the state to resume from
(:class:`SearchState`), the scorers, the walk (:class:`WalkProgress` shows it), the
filling, and the outputs (:func:`write_outputs`, :func:`write_plot`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hwslim.core import jsonio
from hwslim.core.config import ChannelConfig, atomic_write_text
from hwslim.core.costs import spec_costs
from hwslim.core.errors import BudgetError, HwslimError, OutputExistsError
from hwslim.core.outputs import check_output, owned, remove_stale_temporaries
from hwslim.core.supernet import SlimmableNet
from hwslim.search import distributed as dist
from hwslim.search.evaluator import Score, ScoreFnScoring, Scoring

BUDGET_KINDS = {  # kind -> (unit shown, cost key)
    "latency_ms": "ms",
    "memory_mb": "MB (10^6 bytes of peak activations)",
    "params_m": "million parameters",
    "macs_m": "million MACs",
}
# Costs that fall with every narrower width, so the narrowest config is their floor. A
# measured latency table need not: a runtime may run 8 channels slower than 16.
MONOTONE_KINDS = ("memory_mb", "params_m", "macs_m")
CRITERIA = ("acc", "acc-per-cost")
DEFAULT_FILL_STEPS = 20
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


@dataclass(frozen=True)
class Target:
    """One config to find: the first on the path meeting ``budget`` and every one of ``constraints``."""

    budget: Budget
    constraints: tuple[Budget, ...] = ()

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return (self.budget, *self.constraints)

    @property
    def label(self) -> str:
        return " ".join(b.label for b in self.budgets)

    def met(self, costs: Mapping[str, float]) -> bool:
        return all(b.met(costs) for b in self.budgets)


def targets_of(budgets: Sequence[Budget]) -> list[Target]:
    """The configs to find for budgets as a user lists them (``--latency-ms 20 15 --memory-mb 5``).

    The kind given several values yields one target per value; every other kind given
    (one value each) is a constraint of every target. With one value per kind there is
    one target (the first kind listed) constrained by the others. Several values for two
    kinds are refused: which pairs to cross is the user's call, one search per value of
    the second kind does it.

        >>> [t.label for t in targets_of([Budget("latency_ms", 20), Budget("latency_ms", 10),
        ...                               Budget("memory_mb", 5)])]
        ['latency_ms=20 memory_mb=5', 'latency_ms=10 memory_mb=5']
    """
    by_kind: dict[str, list[Budget]] = {}
    for b in dict.fromkeys(budgets):  # a repeated value is one target
        by_kind.setdefault(b.kind, []).append(b)
    multi = [k for k, bs in by_kind.items() if len(bs) > 1]
    if len(multi) > 1:
        raise BudgetError(f"several values for both {multi[0]} and {multi[1]}: give several values for one "
                          "budget kind only (one config per value; each other kind is a constraint every config "
                          "meets), or run one search per value of the other kind")
    if not by_kind:
        return []
    lead = multi[0] if multi else next(iter(by_kind))
    constraints = tuple(bs[0] for k, bs in by_kind.items() if k != lead)
    return [Target(b, constraints) for b in by_kind[lead]]


def _as_targets(budgets: Sequence[Budget | Target]) -> list[Target]:
    return [b if isinstance(b, Target) else Target(b) for b in budgets]


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
    """One point of the greedy path: the config after ``unit`` went from ``old`` to ``new``.

    ``move``: ``start`` (the full config), ``shrink`` (a greedy step), ``jump`` (to a
    known config that meets a target the walk could not reach, see :func:`slim`) or
    ``widen`` (a step of :func:`fill_budget`).
    """

    step: int
    unit: str | None
    old: int | None
    new: int | None
    acc: float
    loss: float
    costs: dict[str, float]
    binding: str | None = None
    widths: dict[str, int] = field(default_factory=dict)
    move: str = "shrink"

    def row(self) -> dict:
        return {"step": self.step, "unit": self.unit or "", "old": self.old, "new": self.new, "acc": self.acc,
                "loss": self.loss, "binding": self.binding or "", "move": self.move, **self.costs}


def _binding(budgets: Sequence[Budget], costs: Mapping[str, float]) -> Budget | None:
    unmet = [b for b in budgets if not b.met(costs)]
    return max(unmet, key=lambda b: costs[b.kind] / b.value) if unmet else None


def slim(model: SlimmableNet, score_candidates: Callable[..., list[Score | None]],
         score: Callable[[ChannelConfig], Score], cost_fn: Callable[[ChannelConfig], dict[str, float]],
         budgets: Sequence[Budget | Target], *, criterion: str = DEFAULT_CRITERION, replay: Sequence[Step] = (),
         on_step: Callable[[Step], None] | None = None,
         known: Sequence[ChannelConfig] | None = None) -> list[Step]:
    """The greedy walk, until every target has been met somewhere on the path.

    ``budgets``: :class:`Target` s (a plain :class:`Budget` is a target of its own, see
    :func:`targets_of` for budgets as a user gives them). ``replay`` (a saved path
    prefix) is trusted and continued from.

    ``score_candidates(current, candidates, rank=rank)`` scores a step's candidates
    (``(unit, config)`` pairs); ``rank(base, i, score)`` is the criterion's sort key of
    candidate ``i`` given the current config's score ``base`` on the same images, so a
    scorer that prunes (:class:`hwslim.search.evaluator.Halving`: screen on a few images, score
    the best few in full) ranks as the walk does and answers ``None`` for the rest.
    ``score(config)`` scores one config in full (the start and jumps).

    A measured latency table is not monotone: the narrowest config is not always the
    fastest. When the walk reaches the narrowest config with targets still unmet, it
    jumps to the best-scoring ``known`` config (default: the uniform-width configs, which
    the search reports in ``uniform.csv``) that meets one of them and walks on from
    there; when none does, the target is refused (:class:`BudgetError`) naming the
    smallest cost seen and the config that has it. Every jump meets a target for good,
    so the walk ends.
    """
    if criterion not in CRITERIA:
        raise HwslimError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    targets = _as_targets(budgets)
    path: list[Step] = list(replay)

    def take(step: Step) -> ChannelConfig:
        path.append(step)
        if on_step:
            on_step(step)
        return model.config_of(step.widths)

    if replay:
        config = model.config_of(path[-1].widths)
    else:
        config = model.full_config()
        s = score(config)
        take(Step(0, None, None, None, s.acc, s.loss, cost_fn(config), widths=dict(config.widths), move="start"))
    pending = [t for t in targets if not any(t.met(st.costs) for st in path)]
    while True:
        current = path[-1]
        pending = [t for t in pending if not t.met(current.costs)]
        if not pending:
            return path
        # the current config misses every pending target, so some budget of theirs binds
        binding = _binding([b for t in pending for b in t.budgets], current.costs)
        assert binding is not None
        candidates, costs = _proposals(model, config, _shrink, binding.kind, current.costs[binding.kind], cost_fn)
        if not candidates:  # the narrowest config: continue from a known config that meets a pending target
            known_costs = [(c, cost_fn(c)) for c in (model.uniform_configs() if known is None else known)]
            step = _jump(score, known_costs, pending, len(path))
            if step is None:
                raise BudgetError(_refusal(pending[0], model, known_costs, path))
            config = take(step)
            continue
        # Prefer proposals that lower the binding cost; when none does (every unit is on a
        # plateau to its narrowest width), take the best one anyway and walk on.
        keep = [i for i, c in enumerate(costs) if c[binding.kind] < current.costs[binding.kind]]
        per_cost = criterion == "acc-per-cost" and bool(keep)
        keep = keep or list(range(len(candidates)))
        rank = _criterion_rank(per_cost, [current.costs[binding.kind] - costs[i][binding.kind] for i in keep])
        # a scorer that prunes (hwslim.search.evaluator.Halving) may leave out candidates: None
        scores = score_candidates(config, [candidates[i] for i in keep], rank=rank)
        base = Score(current.acc, current.loss)
        j = min((j for j, sc in enumerate(scores) if sc is not None), key=lambda j: rank(base, j, scores[j]))
        i = keep[j]
        unit_name, config = candidates[i]
        take(Step(len(path), unit_name, current.widths[unit_name], config.widths[unit_name], scores[j].acc,
                  scores[j].loss, costs[i], binding.label, dict(config.widths)))


def _criterion_rank(per_cost: bool, saved: Sequence[float]) -> Callable[[Score, int, Score], tuple]:
    """The criterion's order of a step's candidates (smaller first): ``rank(base, j, score)`` of candidate
    ``j``, which saves ``saved[j]`` of the binding cost, given the current config's score ``base`` on the
    same images."""
    def rank(base: Score, j: int, s: Score) -> tuple:
        drop = base.acc - s.acc
        return (drop / saved[j] if per_cost else drop, s.loss, -saved[j], j)

    return rank


def _proposals(model: SlimmableNet, config: ChannelConfig, propose: Callable[..., tuple | None], *args
               ) -> tuple[list[tuple[str, ChannelConfig]], list[dict[str, float]]]:
    """Every unit's proposal from ``config`` as candidates and their costs: ``propose(model, config,
    unit, *args)`` (:func:`_shrink`, :func:`_widen`) gives a config and its costs, or None."""
    candidates, costs = [], []
    for u in model.units:
        found = propose(model, config, u, *args)
        if found is not None:
            candidates.append((u, found[0]))
            costs.append(found[1])
    return candidates, costs


def _jump(score, known_costs, pending: Sequence[Target], index: int) -> Step | None:
    """The best-scoring known config meeting a pending target, as a path step (None: none meets one)."""
    fits = [(c, costs, next(t for t in pending if t.met(costs))) for c, costs in known_costs
            if any(t.met(costs) for t in pending)]
    if not fits:
        return None
    scored = [(score(c), c, costs, t) for c, costs, t in fits]
    s, c, costs, t = max(scored, key=lambda x: (x[0].acc, -x[0].loss))  # max keeps the first of ties
    return Step(index, None, None, None, s.acc, s.loss, costs, t.label, dict(c.widths), move="jump")


def _describe(model: SlimmableNet, widths: Mapping[str, int], path: Sequence[Step]) -> str:
    if dict(widths) == dict(model.min_config().widths):
        return "the narrowest config"
    for i, u in enumerate(model.uniform_configs(), start=1):
        if dict(widths) == dict(u.widths):
            return f"uniform width {i}/{len(model.uniform_configs())}"
    step = next((s.step for s in path if s.widths == dict(widths)), None)
    return f"step {step} of the greedy path" if step is not None else "a config given as known"


def _refusal(target: Target, model: SlimmableNet, known_costs, path: Sequence[Step]) -> str:
    """Why ``target`` cannot be met: the smallest cost over every config the search has seen."""
    seen = [(dict(c.widths), costs) for c, costs in known_costs] + [(s.widths, s.costs) for s in path]
    missed = [b for b in target.budgets if not any(b.met(costs) for _, costs in seen)]
    if not missed:
        return (f"no config the search has seen meets {' and '.join(b.label for b in target.budgets)} together "
                "(each holds alone); relax one of them")
    b = missed[0]
    widths, costs = min(seen, key=lambda x: x[1][b.kind])
    return (f"no config can meet {b.label}: the smallest achievable {b.kind} the search found is "
            f"{costs[b.kind]:.4g} ({_describe(model, widths, path)}); raise the budget")


def fill_budget(model: SlimmableNet,
                score_candidates: Callable[..., list[Score | None]],
                cost_fn: Callable[[ChannelConfig], dict[str, float]], start: Step, target: Budget | Target, *,
                max_steps: int = DEFAULT_FILL_STEPS, on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Spend the slack the walk's config ``start`` leaves under ``target``: a greedy grow-back.

    The first config on the path that meets a budget often lies well under it (one grid
    step of the binding unit can save a lot). Each step, every unit proposes its nearest
    wider grid width with which every budget of ``target`` still holds; the proposals
    are scored together, ``score_candidates(current, proposals, rank=rank)`` (as in
    :func:`slim`) with each proposal *wider* than ``current`` in its unit, and the step keeps the largest accuracy gain
    per unit of budget spent (the largest rise of cost/limit over the target's budgets;
    a proposal that costs nothing, possible on a measured table, comes first), ties to
    the larger loss drop per budget spent. Only proposals that improve the score (higher
    accuracy, or the same accuracy and a lower loss) count. It stops when none fits or
    improves, or after ``max_steps`` steps (each one pass over the units). Returns the
    steps taken, numbered from 1 (``[]``: nothing fits); the last is the filled config.
    """
    (target,) = _as_targets([target])
    steps: list[Step] = []
    current, config = start, model.config_of(start.widths)
    for n in range(1, max_steps + 1):
        candidates, costs = _proposals(model, config, _widen, target, cost_fn)
        if not candidates:
            break
        spent = [max((c[b.kind] - current.costs[b.kind]) / b.value for b in target.budgets) for c in costs]

        def rank(base: Score, i: int, s: Score) -> tuple:
            """Improvers first, free ones first, then the largest gain (then loss drop) per budget spent."""
            gain, loss_drop = s.acc - base.acc, base.loss - s.loss
            per = 1.0 if spent[i] <= 0 else spent[i]
            return (gain < 0 or (gain == 0 and loss_drop <= 0), spent[i] > 0, -gain / per, -loss_drop / per, i)

        scores = score_candidates(config, candidates, rank=rank)  # None: left out by a pruning scorer
        base = Score(current.acc, current.loss)
        ranked = sorted((rank(base, i, sc), i) for i, sc in enumerate(scores) if sc is not None)
        if not ranked or ranked[0][0][0]:  # nothing improves the score
            break
        best = ranked[0][1]
        unit, config = candidates[best]
        current = Step(n, unit, current.widths[unit], config.widths[unit], scores[best].acc, scores[best].loss,
                       costs[best], target.label, dict(config.widths), move="widen")
        steps.append(current)
        if on_step:
            on_step(current)
    return steps


def _widen(model: SlimmableNet, config: ChannelConfig, unit: str, target: Target,
           cost_fn) -> tuple[ChannelConfig, dict[str, float]] | None:
    """Unit ``unit``'s grow-back proposal: its nearest wider grid width that keeps ``target`` met."""
    grid = list(model.units[unit].grid)
    for width in grid[grid.index(config.widths[unit]) + 1:]:
        cand = config.replace(**{unit: width})
        c = cost_fn(cand)
        if target.met(c):
            return cand, c
        if all(b.kind in MONOTONE_KINDS for b in target.budgets if not b.met(c)):
            return None  # only a latency table can fall again further up
    return None


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


def check_feasible(model: SlimmableNet, budgets: Sequence[Budget | Target], cost_fn,
                   latency_floor: float | None = None) -> dict[str, float]:
    """Refuse budgets below their true floor; returns the narrowest config's costs.

    For memory, parameters and MACs the narrowest config is the floor. A latency table
    is not monotone, so the narrowest config is not the latency floor: a latency budget
    is refused here only below ``latency_floor``, a bound no config can beat
    (:meth:`hwslim.latency.table.LatencyTable.lower_bound_ms`); above it the walk reaches the
    configs below the narrowest one's latency (:func:`slim`) and refuses only budgets
    that no config it has seen meets.
    """
    floor = cost_fn(model.min_config())
    for t in _as_targets(budgets):
        for b in t.budgets:
            if b.kind not in floor:
                raise HwslimError(f"a {b.kind} budget needs a latency table: pass --table PATH or --device")
            if b.kind in MONOTONE_KINDS and not b.met(floor):
                raise BudgetError(f"no config can meet {b.label}: the smallest achievable {b.kind} on this "
                                  f"supernet's grid is {floor[b.kind]:.4g} (the narrowest config); raise the budget")
            if b.kind == "latency_ms" and latency_floor is not None and b.value < latency_floor:
                raise BudgetError(f"no config can meet {b.label}: even every layer at its fastest width in the table "
                                  f"adds up to {latency_floor:.4g} ms; raise the budget")
    return floor


def pick_steps(path: Sequence[Step], budgets: Sequence[Budget | Target]) -> list[Step]:
    """For each target, the first step on the path that meets it (and all its constraints)."""
    return [next(s for s in path if t.met(s.costs)) for t in _as_targets(budgets)]


def pick_configs(model: SlimmableNet, path: Sequence[Step], budgets: Sequence[Budget | Target]) -> list[ChannelConfig]:
    """For each target, the first config on the path that meets it, with its costs and accuracy in meta."""
    targets = _as_targets(budgets)
    return [model.config_of(step.widths, **_target_meta(t), search_step=step.step, search_acc=step.acc,
                            **dict(step.costs))
            for t, step in zip(targets, pick_steps(path, targets))]


def _chosen_config(model: SlimmableNet, t: Target, walked: Step, filled: Sequence[Step]) -> ChannelConfig:
    """The config for ``t``: the walk's, grown back by ``filled``; meta says what the filling did."""
    final = _kept(walked, filled)
    return model.config_of(final.widths, **_target_meta(t), search_step=walked.step, search_acc=final.acc,
                           budget_used=final.costs[t.budget.kind] / t.budget.value,
                           search_acc_unfilled=walked.acc,
                           budget_used_unfilled=walked.costs[t.budget.kind] / t.budget.value,
                           fill_steps=len(filled), **dict(final.costs))


def _target_meta(t: Target) -> dict:
    return {"budget": {"kind": t.budget.kind, "value": t.budget.value},
            "constraints": [{"kind": b.kind, "value": b.value} for b in t.constraints]}


# -- latency budgets fitted to end-to-end measurements ---------------------------------------------
NEAR_BUDGET = 0.12  # the path's configs predicted within this fraction of a budget fit its correction
NEAR_POINTS = (3, 5)  # at least (the nearest, however far) and at most this many of them
# measured/predicted is capped to this range (and the cap said): a table that far off is re-profiled, not patched
CORRECTION_RANGE = (0.8, 1.25)
# picks re-made per budget after the first, at most: a pick measured over its budget is tightened, one
# under LOOSE_FIT of it while a tighter-than-needed bracket is known is loosened (bisection in log space)
MAX_TIGHTENINGS = 3
LOOSE_FIT = 0.97


@dataclass(frozen=True)
class MeasuredBudget:
    """How one target's latency budget was fitted to end-to-end measurements (:func:`fit_to_measured`);
    every time in ms at the table's level. ``config.meta["measured"]`` holds :meth:`meta`."""

    budget_ms: float  # the latency budget as given
    correction: float  # k: median measured / predicted over the path's configs near the budget, capped
    raw_correction: float  # k before the cap
    points: int  # the configs k is the median over
    table_budget_ms: float  # the table's budget the kept pick met: budget / k, or a re-pick's
    predicted_ms: float  # the chosen config's, by the table
    measured_ms: float  # the chosen config's, timed end to end
    full_measured_ms: float  # the full model's, timed in the same rounds
    # times a pick measured over the budget and the table budget was tightened: by measured/budget, or
    # to the middle of the bracket once a fitting pick is known (the fill widens what the table prices
    # low, so its picks lean on the table's errors, and one tightening was not always enough)
    tightened: int
    # times a pick measured under LOOSE_FIT of the budget after a tightening and the table budget was
    # loosened to the middle of the bracket (tightenings + loosenings <= MAX_TIGHTENINGS)
    loosened: int = 0

    @property
    def capped(self) -> bool:
        return self.correction != self.raw_correction

    def meta(self) -> dict:
        return {**asdict(self), "capped": self.capped}


def _latency_ms(t: Target) -> float | None:
    """``t``'s latency budget (its own or a constraint's) in ms; None: it has none."""
    return next((b.value for b in t.budgets if b.kind == "latency_ms"), None)


def _with_latency(t: Target, ms: float) -> Target:
    """``t`` with its latency budget set to ``ms``."""
    def swap(b: Budget) -> Budget:
        return Budget("latency_ms", ms) if b.kind == "latency_ms" else b

    return Target(swap(t.budget), tuple(swap(b) for b in t.constraints))


def _near(path: Sequence[Step], budget_ms: float) -> list[Step]:
    """The path's configs predicted nearest ``budget_ms`` (:data:`NEAR_BUDGET`, :data:`NEAR_POINTS`)."""
    unique = {json.dumps(s.widths, sort_keys=True): s for s in path}.values()
    off = lambda s: abs(math.log(s.costs["latency_ms"] / budget_ms))  # noqa: E731
    ranked = sorted(unique, key=off)
    least, most = NEAR_POINTS
    return ranked[:max(least, sum(off(s) <= math.log1p(NEAR_BUDGET) for s in ranked[:most]))]


def fit_to_measured(model: SlimmableNet, path: list[Step], targets: Sequence[Target],
                    measure: Callable[[Sequence[ChannelConfig]], list[float]],
                    walk_on: Callable[[list[Step], Sequence[Target]], list[Step]],
                    pick_fill: Callable[[list[Step], Sequence[Target]], tuple[list[Step], list[list[Step]]]],
                    floor_ms: float, log: Callable[[str], None]):
    """The table proposes, the machine disposes: each latency budget fitted to end-to-end times.

    The walk priced every config by the table. For each target's latency budget B, a few
    configs of the path predicted near B (:func:`_near`) and the full model are timed
    together (``measure``: ms at the table's level); k, the median of measured/predicted
    over them, is the table's local error, capped to :data:`CORRECTION_RANGE`. The pick
    and fill (``pick_fill``) then meet B/k on the table (never below ``floor_ms``, the
    table's lower bound), the walk going on (``walk_on``) where B/k lies beyond it. The
    chosen configs are timed once more with the full model; one measured over B has its
    table budget tightened by measured/B and is picked, filled and timed again; once a pick
    has measured over and one within, a pick under :data:`LOOSE_FIT` of B (tightened too far)
    or over B moves the table budget to the bracket's geometric middle instead, up to
    :data:`MAX_TIGHTENINGS` re-picks in all. Kept: the most accurate pick (search split) that
    measured within B, or the last one when none did.
    Returns ``(path, walked, fills, fitted)``, ``fitted[i]`` a :class:`MeasuredBudget`
    (None: target i has no latency budget).
    """
    full, key = model.full_config(), lambda widths: json.dumps(widths, sort_keys=True)  # noqa: E731
    lat = [i for i, t in enumerate(targets) if _latency_ms(t) is not None]
    budget = {i: _latency_ms(targets[i]) for i in lat}
    near = {i: _near(path, budget[i]) for i in lat}
    configs = {key(s.widths): model.config_of(s.widths) for i in lat for s in near[i]}
    ms = dict(zip(configs, measure(list(configs.values()) + [full])))
    ks = {}
    for i in lat:
        raw = statistics.median(ms[key(s.widths)] / s.costs["latency_ms"] for s in near[i])
        ks[i] = (min(max(raw, CORRECTION_RANGE[0]), CORRECTION_RANGE[1]), raw)
        if ks[i][0] != raw:
            log(f"note: {targets[i].label}: the configs near the budget measured {raw:.3g}x the table's "
                f"prediction; correction capped to {ks[i][0]:g} (re-profile the table on this machine)")
    table_ms = {i: max(budget[i] / ks[i][0], floor_ms) for i in lat}
    corrected = [(_with_latency(t, table_ms[i]) if i in table_ms else t) for i, t in enumerate(targets)]

    def go_on(path: list[Step], corrected: Sequence[Target]) -> list[Step]:
        try:
            return walk_on(path, corrected)
        except BudgetError as e:  # a budget the table would reach, but not fitted to the times
            raise BudgetError(f"--measure: fitted to end-to-end times, the table's budgets became "
                              f"{', '.join(f'{table_ms[i]:.4g}' for i in lat)} ms; {e}") from None

    path = go_on(path, corrected)
    walked, fills = pick_fill(path, corrected)

    worst: dict[str, float] = {}  # per config timed more than once (a re-pick may return one): its slowest

    def timed(ids: Sequence[int]) -> dict[int, tuple[float, float]]:
        """The chosen configs of ``ids`` timed with the full model: ``{i: (config ms, full ms)}``, a config
        timed before keeping its slowest reading (one that measured over once is not kept as fitting)."""
        widths = [_kept(walked[i], fills[i]).widths for i in ids]
        got = measure([full] + [model.config_of(w) for w in widths])
        for w, m in zip(widths, got[1:]):
            worst[key(w)] = max(m, worst.get(key(w), 0.0))
        return {i: (worst[key(w)], got[0]) for i, w in zip(ids, widths)}

    times = timed(lat)
    # per target: every pick timed, (table budget, walked, fill, full model's ms in its round); the
    # bracket of table budgets whose picks measured over (hi) and within (lo) the budget
    tried = {i: [(table_ms[i], walked[i], fills[i], times[i][1])] for i in lat}
    hi: dict[int, float] = {}
    lo: dict[int, float] = {}
    tightened, loosened = dict.fromkeys(lat, 0), dict.fromkeys(lat, 0)
    for _ in range(MAX_TIGHTENINGS):
        redo = []
        for i in lat:
            m = times[i][0]
            if m > budget[i]:  # over: tighten, to the bracket's middle once a fitting pick is known
                hi[i] = table_ms[i]
                new = math.sqrt(lo[i] * hi[i]) if i in lo else table_ms[i] * budget[i] / m
                tightened[i] += 1
            elif m < budget[i] * LOOSE_FIT and i in hi:  # an over-tightened pick: loosen to the middle
                lo[i] = table_ms[i]
                new = math.sqrt(lo[i] * hi[i])
                loosened[i] += 1
            else:
                if m <= budget[i]:
                    lo[i] = table_ms[i]
                continue
            table_ms[i] = max(new, floor_ms)
            corrected[i] = _with_latency(targets[i], table_ms[i])
            redo.append(i)
        if not redo:
            break
        path = go_on(path, corrected)
        again = pick_fill(path, [corrected[i] for i in redo])
        for j, i in enumerate(redo):
            walked[i], fills[i] = again[0][j], again[1][j]
        times.update(timed(redo))
        for i in redo:
            tried[i].append((table_ms[i], walked[i], fills[i], times[i][1]))
    fitted: list[MeasuredBudget | None] = [None] * len(targets)
    for i in lat:
        # the most accurate pick (search split) whose config's slowest reading is within the budget;
        # none: the last
        ms_of = lambda t: worst[key(_kept(t[1], t[2]).widths)]  # noqa: E731
        fits = [t for t in tried[i] if ms_of(t) <= budget[i]]
        t = max(fits, key=lambda t: (_kept(t[1], t[2]).acc, t[0])) if fits else tried[i][-1]  # ties: looser
        table_ms[i], walked[i], fills[i], times[i] = t[0], t[1], t[2], (ms_of(t), t[3])
        final = _kept(walked[i], fills[i])
        fitted[i] = MeasuredBudget(budget[i], ks[i][0], ks[i][1], len(near[i]), table_ms[i],
                                   final.costs["latency_ms"], times[i][0], times[i][1], tightened[i], loosened[i])
        log(_fitted_line(targets[i], fitted[i]))
    return path, walked, fills, fitted


def _kept(walked: Step, filled: Sequence[Step]) -> Step:
    """The step a pick ends at: its fill's last widening, or the walk's step where nothing was widened."""
    return filled[-1] if filled else walked


def _fitted_line(t: Target, m: MeasuredBudget) -> str:
    return (f"{t.label}: measured/predicted {m.correction:.3f} near the budget ({m.points} configs"
            f"{', capped' if m.capped else ''}), table budget {m.table_budget_ms:.4g} ms"
            f"{f' (re-picked {m.tightened + m.loosened}x: {m.tightened} over, {m.loosened} well under)' if m.tightened else ''}"
            f"; chosen config "
            f"predicted {m.predicted_ms:.4g} ms, measured {m.measured_ms:.4g} ms "
            f"({m.measured_ms / m.budget_ms:.3f} of the budget; full model {m.full_measured_ms:.4g} ms)"
            f"{f'; still over after {m.tightened} tightenings' if m.measured_ms > m.budget_ms else ''}")


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
        if st.move not in (("start",) if prev is None else ("shrink", "jump")):
            raise bad(i, f"has move {st.move!r}")
        if prev is None:
            if st.widths != dict(model.full_config().widths) or st.unit is not None:
                raise bad(i, "is not the full config")
        elif st.move == "jump":  # to a known config meeting a budget the walk could not reach (slim)
            if st.unit is not None:
                raise bad(i, "is a jump that names a unit")
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
                        st.binding or None, dict(st.widths), move=st.move))
        prev = st.widths
    return out


@dataclass
class SearchResult:
    configs: list[ChannelConfig]
    path: "object"  # pandas.DataFrame
    steps: list[Step]
    out_dir: Path | None = None
    uniform: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the config file of each target (when out_dir is given)
    targets: list[Target] = field(default_factory=list)  # configs[i] is for targets[i]
    fills: list[list[Step]] = field(default_factory=list)  # fills[i]: targets[i]'s grow-back steps


def config_filename(target: Target) -> str:
    return f"config_{target.budget.kind}_{target.budget.value:g}.json"


def config_file(out_dir: str | Path, target: Target) -> Path:
    """Where a search writes the config of ``target``: ``OUT/config_<kind>_<value>.json`` (its own budget)."""
    return Path(out_dir) / config_filename(target)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SearchOptions:
    """How :func:`greedy_search` runs. ``None`` means the default named in the field's comment."""

    criterion: str = DEFAULT_CRITERION  # see CRITERIA
    out_dir: str | Path | None = None  # None: write nothing (no resume either)
    resume: bool = False  # continue the search whose state out_dir holds
    force: bool = False  # start over even if out_dir holds a search or its outputs
    device: str = "cpu"  # where the evaluations run
    # how configs are scored: Scoring (top-1 on the search split; default: its measured defaults) or
    # ScoreFnScoring (the user's score_fn)
    scoring: Scoring | ScoreFnScoring = field(default_factory=Scoring)
    max_images: int | None = None  # at most this many search-split images; None: all
    batch: int = 1  # the inference batch the budgets refer to
    progress: bool = True  # progress bars on stderr
    plot: bool = True  # score the uniform-width configs (uniform.csv) and draw search.png
    force_table: bool = False  # use a table measured on another setup (--force-table)
    fill: bool = True  # spend each target's slack (fill_budget)
    fill_steps: int = DEFAULT_FILL_STEPS  # at most this many widening steps per target
    # ``measure(configs) -> [ms]``: configs timed end to end, at the table's level
    # (hwslim.latency.verify.config_timer); the latency budgets are then fitted to these times
    # (fit_to_measured). None: the table's predictions alone
    measure: Callable[[Sequence[ChannelConfig]], list[float]] | None = None

    @property
    def out(self) -> Path | None:
        return Path(self.out_dir) if self.out_dir is not None else None


def greedy_search(checkpoint, budgets: Sequence[Budget], options: SearchOptions | None = None, *, table=None,
                  images=None, labels=None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search ``checkpoint``'s supernet for every target of ``budgets`` (:func:`targets_of`).

    ``options.out_dir`` receives one ChannelConfig JSON per target (``config_<kind>_<value>.json``
    after the target's own budget), ``path.csv`` (the whole walk), ``fill.csv`` (each
    target's grow-back, :func:`fill_budget`, unless ``fill`` is False),
    ``search_state.json`` (for ``resume``, :class:`SearchState`) and ``search.png``. ``table``
    (a latency table: ``predict_ms``, ``check_compatible``, ``lower_bound_ms``; the caller
    loads it) prices latency budgets. The search split comes from the checkpoint
    (``hwslim.importing.data.search_split``) unless ``images``/``labels`` are given.
    ``log`` gets a line saying what is scored, once every check has passed.
    """
    opts = options or SearchOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    budgets = list(budgets)
    if not budgets:
        raise HwslimError("give at least one budget (--latency-ms, --memory-mb, --params-m or --macs-m)")
    targets = targets_of(budgets)
    if opts.measure is not None and (table is None or not any(_latency_ms(t) for t in targets)):
        raise HwslimError("--measure fits latency budgets to end-to-end measurements, and this search has no "
                          "--latency-ms budget priced by a table; add one or drop --measure")
    model: SlimmableNet = checkpoint.model.to(opts.device)
    cost_fn = _checked_costs(model, targets, table, opts)
    with owned(opts.out) if opts.out is not None else contextlib.nullcontext():  # one search per folder
        return _search(checkpoint, model, budgets, targets, cost_fn, opts, table, images, labels, log)


def _search(checkpoint, model: SlimmableNet, budgets: Sequence[Budget], targets: Sequence[Target], cost_fn,
            opts: SearchOptions, table, images, labels, log: Callable[[str], None]) -> SearchResult:
    """The steps of :func:`greedy_search` once its inputs passed their checks and it owns its folder."""
    import pandas as pd

    state = SearchState.open(opts.out, search_settings(checkpoint, targets, opts, table), model, cost_fn,
                             resume=opts.resume, force=opts.force, log=log)
    score_candidates, score = _scorers(checkpoint, model, budgets, opts, images, labels, state.replay, log)
    with WalkProgress(cost_fn(model.full_config()), budgets, opts.progress and dist.is_writer(),
                      state.replay) as bar:

        def on_step(step: Step) -> None:
            state.record(step)
            bar.update(step)

        path = slim(model, score_candidates, score, cost_fn, targets, criterion=opts.criterion,
                    replay=state.replay, on_step=on_step)
    def pick_fill(path: list[Step], ts: Sequence[Target]) -> tuple[list[Step], list[list[Step]]]:
        walked = pick_steps(path, ts)
        return walked, (_fill_budgets(model, score_candidates, cost_fn, walked, ts, opts, dist.is_writer())
                        if opts.fill else [[] for _ in ts])

    if opts.measure is None:
        walked, fills = pick_fill(path, targets)
        fitted: list[MeasuredBudget | None] = [None] * len(targets)
    else:
        walk_on = lambda p, ts: slim(model, score_candidates, score, cost_fn, ts,  # noqa: E731
                                     criterion=opts.criterion, replay=p, on_step=state.record)
        path, walked, fills, fitted = fit_to_measured(
            model, path, targets, dist.from_writer(opts.measure), walk_on, pick_fill,
            table.lower_bound_ms(model, opts.batch), log if dist.is_writer() else lambda msg: None)
    configs = [_chosen_config(model, t, st, fl) for t, st, fl in zip(targets, walked, fills)]
    configs = [c if m is None else c.with_meta(measured=m.meta()) for c, m in zip(configs, fitted)]
    out = opts.out
    result = SearchResult(configs, pd.DataFrame([s.row() for s in path]), path, out,
                          files=[config_file(out, t) for t in targets] if out else [], targets=targets, fills=fills)
    if out is not None and dist.is_writer():
        write_outputs(result, state.settings, opts)
        if opts.plot:
            write_plot(result, score_uniform(model, score, cost_fn, opts.progress))
    return result


def _checked_costs(model: SlimmableNet, targets: Sequence[Target], table, opts: SearchOptions
                   ) -> Callable[[ChannelConfig], dict[str, float]]:
    """The search's cost function, once ``table`` fits the model and every target is within reach."""
    if table is not None:
        table.check_compatible(model, batch=opts.batch, force=opts.force_table)
    cost_fn = lambda cfg: config_costs(model, cfg, table, opts.batch)  # noqa: E731
    check_feasible(model, targets, cost_fn,
                   table.lower_bound_ms(model, opts.batch) if table is not None and any(
                       b.kind == "latency_ms" for t in targets for b in t.budgets) else None)
    return cost_fn


def _scorers(checkpoint, model: SlimmableNet, budgets: Sequence[Budget], opts: SearchOptions, images, labels,
             replay: Sequence[Step], log: Callable[[str], None]) -> tuple[Callable, Callable]:
    """``(score_candidates, score)`` on the search split (sharded under torchrun), and the line saying so;
    a scoring that does not use the split (:class:`hwslim.search.evaluator.ScoreFnScoring`) scores its own way."""
    scoring = opts.scoring
    resuming = f"; resuming after step {len(replay) - 1}" if replay else ""
    if not scoring.uses_split:
        score_candidates, score = scoring.build(model, wrap=dist.sharded)
        if dist.is_writer():
            log(f"searching {', '.join(b.label for b in budgets)}: {scoring.describe()}, {opts.device}{resuming}")
        return score_candidates, score
    if images is None:
        from hwslim.importing.data import search_split

        images, labels = search_split(checkpoint, device=opts.device, max_images=opts.max_images)
    chunk = scoring.chunk(images)
    score_candidates, score = scoring.build(model, images.to(opts.device), labels.to(opts.device),
                                            wrap=dist.sharded)
    del images  # the evaluators hold their own (channels-last) copy of the split
    if dist.is_writer():
        log(f"searching {', '.join(b.label for b in budgets)} on {len(labels):,} search-split images: "
            f"{scoring.describe(len(labels), chunk)}, {opts.device}{resuming}")
    return score_candidates, score


def _fill_budgets(model: SlimmableNet, score_candidates, cost_fn, walked: Sequence[Step],
                  targets: Sequence[Target], opts: SearchOptions, is_writer: bool) -> list[list[Step]]:
    """:func:`fill_budget` for every target, from its config on the walk, with a progress bar."""
    fills = []
    with _progress_bar(opts.progress and is_writer, total=len(targets), unit="config",
                       desc="filling the budgets (widening units back)") as bar:

        def on_widen(step: Step) -> None:
            bar.set_postfix(widened=step.step, acc=f"{step.acc:.3f}")

        for st, t in zip(walked, targets):
            fills.append(fill_budget(model, score_candidates, cost_fn, st, t, max_steps=opts.fill_steps,
                                     on_step=on_widen))
            bar.update(1)
    return fills


# -- progress --------------------------------------------------------------------------------------
def _progress_bar(enabled: bool, **kw):
    """A tqdm bar on stderr; one not ``enabled`` shows nothing."""
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class WalkProgress:
    """The walk's progress bar: % of the way from the full config to the budget met last.

    Costs fall about evenly per step, so the bar's rate gives a fair ETA. A context
    manager; it shows nothing unless ``enabled``.
    """

    def __init__(self, full_costs: Mapping[str, float], budgets: Sequence[Budget], enabled: bool,
                 replay: Sequence[Step] = ()) -> None:
        self.full_costs, self.budgets = full_costs, list(budgets)
        self.bar = _progress_bar(enabled, desc="greedy search (% of the way to the budgets)", total=100, unit="%",
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}% [{elapsed}<{remaining}{postfix}]")
        if replay:
            self.bar.update(self.done_pct(replay[-1].costs))

    def done_pct(self, costs: Mapping[str, float]) -> int:
        full = self.full_costs
        fracs = [min(1.0, max(0.0, (full[b.kind] - costs[b.kind]) / (full[b.kind] - b.value)))
                 if full[b.kind] > b.value else 1.0 for b in self.budgets]
        return int(100 * min(fracs))

    def update(self, step: Step) -> None:
        shown = {k: round(step.costs[k], 3) for k in ("latency_ms", "memory_mb", "params_m", "macs_m")
                 if k in step.costs}
        self.bar.set_postfix(step=step.step, acc=f"{step.acc:.3f}", **shown)
        self.bar.update(max(0, self.done_pct(step.costs) - self.bar.n))

    def __enter__(self) -> WalkProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# -- resume: the search state file -----------------------------------------------------------------
def search_settings(checkpoint, targets: Sequence[Target], opts: SearchOptions, table) -> dict:
    """What a resumed search must share with the one that wrote the state (stored in it)."""
    return {
        "checkpoint": str(getattr(checkpoint, "path", "") or ""),
        "checkpoint_sha256": _file_digest(checkpoint.path) if getattr(checkpoint, "path", None) else "",
        "targets": [t.label for t in targets], "criterion": opts.criterion, "scoring": opts.scoring.settings(),
        "batch": opts.batch, "max_images": opts.max_images,
        "table": str(table.path) if table is not None and getattr(table, "path", None) else None,
    }


class SearchState:
    """``OUT/search_state.json``: a search's settings and its path so far, what ``resume`` continues.

    :meth:`record` rewrites it atomically after every step (the writing process only), so
    a search killed at any point resumes to the identical result. Without an output
    folder it only keeps the steps.
    """

    def __init__(self, file: Path | None, settings: dict, replay: Sequence[Step] = ()) -> None:
        self.file, self.settings = file, settings
        self.replay: list[Step] = list(replay)  # the saved path a resumed search continues from
        self.steps: list[Step] = list(replay)
        self.writes = file is not None and dist.is_writer()

    @classmethod
    def open(cls, out: Path | None, settings: dict, model: SlimmableNet, cost_fn, *, resume: bool, force: bool,
             log: Callable[[str], None]) -> SearchState:
        """The state to continue from in ``out``, after refusing outputs that are not to be replaced."""
        if out is None:
            return cls(None, settings)
        state_file = out / STATE_NAME
        check_output(out, kind="dir")
        remove_stale_temporaries(out)  # left by a search killed while saving its state
        if state_file.exists():
            if resume:
                return cls(state_file, settings, _read_state(state_file, settings, model, cost_fn))
            if not force:
                raise OutputExistsError(f"{out} already holds a search; pass --resume to continue it "
                                        "or --force to start over")
            return cls(state_file, settings)
        found = existing_outputs(out)
        if found and not force:  # outputs of a finished search whose state is gone, or anyone's files
            raise OutputExistsError(f"{out} already holds {', '.join(p.name for p in found[:4])}"
                                    f"{' ...' if len(found) > 4 else ''} (and no {STATE_NAME} to resume); "
                                    "pass --force to replace them or give another --out")
        if resume:
            log(f"note: nothing to resume in {out} (no {STATE_NAME}): starting the search")
        return cls(state_file, settings)

    def record(self, step: Step) -> None:
        self.steps.append(step)
        if self.writes:
            atomic_write_text(self.file, json.dumps({"settings": self.settings,
                                                     "steps": [asdict(s) for s in self.steps]}, sort_keys=True))


def _read_state(state_file: Path, settings: dict, model: SlimmableNet, cost_fn) -> list[Step]:
    """The path saved in ``state_file``, refused unless its settings are ``settings`` (:func:`_checked_replay`)."""
    try:
        state = jsonio.load(state_file)
        steps_saved = [Step(**st) for st in state["steps"]]
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: malformed or too deep JSON
        raise HwslimError(f"{state_file} is not a readable search state ({type(e).__name__}); "
                          "delete it or pass --force to start over") from None
    if state.get("settings") != settings:
        raise HwslimError(f"{state_file} was written by a search with other settings; "
                          "start a new --out directory or repeat the original command")
    return _checked_replay(model, steps_saved, cost_fn, state_file)


# -- outputs ---------------------------------------------------------------------------------------
def score_uniform(model: SlimmableNet, score: Callable[[ChannelConfig], Score], cost_fn,
                  progress: bool = True) -> list[dict]:
    """The uniform-width configs, scored and costed (``uniform.csv``; drawn in ``search.png``)."""
    uniform = _progress_bar(progress, iterable=list(enumerate(model.uniform_configs(), start=1)),
                            desc="scoring uniform-width configs (for search.png)", unit="config")
    return [{"step": s, "acc": (sc := score(u)).acc, "loss": sc.loss, **cost_fn(u)} for s, u in uniform]


def write_outputs(result: SearchResult, settings: Mapping, opts: SearchOptions) -> None:
    """Write ``result`` to its ``out_dir``: the configs (with provenance from ``settings``,
    :func:`search_settings`), ``path.csv`` and ``fill.csv`` (with ``opts.fill``)."""
    import pandas as pd

    out, targets, path = result.out_dir, result.targets, result.steps
    provenance = {"produced_by": "hwslim search", "checkpoint": settings["checkpoint"],
                  "checkpoint_sha256": settings["checkpoint_sha256"], "table": settings["table"],
                  "criterion": opts.criterion, "bn": opts.scoring.bn}
    for t, cfg in zip(targets, result.configs):
        cfg.with_meta(**provenance).save(config_file(out, t), force=True)
    result.path.to_csv(out / "path.csv", index=False)
    if opts.fill:
        pd.DataFrame([{"target": t.label, **st.row()} for t, fl in zip(targets, result.fills) for st in fl],
                     columns=["target", *path[0].row()]
                     ).to_csv(out / "fill.csv", index=False)


def write_plot(result: SearchResult, uniform: list[dict]) -> None:
    """Keep the scored uniform-width configs (:func:`score_uniform`) in ``result`` and write them to
    its ``out_dir``: ``uniform.csv``, and ``search.png`` (:func:`plot_path`)."""
    import pandas as pd

    result.uniform = uniform
    pd.DataFrame(uniform).to_csv(result.out_dir / "uniform.csv", index=False)
    plot_path(result.path, pd.DataFrame(uniform), [t.budget for t in result.targets], result.out_dir / "search.png",
              chosen=result.configs)


AXIS_LABELS = {  # budget kind -> axis label
    "latency_ms": "latency (ms, predicted by the table)",
    "memory_mb": "peak activation memory (MB)",
    "params_m": "parameters (millions)",
    "macs_m": "MACs (millions)",
}


def path_figure(path, uniform, budgets: Sequence[Budget], chosen: Sequence[ChannelConfig] = ()):
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
    if chosen:
        ax.plot([c.meta[kind] for c in chosen], [100 * c.meta["search_acc"] for c in chosen], "o", ms=6,
                mfc="none", label="chosen configs")
    ax.set_xlabel(AXIS_LABELS[kind])
    ax.set_ylabel("search-split accuracy (%)")
    others = sorted({b.kind for b in budgets} - {kind})
    if others:
        ax.set_title(f"against {kind}; budgets on {', '.join(others)} are not drawn", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_path(path, uniform, budgets: Sequence[Budget], png: Path, chosen: Sequence[ChannelConfig] = ()) -> Path:
    """Accuracy against the first budget's cost along the path, with uniform-width and chosen configs."""
    import matplotlib.pyplot as plt

    fig = path_figure(path, uniform, budgets, chosen)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
