"""Recovery and data-safety cases of issue 15 that need a real run: resume, tampering,
a full disk mid-run (a temporary file linked to /dev/full), leftovers of a kill."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from hwslim.importing.checkpoint import save_checkpoint
from hwslim.cli import main
from hwslim.importing.data import synthetic_data_info
from hwslim.models import create_model
from hwslim.core.outputs import OutputError, check_output, remove_stale_temporaries
from hwslim.training.train import TrainConfig, train

TINY = dict(model="resnet20", data="synthetic:300", width_mult=0.5, input_size=8, batch_size=32, search_size=44,
            synthetic_val=64, calib_images=64, progress=False)
FULL = Path("/dev/full")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("resnet20", width_mult=0.5, input_size=8)
    for m in net.modules():  # widths that matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("ck") / "ck.pt"
    save_checkpoint(path, net, data=synthetic_data_info(num_train=300, num_search=32, seed=0, input_size=8,
                                                        num_val=32))
    return path


def _params_budget(ckpt_path) -> str:
    """A budget a few greedy steps below the full config."""
    from hwslim.importing.checkpoint import load_checkpoint
    from hwslim.core.costs import model_costs

    net = load_checkpoint(ckpt_path).model
    return f"{0.7 * model_costs(net).params / 1e6:.6f}"


def _search(ckpt_path, out, *extra) -> int:
    return main(["search", "--checkpoint", str(ckpt_path), "--params-m", _params_budget(ckpt_path), "--out",
                 str(out), "--no-progress", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def searched(ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    assert _search(ckpt_path, out) == 0
    return out


# -- search ---------------------------------------------------------------------------------
def test_resumed_path_csv_equals_the_uninterrupted_one(ckpt_path, searched, tmp_path):
    """Issue 15.12: the state is saved with sorted keys; a resumed path.csv had its cost columns sorted."""
    state = json.loads((searched / "search_state.json").read_text())
    assert len(state["steps"]) >= 3
    out = tmp_path / "s"
    out.mkdir()
    state["steps"] = state["steps"][:2]  # killed after two steps
    (out / "search_state.json").write_text(json.dumps(state, sort_keys=True))
    assert _search(ckpt_path, out, "--resume") == 0
    straight, resumed = (searched / "path.csv").read_text(), (out / "path.csv").read_text()
    assert resumed.splitlines()[0] == straight.splitlines()[0]
    assert resumed == straight
    assert list(pd.read_csv(out / "path.csv").columns)[:7] == ["step", "unit", "old", "new", "acc", "loss", "binding"]


@pytest.mark.parametrize("tamper,problem", [
    (lambda st: st["steps"][-1]["widths"].update({next(iter(st["steps"][-1]["widths"])): 99999}),
     "not a config of this supernet"),
    (lambda st: st["steps"][1]["costs"].update(params_m=1e-9), "params_m"),
    (lambda st: st["steps"][2].update(step=7), "numbered 7"),
    (lambda st: st["steps"][0].update(widths=st["steps"][-1]["widths"]), "full config"),
    (lambda st: st["steps"][1].update(acc=float("nan")), "acc=nan"),
])
def test_a_tampered_state_is_refused_and_nothing_is_written(ckpt_path, searched, tmp_path, capsys, tamper, problem):
    """Issue 15.3: a width of 99999 was resumed and written out as a config that does not validate."""
    out = tmp_path / "s"
    out.mkdir()
    state = json.loads((searched / "search_state.json").read_text())
    tamper(state)
    (out / "search_state.json").write_text(json.dumps(state))
    before = _digests(out)
    assert _search(ckpt_path, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and "edited or damaged" in err[0]
    assert _digests(out) == before


def test_resume_without_a_state_starts_the_search_and_says_so(ckpt_path, searched, tmp_path, capsys):
    """Issue 15.13."""
    out = tmp_path / "s"
    assert _search(ckpt_path, out, "--resume") == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "path.csv").read_text() == (searched / "path.csv").read_text()


def test_outputs_without_a_state_are_never_overwritten(ckpt_path, tmp_path, capsys):
    """Issue 15.1: path.csv, uniform.csv, search.png and configs were overwritten, exit 0."""
    out = tmp_path / "s"
    out.mkdir()
    for name in ("path.csv", "uniform.csv", "search.png", f"config_params_m_{float(_params_budget(ckpt_path)):g}.json"):
        (out / name).write_text("mine\n")
    before = _digests(out)
    assert _search(ckpt_path, out) == 2
    assert "already holds" in capsys.readouterr().err and _digests(out) == before
    assert _search(ckpt_path, out, "--force") == 0  # --force replaces them
    assert (out / "path.csv").read_text() != "mine\n"


def test_full_disk_while_saving_the_search_state(ckpt_path, searched, tmp_path, capsys, monkeypatch):
    """Issue 15.9: one line, exit 2, the previous state intact and no temporary left behind."""
    out = tmp_path / "s"
    out.mkdir()
    state = json.loads((searched / "search_state.json").read_text())
    state["steps"] = state["steps"][:2]
    (out / "search_state.json").write_text(json.dumps(state, sort_keys=True))
    before = _digests(out)
    (out / f".search_state.json.tmp{os.getpid()}").symlink_to(FULL)  # the next state write hits a full disk
    import hwslim.search.greedy as search_mod

    monkeypatch.setattr(search_mod, "remove_stale_temporaries", lambda folder: [])  # keep the link in place
    assert _search(ckpt_path, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the run had started (its header and what it scores are on stderr): the failure itself is one line
    errors = [line for line in err if "error:" in line]
    assert err[-1] == errors[0] and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert "No space left on device" in errors[0] and "intact" in errors[0], err
    assert _digests(out) == before  # the state of step 2, byte for byte
    assert sorted(p.name for p in out.iterdir()) == ["search_state.json"]  # the temporary is gone


def test_temporaries_of_a_killed_search_are_removed(ckpt_path, searched, tmp_path):
    """Issue 15.9: `.search_state.json.tmp<pid>` left by a kill was never removed."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "search_state.json").write_text((searched / "search_state.json").read_text())
    dead = _dead_pid()
    (out / f".search_state.json.tmp{dead}").write_text("{half")
    assert _search(ckpt_path, out, "--resume") == 0
    assert not list(out.glob(".*"))


