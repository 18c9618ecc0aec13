"""torch's own MXFP8 grouped GEMM: the binders of :data:`.table.TORCH_GENERATIONS`.

torch ships the sm_100 kernel itself (MSLK's CUTLASS ``mx8mx8bf16_grouped``); mxfp8_compat supplies
the operands (:mod:`mxfp8_compat.backends.torch_native`). A torch row's normalizer binds the entry to
``gemm(mat_a, mat_b, scale_a, scale_b, offs) -> bf16`` for MXFP8 operands: e4m3 data, e8m0 scales in
the 128x4 blocked layout (``shared/torch-scaled-grouped-mm.md``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from .schema import ScaledGroupedMM

__all__ = ["bind_scaled_grouped_mm", "bind_scaled_grouped_mm_v1"]


def bind_scaled_grouped_mm(entry: Callable[..., Any]) -> ScaledGroupedMM:
    """``F.scaled_grouped_mm``: ``BlockWise1x32`` (e8m0) scales swizzled ``SWIZZLE_32_4_4`` on both operands."""
    functional = importlib.import_module("torch.nn.functional")
    blockwise, swizzle = functional.ScalingType.BlockWise1x32, functional.SwizzleType.SWIZZLE_32_4_4

    def scaled_grouped_mm_mxfp8(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return entry(
            mat_a, mat_b, scale_a, blockwise, scale_b, blockwise,
            swizzle_a=swizzle, swizzle_b=swizzle, offs=offs, output_dtype=torch.bfloat16,
        )

    return scaled_grouped_mm_mxfp8


def bind_scaled_grouped_mm_v1(entry: Callable[..., Any]) -> ScaledGroupedMM:
    """``torch._scaled_grouped_mm``: MXFP8 because both operands are e4m3 and both scales e8m0 (swizzle implied)."""

    def scaled_grouped_mm_v1_mxfp8(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return entry(mat_a, mat_b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)

    return scaled_grouped_mm_v1_mxfp8
