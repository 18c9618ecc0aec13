# Triton kernels of mxfp8_compat.backends.fast_emulation (imported only where triton is).
#
# No `from __future__ import annotations` here: triton reads `tl.constexpr` annotations as objects.
#
# Every kernel reproduces reference.mx_fake_quantize bit for bit. The scale exponent is derived
# from the integer bits of the block's absolute maximum (no log2, no division), which is exact:
#
#   FLOOR: biased = clamp(expbits(amax) - 135, -127, 128) + 127          (torchao's rule itself)
#   RCEIL: ceil(log2(amax / 448)) = expbits(amax) - 135 + [mantissa(amax) > 0.75]
#          (amax = 1.m * 2^e, 448 = 1.75 * 2^8); for bfloat16 amax the reference's float32
#          division and log2 land on the same integer (its quotient is never within 0.4% of a
#          power of two unless it is one), so this is the reference's exponent exactly.
#
# HW_CVT selects the hardware conversions (cvt.rn.satfinite.e4m3x2.f32 and cvt.rn.bf16x2.f32,
# sm_89+); without it (the CPU interpreter, older GPUs) the same roundings are done with
# integer and float32 arithmetic that is exact under IEEE rules.

import os

import triton
import triton.language as tl

from .launch import kernel_module


# The helpers both kernel files share (reductions the interpreter can run, bf16 loads, |x| bits),
# compiled or interpreted as this file is.
_helpers = kernel_module("helpers", os.environ.get("TRITON_INTERPRET") == "1")
_max, _sum, _cumsum, _load_f32, _abs_bits = (
    _helpers._max, _helpers._sum, _helpers._cumsum, _helpers._load_f32, _helpers._abs_bits,
)


@triton.jit
def _fake_quant(x, amax_bits, RCEIL: tl.constexpr, HW_CVT: tl.constexpr):
    """Quantise float32 ``x`` to e4m3 with the e8m0 scale of ``amax_bits`` and dequantise (float32).

    ``amax_bits`` is the block maximum of _abs_bits, broadcastable to ``x``.
    """
    ef = amax_bits >> 23
    is_nan = amax_bits > 0x7F800000
    if RCEIL:
        above = ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        biased = tl.minimum(tl.maximum(ef - 8 + above, 0), 254)
        biased = tl.where(ef == 0, 0, biased)
        biased = tl.where(amax_bits == 0x7F800000, 254, biased)
        # reference: 1.0 for exponent 0, 2**-127 for the inf exponent 254, else 2**(127 - e)
        recip_bits = tl.where(biased == 0, 0x3F800000, tl.where(biased == 254, 0x00400000, (254 - biased) << 23))
    else:
        biased = tl.minimum(tl.maximum(ef - 135, -127), 128) + 127
        # reference: x / max(2**(e - 127), 2**-126); dividing by a power of two in the normal
        # range is multiplying by its exact reciprocal, both rounded once
        recip_bits = (254 - tl.maximum(biased, 1)) << 23
    v = x * recip_bits.to(tl.float32, bitcast=True)
    if HW_CVT:
        q = v.to(tl.float8e4nv).to(tl.float32)
    else:
        c = tl.minimum(tl.maximum(v, -448.0), 448.0)
        c_bits = c.to(tl.int32, bitcast=True)
        t_bits = c_bits & 0x7FFFFFFF
        # round to nearest even on the e4m3 grid: spacing 2**(e - 3), e >= -6 (subnormals)
        e = tl.maximum((t_bits >> 23) - 127, -6)
        big = ((e + 147) << 23).to(tl.float32, bitcast=True)  # 2**(e + 20)
        r = (t_bits.to(tl.float32, bitcast=True) + big) - big
        q = (r.to(tl.int32, bitcast=True) | ((c_bits >> 31) << 31)).to(tl.float32, bitcast=True)
    scale_bits = tl.where(biased == 0, 0x00400000, biased << 23)  # 2**(e - 127), 2**-127 for 0
    y = q * scale_bits.to(tl.float32, bitcast=True)
    return tl.where(is_nan, float("nan"), y)


@triton.jit
def _store_bf16(ptr, offsets, y, mask, HW_CVT: tl.constexpr):
    """Store float32 ``y`` rounded to bfloat16 (nearest even). Without HW_CVT ``ptr`` is an int16 view."""
    if HW_CVT:
        tl.store(ptr + offsets, y.to(tl.bfloat16), mask=mask)
    else:
        bits = y.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        tl.store(ptr + offsets, rounded.to(tl.int16), mask=mask)


@triton.jit
def _blocks_job(x_ptr, y_ptr, n_blocks, pid, RCEIL: tl.constexpr, IN_BF16: tl.constexpr, HW_CVT: tl.constexpr,
                BLOCKS: tl.constexpr):
    """Fake-quantise BLOCKS consecutive 32-element blocks of a contiguous tensor whose last
    dimension is a multiple of 32 (so every run of 32 elements is one block)."""
    base = pid.to(tl.int64) * (BLOCKS * 32)
    offsets = tl.arange(0, BLOCKS)[:, None] * 32 + tl.arange(0, 32)[None, :]
    # int64: n_blocks * 32 is the element count, 2**31 and more for a 262144 x 8192 activation
    mask = offsets < (tl.cast(n_blocks, tl.int64) * 32 - base)
    x = _load_f32(x_ptr + base, offsets, mask, IN_BF16, HW_CVT)
    amax = _max(_abs_bits(x), 1)
    _store_bf16(y_ptr + base, offsets, _fake_quant(x, amax[:, None], RCEIL, HW_CVT), mask, HW_CVT)


