"""Fused slimmable conv + BN + (residual) + activation kernels, written in Triton.

One kernel call computes a whole graph ``conv`` node at any active width,
``act(conv(x, W[:cout, :cin]) * scale + shift + residual)``, reading the supernet's
*full-width* weight in place: the active widths are loop bounds and masks, never a
sliced copy. ``scale``/``shift`` are the eval-mode BatchNorm folded per channel
(``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``, see
:func:`fold_bn`).

Kernels:

* ``conv_kernel``: a dense conv (groups=1, any square kernel, stride, padding) as an
  implicit GEMM: M = output pixels (n, oh, ow), N = output channels, K = input channels
  x kernel taps. A program owns a ``BLOCK_M x BLOCK_N`` output tile; for each tap it
  loops over the *active* input channels in ``BLOCK_K`` steps and feeds ``tl.dot``
  (tensor cores for bf16/fp16, tf32 or exact fp32 for fp32), accumulating in fp32. The
  program index runs over output-channel tiles fastest, so the programs that share one
  activation tile run back to back and read it from L2, while the whole weight
  (at most a few MB) stays resident.
* ``dw_kernel``: a depthwise conv (groups = channels), memory-bound: a program owns
  ``BLOCK_M`` output pixels x ``BLOCK_N`` channels, loads channel-contiguous rows
  (16-byte vectors when the tensor is channels-last) and does the taps with FMAs.
* ``dw_project_kernel``: a depthwise conv + BN + act feeding a 1x1 conv, fused: the
  depthwise output is computed tile by tile in registers and never stored
  (:func:`dw_project_bn_act`).
* ``STATS=True`` variants of the first two plus ``_bn_act_kernel``: BatchNorm with the
  batch's own statistics (train-mode BN, BN recalibration): the conv writes its raw
  output and per-tile statistics, then one in-place pass normalizes
  (:func:`conv_stats`, :func:`bn_act_`).

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
``tl.dot`` (fp32 weights are then not rounded to bf16 as on the GPU); bf16 x bf16
products are exact in fp32, so otherwise only the summation order differs from the
GPU's bf16 tensor-core path. ``python -m hwslim.kernels.compile_report`` compiles the
real GPU code for sm_90 without a GPU and reports registers, spills and instructions.
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
def _tile_ids(C_OUT_ALLOC, BLOCK_N: tl.constexpr):
    """This program's (slice, pixel tile, channel tile). Channel tiles run fastest, so
    neighbouring programs share the activation tile and read it from L2."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(C_OUT_ALLOC, BLOCK_N)
    return tl.program_id(1), pid // n_tiles, pid % n_tiles


@triton.jit
def _meta_row(meta_ptr, row, cin_arg, cout_arg, MULTI: tl.constexpr, BN_SLICE: tl.constexpr):
    """Row ``row`` of a multi-config ``meta`` table: (cin, cout, x_slice, res_slice, bn_row), see
    ``META_COLUMNS``; a single config: the widths given, slice 0, BN row 0. A column the caller
    leaves unused is a dead load, which the compiler drops."""
    if MULTI:
        cin = tl.load(meta_ptr + row * 5)
        cout = tl.load(meta_ptr + row * 5 + 1)
        xs = tl.load(meta_ptr + row * 5 + 2)
        rs = tl.load(meta_ptr + row * 5 + 3)
        bn_row = row if BN_SLICE else tl.load(meta_ptr + row * 5 + 4)
    else:
        cin, cout, xs, rs, bn_row = cin_arg, cout_arg, 0, 0, 0
    return cin, cout, xs, rs, bn_row


