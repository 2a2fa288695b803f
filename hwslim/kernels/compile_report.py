"""Compile the kernels for a GPU without one, and report what the compiler made of them.

``python -m hwslim.kernels.compile_report [--arch 90]`` compiles representative
MobileNetV2 1.5x layers ahead of time with Triton's bundled ``ptxas`` and disassembles
them with its bundled ``cuobjdump``: registers, stack (spills), shared memory, and the
instruction mix that decides speed (``HGMMA``: Hopper tensor-core wgmma; ``LDG.E.128``:
16-byte global loads; ``LDGSTS``: cp.async pipelining; ``LDL``/``STL``: local-memory
spills). It needs no device time, so run it before spending any. The argument types
mimic what Triton's launcher specializes at run time (pointers 16-byte aligned, ints
divisible by 16 or equal to 1 flagged), with the hints ``_launch`` adds (VEC, W_ALIGN).

Uses Triton internals (``ASTSource``, ``make_backend``); written against Triton 3.9.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hwslim.kernels import conv as K

PATTERNS = {"HGMMA": r"HGMMA", "HMMA": r"\bHMMA", "FFMA": r"FFMA", "LDG.128": r"LDG\.E\.128",
            "LDG(all)": r"LDG\.E", "STG.128": r"STG\.E\.128", "STG(all)": r"STG\.E", "LDGSTS": r"LDGSTS",
            "LDL/STL": r"\bLDL|\bSTL"}


def _compile(fn, values: dict, ptrs: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            if ptrs[name] is None:
                sig[name], consts[name] = "constexpr", None
            else:
                sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        elif values[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(values[name]) >= 2 ** 31 else "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                          options=opts.__dict__)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def analyse(cc) -> dict[str, int | str]:
    """Registers, stack, shared memory and instruction counts of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cc.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    out: dict[str, int | str] = {"regs": int(regs.group(1)) if regs else "?",
                                 "stack": int(stack.group(1)) if stack else "?", "smem": cc.metadata.shared}
    out.update({k: len(re.findall(p, sass)) for k, p in PATTERNS.items()})
    return out


