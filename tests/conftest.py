"""Shared test fixtures and markers (gpu / tensorrt skip with a reason when absent)."""
from __future__ import annotations

import importlib.util

import pytest
import torch


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
