"""Fused slimmable conv + BN + (residual) + activation kernels, written in Triton.

One kernel call computes a whole graph ``conv`` node at any active width,
``act(conv(x, W[:cout, :cin]) * scale + shift + residual)``, reading the supernet's
*full-width* weight in place: the active widths are loop bounds and masks, never a
sliced copy. ``scale``/``shift`` are the eval-mode BatchNorm folded per channel
(``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``, see
:func:`fold_bn`).

Two kernels:

* ``_conv_kernel``: a dense conv (groups=1, any square kernel, stride, padding) as an
  implicit GEMM: M = output pixels (n, oh, ow), N = output channels, K = input channels
  x kernel taps. A program owns a ``BLOCK_M x BLOCK_N`` output tile; for each tap it
  loops over the *active* input channels in ``BLOCK_K`` steps and feeds ``tl.dot``
  (tensor cores for bf16/fp16, tf32 or exact fp32 for fp32), accumulating in fp32. The
  program index runs over output-channel tiles fastest, so the programs that share one
  activation tile run back to back and read it from L2, while the whole weight
  (at most a few MB) stays resident.
* ``_dw_kernel``: a depthwise conv (groups = channels), memory-bound: a program owns
  ``BLOCK_P`` output pixels x ``BLOCK_C`` channels, loads channel-contiguous rows
  (vectorized when the tensor is channels-last) and does the taps with FMAs.

Both take strides for every tensor, so NCHW and channels-last inputs both work
(channels-last is the fast one, and what these wrappers allocate for outputs).

**Multi-config form.** A launch can evaluate S width configs of the same layer at once
(the candidates of one greedy step): the batch is S slices of ``batch`` images, and an
int32 ``meta`` table gives each output slice ``(cin, cout, x_slice, res_slice,
bn_row)``: its own widths, which input slice it reads (slices that share an input need
no copy), which residual slice it adds and which BN row it uses. Output channels from
``cout`` up to the allocated width are written as exact zeros, so a zero-padded slice
is the same tensor as the narrow one: the next conv masks by its own ``cin``, and
pooling and the classifier can run on the padded tensor unchanged.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on
CPU tensors through Triton's interpreter: slow, for tests. The interpreter computes
bfloat16 arithmetic on the raw bit patterns (Triton's documented limitation: "use
tl.cast to float32"), so when interpreting, bf16 operands are upcast to fp32 before
``tl.dot``; bf16 x bf16 products are exact in fp32, so only the summation order differs
from the GPU's bf16 tensor-core path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: True when the kernels were decorated under TRITON_INTERPRET=1 (CPU interpreter).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_CODES = {None: 0, "relu": 1, "relu6": 2}
_DOT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
META_COLUMNS = ("cin", "cout", "x_slice", "res_slice", "bn_row")


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """BN scale/shift, residual, activation, zero the channels past ``cout``, store."""
    c_ok = offs_n < cout
    sc = tl.load(scale_ptr + bn_row * s_bn + offs_n, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + bn_row * s_bn + offs_n, mask=c_ok, other=0.0)
    y = acc * sc[None, :] + sh[None, :]
    if HAS_RES:
        r_row = (rs * B + n_img).to(tl.int64)
        r_ptrs = res_ptr + r_row[:, None] * srn + offs_n[None, :] * src + (oh * srh + ow * srw)[:, None]
        r = tl.load(r_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        y += r.to(tl.float32)
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    y = tl.where(c_ok[None, :], y, 0.0)  # padded channels are exact zeros
    y_row = (sl * B + n_img).to(tl.int64)
    y_ptrs = y_ptr + y_row[:, None] * syn + offs_n[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < C_OUT_ALLOC)[None, :])


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, meta_ptr,
    B, H, W, OH, OW, C_OUT_ALLOC,
    sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, srn, src, srh, srw, syn, syc, syh, syw, s_bn,
    cin_arg, cout_arg,
    M_KEY, N_KEY, K_KEY,  # autotune keys (bucketed sizes), unused in the body
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, MULTI: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    n_tiles = tl.cdiv(C_OUT_ALLOC, BLOCK_N)
    pid_n = pid % n_tiles  # channel tiles fastest: neighbours share the activation tile
    pid_m = pid // n_tiles
    if MULTI:
        cin = tl.load(meta_ptr + sl * 5)
        cout = tl.load(meta_ptr + sl * 5 + 1)
        xs = tl.load(meta_ptr + sl * 5 + 2)
        rs = tl.load(meta_ptr + sl * 5 + 3)
        bn_row = tl.load(meta_ptr + sl * 5 + 4)
    else:
        cin = cin_arg
        cout = cout_arg
        xs = 0
        rs = 0
        bn_row = 0

    M = B * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_img = offs_m // (OH * OW)
    rem = offs_m % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    x_rows = x_ptr + (xs * B + n_img).to(tl.int64) * sxn
    w_cols = w_ptr + offs_n.to(tl.int64) * sw0
    n_ok = offs_n < cout
    # A tile past this slice's cout only writes zeros: skip its reduction.
    k_hi = tl.where(pid_n * BLOCK_N < cout, cin, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        ih = oh * STRIDE - PAD + kh
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KSIZE):
            iw = ow * STRIDE - PAD + kw
            ok = h_ok & (iw >= 0) & (iw < W)
            a_base = x_rows + ih * sxh + iw * sxw
            w_base = w_cols + kh * sw2 + kw * sw3
            for c0 in range(0, k_hi, BLOCK_K):
                ck = c0 + offs_k
                k_ok = ck < cin
                a = tl.load(a_base[:, None] + ck[None, :] * sxc, mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_base[None, :] + ck[:, None] * sw1, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if DOT == 1:
                    acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
                elif DOT == 2:
                    acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
                else:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)

    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, ACT, HAS_RES)


@triton.jit
def _dw_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, meta_ptr,
    B, H, W, OH, OW, C_OUT_ALLOC,
    sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, srn, src, srh, srw, syn, syc, syh, syw, s_bn,
    cin_arg, cout_arg,
    M_KEY, N_KEY, K_KEY,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, MULTI: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Depthwise: channel c reads input channel c only; BLOCK_M pixels x BLOCK_N channels."""
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    n_tiles = tl.cdiv(C_OUT_ALLOC, BLOCK_N)
    pid_n = pid % n_tiles
    pid_m = pid // n_tiles
    if MULTI:
        c = tl.load(meta_ptr + sl * 5 + 1)
        xs = tl.load(meta_ptr + sl * 5 + 2)
        rs = tl.load(meta_ptr + sl * 5 + 3)
        bn_row = tl.load(meta_ptr + sl * 5 + 4)
    else:
        c = cout_arg
        xs = 0
        rs = 0
        bn_row = 0

    M = B * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_img = offs_m // (OH * OW)
    rem = offs_m % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    c_ok = offs_n < c
    x_rows = x_ptr + (xs * B + n_img).to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        ih = oh * STRIDE - PAD + kh
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KSIZE):
            iw = ow * STRIDE - PAD + kw
            ok = h_ok & (iw >= 0) & (iw < W)
            xv = tl.load((x_rows + ih * sxh + iw * sxw)[:, None] + offs_n[None, :] * sxc,
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_n * sw0 + kh * sw2 + kw * sw3, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, c, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, ACT, HAS_RES)


