"""Stand-ins for torchao's sm_100-only kernels, so that each wheel's own native autograd code runs on a CPU.

Only what needs an sm_100 GPU is replaced. Everything else in torchao's native path runs as shipped:
the entry point, the ``autograd.Function`` (argument handling, which tensor is quantised along which
dimension, the scale-rearrange calls, the GEMM calls, ``out_dtype`` plumbing, the gradients and their
arity), ``to_mx`` and the dim1 cast wrapper (``_to_mxfp8_dim1_kernel_wrapper``, whose CUDA cast
kernel ``mxfp8_quantize_cuda`` is replaced beneath it).

The stand-ins compute real MXFP8:

* quantisers use :func:`mxfp8_compat.numerics.quantize.mx_quantize` with the scale rule they are given (the
  same string the real kernel gets, so a wrong rule changes the bits), and return the layouts the real
  kernels return (e.g. column-major-per-expert data from the 3D quantiser);
* scales stay in their natural layout (one e8m0 per 32 elements along the contraction dimension), so
  the tcgen05 scale-swizzle kernels (``triton_mx_block_rearrange_*``, ``mx_block_rearrange_2d_M_groups_cuda``)
  are identities, and quantisers that emit swizzled scales directly (0.17+) emit natural ones;
* ``torch._scaled_grouped_mm`` dequantises exactly and runs a float32-accumulating grouped GEMM,
  rounded once to bf16 (the only output dtype torch's grouped kernel accepts).

Each stand-in asserts what the real kernel asserts, read from the wheels (Python asserts, and the
C++ ``TORCH_CHECK``s of torchao's mxfp8 extension and of torch's ``_scaled_grouped_mm_cuda``): dtypes,
shapes, contiguity and strides, ``offs`` int32 1D, group ends multiples of 32, bf16-only GEMM output,
and for 0.18/main's CuTeDSL 1x32 quantiser ``M % 128 == 0``, ``K % 128 == 0`` and every group a
multiple of 128 (a device-side assert there). Signatures are the sm_100 definitions' (the CPU build
of a wheel often defines a stub with another signature): :func:`signature_problems` checks each
stand-in against every definition of that name in the installed wheel's source.

What differs per release is under the release's name: ``RELEASES["0.14"]`` ... ``RELEASES["0.18"]``
(main uses 0.18's). :func:`install` patches one release's kernel names in the wheel's modules with
pytest's monkeypatch.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from mxfp8_compat.numerics.quantize import ScaleMode, mx_dequantize, mx_quantize

BLOCK = 32

#: Names of the stand-ins called since the last :func:`install`, in call order.
CALLS: list[str] = []

_MOE = "torchao.prototype.moe_training"
_QUANT = f"{_MOE}.kernels.mxfp8.quant"
_MX_KERNELS = "torchao.prototype.mx_formats.kernels"
_MX_UTILS = "torchao.prototype.mx_formats.utils"
_E8M0 = torch.float8_e8m0fnu
_E4M3 = torch.float8_e4m3fn


class KernelAssertion(AssertionError):
    """What the real sm_100 kernel would have raised for this call."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelAssertion(message)


# --- MXFP8 math in natural layout ----------------------------------------------------------


def _quantize_last_dim(x: torch.Tensor, scaling_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 data, e8m0 scales) with blocks of 32 along the last dimension."""
    _require(scaling_mode in ("floor", "rceil"), f"unsupported scaling mode {scaling_mode!r}")
    data, exponent = mx_quantize(x, ScaleMode(scaling_mode))
    return data, exponent.view(_E8M0)


def _dequantize_last_dim(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return mx_dequantize(data, scales.view(torch.uint8), torch.float32)


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(-2) >= max(1, t.size(-1))


def _is_col_major(t: torch.Tensor) -> bool:
    return t.stride(-2) == 1 and t.stride(-1) >= max(1, t.size(-2))


def _column_major_per_expert(data: torch.Tensor) -> torch.Tensor:
    """(E, N, K) data with strides (N*K, 1, N), as torchao's 3D quantisers return it."""
    return data.transpose(-2, -1).contiguous().transpose(-2, -1)


