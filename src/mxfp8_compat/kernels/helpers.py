# Triton helpers shared by fast_quant.py and mx_quant.py (imported only where triton is).
#
# No `from __future__ import annotations` here: triton reads `tl.constexpr` annotations as objects.
# Each kernel file takes these through kernel_module("helpers", interpreted), so that the
# interpreted copy of a kernel file calls interpreted helpers.

import triton
import triton.language as tl


# Reductions go through tl.reduce / tl.associative_scan with triton's own combine functions
# rather than tl.max / tl.sum / tl.cumsum (and tl.full, not tl.zeros): those are @triton.jit functions of triton itself,
# which the interpreter can call only when triton was imported with TRITON_INTERPRET=1,
# whereas it recognises these combine functions and runs them as numpy reductions.
@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


@triton.jit
def _load_f32(ptr, offsets, mask, IN_BF16: tl.constexpr, HW_CVT: tl.constexpr):
    """Load as float32. bf16 is read from an int16 view when HW_CVT is off (exact widening)."""
    if IN_BF16 and not HW_CVT:
        raw = tl.load(ptr + offsets, mask=mask, other=0)
        bits = (raw.to(tl.int32) & 0xFFFF) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _abs_bits(x):
    """|x| as int32 bits: ordered like |x| for numbers, and above inf (0x7F800000) for NaN."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


