"""``hwslim search --measure``: latency budgets fitted to end-to-end times (the table proposes, the
machine disposes), on a real quick-protocol ONNX Runtime table of a tiny resnet20."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hwslim.cli import main
from hwslim.core.config import ChannelConfig
from hwslim.importing.checkpoint import load_checkpoint, save_checkpoint
from hwslim.importing.data import synthetic_data_info
from hwslim.latency.profile import ProfileSettings, profile
from hwslim.latency.table import LatencyTable
from hwslim.latency.verify import config_timer
from hwslim.models import create_model
from hwslim.search.greedy import CORRECTION_RANGE, MAX_TIGHTENINGS, Budget, SearchOptions, config_costs, greedy_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(width_mult=1.0, input_size=16)
# what a second timing of the same tiny model (0.1-0.2 ms) may move by on a loaded 2-core machine:
# these tests check the fit's logic on real timings; the 3% line is the benchmarks' to check
NOISE = 0.10


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("resnet20", **TINY)
    for m in net.modules():  # widths that matter: non-trivial BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("ckpt") / "supernet.pt"
    save_checkpoint(path, net, data=synthetic_data_info(num_train=200, num_search=32, seed=0))
    return path


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    """A real (quick-protocol) ONNX Runtime table of the tiny resnet20 on this CPU."""
    out = tmp_path_factory.mktemp("table") / "r20.csv"
    profile(ProfileSettings(model="resnet20", out=str(out), quick=True, calib_configs=3, holdout_configs=1, **TINY))
    return out


def _biased(table_path, path, scale: float):
    """A copy of the table whose every prediction is ``scale`` times the real one (its calibration scaled)."""
    t = LatencyTable.load(table_path)
    meta = json.loads(json.dumps(t.meta))
    meta["calibration"].update(a=meta["calibration"]["a"] * scale, b=meta["calibration"]["b"] * scale)
    return LatencyTable(meta, t.entries).save(path)


def _search(ckpt_path, table, budgets, out, measure: bool):
    ckpt = load_checkpoint(ckpt_path)
    opts = SearchOptions(out_dir=out, progress=False, plot=False, max_images=16,
                         measure=config_timer(table, ckpt.model) if measure else None)
    return greedy_search(ckpt, [Budget("latency_ms", b) for b in budgets], opts, table=table, log=lambda m: None)


def _full_ms(ckpt_path, table) -> float:
    net = load_checkpoint(ckpt_path).model
    return config_costs(net, net.full_config(), table)["latency_ms"]


def test_measured_search_meets_its_budgets_measured(ckpt_path, table_path, tmp_path):
    table = LatencyTable.load(table_path)
    budgets = [round(f * _full_ms(ckpt_path, table), 5) for f in (0.75, 0.55)]
    res = _search(ckpt_path, table, budgets, tmp_path / "m", measure=True)
    timer = config_timer(table, load_checkpoint(ckpt_path).model)
    again = timer([load_checkpoint(ckpt_path).model.full_config(), *res.configs])
    for b, cfg, f, ms in zip(budgets, res.configs, res.files, again[1:]):
        fit = cfg.meta["measured"]
        assert fit["budget_ms"] == b and fit["points"] >= 3
        assert CORRECTION_RANGE[0] <= fit["correction"] <= CORRECTION_RANGE[1]
        assert fit["capped"] == (fit["correction"] != fit["raw_correction"])
        assert fit["predicted_ms"] == cfg.meta["latency_ms"] <= fit["table_budget_ms"] + 1e-12
        # as the search timed it: within the budget, or tightened as often as it may be
        assert fit["measured_ms"] <= b or fit["tightened"] == MAX_TIGHTENINGS
        # timed again, in other rounds: a second timing of a 0.1 ms model on a loaded 2-core
        # machine moves by several percent (the benchmarks check the 3% line, not this test)
        assert ms <= b * (1 + NOISE)
        assert ChannelConfig.load(f).meta["measured"] == fit  # in the file the search wrote
        assert fit["full_measured_ms"] > fit["measured_ms"]


def test_a_biased_table_is_corrected_where_the_table_alone_misses(ckpt_path, table_path, tmp_path):
    """Predictions 0.8x the truth: the table-only pick measures over its budget, the measured one within."""
    biased = LatencyTable.load(_biased(table_path, tmp_path / "biased.csv", 0.8))
    budget = round(0.6 * _full_ms(ckpt_path, biased), 5)
    plain = _search(ckpt_path, biased, [budget], tmp_path / "plain", measure=False).configs[0]
    fitted = _search(ckpt_path, biased, [budget], tmp_path / "fitted", measure=True).configs[0]
    net = load_checkpoint(ckpt_path).model
    _, plain_ms, fitted_ms = config_timer(biased, net)([net.full_config(), plain, fitted])
    # the table alone measured 0.99-1.18x its budget over runs (a quick table of a 0.15 ms model): the
    # fitted pick is the smaller one, timed in the same rounds, and within the budget's noise
    assert fitted_ms <= budget * (1 + NOISE) and fitted_ms < plain_ms
    fit = fitted.meta["measured"]
    assert fit["correction"] > 1.05 and fit["table_budget_ms"] < budget  # it found the table's bias
    assert fitted.meta["latency_ms"] < plain.meta["latency_ms"]


def test_without_measure_nothing_is_measured_and_the_walk_is_the_same(ckpt_path, table_path, tmp_path, capsys):
    table = LatencyTable.load(table_path)
    budget = round(0.7 * _full_ms(ckpt_path, table), 5)
    argv = ["search", "--checkpoint", str(ckpt_path), "--latency-ms", str(budget), "--table", str(table_path),
            "--no-progress", "--max-images", "16", "--threads", "1", "--no-fill", "--out"]
    assert main(argv + [str(tmp_path / "plain")]) == 0
    plain_out = capsys.readouterr().out
    assert main(argv + [str(tmp_path / "fitted"), "--measure"]) == 0
    captured = capsys.readouterr()
    assert "measured_ms" not in plain_out and "measured_ms" in captured.out and "correction" in captured.out
    assert f"latency_ms={budget:g}: measured/predicted" in captured.err  # the per-budget line
    name = f"config_latency_ms_{budget:g}.json"
    plain = ChannelConfig.load(tmp_path / "plain" / name)
    assert "measured" not in plain.meta and "measured" in ChannelConfig.load(tmp_path / "fitted" / name).meta
    # the walk is the table's: the measured search's path starts with the plain one's
    plain_path = (tmp_path / "plain" / "path.csv").read_text().splitlines()
    assert (tmp_path / "fitted" / "path.csv").read_text().splitlines()[:len(plain_path)] == plain_path


def test_measured_search_resumes(ckpt_path, table_path, tmp_path):
    table = LatencyTable.load(table_path)
    budget = round(0.6 * _full_ms(ckpt_path, table), 5)
    first = _search(ckpt_path, table, [budget], tmp_path / "a", measure=True)
    state_file = tmp_path / "a" / "search_state.json"
    state = json.loads(state_file.read_text())
    state["steps"] = state["steps"][:2]
    state_file.write_text(json.dumps(state))
    ckpt = load_checkpoint(ckpt_path)
    opts = SearchOptions(out_dir=tmp_path / "a", progress=False, plot=False, max_images=16, resume=True,
                         measure=config_timer(table, ckpt.model))
    resumed = greedy_search(ckpt, [Budget("latency_ms", budget)], opts, table=table, log=lambda m: None)
    n = len(first.steps)
    assert [s.widths for s in resumed.steps[:n]] == [s.widths for s in first.steps][:len(resumed.steps[:n])]
    fit = resumed.configs[0].meta["measured"]
    assert fit["measured_ms"] <= budget or fit["tightened"] == MAX_TIGHTENINGS


def test_measure_without_a_latency_budget_or_with_another_machines_table_is_refused(
        ckpt_path, tmp_path, capsys, make_table):
    argv = ["search", "--checkpoint", str(ckpt_path), "--no-progress", "--threads", "1", "--measure"]
    assert main(argv + ["--params-m", "0.05", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--measure" in err[0] and "--latency-ms" in err[0]
    other = make_table(load_checkpoint(ckpt_path).model, tmp_path / "other.csv", device_name="Some Other CPU")
    assert main(argv + ["--latency-ms", "1", "--table", str(other), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Some Other CPU" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # from Python: a measuring search needs a table and a latency budget
    from hwslim.core.errors import HwslimError

    with pytest.raises(HwslimError, match="--measure"):
        greedy_search(load_checkpoint(ckpt_path), [Budget("params_m", 0.05)],
                      SearchOptions(progress=False, measure=lambda configs: [1.0] * len(configs)))


def test_options_without_measure_compare_equal_to_the_defaults():
    assert replace(SearchOptions(), measure=None) == SearchOptions()


def test_a_correction_beyond_its_range_is_capped_and_said(ckpt_path, table_path, tmp_path):
    """A machine 1.5x slower than its table: the correction stops at the cap, with a note, and the
    tightening after the chosen config measured over does the rest."""
    table = LatencyTable.load(table_path)
    ckpt = load_checkpoint(ckpt_path)
    timer = config_timer(table, ckpt.model)
    budget = round(0.8 * _full_ms(ckpt_path, table), 5)
    lines = []
    res = greedy_search(ckpt, [Budget("latency_ms", budget)],
                        SearchOptions(progress=False, plot=False, max_images=16,
                                      measure=lambda configs: [1.5 * ms for ms in timer(configs)]),
                        table=table, log=lines.append)
    fit = res.configs[0].meta["measured"]
    assert fit["capped"] and fit["correction"] == CORRECTION_RANGE[1] and fit["raw_correction"] > 1.3
    assert any("capped to 1.25" in line for line in lines)
    assert fit["table_budget_ms"] <= budget / CORRECTION_RANGE[1] + 1e-12


def test_an_over_tightened_pick_is_loosened_by_bisection_and_the_best_fitting_pick_kept(ckpt_path, table_path,
                                                                                           tmp_path):
    """Scripted end-to-end times (the fit's logic alone): the first picks measure 12% over their
    predictions, every other config as predicted. Tightening by measured/budget overshoots (the
    pick lands near 0.89 of the budget), so the bracket [0.89, 1] is bisected with what is left of
    the re-picks; the kept pick is the most accurate that measured within the budget."""
    table = LatencyTable.load(table_path)
    net = load_checkpoint(ckpt_path).model
    budget = round(0.6 * _full_ms(ckpt_path, table), 5)
    calls = []

    def measure(configs):
        calls.append(len(configs))
        scale = 1.12 if len(calls) == 2 else 1.0  # call 1: near the budget; 2: the first picks
        return [scale * config_costs(net, c, table)["latency_ms"] for c in configs]

    ckpt = load_checkpoint(ckpt_path)
    opts = SearchOptions(out_dir=tmp_path / "s", progress=False, plot=False, max_images=16, measure=measure)
    res = greedy_search(ckpt, [Budget("latency_ms", budget)], opts, table=table, log=lambda m: None)
    fit = res.configs[0].meta["measured"]
    assert fit["correction"] == 1.0 and fit["tightened"] == 1 and fit["loosened"] == MAX_TIGHTENINGS - 1
    assert len(calls) == 2 + MAX_TIGHTENINGS
    # kept: a pick timed after the first (those measure as predicted), within the budget
    assert fit["measured_ms"] == pytest.approx(fit["predicted_ms"]) and fit["measured_ms"] <= budget
    assert budget / 1.12 <= fit["table_budget_ms"] < budget
    # the recorded fields are the kept config's
    assert config_costs(net, res.configs[0], table)["latency_ms"] == pytest.approx(fit["predicted_ms"])
