"""A CPU stand-in for torch's sm_100 MXFP8 grouped GEMM kernel (MSLK ``mx8mx8bf16_grouped``), and nothing else.

:func:`install` registers it as the CPU kernel of the real ops ``aten::_scaled_grouped_mm`` and
``aten::_scaled_grouped_mm_v2`` (which have CUDA and Meta kernels only), so every call of the torch row
runs torch's own code around it: ``F.scaled_grouped_mm`` and its enum plumbing, the dispatcher, and, on
meta tensors of the call's very shapes, strides and dtypes, torch's own meta kernel (its shape, dtype,
layout and stride checks, ``_meta_grouped_mm_common``, are v1's; v2's meta, registered from 2.14 on, only
infers the output shape, so a v2 call runs both). Only the arithmetic of the GPU kernel is replaced:

* scales are decoded by the documented layout (``shared/torch-scaled-grouped-mm.md``, MSLK's
  ``set_stacked_kernel_args_kernel``): 2D x 3D, group g's block of ``round_up(size_g, 128)`` rows starts at
  row ``sum_{i<g} round_up(size_i, 128)``; the 3D operand's expert e is row e; 2D x 2D, group g's block of
  ``round_up(size_g/32, 4)`` scale columns starts at element ``round_up(rows, 128) * sum_{i<g} ...``;
  inside a block, 128x4 tiles of 32x4x4 (:func:`torch_blocked.unblock`);
* data is dequantised exactly and each group multiplied with float32 accumulation, rounded once to bf16;
* what the kernel leaves unwritten (rows after the last group, empty groups of the 2D x 2D output) is
  NaN, so a caller that reads it fails;
* what the kernel asserts on the device is asserted: every group a multiple of 32 (MXFP8 blocks),
  group ends within the operand.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

import torch_blocked as tb
from mxfp8_compat.numerics.quantize import mx_dequantize

#: (op, meta kernel that checked the call) of every call since the last install().
CALLS: list[tuple[str, str]] = []

_E4M3, _E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu
# Enum values as F.scaled_grouped_mm passes them (torch 2.10+; older torch has no such enums and no row)
_F = torch.nn.functional
BLOCKWISE_1X32 = int(_F.ScalingType.BlockWise1x32.value) if hasattr(_F, "ScalingType") else None
SWIZZLE_32_4_4 = int(_F.SwizzleType.SWIZZLE_32_4_4.value) if hasattr(_F, "SwizzleType") else None


class KernelAssertion(AssertionError):
    """What torch's sm_100 kernel would have rejected (a device-side assert on the GPU)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelAssertion(message)


