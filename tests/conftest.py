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


def randomize_batchnorm_stats(model: torch.nn.Module, mean: float = 0.5, var: tuple[float, float] = (0.5, 2.0),
                              bias: float = 0.2) -> torch.nn.Module:
    """Give every BatchNorm2d of ``model`` random statistics and affine parameters (drawn from
    the global RNG, in place), so that BN folding, slicing and weight copies are exercised: a
    fresh BN is the identity and would hide them. Returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-mean, mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-bias, bias)
    return model


@pytest.fixture(name="randomize_batchnorm_stats")
def _randomize_batchnorm_stats_fixture():
    """:func:`randomize_batchnorm_stats` for a test (``randomize_batchnorm_stats(model, mean=0.2, var=(0.5, 1.5))``)."""
    return randomize_batchnorm_stats


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
