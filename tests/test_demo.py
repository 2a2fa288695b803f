"""hwslim demo: the whole pipeline, shortened (--quick)."""
from __future__ import annotations

import csv
import json

import onnx
import pytest

from hwslim.cli import main
from hwslim.pipeline.demo import budgets_between
from hwslim.runtimes.onnx_file import config_from_metadata, onnx_metadata


def test_budgets_between():
    assert budgets_between(1.0, 2.0, (0.25, 0.5, 0.75)) == [1.25, 1.5, 1.75]
    assert budgets_between(0.02, 0.04, (0.3333,)) == [0.0267]  # 3 significant digits


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for column in ("budget_ms", "predicted_ms", "measured_ms", "p90_ms", "x_budget", "accuracy_%", "params"):
        assert column in printed
    assert "--quick: a smoke run" in printed and "mean nothing" in printed  # its numbers say so
    assert (out / "train" / "checkpoint.pt").is_file()
    assert (out / "accuracy_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    budgets = [float(r["budget_ms"]) for r in rows]
    assert budgets == sorted(budgets) and len(set(budgets)) == 3
    for r in rows:
        assert float(r["measured_ms"]) > 0 and float(r["predicted_ms"]) > 0
        assert 0 <= float(r["accuracy_%"]) <= 100 and int(r["params"]) > 0
        assert r["verdict"] in ("OK", "OVER", "UNRELIABLE") and r["produced_by"].startswith("hwslim demo")
        model = out / r["model"]
        onnx.checker.check_model(str(model))
        meta = onnx_metadata(model)  # every model names what produced it
        cfg = config_from_metadata(meta)
        assert cfg.meta["budget"] == {"kind": "latency_ms", "value": float(r["budget_ms"])}
        assert meta["checkpoint"] == str((out / "train" / "checkpoint.pt").resolve())
        assert meta["table"].endswith("latency.csv")
    provenance = json.loads((out / "demo.json").read_text())
    assert provenance["quick"] is True and len(provenance["rows"]) == 3
    # the verdicts are confident only where the conditions compare with the table's, and say so
    cond = provenance["conditions"]
    assert cond["now"]["probe_ms"] > 0 and cond["table"]["start"]["probe_ms"] > 0
    # (unless the only doubt is references that moved unevenly and each alone gives the same verdict)
    assert all((r["verdict"] == "UNRELIABLE") <= (not cond["reliable"]) for r in rows)
    assert all(r["verdict"] == "UNRELIABLE" or cond["reliable"] or cond["only_uneven"] for r in rows)
    assert ("verdict unreliable" in printed) == (not cond["reliable"])
    for r in rows:  # beside every verdict: p50, p90, their ratio to the budget; one line where it is not OK
        assert float(r["p90_ms"]) > 0 and float(r["x_budget"]) == pytest.approx(float(r["measured_ms"]) /
                                                                               float(r["budget_ms"]), rel=1e-3)
        if r["verdict"] == "UNRELIABLE":  # one sentence naming the one probe that decided, as in demo.json
            assert r["message"] in printed and r["message"].endswith(cond["note"])
            assert r["message"].count("verdict unreliable") == 1 and "((" not in r["message"]
            probes = ("before measuring", "after measuring", "the table's machine changed while it was measured",
                      "timed beside the model")
            assert sum(p in r["message"] for p in probes) == 1
        else:
            assert r["message"] in ("", None) or r["verdict"] == "OVER" or "by each reference alone" in r["message"]
    # the conditions line shows the probe that decided: before, and after the measurements
    assert "conditions before measuring: " in printed and "conditions after measuring: " in printed
    # a second run refuses to overwrite the first one
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err


def test_force_starts_from_scratch_and_keeps_other_files(tmp_path, capsys):
    """--force once reused the old table (profiling resumed a complete one): it must measure again."""
    from hwslim.pipeline.demo import OUTPUTS

    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for name in OUTPUTS:  # a stale run: every output there, marked
        if "." in name:
            (out / name).write_text("stale")
        else:
            (out / name).mkdir()
            (out / name / "stale.txt").write_text("stale")
    (out / "table" / "latency.json").write_text(json.dumps({"stale": True}))
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--force"]) == 0
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "mine"  # not the demo's: kept
    assert not list(out.rglob("stale.txt"))
    table = json.loads((out / "table" / "latency.json").read_text())
    assert "stale" not in table and table["status"] == "complete"
    first = (table["created"], table["conditions"]["start"]["at"])
    (out / "table" / "latency.json").write_text(json.dumps({**table, "marker": 1}))
    import time

    time.sleep(1.1)  # the table's timestamps have one-second resolution
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--force"]) == 0
    again = json.loads((out / "table" / "latency.json").read_text())
    assert "marker" not in again and (again["created"], again["conditions"]["start"]["at"]) != first


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--torch-threads", "0"], ["--threads", "x"]])
def test_bad_threads_is_a_user_error(tmp_path, capsys, bad):
    try:
        code = main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress", *bad])
    except SystemExit as e:  # refused by argparse
        code = e.code
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_out_that_is_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main(["demo", "--quick", "--out", str(f), "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err and "--out" in cap.err
    assert f.read_text() == "mine"


def test_json_stdout_is_only_the_json_object(tmp_path, capsys, monkeypatch):
    """Whatever the pipeline prints (training's per-epoch lines, progress) stays off stdout with --json."""
    import hwslim.pipeline.demo
    from hwslim.pipeline.demo import DemoResult

    seen = {}

    def fake_run_demo(opts, log=print):
        seen["progress"] = opts.progress
        print('{"epoch": 1}')  # as training printed its per-epoch rows
        log("[1/5] training ...")
        return DemoResult(tmp_path, [{"budget_ms": 1.0}], tmp_path / "p.png", tmp_path / "c.pt", tmp_path / "t.csv",
                          {"total": 1.0})

    monkeypatch.setattr(hwslim.pipeline.demo, "run_demo", fake_run_demo)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["rows"] == [{"budget_ms": 1.0}] and cap.out.count("\n") == 1
    assert "[1/5]" in cap.err and '{"epoch": 1}' in cap.err
    assert seen["progress"] is False


def test_help_states_a_measured_duration(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "5 minutes" not in text and "about a minute" not in text and "well under a minute" not in text
    assert "452 s measured on a 2-core machine at load 7 to 8" in text and "mean nothing" in text


def test_accuracy_latency_plot_keeps_search_and_heldout_apart_labels_budgets_and_marks_over(tmp_path):
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import pandas as pd

    from hwslim.pipeline.demo import accuracy_latency_figure, plot_accuracy_latency

    path = pd.DataFrame({"latency_ms": [0.20, 0.17, 0.14, 0.12], "acc": [0.80, 0.79, 0.76, 0.70]})
    uniform = [{"latency_ms": 0.05 + 0.015 * i, "acc": 0.3 + 0.04 * i} for i in range(12)]
    result = SimpleNamespace(path=path, uniform=uniform)
    rows = [{"budget_ms": 0.17, "predicted_ms": 0.168, "measured_ms": 0.171, "verdict": "OK", "accuracy_%": 77.0,
             "search_acc_%": 79.0},
            {"budget_ms": 0.14, "predicted_ms": 0.139, "measured_ms": 0.152, "verdict": "OVER", "accuracy_%": 74.0,
             "search_acc_%": 76.0}]
    fig = accuracy_latency_figure(result, rows, [0.17, 0.14])
    search, deployed = fig.axes
    assert "predicted" in search.get_xlabel() and "search-split" in search.get_ylabel()
    assert "measured" in deployed.get_xlabel() and "held-out" in deployed.get_ylabel()
    assert [t.get_text() for t in search.get_legend().get_texts()] == ["greedy path", "uniform widths",
                                                                       "chosen configs", "latency budgets"]
    assert [t.get_text() for t in deployed.get_legend().get_texts()] == ["exported: within budget",
                                                                         "exported: OVER budget", "latency budgets"]
    # each exported point names its budget; the budget lines are labelled too
    assert {t.get_text() for t in deployed.texts} == {"0.17 ms budget", "0.14 ms budget, OVER", "0.17 ms", "0.14 ms"}
    plt.close(fig)
    # the legend lists only the verdicts shown
    unsure = [{**r, "verdict": "UNRELIABLE"} for r in rows]
    fig = accuracy_latency_figure(result, unsure, [0.17, 0.14])
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == [
        "exported: unreliable, conditions differ from the table's", "latency budgets"]
    plt.close(fig)
    png = plot_accuracy_latency(result, rows, [0.17, 0.14], tmp_path / "a.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
