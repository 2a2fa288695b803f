from __future__ import annotations

import json
import sys

from hwslim.cli import (FIX_UNSUPPORTED_HELP, add_command, nonneg_float, nonneg_int, positive_float, positive_int,
                        print_table, whole_int, set_threads, threads_note, with_header)
from hwslim.importing.raw_outputs import OUTPUTS, OUTPUTS_HELP


def register(sub) -> None:
    p = add_command(sub, "train", run, run.__doc__)
    p.add_argument("--model", required=True,
                   help="zoo model name (see `hwslim models`), a graph JSON file, or a PyTorch model to import: "
                        "torchvision:NAME | timm:NAME | package.module:callable")
    p.add_argument("--data", required=True,
                   help="synthetic[:N[:C]] (N images, C classes, default 10) | cifar10[:ROOT] | cifar100[:ROOT] | "
                        "an ImageFolder dir (train/ + val/ or test/)")
    p.add_argument("--epochs", type=positive_int, required=True,
                   help="total epochs (on --resume: train up to this many)")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, metrics.jsonl, results.json")
    g = p.add_argument_group("model")
    g.add_argument("--width-mult", type=positive_float, help="supernet width multiplier (model default if omitted)")
    g.add_argument("--input-size", type=positive_int, help="input resolution (model default if omitted)")
    g.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: the data's class count)")
    g.add_argument("--divisor", type=positive_int, choices=(8, 16, 32), help="channel rounding divisor (default 8)")
    g.add_argument("--init", metavar="WEIGHTS",
                   help="start an imported model from trained weights: a state-dict file, or a torchvision/timm "
                        "weights name (IMAGENET1K_V1; downloads); its channels are sorted by importance first")
    g.add_argument("--no-sort", dest="sort", action="store_const", const=False,
                   help="start from --init weights in their own channel order (to measure what sorting is worth)")
    g.add_argument("--keep", metavar="REGEX",
                   help="an imported model's modules whose qualified name matches keep their output channels")
    g.add_argument("--fix-unsupported", action="store_const", const=True, help=FIX_UNSUPPORTED_HELP)
    g.add_argument("--outputs", choices=OUTPUTS, help=OUTPUTS_HELP)
    g = p.add_argument_group("recipe")
    add_schedule_options(g, lr="0.1 x batch / 128", warmup="min(5, 10%%)")
    g.add_argument("--num-random", type=nonneg_int,
                   help="random configs per step besides widest and narrowest (default 2)")
    g.add_argument("--distill-from-start", dest="distill_after_warmup", action="store_const", const=False,
                   help="distill narrow configs from the first step (default: labels until warm-up ends)")
    g.add_argument("--label-smoothing", type=nonneg_float, help="for the widest config (default 0.1)")
    g.add_argument("--search-size", type=nonneg_int,
                   help="training images held out for `hwslim search` (default 10%%, at most 10,000)")
    g.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on N images of the training set only (class-balanced, seeded by --seed; the search "
                        "split is held out of them), for any --data: try real data on a CPU in minutes")
    g.add_argument("--seed", type=whole_int, help="seeds the split, shuffling, augmentation and configs (default 0)")
    add_execution_options(p.add_argument_group("execution"))
    p.add_argument("--json", action="store_true",
                   help="print the final accuracies as JSON on stdout (each epoch's metrics go to stderr)")


def add_schedule_options(g, *, lr: str, warmup: str) -> None:
    """Batch, learning rate and its schedule, momentum, weight decay: train's and finetune's
    (``lr`` and ``warmup`` name each command's defaults)."""
    g.add_argument("--batch-size", type=positive_int, help="global batch size, split across processes (default 128)")
    g.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {lr})")
    g.add_argument("--momentum", type=nonneg_float, help="Nesterov momentum (default 0.9)")
    g.add_argument("--weight-decay", type=nonneg_float,
                   help="on conv/linear weights only (default 5e-4 up to 64 px inputs, 4e-5 above)")
    g.add_argument("--warmup-epochs", type=nonneg_float,
                   help=f"linear warm-up before the cosine decay (default {warmup})")


