import json
import os
import re
import socket
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.cli import main
from hwslim.core.config import ChannelConfig
from hwslim.core.costs import model_costs
from hwslim.importing.data import search_split, synthetic_data_info
from hwslim.core.errors import BudgetError, HwslimError, OutputExistsError
from hwslim.search.evaluator import Score, StepEvaluator
from hwslim.models import create_model
from hwslim.latency.table import Calibration, LatencyTable, new_meta
from hwslim.latency.entries import enumerate_entries
from hwslim.search.greedy import Budget, SearchOptions, Target, config_costs, greedy_search, slim, targets_of
from hwslim.core.slimmable import recalibrate_bn
from profilers import get_profiler
from profilers.base import Timing

IMAGES = 48


def _supernet(seed: int = 0):
    torch.manual_seed(seed)
    net = create_model("resnet20", width_mult=1.0)
    for m in net.modules():  # a supernet whose widths matter: non-trivial BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "supernet.pt"
    save_checkpoint(path, _supernet(), data=synthetic_data_info(num_train=600, num_search=IMAGES, seed=0))
    return path


def _layer_ms(spec) -> float:
    """A hand-made runtime: channels padded to 16, and 8-channel outputs take a slow path."""
    pad = lambda c: -(-c // 16) * 16  # noqa: E731
    k = getattr(spec.op, "kernel", 1)
    t = 1e-6 * k ** 2 * pad(spec.cin) * pad(spec.cout) / max(1, spec.groups) * spec.out_h * spec.out_w / 16
    return round(t + (0.004 if spec.cout == 8 else 0.0) + 0.001, 6)


def _hand_table(net) -> LatencyTable:
    """A complete latency table of :func:`_layer_ms` for ``net``, in memory, made like tests/test_latency.py
    makes one."""
    with get_profiler("cpu", "ort") as prof:
        machine = prof.metadata()
    entries = {s.signature(): Timing(_layer_ms(s), 0.0, _layer_ms(s), 20) for s in enumerate_entries(net)}
    meta = new_meta(machine, model=net.name, width_mult=net.width_mult, input_size=net.input_size, batch=1,
                    entries_expected=len(entries), method="in_network")
    meta.update(status="complete", calibration=Calibration(1.0, 0.0, 8, {"within_5pct": 1.0}).to_dict())
    return LatencyTable(meta, entries)


@pytest.fixture(scope="module")
def table_path(ckpt_path, tmp_path_factory):
    """The hand-made table for the checkpoint's model, saved."""
    return _hand_table(load_checkpoint(ckpt_path).model).save(tmp_path_factory.mktemp("table") / "table.csv")


def test_targets_of_budgets_as_the_user_lists_them():
    lat = [Budget("latency_ms", v) for v in (20, 15, 10)]
    mem = Budget("memory_mb", 5)
    assert targets_of([*lat, mem]) == [Target(b, (mem,)) for b in lat]
    # one value per kind: one target, constrained by the others
    assert targets_of([Budget("latency_ms", 0.45), Budget("params_m", 0.1)]) == \
        [Target(Budget("latency_ms", 0.45), (Budget("params_m", 0.1),))]
    assert targets_of([lat[0], lat[0]]) == [Target(lat[0])]
    with pytest.raises(BudgetError, match="several values for both latency_ms and memory_mb"):
        targets_of([*lat, mem, Budget("memory_mb", 4)])


def test_several_latencies_with_a_memory_constraint(ckpt_path, table_path, tmp_path, capsys):
    """`--latency-ms A B C --memory-mb M`: three configs, each within its latency and within M."""
    ckpt = load_checkpoint(ckpt_path)
    table = LatencyTable.load(table_path)
    full = config_costs(ckpt.model, ckpt.model.full_config(), table)
    lat = [round(full["latency_ms"] * f, 4) for f in (0.97, 0.93, 0.9)]
    mem = round(full["memory_mb"] * 0.96, 4)  # the peak is in stage 1, which latency does not narrow first
    out = tmp_path / "s"
    rc = main(["search", "--checkpoint", str(ckpt_path), "--latency-ms", *map(str, lat), "--memory-mb", str(mem),
               "--table", str(table_path), "--out", str(out), "--no-progress", "--max-images", "24", "--no-fill"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count(f"memory_mb={mem:g}") == 3
    path = pd.read_csv(out / "path.csv")
    assert sorted(p.name for p in out.glob("config_*.json")) == sorted(f"config_latency_ms_{v:g}.json" for v in lat)
    for v in lat:
        cfg = ChannelConfig.load(out / f"config_latency_ms_{v:g}.json")
        costs = config_costs(ckpt.model, cfg, table)
        assert costs["latency_ms"] <= v and costs["memory_mb"] <= mem
        assert cfg.meta["budget"] == {"kind": "latency_ms", "value": v}
        assert cfg.meta["constraints"] == [{"kind": "memory_mb", "value": mem}]
        both = path[(path["latency_ms"] <= v) & (path["memory_mb"] <= mem)]
        assert cfg.meta["search_step"] == both["step"].iloc[0] and cfg.meta["fill_steps"] == 0
    # the constraint mattered: the loosest latency alone was met earlier on the path
    assert path[path["latency_ms"] <= lat[0]]["step"].iloc[0] < \
        ChannelConfig.load(out / f"config_latency_ms_{lat[0]:g}.json").meta["search_step"]
    # several values for two kinds: one clear line, exit 2, nothing written
    rc = main(["search", "--checkpoint", str(ckpt_path), "--latency-ms", *map(str, lat), "--memory-mb", "1", "2",
               "--table", str(table_path), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "several values for both latency_ms and memory_mb" in err[0]
    assert not (tmp_path / "x").exists()


def test_one_latency_and_one_params_budget_give_one_config_meeting_both(ckpt_path, table_path, tmp_path, capsys):
    """`--latency-ms L --params-m P`: one config, within L and within P (it used to be one per budget).

    The budget is filled (the default): the config is widened back while both still hold."""
    ckpt = load_checkpoint(ckpt_path)
    table = LatencyTable.load(table_path)
    full = config_costs(ckpt.model, ckpt.model.full_config(), table)
    lat, params = round(full["latency_ms"] * 0.98, 4), round(full["params_m"] * 0.9, 4)
    out = tmp_path / "s"
    rc = main(["search", "--checkpoint", str(ckpt_path), "--latency-ms", str(lat), "--params-m", str(params),
               "--table", str(table_path), "--out", str(out), "--no-progress", "--max-images", "24", "--json"])
    assert rc == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert [p.name for p in out.glob("config_*.json")] == [f"config_latency_ms_{lat:g}.json"]
    cfg = ChannelConfig.load(out / f"config_latency_ms_{lat:g}.json")
    assert printed["widths"] == cfg.widths
    costs = config_costs(ckpt.model, cfg, table)
    assert costs["latency_ms"] <= lat and costs["params_m"] <= params
    assert cfg.meta["constraints"] == [{"kind": "params_m", "value": params}]
    path = pd.read_csv(out / "path.csv")
    walked = path[(path["latency_ms"] <= lat) & (path["params_m"] <= params)].iloc[0]
    assert cfg.meta["search_step"] == walked["step"]
    # the filling's report: budget used and search-split accuracy, with and without it
    m = printed["meta"]
    assert m["budget_used"] == pytest.approx(costs["latency_ms"] / lat)
    assert m["budget_used_unfilled"] == pytest.approx(walked["latency_ms"] / lat)
    assert m["search_acc_unfilled"] == walked["acc"] and m["search_acc"] >= m["search_acc_unfilled"]
    fill = pd.read_csv(out / "fill.csv")
    assert len(fill) == m["fill_steps"] and (fill["move"] == "widen").all()
    assert (fill["latency_ms"] <= lat).all() and (fill["params_m"] <= params).all()
    if m["fill_steps"]:
        assert (fill["new"] > fill["old"]).all() and m["budget_used"] >= m["budget_used_unfilled"]  # a measured table is not monotone: a widening can cost nothing
        assert fill["acc"].iloc[-1] == m["search_acc"]


def _table_cost(net):
    """The hand-made table for ``net`` (meta device), in memory, as a cost function."""
    table = _hand_table(net)
    return lambda c: config_costs(net, c, table)


def _analytic(net):
    """A score where each unit costs accuracy in proportion to its shrink (no data needed)."""
    weight = {u: (i % 5 + 1) / 100 for i, u in enumerate(net.units)}

    def score(cfg):
        acc = 1 - sum(weight[u] * (1 - w / net.units[u].max_width) for u, w in cfg.widths.items())
        return Score(acc, 1 - acc)

    return score, lambda cur, cands, rank=None: [score(c) for _, c in cands]


def test_no_budget_is_refused_that_a_config_the_search_lists_meets():
    """On a non-monotone table the narrowest config is not the fastest; the walk goes below it."""
    with torch.device("meta"):
        net = create_model("resnet20")
    cost = _table_cost(net)
    score, score_candidates = _analytic(net)
    narrow = cost(net.min_config())["latency_ms"]
    uniform = [cost(u)["latency_ms"] for u in net.uniform_configs()]
    assert min(uniform) < narrow  # 16 channels run faster than 8 on this table
    path = slim(net, score_candidates, score, cost, [Budget("latency_ms", narrow * 0.99)])
    listed = min(min(uniform), *(s.costs["latency_ms"] for s in path))
    assert listed < narrow * 0.99 and path[-1].move == "shrink"
    # a budget at the smallest latency the run listed (path.csv, uniform.csv) is met, not refused
    again = slim(net, score_candidates, score, cost, [Budget("latency_ms", listed)])
    assert min(s.costs["latency_ms"] for s in again) <= listed


def test_walk_jumps_to_a_known_config_below_the_narrowest():
    """A target only a uniform config meets: the walk reaches the narrowest, then jumps there."""
    with torch.device("meta"):
        net = create_model("resnet20")
    table = _table_cost(net)
    tuned = net.uniform_config(6)  # a runtime with kernels tuned for exactly this network
    cost = lambda c: {**table(c), "latency_ms": 1.0} if c.widths == tuned.widths else table(c)  # noqa: E731
    score, score_candidates = _analytic(net)
    assert cost(net.min_config())["latency_ms"] > 1.3
    budgets = [Target(Budget("latency_ms", 1.0)), Target(Budget("latency_ms", 2.0))]
    path = slim(net, score_candidates, score, cost, budgets)
    assert path[-1].move == "jump" and path[-1].widths == tuned.widths and path[-1].binding == "latency_ms=1"
    assert path[-2].widths == net.min_config().widths and path[-1].acc == score(tuned).acc
    assert [s.move for s in path[1:-1]] == ["shrink"] * (len(path) - 2)
    # below everything the search has seen: refused, naming the smallest value and where it is
    with pytest.raises(BudgetError, match=r"smallest achievable latency_ms the search found is 1 \(uniform "
                                          r"width 6/12\)"):
        slim(net, score_candidates, score, cost, [Budget("latency_ms", 0.5)])


def test_fill_spends_the_slack_by_best_gain_per_cost():
    """The grow-back on the hand-made table: within budget, each step the best gain per cost, until nothing fits."""
    from hwslim.search.greedy import fill_budget, pick_steps

    with torch.device("meta"):
        net = create_model("resnet20")
    score, score_candidates = _analytic(net)
    cost = _table_cost(net)
    full = cost(net.full_config())
    target = Target(Budget("latency_ms", full["latency_ms"] * 0.6), (Budget("memory_mb", full["memory_mb"]),))
    path = slim(net, score_candidates, score, cost, [target])
    (start,) = pick_steps(path, [target])
    steps = fill_budget(net, score_candidates, cost, start, target, max_steps=100)
    assert len(steps) >= 3 and [s.step for s in steps] == list(range(1, len(steps) + 1))
    assert all(target.met(s.costs) and s.move == "widen" and s.new > s.old for s in steps)
    assert start.acc < steps[0].acc < steps[-1].acc  # every unit's width is worth accuracy here
    assert start.costs["latency_ms"] / target.budget.value < 0.96 < steps[-1].costs["latency_ms"] / target.budget.value

    def proposals(cfg):  # each unit's nearest wider width that keeps the target met
        out = {}
        for u in net.units:
            for w in (w for w in net.units[u].grid if w > cfg.widths[u]):
                if target.met(c := cost(cand := cfg.replace(**{u: w}))):
                    out[u] = (cand, c)
                    break
        return out

    # each step took the largest accuracy gain per ms among the widenings that fit (free ones first)
    prev = start
    for st in steps:
        rate = {}
        for u, (cand, c) in proposals(net.config_of(prev.widths)).items():
            spent = c["latency_ms"] - prev.costs["latency_ms"]
            rate[u] = (spent <= 0, (score(cand).acc - prev.acc) / (spent if spent > 0 else 1.0))
        assert rate[st.unit] == max(rate.values())
        prev = st
    # it stopped because no widening fits any more
    assert proposals(net.config_of(steps[-1].widths)) == {}
    # bounded: max_steps caps it; nothing to spend at the full config
    assert fill_budget(net, score_candidates, cost, start, target, max_steps=2) == steps[:2]
    assert fill_budget(net, score_candidates, cost, path[0], Budget("latency_ms", 1e3)) == []


def test_latency_below_the_narrowest_config_is_searched_not_refused(ckpt_path, table_path, tmp_path):
    """The refusal a user met: a budget under the narrowest config's latency that other configs meet."""
    ckpt = load_checkpoint(ckpt_path)
    table = LatencyTable.load(table_path)
    narrow = config_costs(ckpt.model, ckpt.model.min_config(), table)["latency_ms"]
    budget = Budget("latency_ms", round(narrow * 0.985, 4))
    res = greedy_search(ckpt, [budget], SearchOptions(out_dir=tmp_path / "s", progress=False, max_images=16,
                                                      fill=False), table=table)
    (cfg,) = res.configs
    assert config_costs(ckpt.model, cfg, table)["latency_ms"] <= budget.value < narrow
    listed = pd.concat([pd.read_csv(tmp_path / "s" / "path.csv"), pd.read_csv(tmp_path / "s" / "uniform.csv")])
    assert listed["latency_ms"].min() <= budget.value


def test_budget_nothing_can_meet_is_refused_up_front(ckpt_path, tmp_path, capsys):
    ckpt = load_checkpoint(ckpt_path)
    floor = model_costs(ckpt.model, ckpt.model.min_config()).params / 1e6
    with pytest.raises(BudgetError, match=f"smallest achievable params_m on this supernet's grid is {floor:.4g}"):
        greedy_search(ckpt, [Budget("params_m", floor / 2)], SearchOptions(out_dir=tmp_path / "s", progress=False))
    assert not (tmp_path / "s").exists()
    rc = main(["search", "--checkpoint", str(ckpt_path), "--params-m", "0.000001", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "smallest achievable" in err[0]


def test_search_meets_every_budget_and_writes_outputs(ckpt_path, tmp_path, capsys):
    ckpt = load_checkpoint(ckpt_path)
    full = config_costs(ckpt.model, ckpt.model.full_config())
    low = config_costs(ckpt.model, ckpt.model.min_config())
    macs = [Budget("macs_m", full["macs_m"] * 0.9), Budget("macs_m", full["macs_m"] * 0.8)]
    mem = Budget("memory_mb", full["memory_mb"] * 0.9 + low["memory_mb"] * 0.1)  # a constraint of both
    out = tmp_path / "search"
    rc = main(["search", "--checkpoint", str(ckpt_path), "--macs-m", str(macs[0].value), str(macs[1].value),
               "--memory-mb", str(mem.value), "--out", str(out), "--no-progress", "--max-images", str(IMAGES)])
    assert rc == 0
    printed = capsys.readouterr().out
    for column in ("budget", "constraints", "used", "search_acc", "unfilled_used", "unfilled_acc", "widened"):
        assert column in printed.splitlines()[0].split()
    path = pd.read_csv(out / "path.csv")
    assert list(path.columns[:8]) == ["step", "unit", "old", "new", "acc", "loss", "binding", "move"]
    assert (path["new"].dropna() < path["old"].dropna()).all()
    assert (path["macs_m"].diff().dropna() < 0).all()
    assert sorted(p.name for p in out.glob("config_*.json")) == sorted(f"config_macs_m_{b.value:g}.json"
                                                                        for b in macs)
    for b in macs:
        cfg = ChannelConfig.load(out / f"config_{b.kind}_{b.value:g}.json")
        ckpt.model.validate(cfg)
        costs = config_costs(ckpt.model, cfg)
        assert costs[b.kind] <= b.value and costs["memory_mb"] <= mem.value
        assert cfg.meta["budget"] == {"kind": b.kind, "value": b.value}
        assert cfg.meta["constraints"] == [{"kind": "memory_mb", "value": mem.value}]
        assert cfg.meta["checkpoint_sha256"] and 0 <= cfg.meta["search_acc_unfilled"] <= cfg.meta["search_acc"] <= 1
        assert cfg.meta["budget_used"] == pytest.approx(costs[b.kind] / b.value)
        assert cfg.meta["budget_used_unfilled"] <= cfg.meta["budget_used"] <= 1
        # the walk's config is the first point on the path that meets the budget and the constraint
        first = path[(path[b.kind] <= b.value) & (path["memory_mb"] <= mem.value)].iloc[0]
        assert cfg.meta["search_step"] == first["step"] and cfg.meta["search_acc_unfilled"] == first["acc"]
    assert (out / "search.png").stat().st_size > 10_000
    uniform = pd.read_csv(out / "uniform.csv")
    assert len(uniform) == 12 and (uniform["macs_m"].diff().dropna() >= 0).all()
    # an existing search is not overwritten without --resume/--force
    with pytest.raises(OutputExistsError):
        greedy_search(ckpt, macs[:1], SearchOptions(out_dir=out, progress=False))


def test_fast_and_reference_evaluators_make_identical_decisions(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    x, y = search_split(ckpt)
    target = [Budget("macs_m", config_costs(ckpt.model, ckpt.model.full_config())["macs_m"] * 0.7)]
    for bn in ("recal",):  # "batch" scores are compared on MobileNet below
        paths = {}
        for mode in ("fast", "reference"):
            ev = StepEvaluator(ckpt.model, x, y, bn=bn, mode=mode, batch_size=24)
            steps = slim(ckpt.model, ev.score_candidates, ev.score,
                         lambda c: config_costs(ckpt.model, c), target)
            paths[mode] = [(s.unit, s.new, round(s.acc, 6), round(s.loss, 4)) for s in steps]
        assert paths["fast"] == paths["reference"], bn
        assert len(paths["fast"]) > 3


def test_fast_evaluator_scores_equal_reference_on_mobilenet():
    torch.manual_seed(0)
    net = create_model("mobilenet_v2_cifar", width_mult=0.35)
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    cfg = net.random_config(__import__("random").Random(3))
    cands = [(u, cfg.replace(**{u: net.units[u].narrower(cfg.widths[u])})) for u in net.units
             if net.units[u].narrower(cfg.widths[u])]
    for bn in ("recal", "batch"):
        fast = StepEvaluator(net, x, y, bn=bn, mode="fast", batch_size=20)
        ref = StepEvaluator(net, x, y, bn=bn, mode="reference", batch_size=20)
        a, b = fast.score_candidates(cfg, cands), ref.score_candidates(cfg, cands)
        assert [s.acc for s in a] == [s.acc for s in b]
        assert max(abs(s.loss - t.loss) for s, t in zip(a, b)) < 1e-5
        assert fast.forward_nodes < 0.75 * ref.forward_nodes  # the shared work was not redone


def test_default_chunk_holds_up_to_1000_images_of_32_px_worth_of_pixels():
    from hwslim.search.evaluator import Scoring, default_chunk

    assert default_chunk(torch.empty(1, 3, 32, 32)) == 1000
    assert default_chunk(torch.empty(1, 3, 16, 16)) == 1000
    assert default_chunk(torch.empty(1, 3, 48, 48)) == 444
    assert default_chunk(torch.empty(1, 3, 224, 224)) == 250  # never under 250 images
    assert Scoring().chunk(torch.empty(1, 3, 224, 224)) == 250
    assert Scoring(batch_size=64).chunk(torch.empty(1, 3, 32, 32)) == 64


def test_chunks_are_channels_last_and_score_as_plain_images_do():
    """The evaluator stores its image chunks channels-last (PyTorch's CPU convolutions and
    train-mode BN run them about twice as fast): the scores are those of a plain pass."""
    from hwslim.core.accuracy import preserved_bn_stats

    torch.manual_seed(0)
    net = create_model("mobilenet_v2_cifar", width_mult=0.35)
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    ev = StepEvaluator(net, x, y, bn="recal", batch_size=16)
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in ev.chunks)
    assert torch.equal(torch.cat(list(ev.chunks)), torch.cat([x[c::3] for c in range(3)]))  # strided chunks
    cfg = net.uniform_config(6)
    with torch.no_grad(), net.using(cfg), preserved_bn_stats(net):
        recalibrate_bn(net, [x[c::3] for c in range(3)])
        net.eval()
        want = torch.nn.functional.cross_entropy(net(x), y).item()
    assert ev.score(cfg).loss == pytest.approx(want, rel=1e-5)


def test_resume_after_interruption_reaches_the_same_result(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    budget = [Budget("params_m", config_costs(ckpt.model, ckpt.model.full_config())["params_m"] * 0.8)]
    opts = SearchOptions(out_dir=tmp_path / "a", progress=False, plot=False, fill=False)
    full = greedy_search(ckpt, budget, opts)
    # simulate a kill after step 2: the state file is written atomically after every step
    state_file = tmp_path / "a" / "search_state.json"
    state = json.loads(state_file.read_text())
    state["steps"] = state["steps"][:3]
    state_file.write_text(json.dumps(state))
    resumed = greedy_search(load_checkpoint(ckpt_path), budget, replace(opts, resume=True))
    assert [s.widths for s in resumed.steps] == [s.widths for s in full.steps]
    assert resumed.configs == full.configs


def test_driver_keeps_the_smallest_drop_and_criteria_differ():
    """The pure driver on an analytic score: each unit costs accuracy in proportion to its shrink."""
    with torch.device("meta"):
        net = create_model("resnet20")
    weight = {u: (i % 5 + 1) / 100 for i, u in enumerate(net.units)}

    def score(cfg):
        acc = 1 - sum(weight[u] * (1 - w / net.units[u].max_width) for u, w in cfg.widths.items())
        return Score(acc, 1 - acc)

    budget = [Budget("params_m", model_costs(net).params / 1e6 * 0.6)]
    cost = lambda c: config_costs(net, c)  # noqa: E731
    acc_path = slim(net, lambda cur, cands, rank=None: [score(c) for _, c in cands], score, cost, budget)
    first = acc_path[1]
    cheapest = min(weight[u] / net.units[u].max_width for u in net.units)
    assert weight[first.unit] / net.units[first.unit].max_width == cheapest
    assert cost(net.config_of(acc_path[-1].widths))["params_m"] <= budget[0].value
    per_cost = slim(net, lambda cur, cands, rank=None: [score(c) for _, c in cands], score, cost, budget,
                    criterion="acc-per-cost")
    full = net.full_config()
    base_acc, base_params = score(full).acc, cost(full)["params_m"]

    def ratio(u):
        cand = full.replace(**{u: net.units[u].narrower(full.widths[u])})
        return (base_acc - score(cand).acc) / (base_params - cost(cand)["params_m"])

    assert per_cost[1].unit == min((u for u in net.units if len(net.units[u].grid) > 1), key=ratio)
    assert cost(net.config_of(per_cost[-1].widths))["params_m"] <= budget[0].value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, ckpt_path, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ckpt = load_checkpoint(ckpt_path)
        budget = [Budget("macs_m", config_costs(ckpt.model, ckpt.model.full_config())["macs_m"] * 0.9)]
        res = greedy_search(ckpt, budget, SearchOptions(progress=False, plot=False))
        with open(f"{out_file}.{rank}", "w") as f:  # the walk, then the filled config
            json.dump([s.widths for s in res.steps] + [res.configs[0].widths], f)
    finally:
        torch.distributed.destroy_process_group()


def test_torchrun_style_sharding_gives_the_same_decisions(ckpt_path, tmp_path):
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(ckpt_path), str(out)), nprocs=2, join=True)
    ckpt = load_checkpoint(ckpt_path)
    budget = [Budget("macs_m", config_costs(ckpt.model, ckpt.model.full_config())["macs_m"] * 0.9)]
    res = greedy_search(ckpt, budget, SearchOptions(progress=False, plot=False))
    single = [s.widths for s in res.steps] + [res.configs[0].widths]
    assert json.loads(open(f"{out}.0").read()) == single
    assert json.loads(open(f"{out}.1").read()) == single


def test_proposals_step_over_latency_plateaus():
    """A runtime that pads channels to blocks of 16 makes 32 -> 24 free; the proposal skips to 16."""
    from hwslim.search.greedy import _shrink

    with torch.device("meta"):
        net = create_model("resnet20")
    padded = lambda cfg: {"latency_ms": float(sum(-(-w // 16) * 16 for w in cfg.widths.values()))}  # noqa: E731
    cfg = net.full_config()
    unit = "s2"  # 32 channels, grid 8..32
    cand, cost = _shrink(net, cfg, unit, "latency_ms", padded(cfg)["latency_ms"], padded)
    assert cand.widths[unit] == 16 and cost["latency_ms"] == padded(cfg)["latency_ms"] - 16
    # MACs fall with every step: the proposal is exactly one grid step (AutoSlim's)
    macs = lambda c: config_costs(net, c)  # noqa: E731
    cand, _ = _shrink(net, cfg, unit, "macs_m", macs(cfg)["macs_m"], macs)
    assert cand.widths[unit] == 24
    # at the narrowest width there is no proposal
    assert _shrink(net, cfg.replace(s2=8), unit, "latency_ms", 0.0, padded) is None


def test_corrupt_search_state_is_a_user_error(ckpt_path, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "search_state.json").write_bytes(os.urandom(64))
    ckpt = load_checkpoint(ckpt_path)
    budget = [Budget("params_m", config_costs(ckpt.model, ckpt.model.full_config())["params_m"] * 0.9)]
    with pytest.raises(HwslimError, match="not a readable search state"):
        greedy_search(ckpt, budget, SearchOptions(out_dir=out, resume=True, progress=False, plot=False))


def test_force_uses_a_table_from_another_device(ckpt_path, tmp_path, capsys, make_table):
    """`--table <another device's table> --force`: the compatibility check runs once, with --force."""
    ckpt = load_checkpoint(ckpt_path)
    table = make_table(ckpt.model, tmp_path / "other.csv", device_name="Some Other CPU")
    from hwslim.latency.table import LatencyTable

    full = LatencyTable.load(table).predict_ms(ckpt.model.layer_specs(ckpt.model.full_config()))
    budget = f"{0.9 * full:.4f}"
    argv = ["search", "--checkpoint", str(ckpt_path), "--latency-ms", budget, "--table", str(table),
            "--no-progress", "--max-images", "16", "--threads", "1", "--out"]
    assert main(argv + [str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Some Other CPU" in err[0] and "--force-table" in err[0]
    # --force starts over; it no longer also takes another setup's table (one flag, one meaning)
    assert main(argv + [str(tmp_path / "refused"), "--force"]) == 2
    assert "--force-table" in capsys.readouterr().err
    assert main(argv + [str(tmp_path / "forced"), "--force-table"]) == 0
    assert f"latency table: {table}" in capsys.readouterr().err  # search says which table priced the budgets
    cfg = ChannelConfig.load(tmp_path / "forced" / f"config_latency_ms_{float(budget):g}.json")
    assert cfg.meta["latency_ms"] <= float(budget)


def test_mixed_budgets_json_names_the_written_files_and_paths_have_no_double_slash(ckpt_path, tmp_path, capsys):
    ckpt = load_checkpoint(ckpt_path)
    full = config_costs(ckpt.model, ckpt.model.full_config())
    params, macs = f"{0.95 * full['params_m']:.4f}", f"{0.95 * full['macs_m']:.4f}"
    argv = ["search", "--checkpoint", str(ckpt_path), "--params-m", params, "--macs-m", macs, "--no-progress",
            "--max-images", "16", "--threads", "1", "--out", str(tmp_path / "s") + "/"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    files = [d["file"] for d in doc]  # one value per kind: one config, named after the first kind, MACs a constraint
    assert files == [str(tmp_path / "s" / f"config_params_m_{float(params):g}.json")]
    for d, f in zip(doc, files):
        assert ChannelConfig.load(f).widths == d["widths"]
        assert d["meta"]["params_m"] <= float(params) and d["meta"]["macs_m"] <= float(macs)
    assert main(argv + ["--force"]) == 0
    cap = capsys.readouterr()
    assert "//" not in cap.out and all(f in cap.out for f in files)
    assert cap.err.startswith("hwslim search: 1 PyTorch CPU thread (--threads)\nsearching params_m=")


def test_search_shows_progress_with_a_total_and_labels_its_plot(ckpt_path, tmp_path, capsys):
    import matplotlib.pyplot as plt

    from hwslim.search.greedy import path_figure

    ckpt = load_checkpoint(ckpt_path)
    full = config_costs(ckpt.model, ckpt.model.full_config())
    out = tmp_path / "s"
    assert main(["search", "--checkpoint", str(ckpt_path), "--params-m", f"{0.95 * full['params_m']:.4f}",
                 "--max-images", "16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "greedy search (% of the way to the budgets): 100%" in err and "100/100%" in err
    assert "scoring uniform-width configs (for search.png): 100%" in err and "12/12" in err
    assert "filling the budgets (widening units back): 100%" in err and "1/1" in err  # one config to fill
    walk_bar = next(line for line in err.replace("\r", "\n").splitlines() if "100/100%" in line)
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", walk_bar)  # elapsed<remaining: the ETA
    path, uniform = pd.read_csv(out / "path.csv"), pd.read_csv(out / "uniform.csv")
    path["latency_ms"], uniform["latency_ms"] = path["params_m"], uniform["params_m"]  # as a table would add
    fig = path_figure(path, uniform, [Budget("latency_ms", 0.3), Budget("latency_ms", 0.2)])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "latency (ms, predicted by the table)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["greedy path", "uniform width", "budgets"]
    plt.close(fig)
    fig = path_figure(path, uniform, [Budget("params_m", 0.2), Budget("macs_m", 30)])
    assert fig.axes[0].get_xlabel() == "parameters (millions)"
    assert fig.axes[0].get_title() == "against params_m; budgets on macs_m are not drawn"
    plt.close(fig)


def _dead_tail(net, unit: str) -> None:
    """Make the channels of ``unit`` beyond its next narrower width output exactly zero (BN scale and
    shift 0 in the convs that produce it): narrowing ``unit`` one step then changes nothing."""
    keep = net.units[unit].narrower(net.units[unit].max_width)
    with torch.no_grad():
        for n in net.nodes:
            if n.mid == unit:
                bn = net.layers[n.name].conv1.bn
            elif n.out == unit:
                bn = net.layers[n.name].bn
            else:
                continue
            bn.weight[keep:] = 0
            bn.bias[keep:] = 0


def test_halving_picks_what_full_scoring_picks_when_the_margin_is_clear():
    """Every candidate screened on a spread quarter of the split, the best 3 scored on all of it: on a
    supernet where one shrink is free and the others cost accuracy, the walk is full scoring's."""
    from hwslim.search.evaluator import Halving, Scoring

    torch.manual_seed(3)
    net = create_model("resnet20", input_size=16)
    for m in net.modules():  # non-trivial BN, as _supernet
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    _dead_tail(net, "l3b1/mid")
    x = torch.randn(96, 3, 16, 16)
    with torch.no_grad(), net.using(net.full_config()):
        recalibrate_bn(net, [x[0::2], x[1::2]])  # as the scorer will: its chunks of 48
        net.eval()
        y = net(x).argmax(1)  # labels: the full config's own predictions (100% at the start)
    full = StepEvaluator(net, x, y, batch_size=48)
    cur = net.full_config()
    cands = [(u, cur.replace(**{u: unit.narrower(cur.widths[u])})) for u, unit in net.units.items()]
    scores = full.score_candidates(cur, cands)
    best = max(range(len(cands)), key=lambda i: (scores[i].acc, -scores[i].loss))
    assert cands[best][0] == "l3b1/mid" and scores[best].acc == 1.0
    assert sorted(s.acc for s in scores)[-2] <= 1.0 - 3 / 96  # a clear margin: every other shrink flips 3+ images

    scorer, score = Scoring(bn="recal", screen_images=24, keep=3, batch_size=48).build(net, x, y)
    assert isinstance(scorer, Halving)
    budget = [Budget("macs_m", config_costs(net, cur)["macs_m"] * 0.999)]  # one step
    cost = lambda c: config_costs(net, c)  # noqa: E731
    halved = slim(net, scorer, score, cost, budget)
    reference = slim(net, full.score_candidates, full.score, cost, budget)
    assert halved[1].unit == "l3b1/mid" and len(halved) == 2
    assert [(s.unit, s.new, s.acc, s.loss) for s in halved] == [(s.unit, s.new, s.acc, s.loss) for s in reference]
    assert scorer.kept < scorer.screened  # most candidates were not scored in full


def test_halving_ranks_by_the_callers_rule_on_the_screening_images():
    """The screen sees the current config too (the rank's base); the rest get None; few candidates: full alone."""
    from hwslim.search.evaluator import Halving

    calls = []

    def screen(cur, cands):
        calls.append(("screen", [n for n, _ in cands]))
        return [Score(0.5 if n == "" else {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.2}[n], 1.0) for n, _ in cands]

    def full(cur, cands):
        calls.append(("full", [n for n, _ in cands]))
        return [Score(0.9, 0.1) for _ in cands]

    cands = [(n, None) for n in "abcd"]
    got = Halving(screen, full, keep=2)(None, cands)
    assert calls == [("screen", ["a", "b", "c", "d", ""]), ("full", ["b", "c"])]
    assert got == [None, Score(0.9, 0.1), Score(0.9, 0.1), None]
    # the caller's rule: the largest drop first (base 0.5 is the current config's screening score)
    calls.clear()
    got = Halving(screen, full, keep=1)(None, cands, rank=lambda base, i, s: (-(base.acc - s.acc), i))
    assert calls[1] == ("full", ["a"]) and got[0] is not None
    calls.clear()
    Halving(screen, full, keep=4)(None, cands)
    assert calls == [("full", ["a", "b", "c", "d"])]