def _meta(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _has_meta(op: torch._ops.OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")


def _dequantize(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) e4m3 row-major data with (rows, cols/32) uint8 exponents -> float32."""
    return mx_dequantize(data.contiguous(), scales.contiguous(), torch.float32)


def _group_ends(offs: torch.Tensor, total: int, what: str) -> list[int]:
    ends = [int(v) for v in offs.tolist()]
    previous = 0
    for end in ends:
        _require(previous <= end <= total, f"{what}: group ends {ends} must be non-decreasing and <= {total}")
        _require((end - previous) % 32 == 0, f"{what}: every MXFP8 group must be a multiple of 32, ends {ends}")
        previous = end
    return ends


def mxfp8_grouped_gemm(mat_a, mat_b, scale_a, scale_b, offs) -> torch.Tensor:
    """What the sm_100 kernel computes, from the operands as laid out for it."""
    _require(mat_a.dtype == _E4M3 and mat_b.dtype == _E4M3, "stand-in models MXFP8 only: e4m3 operands")
    _require(scale_a.dtype == _E8M0 and scale_b.dtype == _E8M0, "stand-in models MXFP8 only: e8m0 scales")
    _require(offs is not None and offs.dtype == torch.int32, "offs must be int32")
    sa, sb = scale_a.contiguous().view(torch.uint8), scale_b.contiguous().view(torch.uint8)
    if mat_b.dim() == 3:  # 2D x 3D: groups of rows of A, expert e of B
        M, K = mat_a.shape
        E, _, N = mat_b.shape
        kb, kb_padded = K // 32, tb.round_up(K // 32, 4)
        _require(sa.dim() == 2 and sa.shape[1] == kb_padded, f"scale_a: expected {kb_padded} columns, got {tuple(sa.shape)}")
        flat_a = sa.reshape(-1)
        out = torch.full((M, N), float("nan"), dtype=torch.float32)
        start = block_row = 0
        for expert, end in enumerate(_group_ends(offs, M, "offs (rows of mat_a)")):
            rows = end - start
            if rows:
                block = flat_a[block_row * kb_padded : (block_row + tb.round_up(rows, 128)) * kb_padded]
                _require(block.numel() == tb.round_up(rows, 128) * kb_padded, "scale_a is too small for its groups' blocks")
                a = _dequantize(mat_a[start:end], tb.unblock(block, rows, kb))
                b = _dequantize(mat_b[expert].t(), tb.unblock(sb[expert], N, kb))  # (N, K)
                out[start:end] = a @ b.t()
            block_row += tb.round_up(rows, 128)
            start = end
        return out.to(torch.bfloat16)
    M, Ktot = mat_a.shape  # 2D x 2D: groups along the contraction, one output matrix each
    N = mat_b.shape[1]
    ends = _group_ends(offs, Ktot, "offs (contraction dimension)")
    flat_a, flat_b = sa.reshape(-1), sb.reshape(-1)
    rows_a, rows_b = tb.round_up(M, 128), tb.round_up(N, 128)
    out = torch.full((len(ends), M, N), float("nan"), dtype=torch.float32)
    start = cols = 0
    for group, end in enumerate(ends):
        size = end - start
        width = tb.round_up(size // 32, 4)
        if size:
            block_a = flat_a[rows_a * cols : rows_a * (cols + width)]
            block_b = flat_b[rows_b * cols : rows_b * (cols + width)]
            _require(block_a.numel() == rows_a * width and block_b.numel() == rows_b * width, "scales too small for their groups' blocks")
            a = _dequantize(mat_a[:, start:end], tb.unblock(block_a, M, size // 32))
            b = _dequantize(mat_b[start:end].t(), tb.unblock(block_b, N, size // 32))  # (N, size)
            out[group] = a @ b.t()
        cols += width
        start = end
    return out.to(torch.bfloat16)


def _scaled_grouped_mm_cpu(self, mat2, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    op = torch.ops.aten._scaled_grouped_mm.default
    meta = op(_meta(self), _meta(mat2), _meta(scale_a), _meta(scale_b), _meta(offs), _meta(bias), _meta(scale_result), out_dtype, use_fast_accum)
    CALLS.append(("_scaled_grouped_mm", "_scaled_grouped_mm meta"))
    out = mxfp8_grouped_gemm(self, mat2, scale_a, scale_b, offs)
    assert out.shape == meta.shape and out.dtype == meta.dtype, (out.shape, meta.shape)
    return out


def _scaled_grouped_mm_v2_cpu(self, mat2, scale_a, recipe_a, swizzle_a, scale_b, recipe_b, swizzle_b, offs=None, bias=None, out_dtype=None, contraction_dim=(), use_fast_accum=False):
    _require(list(recipe_a) == [BLOCKWISE_1X32] and list(recipe_b) == [BLOCKWISE_1X32], f"recipes {recipe_a}, {recipe_b}: MXFP8 is BlockWise1x32")
    _require(list(swizzle_a) == [SWIZZLE_32_4_4] and list(swizzle_b) == [SWIZZLE_32_4_4], f"swizzles {swizzle_a}, {swizzle_b}: MXFP8 is SWIZZLE_32_4_4")
    _require(len(scale_a) == 1 and len(scale_b) == 1, "MXFP8 takes one scale tensor per operand")
    # torch 2.14/2.15 register v2's meta as shape inference only (it accepts a mis-shaped scale); the
    # checks live in v1's meta, run here on the same operands: v2's MXFP8 branch reaches the same kernel.
    checked = ["_scaled_grouped_mm meta"]
    meta = torch.ops.aten._scaled_grouped_mm.default(
        _meta(self), _meta(mat2), _meta(scale_a[0]), _meta(scale_b[0]), _meta(offs), _meta(bias), None, out_dtype, use_fast_accum
    )
    v2 = torch.ops.aten._scaled_grouped_mm_v2.default
    if _has_meta(v2):  # torch >= 2.14
        meta_v2 = v2(_meta(self), _meta(mat2), [_meta(scale_a[0])], recipe_a, swizzle_a, [_meta(scale_b[0])], recipe_b, swizzle_b,
                     _meta(offs), _meta(bias), out_dtype, contraction_dim, use_fast_accum)
        assert meta_v2.shape == meta.shape and meta_v2.dtype == meta.dtype
        checked.insert(0, "_scaled_grouped_mm_v2 meta")
    CALLS.append(("_scaled_grouped_mm_v2", " + ".join(checked)))
    out = mxfp8_grouped_gemm(self, mat2, scale_a[0], scale_b[0], offs)
    assert out.shape == meta.shape and out.dtype == meta.dtype, (out.shape, meta.shape)
    return out


@contextmanager
def install() -> Iterator[list[tuple[str, str]]]:
    """Register the stand-in as the CPU kernel of both ops for the duration; yields :data:`CALLS`."""
    CALLS.clear()
    library = torch.library.Library("aten", "IMPL")
    try:
        library.impl("_scaled_grouped_mm", _scaled_grouped_mm_cpu, "CPU")
        library.impl("_scaled_grouped_mm_v2", _scaled_grouped_mm_v2_cpu, "CPU")
        yield CALLS
    finally:
        library._destroy()
