"""Fused slimmable conv kernels vs PyTorch slicing + cuDNN, on one CUDA GPU.

Three parts, all measured in one run (ratios side by side, same GPU):

1. **ceilings**: a 1 GiB device-to-device copy (bytes read + written) and 8192^3
   matrix products (bf16, tf32, fp32), the measured bandwidth and FLOP ceilings;
2. **layers**: MobileNetV2 1.5x layers at 224 (stem 3x3/s2, 1x1 expand and project
   with residual, depthwise 3x3 s1/s2, the 1x1 head) at full and 2/3 width, each as
   PyTorch eager (the supernet's ``SlimmableConvBN``: slice, cuDNN conv, BN, add,
   activation), the same in a CUDA graph, and the fused Triton kernel (eager launch and
   in a CUDA graph); with the achieved fraction of the binding ceiling;
3. **step**: one whole greedy step of MobileNetV2 1.5x at 224 (every unit one grid step
   narrower: 26 candidates) on ``--step-batch`` images: PyTorch per candidate, PyTorch
   with the shared prefix computed once (eager and CUDA graph), and
   :func:`hwslim.kernels.multi_forward` (eager and CUDA graph; with and without the
   depthwise + 1x1 fusion); BN from running statistics (``running``) and train-mode
   batch statistics (``batch``). Each path's decision (the candidate with the lowest
   loss on fixed random labels) is compared.

Also the depthwise + 1x1 pairs of three blocks: PyTorch, two Triton kernels, one fused.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
run). fp32 convs use tf32 on both sides (PyTorch's cuDNN default). Run from the
repository root: ``python benchmarks/kernel.py [--quick]``. Without a GPU it says so and
exits.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bench(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))


def _graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (already warmed up: autotuning done) into a CUDA graph; returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


# -- 1. ceilings --------------------------------------------------------------------------------
def ceilings(rep_ms: int) -> dict[str, float]:
    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a), rep_ms)
    out = {"bw_gbps": 2 * a.numel() * 4 / t / 1e6}
    del a, b
    m = 8192
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        x = torch.randn(m, m, device="cuda").to(dtype)
        y = torch.randn(m, m, device="cuda").to(dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = _bench(lambda: x @ y, rep_ms)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[f"{name}_tflops"] = 2 * m ** 3 / t / 1e9
    torch.cuda.empty_cache()
    return out


def _ceiling_rows(c: dict[str, float]) -> list[dict]:
    return [{"part": "ceiling", "name": "d2d copy 1GiB", "dtype": "fp32", "path": "torch", "ms": "",
             "gbps": c["bw_gbps"], "tflops": "", "frac": 1.0, "bound": "bw", "speedup": "", "note": ""}] + [
        {"part": "ceiling", "name": "matmul 8192^3", "dtype": k, "path": "torch", "ms": "", "gbps": "",
         "tflops": c[f"{k}_tflops"], "frac": 1.0, "bound": "flop", "speedup": "", "note": ""}
        for k in ("bf16", "tf32", "fp32")]


# -- 2. layers ----------------------------------------------------------------------------------
# MobileNetV2 1.5x at 224: (name, kernel, stride, cin_max, cout_max, in_h, depthwise, act, residual)
LAYERS = [
    ("stem 3x3 s2", 3, 2, 3, 48, 224, False, "relu6", False),
    ("b1/expand 1x1", 1, 1, 24, 144, 112, False, "relu6", False),
    ("b1/dw 3x3 s2", 3, 2, 144, 144, 112, True, "relu6", False),
    ("b3/dw 3x3 s1", 3, 1, 216, 216, 56, True, "relu6", False),
    ("b5/project 1x1+res", 1, 1, 288, 48, 28, False, None, True),
    ("b7/expand 1x1", 1, 1, 96, 576, 14, False, "relu6", False),
    ("head 1x1", 1, 1, 480, 1920, 7, False, "relu6", False),
]


_INPLACE = {None: None, "relu": torch.relu_, "relu6": lambda t: t.clamp_(0.0, 6.0)}


def _width(full: int, frac: float) -> int:
    """The grid width nearest ``frac`` of ``full``, by the project's one rounding rule."""
    from hwslim.core.rounding import make_divisible

    return full if frac == 1.0 else min(full, make_divisible(full * frac))


