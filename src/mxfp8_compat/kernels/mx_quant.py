# Triton MXFP8 quantisers of mxfp8_compat.backends.torch_native (imported only where triton is, on first use).
#
# No `from __future__ import annotations` here: triton reads `tl.constexpr` annotations as objects.
#
# They write what torch's MXFP8 grouped GEMM (torch._scaled_grouped_mm / F.scaled_grouped_mm, the
# MSLK `mx8mx8bf16_grouped` CUTLASS kernel) reads: float8_e4m3fn data and e8m0 scales (one per 32
# elements along the contraction dimension, RCEIL: 2**ceil(log2(amax / 448))) in the 128x4 blocked
# layout of cuBLAS ("swizzle 32_4_4"): scale (row, col) of a matrix whose scales are padded to
# (round_up(rows, 128), round_up(cols, 4)) sits at
#
#     ((row // 128) * (cols_padded // 4) + col // 4) * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + col % 4
#
# which is torch.testing._internal.common_quantized.to_blocked. Per group, as the kernel finds them:
#
#   2D x 3D, groups of rows (forward: A along K; input gradient: grad_out along N): group g's block
#       starts at row sum_{i<g} round_up(size_i, 128) of a (rows, round_up(C/32, 4)) tensor;
#   3D weight: expert e's block is row e of an (E, round_up(rows, 128) * round_up(cols/32, 4)) tensor;
#   2D x 2D, groups along the contraction (weight gradient: grad_out^T and A^T along M): group g's block
#       has round_up(size_g/32, 4) scale columns and starts at element round_up(C, 128) * sum_{i<g}
#       round_up(size_i/32, 4).
#
# The activation and gradient quantisers read their rows through a token-group map (source row of
# each padded row; `rows` for a padding row, read as zeros) and write the padded layout directly.
# Groups in the padded layout start at multiples of 32, so a program's 32 rows lie in one group.
#
# Numerics are mxfp8_compat.numerics.quantize.mx_quantize's (RCEIL) bit for bit: the exponent comes from the
# integer bits of the block maximum (exact, see fast_quant.py), the e4m3 rounding is round to
# nearest even, either by the GPU's cvt instruction (HW_CVT) or by exact float32 arithmetic (the
# CPU interpreter), whose e4m3 bits are then assembled by hand. A NaN block's data is 0x7F.

import os

import triton
import triton.language as tl

from .launch import kernel_module


# Shared with fast_quant.py (reductions the interpreter can run, bf16 loads, |x| bits), compiled
# or interpreted as this file is.
_helpers = kernel_module("helpers", os.environ.get("TRITON_INTERPRET") == "1")
_max, _sum, _cumsum, _load_f32, _abs_bits = (
    _helpers._max, _helpers._sum, _helpers._cumsum, _helpers._load_f32, _helpers._abs_bits,
)


@triton.jit
def _rceil_exponent(amax_bits):
    """Biased e8m0 exponent of ceil(log2(amax / 448)): NaN 255, inf 254, zero/subnormal amax 0."""
    ef = amax_bits >> 23
    above = ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # mantissa of amax above 1.75
    biased = tl.minimum(tl.maximum(ef - 8 + above, 0), 254)
    biased = tl.where(ef == 0, 0, biased)
    biased = tl.where(amax_bits == 0x7F800000, 254, biased)
    return tl.where(amax_bits > 0x7F800000, 255, biased)


@triton.jit
def _e4m3(x, biased, HW_CVT: tl.constexpr):
    """x scaled by its block's reciprocal scale, rounded to e4m3: fp8 values (HW_CVT) or uint8 bits."""
    # the reference's reciprocal: 1.0 for exponent 0, 2**-127 for 254, else 2**(127 - e)
    recip_bits = tl.where(biased == 0, 0x3F800000, tl.where(biased == 254, 0x00400000, (254 - biased) << 23))
    v = x * recip_bits.to(tl.float32, bitcast=True)
    c = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if HW_CVT:
        c = tl.where(biased == 255, float("nan"), c)
        return c.to(tl.float8e4nv)
    else:
        c_bits = c.to(tl.int32, bitcast=True)
        t_bits = c_bits & 0x7FFFFFFF
        # round |c| to nearest even on the e4m3 grid: spacing 2**(e - 3), e >= -6 (subnormals)
        e = tl.maximum((t_bits >> 23) - 127, -6)
        big = ((e + 147) << 23).to(tl.float32, bitcast=True)  # 2**(e + 20)
        r = (t_bits.to(tl.float32, bitcast=True) + big) - big
        rb = r.to(tl.int32, bitcast=True)
        normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)
        subnormal = (r * 512.0).to(tl.int32)  # r = m * 2**-9, m < 8
        code = tl.where(rb >= 0x3C800000, normal, subnormal) | ((c_bits >> 24) & 0x80)
        code = tl.where(biased == 255, 0x7F, code)
        return code.to(tl.uint8)