# -- launch configurations ---------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch shape of one kernel call (autotuned on the GPU when None)."""

    block_m: int
    block_n: int
    block_k: int = 16
    num_warps: int = 4
    num_stages: int = 3


# Dense: big square tiles for the wide 1x1 layers, thin-N tiles for narrow outputs
# (24..96 channels are common in MobileNets), BLOCK_K 32/64 to keep the dot fed.
_DENSE_CONFIGS = [
    BlockConfig(128, 128, 32, 8, 3), BlockConfig(128, 64, 32, 4, 4), BlockConfig(64, 128, 32, 4, 4),
    BlockConfig(64, 64, 32, 4, 4), BlockConfig(128, 32, 32, 4, 4), BlockConfig(64, 32, 32, 4, 4),
    BlockConfig(128, 128, 64, 8, 3), BlockConfig(64, 64, 64, 4, 3), BlockConfig(256, 64, 32, 8, 3),
]
# Depthwise: memory-bound; channel blocks of 32..128 give 64..512-byte contiguous rows.
_DW_CONFIGS = [
    BlockConfig(64, 32, 16, 4, 1), BlockConfig(32, 64, 16, 4, 1), BlockConfig(128, 32, 16, 4, 1),
    BlockConfig(64, 64, 16, 4, 1), BlockConfig(16, 128, 16, 4, 1), BlockConfig(32, 128, 16, 8, 1),
    BlockConfig(128, 64, 16, 8, 1),
]
# The interpreter runs every program in Python: few, moderately sized tiles.
INTERPRETER_CONFIG = BlockConfig(32, 32, 16, 1, 1)


def _triton_configs(configs: list[BlockConfig]) -> list:
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k},
                          num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


