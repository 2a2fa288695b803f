"""hwslim finetune: one searched config trained as a network of its own, saved as a supernet checkpoint."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from hwslim.cli import main
from hwslim.core.config import ChannelConfig
from hwslim.core.materialize import slice_positions
from hwslim.importing.checkpoint import load_checkpoint
from hwslim.models import create_model
from hwslim.training.finetune import FinetuneConfig, finetune
from hwslim.training.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    """A tiny trained supernet (8x8 inputs, 256 training images) and a narrow config of it with a budget."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("supernet")
    net = train(TrainConfig(model="resnet20", data="synthetic:300", width_mult=0.5, input_size=8, batch_size=32,
                            search_size=44, synthetic_val=64, calib_images=64, progress=False, epochs=2,
                            out=str(d / "run")), log=lambda s: None).model
    widths = dict(net.uniform_config(4).widths)
    widths[next(iter(widths))] = net.units[next(iter(widths))].grid[-1]  # not uniform: one unit wide
    config = net.config_of(widths, budget={"kind": "latency_ms", "value": 0.5})
    config.save(d / "config.json")
    return d / "run" / "checkpoint.pt", d / "config.json"


def _cfg(supernet, out, **kw) -> FinetuneConfig:
    ckpt, config = supernet
    return FinetuneConfig(checkpoint=str(ckpt), config=str(config), out=str(out),
                          **{"epochs": 1, "batch_size": 32, "calib_images": 64, "progress": False, **kw})


def _inside(net, config) -> dict[str, torch.Tensor]:
    """Per state-dict key, a mask of the elements the config uses."""
    masks = {k: torch.zeros(v.numel(), dtype=torch.bool) for k, v in net.state_dict().items()}
    for src, pos in slice_positions(net, config).values():
        masks[src][pos.view(-1)] = True
    return masks


def test_finetune_changes_only_the_configs_slices_and_records_where_it_came_from(supernet, tmp_path):
    ckpt_path, config_path = supernet
    before = load_checkpoint(ckpt_path)
    result = finetune(_cfg(supernet, tmp_path / "ft", lr=0.05), log=lambda s: None)
    after = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    config = before.model.validate(ChannelConfig.load(config_path))
    masks = _inside(before.model, config)
    old, new = before.model.state_dict(), after.model.state_dict()
    changed = 0
    for k, mask in masks.items():
        if not old[k].is_floating_point():
            continue
        diff = (old[k] != new[k]).view(-1)
        assert not diff[~mask].any(), f"{k}: an element outside the config changed"
        changed += int(diff[mask].sum())
    assert changed > 1000
    rec = after.train_args["finetune"]
    assert rec["config"] == config.to_dict() and rec["supernet"] == str(ckpt_path.resolve())
    assert rec["budget"] == {"kind": "latency_ms", "value": 0.5} and rec["epochs"] == 1
    assert rec["teacher"] == "the supernet's widest config" and rec["from_scratch"] is False
    from hwslim.runtimes.onnx_file import sha256_file

    assert rec["supernet_sha256"] == sha256_file(ckpt_path)
    assert after.data["search_indices"] == before.data["search_indices"]
    assert [r["config"] for r in result.final] == ["supernet (shared weights)", "finetuned"]


