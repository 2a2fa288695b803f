from __future__ import annotations

from hwslim.cli import add_command, nonneg_float, positive_int, whole_int, set_threads, threads_note, with_header
from hwslim.cli.train_cmd import add_execution_options, add_schedule_options, print_result


def register(sub) -> None:
    p = add_command(sub, "finetune", run, run.__doc__)
    p.add_argument("--checkpoint", required=True, help="the supernet checkpoint (from `hwslim train`)")
    p.add_argument("--config", required=True, help="the ChannelConfig JSON to finetune (from `hwslim search`)")
    p.add_argument("--epochs", type=positive_int, required=True,
                   help="total epochs (on --resume: train up to this many)")
    p.add_argument("--out", required=True,
                   help="run directory: checkpoint.pt (export it with --config CONFIG), metrics.jsonl, results.json")
    g = p.add_argument_group("start and teacher")
    g.add_argument("--from-scratch", action="store_const", const=True,
                   help="start from random weights (AutoSlim's protocol; default: the supernet's at the config)")
    g.add_argument("--teacher", metavar="CKPT_OR_MODEL",
                   help="distill from this hwslim checkpoint (its widest config) or PyTorch model (torchvision:NAME, "
                        "timm:NAME, package.module:callable; default: the supernet's widest config)")
    g.add_argument("--teacher-init", metavar="WEIGHTS",
                   help="the --teacher model's trained weights: a state-dict file or a torchvision/timm weights name")
    g.add_argument("--no-distill", dest="distill", action="store_const", const=False,
                   help="learn from the labels (label smoothing), no teacher")
    g = p.add_argument_group("recipe")
    g.add_argument("--data", help="where the supernet's training data is now (default: as its checkpoint records; "
                                  "the same search split stays held out)")
    add_schedule_options(g, lr="0.01 x batch / 128; 0.1 x with --from-scratch",
                         warmup="0; min(5, 10%%) with --from-scratch")
    g.add_argument("--label-smoothing", type=nonneg_float, help="with --no-distill (default 0.1)")
    g.add_argument("--seed", type=whole_int, help="seeds the shuffling, augmentation and a --from-scratch start (default 0)")
    add_execution_options(p.add_argument_group("execution"), scored="the config")
    p.add_argument("--json", action="store_true",
                   help="print the final accuracies as JSON on stdout (each epoch's metrics go to stderr)")


def run(args) -> int:
    """Finetune one searched config as a network of its own (with knowledge distillation).

    The config is cut out of the supernet as a plain network (its weights at the config,
    or random with --from-scratch) and trained alone, learning from a teacher's soft
    output: the supernet's widest config, or --teacher. Data, schedule, --resume,
    torchrun, AMP and progress work as in `hwslim train`. OUT/checkpoint.pt is a supernet
    checkpoint whose weights at the config are the finetuned ones (it records the config,
    the supernet and its sha256, the budget and the teacher): export, eval, verify and
    cost take it with the same --config. At the end the config is scored before
    (shared weights) and after finetuning (OUT/results.json).

    Example (after the README's workflow, CPU):
      hwslim finetune --checkpoint runs/r20/checkpoint.pt --config search/config_latency_ms_0.5.json \\
          --epochs 2 --out runs/r20_0.5ms
      hwslim export --checkpoint runs/r20_0.5ms/checkpoint.pt --config search/config_latency_ms_0.5.json \\
          --out r20_0.5ms_ft.onnx
    """
    from hwslim.core.errors import HwslimError
    from hwslim.training.finetune import FinetuneConfig, finetune

    if args.resume and args.force:
        raise HwslimError("--resume and --force contradict each other; pick one")
    cfg = FinetuneConfig(**{k: getattr(args, k) for k in FinetuneConfig.__dataclass_fields__})
    cfg.validate()  # before anything changes (threads included)
    set_threads(args.threads)
    result = finetune(cfg, log=with_header(f"hwslim finetune: {threads_note(args.threads)}"))
    return print_result(result, cfg.epochs, args.json)