def _quantize_3d_along_n(x: torch.Tensor, scaling_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (E, N, K) quantised in blocks of 32 along N: data (E, N, K) column-major per expert, scales (E, N//32, K)."""
    data_t, scales_t = _quantize_last_dim(x.transpose(-2, -1).contiguous(), scaling_mode)  # (E, K, N), (E, K, N//32)
    return _column_major_per_expert(data_t.transpose(-2, -1)), scales_t.transpose(-2, -1).contiguous()


def _group_ends(offs: torch.Tensor, total: int, what: str) -> list[int]:
    ends = offs.tolist()
    previous = 0
    for end in ends:
        _require(previous <= end <= total, f"{what}: group ends {ends} must be non-decreasing and <= {total}")
        _require(end % BLOCK == 0, f"{what}: group ends {ends} must be multiples of {BLOCK} for MXFP8")
        previous = end
    return ends


def _check_offs(offs: Optional[torch.Tensor], name: str = "offs") -> None:
    _require(offs is not None, f"{name} must be given")
    _require(offs.dtype == torch.int32, f"{name} must be int32, got {offs.dtype}")
    _require(offs.dim() == 1, f"{name} must be 1D")


# --- torch._scaled_grouped_mm ----------------------------------------------------------------


def scaled_grouped_mm(
    self: torch.Tensor,
    mat2: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_result: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """``torch._scaled_grouped_mm`` for MXFP8 operands with natural-layout scales.

    Checks are torch's (``_scaled_grouped_mm_cuda`` and its MXFP8 branch); the scale-shape checks
    are those of the natural layout (torch checks the swizzled one).
    """
    CALLS.append("torch._scaled_grouped_mm")
    mat_a, mat_b = self, mat2
    _require(mat_a.dim() == 2, "MXFP8 grouped GEMM currently only supports 2d-2d and 2d-3d cases")
    _require(mat_b.dim() in (2, 3), "MXFP8 grouped GEMM currently only supports 2d-2d and 2d-3d cases")
    _require(_is_row_major(mat_a), "Expected mat1 to not be transposed")
    _require(_is_col_major(mat_b), "Expected mat2 to be transposed")
    if mat_b.dim() == 3:
        _require(mat_a.size(-1) == mat_b.size(-2), "contraction dimension of mat_a and mat_b must match")
    _require(mat_a.size(-1) % 16 == 0, f"Expected trailing dimension of mat_a to be divisible by 16, got {tuple(mat_a.shape)}")
    _require(mat_b.size(-2) % 16 == 0 and mat_b.size(-1) % 16 == 0, f"Expected mat_b shape to be divisible by 16, got {tuple(mat_b.shape)}")
    _require(bias is None, "Bias not supported yet")
    _require(scale_result is None, "Scale result not supported yet")
    _check_offs(offs)
    _require(mat_a.dtype == _E4M3 and mat_b.dtype == _E4M3, f"MXFP8 operands must be float8_e4m3fn, got {mat_a.dtype}, {mat_b.dtype}")
    _require(scale_a.dtype == _E8M0 and scale_b.dtype == _E8M0, "For MXFP8 grouped gemm, both scales must be float8_e8m0fnu tensors.")
    _require(out_dtype in (None, torch.bfloat16), "Only bf16 high precision output types are supported for grouped gemm")
    A = mat_a.float()
    if mat_b.dim() == 3:  # 2d-3d: groups of rows of A, one expert of B each
        M, K = mat_a.shape
        E, _, N = mat_b.shape
        _require(tuple(scale_a.shape) == (M, K // BLOCK), f"scale_a: expected (M, K//32) = {(M, K // BLOCK)}, got {tuple(scale_a.shape)}")
        _require(tuple(scale_b.shape) == (E, N, K // BLOCK), f"scale_b: expected (E, N, K//32) = {(E, N, K // BLOCK)}, got {tuple(scale_b.shape)}")
        _require(offs.shape[0] == E, f"offs: expected {E} groups, got {offs.shape[0]}")
        A = _dequantize_last_dim(mat_a, scale_a)
        B = _dequantize_last_dim(mat_b.transpose(-2, -1), scale_b).transpose(-2, -1)  # (E, K, N)
        out = torch.zeros(M, N, dtype=torch.float32)
        start = 0
        for expert, end in enumerate(_group_ends(offs, M, "offs (rows of mat_a)")):
            if end > start:
                out[start:end] = A[start:end] @ B[expert]
            start = end
    else:  # 2d-2d: groups along the contraction dimension, one output matrix each
        M, K = mat_a.shape
        _, N = mat_b.shape
        _require(mat_b.size(0) == K, "contraction dimension of mat_a and mat_b must match")
        _require(tuple(scale_a.shape) == (M, K // BLOCK), f"scale_a: expected (M, K//32) = {(M, K // BLOCK)}, got {tuple(scale_a.shape)}")
        _require(tuple(scale_b.shape) == (N, K // BLOCK), f"scale_b: expected (N, K//32) = {(N, K // BLOCK)}, got {tuple(scale_b.shape)}")
        A = _dequantize_last_dim(mat_a, scale_a)
        B = _dequantize_last_dim(mat_b.t(), scale_b).t()  # (K, N)
        ends = _group_ends(offs, K, "offs (contraction dimension)")
        out = torch.zeros(len(ends), M, N, dtype=torch.float32)
        start = 0
        for group, end in enumerate(ends):
            if end > start:
                out[group] = A[:, start:end] @ B[start:end]
            start = end
    return out.to(torch.bfloat16)


# --- quantisers ----------------------------------------------------------------------------------


def _mxfp8_quantize_cuda(x: torch.Tensor, rowwise: bool, colwise: bool, scaling_mode: str) -> tuple[torch.Tensor, ...]:
    """``torch.ops.torchao.mxfp8_quantize`` (C++ checks of mxfp8_extension.cpp), colwise only."""
    CALLS.append("mxfp8_quantize_cuda")
    _require(x.is_contiguous(), "input must be contiguous")
    _require(x.dim() == 2, "input must be 2D")
    _require(x.dtype in (torch.float32, torch.bfloat16), "Input must be float32 or bfloat16")
    _require(rowwise or colwise, "At least one of rowwise or colwise must be true")
    rows, cols = x.shape
    _require(rows >= 32 and rows % 32 == 0, "rows must be a multiple of 32")
    _require(cols >= 32 and cols % 32 == 0, "cols must be a multiple of 32")
    _require(not rowwise, "stand-in: torchao's MoE path asks for colwise only")
    data_t, scales_t = _quantize_last_dim(x.t().contiguous(), scaling_mode)  # (cols, rows), (cols, rows//32)
    empty8, empty_scale = x.new_empty(0, dtype=_E4M3), x.new_empty(0, dtype=_E8M0)
    # colwise: data (rows, cols) column-major, scales (cols, rows//32) (column-major in the kernel; values are what count)
    return empty8, data_t.t(), empty_scale, scales_t


def mxfp8_quantize_cuda_floor(
    x: torch.Tensor, rowwise: bool = False, colwise: bool = True, scaling_mode: str = "floor"
) -> tuple[torch.Tensor, ...]:
    """0.14-0.16 ``mx_formats.kernels.mxfp8_quantize_cuda`` (default FLOOR)."""
    return _mxfp8_quantize_cuda(x, rowwise, colwise, scaling_mode)


def mxfp8_quantize_cuda_rceil(
    x: torch.Tensor, rowwise: bool = False, colwise: bool = True, scaling_mode: str = "rceil"
) -> tuple[torch.Tensor, ...]:
    """0.17+ ``mx_formats.kernels.mxfp8_quantize_cuda`` (default RCEIL)."""
    return _mxfp8_quantize_cuda(x, rowwise, colwise, scaling_mode)


def _triton_to_mxfp8_dim0(x: torch.Tensor, inner_block_size: int, scaling_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS.append("triton_to_mxfp8_dim0")
    _require(x.is_contiguous(), "`x` must be contiguous")
    _require(inner_block_size <= 32, "inner_block_size must be <= 32")
    _require(x.dtype == torch.bfloat16, f"only bfloat16 inputs are supported, got {x.dtype}")
    _require(scaling_mode in ("floor", "rceil"), "only floor and rceil scaling modes are supported")
    _require(x.shape[-1] % inner_block_size == 0, "columns must be divisible by inner block size")
    _require(inner_block_size == BLOCK, "stand-in: models inner_block_size=32 only")
    return _quantize_last_dim(x, scaling_mode)


def triton_to_mxfp8_dim0_floor_only(x: torch.Tensor, inner_block_size=32) -> tuple[torch.Tensor, torch.Tensor]:
    """0.15 ``triton_to_mxfp8_dim0``: no scaling-mode parameter, FLOOR exponent extraction."""
    return _triton_to_mxfp8_dim0(x, inner_block_size, "floor")


def triton_to_mxfp8_dim0(x: torch.Tensor, inner_block_size=32, scaling_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """0.16+ ``triton_to_mxfp8_dim0``."""
    return _triton_to_mxfp8_dim0(x, inner_block_size, scaling_mode)


def mxfp8_quantize_cuda_3d_014(x: torch.Tensor, block_size: int = 32, scaling_mode: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """0.14-0.16 ``mxfp8_quantize_cuda_3d`` (C++ ``mxfp8_quantize_3d``): data (E, N, K) column-major per
    expert, scales (E, N//32, K)."""
    CALLS.append("mxfp8_quantize_cuda_3d")
    _require(x.dim() == 3, "Input tensor must be 3D")
    _require(x.dtype in (torch.float32, torch.bfloat16), "Input tensor must be float32 or bfloat16")
    _require(x.is_contiguous(), "input must be contiguous")
    _require(block_size == 32, "scale_dim_n must be 32 for now")
    _, N, K = x.shape
    _require(N >= 32 and N % 32 == 0, "N must be a multiple of 32")
    _require(K >= 32 and K % 32 == 0, "K must be a multiple of 32")
    return _quantize_3d_along_n(x, scaling_mode)


def mxfp8_quantize_cuda_3d_017(
    x: torch.Tensor, block_size: int = 32, scaling_mode: str = "rceil", stage_count: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.17 ``mxfp8_quantize_cuda_3d`` (CuTeDSL): data (E, N, K) column-major per expert, scales
    "blocked" for the grouped GEMM's RHS, i.e. logical (E, K, N//32), here unswizzled."""
    CALLS.append("mxfp8_quantize_cuda_3d")
    _require(x.dim() == 3, "x must be 3D")
    _require(x.dtype in (torch.float32, torch.bfloat16), "Input tensor must be float32 or bfloat16")
    _require(block_size == 32, "Only block_size=32 is supported")
    _require(x.shape[1] % block_size == 0, "N must be divisible by block_size")
    _require(1 <= stage_count <= 2, "stage_count must be 1 or 2")
    data, scales = _quantize_3d_along_n(x, scaling_mode)
    return data, scales.transpose(-2, -1).contiguous()


def mxfp8_quantize_cuda_3d_018(
    x: torch.Tensor,
    block_size: int = 32,
    scale_block_dim1=32,
    scale_block_dim2=1,
    scaling_mode: str = "rceil",
    stage_count: int = 2,
    blocked_scale_output: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.18+ ``mxfp8_quantize_cuda_3d`` (CuTeDSL): as 0.17, plus the (32, 1) / (32, 32) block modes."""
    CALLS.append("mxfp8_quantize_cuda_3d")
    _require(block_size == 32, "Only block_size=32 is supported")
    _require(x.dim() == 3, "x must be 3D")
    _require(x.dtype in (torch.float32, torch.bfloat16), "Input tensor must be float32 or bfloat16")
    _require(x.shape[1] % block_size == 0, "N must be divisible by block_size")
    _require(x.shape[2] % block_size == 0, "K must be divisible by block_size")
    _require((scale_block_dim1, scale_block_dim2) in ((32, 1), (32, 32)), "Supported 3D MXFP8 scale blocks are (32, 1) and (32, 32)")
    transposed = x.stride(-2) == 1 and x.stride(-1) != 1
    _require(transposed or x.stride(-1) == 1, "3D CuTeDSL quantization expects either K-fastest input or a transposed expert view")
    _require(1 <= stage_count <= 2, "stage_count must be 1 or 2")
    _require(scale_block_dim2 == 1, "stand-in: models the (32, 1) mode torchao's grouped GEMM uses")
    data, scales = _quantize_3d_along_n(x, scaling_mode)
    return data, (scales.transpose(-2, -1).contiguous() if blocked_scale_output else scales)


def mxfp8_quantize_2d_1x32_cutedsl(
    x: torch.Tensor, block_size: int = 32, scaling_mode: str = "rceil", stage_count: int = 2, offs: torch.Tensor = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.18+ CuTeDSL 1x32 quantiser: data (M, K) row-major, scales "blocked" (here natural (M, K//32))."""
    CALLS.append("mxfp8_quantize_2d_1x32_cutedsl")
    _require(x.dtype in (torch.float32, torch.bfloat16), "Input tensor must be float32 or bfloat16")
    _require(block_size == 32, "Only block_size=32 is supported")
    _require(x.dim() == 2, "input tensor must be 2D")
    M, K = x.shape
    _require(K % 128 == 0, "K must be divisible by 128")
    _require(M % 128 == 0, "M must be divisible by 128")
    _require(1 <= stage_count <= 2, "stage_count must be 1 or 2")
    if offs is not None:
        _require(offs.dtype == torch.int32, "offs must be int32 tensor")
        _require(offs.dim() == 1, "offs must be 1D tensor")
        previous = 0
        for end in offs.tolist():  # the kernel's device-side validate_group_sizes
            _require((end - previous) % 128 == 0, f"Group sizes must be multiples of 128 (group ends {offs.tolist()})")
            previous = end
    return _quantize_last_dim(x.contiguous(), scaling_mode)


# --- scale rearranges (tcgen05 swizzle): identities on natural scales -----------------------------


def _check_scales(t: torch.Tensor, ndim: int) -> None:
    _require(t.ndim == ndim, f"scales tensor must be {ndim}d")
    _require(t.element_size() == 1, "Expected element size to be 1 byte (8 bits)")


def triton_mx_block_rearrange_2d_M_groups_014(
    scales_tensor: torch.Tensor, input_group_end_offsets: torch.Tensor, output_group_start_offsets: torch.Tensor
) -> torch.Tensor:
    """0.14 (takes the precomputed padded group starts)."""
    CALLS.append("triton_mx_block_rearrange_2d_M_groups")
    _check_scales(scales_tensor, 2)
    _require(output_group_start_offsets.shape[0] == input_group_end_offsets.shape[0] + 1, "one padded start per group, plus 0")
    return scales_tensor


def triton_mx_block_rearrange_2d_M_groups(scales_tensor: torch.Tensor, input_group_end_offsets: torch.Tensor) -> torch.Tensor:
    """0.15."""
    CALLS.append("triton_mx_block_rearrange_2d_M_groups")
    _check_scales(scales_tensor, 2)
    return scales_tensor


def triton_mx_block_rearrange_per_group_3d(scale_tensor: torch.Tensor) -> torch.Tensor:
    CALLS.append("triton_mx_block_rearrange_per_group_3d")
    _check_scales(scale_tensor, 3)
    return scale_tensor


def triton_mx_block_rearrange_2d_K_groups_014(
    scales_tensor: torch.Tensor, input_group_end_offsets: torch.Tensor, output_group_start_offsets: torch.Tensor
) -> torch.Tensor:
    """0.14 (takes the precomputed padded group starts)."""
    CALLS.append("triton_mx_block_rearrange_2d_K_groups")
    _check_scales(scales_tensor, 2)
    return scales_tensor


def triton_mx_block_rearrange_2d_K_groups(scales_tensor: torch.Tensor, input_group_end_offsets: torch.Tensor) -> torch.Tensor:
    """0.15-0.17."""
    CALLS.append("triton_mx_block_rearrange_2d_K_groups")
    _check_scales(scales_tensor, 2)
    return scales_tensor


def triton_mx_block_rearrange_2d_K_groups_018(scales_tensor: torch.Tensor, input_offsets: torch.Tensor) -> torch.Tensor:
    """0.18+ (parameter renamed)."""
    CALLS.append("triton_mx_block_rearrange_2d_K_groups")
    _check_scales(scales_tensor, 2)
    return scales_tensor


def _mx_block_rearrange_2d_M_groups_cuda(scales_tensor: torch.Tensor, offsets: torch.Tensor, chunks_per_tb: int) -> torch.Tensor:
    CALLS.append("mx_block_rearrange_2d_M_groups_cuda")
    _require(scales_tensor.dim() == 2, "scales_tensor must be 2D")
    _require(scales_tensor.is_contiguous(), "scales_tensor must be contiguous (row-major)")
    _require(scales_tensor.dtype in (torch.uint8, _E8M0), "scales_tensor must be uint8 or e8m0")
    _check_offs(offsets, "input_group_end_offsets")
    _require(chunks_per_tb in (1, 4, 8, 16), f"chunks_per_tb must be 1, 4, 8, or 16, got: {chunks_per_tb}")
    _require(offsets.shape[0] <= 32, "num_groups must be <= 32")
    return scales_tensor


def mx_block_rearrange_2d_M_groups_cuda(scales_tensor: torch.Tensor, input_group_end_offsets: torch.Tensor, chunks_per_tb: int = 4) -> torch.Tensor:
    """0.16-0.17."""
    return _mx_block_rearrange_2d_M_groups_cuda(scales_tensor, input_group_end_offsets, chunks_per_tb)


def mx_block_rearrange_2d_M_groups_cuda_018(scales_tensor: torch.Tensor, input_offsets: torch.Tensor, chunks_per_tb: int = 4) -> torch.Tensor:
    """0.18+ (parameter renamed)."""
    return _mx_block_rearrange_2d_M_groups_cuda(scales_tensor, input_offsets, chunks_per_tb)


# --- per release -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    module: str  # where the native path looks the name up
    name: str
    standin: Callable[..., Any]
    defined_in: str  # the wheel module whose source defines the real kernel (signature check)


@dataclass(frozen=True)
class Release:
    entry_module: str  # defines the autograd.Function (and _SM100_KERNELS_AVAILABLE from 0.16)
    patches: tuple[Patch, ...]


_SGM = f"{_MOE}.scaled_grouped_mm"
_MGM = f"{_MOE}.mxfp8_grouped_mm"

RELEASES: dict[str, Release] = {
    "0.14": Release(_SGM, (
        Patch(_SGM, "triton_mx_block_rearrange_2d_M_groups", triton_mx_block_rearrange_2d_M_groups_014, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_per_group_3d", triton_mx_block_rearrange_per_group_3d, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_2d_K_groups", triton_mx_block_rearrange_2d_K_groups_014, _QUANT),
        Patch(_SGM, "mxfp8_quantize_cuda_3d", mxfp8_quantize_cuda_3d_014, _QUANT),
        Patch(_MX_UTILS, "mxfp8_quantize_cuda", mxfp8_quantize_cuda_floor, _MX_KERNELS),
    )),
    "0.15": Release(_SGM, (
        Patch(_SGM, "triton_to_mxfp8_dim0", triton_to_mxfp8_dim0_floor_only, _MX_KERNELS),
        Patch(_SGM, "triton_mx_block_rearrange_2d_M_groups", triton_mx_block_rearrange_2d_M_groups, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_per_group_3d", triton_mx_block_rearrange_per_group_3d, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_2d_K_groups", triton_mx_block_rearrange_2d_K_groups, _QUANT),
        Patch(_SGM, "mxfp8_quantize_cuda_3d", mxfp8_quantize_cuda_3d_014, _QUANT),
        Patch(_MX_UTILS, "mxfp8_quantize_cuda", mxfp8_quantize_cuda_floor, _MX_KERNELS),
    )),
    "0.16": Release(_SGM, (
        Patch(_SGM, "triton_to_mxfp8_dim0", triton_to_mxfp8_dim0, _MX_KERNELS),
        Patch(_SGM, "mx_block_rearrange_2d_M_groups_cuda", mx_block_rearrange_2d_M_groups_cuda, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_per_group_3d", triton_mx_block_rearrange_per_group_3d, _QUANT),
        Patch(_SGM, "triton_mx_block_rearrange_2d_K_groups", triton_mx_block_rearrange_2d_K_groups, _QUANT),
        Patch(_SGM, "mxfp8_quantize_cuda_3d", mxfp8_quantize_cuda_3d_014, _QUANT),
        Patch(_MX_UTILS, "mxfp8_quantize_cuda", mxfp8_quantize_cuda_floor, _MX_KERNELS),
    )),
    "0.17": Release(_MGM, (
        Patch(_MGM, "triton_to_mxfp8_dim0", triton_to_mxfp8_dim0, _MX_KERNELS),
        Patch(_MGM, "mx_block_rearrange_2d_M_groups_cuda", mx_block_rearrange_2d_M_groups_cuda, _QUANT),
        Patch(_MGM, "triton_mx_block_rearrange_per_group_3d", triton_mx_block_rearrange_per_group_3d, _QUANT),
        Patch(_MGM, "triton_mx_block_rearrange_2d_K_groups", triton_mx_block_rearrange_2d_K_groups, _QUANT),
        Patch(_MGM, "mxfp8_quantize_cuda_3d", mxfp8_quantize_cuda_3d_017, _QUANT),
        Patch(_MX_UTILS, "mxfp8_quantize_cuda", mxfp8_quantize_cuda_rceil, _MX_KERNELS),
    )),
    "0.18": Release(_MGM, (
        Patch(_MGM, "mxfp8_quantize_2d_1x32_cutedsl", mxfp8_quantize_2d_1x32_cutedsl, _QUANT),
        Patch(_MGM, "triton_to_mxfp8_dim0", triton_to_mxfp8_dim0, _MX_KERNELS),
        Patch(_MGM, "mx_block_rearrange_2d_M_groups_cuda", mx_block_rearrange_2d_M_groups_cuda_018, _QUANT),
        Patch(_MGM, "triton_mx_block_rearrange_per_group_3d", triton_mx_block_rearrange_per_group_3d, _QUANT),
        Patch(_MGM, "triton_mx_block_rearrange_2d_K_groups", triton_mx_block_rearrange_2d_K_groups_018, _QUANT),
        Patch(_MGM, "mxfp8_quantize_cuda_3d", mxfp8_quantize_cuda_3d_018, _QUANT),
        # 0.18's dim1 wrapper imports the CUDA cast kernel from mx_formats.kernels at call time
        Patch(_MX_KERNELS, "mxfp8_quantize_cuda", mxfp8_quantize_cuda_rceil, _MX_KERNELS),
    )),
}


def install(monkeypatch: Any, key: str) -> Release:
    """Patch release ``key``'s sm_100-only kernels (and ``torch._scaled_grouped_mm``) with stand-ins,
    and declare its sm_100 kernels available where the release has that flag (0.16+)."""
    release = RELEASES[key]
    CALLS.clear()
    for patch in release.patches:
        module = importlib.import_module(patch.module)
        assert hasattr(module, patch.name), f"{patch.module} has no {patch.name}: the stand-in table is out of date"
        monkeypatch.setattr(module, patch.name, patch.standin)
    entry_module = importlib.import_module(release.entry_module)
    monkeypatch.setattr(entry_module.torch, "_scaled_grouped_mm", scaled_grouped_mm)
    if hasattr(entry_module, "_SM100_KERNELS_AVAILABLE"):
        monkeypatch.setattr(entry_module, "_SM100_KERNELS_AVAILABLE", True)
    return release


def _definitions(module_name: str, name: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(parameter names, defaults as source text) of every ``def name`` in the module's source."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin, module_name
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            found.append((tuple(a.arg for a in node.args.args), tuple(ast.unparse(d) for d in node.args.defaults)))
    return found


def _standin_signature(standin: Callable[..., Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    parameters = list(inspect.signature(standin).parameters.values())
    defaults = tuple(repr(p.default) for p in parameters if p.default is not inspect.Parameter.empty)
    return tuple(p.name for p in parameters), defaults


def signature_problems(key: str) -> list[str]:
    """Stand-ins of release ``key`` whose parameters or defaults match no definition in the wheel."""
    problems = []
    for patch in RELEASES[key].patches:
        definitions = _definitions(patch.defined_in, patch.name)
        mine = _standin_signature(patch.standin)
        if mine not in definitions:
            problems.append(f"{patch.name}: stand-in {mine}, wheel {definitions}")
    return problems
