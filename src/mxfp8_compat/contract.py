"""The contract every grouped GEMM here keeps (:class:`GroupedMM`), and every precondition of it.

The uniform ``grouped_mm(A, B, offs, *, out_dtype=None, bias=None, groups_aligned=False)``.

Metadata checks (ndim, dtype, lengths, K match, devices of all three tensors) read no
tensor data and cost no device sync: every callable runs them before any kernel. Value
checks (``offs`` non-negative, non-decreasing, ``offs[-1] <= M``; alignment where the
caller promised it) read ``offs`` and so cost a sync on a GPU: they run with
``validate=True``, and on the CPU where reading ``offs`` is free; never while
``torch.compile`` traces (a data-dependent read there is a graph break).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .numerics.quantize import BLOCK_SIZE

__all__ = [
    "GroupedMM",
    "SUPPORTED_DTYPES",
    "check_metadata",
    "check_offs_values",
    "mxfp8_shape_problem",
    "group_alignment_problem",
    "aligned_rows_problem",
    "is_empty_problem",
    "grouped_mm_stride_problem",
]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class GroupedMM(Protocol):
    """``torch._grouped_mm``'s contract; ``groups_aligned`` is this library's addition."""

    def __call__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        offs: torch.Tensor,
        *,
        out_dtype: Optional[torch.dtype] = None,
        bias: Optional[torch.Tensor] = None,
        groups_aligned: bool = False,
    ) -> torch.Tensor: ...


_BF16, _FP32, _INT32 = torch.bfloat16, torch.float32, torch.int32


def check_metadata(A: object, B: object, offs: object, out_dtype: object, bias: object = None) -> None:
    """Raise TypeError / ValueError naming the argument when the call breaks the contract.

    ``out_dtype`` None means A's dtype, as in ``torch._grouped_mm``; ``bias`` must be None
    (``torch._grouped_mm`` rejects a bias for 2D x 3D inputs too: add it to the output).

    The passing case is one boolean expression over the cheapest tensor attributes (one
    ``shape`` per tensor rather than ``dim()``/``size(i)``, which each go through torch's
    argument parser; ``get_device()`` rather than ``device``, which allocates), because it
    runs on every call.
    """
    try:
        a_shape, b_shape, o_shape = A.shape, B.shape, offs.shape  # type: ignore[attr-defined]
        a_dtype = A.dtype  # type: ignore[attr-defined]
        if (
            len(a_shape) == 2
            and len(b_shape) == 3
            and len(o_shape) == 1
            and o_shape[0] == b_shape[0]
            and a_shape[1] == b_shape[1]
            and offs.dtype is _INT32  # type: ignore[attr-defined]
            and B.dtype is a_dtype  # type: ignore[attr-defined]
            and (a_dtype is _BF16 or a_dtype is _FP32)
            and (out_dtype is _BF16 or out_dtype is _FP32 or out_dtype is None)
            and bias is None
            and A.get_device() == B.get_device() == offs.get_device()  # type: ignore[attr-defined]
            and A.is_cpu == B.is_cpu == offs.is_cpu  # type: ignore[attr-defined]
        ):
            return
    except (AttributeError, TypeError):
        pass
    _explain_metadata(A, B, offs, out_dtype, bias)


def _explain_metadata(A: object, B: object, offs: object, out_dtype: object, bias: object) -> None:
    for name, value in (("A", A), ("B", B), ("offs", offs)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and isinstance(offs, torch.Tensor)
    if A.dim() != 2:
        raise ValueError(f"A: expected a 2D (M, K) tensor, got {A.dim()}D with shape {tuple(A.shape)}")
    if B.dim() != 3:
        raise ValueError(f"B: expected a 3D (E, K, N) tensor, got {B.dim()}D with shape {tuple(B.shape)}")
    if offs.dim() != 1:
        raise ValueError(f"offs: expected a 1D (E,) tensor of cumulative group ends, got shape {tuple(offs.shape)}")
    if offs.dtype is not torch.int32:
        raise TypeError(f"offs: expected dtype torch.int32, got {offs.dtype}")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A: expected dtype torch.bfloat16 or torch.float32, got {A.dtype}")
    if B.dtype is not A.dtype:
        raise TypeError(f"B: expected the dtype of A ({A.dtype}), got {B.dtype}")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype: expected None, torch.bfloat16 or torch.float32, got {out_dtype!r}")
    if bias is not None:
        raise ValueError(
            "bias: expected None (torch._grouped_mm takes no bias for 2D x 3D inputs); add the bias to the output"
        )
    if offs.shape[0] != B.shape[0]:
        raise ValueError(f"offs: expected length E={B.shape[0]} (B.shape[0]), got {offs.shape[0]}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"B: expected K={A.shape[1]} (A.shape[1]) in B.shape[1], got B of shape {tuple(B.shape)}")
    if not (A.device == B.device == offs.device):
        raise ValueError(f"A, B, offs: expected one device, got A on {A.device}, B on {B.device}, offs on {offs.device}")
    raise AssertionError("check_metadata rejected a call that _explain_metadata accepts")  # pragma: no cover


def check_offs_values(A: torch.Tensor, offs: torch.Tensor) -> list[int]:
    """Raise ValueError unless ``offs`` is non-negative, non-decreasing and ``offs[-1] <= M`` (reads offs).

    ``offs[-1] < M`` is a dispatcher's static-length buffer: rows after the last group are
    padding. Returns the group ends, so that callers with more checks read ``offs`` once.
    """
    ends = offs.tolist()
    previous = 0
    for end in ends:
        if end < previous:
            problem = "non-negative" if end < 0 else "non-decreasing cumulative"
            raise ValueError(f"offs: expected {problem} group ends, got {ends}")
        previous = end
    if ends and ends[-1] > A.shape[0]:
        raise ValueError(f"offs: expected offs[-1] <= M == {A.shape[0]} (A.shape[0]), got {ends[-1]}")
    return ends


def mxfp8_shape_problem(A: torch.Tensor, B: torch.Tensor, multiple: int = BLOCK_SIZE) -> Optional[str]:
    """Why this (already valid) call cannot run in MXFP8, from metadata alone; None when it can.

    K and N must be multiples of the block size (scales cover blocks of 32 along K in forward
    and along N in the input-gradient GEMM); some kernels need a larger ``multiple`` (a row's
    ``shape_multiple``: a native quantiser may assert ``K % 128 == 0`` and, for the gradient, ``N % 128 == 0``).
    """
    K, N = B.shape[1], B.shape[2]
    if K % multiple:
        return f"K={K} is not a multiple of {multiple} (MXFP8 scales blocks of {BLOCK_SIZE} along K; this kernel needs {multiple})"
    if N % multiple:
        return (
            f"N={N} is not a multiple of {multiple} (the input-gradient GEMM scales blocks of {BLOCK_SIZE} "
            f"along N; this kernel needs {multiple})"
        )
    return None


def group_alignment_problem(ends: list[int], multiple: int) -> Optional[str]:
    """Why the group ends break an alignment the caller promised; None when they don't."""
    misaligned = [end for end in ends if end % multiple]
    if misaligned:
        return f"group ends {misaligned} are not multiples of {multiple}"
    return None


