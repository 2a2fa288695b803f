"""Issue 30's classes that need real processes: one run per output at a time (two processes),
signals (SIGTERM like Ctrl-C), leftovers of killed writes, and a working directory that
must not hijack imports. Every refused run is checked the bad-input way: one line, exit
2, and every file hashed before and after.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hwslim.cli import main
from hwslim.core import jsonio
from hwslim.core.outputs import (OutputBusyError, describe_os_error, owned, remove_stale_temporaries,
                                 temporary_path)
from hwslim.importing.checkpoint import save_checkpoint
from hwslim.importing.data import synthetic_data_info
from hwslim.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
MODEL = ["--model", "resnet20", "--width-mult", "0.25", "--input-size", "8"]
TRAIN = ["train", *MODEL, "--data", "synthetic:200", "--batch-size", "32", "--no-progress"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _hwslim(argv, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hwslim", *map(str, argv)], cwd=cwd, env=kw.pop("env", ENV),
                          capture_output=True, text=True, timeout=300, **kw)


def _lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("conc")
    torch.manual_seed(0)
    net = create_model("resnet20", width_mult=0.25, input_size=8)
    save_checkpoint(d / "ck.pt", net, data=synthetic_data_info(num_train=100, num_search=32, seed=0, input_size=8,
                                                               num_val=32))
    net.uniform_config(4).save(d / "cfg.json")
    return d


# -- one run per output at a time: a second process is refused, naming the first one's pid ----------
class _Holder:
    """Another process that owns ``path`` (hwslim.core.outputs.owned) until it is stopped."""

    def __init__(self, path: Path) -> None:
        code = ("import sys, time\nfrom hwslim.core.outputs import owned\n"
                f"with owned({str(path)!r}):\n    print('owned', flush=True)\n    time.sleep(120)\n")
        self.p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "owned"

    def stop(self, sig=signal.SIGTERM) -> None:
        self.p.send_signal(sig)
        self.p.wait(timeout=30)


def _second_runs(ck: Path, out: Path):
    return {
        "train": TRAIN + ["--epochs", "1", "--out", out],
        "train --resume": TRAIN + ["--epochs", "1", "--out", out, "--resume"],
        "finetune": ["finetune", "--checkpoint", ck / "ck.pt", "--config", ck / "cfg.json", "--epochs", "1",
                     "--no-progress", "--out", out],
        "search": ["search", "--checkpoint", ck / "ck.pt", "--params-m", "0.015", "--no-progress", "--out", out],
        "export": ["export", "--checkpoint", ck / "ck.pt", "--config", ck / "cfg.json", "--out", out],
        "profile": ["profile", *MODEL, "--quick", "--out", out],
        "profile --recalibrate": ["profile", *MODEL, "--quick", "--out", out, "--recalibrate"],
        "demo": ["demo", "--quick", "--out", out],
    }


@pytest.mark.parametrize("command", ["train", "train --resume", "finetune", "search", "export", "profile",
                                     "profile --recalibrate", "demo"])
def test_a_second_run_on_an_owned_output_is_refused_naming_the_first(ck, tmp_path, capsys, command):
    """The first run is another process; the second runs here (in-process: no interpreter start-up)."""
    out = tmp_path / ("m.onnx" if command == "export" else "t.csv" if command.startswith("profile") else "out")
    holder = _Holder(out)
    try:
        before = _snapshot(tmp_path)
        capsys.readouterr()
        code = main([str(a) for a in _second_runs(ck, out)[command]])
        after = _snapshot(tmp_path)
    finally:
        holder.stop()
    err = capsys.readouterr().err
    lines = _lines(err)
    assert code == 2, err
    assert len(lines) == 1 and f"pid {holder.p.pid}" in lines[0] and "Traceback" not in err, err
    assert after == before, "the refused run touched files"


def test_two_exports_at_once_one_wins_and_the_file_is_whole(ck, tmp_path):
    out = tmp_path / "m.onnx"
    argv = ["export", "--checkpoint", ck / "ck.pt", "--config", ck / "cfg.json", "--out", out, "--check-images", "2",
            "--calib-images", "0"]
    procs = [subprocess.Popen([sys.executable, "-m", "hwslim", *map(str, argv)], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 2], [0, 0]) and codes.count(0) >= 1, results
    for code, err in results:  # the loser is refused by the lock, or (came later) by the file the winner wrote
        if code == 2:
            assert ("being written by another hwslim run" in err or "exists; pass --force" in err), err
    import onnx

    onnx.checker.check_model(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"


def test_a_lock_is_released_when_its_owner_is_killed(tmp_path):
    holder = _Holder(tmp_path / "out")
    with pytest.raises(OutputBusyError, match=f"pid {holder.p.pid}"):
        with owned(tmp_path / "out"):
            pass
    holder.stop(signal.SIGKILL)
    with owned(tmp_path / "out"):  # the kernel released the lock with the process
        with owned(tmp_path / "out"):  # re-entrant within a process
            pass


def test_a_lock_writes_nothing_beside_the_output(tmp_path):
    before = _snapshot(tmp_path)
    with owned(tmp_path / "out"):
        assert _snapshot(tmp_path) == before


# -- signals: SIGTERM is handled like Ctrl-C: one line, exit 143, the last good state kept -------
@pytest.mark.parametrize("delay", [0.8])
def test_sigterm_during_start_up_is_one_line_and_143(tmp_path, delay):
    p = subprocess.Popen([sys.executable, "-m", "hwslim", "cost", "--model", "resnet20"], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip(f"the command finished within {delay} s")
    assert p.returncode == 143, err
    assert _lines(err) == ["hwslim cost: terminated (SIGTERM)"], err


def test_sigterm_during_training_keeps_the_last_epoch_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    argv = TRAIN + ["--epochs", "12", "--out", out]
    p = subprocess.Popen([sys.executable, "-m", "hwslim", *map(str, argv)], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert _lines(err)[-1] == "hwslim train: terminated (SIGTERM)" and "Traceback" not in err, err
    assert not [x for x in out.iterdir() if x.name.startswith(".")], "temporaries left behind"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= saved < 12
    assert main([str(a) for a in TRAIN + ["--epochs", str(saved + 1), "--out", out, "--resume"]]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == saved + 1


def test_a_nan_loss_stops_training_with_one_line(tmp_path, capsys):
    code = main([str(a) for a in TRAIN + ["--epochs", "2", "--lr", "1e30", "--out", tmp_path / "run"]])
    err = capsys.readouterr().err
    assert code == 2, err
    last = _lines(err)[-1]
    assert "training loss became nan" in last and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists() or "keeps the last good epoch" in last


# -- leftovers of killed writes ----------------------------------------------------------------
def test_an_export_removes_stale_temporaries_of_killed_exports(ck, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".m.onnx.export{pid}.onnx", tmp_path / f".m.onnx.tmp{pid}"]
    for s in stale:
        s.write_bytes(b"half an ONNX file")
    assert main(["export", "--checkpoint", str(ck / "ck.pt"), "--config", str(ck / "cfg.json"), "--out",
                 str(tmp_path / "m.onnx"), "--check-images", "2", "--calib-images", "0"]) == 0
    assert not any(s.exists() for s in stale)


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("openvino", ".xml"), ("torch", ".pt2")])
def test_a_legal_250_byte_output_name_is_written(ck, tmp_path, fmt, suffix):
    if fmt == "openvino":
        pytest.importorskip("openvino")
    name = "m" * 245 + suffix
    assert main(["export", "--checkpoint", str(ck / "ck.pt"), "--config", str(ck / "cfg.json"), "--out",
                 str(tmp_path / name), "--format", fmt, "--check-images", "2", "--calib-images", "0"]) == 0
    assert (tmp_path / name).is_file()
    assert len(temporary_path(tmp_path / name, "export", suffix).name) < 255
    assert remove_stale_temporaries(tmp_path) == []


def test_temporaries_of_long_names_are_short_and_recognised_as_stale(tmp_path):
    tmp = temporary_path(tmp_path / ("x" * 250))
    assert len(tmp.name) < 64 and tmp.parent == tmp_path
    e = OSError(errno.EISDIR, "Is a directory", str(tmp_path / f".ck.pt.tmp{os.getpid()}"),
                None, str(tmp_path / "ck.pt"))
    assert str(tmp_path / "ck.pt") in describe_os_error(e) and ".tmp" not in describe_os_error(e)
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / f".ck.pt.tmp{os.getpid()}"))
    assert describe_os_error(e).startswith(f"No space left on device: {tmp_path / 'ck.pt'}")


# -- the working directory never hijacks imports ------------------------------------------------
HIJACK = "open({marker!r}, 'w').write('executed')\nraise SystemExit(0)\n"


@pytest.mark.parametrize("pythonpath_tail", ["", os.pathsep])  # an empty $PYTHONPATH entry means the cwd too
def test_modules_in_the_working_directory_never_shadow_packages(ck, tmp_path, pythonpath_tail):
    marker = tmp_path / "EXECUTED"
    for name in ("onnxruntime", "numpy", "torch", "onnx", "tqdm"):
        (tmp_path / f"{name}.py").write_text(HIJACK.format(marker=str(marker)))
    env = {**ENV, "PYTHONPATH": ENV["PYTHONPATH"] + pythonpath_tail}
    r = _hwslim(["export", "--checkpoint", ck / "ck.pt", "--config", ck / "cfg.json", "--out", tmp_path / "m.onnx",
                 "--check-images", "2", "--calib-images", "0"], tmp_path, env=env)  # imports all of them, runs ORT
    assert not marker.exists(), "a module in the working directory was executed"
    assert r.returncode == 0, r.stderr


def test_table_dir_from_the_environment_that_loops_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.setenv("HWSLIM_TABLE_DIR", str(tmp_path / "a"))
    before = _snapshot(tmp_path)
    code = main(["profile", *MODEL, "--quick"])
    err = capsys.readouterr().err
    assert code == 2 and _lines(err)[-1] == (
        f"hwslim profile: error: $HWSLIM_TABLE_DIR {tmp_path / 'a'} is a symlink loop; give a directory"), err
    assert _snapshot(tmp_path) == before


def test_a_model_file_in_the_working_directory_still_imports_and_leaves_sys_path_alone(tmp_path, monkeypatch):
    from hwslim.importing.specs import import_user_module

    (tmp_path / "my_cnn_for_test.py").write_text("VALUE = 42\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert import_user_module("my_cnn_for_test").VALUE == 42
    assert sys.path == before
    assert import_user_module("json") is json  # found where it is installed, the cwd not consulted


# -- the JSON reader and the verdict line --------------------------------------------------------
def test_the_json_reader_refuses_deep_nesting_and_reads_brackets_in_strings():
    assert jsonio.loads('{"a": "[[[[{{{{", "b": [[1]]}') == {"a": "[[[[{{{{", "b": [[1]]}
    assert jsonio.nesting('{"a": [[1]], "s": "]]]]"}') == 3
    with pytest.raises(ValueError, match="nested more than"):
        jsonio.loads("[" * (jsonio.MAX_DEPTH + 1) + "]" * (jsonio.MAX_DEPTH + 1))


def test_far_over_budget_is_over_even_when_the_conditions_differ():
    from hwslim.core.config import ChannelConfig
    from hwslim.latency.conditions import ConditionCheck
    from hwslim.latency.verify import CLEARLY_OVER, VerifyResult, exit_status

    differ = ConditionCheck(reasons=("the speed probe ran 1.31x slower than when the table was measured",),
                            details=())

    def result(measured):
        return VerifyResult(Path("m.onnx"), Path("t.csv"), ChannelConfig("resnet20", 1.0, 32, {}), "ort", 1, 0.05,
                            measured, 0.0, measured, 10, False, 0.0001, 0.03, differ)

    assert result(0.0479).verdict == "OVER" and exit_status([result(0.0479)]) == 1  # 479x over
    near = result(0.0001 * 1.03 * CLEARLY_OVER * 0.99)
    assert near.verdict == "UNRELIABLE" and exit_status([near]) == 3
