"""Shared test fixtures and markers (gpu / tensorrt skip with a reason when absent)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before
# Triton is first imported; other tests (torch.fx, FlopCounterMode) may import it, so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    no_trt = pytest.mark.skip(reason="needs the TensorRT Python package (pip install 'hwslim[tensorrt]')")
    has_gpu = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(no_trt)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a shared 2-core box, two OpenMP threads per op wait on each other (15x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_table():
    """``make_table(net, path, **meta)``: a complete latency table for every shape ``net``'s grids can
    produce, stamped as measured on this machine (``meta`` overrides, e.g. another ``device_name``).

    Each entry's median is ``1e-3 + 1e-8 * MACs`` ms, so narrower configs predict faster; no timing.
    """
    from hwslim.core.costs import macs
    from hwslim.latency.table import LatencyTable, new_meta
    from hwslim.latency.entries import enumerate_entries
    from profilers import get_profiler
    from profilers.base import Timing

    with get_profiler("cpu", "ort") as prof:
        machine = prof.metadata()

    def make(net, path, *, batch: int = 1, input_size: int | None = None, **meta):
        size = input_size or net.input_size
        entries = {}
        for s in enumerate_entries(net, batch, size):
            ms = 1e-3 + 1e-8 * macs([s])
            entries[s.signature()] = Timing(ms, 1e-5, 1.1 * ms, 20)
        m = new_meta(machine, model=net.name, width_mult=net.width_mult, input_size=size, batch=batch,
                     entries_expected=len(entries), method="in_network")
        m.update(status="complete", calibration={"a": 1.0, "b": 0.0, "n_fit": 8, "holdout": {}}, **meta)
        return LatencyTable(m, entries).save(path)

    return make


@pytest.fixture(scope="session")
def export_setup():
    """``export_setup(folder, budget_ms, config=None, **model_kwargs)``: a resnet20 supernet with
    non-trivial BN statistics (so folding them matters) saved as ``folder/ck.pt`` (no data
    recorded), and a config of it with a latency budget saved as ``folder/cfg.json``:
    non-uniform (unit i at grid step i) unless ``config(net)`` gives one.

    Returns ``(net, checkpoint path, config, config path)``.
    """
    from hwslim.importing.checkpoint import save_checkpoint
    from hwslim.models import create_model

    def make(folder, budget_ms: float, config=None, **model_kwargs):
        torch.manual_seed(0)
        net = create_model("resnet20", **model_kwargs)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        ckpt = save_checkpoint(folder / "ck.pt", net)
        if config is None:
            cfg = net.config_of({u: unit.grid[i % len(unit.grid)] for i, (u, unit) in enumerate(net.units.items())})
        else:
            cfg = config(net)
        cfg = cfg.with_meta(budget={"kind": "latency_ms", "value": budget_ms})
        return net, ckpt, cfg, cfg.save(folder / "cfg.json")

    return make


@pytest.fixture
def refused_without_extra(tmp_path, capsys):
    """``refused_without_extra(name, checkpoint, config_path, out_name)``, with package ``name`` made
    unimportable: ``hwslim profile --backend NAME`` and ``hwslim export --format NAME`` each exit 2
    with one line naming the extra to install, and nothing is written into ``tmp_path``."""
    from hwslim.cli import main

    def check(name: str, ckpt, cfg_path, out_name: str) -> None:
        hint = f"pip install 'hwslim[{name}]'"
        for argv in (["profile", "--backend", name, "--model", "resnet20", "--width-mult", "0.5", "--input-size",
                      "8", "--quick", "--out", str(tmp_path / "t.csv")],
                     ["export", "--checkpoint", str(ckpt), "--config", str(cfg_path), "--format", name,
                      "--out", str(tmp_path / out_name)]):
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and hint in err, err
        assert list(tmp_path.iterdir()) == []

    return check