@triton.jit
def _weight_job(x_ptr, yk_ptr, yn_ptr, N, K, stride_e, stride_n, stride_k, q, k_programs,
                DO_K: tl.constexpr, DO_N: tl.constexpr, RCEIL: tl.constexpr, IN_BF16: tl.constexpr,
                HW_CVT: tl.constexpr, BK: tl.constexpr):
    """Fake-quantise one 32 (N) x BK (K) tile of B^T, an (E, N, K) view of the weight, in blocks
    of 32 along K (into ``yk``) and along N (into ``yn``), reading it once. Outputs are
    contiguous (E, N, K). Tile ``q`` counts K tiles fastest, then N, then experts."""
    k0 = (q % k_programs) * BK
    rest = q // k_programs
    n_tiles = N // 32
    n0 = (rest % n_tiles) * 32
    e = (rest // n_tiles).to(tl.int64)
    n = tl.arange(0, 32)
    k = tl.arange(0, BK)
    mask = (k0 + k < K)[None, :]
    # Every address term in int64: a strided weight view can have any strides, and E * N * K
    # (the outputs' size) passes 2**31 at real sizes.
    K64 = tl.cast(K, tl.int64)
    s_n = tl.cast(stride_n, tl.int64)
    s_k = tl.cast(stride_k, tl.int64)
    src = x_ptr + (e * stride_e + n0.to(tl.int64) * s_n + k0.to(tl.int64) * s_k)
    dst_base = e * N * K64 + n0.to(tl.int64) * K64 + k0
    dst = n[:, None] * K64 + k[None, :]
    x = _load_f32(src, n[:, None] * s_n + k[None, :] * s_k, mask, IN_BF16, HW_CVT)
    bits = _abs_bits(x)
    if DO_K:
        amax_k = _max(tl.reshape(bits, (32, BK // 32, 32)), 2)
        amax_k = tl.reshape(tl.broadcast_to(amax_k[:, :, None], (32, BK // 32, 32)), (32, BK))
        _store_bf16(yk_ptr + dst_base, dst, _fake_quant(x, amax_k, RCEIL, HW_CVT), mask, HW_CVT)
    if DO_N:
        amax_n = _max(bits, 0)
        _store_bf16(yn_ptr + dst_base, dst, _fake_quant(x, amax_n[None, :], RCEIL, HW_CVT), mask, HW_CVT)


@triton.jit
def quantize_kernel(
    x_ptr,
    y_ptr,
    n_blocks,
    x_programs,
    w_ptr,
    wk_ptr,
    wn_ptr,
    N,
    K,
    stride_e,
    stride_n,
    stride_k,
    k_programs,
    RCEIL: tl.constexpr,
    X_BF16: tl.constexpr,
    W_BF16: tl.constexpr,
    DO_K: tl.constexpr,
    DO_N: tl.constexpr,
    HW_CVT: tl.constexpr,
    BLOCKS: tl.constexpr,
    BK: tl.constexpr,
):
    """One launch for an activation and/or a weight: programs [0, x_programs) fake-quantise x
    (contiguous, blocks along its last dimension) into y; the others tiles of the weight w
    (along K into wk, along N into wn, as DO_K / DO_N ask)."""
    pid = tl.program_id(0)
    if pid < x_programs:
        _blocks_job(x_ptr, y_ptr, n_blocks, pid, RCEIL, X_BF16, HW_CVT, BLOCKS)
    else:
        _weight_job(w_ptr, wk_ptr, wn_ptr, N, K, stride_e, stride_n, stride_k, pid - x_programs, k_programs,
                    DO_K, DO_N, RCEIL, W_BF16, HW_CVT, BK)


@triton.jit
def _group_bounds(offs_ptr, E, E_PAD: tl.constexpr):
    """Start and end row of each group (padded lanes: empty groups at offs[-1]), read on device."""
    idx = tl.arange(0, E_PAD)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    last = _sum(tl.where(idx == E - 1, ends, 0), 0)
    ends = tl.where(idx < E, ends, last)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx >= 1) & (idx < E), other=0)
    starts = tl.where(idx < E, starts, last)
    return idx, starts, ends, last


@triton.jit
def quantize_grouped_rows_kernel(
    x_ptr,
    y_ptr,
    offs_ptr,
    M,
    C,
    E,
    n_block_programs,
    RCEIL: tl.constexpr,
    IN_BF16: tl.constexpr,
    HW_CVT: tl.constexpr,
    E_PAD: tl.constexpr,
    BC: tl.constexpr,
):
    """Fake-quantise a contiguous (M, C) tensor in blocks of 32 rows that restart at each group
    boundary (a group's last block may be short: zero padding). Rows after offs[-1] are zeroed.

    Programs [0, n_block_programs) take the groups' row blocks in order (the block index is
    mapped to its group on device); the others zero 32 rows each after offs[-1]."""
    _grouped_rows_job(x_ptr, y_ptr, offs_ptr, M, C, E, n_block_programs, tl.program_id(0), tl.program_id(1),
                      RCEIL, IN_BF16, HW_CVT, E_PAD, BC)


# Each kernel's body is a job that takes its program ids as arguments, so that the bounds tests
# (tests/test_kernel_bounds.py) can run any one program, the last of a 2**31-element tensor
# included, in triton's interpreter.
@triton.jit
def _grouped_rows_job(x_ptr, y_ptr, offs_ptr, M, C, E, n_block_programs, pid, c_pid, RCEIL: tl.constexpr,
                      IN_BF16: tl.constexpr, HW_CVT: tl.constexpr, E_PAD: tl.constexpr, BC: tl.constexpr):
    c0 = c_pid * BC
    cols = tl.arange(0, BC)
    col_mask = (c0 + cols < C)[None, :]
    rows32 = tl.arange(0, 32)
    tile = rows32[:, None] * C + cols[None, :]
    idx, starts, ends, last = _group_bounds(offs_ptr, E, E_PAD)
    if pid < n_block_programs:
        sizes = tl.maximum(ends - starts, 0)
        n_blk = (sizes + 31) // 32
        cum = _cumsum(n_blk, 0)
        total = _sum(n_blk, 0)
        if pid < total:
            group = _sum((cum <= pid).to(tl.int32), 0)
            first_block = _sum(tl.where(idx == group, cum - n_blk, 0), 0)
            g_start = _sum(tl.where(idx == group, starts, 0), 0)
            g_end = _sum(tl.where(idx == group, ends, 0), 0)
            row0 = g_start + (pid - first_block) * 32
            rows = row0 + rows32
            mask = ((rows < g_end) & (rows < M) & (rows >= 0))[:, None] & col_mask
            base = row0.to(tl.int64) * C + c0  # int64: M * C passes 2**31 at real sizes
            x = _load_f32(x_ptr + base, tile, mask, IN_BF16, HW_CVT)
            amax = _max(_abs_bits(x), 0)
            _store_bf16(y_ptr + base, tile, _fake_quant(x, amax[None, :], RCEIL, HW_CVT), mask, HW_CVT)
    else:
        row0 = (pid - n_block_programs) * 32
        rows = row0 + rows32
        mask = ((rows >= tl.maximum(last, 0)) & (rows < M))[:, None] & col_mask
        base = row0.to(tl.int64) * C + c0
        _store_bf16(y_ptr + base, tile, tl.full((32, BC), 0.0, tl.float32), mask, HW_CVT)


@triton.jit
def _zero_range(ptr, chunk, lo, hi, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Zero the elements of [chunk, chunk + BLOCK * ITERS) that lie in [lo, hi)."""
    lanes = tl.arange(0, BLOCK)
    if (chunk + BLOCK * ITERS > lo) & (chunk < hi):
        for i in tl.static_range(ITERS):
            start = chunk + i * BLOCK
            tl.store(ptr + start + lanes, tl.full((BLOCK,), 0.0, tl.float32), mask=(lanes >= lo - start) & (lanes < hi - start))


@triton.jit
def zero_unused_kernel(
    grad_a_ptr,
    grad_b_ptr,
    offs_ptr,
    M,
    K,
    E,
    KN,
    a_programs,
    b_programs,
    E_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Zero, in place, the input-gradient rows after offs[-1] and the weight gradient of every
    empty group. Program p < a_programs covers elements [p, p + 1) * BLOCK * ITERS of grad_A,
    the others one such chunk of one expert's gradient; a chunk with nothing to zero returns at
    once (the grid does not depend on offs, so nothing is read on the host)."""
    _zero_unused_job(grad_a_ptr, grad_b_ptr, offs_ptr, M, K, E, KN, a_programs, b_programs, tl.program_id(0),
                     E_PAD, BLOCK, ITERS)


@triton.jit
def _zero_unused_job(grad_a_ptr, grad_b_ptr, offs_ptr, M, K, E, KN, a_programs, b_programs, pid,
                     E_PAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    idx, starts, ends, last = _group_bounds(offs_ptr, E, E_PAD)
    if pid < a_programs:
        lo = tl.minimum(tl.maximum(last, 0), M).to(tl.int64) * K
        hi = (lo * 0 + M) * K
        _zero_range(grad_a_ptr, pid.to(tl.int64) * (BLOCK * ITERS), lo, hi, BLOCK, ITERS)
    else:
        e = (pid - a_programs) // b_programs
        size = _sum(tl.where(idx == e, ends - starts, 0), 0)
        lo = e.to(tl.int64) * KN
        hi = tl.where(size <= 0, lo + KN, lo)
        chunk = lo + ((pid - a_programs) % b_programs).to(tl.int64) * (BLOCK * ITERS)
        _zero_range(grad_b_ptr, chunk, lo, hi, BLOCK, ITERS)