@triton.jit
def _tile_offsets(pid_m, pid_n, B, OH, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output pixels of pixel tile ``pid_m`` (offsets, in range, image, row, column) and
    the output channels of channel tile ``pid_n``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < B * OH * OW
    n_img = offs_m // (OH * OW)
    rem = offs_m % (OH * OW)
    return offs_m, m_ok, n_img, rem // OW, rem % OW, offs_n


@triton.jit
def _tap(o, k, size, ok, STRIDE: tl.constexpr, PAD: tl.constexpr):
    """The input index that output index ``o`` reads at tap ``k``, and ``ok`` where it lies
    inside the input (outside: zero padding)."""
    i = o * STRIDE - PAD + k
    return i, ok & (i >= 0) & (i < size)


@triton.jit
def _aligned(c, W_ALIGN: tl.constexpr):
    """``c`` rounded down to a multiple of ``W_ALIGN``: no value change (the host guarantees
    the multiple), but a divisibility the compiler tracks, so channel masks stay uniform per vector."""
    if W_ALIGN > 1:
        c = (c // W_ALIGN) * W_ALIGN
    return c


@triton.jit
def _act(y, ACT: tl.constexpr):
    """The activation of code ``ACT`` (see ``ACT_CODES``)."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    return y


@triton.jit
def _depthwise_taps(rows, offs_c, c_ok, m_ok, oh, ow, H, W, shh, shw, shc, w_ptr, sw0, sw2, sw3,
                    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """A depthwise conv's fp32 sums for BLOCK_M pixels (``rows``: their images' base
    pointers) x BLOCK_C channels ``offs_c``, the taps done with FMAs."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        ih, h_ok = _tap(oh, kh, H, m_ok, STRIDE, PAD)
        for kw in tl.static_range(KSIZE):
            iw, ok = _tap(ow, kw, W, h_ok, STRIDE, PAD)
            xv = tl.load((rows + ih * shh + iw * shw)[:, None] + offs_c[None, :] * shc,
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_c * sw0 + kh * sw2 + kw * sw3, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, pid_m, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, part_ptr, T_MAX,
              ACT: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr, VEC: tl.constexpr):
    """Finish an output tile and store it; channels past ``cout`` are stored as zeros.

    The residual's and the output's n/h/w strides arrive divided by ``VEC`` (see conv_kernel).

    Folded BN (``STATS`` False): ``act(acc * scale + shift + residual)``.
    Batch statistics (``STATS`` True): store the raw conv output and this tile's
    per-channel ``(count, sum, M2)`` (M2 about the tile's own mean, so combining tiles
    with Chan's formula loses no precision to cancellation); :func:`bn_act_` applies the
    BN, residual and activation once the statistics of all tiles are known.
    """
    srn, srh, srw = srn * VEC, srh * VEC, srw * VEC
    syn, syh, syw = syn * VEC, syh * VEC, syw * VEC
    c_ok = offs_n < cout
    if STATS:
        rowf = m_ok.to(tl.float32)
        cnt = tl.sum(rowf, axis=0)
        tot = tl.sum(acc * rowf[:, None], axis=0)
        d = (acc - (tot / tl.maximum(cnt, 1.0))[None, :]) * rowf[:, None]
        m2 = tl.sum(d * d, axis=0)
        p = part_ptr + ((sl * T_MAX + pid_m) * 3).to(tl.int64) * C_OUT_ALLOC + offs_n
        st = offs_n < C_OUT_ALLOC
        tl.store(p, tl.zeros_like(tot) + cnt, mask=st)
        tl.store(p + C_OUT_ALLOC, tot, mask=st)
        tl.store(p + 2 * C_OUT_ALLOC, m2, mask=st)
        y = acc
    else:
        sc = tl.load(scale_ptr + bn_row * s_bn + offs_n, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + bn_row * s_bn + offs_n, mask=c_ok, other=0.0)
        y = acc * sc[None, :] + sh[None, :]
        if HAS_RES:
            r_row = (rs * B + n_img).to(tl.int64)
            r_ptrs = res_ptr + r_row[:, None] * srn + offs_n[None, :] * src + (oh * srh + ow * srw)[:, None]
            r = tl.load(r_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            y += r.to(tl.float32)
        y = _act(y, ACT)
    y = tl.where(c_ok[None, :], y, 0.0)  # padded channels are exact zeros
    y_row = (sl * B + n_img).to(tl.int64)
    y_ptrs = y_ptr + y_row[:, None] * syn + offs_n[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < C_OUT_ALLOC)[None, :])


@triton.jit
def conv_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, meta_ptr,
    B, H, W, OH, OW, C_OUT_ALLOC,
    sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, srn, src, srh, srw, syn, syc, syh, syw, s_bn,
    cin_arg, cout_arg, part_ptr, T_MAX,
    M_KEY, N_KEY, K_KEY,  # autotune keys (bucketed sizes), unused in the body
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, MULTI: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    STATS: tl.constexpr, BN_SLICE: tl.constexpr, VEC: tl.constexpr, W_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sl, pid_m, pid_n = _tile_ids(C_OUT_ALLOC, BLOCK_N)
    cin, cout, xs, rs, bn_row = _meta_row(meta_ptr, sl, cin_arg, cout_arg, MULTI, BN_SLICE)

    # Hints (see _launch): the n/h/w strides arrive divided by VEC, and every active
    # width is a multiple of W_ALIGN, so channel rows load as 16-byte vectors and the
    # channel masks are uniform per vector (cp.async pipelining stays possible).
    sxn, sxh, sxw = sxn * VEC, sxh * VEC, sxw * VEC  # and the epilogue's, in _epilogue
    cin, cout, C_OUT_ALLOC = _aligned(cin, W_ALIGN), _aligned(cout, W_ALIGN), _aligned(C_OUT_ALLOC, W_ALIGN)

    offs_m, m_ok, n_img, oh, ow, offs_n = _tile_offsets(pid_m, pid_n, B, OH, OW, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (xs * B + n_img).to(tl.int64) * sxn
    w_cols = w_ptr + offs_n.to(tl.int64) * sw0
    n_ok = offs_n < cout
    # A tile past this slice's cout only writes zeros: skip its reduction.
    k_hi = tl.where(pid_n * BLOCK_N < cout, cin, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        ih, h_ok = _tap(oh, kh, H, m_ok, STRIDE, PAD)
        for kw in tl.static_range(KSIZE):
            iw, ok = _tap(ow, kw, W, h_ok, STRIDE, PAD)
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

    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, pid_m, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, part_ptr, T_MAX, ACT, HAS_RES, STATS, VEC)


@triton.jit
def dw_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, meta_ptr,
    B, H, W, OH, OW, C_OUT_ALLOC,
    sxn, sxc, sxh, sxw, sw0, sw1, sw2, sw3, srn, src, srh, srw, syn, syc, syh, syw, s_bn,
    cin_arg, cout_arg, part_ptr, T_MAX,
    M_KEY, N_KEY, K_KEY,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, MULTI: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    STATS: tl.constexpr, BN_SLICE: tl.constexpr, VEC: tl.constexpr, W_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Depthwise: channel c reads input channel c only; BLOCK_M pixels x BLOCK_N channels."""
    sl, pid_m, pid_n = _tile_ids(C_OUT_ALLOC, BLOCK_N)
    _, c, xs, rs, bn_row = _meta_row(meta_ptr, sl, cin_arg, cout_arg, MULTI, BN_SLICE)

    sxn, sxh, sxw = sxn * VEC, sxh * VEC, sxw * VEC  # hints, as in conv_kernel
    c, C_OUT_ALLOC = _aligned(c, W_ALIGN), _aligned(C_OUT_ALLOC, W_ALIGN)

    offs_m, m_ok, n_img, oh, ow, offs_n = _tile_offsets(pid_m, pid_n, B, OH, OW, BLOCK_M, BLOCK_N)
    x_rows = x_ptr + (xs * B + n_img).to(tl.int64) * sxn
    acc = _depthwise_taps(x_rows, offs_n, offs_n < c, m_ok, oh, ow, H, W, sxh, sxw, sxc, w_ptr, sw0, sw2, sw3,
                          KSIZE, STRIDE, PAD, BLOCK_M, BLOCK_N)

    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, pid_m, c, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, part_ptr, T_MAX, ACT, HAS_RES, STATS, VEC)


@triton.jit
def _bn_act_kernel(
    y_ptr, scale_ptr, shift_ptr, res_ptr, meta_ptr,
    B, OH, OW, C_OUT_ALLOC, srn, src, srh, srw, syn, syc, syh, syw, s_bn, cout_arg,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, MULTI: tl.constexpr, BN_SLICE: tl.constexpr,
    VEC: tl.constexpr, W_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """In place: ``y = act(y * scale + shift + residual)``, the second half of batch-stats BN."""
    sl, pid_m, pid_n = _tile_ids(C_OUT_ALLOC, BLOCK_N)
    _, cout, _, rs, bn_row = _meta_row(meta_ptr, sl, cout_arg, cout_arg, MULTI, BN_SLICE)
    yn, yh, yw = syn * VEC, syh * VEC, syw * VEC  # hints, as in conv_kernel
    cout, C_OUT_ALLOC = _aligned(cout, W_ALIGN), _aligned(C_OUT_ALLOC, W_ALIGN)
    offs_m, m_ok, n_img, oh, ow, offs_n = _tile_offsets(pid_m, pid_n, B, OH, OW, BLOCK_M, BLOCK_N)
    y_row = (sl * B + n_img).to(tl.int64)
    y_ptrs = y_ptr + y_row[:, None] * yn + offs_n[None, :] * syc + (oh * yh + ow * yw)[:, None]
    acc = tl.load(y_ptrs, mask=m_ok[:, None] & (offs_n < C_OUT_ALLOC)[None, :], other=0.0).to(tl.float32)
    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, pid_m, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, y_ptr, 0, ACT, HAS_RES, False, VEC)


@triton.jit
def dw_project_kernel(
    h_ptr, wd_ptr, dscale_ptr, dshift_ptr, wp_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, meta_ptr, dmeta_ptr,
    B, H, W, OH, OW, C_OUT_ALLOC,
    shn, shc, shh, shw, swd0, swd2, swd3, swp0, swp1, srn, src, srh, srw, syn, syc, syh, syw, s_bn_d, s_bn,
    cin_arg, cout_arg,
    M_KEY, N_KEY, K_KEY,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT_D: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, MULTI: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BN_SLICE: tl.constexpr, VEC: tl.constexpr, W_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Depthwise conv + BN + act feeding a 1x1 conv + BN (+ residual) + act, fused.

    The depthwise output (the inverted residual block's hidden tensor after its
    depthwise conv) never reaches memory: each BLOCK_M x BLOCK_K tile of it is computed
    from the block's input in registers and fed straight to ``tl.dot``. Multi-config:
    ``meta`` rows are the 1x1 layer's slices; their ``x_slice`` indexes ``dmeta``, the
    depthwise layer's rows, whose ``x_slice`` indexes the input.
    """
    sl, pid_m, pid_n = _tile_ids(C_OUT_ALLOC, BLOCK_N)
    c, cout, ds, rs, bn_row = _meta_row(meta_ptr, sl, cin_arg, cout_arg, MULTI, BN_SLICE)
    _, _, hs, _, bn_row_d = _meta_row(dmeta_ptr, ds, cin_arg, cout_arg, MULTI, BN_SLICE)  # its depthwise row
    shn, shh, shw = shn * VEC, shh * VEC, shw * VEC  # hints, as in conv_kernel
    c, cout, C_OUT_ALLOC = _aligned(c, W_ALIGN), _aligned(cout, W_ALIGN), _aligned(C_OUT_ALLOC, W_ALIGN)

    offs_m, m_ok, n_img, oh, ow, offs_n = _tile_offsets(pid_m, pid_n, B, OH, OW, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + (hs * B + n_img).to(tl.int64) * shn
    n_ok = offs_n < cout
    wp_cols = wp_ptr + offs_n.to(tl.int64) * swp0
    k_hi = tl.where(pid_n * BLOCK_N < cout, c, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, k_hi, BLOCK_K):
        ck = c0 + offs_k
        k_ok = ck < c
        d = _depthwise_taps(h_rows, ck, k_ok, m_ok, oh, ow, H, W, shh, shw, shc, wd_ptr, swd0, swd2, swd3,
                            KSIZE, STRIDE, PAD, BLOCK_M, BLOCK_K)
        dsc = tl.load(dscale_ptr + bn_row_d * s_bn_d + ck, mask=k_ok, other=0.0)
        dsh = tl.load(dshift_ptr + bn_row_d * s_bn_d + ck, mask=k_ok, other=0.0)
        d = _act(d * dsc[None, :] + dsh[None, :], ACT_D)
        b = tl.load(wp_cols[None, :] + ck[:, None] * swp1, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # d is rounded to the activation dtype as the unfused path rounds its stored output
        if DOT == 1:
            acc = tl.dot(d.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif DOT == 2:
            acc = tl.dot(d.to(tl.float16), b.to(tl.float16), acc)
        elif DOT == 3:  # interpreter, bf16 activations: round through bf16, multiply in fp32
            acc = tl.dot(d.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(d, b.to(tl.float32), acc, input_precision=PRECISION)

    _epilogue(acc, offs_m, offs_n, m_ok, n_img, oh, ow, sl, pid_m, cout, B, C_OUT_ALLOC,
              scale_ptr, shift_ptr, bn_row, s_bn, res_ptr, rs, srn, src, srh, srw,
              y_ptr, syn, syc, syh, syw, y_ptr, 0, ACT, HAS_RES, False, VEC)


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
    # 2-stage tiles for kxk convs (ResNets): the unrolled taps x 3-4 stages spill in fp32 on sm_90
    BlockConfig(64, 64, 32, 4, 2), BlockConfig(64, 32, 32, 4, 2), BlockConfig(128, 128, 32, 8, 2),
]
# Dense with few input channels (the 3-channel stem): BLOCK_K 16 and shallow pipelines;
# deeper ones unroll 9 taps x stages of loads and spill (seen in compile_report, sm_90).
_SMALL_CIN_CONFIGS = [
    BlockConfig(128, 64, 16, 4, 1), BlockConfig(64, 64, 16, 4, 1), BlockConfig(128, 32, 16, 4, 2),
    BlockConfig(256, 64, 16, 8, 2), BlockConfig(64, 32, 16, 4, 2),
]
SMALL_CIN = 16
# Depthwise: memory-bound; channel blocks of 32..128 give 64..512-byte contiguous rows.
_DW_CONFIGS = [
    BlockConfig(64, 32, 16, 4, 1), BlockConfig(32, 64, 16, 4, 1), BlockConfig(128, 32, 16, 4, 1),
    BlockConfig(64, 64, 16, 4, 1), BlockConfig(32, 128, 16, 8, 1),
    BlockConfig(128, 64, 16, 8, 1),
]
_BN_ACT_CONFIG = BlockConfig(64, 64, 16, 4, 1)  # elementwise, in place: never autotuned (re-runs would compound)
# The interpreter runs every program in Python: few, moderately sized tiles.
INTERPRETER_CONFIG = BlockConfig(32, 32, 16, 1, 1)


def _triton_configs(configs: list[BlockConfig]) -> list:
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k},
                          num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


#: Set HWSLIM_TRITON_AUTOTUNE=0 to launch with the heuristic tile sizes instead.
AUTOTUNE = os.environ.get("HWSLIM_TRITON_AUTOTUNE", "1") != "0" and not INTERPRETED
_KEYS = ["M_KEY", "N_KEY", "K_KEY", "KSIZE", "STRIDE", "HAS_RES", "DOT", "STATS"]


def _zero_part(kwargs: dict, reset_only: bool = False) -> None:
    """Autotuner pre-hook: zero ``part_ptr`` when the launch has one (statistics on).

    Not ``reset_to_zero=["part_ptr"]``: Triton 3.6 zeroes a named argument without
    checking for ``None`` (``'NoneType' object has no attribute 'zero_'`` on every launch
    without statistics, seen on an H200 with torch 2.11); 3.8 checks.
    """
    part = kwargs.get("part_ptr")
    if part is not None:
        part.zero_()


def _tuned(kernel, configs: list[BlockConfig]):
    # part_ptr holds per-tile statistics whose count depends on BLOCK_M: zeroed before
    # every trial and before the real run, so no trial's tiles survive into the result.
    return triton.autotune(_triton_configs(configs), key=_KEYS, pre_hook=_zero_part)(kernel)


_conv_tuned = _tuned(conv_kernel, _DENSE_CONFIGS) if AUTOTUNE else None
_conv_small_tuned = _tuned(conv_kernel, _SMALL_CIN_CONFIGS) if AUTOTUNE else None
# Fused depthwise + 1x1: the depthwise taps run per K step, so small K steps and shallow
# pipelines; these compile without spills for bf16 and fp32 on sm_90 (compile_report).
DW_PROJECT_CONFIGS = [
    BlockConfig(64, 64, 16, 4, 2), BlockConfig(64, 32, 16, 4, 2), BlockConfig(128, 64, 16, 8, 2),
    BlockConfig(128, 128, 16, 8, 2), BlockConfig(128, 64, 32, 8, 2), BlockConfig(64, 64, 32, 4, 2),
    BlockConfig(128, 64, 16, 4, 2),
]
_dw_project_tuned = triton.autotune(_triton_configs(DW_PROJECT_CONFIGS),
                                    key=["M_KEY", "N_KEY", "K_KEY", "KSIZE", "STRIDE", "HAS_RES", "DOT"]
                                    )(dw_project_kernel) if AUTOTUNE else None
_dw_tuned = _tuned(dw_kernel, _DW_CONFIGS) if AUTOTUNE else None


def _bucket(n: int) -> int:
    """Next power of two: autotune once per size class, not once per width."""
    return 1 << max(int(n) - 1, 0).bit_length()


def config_list(depthwise: bool, cin_max: int) -> list[BlockConfig]:
    return _DW_CONFIGS if depthwise else (_SMALL_CIN_CONFIGS if cin_max <= SMALL_CIN else _DENSE_CONFIGS)


def _default_config(depthwise: bool, cout: int, cin_max: int = 1 << 30) -> BlockConfig:
    if INTERPRETED:
        return INTERPRETER_CONFIG
    if depthwise:
        return BlockConfig(64, 64, 16, 4, 1)
    if cin_max <= SMALL_CIN:
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


@dataclass(frozen=True)
class _Call:
    """Everything but the tensors of one conv launch."""

    batch: int
    slices: int
    cin: int
    cout: int
    cin_max: int
    stride: int
    padding: int
    act: str | None
    depthwise: bool
    tf32: bool | None
    config: BlockConfig | None
    bn_slice: bool = False
    w_align: int = 1  # multi-config: a power of two dividing every width in meta


def pow2_align(*values: int, cap: int = 16) -> int:
    """Largest power of two up to ``cap`` dividing every value (a divisibility hint)."""
    a = cap
    while a > 1 and any(v % a for v in values):
        a //= 2
    return a


def _check_align(a: int, c_alloc: int) -> int:
    if a not in (1, 2, 4, 8, 16) or c_alloc % a:
        raise ValueError(f"width_align must be a power of two up to 16 dividing every width "
                         f"(and the allocated {c_alloc} channels), got {a}")
    return a


def _div_strides(t: torch.Tensor, vec: int) -> tuple[int, int, int, int]:
    """(n, c, h, w) strides with n, h, w divided by ``vec`` (the kernels multiply back)."""
    sn, sc, sh, sw = t.stride()
    return sn // vec, sc, sh // vec, sw // vec


def _min_block_m(c: _Call) -> int:
    if c.config is not None:
        return c.config.block_m
    if AUTOTUNE:
        return min(b.block_m for b in config_list(c.depthwise, c.cin_max))
    return _default_config(c.depthwise, 0, c.cin_max).block_m


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
            residual: torch.Tensor | None, out: torch.Tensor, meta: torch.Tensor | None, c: _Call,
            part: torch.Tensor | None = None) -> None:
    if c.act not in ACT_CODES:
        raise ValueError(f"unknown activation {c.act!r}; expected one of {list(ACT_CODES)}")
    k = weight.shape[2]
    _, _, h, w = x.shape
    _, c_alloc, oh, ow = out.shape
    m = c.batch * oh * ow
    res = residual if residual is not None else out  # never read when HAS_RES is False
    s_bn = scale.stride(0) if scale is not None and scale.dim() == 2 else 0
    t_max = part.shape[1] if part is not None else 0
    vec = pow2_align(*(st for t in (x, res, out) for i, st in enumerate(t.stride()) if i != 1))
    args = (x, weight, scale, shift, res, out, meta,
            c.batch, h, w, oh, ow, c_alloc,
            *_div_strides(x, vec), *weight.stride(), *_div_strides(res, vec), *_div_strides(out, vec), s_bn,
            c.cin, c.cout, part, t_max, _bucket(m * c.slices), _bucket(c_alloc), _bucket(c.cin_max))
    const = dict(KSIZE=k, STRIDE=c.stride, PAD=c.padding, ACT=ACT_CODES[c.act], HAS_RES=residual is not None,
                 MULTI=meta is not None, DOT=_dot_code(x.dtype), PRECISION=_precision(c.tf32),
                 STATS=part is not None, BN_SLICE=c.bn_slice, VEC=vec,
                 W_ALIGN=c.w_align if meta is not None else pow2_align(c.cin, c.cout))
    tuned = _dw_tuned if c.depthwise else (_conv_small_tuned if c.cin_max <= SMALL_CIN else _conv_tuned)
    if c.config is None and tuned is not None:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(c_alloc, meta_["BLOCK_N"]), c.slices)
        tuned[grid](*args, **const)
        return
    cfg = c.config or _default_config(c.depthwise, c_alloc, c.cin_max)
    kernel = dw_kernel if c.depthwise else conv_kernel
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c_alloc, cfg.block_n), c.slices)
    kernel[grid](*args, **const, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
           residual: torch.Tensor | None, depthwise: bool) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"expected 4-d input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"only square kernels are supported, got {tuple(weight.shape[2:])}")
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"a depthwise weight has shape (C, 1, k, k), got {tuple(weight.shape)}")
    tensors = [t for t in (x, weight, scale, shift, residual) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if scale is None:
        return
    if scale.dtype != torch.float32 or shift.dtype != torch.float32:
        raise TypeError("BN scale and shift must be float32 (see fold_bn)")
    if scale.shape != shift.shape or scale.dim() not in (1, 2) or scale.stride(-1) != 1 \
            or shift.stride() != scale.stride():
        raise ValueError(f"scale and shift must be matching (C,) or (R, C) row-major tensors, "
                         f"got {tuple(scale.shape)} and {tuple(shift.shape)}")


def _single_widths(x: torch.Tensor, weight: torch.Tensor, cin: int | None, cout: int | None,
                   depthwise: bool, bn_channels: int | None) -> tuple[int, int]:
    cin = x.shape[1] if cin is None else cin
    cout = cin if depthwise else (weight.shape[0] if cout is None else cout)
    cin_w = weight.shape[0] if depthwise else weight.shape[1]
    if not (0 < cin <= min(x.shape[1], cin_w) and 0 < cout <= weight.shape[0]
            and (bn_channels is None or cout <= bn_channels)):
        raise ValueError(f"active widths cin={cin}, cout={cout} do not fit input {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}" + ("" if bn_channels is None else f" and {bn_channels} BN channels"))
    return cin, cout


def _alloc(out: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    return out


def _check_residual(residual: torch.Tensor | None, n: int, cout: int, oh: int, ow: int) -> None:
    if residual is not None and (residual.shape[0] != n or residual.shape[1] < cout
                                 or tuple(residual.shape[2:]) != (oh, ow)):
        raise ValueError(f"residual {tuple(residual.shape)} does not match output {(n, cout, oh, ow)}")


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *,
                stride: int = 1, padding: int | None = None, act: str | None = None,
                residual: torch.Tensor | None = None, depthwise: bool = False, cin: int | None = None,
                cout: int | None = None, out: torch.Tensor | None = None, tf32: bool | None = None,
                config: BlockConfig | None = None) -> torch.Tensor:
    """``act(conv(x[:, :cin], W[:cout, :cin]) * scale + shift + residual)`` in one kernel.

    ``weight`` is the *full-width* ``(Cout_max, Cin_max, k, k)`` weight (``(C_max, 1, k, k)``
    for ``depthwise``), read in place; ``cin`` defaults to ``x.shape[1]`` and ``cout`` to
    the full width (to ``cin`` for depthwise). ``scale``/``shift`` are float32 vectors of
    at least ``cout`` entries (:func:`fold_bn`). ``padding`` defaults to ``(k - 1) // 2``.
    The result has ``x``'s dtype, shape ``(N, cout, OH, OW)`` and channels-last memory
    (pass ``out`` to write elsewhere). fp32 dots use tf32 when ``tf32`` is True, exact
    fp32 when False, and follow ``torch.backends.cudnn.allow_tf32`` (what PyTorch's conv
    does) when None.

    >>> y = conv_bn_act(x, conv.weight, *fold_bn(bn), stride=2, act="relu6", cout=24)
    """
    _check(x, weight, scale, shift, residual, depthwise)
    k = weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    cin, cout = _single_widths(x, weight, cin, cout, depthwise, scale.shape[-1])
    n, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    out = _alloc(out, (n, cout, oh, ow), x)
    _check_residual(residual, n, cout, oh, ow)
    _launch(x, weight, scale, shift, residual, out, None,
            _Call(n, 1, cin, cout, cin, stride, padding, act, depthwise, tf32, config))
    return out


def _check_meta(meta: torch.Tensor, x: torch.Tensor, batch: int) -> None:
    if meta.dtype != torch.int32 or meta.dim() != 2 or meta.shape[1] != len(META_COLUMNS) or not meta.is_contiguous():
        raise ValueError(f"meta must be a contiguous int32 (S, {len(META_COLUMNS)}) tensor")
    if meta.device != x.device:
        raise ValueError(f"meta is on {meta.device}, input on {x.device}")
    if x.shape[0] % batch:
        raise ValueError(f"input batch {x.shape[0]} is not a multiple of the slice batch {batch}")


def conv_bn_act_multi(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      meta: torch.Tensor, *, batch: int, cout_alloc: int, stride: int = 1,
                      padding: int | None = None, act: str | None = None, residual: torch.Tensor | None = None,
                      depthwise: bool = False, cin_max: int | None = None, bn_per_slice: bool = False,
                      width_align: int = 1, out: torch.Tensor | None = None, tf32: bool | None = None,
                      config: BlockConfig | None = None) -> torch.Tensor:
    """S width configs of one layer in one launch (the multi-config form).

    ``x`` holds ``S_in`` slices of ``batch`` images: shape ``(S_in * batch, C, H, W)``.
    ``meta`` is an int32 ``(S, 5)`` tensor on the device, one row per *output* slice:
    ``(cin, cout, x_slice, res_slice, bn_row)`` (see :data:`META_COLUMNS`; depthwise rows
    use ``cout`` as their width). Output slice ``s`` is the layer at widths
    ``(cin, cout)`` applied to input slice ``x_slice``, plus residual slice ``res_slice``,
    with BN row ``bn_row`` (row ``s`` when ``bn_per_slice``) of a ``(R, C)``
    ``scale``/``shift`` (a 1-d vector is the one row 0). Returns
    ``(S * batch, cout_alloc, OH, OW)``, channels ``>= cout`` of each slice set to zero.
    Input channels past a slice's ``cin`` are never read, so they need not be zero.
    The widths in ``meta`` are trusted (they index memory): build it with
    :func:`hwslim.kernels.plan_multi` or check them against the shapes yourself.
    ``width_align``: a power of two (<= 16) dividing every ``cin``/``cout`` in ``meta``
    (8 for widths on hwslim's default grid): lets the compiler vectorize the masked
    channel loads. A wrong value gives wrong results; 1 is always safe.
    """
    _check(x, weight, scale, shift, residual, depthwise)
    _check_meta(meta, x, batch)
    k = weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    slices = meta.shape[0]
    _, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    if cout_alloc > weight.shape[0] or cout_alloc > scale.shape[-1]:
        raise ValueError(f"cout_alloc={cout_alloc} exceeds the weight's {weight.shape[0]} output channels")
    out = _alloc(out, (slices * batch, cout_alloc, oh, ow), x)
    _launch(x, weight, scale, shift, residual, out, meta,
            _Call(batch, slices, 0, 0, x.shape[1] if cin_max is None else cin_max, stride, padding, act,
                  depthwise, tf32, config, bn_per_slice, _check_align(width_align, cout_alloc)))
    return out


# -- depthwise + 1x1 fused (an inverted residual block's second half) ----------------------------
def dw_project_bn_act(x: torch.Tensor, dw_weight: torch.Tensor, dw_scale: torch.Tensor, dw_shift: torch.Tensor,
                      weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, stride: int = 1,
                      padding: int | None = None, dw_act: str | None = "relu6", act: str | None = None,
                      residual: torch.Tensor | None = None, cin: int | None = None, cout: int | None = None,
                      meta: torch.Tensor | None = None, dw_meta: torch.Tensor | None = None,
                      batch: int | None = None, cout_alloc: int | None = None, cin_max: int | None = None,
                      bn_per_slice: bool = False, width_align: int = 1, tf32: bool | None = None,
                      config: BlockConfig | None = None) -> torch.Tensor:
    """``act(bn(conv1x1(dw_act(bn_dw(dwconv(x))))) + residual)``, the depthwise output kept on chip.

    Equal to :func:`conv_bn_act` with ``depthwise=True`` followed by :func:`conv_bn_act`
    on its output (1x1 ``weight``), without writing and re-reading the depthwise output:
    the largest byte term of a MobileNetV2 step. Eval-mode BN only (folded rows).

    Single config: ``cin`` (the depthwise width, default ``x.shape[1]``) and ``cout``.
    Multi-config: ``meta`` holds the 1x1 layer's rows (its ``x_slice`` names a row of
    ``dw_meta``, the depthwise layer's rows, whose ``x_slice`` names an input slice),
    with ``batch``/``cout_alloc``/``bn_per_slice``/``width_align`` as in
    :func:`conv_bn_act_multi` (BN rows per slice index both layers' tables).
    """
    _check(x, dw_weight, dw_scale, dw_shift, residual, True)
    _check(x, weight, scale, shift, residual, False)
    if weight.shape[2] != 1:
        raise ValueError(f"the fused second layer must be 1x1, got kernel {tuple(weight.shape[2:])}")
    k = dw_weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    n, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    if meta is None:
        cin, _ = _single_widths(x, dw_weight, cin, None, True, dw_scale.shape[-1])
        _, cout = _single_widths(x[:, :cin], weight, cin, cout, False, scale.shape[-1])
        batch, slices, c_alloc, cin_max, align = n, 1, cout, cin, pow2_align(cin, cout)
        _check_residual(residual, n, cout, oh, ow)
        cin_arg, cout_arg = cin, cout
    else:
        if dw_meta is None or batch is None or cout_alloc is None:
            raise ValueError("the multi-config form needs meta, dw_meta, batch and cout_alloc")
        _check_meta(meta, x, batch)
        _check_meta(dw_meta, x, batch)
        slices, c_alloc, align = meta.shape[0], cout_alloc, _check_align(width_align, cout_alloc)
        cin_max = x.shape[1] if cin_max is None else cin_max
        cin_arg = cout_arg = 0
    out = torch.empty((slices * batch, c_alloc, oh, ow), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    res = residual if residual is not None else out
    vec = pow2_align(*(st for t in (x, res, out) for i, st in enumerate(t.stride()) if i != 1))
    s_bn_d = dw_scale.stride(0) if dw_scale.dim() == 2 else 0
    s_bn = scale.stride(0) if scale.dim() == 2 else 0
    dot = _dot_code(x.dtype)
    if INTERPRETED and x.dtype == torch.bfloat16:
        dot = 3
    m = batch * oh * ow
    args = (x, dw_weight, dw_scale, dw_shift, weight, scale, shift, res, out, meta, dw_meta,
            batch, h, w, oh, ow, c_alloc, *_div_strides(x, vec), dw_weight.stride(0), dw_weight.stride(2),
            dw_weight.stride(3), weight.stride(0), weight.stride(1), *_div_strides(res, vec), *_div_strides(out, vec),
            s_bn_d, s_bn, cin_arg, cout_arg, _bucket(m * slices), _bucket(c_alloc), _bucket(cin_max))
    const = dict(KSIZE=k, STRIDE=stride, PAD=padding, ACT_D=ACT_CODES[dw_act], ACT=ACT_CODES[act],
                 HAS_RES=residual is not None, MULTI=meta is not None, DOT=dot, PRECISION=_precision(tf32),
                 BN_SLICE=bn_per_slice, VEC=vec, W_ALIGN=align)
    if config is None and _dw_project_tuned is not None:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(c_alloc, meta_["BLOCK_N"]), slices)
        _dw_project_tuned[grid](*args, **const)
        return out
    cfg = config or (INTERPRETER_CONFIG if INTERPRETED else BlockConfig(64, 64, 16, 4, 2))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c_alloc, cfg.block_n), slices)
    dw_project_kernel[grid](*args, **const, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# -- batch-statistics BatchNorm (train-mode BN, BN recalibration) ---------------------------
def conv_stats(x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, padding: int | None = None,
               depthwise: bool = False, cin: int | None = None, cout: int | None = None,
               meta: torch.Tensor | None = None, batch: int | None = None, cout_alloc: int | None = None,
               cin_max: int | None = None, width_align: int = 1, tf32: bool | None = None,
               config: BlockConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw conv output and its per-channel batch mean and (biased) variance.

    Single config (``meta`` None, widths ``cin``/``cout`` as in :func:`conv_bn_act`):
    returns ``(y, mean, var)`` with ``y`` ``(N, cout, OH, OW)`` and float32 ``(1, cout)``
    statistics over ``(N, OH, OW)``. Multi-config (``meta``, ``batch``, ``cout_alloc`` as
    in :func:`conv_bn_act_multi`): ``(S, cout_alloc)`` statistics, one row per slice.
    The statistics come from the fp32 accumulator, combined across tiles in float64
    with Chan's formula. Finish with :func:`bn_act_`.
    """
    _check(x, weight, None, None, None, depthwise)
    k = weight.shape[2]
    padding = (k - 1) // 2 if padding is None else padding
    n, _, h, w = x.shape
    oh, ow = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    if meta is None:
        cin, cout = _single_widths(x, weight, cin, cout, depthwise, None)
        call = _Call(n, 1, cin, cout, cin, stride, padding, None, depthwise, tf32, config)
        shape = (n, cout, oh, ow)
    else:
        if batch is None or cout_alloc is None:
            raise ValueError("the multi-config form needs batch and cout_alloc")
        _check_meta(meta, x, batch)
        call = _Call(batch, meta.shape[0], 0, 0, x.shape[1] if cin_max is None else cin_max, stride, padding,
                     None, depthwise, tf32, config, False, _check_align(width_align, cout_alloc))
        shape = (meta.shape[0] * batch, cout_alloc, oh, ow)
    out = _alloc(None, shape, x)
    t_max = triton.cdiv(call.batch * oh * ow, _min_block_m(call))
    part = torch.zeros((call.slices, t_max, 3, shape[1]), device=x.device, dtype=torch.float32)
    _launch(x, weight, None, None, None, out, meta, call, part)
    # Chan's parallel combine: var = (sum M2_t + sum n_t (mean_t - mean)^2) / n, sums in fp64
    cnt, tot, m2 = part.unbind(2)  # (S, T, C) each
    count = cnt.sum(1, dtype=torch.float64)
    mean = tot.sum(1, dtype=torch.float64) / count
    dev = tot / cnt.clamp_min(1.0) - mean.float()[:, None]
    var = (m2.sum(1, dtype=torch.float64) + (cnt * dev * dev).sum(1, dtype=torch.float64)) / count
    return out, mean.float(), var.float()


def bn_act_(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, act: str | None = None,
            residual: torch.Tensor | None = None, meta: torch.Tensor | None = None, batch: int | None = None,
            bn_per_slice: bool = True, width_align: int = 1) -> torch.Tensor:
    """In place: ``y = act(y * scale + shift + residual)`` with channels past ``cout`` zeroed.

    The second half of batch-statistics BN after :func:`conv_stats`. ``scale``/``shift``
    are float32 ``(C,)`` or ``(R, C)``; with ``meta`` (multi-config) row ``s`` serves
    slice ``s`` when ``bn_per_slice``, else row ``bn_row``.
    """
    _check(y, y.new_empty((1, 1, 1, 1)), scale, shift, residual, False)
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; expected one of {list(ACT_CODES)}")
    n_all, c_alloc, oh, ow = y.shape
    if meta is not None:
        if batch is None:
            raise ValueError("the multi-config form needs batch")
        _check_meta(meta, y, batch)
        slices = meta.shape[0]
    else:
        batch, slices = n_all, 1
        _check_residual(residual, n_all, c_alloc, oh, ow)
    res = residual if residual is not None else y
    cfg = INTERPRETER_CONFIG if INTERPRETED else _BN_ACT_CONFIG
    grid = (triton.cdiv(batch * oh * ow, cfg.block_m) * triton.cdiv(c_alloc, cfg.block_n), slices)
    vec = pow2_align(*(st for t in (y, res) for i, st in enumerate(t.stride()) if i != 1))
    _bn_act_kernel[grid](y, scale, shift, res, meta, batch, oh, ow, c_alloc, *_div_strides(res, vec),
                         *_div_strides(y, vec), scale.stride(0) if scale.dim() == 2 else 0, c_alloc,
                         ACT=ACT_CODES[act], HAS_RES=residual is not None, MULTI=meta is not None,
                         BN_SLICE=bn_per_slice, VEC=vec,
                         W_ALIGN=_check_align(width_align, c_alloc) if meta is not None else pow2_align(c_alloc),
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    return y


def batch_bn_scale_shift(bn: torch.nn.BatchNorm2d, mean: torch.Tensor,
                         var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-mode BN as ``(scale, shift)`` rows from batch ``mean``/biased ``var`` (R, C)."""
    c = mean.shape[-1]
    gamma = bn.weight.detach()[:c].float() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach()[:c].float() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)
    return scale.contiguous(), (beta - mean * scale).contiguous()


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
