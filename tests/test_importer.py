"""Importing a user's module: operators, units, weights, parity, and refusals that name the node."""
from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch import nn

from benchmarks.idioms import LinearSE
from hwslim.core.errors import ModelError
from hwslim.importing.fx_trace import ImportRefused, import_model
from hwslim.core.materialize import materialize
from fakes import UserBlocks, check_random_configs, randomize_bn


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class UserNet(UserBlocks):
    """A user's own CNN: stem, a grouped block with SE and a residual, a concat, a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(SE, nn.Hardswish, nn.ReLU6)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomize(module: nn.Module) -> nn.Module:
    return randomize_bn(module)


def _import_torchvision(name: str):
    """A torchvision model with trained-looking BatchNorm, an input batch, and its import (shuffles fixed)."""
    torch.manual_seed(0)
    theirs = _randomize(torchvision.models.get_model(name, weights=None))
    x = torch.randn(2, 3, 64, 64)
    return theirs, x, import_model(theirs, x[:1], fix_unsupported=True)



def _same_function(original: nn.Module, net, x: torch.Tensor, seed: int = 0) -> None:
    """The imported supernet computes what ``original`` computes at full width, and its
    materialized network what the supernet computes at a random config (of ``seed``)."""
    with torch.no_grad():
        want, got = original(x), net(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    cfg = net.random_config(random.Random(seed))
    with torch.no_grad(), net.using(cfg):
        torch.testing.assert_close(materialize(net, cfg).eval()(x), net(x), rtol=1e-5, atol=1e-6)

def test_user_model_imports_with_units_and_parity():
    torch.manual_seed(0)
    user = _randomize(UserNet())
    x = torch.randn(2, 3, 32, 32)
    net = import_model(user, x[:1], name="user_net")
    kinds = [n.op.kind for n in net.nodes]
    assert kinds.count("se") == 1 and "concat" in kinds and kinds.count("conv") == 5
    # the residual ties the stem and the project output; the grouped conv keeps the expand's unit
    assert "stem/0" in net.units and "project/0" not in net.units
    assert net.units["expand/0"].divisor == 8 and net.units["expand/0"].grid == (8, 16, 24, 32)
    assert net.num_classes == 10 and "head" not in net.units  # the classes are never slimmed
    _same_function(user, net, x)


def test_keep_fixes_the_named_modules():
    net = import_model(UserNet(), torch.randn(1, 3, 32, 32), keep=r"^side$")
    assert "side" not in net.units and "stem/0" in net.units


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "googlenet", "alexnet"])
def test_torchvision_models_import_with_parity(name):
    torch.manual_seed(0)
    size = 224 if name != "alexnet" else 224
    theirs = _randomize(torchvision.models.get_model(name, weights=None, **({"init_weights": False}
                                                                             if name == "googlenet" else {})))
    x = torch.randn(2, 3, size, size)
    net = import_model(theirs, x[:1])
    with torch.no_grad():
        want, got = theirs(x), net(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    assert len(net.units) > 3


def test_resnet18_costs_equal_torchvisions():
    from torch.utils.flop_counter import FlopCounterMode

    from hwslim.core.costs import model_costs

    theirs = torchvision.models.resnet18(weights=None).eval()
    net = import_model(theirs, torch.randn(1, 3, 224, 224))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        theirs(torch.randn(1, 3, 224, 224))
    c = model_costs(net)
    assert (c.params, c.macs) == (11_689_512, 1_814_073_344) == (sum(p.numel() for p in theirs.parameters()),
                                                                 counter.get_total_flops() // 2)


def test_unsupported_operations_are_named_not_guessed():
    with pytest.raises(ImportRefused, match=r"node 'permute' \(permute.*no operator for a permute"):
        import_model(torchvision.models.convnext_tiny(weights=None), torch.randn(1, 3, 64, 64))
    with pytest.raises(ImportRefused, match=r"node 'view' \(view, torchvision/models/shufflenetv2\.py:\d+\): hwslim "
                                            r"has no slimmable operator for a channel shuffle.*19 unit\(s\).*pass "
                                            r"--fix-unsupported"):
        import_model(torchvision.models.shufflenet_v2_x0_5(weights=None), torch.randn(1, 3, 64, 64))
    assert issubclass(ImportRefused, ModelError)  # the CLI prints one line and exits 2


# ShuffleNetV2 with --fix-unsupported: what reaches a shuffle (each block's output convs) stays fixed
SHUFFLE_FIXED = [f"stage{s}/{i}/branch{b}" for s, n in ((2, 4), (3, 8), (4, 4)) for i in range(n)
                 for b in ((1, 2) if i == 0 else (2,))]
SHUFFLE_SLIM = ["conv1/0"] + [f"stage{s}/{i}/branch2/0" for s, n in ((2, 4), (3, 8), (4, 4)) for i in range(n)] + \
    ["conv5/0"]


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_shufflenet_imports_with_the_units_of_its_shuffles_fixed(name, tmp_path):
    import numpy as np
    import onnxruntime as ort
    from torch.utils.flop_counter import FlopCounterMode

    from hwslim.core.costs import model_costs
    from hwslim.runtimes.onnx_file import export_onnx
    from hwslim.importing.fx_trace import fixed_units
    from hwslim.core.supernet import SlimmableNet

    theirs, x, net = _import_torchvision(name)
    fixed = fixed_units(net)
    assert [u.rpartition("/")[0] for u in fixed] == SHUFFLE_FIXED  # branch1/2, branch2/5: the convs before the cat
    assert {f["what"] for f in fixed.values()} == {"a channel shuffle"}
    assert list(net.units) == SHUFFLE_SLIM  # the stem, every block's inner width, the last conv
    kinds = [n.op.kind for n in net.nodes]
    assert kinds.count("shuffle") == 16 and kinds.count("slice") == 2 * 13  # chunk(2) in every stride-1 block
    with torch.no_grad():
        want, got = theirs(x), net(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        theirs(x[:1])
    c = model_costs(net)
    assert (c.params, c.macs) == (sum(p.numel() for p in theirs.parameters()), counter.get_total_flops() // 2)
    again = SlimmableNet.from_graph(net.graph_dict())  # the fixed units travel with the graph (checkpoints)
    assert fixed_units(again) == fixed and list(again.units) == SHUFFLE_SLIM
    for seed in (0, 1)[:2 if name.endswith("x0_5") else 1]:  # the others slim: materialized, ONNX Runtime agree
        cfg = net.random_config(random.Random(seed))
        assert cfg.widths != net.full_config().widths
        with torch.no_grad(), net.using(cfg):
            want = net(x)
        plain = materialize(net, cfg, fold_bn=True).eval()
        path = export_onnx(plain, tmp_path / f"{seed}.onnx", batch=2, input_size=64)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()


def test_cli_lists_the_units_fix_unsupported_keeps(capsys):
    import json

    from hwslim.cli import main

    assert main(["cost", "--model", "torchvision:shufflenet_v2_x0_5", "--fix-unsupported", "--input-size", "64",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["params"] == 1_366_792
    (line,) = err.splitlines()
    assert line.startswith("--fix-unsupported: 19 unit(s) reaching a channel shuffle keep their width, 18 slim: "
                           "stage2/0/branch1/2 (24), stage2/0/branch2/5 (24),")


class ShapeBranchNet(nn.Module):
    """A user's CNN with Python control flow on the input's shape, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.up = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.se = SE(32, 8)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32),
                                  nn.Dropout(0.1))
        self.side = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(x) if x.shape[-1] > 16 else self.up(x)  # large inputs are downsampled first
        x = self.se(x)
        x = torch.relu(self.body(x) + x)
        x = torch.cat([x, torch.relu(self.side(x))], 1)
        x = nn.functional.max_pool2d(x, 2)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("size, branch", [(32, "down/0"), (16, "up/0")])
