"""The user's own training loop (hwslim.pipeline.api, hwslim.training.sandwich): a two-output network
trained by the sandwich step with the user's loss, BN recalibrated from the user's loader, searched by
the user's score_fn, saved as a checkpoint the CLI takes, exported to ONNX."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwslim
from hwslim.cli import main
from hwslim.core.costs import model_costs
from hwslim.core.errors import HwslimError
from hwslim.importing.checkpoint import Checkpoint
from hwslim.search.evaluator import ScoreFnScoring
from hwslim.search.greedy import Budget, SearchOptions, greedy_search
from hwslim.training.sandwich import distill_loss, soft_cross_entropy


class SegAux(nn.Module):
    """A tiny segmenter with an auxiliary classifier: {"seg": (N, 3, H/2, W/2), "aux": (N, 4)}."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.seg = nn.Conv2d(32, 3, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return {"seg": self.seg(x), "aux": self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))}


def _batch(seed: int, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return {"image": x, "mask": F.avg_pool2d(x, 2).argmax(1), "label": (x.mean((2, 3)).argmax(1))}


def _loss(out, batch) -> torch.Tensor:
    return F.cross_entropy(out["seg"], batch["mask"]) + F.cross_entropy(out["aux"], batch["label"])


def _image(batch):
    return batch["image"]


@pytest.fixture()
def supernet():
    torch.manual_seed(0)
    return hwslim.import_model(SegAux(), torch.randn(2, 3, 16, 16))


def _user_loss(net, cfg, batch) -> float:
    with torch.no_grad(), net.using(cfg):
        return float(_loss(net(batch["image"]), batch))


def test_sandwich_step_trains_every_width_with_the_users_loss_and_distills_the_narrower(supernet):
    batch = _batch(1)
    widths = [supernet.full_config(), supernet.uniform_config(6), supernet.min_config()]
    supernet.train()
    before = [_user_loss(supernet, c, batch) for c in widths]
    narrow_w = supernet.layers["c1"].conv.weight[:8].detach().clone()  # the narrowest config's channels of c1
    opt = torch.optim.SGD(supernet.parameters(), lr=0.05, momentum=0.9)
    seen = []

    def distill(student, teacher):  # the default's terms, recorded: the narrower learn the widest's outputs
        seen.append((set(student), teacher["seg"].requires_grad, teacher["aux"].requires_grad))
        return distill_loss(student, teacher)

    for _ in range(3):
        r = hwslim.sandwich_step(supernet, batch, _loss, opt, num_random=1, distill_fn=distill, inputs=_image)
    assert [c.widths for c in r.configs[:2]] == [supernet.full_config().widths, supernet.min_config().widths]
    assert len(r.losses) == 3 and seen == [({"seg", "aux"}, False, False)] * 6  # 2 narrower configs x 3 steps
    assert set(r.output) == {"seg", "aux"} and not r.output["seg"].requires_grad
    assert supernet.config == supernet.full_config()
    after = [_user_loss(supernet, c, batch) for c in widths]
    assert all(a < b for a, b in zip(after, before)), (before, after)  # every width learned, the narrowest too
    assert not torch.equal(supernet.layers["c1"].conv.weight[:8], narrow_w)


def test_sandwich_step_clips_the_summed_gradient_norm_only_when_asked(supernet):
    batch, lr = _batch(2), 0.1
    configs = [supernet.full_config(), supernet.min_config()]
    supernet.train()
    start = {k: v.clone() for k, v in supernet.state_dict().items()}
    steps = {}
    for clip in (None, 0.01):
        supernet.load_state_dict(start)
        before = [p.detach().clone() for p in supernet.parameters()]
        opt = torch.optim.SGD(supernet.parameters(), lr=lr)  # plain SGD: the step is lr times the gradient
        r = hwslim.sandwich_step(supernet, batch, _loss, opt, configs=configs, inputs=_image, clip_grad_norm=clip)
        step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, supernet.parameters())])
        steps[clip] = (r.grad_norm, float(step.norm()) / lr)
    assert steps[None][0] is None  # the default: no clipping, no norm reported
    norm, clipped_step = steps[0.01]
    assert float(norm) == pytest.approx(steps[None][1], rel=1e-4) and float(norm) > 0.1  # the norm before clipping
    assert clipped_step == pytest.approx(0.01, rel=1e-3)  # the step taken with the clipped gradients


def test_sandwich_step_warns_when_the_supernet_is_in_eval_mode(supernet):
    import warnings

    opt = torch.optim.SGD(supernet.parameters(), lr=0.0)
    supernet.eval()  # as hwslim.import_model returns it: BatchNorm would keep its initial statistics
    with pytest.warns(UserWarning, match=r"eval mode .* call model\.train\(\)"):
        hwslim.sandwich_step(supernet, _batch(2), _loss, opt, inputs=_image)
    supernet.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hwslim.sandwich_step(supernet, _batch(2), _loss, opt, inputs=_image)


