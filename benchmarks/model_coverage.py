"""Which published CNNs does ``import_model`` take, and does what it builds compute the same thing?

For every CNN classifier in torchvision (its transformers are listed and left out) and
a set of popular timm CNNs, with random weights and randomized BatchNorm statistics, in
eval mode at 224 px:

1. **imports?** ``hwslim.import_model``; a refusal is recorded with its message.
2. **parity**: the supernet at its full config against the original, max abs diff
   relative to the output's largest magnitude (pass: <= 1e-4).
3. **costs**: hwslim's parameter count and MACs against the original's: MACs by
   ``torch.utils.flop_counter.FlopCounterMode`` // 2 (counted on the "meta" device),
   parameters of the modules the forward pass runs (googlenet's auxiliary heads do not
   run in eval mode and are not in the traced graph: ``params_note`` says so).
4. **slim + export**: at 3 random configs, ``materialize`` then ``export_onnx``, run in
   ONNX Runtime against the supernet at that config (pass: <= 1e-4 relative).

Beyond classifiers (issue 29): ``--detseg`` runs torchvision's segmenters whole (their dict
output) and its detectors' backbone with its FPN (the box heads' post-processing is no network
layer), with random weights and no download; ``--idioms`` runs small modules written the way
people write them (PReLU, GroupNorm, 'same' padding, an SE of Linear layers, ``y.add_(x)``, a
conv called twice...); timm's and Ultralytics' models run when those optional packages are
installed (never hwslim dependencies; Ultralytics' with the raw head, ``--outputs raw``). A model with several outputs is compared output by
output, in PyTorch and in ONNX Runtime.

A row is ``ok`` only when all four hold. A model refused only because some units reach
an operation that moves channels (ShuffleNetV2's channel shuffle and split) is imported
again with ``fix_unsupported=True`` (``--fix-unsupported`` on the CLI): those units keep
their width (column ``fixed_units``), the others slim, and the row is ``ok-fixed`` when
all four checks hold. A known fixed-width operator (YOLO11's attention) fixes its units by
itself: the row is ``ok``, with those units counted in ``fixed_units``. Heavy models (over 4 GMACs) run their parity at batch 1, the
others at batch 2; ONNX Runtime always at batch 1.

    python -m benchmarks.model_coverage                    # everything: 6 min on 2 idle cores, 25 under load
    python -m benchmarks.model_coverage --quick            # one model per family, 1 config
    python -m benchmarks.model_coverage --models resnet18 timm:regnety_002
    python -m benchmarks.model_coverage --detseg --idioms --size 160 --name model_coverage_detseg
    python -m benchmarks.model_coverage --models shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5 \
        shufflenet_v2_x2_0 --name model_coverage_fixed
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from benchmarks.common import print_table, write_csv

TOL = 1e-4
HEAVY_MACS = 4e9
# torchvision classifiers that are transformers, not CNNs: not this benchmark's subject
NOT_CNN = ("vit_", "swin_", "maxvit_")
TIMM_MODELS = ("resnet18", "resnet50", "resnet50d", "seresnet50", "resnext26ts", "efficientnet_b0",
               "efficientnet_lite0", "tf_efficientnet_b0", "efficientnetv2_rw_s", "mobilenetv2_100",
               "mobilenetv3_large_100", "mobilenetv4_conv_small", "lcnet_100", "mnasnet_100", "fbnetc_100",
               "tinynet_a", "regnetx_002", "regnety_002", "regnety_004", "regnety_008", "regnetz_b16",
               "rexnet_100", "ghostnet_100", "mixnet_s", "densenet121", "dla34", "cspdarknet53", "dpn68",
               "hrnet_w18_small")
# detection and segmentation: segmenters whole, detectors' backbone + FPN; then the optional extras
DETSEG = ("seg:lraspp_mobilenet_v3_large", "seg:deeplabv3_mobilenet_v3_large", "seg:fcn_resnet50",
          "det:ssdlite320_mobilenet_v3_large", "det:fasterrcnn_mobilenet_v3_large_fpn", "det:retinanet_resnet50_fpn")
DETSEG_TIMM = ("ghostnet_100", "mixnet_s", "rexnet_100", "cspresnet50", "ese_vovnet19b_dw", "hrnet_w18_small",
               "mobileone_s0", "ghostnetv2_100")
DETSEG_ULTRALYTICS = ("yolov8n", "yolov8s", "yolo11n", "yolo11s", "yolov8n-cls", "yolov8n-seg", "yolo11n-cls",
                      "yolo11n-seg")
QUICK = ("resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0",
         "regnet_x_400mf", "regnet_y_400mf", "densenet121", "googlenet", "shufflenet_v2_x0_5", "squeezenet1_1",
         "vgg11_bn", "alexnet", "convnext_tiny", "timm:resnet50d", "timm:efficientnet_b0", "timm:regnety_002",
         "timm:mobilenetv3_large_100", "timm:ghostnet_100")


def torchvision_cnns() -> list[str]:
    return [m for m in torchvision.models.list_models(module=torchvision.models) if not m.startswith(NOT_CNN)]


def detseg_names() -> list[str]:
    """Issue 29's list: torchvision's (always), timm's and Ultralytics' (when installed)."""
    import importlib.util

    names = list(DETSEG)
    for package, models in (("timm", DETSEG_TIMM), ("ultralytics", DETSEG_ULTRALYTICS)):
        if importlib.util.find_spec(package) is None:
            print(f"{package} is not installed: its models are not run", file=sys.stderr)
        else:
            names += [f"{package}:{m}" for m in models]
    return names


def not_cnns() -> list[str]:
    return [m for m in torchvision.models.list_models(module=torchvision.models) if m.startswith(NOT_CNN)]


def builder(name: str) -> Callable[[], nn.Module]:
    """``name`` ("resnet18" from torchvision, "timm:resnet18" from timm, "seg:", "det:", "idiom:",
    "ultralytics:") as a constructor with random weights."""
    source, _, short = name.partition(":")
    if source == "timm":
        import timm

        return lambda: timm.create_model(short, pretrained=False)
    if source == "seg":
        return lambda: torchvision.models.get_model(short, weights=None, weights_backbone=None)
    if source == "det":
        return lambda: torchvision.models.get_model(short, weights=None, weights_backbone=None).backbone
    if source == "idiom":
        from benchmarks.idioms import IDIOMS

        return IDIOMS[short]
    if source == "ultralytics":
        from ultralytics import YOLO

        from hwslim.importing.raw_outputs import raw_outputs

        # built from its yaml (random weights, no download), with the raw head (--outputs raw): the
        # per-level maps, a Classify head's logits; the decoding is left out as deployment flows do
        return lambda: raw_outputs(YOLO(f"{short}.yaml", verbose=False).model)
    kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}  # skip scipy's slow init
    return lambda: torchvision.models.get_model(name, weights=None, **kw)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (fresh ones are the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats:
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return module.eval()


@dataclass
class Reference:
    macs: int
    params_all: int
    params_run: int  # of the modules the forward pass calls


def reference_costs(build: Callable[[], nn.Module], built: nn.Module, size: int) -> Reference:
    """MACs (FlopCounterMode // 2) and parameters of the original, on the meta device (no arithmetic)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            m = build().eval()
    except (NotImplementedError, RuntimeError):  # a constructor that computes with tensors (RegNet's widths,
        # Ultralytics' strides: .item() on meta): copy the built one
        m = copy.deepcopy(built).to("meta").eval()
    called: list[nn.Module] = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: called.append(mod))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.empty(1, 3, size, size, device="meta"))
    finally:
        handle.remove()
    run = {id(p): p.numel() for mod in called for p in _weights(mod)}
    return Reference(counter.get_total_flops() // 2, sum(p.numel() for p in m.parameters()), sum(run.values()))


def _weights(mod: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters; a FrozenBatchNorm2d's scale and shift too (buffers there, trained
    parameters of the BatchNorm hwslim imports it as)."""
    frozen = type(mod).__name__ == "FrozenBatchNorm2d"
    return list(mod.parameters(recurse=False)) + ([mod.weight, mod.bias] if frozen else [])


def tensors(y) -> list[torch.Tensor]:
    """A model's output(s) as a list: one tensor, or a tuple, list or dict of them."""
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for v in (y.values() if isinstance(y, dict) else y) for t in tensors(v)]