_AUTOTUNE = os.environ.get("HWSLIM_TRITON_AUTOTUNE", "1") != "0" and not INTERPRETED
_KEYS = ["M_KEY", "N_KEY", "K_KEY", "KSIZE", "STRIDE", "HAS_RES", "DOT"]
_conv_tuned = triton.autotune(_triton_configs(_DENSE_CONFIGS), key=_KEYS)(_conv_kernel) if _AUTOTUNE else None
_dw_tuned = triton.autotune(_triton_configs(_DW_CONFIGS), key=_KEYS)(_dw_kernel) if _AUTOTUNE else None


def _bucket(n: int) -> int:
    """Next power of two: autotune once per size class, not once per width."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _default_config(depthwise: bool, cout: int) -> BlockConfig:
    if INTERPRETED:
        return INTERPRETER_CONFIG
    if depthwise:
        return BlockConfig(64, 64, 16, 4, 1)
    return BlockConfig(128, 64 if cout <= 64 else 128, 32, 4 if cout <= 64 else 8, 3)


def _dot_code(dtype: torch.dtype) -> int:
    if dtype not in _DOT_CODES:
        raise TypeError(f"unsupported activation dtype {dtype}; expected float32, bfloat16 or float16")
    code = _DOT_CODES[dtype]
    return 0 if (INTERPRETED and code == 1) else code  # interpreter: bf16 math via fp32


def _precision(tf32: bool | None) -> str:
    allow = torch.backends.cudnn.allow_tf32 if tf32 is None else tf32
    return "tf32" if allow else "ieee"


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            residual: torch.Tensor | None, out: torch.Tensor, meta: torch.Tensor | None, *,
            batch: int, slices: int, cin: int, cout: int, cin_max: int, stride: int, padding: int,
            act: str | None, depthwise: bool, tf32: bool | None, config: BlockConfig | None) -> None:
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; expected one of {list(ACT_CODES)}")
    k = weight.shape[2]
    if weight.shape[3] != k:
        raise ValueError(f"only square kernels are supported, got {tuple(weight.shape[2:])}")
    _, _, h, w = x.shape
    _, c_alloc, oh, ow = out.shape
    res = residual if residual is not None else out  # dummy pointer, never read
    s_bn = scale.stride(0) if scale.dim() == 2 else 0  # one BN row per bn_row index
    args = (x, weight, scale, shift, res, out, meta if meta is not None else scale,
            batch, h, w, oh, ow, c_alloc,
            *x.stride(), *weight.stride(), *res.stride(), *out.stride(), s_bn,
            cin, cout, _bucket(batch * oh * ow * slices), _bucket(c_alloc), _bucket(cin_max))
    const = dict(KSIZE=k, STRIDE=stride, PAD=padding, ACT=ACT_CODES[act], HAS_RES=residual is not None,
                 MULTI=meta is not None, DOT=_dot_code(x.dtype), PRECISION=_precision(tf32))
    m = batch * oh * ow
    tuned = _dw_tuned if depthwise else _conv_tuned
    if config is None and tuned is not None:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(c_alloc, meta_["BLOCK_N"]), slices)
        tuned[grid](*args, **const)
        return
    cfg = config or _default_config(depthwise, c_alloc)
    kernel = _dw_kernel if depthwise else _conv_kernel
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c_alloc, cfg.block_n), slices)
    kernel[grid](*args, **const, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           residual: torch.Tensor | None, depthwise: bool) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"expected 4-d input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"a depthwise weight has shape (C, 1, k, k), got {tuple(weight.shape)}")
    devices = {t.device for t in (x, weight, scale, shift) + ((residual,) if residual is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if scale.dtype != torch.float32 or shift.dtype != torch.float32:
        raise TypeError("BN scale and shift must be float32 (see fold_bn)")
    if scale.shape != shift.shape or scale.dim() not in (1, 2) or scale.stride(-1) != 1 \
            or shift.stride() != scale.stride():
        raise ValueError(f"scale and shift must be matching (C,) or (R, C) row-major tensors, "
                         f"got {tuple(scale.shape)} and {tuple(shift.shape)}")


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *,
                stride: int = 1, padding: int | None = None, act: str | None = None,
                residual: torch.Tensor | None = None, depthwise: bool = False, cin: int | None = None,
                cout: int | None = None, out: torch.Tensor | None = None, tf32: bool | None = None,
                config: BlockConfig | None = None) -> torch.Tensor:
    """``act(conv(x[:, :cin], W[:cout, :cin]) * scale + shift + residual)`` in one kernel.

    ``weight`` is the *full-width* ``(Cout_max, Cin_max, k, k)`` weight (``(C_max, 1, k, k)``
    for ``depthwise``), read in place; ``cin`` defaults to ``x.shape[1]`` and ``cout`` to
    the full width (to ``cin`` for depthwise). ``scale``/``shift`` are float32 vectors of
    at least ``cout`` entries. ``padding`` defaults to ``(k - 1) // 2``. The result has
    ``x``'s dtype, shape ``(N, cout, OH, OW)`` and channels-last memory (pass ``out`` to
    write elsewhere). fp32 dots use tf32 when ``tf32`` is True, exact fp32 when False,
    and follow ``torch.backends.cudnn.allow_tf32`` (PyTorch's conv default) when None.

    >>> y = conv_bn_act(x, conv.weight, scale, shift, stride=2, act="relu6", cout=24)
    """
    _check(x, weight, scale, shift, residual, depthwise)
    k = weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    cin = x.shape[1] if cin is None else cin
    if depthwise:
        cout = cin
    cout = weight.shape[0] if cout is None else cout
    cin_w = weight.shape[0] if depthwise else weight.shape[1]
    if not (0 < cin <= min(x.shape[1], cin_w) and 0 < cout <= weight.shape[0] and cout <= scale.numel()):
        raise ValueError(f"active widths cin={cin}, cout={cout} do not fit input {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)} and {scale.numel()} BN channels")
    n, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    if out is None:
        out = torch.empty((n, cout, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    elif tuple(out.shape) != (n, cout, oh, ow):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, cout, oh, ow)}")
    if residual is not None and (residual.shape[0] != n or residual.shape[1] < cout
                                 or tuple(residual.shape[2:]) != (oh, ow)):
        raise ValueError(f"residual {tuple(residual.shape)} does not match output {(n, cout, oh, ow)}")
    _launch(x, weight, scale, shift, residual, out, None, batch=n, slices=1, cin=cin, cout=cout, cin_max=cin,
            stride=stride, padding=padding, act=act, depthwise=depthwise, tf32=tf32, config=config)
    return out


def conv_bn_act_multi(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      meta: torch.Tensor, *, batch: int, cout_alloc: int, stride: int = 1,
                      padding: int | None = None, act: str | None = None, residual: torch.Tensor | None = None,
                      depthwise: bool = False, cin_max: int | None = None, out: torch.Tensor | None = None,
                      tf32: bool | None = None, config: BlockConfig | None = None) -> torch.Tensor:
    """S width configs of one layer in one launch (the multi-config form).

    ``x`` holds ``S_in`` slices of ``batch`` images: shape ``(S_in * batch, C, H, W)``.
    ``meta`` is an int32 ``(S, 5)`` tensor on the device, one row per *output* slice:
    ``(cin, cout, x_slice, res_slice, bn_row)`` (see :data:`META_COLUMNS`; depthwise rows
    use ``cout`` as their width). Output slice ``s`` is the layer at widths
    ``(cin, cout)`` applied to input slice ``x_slice``, plus residual slice ``res_slice``,
    with BN row ``bn_row`` of a ``(R, C)`` ``scale``/``shift`` (a 1-d vector means one
    row). Returns ``(S * batch, cout_alloc, OH, OW)``, channels ``>= cout`` of each slice
    set to zero. Input channels past a slice's ``cin`` are never read, so they need not
    be zero.
    """
    _check(x, weight, scale, shift, residual, depthwise)
    if meta.dtype != torch.int32 or meta.dim() != 2 or meta.shape[1] != len(META_COLUMNS) or not meta.is_contiguous():
        raise ValueError(f"meta must be a contiguous int32 (S, {len(META_COLUMNS)}) tensor")
    if x.shape[0] % batch:
        raise ValueError(f"input batch {x.shape[0]} is not a multiple of the slice batch {batch}")
    k = weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    slices = meta.shape[0]
    _, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    shape = (slices * batch, cout_alloc, oh, ow)
    if cout_alloc > weight.shape[0] or cout_alloc > scale.shape[-1]:
        raise ValueError(f"cout_alloc={cout_alloc} exceeds the weight's {weight.shape[0]} output channels")
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    _launch(x, weight, scale, shift, residual, out, meta, batch=batch, slices=slices, cin=0, cout=0,
            cin_max=x.shape[1] if cin_max is None else cin_max, stride=stride, padding=padding, act=act,
            depthwise=depthwise, tf32=tf32, config=config)
    return out


def fold_bn(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as a per-channel ``(scale, shift)`` pair, float32, full width.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``
    (computed in float64); the first ``cout`` entries serve any active width.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale.float().contiguous(), (beta - mean * scale).float().contiguous()
