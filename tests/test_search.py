import json
import os
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from hwslim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hwslim.cli import main
from hwslim.config import ChannelConfig
from hwslim.costs import model_costs
from hwslim.data import search_split, synthetic_data_info
from hwslim.errors import BudgetError, HwslimError, OutputExistsError
from hwslim.evaluator import Score, StepEvaluator
from hwslim.models import create_model
from hwslim.search import Budget, config_costs, greedy_search, slim

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


def test_budget_nothing_can_meet_is_refused_up_front(ckpt_path, tmp_path, capsys):
    ckpt = load_checkpoint(ckpt_path)
    floor = model_costs(ckpt.model, ckpt.model.min_config()).params / 1e6
    with pytest.raises(BudgetError, match=f"smallest achievable params_m on this supernet's grid is {floor:.4g}"):
        greedy_search(ckpt, [Budget("params_m", floor / 2)], out_dir=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    rc = main(["search", "--checkpoint", str(ckpt_path), "--params-m", "0.000001", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "smallest achievable" in err[0]


def test_search_meets_every_budget_and_writes_outputs(ckpt_path, tmp_path, capsys):
    ckpt = load_checkpoint(ckpt_path)
    full = config_costs(ckpt.model, ckpt.model.full_config())
    low = config_costs(ckpt.model, ckpt.model.min_config())
    budgets = [Budget("macs_m", full["macs_m"] * 0.9), Budget("macs_m", full["macs_m"] * 0.8),
               Budget("memory_mb", full["memory_mb"] * 0.9 + low["memory_mb"] * 0.1)]
    out = tmp_path / "search"
    rc = main(["search", "--checkpoint", str(ckpt_path), "--macs-m", str(budgets[0].value), str(budgets[1].value),
               "--memory-mb", str(budgets[2].value), "--out", str(out), "--no-progress", "--max-images", str(IMAGES)])
    assert rc == 0
    path = pd.read_csv(out / "path.csv")
    assert list(path.columns[:7]) == ["step", "unit", "old", "new", "acc", "loss", "binding"]
    assert (path["new"].dropna() < path["old"].dropna()).all()
    assert (path["macs_m"].diff().dropna() < 0).all()
    for b in budgets:
        cfg = ChannelConfig.load(out / f"config_{b.kind}_{b.value:g}.json")
        ckpt.model.validate(cfg)
        assert config_costs(ckpt.model, cfg)[b.kind] <= b.value
        assert cfg.meta["budget"] == {"kind": b.kind, "value": b.value}
        assert cfg.meta["checkpoint_sha256"] and 0 <= cfg.meta["search_acc"] <= 1
        # it is the first point on the path that meets the budget
        first = path[path[b.kind] <= b.value].iloc[0]
        assert cfg.meta["search_step"] == first["step"]
    assert (out / "search.png").stat().st_size > 10_000
    uniform = pd.read_csv(out / "uniform.csv")
    assert len(uniform) == 12 and (uniform["macs_m"].diff().dropna() >= 0).all()
    # an existing search is not overwritten without --resume/--force
    with pytest.raises(OutputExistsError):
        greedy_search(ckpt, budgets[:1], out_dir=out, progress=False)


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


def test_resume_after_interruption_reaches_the_same_result(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    budget = [Budget("params_m", config_costs(ckpt.model, ckpt.model.full_config())["params_m"] * 0.8)]
    full = greedy_search(ckpt, budget, out_dir=tmp_path / "a", progress=False, plot=False)
    # simulate a kill after step 2: the state file is written atomically after every step
    state_file = tmp_path / "a" / "search_state.json"
    state = json.loads(state_file.read_text())
    state["steps"] = state["steps"][:3]
    state_file.write_text(json.dumps(state))
    resumed = greedy_search(load_checkpoint(ckpt_path), budget, out_dir=tmp_path / "a", resume=True,
                            progress=False, plot=False)
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
    acc_path = slim(net, lambda cur, cands: [score(c) for _, c in cands], score, cost, budget)
    first = acc_path[1]
    cheapest = min(weight[u] / net.units[u].max_width for u in net.units)
    assert weight[first.unit] / net.units[first.unit].max_width == cheapest
    assert cost(net.config_of(acc_path[-1].widths))["params_m"] <= budget[0].value
    per_cost = slim(net, lambda cur, cands: [score(c) for _, c in cands], score, cost, budget,
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
        res = greedy_search(ckpt, budget, progress=False, plot=False)
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump([s.widths for s in res.steps], f)
    finally:
        torch.distributed.destroy_process_group()


def test_torchrun_style_sharding_gives_the_same_decisions(ckpt_path, tmp_path):
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(ckpt_path), str(out)), nprocs=2, join=True)
    ckpt = load_checkpoint(ckpt_path)
    budget = [Budget("macs_m", config_costs(ckpt.model, ckpt.model.full_config())["macs_m"] * 0.9)]
    single = [s.widths for s in greedy_search(ckpt, budget, progress=False, plot=False).steps]
    assert json.loads(open(f"{out}.0").read()) == single
    assert json.loads(open(f"{out}.1").read()) == single


def test_proposals_step_over_latency_plateaus():
    """A runtime that pads channels to blocks of 16 makes 32 -> 24 free; the proposal skips to 16."""
    from hwslim.search import _shrink

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
        greedy_search(ckpt, budget, out_dir=out, resume=True, progress=False, plot=False)


def test_force_uses_a_table_from_another_device(ckpt_path, tmp_path, capsys, make_table):
    """`--table <another device's table> --force`: the compatibility check runs once, with --force."""
    ckpt = load_checkpoint(ckpt_path)
    table = make_table(ckpt.model, tmp_path / "other.csv", device_name="Some Other CPU")
    from hwslim.latency import LatencyTable

    full = LatencyTable.load(table).predict_ms(ckpt.model.layer_specs(ckpt.model.full_config()))
    budget = f"{0.9 * full:.4f}"
    argv = ["search", "--checkpoint", str(ckpt_path), "--latency-ms", budget, "--table", str(table),
            "--no-progress", "--max-images", "16", "--threads", "1", "--out"]
    assert main(argv + [str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Some Other CPU" in err[0] and "--force" in err[0]
    assert main(argv + [str(tmp_path / "forced"), "--force"]) == 0
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
    files = [d["file"] for d in doc]
    assert files == [str(tmp_path / "s" / f"config_params_m_{float(params):g}.json"),
                     str(tmp_path / "s" / f"config_macs_m_{float(macs):g}.json")]
    for d, f in zip(doc, files):
        assert ChannelConfig.load(f).widths == d["widths"]
    assert main(argv + ["--force"]) == 0
    cap = capsys.readouterr()
    assert "//" not in cap.out and all(f in cap.out for f in files)
    assert cap.err.startswith("hwslim search: 1 PyTorch CPU thread (--threads)\nsearching params_m=")


def test_search_shows_progress_with_a_total_and_labels_its_plot(ckpt_path, tmp_path, capsys):
    import matplotlib.pyplot as plt

    from hwslim.search import path_figure

    ckpt = load_checkpoint(ckpt_path)
    full = config_costs(ckpt.model, ckpt.model.full_config())
    out = tmp_path / "s"
    assert main(["search", "--checkpoint", str(ckpt_path), "--params-m", f"{0.95 * full['params_m']:.4f}",
                 "--max-images", "16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "greedy search (% of the way to the budgets): 100%" in err and "100/100%" in err
    assert "scoring uniform-width configs (for search.png): 100%" in err and "12/12" in err
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
