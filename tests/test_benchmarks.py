"""The benchmark scripts' own logic (their measurements are run by hand on a quiet machine)."""
from __future__ import annotations

from benchmarks.lut_accuracy import MODELS, result_name


def test_lut_accuracy_result_names_keep_runs_apart():
    default = list(MODELS)
    assert result_name("cpu", "ort", 1, 1, "float32", default) == "lut_accuracy_cpu_ort_b1_quiet"  # the published file
    assert result_name("cpu", "ort", 1, 1, "float32", default[::-1]) == "lut_accuracy_cpu_ort_b1_quiet"
    assert result_name("cpu", "ort", 1, 1, "float32", default, "busy") == "lut_accuracy_cpu_ort_b1_busy"
    # a subset never overwrites the default set's file; backend, threads, batch, dtype all named
    assert result_name("cpu", "ort", 1, 1, "float32", ["mobilenet_v2"]) == "lut_accuracy_cpu_ort_b1_mobilenet_v2_quiet"
    assert result_name("cpu", "openvino", 1, 1, "float32", ["mobilenet_v2"]) == \
        "lut_accuracy_cpu_openvino_b1_mobilenet_v2_quiet"
    assert result_name("cpu", "ort", 8, 2, "float32", default) == "lut_accuracy_cpu_ort_b8_t2_quiet"
    assert result_name("cpu", "openvino", 1, 1, "bfloat16", ["resnet20"]) == \
        "lut_accuracy_cpu_openvino_b1_bfloat16_resnet20_quiet"


def test_cross_runtime_budgets_are_feasible_and_binding_on_every_runtime():
    import pytest

    from benchmarks.cross_runtime import common_budgets

    ranges = {"ort": (0.24, 0.77), "openvino": (0.31, 0.81)}  # (narrowest, full) predicted ms
    assert common_budgets(ranges, [0.0, 0.5, 1.0]) == [0.31, 0.54, 0.77]
    with pytest.raises(SystemExit, match="no latency is feasible"):
        common_budgets({"a": (0.1, 0.2), "b": (0.3, 0.4)}, [0.5])


def test_cross_runtime_runs_end_to_end_as_a_smoke_run():
    """``--quick``: both runtimes' tables, both searches and every measurement, nothing written.
    (A changed search signature broke the script once without any test noticing.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("openvino")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cross_runtime.py"), "--quick", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "configs over budget on a runtime they were not searched for:" in proc.stdout


def test_peers_runs_end_to_end_as_a_smoke_run(tmp_path):
    """``benchmarks/peers.py --quick``: every method picked, finetuned and scored at one budget, nothing
    written. Needs the peers (``pip install 'hwslim[peers]'``) and the shared CIFAR-10 copy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from benchmarks.peers import DATA, peers_missing

    if peers_missing():
        pytest.skip(peers_missing())
    if not DATA.is_dir():
        pytest.skip(f"no CIFAR-10 ImageFolder tree at {DATA} (benchmarks only)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "peers.py"), "--quick", "--no-write",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("hwslim", "torch-pruning", "uniform", "full"):
        assert f" {method} " in proc.stdout


def test_shapes_det_is_deterministic_and_its_boxes_are_the_drawn_extents():
    from benchmarks.shapes_det import make_split

    images, targets = make_split(6, size=96, seed=3, split="val")
    again, targets2 = make_split(6, size=96, seed=3, split="val")
    assert images.dtype == again.dtype == __import__("torch").uint8 and images.shape == (6, 3, 96, 96)
    assert bool((images == again).all()) and all(bool((a["boxes"] == b["boxes"]).all()) for a, b in zip(targets, targets2))
    assert not bool((make_split(6, size=96, seed=3, split="train")[0] == images).all())  # splits differ
    for t in targets:
        b = t["boxes"]
        assert 1 <= len(b) <= 4 and bool((b[:, :2] >= 0).all() and (b[:, 2:] <= 96).all() and (b[:, 2:] > b[:, :2]).all())
        assert bool(((t["labels"] >= 0) & (t["labels"] < 4)).all())


def test_yolo_proof_decodes_raw_maps_as_ultralytics_does_and_runs_as_a_smoke_run(tmp_path):
    """The raw maps of the imported YOLOv8n, put in Detect's training format, decode to exactly
    Ultralytics' own eval output; ``benchmarks/yolo_proof.py --quick`` runs end to end (train,
    table, search, measure, export with parity), nothing written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import torch

    from benchmarks.yolo_proof import YoloTask, build_yolo, head_dict, missing

    if missing():
        pytest.skip(missing())
    import hwslim

    model = build_yolo(4, 0).eval()
    task = YoloTask(model)
    net = hwslim.import_model(model, torch.randn(1, 3, 64, 64), outputs="raw")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)[0]  # (2, 4 + 4 classes, anchors): decoded xywh boxes and class probabilities
        got = task.detect._inference(head_dict(net(x), task.reg_max, task.nc))
    assert got.shape == want.shape == (2, 8, 84) and torch.allclose(got, want, atol=1e-4)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "yolo_proof.py"), "--quick", "--work",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    hw = next(line.split() for line in lines if line.split()[:1] == ["hwslim"])
    assert float(hw[-1]) < 1e-4  # the exported ONNX model's outputs match PyTorch's
    assert "wrote" not in proc.stdout
