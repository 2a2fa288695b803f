"""A new operator and a new latency backend are one file each, plus a registration.

The toy operator (tests/toys/toy_op.py) and the toy backend (tests/toys/toy_backend.py) are
registered here and nowhere in hwslim; a user's CNN that uses the operator (tests/toys/scaled_net.py)
then goes through the whole pipeline with them: cost -> train -> profile --quick -> search -> export.
"""
from __future__ import annotations

import importlib
import json
import sys

import pytest

import profilers
from hwslim.cli import main
from hwslim.core.ops import OPS
from hwslim.importing.checkpoint import load_checkpoint
from hwslim.latency.table import LatencyTable


@pytest.fixture
def toys(monkeypatch):
    """The toy operator and backend registered for this test only (the registries are as before after it)."""
    monkeypatch.setattr(profilers, "BACKENDS", dict(profilers.BACKENDS))
    profilers.register_backend("toy", "toys.toy_backend", "ToyProfiler", "cpu")
    op = importlib.reload(sys.modules["toys.toy_op"]) if "toys.toy_op" in sys.modules else \
        importlib.import_module("toys.toy_op")
    yield op
    OPS.pop(op.ChannelScale.kind)


def test_a_toy_operator_and_a_toy_backend_run_the_whole_pipeline(toys, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = ["--model", "toys.scaled_net:build", "--input-size", "16"]
    assert main(["cost", *model, "--json"]) == 0
    costs = json.loads(capsys.readouterr().out)
    from toys.scaled_net import build

    assert costs["params"] == sum(p.numel() for p in build().parameters())  # the scale's 16 weights counted

    assert main(["train", *model, "--data", "synthetic:300", "--epochs", "1", "--batch-size", "50", "--threads", "1",
                 "--no-progress", "--out", "run"]) == 0
    ckpt = "run/checkpoint.pt"
    net = load_checkpoint(ckpt).model
    assert "toy_scale" in {n.op.kind for n in net.nodes}

    assert main(["profile", "--device", "cpu", "--backend", "toy", "--model", ckpt, "--quick", "--calib-configs", "3",
                 "--holdout-configs", "1", "--out", "table/t.csv", "--json"]) == 0
    capsys.readouterr()
    table = LatencyTable.load("table/t.csv")
    assert table.meta["backend"] == "toy"
    assert "toy_scale" in {sig[0] for sig in table.entries}  # the operator's own entries, timed by the toy backend

    full = table.predict_ms(net.layer_specs())
    budget = max(0.9 * full, 0.5 * (table.lower_bound_ms(net) + full))
    assert main(["search", "--checkpoint", ckpt, "--latency-ms", f"{budget:.6f}", "--table", "table/t.csv",
                 "--max-images", "40", "--out", "search", "--no-progress", "--json"]) == 0
    (cfg,) = json.loads(capsys.readouterr().out)
    assert cfg["meta"]["latency_ms"] <= budget

    assert main(["export", "--checkpoint", ckpt, "--config", cfg["file"], "--out", "small.onnx", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["max_rel_error"] <= 1e-4  # ONNX Runtime computes what the supernet computes at the config