def layer_case(kind: str, dtype: str, k: int, stride: int, cin: int, cout: int, h: int, cfg: K.BlockConfig, *,
               batch: int = 64, residual: bool = False, multi: bool = False, stats: bool = False,
               arch: int = 90) -> dict:
    """Compile one layer's kernel as ``_launch`` would launch it (channels-last tensors)."""
    oh = (h - 1) // stride + 1
    pt = {"fp32": "*fp32", "bf16": "*bf16"}[dtype]
    dw = kind == "dw"
    w_strides = (k * k, k * k, k, 1) if dw else (cin * k * k, k * k, k, 1)
    vals = dict(B=batch, H=h, W=h, OH=oh, OW=oh, C_OUT_ALLOC=cout, sxn=cin * h * h, sxc=1, sxh=h * cin, sxw=cin,
                sw0=w_strides[0], sw1=w_strides[1], sw2=w_strides[2], sw3=w_strides[3],
                srn=cout * oh * oh, src=1, srh=oh * cout, srw=cout, syn=cout * oh * oh, syc=1, syh=oh * cout,
                syw=cout, s_bn=0, cin_arg=cin, cout_arg=cout, T_MAX=1000, M_KEY=1 << 20, N_KEY=256, K_KEY=256)
    spatial = ("sxn", "sxh", "sxw", "srn", "srh", "srw", "syn", "syh", "syw")
    vec = K.pow2_align(*(vals[s] for s in spatial))
    for s in spatial:
        vals[s] //= vec
    ptrs = dict(x_ptr=pt, w_ptr=pt, scale_ptr=None if stats else "*fp32", shift_ptr=None if stats else "*fp32",
                res_ptr=pt, y_ptr=pt, meta_ptr="*i32" if multi else None, part_ptr="*fp32" if stats else None)
    const = dict(KSIZE=k, STRIDE=stride, PAD=(k - 1) // 2, ACT=2, HAS_RES=residual, MULTI=multi,
                 DOT={"fp32": 0, "bf16": 1}[dtype], PRECISION="tf32", STATS=stats, BN_SLICE=False, VEC=vec,
                 W_ALIGN=K.pow2_align(cin, cout), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    cc = _compile(K.dw_kernel if dw else K.conv_kernel, vals, ptrs, const, cfg.num_warps, cfg.num_stages, arch)
    return analyse(cc)


def dw_project_case(dtype: str, stride: int, hidden: int, cout: int, h: int, cfg: K.BlockConfig, *,
                    batch: int = 64, residual: bool = False, multi: bool = False, arch: int = 90) -> dict:
    """Compile the fused depthwise 3x3 + 1x1 kernel for one inverted residual block."""
    oh = (h - 1) // stride + 1
    pt = {"fp32": "*fp32", "bf16": "*bf16"}[dtype]
    vals = dict(B=batch, H=h, W=h, OH=oh, OW=oh, C_OUT_ALLOC=cout, shn=hidden * h * h, shc=1, shh=h * hidden,
                shw=hidden, swd0=9, swd2=3, swd3=1, swp0=hidden, swp1=1, srn=cout * oh * oh, src=1, srh=oh * cout,
                srw=cout, syn=cout * oh * oh, syc=1, syh=oh * cout, syw=cout, s_bn_d=0, s_bn=0, cin_arg=hidden,
                cout_arg=cout, M_KEY=1 << 20, N_KEY=256, K_KEY=256)
    spatial = ("shn", "shh", "shw", "srn", "srh", "srw", "syn", "syh", "syw")
    vec = K.pow2_align(*(vals[s] for s in spatial))
    for s in spatial:
        vals[s] //= vec
    ptrs = dict(h_ptr=pt, wd_ptr=pt, dscale_ptr="*fp32", dshift_ptr="*fp32", wp_ptr=pt, scale_ptr="*fp32",
                shift_ptr="*fp32", res_ptr=pt, y_ptr=pt, meta_ptr="*i32" if multi else None,
                dmeta_ptr="*i32" if multi else None)
    const = dict(KSIZE=3, STRIDE=stride, PAD=1, ACT_D=2, ACT=0, HAS_RES=residual, MULTI=multi,
                 DOT={"fp32": 0, "bf16": 1}[dtype], PRECISION="tf32", BN_SLICE=False, VEC=vec,
                 W_ALIGN=K.pow2_align(hidden, cout), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    cc = _compile(K.dw_project_kernel, vals, ptrs, const, cfg.num_warps, cfg.num_stages, arch)
    return analyse(cc)


CASES = [  # MobileNetV2 1.5x at 224 (kind, k, stride, cin, cout, h, extra)
    ("stem 3x3 s2", "dense", 3, 2, 3, 48, 224, {}),
    ("b1/expand 1x1 24->144", "dense", 1, 1, 24, 144, 112, {}),
    ("b3/dw 3x3 s1 216", "dw", 3, 1, 216, 216, 56, {}),
    ("b1/dw 3x3 s2 144", "dw", 3, 2, 144, 144, 112, {}),
    ("b5/project 288->48 +res multi", "dense", 1, 1, 288, 48, 28, {"residual": True, "multi": True}),
    ("b7/expand 96->576 stats", "dense", 1, 1, 96, 576, 14, {"stats": True}),
    ("head 480->1920", "dense", 1, 1, 480, 1920, 7, {}),
]


FUSED_CASES = [  # (name, stride, hidden, cout, h, extra): depthwise 3x3 + project 1x1
    ("b3 dw+project 216->48 +res multi", 1, 216, 48, 56, {"residual": True, "multi": True}),
    ("b4 dw+project s2 216->48", 2, 216, 48, 56, {}),
    ("b14 dw+project 1440->240 +res", 1, 1440, 240, 7, {"residual": True}),
]


def main(argv: list[str] | None = None) -> int:
    from hwslim.core.report import print_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--dtypes", default="bf16,fp32")
    args = p.parse_args(argv)
    rows = []
    for dtype in args.dtypes.split(","):
        for name, kind, k, stride, cin, cout, h, extra in CASES:
            for cfg in K.config_list(kind == "dw", cin)[:3]:
                r = layer_case(kind, dtype, k, stride, cin, cout, h, cfg, arch=args.arch, **extra)
                rows.append({"layer": name, "dtype": dtype,
                             "tile": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                             **r})
        for name, stride, hidden, cout, h, extra in FUSED_CASES:
            for cfg in K.DW_PROJECT_CONFIGS[:3]:
                r = dw_project_case(dtype, stride, hidden, cout, h, cfg, arch=args.arch, **extra)
                rows.append({"layer": name, "dtype": dtype,
                             "tile": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                             **r})
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
