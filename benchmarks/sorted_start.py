"""Does sorting a trained network's channels by importance give a better slimmable start?

Issue 12's check: "the importance-sorted start beats the unsorted one at uniform 6/12
before fine-tuning, in the recorded result". For each seed:

1. train a plain (non-slimmable) small ResNet, defined below, on the built-in synthetic
   data (16 px, 10 classes): ordinary SGD, cross-entropy, one width;
2. import it (:func:`hwslim.importing.fx_trace.import_model`) twice: channels as trained, and
   sorted by importance (:func:`hwslim.importing.importance.sort_channels`; the full network is
   the same function either way);
3. score widest, uniform 9/12, 6/12, 3/12 and narrowest on the validation images, each
   after BN recalibration, *before any fine-tuning* (the same scoring ``hwslim train``
   does at the end);
4. fine-tune each start with the library's training (``hwslim.training.train``: the sandwich rule
   with in-place distillation, ``init=`` the trained weights, ``sort=`` True or False)
   for one short run, and score again.

Everything runs on the CPU with one PyTorch thread, seeded. Run from the repository root::

    python benchmarks/sorted_start.py                 # 5 seeds, about 7 minutes on the 2-core machine
    python benchmarks/sorted_start.py --seeds 0       # one seed

Results: a table per seed and the mean, and ``benchmarks/results/sorted_start.csv``
(one row per seed, stage and config; stamped with the machine and the load average).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the repo root
from benchmarks.common import print_table, write_csv  # noqa: E402

INPUT_SIZE = 16
NUM_VAL = 1000  # validation images scored
CALIB = 500  # training images for BN recalibration
SEARCH = 200  # held out of training (as hwslim train does), unused here
MODEL_SPEC = "benchmarks.sorted_start:small_resnet"


# -- the user's plain network ----------------------------------------------------------------
class Block(nn.Module):
    """A ResNet basic block; a 1x1 projection where the width or size changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """32-64-128 channels, two basic blocks per stage: 26.4M MACs per 16 px image, 0.70M parameters;
    imported, 9 units (three of them residual streams)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(Block(32, 32), Block(32, 32))
        self.layer2 = nn.Sequential(Block(32, 64, 2), Block(64, 64))
        self.layer3 = nn.Sequential(Block(64, 128, 2), Block(128, 128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def small_resnet() -> nn.Module:
    """The spec ``benchmarks.sorted_start:small_resnet`` that ``hwslim train`` imports."""
    return SmallResNet()


# -- the benchmark ----------------------------------------------------------------------------
def pretrain(data, seed: int, epochs: int, batch: int, lr: float) -> nn.Module:
    """Ordinary training at one width: SGD Nesterov, cosine, weight decay 5e-4."""
    torch.manual_seed(seed)
    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = epochs * data.steps_per_epoch(batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches(epoch, batch, seed=seed):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def run_seed(seed: int, args, tmp: Path) -> list[dict]:
    from hwslim.importing.data import build_data, validation_split
    from hwslim.importing.importance import sort_channels
    from hwslim.importing.fx_trace import import_model
    from hwslim.training.train import TrainConfig, evaluate_configs, final_configs, train

    spec = f"synthetic:{args.train_images}"
    data = build_data(spec, INPUT_SIZE, search_size=SEARCH, seed=seed, num_val=NUM_VAL)
    t0 = time.perf_counter()
    model = pretrain(data, seed, args.epochs, args.batch_size, args.lr)
    pretrain_s = time.perf_counter() - t0
    images, labels = validation_split(data.info, "cpu")
    with torch.no_grad():
        plain_top1 = round(100 * float((model(images).argmax(1) == labels).float().mean()), 2)
    calib = data.calibration_images(CALIB, seed)
    weights = tmp / f"trained_{seed}.pth"
    torch.save(model.state_dict(), weights)

    rows: dict[tuple[str, str], dict] = {}
    for arm in ("unsorted", "sorted"):
        net = import_model(model, torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE), name="small_resnet")
        if arm == "sorted":
            sort_channels(net)
        for r in evaluate_configs(net, final_configs(net), images, labels, calib):
            rows.setdefault(("before", r["config"]), {"macs": r["macs"]})[arm] = r["top1"]
        t1 = time.perf_counter()
        cfg = TrainConfig(model=MODEL_SPEC, init=str(weights), sort=arm == "sorted", data=spec,
                          input_size=INPUT_SIZE, epochs=args.finetune_epochs, batch_size=args.batch_size,
                          lr=args.finetune_lr, warmup_epochs=0.0, search_size=SEARCH, seed=seed,
                          synthetic_val=NUM_VAL, calib_images=CALIB, device="cpu", progress=False,
                          out=str(tmp / f"{arm}_{seed}"))
        result = train(cfg, log=lambda line: None)
        finetune_s = time.perf_counter() - t1
        for r in result.final:
            rows.setdefault(("after", r["config"]), {"macs": r["macs"]})[arm] = r["top1"]
        print(f"seed {seed}: {arm} fine-tuned in {finetune_s:.0f} s", file=sys.stderr, flush=True)
    out = []
    for (stage, config), r in rows.items():
        out.append({"seed": seed, "stage": stage, "config": config, "unsorted_top1": r["unsorted"],
                    "sorted_top1": r["sorted"], "gain": round(r["sorted"] - r["unsorted"], 2),
                    "macs": r["macs"], "plain_top1": plain_top1, "pretrain_s": round(pretrain_s, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--train-images", type=int, default=2400)
    p.add_argument("--epochs", type=int, default=6, help="plain training epochs")
    p.add_argument("--finetune-epochs", type=int, default=1, help="sandwich-rule fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak LR of the plain training")
    p.add_argument("--finetune-lr", type=float, default=0.02, help="peak LR of the fine-tuning (cosine, no warm-up)")
    args = p.parse_args()
    torch.set_num_threads(1)  # measured fastest on the shared 2-core machine (benchmarks/results/threads.csv)
    seeds = [int(s) for s in args.seeds.split(",")]
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows += run_seed(seed, args, Path(tmp))
    elapsed = time.perf_counter() - t0
    load_end = os.getloadavg()[0]
    for r in rows:
        r.update(load_1m_start=round(load_start, 2), load_1m_end=round(load_end, 2), total_s=round(elapsed, 1),
                 train_images=args.train_images, epochs=args.epochs, finetune_epochs=args.finetune_epochs)
    # the mean over seeds, config by config
    mean = []
    for stage in ("before", "after"):
        for config in dict.fromkeys(r["config"] for r in rows):
            sel = [r for r in rows if r["stage"] == stage and r["config"] == config]
            u = sum(r["unsorted_top1"] for r in sel) / len(sel)
            s = sum(r["sorted_top1"] for r in sel) / len(sel)
            wins = sum(r["sorted_top1"] > r["unsorted_top1"] for r in sel)
            mean.append({"stage": stage, "config": config, "unsorted %": round(u, 2), "sorted %": round(s, 2),
                         "gain": round(s - u, 2), "sorted wins": f"{wins}/{len(sel)}"})
    print("plain network top-1 per seed: "
          + ", ".join(f"seed {sd}: {next(r['plain_top1'] for r in rows if r['seed'] == sd)}%" for sd in seeds))
    print_table(rows, ["seed", "stage", "config", "unsorted_top1", "sorted_top1", "gain"])
    print(f"\nmean over {len(seeds)} seed(s); {elapsed:.0f} s, load average {load_start:.2f} -> {load_end:.2f}:")
    print_table(mean, ["stage", "config", "unsorted %", "sorted %", "gain", "sorted wins"])
    check = next(m for m in mean if m["stage"] == "before" and m["config"] == "uniform 6/12")
    print(f"\nissue 12 check (uniform 6/12 before fine-tuning): sorted {check['sorted %']}% vs unsorted "
          f"{check['unsorted %']}% ({check['sorted wins']} seeds): "
          + ("the sorted start beats the unsorted one" if check["gain"] > 0 else "NOT better"))
    print(f"wrote {write_csv(rows, 'sorted_start')}")


if __name__ == "__main__":
    main()