@triton.jit
def _blocked(row, col, cols_padded):
    """Offset of scale (row, col) in a blocked (128x4 tiles, 32x4x4 inside) scale matrix."""
    return ((row // 128) * (cols_padded // 4) + col // 4) * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + col % 4


@triton.jit
def _chunk_group(offs_ptr, E, p0, E_PAD: tl.constexpr):
    """The group holding padded row p0 (E if none), per-group starts and sizes (lanes >= E empty)."""
    idx = tl.arange(0, E_PAD)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    last = _sum(tl.where(idx == E - 1, ends, 0), 0)
    ends = tl.where(idx < E, ends, last)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx >= 1) & (idx < E), other=0)
    starts = tl.where(idx < E, starts, last)
    sizes = tl.maximum(ends - starts, 0)
    group = _sum((ends <= p0).to(tl.int32), 0)
    start = _sum(tl.where(idx == group, starts, 0), 0)
    return idx, group, start, sizes


@triton.jit
def quantize_rows_kernel(
    x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, E, SC,
    IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BC: tl.constexpr, E_PAD: tl.constexpr,
):
    """Rows of x (M, C) through src (padded row -> source row) into q (P, C) in blocks of 32 along C,
    scales in the row-groups blocked layout (groups end at offs, the padded ends). Programs:
    (P / 32, cdiv(C, BC)); each takes 32 padded rows (one group's) and BC columns."""
    _quantize_rows_job(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, E, SC, tl.program_id(0), tl.program_id(1),
                       IN_BF16, HW_CVT, BC, E_PAD)


# Each kernel's body is a job taking its program ids, so that tests/kernel_bounds_child.py can run the
# one program that covers a tensor's tail, past 2**31 elements, in triton's interpreter.