def test_the_checkpoint_exports_with_parity_and_eval_and_cost_take_it(supernet, tmp_path, capsys):
    _, config = supernet
    finetune(_cfg(supernet, tmp_path / "ft", lr=0.05), log=lambda s: None)
    ckpt = tmp_path / "ft" / "checkpoint.pt"
    onnx = tmp_path / "ft.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(onnx)]) == 0
    assert "max relative error" in capsys.readouterr().out  # the ONNX parity check ran and passed
    assert main(["eval", "--checkpoint", str(ckpt), "--config", str(config), "--json"]) == 0
    at_config = json.loads(capsys.readouterr().out)["results"][0]["top1"]
    assert main(["eval", str(onnx), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)["results"][0]["top1"]
    assert exported == at_config
    assert main(["cost", "--model", str(ckpt), "--config", str(config)]) == 0
    # without --config, export takes the config the finetuned checkpoint records: the same model
    again = tmp_path / "ft_default.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(again)]) == 0
    capsys.readouterr()
    assert main(["eval", str(again), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["top1"] == exported


def test_a_supernet_without_config_is_refused_in_one_line(supernet, tmp_path, capsys):
    ckpt, _ = supernet
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a supernet: give --config" in err[0]
    assert not out.exists()


def _kill_9_after_the_first_epoch(args: list[str], metrics) -> None:
    """Run ``hwslim ARGS`` in a process and SIGKILL it once ``metrics`` holds an epoch's row."""
    code = f"import sys; from hwslim.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.time()
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() - started < 120, "no epoch finished before the kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_resume_after_kill_9_gives_the_uninterrupted_weights(supernet, tmp_path):
    ckpt, config = supernet
    run = tmp_path / "killed"
    args = ["finetune", "--checkpoint", str(ckpt), "--config", str(config), "--epochs", "3", "--batch-size", "16",
            "--calib-images", "64", "--no-progress", "--out", str(run)]
    _kill_9_after_the_first_epoch(args, run / "metrics.jsonl")
    assert load_checkpoint(run / "checkpoint.pt").epoch < 3
    assert main([*args, "--resume"]) == 0
    straight = finetune(_cfg(supernet, tmp_path / "straight", epochs=3, batch_size=16), log=lambda s: None)
    resumed = load_checkpoint(run / "checkpoint.pt").model.state_dict()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed[k]), k


TEACHER = '''
from torch import nn


def classes7():  # another task: 7 classes
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


def fixed32():  # runs at 32x32 inputs only
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))


def good():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
'''


@pytest.fixture
def teachers(tmp_path, monkeypatch):
    (tmp_path / "ft_teachers.py").write_text(TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path))


def _bad_config(tmp_path, supernet, kind: str) -> str:
    ckpt, config = supernet
    if kind == "missing":
        return str(tmp_path / "nope.json")
    if kind == "other model":
        other = create_model("mobilenet_v2_cifar", width_mult=0.35, input_size=8).min_config()
        return str(other.save(tmp_path / "other.json"))
    data = json.loads(config.read_text())
    unit = sorted(data["widths"])[0]
    data["widths"][unit] += 1  # off the grid
    (tmp_path / "off.json").write_text(json.dumps(data))
    return str(tmp_path / "off.json")


@pytest.mark.parametrize("bad", ["missing", "other model", "off grid", "teacher classes", "teacher size"])
def test_bad_inputs_are_one_line_exit_2_and_touch_nothing(supernet, tmp_path, capsys, teachers, bad):
    ckpt, config = supernet
    cfg_path = _bad_config(tmp_path, supernet, bad) if bad in ("missing", "other model", "off grid") else str(config)
    extra = {"teacher classes": ["--teacher", "ft_teachers:classes7"],
             "teacher size": ["--teacher", "ft_teachers:fixed32"]}.get(bad, [])
    before = ckpt.read_bytes()
    out = tmp_path / "run"
    code = main(["finetune", "--checkpoint", str(ckpt), "--config", cfg_path, "--epochs", "1", "--out", str(out),
                 "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    want = {"missing": "not found", "other model": "mobilenet_v2_cifar", "off grid": "not on its grid",
            "teacher classes": "(1, 7)", "teacher size": "cannot run at the student's 8x8 px inputs"}[bad]
    assert want in err, err
    assert not out.exists() and ckpt.read_bytes() == before


def test_from_scratch_no_distill_and_a_model_teacher_run(supernet, tmp_path, teachers):
    ckpt, config = supernet
    supernet_net = load_checkpoint(ckpt).model
    scratch = finetune(_cfg(supernet, tmp_path / "scratch", from_scratch=True), log=lambda s: None)
    rec = load_checkpoint(tmp_path / "scratch" / "checkpoint.pt").train_args
    assert rec["finetune"]["from_scratch"] is True and rec["lr"] == pytest.approx(0.025)  # 0.1 x 32 / 128
    w = "layers.stem.conv.weight"
    assert not torch.allclose(scratch.model.state_dict()[w], supernet_net.state_dict()[w])
    labels = finetune(_cfg(supernet, tmp_path / "labels", distill=False), log=lambda s: None)
    assert load_checkpoint(tmp_path / "labels" / "checkpoint.pt").train_args["finetune"]["teacher"] is None
    assert labels.final and scratch.final
    finetune(_cfg(supernet, tmp_path / "model", teacher="ft_teachers:good"), log=lambda s: None)
    assert load_checkpoint(tmp_path / "model" / "checkpoint.pt").train_args["finetune"]["teacher"] == \
        "ft_teachers:good"


def test_a_supernet_teacher_teaches_with_its_widest_configs_own_bn_statistics(supernet, tmp_path, monkeypatch):
    """The supernet's running statistics are shared by every config it trained: the widest teacher's
    are re-estimated on training images before it teaches (a weak supernet's shared ones made the
    README workflow's finetune collapse to chance)."""
    from hwslim.core.accuracy import batches
    from hwslim.core.slimmable import recalibrate_bn
    from hwslim.training import finetune as ft

    monkeypatch.setattr(ft._Finetune, "run", lambda self: self)  # the run as set up, before its first step
    run = finetune(_cfg(supernet, tmp_path / "t"), log=lambda s: None)
    shared = load_checkpoint(supernet[0]).model
    expected = load_checkpoint(supernet[0]).model
    expected.set_config(expected.full_config())
    recalibrate_bn(expected, batches(run.data.calibration_images(64, run.cfg.seed), 128))
    bn = lambda net: [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]  # noqa: E731
    for got, want, old in zip(bn(run.teacher), bn(expected), bn(shared)):
        torch.testing.assert_close(got.running_var, want.running_var)
        torch.testing.assert_close(got.running_mean, want.running_mean)
    assert not torch.equal(bn(run.teacher)[0].running_var, bn(shared)[0].running_var)
    assert not run.teacher.training


def test_search_finetune_epochs_chains_finetune_per_config_and_resumes_without_redoing(supernet, tmp_path, capsys):
    from hwslim.search.greedy import config_costs

    ckpt, _ = supernet
    net = load_checkpoint(ckpt).model
    full = config_costs(net, net.full_config())["params_m"]
    out = tmp_path / "search"
    args = ["search", "--checkpoint", str(ckpt), "--params-m", f"{0.8 * full:.5f}", f"{0.5 * full:.5f}",
            "--out", str(out), "--no-progress", "--finetune-epochs", "1", "--json"]
    assert main(args) == 0
    picked = json.loads(capsys.readouterr().out)
    assert len(picked) == 2
    for p in picked:
        run = p["finetuned"]
        saved = load_checkpoint(run["checkpoint"])
        # each run finetuned its own config, recorded as `hwslim finetune` records it
        assert saved.train_args["finetune"]["config"]["widths"] == p["widths"]
        assert saved.train_args["finetune"]["teacher"] == "the supernet's widest config"
        assert 0.0 <= run["finetuned_top1"] <= 100.0 and 0.0 <= run["before_top1"] <= 100.0
    first = {p["finetuned"]["checkpoint"]: Path(p["finetuned"]["checkpoint"]).stat().st_mtime_ns
             for p in picked}
    # again without --resume or --force: refused in one line before any search, the runs untouched
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finetuned run; pass --resume" in err[0]
    # --resume: the finished runs are kept, not trained again
    assert main(args + ["--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [p["finetuned"] for p in again] == [p["finetuned"] for p in picked]
    assert {k: Path(k).stat().st_mtime_ns for k in first} == first
    # a run of another config (the search picked again) is refused, not reported as this config's
    results = Path(picked[0]["finetuned"]["checkpoint"]).parent / "results.json"
    doc = json.loads(results.read_text())
    doc["finetune"]["config"]["widths"] = {k: 8 for k in doc["finetune"]["config"]["widths"]}
    results.write_text(json.dumps(doc))
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (the search's own lines come first: which config it picks is known only after it)
    assert "holds a finetuned run of another config" in err[-1] and "--force" in err[-1]
    assert not any("Traceback" in line for line in err)
