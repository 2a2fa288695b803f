"""Every committed latency table and trained asset still loads and gives the numbers it gave.

The values were recorded with the code before the package was regrouped by stage
(commit a819b84): table size, predicted full-width and uniform 6/12 latency; an asset's
logits at uniform 6/12 on a fixed input. A change to the code that reads these files, or
to the graph they rebuild, shows here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwslim.importing.checkpoint import load_checkpoint
from hwslim.importing.specs import load_model
from hwslim.latency.table import LatencyTable

ROOT = Path(__file__).resolve().parent.parent

# table metadata -> (entries, predicted ms at the full config, at uniform 6/12)
TABLES = {
    "latency_tables/cpu-amd-epyc/mobilenet_v2-x1.5-224px-b1-executorch-t1-float32.json": (2032, 14.86327, 4.74623),
    "latency_tables/cpu-amd-epyc/mobilenet_v2-x1.5-224px-b1-openvino-t1-float32.json": (2032, 15.119989, 4.850481),
    "latency_tables/cpu-amd-epyc/mobilenet_v2-x1.5-224px-b1-ort-t1-float32.json": (2032, 15.644937, 5.181995),
    "latency_tables/cpu-amd-epyc/mobilenet_v2_cifar-x1-32px-b1-ort-t1-float32.json": (1682, 2.009607, 0.650466),
    "latency_tables/cpu-amd-epyc/mobilenet_v3_large-x1-224px-b1-ort-t1-float32.json": (2483, 5.951571, 2.244872),
    "latency_tables/cpu-amd-epyc/resnet20-x1-32px-b1-ort-t1-float32.json": (266, 0.72159, 0.295354),
    "latency_tables/cpu-amd-epyc/resnet20-x1-32px-b8-ort-t1-float32.json": (266, 5.683448, 2.270136),
    "latency_tables/cpu-intel-r-xeon-r-processor/mobilenet_v2-x1.5-224px-b1-executorch-t1-float32.json": (2032, 13.778463, 4.653224),
    "latency_tables/cpu-intel-r-xeon-r-processor/mobilenet_v3_small-x1-224px-b1-executorch-t1-float32.json": (1527, 2.085783, 1.047637),
    "latency_tables/cuda-nvidia-h200/resnet20-x1-32px-b1-torch_cuda-t1-float32.json": (266, 0.249163, 0.215343),
}
# asset -> (model, sum of logits, sum of |logits|) at uniform 6/12, 4 images of torch.manual_seed(0)
ASSETS = {
    "benchmarks/assets/cifar10_mobilenet_v2_cifar_x1.pt": ("mobilenet_v2_cifar", -0.0702, 24.3268),
    "benchmarks/assets/cifar10_resnet20_x1.pt": ("resnet20", -0.0574, 54.9311),
}


def test_every_committed_table_and_asset_is_listed():
    assert sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("latency_tables/*/*.json")) == sorted(TABLES)
    assert sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("benchmarks/assets/*.pt")) == sorted(ASSETS)


@pytest.mark.parametrize("meta", sorted(TABLES))
def test_committed_table_predicts_as_before(meta):
    entries, full_ms, uniform_ms = TABLES[meta]
    table = LatencyTable.load(ROOT / meta.replace(".json", ".csv"))
    m = table.meta
    net = load_model(m["model"], width_mult=m["width_mult"], input_size=m["input_size"])
    at = lambda cfg: table.predict_ms(net.layer_specs(cfg, batch=m["batch"], input_size=m["input_size"]))  # noqa: E731
    assert len(table) == entries
    assert at(net.full_config()) == pytest.approx(full_ms, abs=2e-6)
    assert at(net.uniform_config(6)) == pytest.approx(uniform_ms, abs=2e-6)


@pytest.mark.parametrize("asset", sorted(ASSETS))
def test_committed_asset_computes_as_before(asset):
    name, total, magnitude = ASSETS[asset]
    net = load_checkpoint(ROOT / asset).model.eval()
    assert net.name == name
    torch.manual_seed(0)
    x = torch.randn(4, 3, net.input_size, net.input_size)
    with torch.no_grad(), net.using(net.uniform_config(6)):
        y = net(x).double()
    assert float(y.sum()) == pytest.approx(total, abs=1e-3)
    assert float(y.abs().sum()) == pytest.approx(magnitude, rel=1e-5)