def add_execution_options(g, *, scored: str = "widest/narrowest") -> None:
    """Device, data loading, precision, scoring, progress, resume: train's and finetune's."""
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    g.add_argument("--workers", type=nonneg_int, default=4,
                   help="image-decoding processes for large datasets (default 4; 0: in this process)")
    g.add_argument("--download", action="store_true", help="let torchvision download cifar10/cifar100")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--calib-images", type=nonneg_int, default=2000,
                   help="images for BN recalibration (default 2000; 0: no recalibration)")
    g.add_argument("--eval-images", type=positive_int, help="validation images scored at the end (default: all)")
    g.add_argument("--eval-every", type=nonneg_int, default=0, help=f"also score {scored} every N epochs")
    g.add_argument("--threads", type=positive_int, help="PyTorch CPU threads (default 1: measured fastest on a "
                                                          "shared machine, benchmarks/results/threads.csv)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--stop-after", type=positive_int,
                   help="leave after this many epochs (for time-limited jobs); continue with --resume")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--force", action="store_true", help="start over even if --out holds a checkpoint")


def run(args) -> int:
    """Train a slimmable supernet (sandwich rule, in-place distillation).

    Every step trains the widest config on the labels, and the narrowest plus
    --num-random random configs on the widest's soft output. A checkpoint is written
    atomically every epoch to OUT/checkpoint.pt (weights, data split, training state);
    --resume continues it exactly. At the end the widest, uniform and narrowest configs
    are scored on the validation data after BN recalibration (OUT/results.json).

    Several GPUs or machines: launch through torchrun, e.g.
      torchrun --nproc-per-node 8 --no-python hwslim train --model mobilenet_v2 \\
          --data /data/imagenet --epochs 100 --batch-size 1024 --out runs/mbv2
    (--batch-size is the global batch; only rank 0 writes.)

    A trained start: --model torchvision:resnet18 --init weights.pth imports the model
    with its weights and sorts every unit's channels by importance (BN scale, else filter
    norm) without changing what it computes, so narrow configs start from the best
    channels; the sandwich rule then fine-tunes it.

    Example (CPU, a minute):
      hwslim train --model resnet20 --width-mult 0.5 --input-size 16 \\
          --data synthetic:3000 --epochs 4 --batch-size 64 --out runs/demo
    """
    from hwslim.training.train import TrainConfig, train

    if args.resume and args.force:
        from hwslim.core.errors import HwslimError

        raise HwslimError("--resume and --force contradict each other; pick one")
    names = [f for f in TrainConfig.__dataclass_fields__ if f != "synthetic_val"]
    cfg = TrainConfig(**{k: getattr(args, k.replace("-", "_")) for k in names if hasattr(args, k)})
    cfg.validate()  # before anything changes (threads included)
    set_threads(args.threads)
    # each epoch's metrics go to stderr (train()'s log): stdout holds only the result
    result = train(cfg, log=with_header(f"hwslim train: {threads_note(args.threads)}"))
    return print_result(result, cfg.epochs, args.json)


def print_result(result, epochs: int, as_json: bool) -> int:
    """Print a training run's outcome: its checkpoint and final scores (a table or ``--json``), or
    where it stopped (``--stop-after``). train's and finetune's."""
    if result.checkpoint is None:  # not rank 0
        return 0
    if result.epochs < epochs:
        note = (f"stopped after epoch {result.epochs} of {epochs}; continue with --resume "
                f"(checkpoint: {result.checkpoint})")
        if as_json:
            print(note, file=sys.stderr)
            print(json.dumps({"checkpoint": str(result.checkpoint), "epochs_done": result.epochs,
                              "epochs": epochs, "final": []}, indent=2))
        else:
            print(note)
        return 0
    if as_json:
        print(json.dumps({"checkpoint": str(result.checkpoint), "final": result.final,
                          "evaluated_on": result.evaluated_on}, indent=2))
    else:
        print(f"checkpoint: {result.checkpoint}")
        print(f"{result.describe_evaluation()}:")
        print_table([{**r, "top1 %": r["top1"]} for r in result.final], ["config", "top1 %", "macs", "params"])
    return 0
