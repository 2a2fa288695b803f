"""A model is data: a graph the zoo has never heard of goes through every command.

The graph (SE, a grouped conv, a concatenation, a standalone add) is written to a JSON
file; ``train`` builds the supernet from it and stores the graph in the checkpoint;
``cost``, ``profile``, ``search``, ``export`` and ``verify`` rebuild the network from
the checkpoint (or the exported file's metadata) alone.
"""
from __future__ import annotations

import json

import pytest
import torch

from hwslim.importing.checkpoint import load_checkpoint
from hwslim.cli import main
from hwslim.core.graph import INPUT
from hwslim.latency.table import LatencyTable, table_paths
from hwslim.models import list_models
from hwslim.importing.specs import load_model
from hwslim.core.supernet import GraphBuilder, SlimmableNet


def custom_graph() -> dict:
    g = GraphBuilder()
    a, b, r, c = g.unit("a", 16), g.unit("b", 32, quantum=8), g.unit("r", 8), g.unit("c", 16)
    x = g.conv("stem", INPUT, 3, a, 3, 2, act="hardswish")
    h = g.conv("expand", x, a, b, 1, act="relu")
    h = g.conv("group", h, b, None, 3, group_width=8, act="relu")
    h = g.se("se", h, r, gate="hardsigmoid")
    h = g.conv("project", h, b, a, 1, act=None)
    x = g.add("add", h, x, act="relu")
    side = g.conv("side", x, a, c, 3, act="relu")
    x = g.concat("cat", x, side)
    x = g.conv("mix", x, None, g.unit("d", 32), 1, act="relu")
    g.linear("fc", g.gap("gap", x), None, 10)
    return SlimmableNet("my_cnn", g, width_mult=1.0, input_size=16, num_classes=10).graph_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    graph = d / "my_cnn.json"
    graph.write_text(json.dumps(custom_graph()))
    assert main(["train", "--model", str(graph), "--data", "synthetic:400", "--epochs", "1", "--batch-size", "50",
                 "--threads", "1", "--seed", "0", "--out", str(d / "run")]) == 0
    return d, d / "run" / "checkpoint.pt"


def test_the_checkpoint_alone_describes_the_model(trained):
    _, ckpt = trained
    assert "my_cnn" not in list_models()
    net = load_checkpoint(ckpt).model
    assert net.name == "my_cnn" and {n.op.kind for n in net.nodes} >= {"se", "concat", "add", "conv"}
    with torch.device("meta"):
        again = load_model(str(ckpt))
    assert [n.to_dict() for n in again.nodes] == [n.to_dict() for n in net.nodes]


def test_every_command_runs_from_the_checkpoint(trained, capsys):
    d, ckpt = trained
    assert main(["cost", "--model", str(ckpt), "--json"]) == 0
    costs = json.loads(capsys.readouterr().out)
    assert costs["params"] == sum(p.numel() for p in load_checkpoint(ckpt).model.parameters())

    table = d / "table" / "my_cnn.csv"
    assert main(["profile", "--device", "cpu", "--model", str(ckpt), "--quick", "--calib-configs", "4",
                 "--holdout-configs", "2", "--out", str(table), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == len(LatencyTable.load(table))
    kinds = {r.split(",")[0] for r in table.read_text().splitlines()[1:]}
    assert {"se", "concat", "add", "conv", "gap", "linear"} <= kinds  # measured inside designed networks

    tbl, net = LatencyTable.load(table), load_checkpoint(ckpt).model
    full = tbl.predict_ms(net.layer_specs())
    # a budget the walk must work for, yet feasible: a quick table of a tiny net on a busy machine
    # can be nearly flat (its fastest layers adding up to more than 0.9x the full config)
    budget = max(0.9 * full, 0.5 * (tbl.lower_bound_ms(net) + full))
    assert main(["search", "--checkpoint", str(ckpt), "--latency-ms", f"{budget:.6f}", "--table", str(table),
                 "--max-images", "100", "--out", str(d / "search"), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    cfg = next((d / "search").glob("config_latency_ms_*.json"))
    out = d / "small.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    code = main(["verify", str(out), "--table", str(table), "--json"])
    assert code in (0, 1, 3)  # measured; within the budget or not, or conditions moved (a shared machine)
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith("small.onnx") and result["predicted_ms"] > 0 and result["measured_ms"] > 0


def test_a_second_model_reuses_the_shapes_a_table_already_holds(trained, capsys):
    d, ckpt = trained
    first = d / "table" / "my_cnn.csv"
    if not first.exists():
        pytest.skip("needs the table of test_every_command_runs_from_the_checkpoint")
    data = custom_graph()
    data["name"] = "my_cnn_renamed"  # the same layers under another name: every shape is known
    graph = d / "renamed.json"
    graph.write_text(json.dumps(data))
    second = d / "table" / "my_cnn_renamed.csv"
    quick = ["--quick", "--calib-configs", "4", "--holdout-configs", "2", "--json"]
    for attempt in range(4):
        if attempt:  # a shared machine's speed moved, during either table or between them: then nothing is lent,
            # rightly; measure both again from scratch once the spell has passed
            for path in (*table_paths(first), *table_paths(second)):
                path.unlink(missing_ok=True)
            assert main(["profile", "--device", "cpu", "--model", str(ckpt), *quick, "--out", str(first)]) == 0
            capsys.readouterr()
        assert main(["profile", "--device", "cpu", "--model", str(graph), *quick, "--out", str(second)]) == 0
        captured = capsys.readouterr()
        summary = json.loads(captured.out)
        if "measured under other conditions" not in captured.err:
            break
    assert summary["measured"] == 0 and summary["reused"] == summary["entries"], captured.err
    assert "reused" in captured.err