def aligned_rows_problem(A: torch.Tensor, multiple: int) -> Optional[str]:
    """Why A's row count breaks a promised alignment (metadata only); None when it doesn't."""
    if A.shape[0] % multiple:
        return f"M={A.shape[0]} (A.shape[0]) is not a multiple of {multiple}"
    return None


def is_empty_problem(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the (valid) call has nothing to multiply: M, K, N or E is zero (metadata only).

    Every mode answers such a call without launching a GEMM (torch's CUDA kernel divides by
    zero at E == 0 and kills the process; its stride check rejects K == 0): the result is
    (M, N) zeros, as the sum over no terms, and every gradient is zero.
    """
    a_shape, b_shape = A.shape, B.shape
    return not (a_shape[0] and a_shape[1] and b_shape[0] and b_shape[2])


def grouped_mm_stride_problem(name: str, t: torch.Tensor) -> Optional[str]:
    """Why ``torch._grouped_mm`` refuses the layout of operand ``name``, or None (metadata only).

    Mirrors torch's own check (``check_valid_strides_and_return_transposed``): one of the last
    two dimensions has unit stride, the other a stride of at least that dimension's size and a
    multiple of 16 bytes, and (off the CPU) the data starts on a 16-byte boundary.
    """
    rows, cols = t.shape[-2], t.shape[-1]
    row_stride, col_stride = t.stride()[-2], t.stride()[-1]
    alignment = 16 // t.element_size()
    if not t.is_cpu and t.data_ptr() % 16:
        return f"{name}'s data does not start on a 16-byte boundary"
    if row_stride == 1 and col_stride >= max(1, rows):
        outer = col_stride
    elif col_stride == 1 and row_stride >= max(1, cols):
        outer = row_stride
    else:
        return f"{name} of shape {tuple(t.shape)} has strides {t.stride()}: neither of its last two dimensions is dense"
    if outer % alignment:
        return f"{name} of shape {tuple(t.shape)} has strides {t.stride()}: the outer stride is not a multiple of 16 bytes"
    return None