# -- train ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(TrainConfig(epochs=2, out=str(out), **TINY), log=lambda s: None)
    return out


def test_resume_to_fewer_epochs_than_done_is_refused(finished_run, capsys):
    """Issue 15.2: results.json was rewritten claiming 1 epoch while the checkpoint holds 2 (3 in the issue)."""
    before = _digests(finished_run)
    code = main(["train", "--model", "resnet20", "--data", "synthetic:300", "--epochs", "1", "--out",
                 str(finished_run), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fewer than the 2 epochs" in err[0]
    assert _digests(finished_run) == before
    assert json.loads((finished_run / "results.json").read_text())["epochs"] == 2


def test_resume_with_no_checkpoint_starts_the_run(tmp_path, capsys):
    """Issue 15.13: a kill before the first checkpoint left --resume answering 'nothing to resume'."""
    out = tmp_path / "r"
    out.mkdir()
    (out / f".checkpoint.pt.tmp{_dead_pid()}").write_bytes(b"")  # the 0-byte temporary a kill leaves
    lines = []
    res = train(TrainConfig(epochs=1, out=str(out), resume=True, **TINY), log=lines.append)
    assert res.epochs == 1 and (out / "checkpoint.pt").is_file()
    assert any("starting the run" in x for x in lines)
    assert not list(out.glob(".*"))


def test_full_disk_while_saving_a_checkpoint(finished_run, tmp_path, capsys, monkeypatch):
    """Issue 15.9: a full disk mid-run is one line; the previous checkpoint stays; no temporary is left."""
    import shutil

    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    before = _digests(out)
    import hwslim.training.train as train_mod

    monkeypatch.setattr(train_mod, "remove_stale_temporaries", lambda folder: [])  # keep the link below in place
    (out / f".checkpoint.pt.tmp{os.getpid()}").symlink_to(FULL)  # the next checkpoint write hits a full disk
    code = main(["train", "--model", "resnet20", "--data", "synthetic:300", "--epochs", "3", "--out", str(out),
                 "--resume", "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cannot write" in err[-1] and "full disk" in err[-1] and "intact" in err[-1]
    assert "Traceback" not in "\n".join(err)
    after = _digests(out)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]
    assert not list(out.glob(".*"))


def test_empty_out_writes_nothing_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """Issue 15.5: --out '' wrote the checkpoint and results into the current directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "resnet20", "--data", "synthetic:300", "--epochs", "1", "--out", "",
                 "--no-progress"]) == 2
    assert "--out is empty" in capsys.readouterr().err and not list(tmp_path.iterdir())
    with pytest.raises(OutputError, match="empty"):
        train(TrainConfig(epochs=1, out="", **TINY))


# -- the output check itself ------------------------------------------------------------------
def test_check_output_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")
    assert check_output(tmp_path / "new" / "deeper", kind="dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created
    for path, kind, match in [(f, "dir", "is a file"), (f / "x", "dir", "which is a file"),
                              (f / "x.onnx", "file", "which is a file"), (tmp_path, "file", "is a directory"),
                              ("", "dir", "empty"), ("a\0b", "file", "NUL")]:
        with pytest.raises(OutputError, match=match):
            check_output(path, kind=kind)
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OutputError, match="full"):
        check_output(tmp_path / "out", kind="dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_output_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output(ro / "run", kind="dir")
    finally:
        ro.chmod(0o755)


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    live = tmp_path / f".t.json.tmp{os.getppid()}"
    dead = tmp_path / f".t.json.tmp{_dead_pid()}"
    mine = tmp_path / "t.json.tmp1"  # not a temporary's name
    for p in (live, dead, mine):
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and mine.exists()


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1