def test_where_fx_cannot_trace_torch_export_imports_it(size, branch):
    torch.manual_seed(0)
    theirs = _randomize(ShapeBranchNet())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(theirs)
    x = torch.randn(2, 3, size, size)
    net = import_model(theirs, x[:1])
    assert net.graph.meta["traced_by"] == "torch.export"
    assert [n.op.kind for n in net.nodes] == ["conv", "conv", "se", "conv", "conv", "concat", "maxpool", "gap",
                                              "flatten", "linear"]
    assert list(net.units) == ["stem/0", branch, "se/mid", "side"]  # the branch the example's size takes
    assert net.nodes[3].op.act == "relu" and len(net.nodes[3].inputs) == 2  # bn + residual + relu fused
    _same_function(theirs, net, x)


def test_when_torch_export_fails_too_the_refusal_names_both():
    class ValueBranchNet(ShapeBranchNet):
        def forward(self, x):
            x = self.stem(x)
            if x.mean() > 0:  # a branch on the values: no tracer can follow it
                x = self.down(x)
            return x

    with pytest.raises(ImportRefused, match=r"^torch\.fx cannot trace ValueBranchNet \(TraceError: symbolically traced "
                                            r"variables cannot be used as inputs to control flow\), nor can torch\."
                                            r"export \(\w+: .*data-dependent.*\); make its forward free of control "
                                            r"flow that depends on tensor values$"):
        import_model(ValueBranchNet(), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_torch_export_path_builds_what_the_fx_path_builds(name, monkeypatch):
    """One importer: the exported ATen graph, rewritten, groups into the same operators and units."""
    import hwslim.importing.fx_trace

    theirs, x, by_fx = _import_torchvision(name)

    def fx_fails(self, root, *args, **kwargs):
        raise torch.fx.proxy.TraceError("as for a forward fx cannot trace")

    monkeypatch.setattr(hwslim.importing.fx_trace._Tracer, "trace", fx_fails)
    by_export = import_model(theirs, x[:1], fix_unsupported=True)
    assert (by_fx.graph.meta["traced_by"], by_export.graph.meta["traced_by"]) == ("torch.fx", "torch.export")

    def structure(net):  # node names of weightless ops differ (fx: the module "avgpool"; ATen: "adaptive_avg_pool2d")
        at = {n.name: i for i, n in enumerate(net.nodes)}
        return [(n.op, tuple(at.get(t, -1) for t in n.inputs), n.out, n.mid) for n in net.nodes]

    assert structure(by_export) == structure(by_fx)
    assert by_export.graph.units == by_fx.graph.units
    assert by_export.graph.meta.get("fixed_units") == by_fx.graph.meta.get("fixed_units")
    with torch.no_grad():
        torch.testing.assert_close(by_export(x), theirs(x), rtol=0, atol=1e-5 * theirs(x).abs().max().item())


def test_cli_cost_of_a_torchvision_model_equals_torchvisions(capsys):
    import json

    from hwslim.cli import main

    assert main(["cost", "--model", "torchvision:resnet18", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert (c["params"], c["macs"]) == (11_689_512, 1_814_073_344)


USER_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.branch = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = torch.cat([x, self.branch(x)], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build():
    return Net()
'''


def test_users_own_model_end_to_end(tmp_path, monkeypatch, capsys):
    """Issue 12.6: a user's CNN file (SE, concat), its trained weights, then train, profile, search, export, verify."""
    import json
    import sys

    from hwslim.cli import main
    from hwslim.importing.data import build_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_cnn_e2e.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_cnn_e2e

    # the user's own training, briefly: the weights hwslim starts from
    torch.manual_seed(0)
    model = user_cnn_e2e.build()
    data = build_data("synthetic:400", 16, search_size=0, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in list(data.batches(0, 64))[:5]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    sys.modules.pop("user_cnn_e2e", None)

    assert main(["train", "--model", "user_cnn_e2e:build", "--init", "weights.pth", "--input-size", "16",
                 "--data", "synthetic:400", "--epochs", "1", "--batch-size", "50", "--threads", "1",
                 "--no-progress", "--out", "run"]) == 0
    ckpt = "run/checkpoint.pt"
    assert main(["profile", "--device", "cpu", "--model", ckpt, "--quick", "--calib-configs", "4",
                 "--holdout-configs", "2", "--out", "table/t.csv", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "--checkpoint", ckpt, "--params-m", "0.008", "--out", "search", "--no-progress",
                 "--max-images", "40", "--json"]) == 0
    (cfg,) = json.loads(capsys.readouterr().out)
    assert cfg["meta"]["params_m"] <= 0.008
    assert main(["export", "--checkpoint", ckpt, "--config", cfg["file"], "--out", "small.onnx", "--json"]) == 0
    capsys.readouterr()
    # 3: this shared machine got busier or quieter since the table (the verdict says so)
    assert main(["verify", "small.onnx", "--table", "table/t.csv", "--budget-ms", "1000", "--json"]) in (0, 3)
    assert json.loads(capsys.readouterr().out)["measured_ms"] > 0


class BNAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in small: a BatchNorm2d subclass with its activation inside."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                     self.eps)
        return self.act(self.drop(x))


class Swish(nn.Module):  # an activation class hwslim does not know by name (timm's own Sigmoid, GELU...)
    def forward(self, x):
        return x * torch.sigmoid(x)


class MySiLU(nn.Module):  # one known function inside: recognized by tracing the class on its own
    def forward(self, x):
        return nn.functional.silu(x)


class MyLinear(nn.Linear):  # timm's Linear: only a TorchScript branch added
    def forward(self, x):
        if torch.jit.is_scripting():
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


class TimmLikeNet(nn.Module):
    """timm's building patterns: BN with its act inside, SE with an identity ``bn`` and ``mean``
    pooling, a ResNet-D avg-pool shortcut (ceil mode, no pad counting), a Linear subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = BNAct(16, MySiLU())
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.bn2 = BNAct(16, Swish())
        self.fc1, self.bn_se, self.act_se, self.fc2 = nn.Conv2d(16, 8, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(8, 16, 1)
        self.conv3 = nn.Conv2d(16, 24, 1, 2, bias=False)
        self.bn3 = BNAct(24, nn.Identity())  # apply_act=False: the residual add fuses into the conv
        self.down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                  nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = MyLinear(24, 10)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        y = self.bn2(self.conv2(x))
        s = y.mean((2, 3), keepdim=True)
        y = y * torch.sigmoid(self.fc2(self.act_se(self.bn_se(self.fc1(s)))))
        y = torch.relu(self.bn3(self.conv3(y)) + self.down(x))
        return self.head(y.mean((2, 3)))


def test_timm_patterns_import_with_parity():
    torch.manual_seed(0)
    theirs = TimmLikeNet()
    theirs.bn2.act = nn.Hardswish()  # a known activation inside the BatchNorm
    _randomize(theirs)
    x = torch.randn(2, 3, 32, 32)
    net = import_model(theirs, x[:1])
    kinds = [n.op.kind for n in net.nodes]
    assert kinds == ["conv", "conv", "se", "avgpool", "conv", "conv", "gap", "linear"], kinds
    stem, dw, _, pool, _, conv3 = net.nodes[:6]
    assert (stem.op.act, dw.op.act, pool.op.kernel, conv3.op.act) == ("silu", "hardswish", 2, "relu")
    assert len(conv3.inputs) == 2  # bn3's identity act lets the shortcut fuse: act(bn(conv) + down)
    _same_function(theirs, net, x, seed=1)


def test_unknown_layers_inside_known_classes_are_refused_by_name():
    theirs = TimmLikeNet()  # bn2's act is Swish: x * sigmoid(x) written out, not one known activation
    with pytest.raises(ImportRefused, match=r"node 'bn2' \(BNAct, .*test_importer\.py:\d+\): hwslim has no "
                                            r"operator for the activation Swish inside BNAct"):
        import_model(theirs, torch.randn(1, 3, 32, 32))

    class SameConv(nn.Conv2d):  # TensorFlow 'same' padding: input-dependent, asymmetric
        def forward(self, x):
            return super().forward(nn.functional.pad(x, [0, 1, 0, 1]))

    odd = nn.Sequential(SameConv(3, 8, 3, 2), nn.Flatten(), nn.LazyLinear(4))
    odd(torch.randn(1, 3, 16, 16))
    with pytest.raises(ImportRefused, match=r"no operator for SameConv \(a Conv2d with its own forward"):
        import_model(odd, torch.randn(1, 3, 16, 16))

    class Mixed(nn.Module):  # MixNet's split of the channels between kernels: an unequal split is named
        def __init__(self, sizes=(4, 12)):
            super().__init__()
            self.sizes = list(sizes)
            self.stem = nn.Conv2d(3, 16, 1)
            self.k3, self.k5 = nn.Conv2d(sizes[0], 8, 3, padding=1), nn.Conv2d(sizes[1], 8, 5, padding=2)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            a, b = torch.split(self.stem(x), self.sizes, 1)
            return self.head(torch.cat([self.k3(a), self.k5(b)], 1).mean((2, 3)))

    with pytest.raises(ImportRefused, match=r"node 'getitem' \(getitem, .*test_importer\.py:\d+\): .*a channel split "
                                            r"\(split\).*1 unit\(s\).*\(stem\); pass --fix-unsupported"):
        import_model(Mixed(), torch.randn(1, 3, 8, 8))
    assert list(import_model(Mixed(), torch.randn(1, 3, 8, 8), fix_unsupported=True).units) == ["k3", "k5"]
    equal = import_model(Mixed((8, 8)), torch.randn(1, 3, 8, 8))  # equal halves of a conv: they slim in pairs
    assert list(equal.units) == ["stem", "k3", "k5"] and equal.nodes[0].op.parts == 2
    pool = nn.Sequential(nn.Conv2d(3, 8, 1), nn.AvgPool2d(2, 2, ceil_mode=True), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    with pytest.raises(ImportRefused, match="ceil-mode average"):  # odd size: the last window is partial
        import_model(pool, torch.randn(1, 3, 7, 7))
    assert [n.op.kind for n in import_model(pool, torch.randn(1, 3, 8, 8)).nodes] == ["conv", "avgpool", "flatten",
                                                                                    "linear"]


@pytest.mark.parametrize("name", ["resnet50d", "regnety_002", "mobilenetv3_large_100", "efficientnet_b0"])
def test_timm_models_import_with_parity(name):
    timm = pytest.importorskip("timm")  # optional extra: pip install hwslim[timm]
    torch.manual_seed(0)
    theirs = _randomize(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    net = import_model(theirs, x[:1])
    with torch.no_grad():
        want, got = theirs(x), net(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    assert len(net.units) > 10


# sha256 of the graph JSON (node names, operators, units, grids) these imports gave at commit e1ed339,
# before the import rules moved onto the operators: the importer's output must not change
GRAPH_JSON_SHA256 = {
    "resnet18": "9eacb6ccd6c23c7c81e0e2383318de360e89d769ee74be11d63935d7813623e2",
    "mobilenet_v2": "6fc9a33842c0f0c3a33510043828c45fa71b858917c5898c609247f426a67964",
    "mobilenet_v3_small": "deb9450d7aaf297fe41de8617bc3f1fd5a8c15cfd5d1ef398a6d5d9384eb2534",
    "shufflenet_v2_x0_5": "349e703ed84893fe13d769fc72f1c8889e26410f2832ee13710aec4264c8f53e",
}


@pytest.mark.parametrize("name", sorted(GRAPH_JSON_SHA256))
def test_imported_graph_json_is_unchanged(name):
    import hashlib
    import json

    torch.manual_seed(0)
    net = import_model(torchvision.models.get_model(name, weights=None), torch.randn(1, 3, 64, 64),
                       fix_unsupported=name.startswith("shufflenet"))
    assert hashlib.sha256(json.dumps(net.graph_dict(), sort_keys=True).encode()).hexdigest() == \
        GRAPH_JSON_SHA256[name]


class IdiomNet(nn.Module):
    """The layers and idioms detectors, segmenters and hand-written classifiers use."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding="same", bias=False), nn.BatchNorm2d(16),
                                  nn.LeakyReLU(0.1))
        self.wide = nn.Conv2d(16, 16, (1, 5), padding=(0, 4), dilation=(1, 2))
        self.prelu, self.gn = nn.PReLU(16), nn.GroupNorm(4, 16)
        self.down, self.elu = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ELU()
        self.up, self.proj = nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(32, 16, 1)
        self.atrous = nn.Sequential(nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16),
                                    nn.GELU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Sigmoid())
        self.se = LinearSE(16)
        self.bn1d, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 10, bias=False)

    def forward(self, x):
        x = self.stem(x)
        y = self.gn(self.prelu(self.wide(x))).add(x)
        z = self.proj(self.up(self.elu(self.down(y))))
        y = y + 0.2 * nn.functional.interpolate(self.atrous(z), size=y.shape[-2:], mode="bilinear")
        y = self.se(y * self.gate(y))
        y.add_(x)  # y holds the sum from here on
        y = nn.functional.avg_pool2d(y * 0.5 + 0, y.size()[3])  # the kernel from the input size: global
        return self.fc(self.bn1d(y.view(y.size(0), -1)))


@pytest.mark.parametrize("path", ["torch.fx", "torch.export"])
def test_detector_and_segmenter_idioms_import_with_parity(path, monkeypatch, tmp_path):
    """Upsampling, dilated and 1xk convs, 'same' padding, LeakyReLU/ELU/GELU/PReLU, GroupNorm (its unit
    in multiples of its group size), BatchNorm1d, a gate of two branches, an SE of Linear layers
    without bias, scalar arithmetic, ``y.add(x)``/``y.add_(x)`` and a pool as large as its input:
    equal to the module at full width, supernet = materialized = ONNX Runtime at narrow configs."""
    import hwslim.importing.fx_trace
    from hwslim.core.costs import model_costs

    if path == "torch.export":
        def fx_fails(self, root, *args, **kwargs):
            raise torch.fx.proxy.TraceError("as for a forward fx cannot trace")
        monkeypatch.setattr(hwslim.importing.fx_trace._Tracer, "trace", fx_fails)
    torch.manual_seed(0)
    theirs = _randomize(IdiomNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    net = import_model(theirs, x[:1])
    assert net.graph.meta["traced_by"] == path
    kinds = {n.op.kind for n in net.nodes}
    assert {"resize", "prelu", "gn", "mul", "scale", "unflatten"} <= kinds
    # torch.export records the pool's kernel as a number: an ordinary pool there, a global one on the fx path
    assert ("avgpool" in kinds) == (path == "torch.export")
    assert net.graph.units["stem/0"].quantum == 4  # GroupNorm's groups of 4 channels
    assert model_costs(net, net.full_config()).params == sum(p.numel() for p in theirs.parameters())
    with torch.no_grad():
        want = theirs(x)
        assert (net(x) - want).abs().max() <= 1e-5 * want.abs().max()
    check_random_configs(net, x, tmp_path)


def test_frozen_batch_norm_folds_into_its_conv():
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(8)
    bn.weight.uniform_(0.5, 2)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    net = import_model(theirs, x[:1])
    assert [(n.op.kind, n.op.bn, n.op.act) for n in net.nodes] == [("conv", True, "relu"), ("conv", False, None)]
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-5, atol=1e-5)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.block(torch.relu(self.block(x)))


@pytest.mark.parametrize("path", ["torch.fx", "torch.export"])
def test_a_module_called_twice_is_refused_by_name_not_split(path, monkeypatch):
    import hwslim.importing.fx_trace

    if path == "torch.export":
        def fx_fails(self, root, *args, **kwargs):
            raise torch.fx.proxy.TraceError("as for a forward fx cannot trace")
        monkeypatch.setattr(hwslim.importing.fx_trace._Tracer, "trace", fx_fails)
    with pytest.raises(ImportRefused, match=r"^module 'block' \(Conv2d\) is called 2 times in one forward \(block, "
                                            r"block_2\): hwslim would split its one set of weights"):
        import_model(SharedConv(), torch.randn(1, 3, 16, 16))


def test_a_refusal_on_the_torch_export_path_names_the_module_not_the_aten_operator(monkeypatch):
    import hwslim.importing.fx_trace

    def fx_fails(self, root, *args, **kwargs):
        raise torch.fx.proxy.TraceError("as for a forward fx cannot trace")
    monkeypatch.setattr(hwslim.importing.fx_trace._Tracer, "trace", fx_fails)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Identity(), nn.LayerNorm([8, 16, 16])))
    with pytest.raises(ImportRefused, match=r"^module '1\.1' \(LayerNorm\): hwslim has no operator for LayerNorm$"):
        import_model(model, torch.randn(1, 3, 16, 16))


def test_a_wrong_input_size_is_one_line_with_its_cause(capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    with pytest.raises(ImportRefused) as err:
        import_model(model, torch.randn(1, 3, 224, 224))
    msg = str(err.value)
    assert "\n" not in msg and "mat1 and mat2 shapes cannot be multiplied" in msg and "--input-size" in msg
    assert "Traceback" not in capfd.readouterr().err  # torch's ShapeProp prints one; it is dropped


def test_json_output_is_only_json_when_the_model_builder_prints(tmp_path, monkeypatch, capsys):
    import json

    from hwslim.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatty_cnn.py").write_text(
        "from torch import nn\n\n\ndef build():\n    print('chatty_cnn summary: 2 layers')\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["cost", "--model", "chatty_cnn:build", "--input-size", "16", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "chatty_cnn summary" in err


class _Conv(nn.Module):
    """Ultralytics' Conv: conv, BatchNorm, SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _Conv(c, c, 3), _Conv(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f block as Ultralytics writes it: ``cv1``'s output chunked in two halves."""

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = _Conv(c1, 2 * self.c), _Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(_Bottleneck(self.c) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_an_equal_chunk_of_a_convs_output_slims_in_pairs_without_fix_unsupported(tmp_path):
    """C2f: ``cv1``'s two halves keep equal widths (its unit slims in pairs); nothing is fixed."""
    import numpy as np
    import onnxruntime as ort

    from hwslim.importing.importance import sort_channels
    from hwslim.runtimes.onnx_file import export_onnx

    torch.manual_seed(0)
    theirs = _randomize(nn.Sequential(_Conv(3, 16, 3, 2), C2f(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(32, 10))).eval()
    x = torch.randn(2, 3, 32, 32)
    net = import_model(theirs, x[:1])
    assert "fixed_units" not in net.graph.meta
    cv1 = next(n for n in net.nodes if n.name == "1/cv1/conv")
    assert cv1.op.parts == 2 and net.units["1/cv1/conv"].max_width == 16
    assert [n.op.kind for n in net.nodes].count("part") == 2
    with torch.no_grad():
        want = theirs(x)
        assert (net(x) - want).abs().max() <= 1e-5 * want.abs().max()
    cfg = net.config_of({**net.full_config().widths, "1/cv1/conv": 8, "1/cv2/conv": 16})
    with torch.no_grad(), net.using(cfg):
        sliced = net(x)
    spec = {s.name: s for s in net.layer_specs(cfg)}["1/cv1/conv"]
    assert spec.cout == 16 and spec.op.macs(spec) == 16 * 16 * 16 * 16  # two halves of 8
    plain = materialize(net, cfg, fold_bn=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), sliced, rtol=1e-4, atol=1e-5)
    got = ort.InferenceSession(str(export_onnx(plain, tmp_path / "c2f.onnx", batch=2, input_size=32)),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - sliced.numpy()).max() <= 1e-4 * np.abs(sliced.numpy()).max()
    sort_channels(net)  # a trained start: the halves' filters move with their unit
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_segmenters_and_detector_backbones_with_several_outputs_import_with_parity(name, tmp_path):
    """LRASPP (dilated convs, a gate, bilinear upsampling, a dict output) and Faster R-CNN's backbone with
    its FPN (top-down nearest upsampling, three levels out): every output keeps its width, and each
    output matches the module, and ONNX Runtime at a narrow config."""
    import json

    import numpy as np
    import onnxruntime as ort

    from hwslim.core.supernet import SlimmableNet
    from hwslim.runtimes.onnx_file import export_onnx
    from torchvision.models import detection, segmentation

    torch.manual_seed(0)
    if name.startswith("lraspp"):
        theirs = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    else:
        theirs = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).backbone
    theirs = _randomize(theirs).eval()
    x = torch.randn(2, 3, 96, 96)
    net = import_model(theirs, x[:1])
    with torch.no_grad():
        want, got = theirs(x), net(x)
    assert isinstance(got, dict) and list(got) == list(want)
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-5 * want[k].abs().max(), k
    again = SlimmableNet.from_graph(json.loads(json.dumps(net.graph_dict())))
    assert again.outputs == net.outputs and len(net.outputs) == len(want)
    cfg = net.random_config(random.Random(0))
    with torch.no_grad(), net.using(cfg):
        sliced = net(x)
    assert [v.shape[1] for v in sliced.values()] == [v.shape[1] for v in want.values()]  # outputs keep their width
    plain = materialize(net, cfg, fold_bn=True).eval()
    outs = ort.InferenceSession(str(export_onnx(plain, tmp_path / "m.onnx", batch=2, input_size=96)),
                                providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert len(outs) == len(sliced)
    for o, s in zip(outs, sliced.values()):
        assert np.abs(o - s.numpy()).max() <= 1e-4 * np.abs(s.numpy()).max()


class GhostBlock(nn.Module):
    """GhostNet's block: a conv's output and its cheap depthwise copy, concatenated, plus the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                   nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        h = self.primary(x)
        return self.head(torch.cat([h, self.cheap(h)], 1) + x)


def test_a_conv_added_to_two_equal_halves_makes_its_output_in_halves():
    torch.manual_seed(0)
    theirs = _randomize(GhostBlock()).eval()
    x = torch.randn(2, 3, 32, 32)
    net = import_model(theirs, x[:1])
    assert next(n for n in net.nodes if n.name == "stem/0").op.parts == 2 and list(net.units) == ["stem/0"]
    assert net.units["stem/0"].max_width == 16  # each half; the ghost's halves share it
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-5, atol=1e-5)
    cfg = net.config_of({"stem/0": 8})
    with torch.no_grad(), net.using(cfg):
        torch.testing.assert_close(materialize(net, cfg, fold_bn=True).eval()(x), net(x), rtol=1e-4, atol=1e-5)


def test_a_transposed_conv_upsamples_and_slims():
    """A learned x2 upsampling (``nn.ConvTranspose2d(k=2, s=2)``): its output channels are a unit; a
    padded one is refused by name."""
    net_in = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 24, 2, 2), nn.ReLU(),
                           nn.Conv2d(24, 8, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    net = import_model(net_in, x[:1])
    assert [n.op.kind for n in net.nodes] == ["conv", "deconv", "conv"] and net.nodes[1].op.act == "relu"
    assert list(net.units) == ["0", "2"]
    with torch.no_grad():
        assert torch.equal(net(x), net_in(x))
        cfg = net.config_of({"0": 8, "2": 16})
        with net.using(cfg):
            want = net(x)
        assert torch.allclose(materialize(net, cfg).eval()(x), want, atol=1e-6)
    padded = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ConvTranspose2d(16, 8, 3, 2, padding=1)).eval()
    with pytest.raises(ImportRefused,
                       match=r"^node '_1' \(ConvTranspose2d\): .*ConvTranspose2d \(padded, grouped, dilated"):
        import_model(padded, x[:1])