def test_default_distillation_is_kl_on_logits_and_mse_on_maps_per_output():
    torch.manual_seed(0)
    s = {"seg": torch.randn(2, 3, 4, 4), "aux": (torch.randn(2, 5), torch.randn(2, 7))}
    t = {"seg": torch.randn(2, 3, 4, 4), "aux": (torch.randn(2, 5), torch.randn(2, 7))}
    want = (F.mse_loss(s["seg"], t["seg"]) + soft_cross_entropy(s["aux"][0], F.softmax(t["aux"][0], 1))
            + soft_cross_entropy(s["aux"][1], F.softmax(t["aux"][1], 1)))
    assert torch.allclose(distill_loss(s, t), want)
    kl = F.kl_div(F.log_softmax(s["aux"][0], 1), F.softmax(t["aux"][0], 1), reduction="batchmean")
    entropy = -(F.softmax(t["aux"][0], 1) * F.log_softmax(t["aux"][0], 1)).sum(1).mean()
    assert torch.allclose(soft_cross_entropy(s["aux"][0], F.softmax(t["aux"][0], 1)), kl + entropy)  # KL + const
    with pytest.raises(HwslimError, match="differ in structure"):
        distill_loss(s, {"seg": t["seg"]})


def test_recalibrate_bn_from_the_users_loader_sets_the_configs_own_statistics(supernet):
    loader = [_batch(i) for i in range(3)]  # dict batches: the input comes from a callable
    cfg = supernet.min_config()
    bn = supernet.layers["c1"].bn
    w = cfg.widths["c1"]
    seen = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    assert hwslim.recalibrate_bn(supernet, loader, cfg, inputs=_image) == 3
    hook.remove()
    assert supernet.config == supernet.full_config()  # left at the config it had
    assert all(x.shape[1] == w for x in seen)
    mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)  # the exact average of the batches' statistics
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(bn.running_mean[:w], mean, atol=1e-6)
    assert torch.allclose(bn.running_var[:w], var, atol=1e-5)
    assert torch.equal(bn.running_mean[w:], torch.zeros(16 - w))  # channels the config does not use: reset
    assert hwslim.recalibrate_bn(supernet, loader, cfg, inputs=_image, num_batches=1) == 1


def test_search_scored_by_the_users_score_fn_returns_configs_within_budget(supernet):
    val, calib = _batch(7, 32), [_batch(i) for i in range(2)]
    calls = []

    def score_fn(model) -> float:  # a negative validation loss: higher is better
        calls.append((dict(model.config.widths), model.training, torch.is_grad_enabled()))
        return -float(_loss(model(val["image"]), val))

    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    full = model_costs(supernet, supernet.full_config()).params / 1e6
    budgets = [round(full * 0.7, 4), round(full * 0.4, 4)]
    configs = hwslim.search_configs(supernet, params_m=budgets, score_fn=score_fn, calib=calib, inputs=_image)
    assert len(configs) == 2
    assert all(model_costs(supernet, c).params / 1e6 <= b for c, b in zip(configs, budgets))
    assert calls and not any(training or grad for _, training, grad in calls)  # eval mode, no autograd
    assert len({json.dumps(w, sort_keys=True) for w, _, _ in calls}) > 3
    assert all(torch.equal(v, before[k]) for k, v in supernet.state_dict().items())  # BN statistics restored
    # every step's score is score_fn at that config, BN recalibrated on the calibration batches
    opts = SearchOptions(progress=False, plot=False, scoring=ScoreFnScoring(score_fn, calib, _image))
    result = greedy_search(Checkpoint(supernet), [Budget("params_m", budgets[1])], opts)
    for step in (result.steps[0], result.steps[-1]):
        cfg = supernet.config_of(step.widths)
        hwslim.recalibrate_bn(supernet, calib, cfg, inputs=_image)
        with supernet.using(cfg), torch.no_grad():
            assert step.acc == pytest.approx(-float(_loss(supernet.eval()(val["image"]), val)), rel=1e-5)
    with pytest.raises(HwslimError, match="re-iterable"):
        hwslim.search_configs(supernet, params_m=budgets[0], score_fn=score_fn, calib=iter(calib))
    with pytest.raises(HwslimError, match="finite"):
        hwslim.search_configs(supernet, params_m=budgets[0], score_fn=lambda m: float("nan"))


class Seg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_save_and_export_a_supernet_trained_in_the_users_loop(tmp_path, capsys):
    import onnxruntime as ort

    torch.manual_seed(0)
    net = hwslim.import_model(Seg(), torch.randn(1, 3, 16, 16))
    loader = [(b["image"], b["mask"]) for b in (_batch(i) for i in range(3))]
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    loader = [(x, x.argmax(1)) for x, _ in loader]  # full-resolution masks
    net.train()
    for batch in loader:
        hwslim.sandwich_step(net, batch, lambda out, b: F.cross_entropy(out, b[1]), opt)
    cfg = net.uniform_config(6)
    result = hwslim.export_model(net, cfg, tmp_path / "seg.onnx", calib=loader)
    assert result.max_rel_error < 1e-4
    assert result.bn.startswith("recalibrated at this config on the caller's batches")  # as recorded
    assert result.metadata["bn_statistics"] == result.bn
    hwslim.recalibrate_bn(net, loader, cfg)  # what the export did: the config's own statistics
    x = loader[0][0][:1]
    with torch.no_grad(), net.using(cfg):
        want = net.eval()(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 1e-4 * max(1.0, abs(want).max())
    ckpt = hwslim.save(net, tmp_path / "mine" / "checkpoint.pt")
    loaded = hwslim.load(ckpt)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.supernet.state_dict().items())
    capsys.readouterr()
    assert main(["cost", "--model", str(ckpt), "--json"]) == 0  # the CLI takes it as a checkpoint of its own
    assert json.loads(capsys.readouterr().out)["params"] == model_costs(net, net.full_config()).params