@triton.jit
def _quantize_rows_job(
    x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, E, SC, pid_rows, pid_cols,
    IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BC: tl.constexpr, E_PAD: tl.constexpr,
):
    p0 = pid_rows * 32
    r = tl.arange(0, 32)
    rows = p0 + r
    src = tl.load(src_ptr + rows)
    cols = pid_cols * BC + tl.arange(0, BC)
    col_ok = cols < C
    x = _load_f32(x_ptr, src[:, None].to(tl.int64) * C + cols[None, :], (src < M)[:, None] & col_ok[None, :], IN_BF16, HW_CVT)
    amax = _max(tl.reshape(_abs_bits(x), (32, BC // 32, 32)), 2)
    biased = _rceil_exponent(amax)
    wide = tl.reshape(tl.broadcast_to(biased[:, :, None], (32, BC // 32, 32)), (32, BC))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], _e4m3(x, wide, HW_CVT), mask=col_ok[None, :])
    idx, group, start, sizes = _chunk_group(offs_ptr, E, p0, E_PAD)
    if group < E:
        blocks = (sizes + 127) // 128 * 128
        first = _sum(tl.where(idx == group, _cumsum(blocks, 0) - blocks, 0), 0)
        row = p0 - start + r
        col = pid_cols * (BC // 32) + tl.arange(0, BC // 32)
        offsets = first.to(tl.int64) * SC + _blocked(row[:, None], col[None, :], SC)
        tl.store(s_ptr + offsets, biased.to(tl.uint8), mask=(col < C // 32)[None, :])


@triton.jit
def quantize_weight_kernel(
    w_ptr, qk_ptr, sk_ptr, qn_ptr, sn_ptr, N, K, stride_e, stride_n, stride_k, k_programs,
    DO_K: tl.constexpr, DO_N: tl.constexpr, IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BK: tl.constexpr,
):
    """One 32 (N) x BK (K) tile of the weight, seen as (E, N, K) through its strides, read once:
    blocks along K into qk (E, N, K) contiguous with per-expert blocked scales sk (rows n, cols k/32);
    blocks along N into qn (E, K, N) contiguous with per-expert blocked scales sn (rows k, cols n/32).
    Tile q counts K tiles fastest, then N, then experts."""
    _quantize_weight_job(w_ptr, qk_ptr, sk_ptr, qn_ptr, sn_ptr, N, K, stride_e, stride_n, stride_k, k_programs,
                         tl.program_id(0), DO_K, DO_N, IN_BF16, HW_CVT, BK)


@triton.jit
def _quantize_weight_job(
    w_ptr, qk_ptr, sk_ptr, qn_ptr, sn_ptr, N, K, stride_e, stride_n, stride_k, k_programs, q,
    DO_K: tl.constexpr, DO_N: tl.constexpr, IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BK: tl.constexpr,
):
    k0 = (q % k_programs) * BK
    rest = q // k_programs
    n_tiles = N // 32
    n0 = (rest % n_tiles) * 32
    e = (rest // n_tiles).to(tl.int64)
    n = tl.arange(0, 32)
    k = tl.arange(0, BK)
    k_ok = k0 + k < K
    s_n = tl.cast(stride_n, tl.int64)  # int64 addresses: a strided weight view can have any strides
    s_k = tl.cast(stride_k, tl.int64)
    src = w_ptr + e * stride_e + n0.to(tl.int64) * s_n + k0.to(tl.int64) * s_k
    x = _load_f32(src, n[:, None] * s_n + k[None, :] * s_k, k_ok[None, :], IN_BF16, HW_CVT)
    bits = _abs_bits(x)
    if DO_K:
        cols_k = (K // 32 + 3) // 4 * 4
        biased = _rceil_exponent(_max(tl.reshape(bits, (32, BK // 32, 32)), 2))
        wide = tl.reshape(tl.broadcast_to(biased[:, :, None], (32, BK // 32, 32)), (32, BK))
        base = e * N * K + n0.to(tl.int64) * K + k0
        tl.store(qk_ptr + base + n[:, None] * K + k[None, :], _e4m3(x, wide, HW_CVT), mask=k_ok[None, :])
        col = k0 // 32 + tl.arange(0, BK // 32)
        scale_base = e * ((N + 127) // 128 * 128) * cols_k
        tl.store(sk_ptr + scale_base + _blocked((n0 + n)[:, None], col[None, :], cols_k), biased.to(tl.uint8),
                 mask=(col < K // 32)[None, :])
    if DO_N:
        cols_n = (N // 32 + 3) // 4 * 4
        biased = _rceil_exponent(_max(bits, 0))
        base = e * K * N + k0.to(tl.int64) * N + n0
        tl.store(qn_ptr + base + k[None, :] * N + n[:, None], _e4m3(x, biased[None, :], HW_CVT), mask=k_ok[None, :])
        scale_base = e * ((K + 127) // 128 * 128) * cols_n
        tl.store(sn_ptr + scale_base + _blocked(k0 + k, n0 // 32, cols_n), biased.to(tl.uint8), mask=k_ok)


@triton.jit
def quantize_grouped_columns_kernel(
    x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, P, E,
    IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BC: tl.constexpr, E_PAD: tl.constexpr,
):
    """Rows of x (M, C) through src into q = x_padded^T (C, P) in blocks of 32 padded rows (blocks
    restart at each group, whose padded starts are multiples of 32), scales in the
    contraction-groups blocked layout (group g: round_up(C, 128) x round_up(size_g / 32, 4)).
    Programs: (P / 32, cdiv(C, BC))."""
    _quantize_grouped_columns_job(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, P, E, tl.program_id(0),
                                  tl.program_id(1), IN_BF16, HW_CVT, BC, E_PAD)


@triton.jit
def _quantize_grouped_columns_job(
    x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, P, E, pid_rows, pid_cols,
    IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, BC: tl.constexpr, E_PAD: tl.constexpr,
):
    p0 = pid_rows * 32
    r = tl.arange(0, 32)
    rows = p0 + r
    src = tl.load(src_ptr + rows)
    cols = pid_cols * BC + tl.arange(0, BC)
    col_ok = cols < C
    x = _load_f32(x_ptr, src[:, None].to(tl.int64) * C + cols[None, :], (src < M)[:, None] & col_ok[None, :], IN_BF16, HW_CVT)
    biased = _rceil_exponent(_max(_abs_bits(x), 0))
    tl.store(q_ptr + cols[None, :].to(tl.int64) * P + rows[:, None], _e4m3(x, biased[None, :], HW_CVT), mask=col_ok[None, :])
    idx, group, start, sizes = _chunk_group(offs_ptr, E, p0, E_PAD)
    if group < E:
        ncols = (sizes // 32 + 3) // 4 * 4
        first = _sum(tl.where(idx == group, _cumsum(ncols, 0) - ncols, 0), 0)
        width = _sum(tl.where(idx == group, ncols, 0), 0)
        rows_padded = (C + 127) // 128 * 128
        offsets = first.to(tl.int64) * rows_padded + _blocked(cols, (p0 - start) // 32, width)
        tl.store(s_ptr + offsets, biased.to(tl.uint8), mask=col_ok)