def rel_diff(got, want) -> float:
    """The worst output's max abs difference relative to its largest magnitude."""
    got, want = tensors(got), tensors(want)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs, expected {len(want)}")
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want))


def ort_run(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def check(name: str, size: int, configs: int, tmp: Path) -> dict:
    """One model through import, parity, costs and export; the row of the table."""
    from hwslim.core.costs import model_costs
    from hwslim.runtimes.onnx_file import export_onnx
    from hwslim.importing.fx_trace import ImportRefused, import_model
    from hwslim.core.materialize import materialize

    source, _, short = name.rpartition(":")
    source = source or "torchvision"
    row: dict = {"source": source, "model": short, "status": "", "units": "", "fixed_units": "", "import_s": "",
                 "full_rel": "",
                 "ort_rel": "", "params_ref": "", "params_hw": "", "macs_ref": "", "macs_hw": "", "batch": "",
                 "total_s": "", "params_note": "", "reason": ""}
    t_start = time.perf_counter()
    build = builder(name)
    torch.manual_seed(0)
    theirs = randomize(build())
    try:
        ref = reference_costs(build, theirs, size)
    except Exception as e:  # the original itself does not run at this size (or on meta)
        ref = None
        row["reason"] = f"reference costs failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    batch = 1 if ref is None or ref.macs > HEAVY_MACS else 2
    row["batch"] = batch
    x = torch.randn(batch, 3, size, size)
    fixed = False
    try:
        t0 = time.perf_counter()
        try:
            net = import_model(theirs, x[:1], name=short)
        except ImportRefused as e:
            if "--fix-unsupported" not in str(e):
                raise
            fixed = True  # only some units cannot slim: import with them fixed, as --fix-unsupported does
            t0 = time.perf_counter()
            net = import_model(theirs, x[:1], name=short, fix_unsupported=True)
        row["import_s"] = time.perf_counter() - t0
    except ImportRefused as e:
        row.update(status="refused", reason=str(e), total_s=time.perf_counter() - t_start)
        return row
    except Exception as e:  # an importer bug: say so, with where it happened
        tb = traceback.extract_tb(e.__traceback__)[-1]
        row.update(status="error", total_s=time.perf_counter() - t_start,
                   reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]} "
                          f"({Path(tb.filename).name}:{tb.lineno})")
        return row
    row["units"] = len(net.units)
    from hwslim.importing.fx_trace import fixed_units

    if fixed_units(net):  # --fix-unsupported's, or a fixed-width operator's (an attention) by itself
        row["fixed_units"] = len(fixed_units(net))
    problems = []
    try:
        with torch.no_grad():
            want = theirs(x)
            row["full_rel"] = rel_diff(net(x), want)
        del theirs, want
        gc.collect()
        if row["full_rel"] > TOL:
            problems.append(f"full-config output differs ({row['full_rel']:.1e} relative)")
        c = model_costs(net, input_size=size)
        row.update(params_hw=c.params, macs_hw=c.macs)
        if ref is not None:
            row.update(params_ref=ref.params_run, macs_ref=ref.macs)
            if ref.params_run != ref.params_all:
                row["params_note"] = (f"params_ref counts the modules the forward runs: {ref.params_run:,} of "
                                      f"{ref.params_all:,} ({ref.params_all - ref.params_run:,} not run in eval)")
            if c.params != ref.params_run:
                problems.append(f"params {c.params:,} != {ref.params_run:,}")
            if c.macs != ref.macs:
                problems.append(f"MACs {c.macs:,} != {ref.macs:,}")
        else:
            problems.append("costs not checked")
        rng = random.Random(0)
        worst = 0.0
        x1 = x[:1]
        for k in range(configs):
            cfg = net.random_config(rng)
            with torch.no_grad(), net.using(cfg):
                want = net(x1)
            plain = materialize(net, cfg).eval()
            path = export_onnx(plain, tmp / f"{short}_{k}.onnx", input_size=size)
            del plain
            got = ort_run(path, x1)
            path.unlink()
            worst = max(worst, rel_diff(got, want))
        row["ort_rel"] = worst
        if worst > TOL:
            problems.append(f"ONNX Runtime output differs ({worst:.1e} relative)")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]} ({Path(tb.filename).name}:{tb.lineno})")
    row["status"] = ("ok-fixed" if fixed else "ok") if not problems else "mismatch"
    row["reason"] = "; ".join(problems + ([row["reason"]] if row["reason"] else []))
    row["total_s"] = time.perf_counter() - t_start
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", help="names (timm ones as timm:NAME); default: all")
    ap.add_argument("--quick", action="store_true", help="one model per family, 1 random config")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--configs", type=int, default=None, help="random configs through ONNX Runtime (default 3)")
    ap.add_argument("--no-timm", action="store_true", help="torchvision only")
    ap.add_argument("--detseg", action="store_true", help="detection and segmentation models (issue 29's list)")
    ap.add_argument("--idioms", action="store_true", help="small modules written as people write them")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--name", default="model_coverage", help="CSV name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = args.configs if args.configs is not None else (1 if args.quick else 3)
    if args.models:
        names = args.models
    elif args.detseg or args.idioms:
        names = detseg_names() if args.detseg else []
        if args.idioms:
            from benchmarks.idioms import IDIOMS

            names += [f"idiom:{k}" for k in IDIOMS]
    elif args.quick:
        names = list(QUICK)
    else:
        names = torchvision_cnns()
        if not args.no_timm:
            try:
                import timm  # noqa: F401

                names += [f"timm:{m}" for m in TIMM_MODELS]
            except ImportError:
                print("timm is not installed (pip install hwslim[timm]): its models are not run", file=sys.stderr)
    if not (args.models or args.detseg or args.idioms):
        print(f"not CNNs, left out: {', '.join(not_cnns())}")
    rows = []
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hwslim_coverage_") as tmp:
        for name in names:
            row = check(name, args.size, configs, Path(tmp))
            rows.append(row)
            print(f"{name:32s} {row['status']:8s} {row['total_s']:6.1f}s  {row['reason'][:150]}", flush=True)
            gc.collect()
    wall = time.perf_counter() - t0
    columns = ["source", "model", "status", "units", "fixed_units", "import_s", "full_rel", "ort_rel", "params_ref",
               "params_hw", "macs_ref", "macs_hw", "batch", "total_s", "params_note"]
    print()
    print_table(rows, columns)
    fails = [r for r in rows if r["status"] not in ("ok", "ok-fixed")]
    if fails:
        print("\nnot ok:")
        for r in fails:
            print(f"  {r['source']}:{r['model']}: {r['status']}: {r['reason']}")
    print()
    for source in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == source]
        if mine:
            ok = sum(r["status"] == "ok" for r in mine)
            print(f"{source}: {ok}/{len(mine)} fully slimmable with parity ({100 * ok / len(mine):.1f}%), "
                  f"{sum(r['status'] == 'ok-fixed' for r in mine)} more with parity and some units fixed "
                  f"(--fix-unsupported), {sum(r['status'] == 'refused' for r in mine)} refused by name, "
                  f"{sum(r['status'] in ('error', 'mismatch') for r in mine)} error/mismatch")
    load1 = os.getloadavg()[0]
    common = {"size": args.size, "configs": configs, "threads": args.threads, "load_start": f"{load0:.2f}",
              "load_end": f"{load1:.2f}", "wall_s": f"{wall:.0f}"}
    path = write_csv([{**r, **common} for r in rows], args.name)
    print(f"{len(rows)} models in {wall / 60:.1f} min, load {load0:.2f} -> {load1:.2f}; written to {path}")


if __name__ == "__main__":
    main()
