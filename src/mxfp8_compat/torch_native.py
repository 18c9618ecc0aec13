"""MXFP8 on Blackwell with torch alone: torch's own MXFP8 grouped GEMM, fed by mxfp8_compat's quantisers.

torch ships the sm_100 kernel (``F.scaled_grouped_mm`` / ``torch._scaled_grouped_mm``, MSLK's
``mx8mx8bf16_grouped``); what a caller must supply is the operands in the layout it reads
(``shared/torch-scaled-grouped-mm.md``): float8_e4m3fn data, e8m0 scales (RCEIL) per 32 elements
along the contraction dimension, each group's scales in the 128x4 blocked layout. The quantisers
here (:mod:`._mx_quant_kernels`, Triton) write exactly that:

* :func:`quantize_rows`: A along K (forward), grad_out along N (input gradient), read through the
  token-group map of :func:`~mxfp8_compat.token_groups.token_group_padding` and written padded
  (groups to multiples of 32, padding rows zero): no separate gather pass before the GEMM;
* :func:`quantize_weight`: the weight along K and along N, reading it once;
* :func:`quantize_grouped_columns`: grad_out and A along M within each group, transposed, for the
  2D x 2D weight-gradient GEMM.

None reads ``offs`` on the host. On CPU tensors the same kernels run in triton's interpreter (slow;
for tests), which is how their bits are checked against the reference without a GPU.

Only RCEIL scales: torchao's default since 0.15 and the rule of Blackwell's own conversion.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from .quantize import BLOCK_SIZE, ScaleMode
from .token_groups import TokenGroupPadding

__all__ = [
    "ALIGNMENT",
    "MXOperand",
    "quantize_rows",
    "quantize_weight",
    "quantize_grouped_columns",
    "row_scale_rows_bound",
    "column_scale_cols_bound",
]

#: Every token group is padded to a multiple of this many rows (the MXFP8 kernel's requirement; blocks
#: of the weight gradient restart at each group, 32 rows each).
ALIGNMENT = 32

# Launch parameters (memory-bound kernels).
ROWS_BC = 128  # columns per program of the row and column quantisers (times 32 rows)
WEIGHT_BK = 128  # K columns per program of the weight quantiser (times 32 rows of N)
WARPS = 4

# Use the GPU's fp8 conversion instruction where the device has one (sm_89+); False forces the
# arithmetic path, which the CPU interpreter always takes.
USE_HW_CVT = True

_E4M3 = torch.float8_e4m3fn
_E8M0 = torch.float8_e8m0fnu


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> ModuleType:
    """The kernels module: compiled, or a second copy built for triton's interpreter (CPU tensors)."""
    if not interpret:
        from . import _mx_quant_kernels

        return _mx_quant_kernels
    import triton  # noqa: F401 - fail here if absent

    name = f"{__package__}._mx_quant_kernels_interpreted"
    path = os.path.join(os.path.dirname(__file__), "_mx_quant_kernels.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the module is executed
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    sys.modules[name] = module
    return module


@functools.lru_cache(maxsize=None)
def _launch(device: torch.device) -> tuple[ModuleType, bool, dict]:
    """(kernels, hardware conversion, launch options) for ``device``."""
    interpret = device.type != "cuda"
    hw = not interpret and torch.cuda.get_device_capability(device) >= (8, 9)
    return _kernels(interpret), hw, ({} if interpret else {"enable_fp_fusion": False})


def _src(x: torch.Tensor, hw: bool) -> torch.Tensor:
    """bf16 is read through an int16 view on the arithmetic path."""
    return x.view(torch.int16) if (x.dtype == torch.bfloat16 and not hw) else x


def _dst(q: torch.Tensor, hw: bool) -> torch.Tensor:
    """e4m3 is written as fp8 values by the conversion instruction, else as uint8 bits."""
    return q if (hw and USE_HW_CVT) else q.view(torch.uint8)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _check_input(x: torch.Tensor, name: str, dims: int, blocked_dim: int, scale_mode: ScaleMode | str) -> None:
    if ScaleMode(scale_mode) is not ScaleMode.RCEIL:
        raise ValueError(f"scale_mode: torch's MXFP8 quantisers here write RCEIL scales only, got {scale_mode!r}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: expected bfloat16 or float32, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}D tensor, got shape {tuple(x.shape)}")
    if x.shape[blocked_dim] % BLOCK_SIZE:
        raise ValueError(f"{name}: dimension {blocked_dim} of size {x.shape[blocked_dim]} is not a multiple of {BLOCK_SIZE}")


@dataclass(frozen=True)
class MXOperand:
    """One operand of torch's MXFP8 grouped GEMM: e4m3 ``data`` and e8m0 ``scales`` (blocked layout)."""

    data: torch.Tensor
    scales: torch.Tensor


def row_scale_rows_bound(padded_rows: int, groups: int) -> int:
    """Rows of a row-groups scale tensor: every group's block is its padded size rounded up to 128
    (a padded size is a multiple of 32, so at most 96 more), known on the host."""
    return _round_up(padded_rows + 96 * groups, 128)


def column_scale_cols_bound(padded_rows: int, groups: int) -> int:
    """Scale columns of a contraction-groups scale tensor: each group's size / 32, rounded up to 4."""
    return padded_rows // BLOCK_SIZE + 4 * groups


def _check_padding(padding: TokenGroupPadding, x: torch.Tensor) -> None:
    if padding.alignment % ALIGNMENT or padding.rows != x.shape[0]:
        raise ValueError(
            f"padding: expected a TokenGroupPadding of {x.shape[0]} rows aligned to a multiple of {ALIGNMENT}, "
            f"got {padding.rows} rows aligned to {padding.alignment}"
        )


def quantize_rows(x: torch.Tensor, padding: TokenGroupPadding, scale_mode: ScaleMode | str = ScaleMode.RCEIL) -> MXOperand:
    """``x`` (M, C) padded by ``padding`` and quantised in blocks of 32 along C, in one kernel.

    Returns data (P, C) e4m3 (P = ``padding.padded_rows``; padding rows and the tail after the last
    group are zero) and scales (:func:`row_scale_rows_bound`, round_up(C/32, 4)) e8m0 holding each
    group's blocked (P_g, C/32) scales at row sum_{i<g} round_up(P_i, 128), zeros elsewhere: the
    2D operand of torch's 2D x 3D MXFP8 grouped GEMM with ``offs = padding.padded_offs``.
    """
    _check_input(x, "x", 2, 1, scale_mode)
    _check_padding(padding, x)
    x = x.contiguous()
    rows, cols = x.shape
    P, E = padding.padded_rows, padding.padded_offs.shape[0]
    scale_cols = _round_up(cols // BLOCK_SIZE, 4)
    data = torch.empty((P, cols), dtype=_E4M3, device=x.device)
    scales = torch.zeros((row_scale_rows_bound(P, E), scale_cols), dtype=_E8M0, device=x.device)
    if P and cols and E:
        kernels, hw, options = _launch(x.device)
        kernels.quantize_rows_kernel[(P // ALIGNMENT, -(-cols // ROWS_BC))](
            _src(x, hw), padding.source_rows, _dst(data, hw), scales.view(torch.uint8), padding.padded_offs,
            rows, cols, E, scale_cols,
            IN_BF16=x.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BC=ROWS_BC, E_PAD=_pow2(E),
            num_warps=WARPS, **options,
        )
    elif P and cols:
        data.view(torch.uint8).zero_()
    return MXOperand(data, scales)


def quantize_weight(
    w: torch.Tensor, along_k: bool = True, along_n: bool = True, scale_mode: ScaleMode | str = ScaleMode.RCEIL
) -> tuple[Optional[MXOperand], Optional[MXOperand]]:
    """The weight ``w`` (E, K, N), any strides, read once and quantised along K and/or along N.

    Returns ``(along_k, along_n)``, each None unless asked for:

    * along K: data (E, N, K) contiguous (``data.transpose(-2, -1)`` is the column-major (E, K, N)
      operand of the forward), scales (E, round_up(N, 128) * round_up(K/32, 4)), each expert's
      (N, K/32) scales blocked;
    * along N: data (E, K, N) contiguous (``data.transpose(-2, -1)`` is the column-major (E, N, K)
      operand of the input gradient), scales (E, round_up(K, 128) * round_up(N/32, 4)).
    """
    _check_input(w, "w", 3, 1, scale_mode)
    if w.shape[2] % BLOCK_SIZE:
        raise ValueError(f"w: dimension 2 of size {w.shape[2]} is not a multiple of {BLOCK_SIZE}")
    E, K, N = w.shape
    k_out = n_out = None
    if along_k:
        k_out = MXOperand(
            torch.empty((E, N, K), dtype=_E4M3, device=w.device),
            torch.zeros((E, _round_up(N, 128) * _round_up(K // BLOCK_SIZE, 4)), dtype=_E8M0, device=w.device),
        )
    if along_n:
        n_out = MXOperand(
            torch.empty((E, K, N), dtype=_E4M3, device=w.device),
            torch.zeros((E, _round_up(K, 128) * _round_up(N // BLOCK_SIZE, 4)), dtype=_E8M0, device=w.device),
        )
    if (k_out is None and n_out is None) or not w.numel():
        return k_out, n_out
    kernels, hw, options = _launch(w.device)
    w_t = _src(w.transpose(-2, -1), hw)  # (E, N, K) view
    some = k_out if k_out is not None else n_out
    assert some is not None
    k_programs = -(-K // WEIGHT_BK)
    kernels.quantize_weight_kernel[(E * (N // BLOCK_SIZE) * k_programs,)](
        w_t,
        _dst((k_out or some).data, hw), (k_out or some).scales.view(torch.uint8),
        _dst((n_out or some).data, hw), (n_out or some).scales.view(torch.uint8),
        N, K, *w_t.stride(), k_programs,
        DO_K=k_out is not None, DO_N=n_out is not None,
        IN_BF16=w.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BK=WEIGHT_BK,
        num_warps=WARPS, **options,
    )
    return k_out, n_out


def quantize_grouped_columns(
    x: torch.Tensor, padding: TokenGroupPadding, scale_mode: ScaleMode | str = ScaleMode.RCEIL
) -> MXOperand:
    """``x`` (M, C) padded by ``padding``, quantised along M in blocks of 32 rows within each group, transposed.

    Returns data (C, P) e4m3 row-major (padding columns zero) and scales
    (round_up(C, 128), :func:`column_scale_cols_bound`) e8m0 whose flat storage holds, for group g
    at element round_up(C, 128) * sum_{i<g} round_up(P_i/32, 4), the blocked (C, P_g/32) scales:
    one operand of torch's 2D x 2D MXFP8 grouped GEMM (the weight gradient) with
    ``offs = padding.padded_offs``.
    """
    _check_input(x, "x", 2, 1, scale_mode)
    _check_padding(padding, x)
    x = x.contiguous()
    rows, cols = x.shape
    P, E = padding.padded_rows, padding.padded_offs.shape[0]
    data = torch.empty((cols, P), dtype=_E4M3, device=x.device)
    scales = torch.zeros((_round_up(cols, 128), column_scale_cols_bound(P, E)), dtype=_E8M0, device=x.device)
    if P and cols and E:
        kernels, hw, options = _launch(x.device)
        kernels.quantize_grouped_columns_kernel[(P // ALIGNMENT, -(-cols // ROWS_BC))](
            _src(x, hw), padding.source_rows, _dst(data, hw), scales.view(torch.uint8), padding.padded_offs,
            rows, cols, P, E,
            IN_BF16=x.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BC=ROWS_BC, E_PAD=_pow2(E),
            num_warps=WARPS, **options,
        )
    elif P and cols:
        data.view(torch.uint8).zero_()
    return MXOperand(data, scales)