def layer_rows(batch: int, dtypes: list[str], rep_ms: int, ceil: dict[str, float]) -> list[dict]:
    from hwslim.kernels import conv_bn_act, fold_bn
    from hwslim.core.slimmable import SlimmableConv2d, SlimmableConvBN

    rows = []
    for name, k, stride, cin_max, cout_max, h, dw, act, res in LAYERS:
        for dname in dtypes:
            dtype = DTYPES[dname]
            module = SlimmableConvBN(SlimmableConv2d(cin_max, cout_max, k, stride, (k - 1) // 2, depthwise=dw))
            with torch.no_grad():
                module.bn.running_mean.uniform_(-0.5, 0.5)
                module.bn.running_var.uniform_(0.5, 2.0)
            module = module.cuda().eval().to(dtype)
            for frac in (1.0, 2 / 3):
                cin = _width(cin_max, frac) if cin_max > 3 else cin_max
                cout = cin if dw else _width(cout_max, frac)
                x = torch.randn(batch, cin, h, h, device="cuda").to(dtype).contiguous(
                    memory_format=torch.channels_last)
                oh = (h - 1) // stride + 1
                r = torch.randn(batch, cout, oh, oh, device="cuda").to(dtype).contiguous(
                    memory_format=torch.channels_last) if res else None
                act_fn = _INPLACE[act]
                scale, shift = fold_bn(module.bn)
                weight = module.conv.weight

                def torch_path():
                    with torch.no_grad():
                        y = module(x, None if dw else cout)
                        if r is not None:
                            y = y.add_(r)
                        return act_fn(y) if act_fn is not None else y  # in place, as run_graph under no_grad

                def triton_path():
                    return conv_bn_act(x, weight, scale, shift, stride=stride, act=act, residual=r, depthwise=dw,
                                       cin=cin, cout=cout, tf32=True)

                ref = torch_path().float()
                err = float((triton_path().float() - ref).norm() / ref.norm().clamp_min(1e-30))
                elt = torch.finfo(dtype).bits // 8
                bytes_ = elt * (x.numel() + batch * cout * oh * oh * (2 if res else 1)
                                + weight[:cout].numel() * (cin / cin_max if not dw else 1))
                flops = 2 * batch * oh * oh * cout * (1 if dw else cin) * k * k
                peak = ceil["bf16_tflops" if dtype == torch.bfloat16 else "tf32_tflops"]
                times = _time_paths((("torch eager", torch_path), ("triton", triton_path)), rep_ms)
                rows += _rate_rows(times, bytes_, flops, ceil["bw_gbps"], peak, "triton", f"rel_err={err:.1e}",
                                   {"part": "layer", "name": name, "dtype": dname, "cin": cin, "cout": cout,
                                    "batch": batch})
                del x, r
            del module
            torch.cuda.empty_cache()
    return rows


def _time_paths(paths, rep_ms: float) -> dict[str, float]:
    """Median ms of each (name, fn), eager and replayed as a CUDA graph ("NAME graph")."""
    times = {}
    for path, fn in paths:
        times[path] = _bench(fn, rep_ms)
        times[path + " graph"] = _bench(_graph(fn), rep_ms)
    return times


def _rate_rows(times: dict[str, float], bytes_: float, flops: float, bw_gbps: float, peak_tflops: float,
               checked: str, note: str, fields: dict) -> list[dict]:
    """One row per timed path: achieved GB/s and TFLOP/s, the fraction of the roofline, the
    bound, the speed-up over the best PyTorch path; ``note`` on the ``checked`` path."""
    best_torch = min(times["torch eager"], times["torch eager graph"])
    rows = []
    for path, t in times.items():
        gbps, tflops = bytes_ / t / 1e6, flops / t / 1e9
        fb, ff = gbps / bw_gbps, tflops / peak_tflops
        rows.append({**{k: fields[k] for k in ("part", "name", "dtype")}, "path": path.replace(" eager graph", " graph"),
                     **{k: fields[k] for k in ("cin", "cout", "batch")}, "ms": t, "gbps": gbps, "tflops": tflops,
                     "frac": max(fb, ff), "bound": "bw" if fb >= ff else "flop", "speedup": best_torch / t,
                     "note": note if path == checked else ""})
    return rows


PAIRS = [  # depthwise 3x3 + 1x1 project of MobileNetV2 1.5x blocks: (name, hidden, cout, in_h, stride, residual)
    ("b3 dw+project +res", 216, 48, 56, 1, True),
    ("b4 dw s2+project", 216, 48, 56, 2, False),
    ("b14 dw+project +res", 1440, 240, 7, 1, True),
]


def pair_rows(batch: int, dtypes: list[str], rep_ms: int, ceil: dict[str, float]) -> list[dict]:
    """Depthwise + project: PyTorch (2 SlimmableConvBN + act + add), two fused kernels, one fused kernel."""
    from hwslim.kernels import conv_bn_act, dw_project_bn_act, fold_bn
    from hwslim.core.slimmable import SlimmableConv2d, SlimmableConvBN

    rows = []
    for name, hidden, cout, h, stride, res in PAIRS:
        for dname in dtypes:
            dtype = DTYPES[dname]
            dw = SlimmableConvBN(SlimmableConv2d(hidden, hidden, 3, stride, 1, depthwise=True)).cuda().eval().to(dtype)
            pj = SlimmableConvBN(SlimmableConv2d(hidden, cout, 1)).cuda().eval().to(dtype)
            x = torch.randn(batch, hidden, h, h, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
            oh = (h - 1) // stride + 1
            r = torch.randn(batch, cout, oh, oh, device="cuda").to(dtype).contiguous(
                memory_format=torch.channels_last) if res else None
            (dsc, dsh), (sc, sh) = fold_bn(dw.bn), fold_bn(pj.bn)

            def torch_path():
                with torch.no_grad():
                    y = pj(dw(x).clamp_(0, 6), cout)
                    return y.add_(r) if r is not None else y

            def two_kernels():
                d = conv_bn_act(x, dw.conv.weight, dsc, dsh, stride=stride, act="relu6", depthwise=True, tf32=True)
                return conv_bn_act(d, pj.conv.weight, sc, sh, residual=r, tf32=True)

            def fused():
                return dw_project_bn_act(x, dw.conv.weight, dsc, dsh, pj.conv.weight, sc, sh, stride=stride,
                                         residual=r, tf32=True)

            ref = torch_path().float()
            err = float((fused().float() - ref).norm() / ref.norm().clamp_min(1e-30))
            elt = torch.finfo(dtype).bits // 8
            bytes_ = elt * (x.numel() + batch * cout * oh * oh * (2 if res else 1))  # fused floor: no hidden
            flops = 2 * batch * oh * oh * hidden * (9 + cout)
            peak = ceil["bf16_tflops" if dtype == torch.bfloat16 else "tf32_tflops"]
            times = _time_paths((("torch eager", torch_path), ("triton 2 kernels", two_kernels),
                                 ("triton fused", fused)), rep_ms)
            rows += _rate_rows(times, bytes_, flops, ceil["bw_gbps"], peak, "triton fused", f"rel_err={err:.1e}",
                               {"part": "pair", "name": name, "dtype": dname, "cin": hidden, "cout": cout,
                                "batch": batch})
            del dw, pj, x, r
            torch.cuda.empty_cache()
    return rows


# -- 3. one greedy step ---------------------------------------------------------------------------
def greedy_candidates(net, current) -> list:
    steps = {u: unit.narrower(current.widths[u]) for u, unit in net.units.items()}
    return [net.config_of({**current.widths, u: w}) for u, w in steps.items() if w is not None]


class TorchStep:
    """The PyTorch path with the shared prefix computed once (like the evaluator's fast mode)."""

    def __init__(self, net, current, cands, x, bn: str) -> None:
        from hwslim.core.graph import INPUT

        self.net, self.current, self.cands, self.x, self.bn = net, current, cands, x, bn
        first = {u: idx[0] for u, idx in net.unit_nodes().items()}
        changed = [next(u for u in c.widths if c.widths[u] != current.widths[u]) for c in cands]
        self.order = sorted(range(len(cands)), key=lambda k: first[changed[k]])
        self.start = [first[changed[k]] for k in range(len(cands))]
        self.input = INPUT

    def _mode(self) -> None:
        self.net.eval()
        if self.bn == "batch":
            for m in self.net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.train()

    @torch.no_grad()
    def __call__(self) -> list[torch.Tensor]:
        from hwslim.core.graph import run_graph

        net = self.net
        self._mode()
        out: list = [None] * len(self.cands)
        env, pos = {self.input: self.x}, 0
        for k in self.order:
            start = self.start[k]
            if start > pos:
                with net.using(self.current):
                    env = run_graph(net.nodes, net._layer, None, start=pos, env=env, stop=start)
                pos = start
            with net.using(self.cands[k]):
                out[k] = run_graph(net.nodes, net._layer, None, start=start, env=env)
        return out

    @torch.no_grad()
    def naive(self) -> list[torch.Tensor]:
        self._mode()
        out = []
        for c in self.cands:
            with self.net.using(c):
                out.append(self.net(self.x))
        return out


def _decision(logits: list[torch.Tensor] | torch.Tensor, labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    losses = torch.stack([torch.nn.functional.cross_entropy(l.float(), labels) for l in logits])
    return int(losses.argmin()), losses


def step_rows(batch: int, dtypes: list[str], rep_ms: int, naive: bool) -> list[dict]:
    from hwslim import kernels
    from hwslim.models.registry import create_model

    rows = []
    base = create_model("mobilenet_v2").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    for dname in dtypes:
        dtype = DTYPES[dname]
        net = copy.deepcopy(base).cuda().to(dtype).eval()
        current = net.full_config()
        cands = greedy_candidates(net, current)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device="cuda")
        plan = kernels.plan_multi(net, cands, "cuda")
        for bn in ("running", "batch"):
            tstep = TorchStep(net, current, cands, x, bn)
            paths: dict[str, Callable[[], object]] = {
                "torch prefix": tstep,
                "triton multi": lambda bn=bn: kernels.multi_forward(net, x, plan, bn=bn, tf32=True),
            }
            if bn == "running":  # fusion applies to eval-mode BN only
                paths["triton multi unfused"] = lambda: kernels.multi_forward(net, x, plan, bn="running", fuse=False,
                                                                              tf32=True)
            if naive:
                paths["torch per-candidate"] = tstep.naive
            decisions, results = {}, {}
            for path, fn in paths.items():
                d, losses = _decision(fn(), labels)  # also warms up / autotunes
                decisions[path], results[path] = d, losses
            times = {}
            for path, fn in paths.items():
                times[path] = _bench(fn, rep_ms)
                if path != "torch per-candidate":
                    times[path + " graph"] = _bench(_graph(fn), rep_ms)
                torch.cuda.empty_cache()
            best_torch = min(t for p, t in times.items() if p.startswith("torch"))
            ref = results["torch prefix"]
            for path, t in times.items():
                key = path.replace(" graph", "")
                dl = float((results[key] - ref).abs().max())
                rows.append({"part": "step", "name": f"mbv2-1.5x step bn={bn}", "dtype": dname, "path": path,
                             "cin": "", "cout": len(cands), "batch": batch, "ms": t, "gbps": "", "tflops": "",
                             "frac": "", "bound": "", "speedup": best_torch / t,
                             "note": f"decision={decisions[key]} same={decisions[key] == decisions['torch prefix']} "
                                     f"max|dloss|={dl:.1e} work={plan.work_fraction(net):.2f}"})
        del net, x, plan
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="images per layer benchmark (a search split slice)")
    p.add_argument("--step-batch", type=int, default=64, help="images per greedy-step benchmark")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--parts", default="ceilings,layers,step")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    p.add_argument("--naive", action="store_true", help="also time PyTorch per candidate without prefix sharing")
    p.add_argument("--quick", action="store_true", help="small batches and short repetitions (a first look)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel.py needs a CUDA GPU and none is visible: nothing measured.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernel.py needs Triton (pip install triton): nothing measured.", file=sys.stderr)
        return 2
    from benchmarks.common import print_table, write_csv

    if args.quick:
        args.batch, args.step_batch, args.rep_ms = 32, 16, 50
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    parts = {s.strip() for s in args.parts.split(",")}
    torch.backends.cudnn.benchmark = True  # PyTorch's best conv algorithms, chosen at warm-up
    torch.backends.cudnn.allow_tf32 = True
    rows: list[dict] = []
    ceil = ceilings(args.rep_ms)
    rows += _ceiling_rows(ceil)
    if "layers" in parts:
        rows += layer_rows(args.batch, dtypes, args.rep_ms, ceil)
        rows += pair_rows(args.batch, dtypes, args.rep_ms, ceil)
    if "step" in parts:
        rows += step_rows(args.step_batch, dtypes, args.rep_ms, args.naive)
    cols = ["part", "name", "dtype", "path", "cin", "cout", "batch", "ms", "gbps", "tflops", "frac", "bound",
            "speedup", "note"]
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    print_table(rows, cols)
    print(f"wrote {write_csv(rows, 'kernel')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run as a script
    raise SystemExit(main())
