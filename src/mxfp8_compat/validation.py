"""Input checks for the uniform ``grouped_mm(A, B, offs, *, out_dtype)`` contract.

Metadata checks (ndim, dtype, lengths, K match, device) read no tensor data and cost no
device sync: every callable runs them before any kernel. Value checks (``offs``
non-decreasing, ``offs[-1] == M``, group alignment) read ``offs`` and so cost a sync on a
GPU: they run with ``validate=True``, and on the CPU where reading ``offs`` is free.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import BLOCK_SIZE

__all__ = ["SUPPORTED_DTYPES", "check_metadata", "check_offs_values", "mxfp8_shape_problem", "group_alignment_problem"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


_BF16, _FP32, _INT32 = torch.bfloat16, torch.float32, torch.int32


def check_metadata(A: object, B: object, offs: object, out_dtype: object) -> None:
    """Raise TypeError / ValueError naming the argument when the call breaks the contract.

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
            and (out_dtype is _BF16 or out_dtype is _FP32)
            and A.get_device() == B.get_device() == offs.get_device()  # type: ignore[attr-defined]
            and A.is_cpu == B.is_cpu == offs.is_cpu  # type: ignore[attr-defined]
        ):
            return
    except (AttributeError, TypeError):
        pass
    _explain_metadata(A, B, offs, out_dtype)


def _explain_metadata(A: object, B: object, offs: object, out_dtype: object) -> None:
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
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype: expected torch.bfloat16 or torch.float32, got {out_dtype!r}")
    if offs.shape[0] != B.shape[0]:
        raise ValueError(f"offs: expected length E={B.shape[0]} (B.shape[0]), got {offs.shape[0]}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"B: expected K={A.shape[1]} (A.shape[1]) in B.shape[1], got B of shape {tuple(B.shape)}")
    if not (A.device == B.device == offs.device):
        raise ValueError(f"A, B, offs: expected one device, got A on {A.device}, B on {B.device}, offs on {offs.device}")
    raise AssertionError("check_metadata rejected a call that _explain_metadata accepts")  # pragma: no cover


def check_offs_values(A: torch.Tensor, offs: torch.Tensor) -> list[int]:
    """Raise ValueError unless ``offs`` is non-negative, non-decreasing and ends at M (reads offs).

    Returns the group ends, so that callers with more checks read ``offs`` once.
    """
    ends = offs.tolist()
    previous = 0
    for end in ends:
        if end < previous:
            problem = "non-negative" if end < 0 else "non-decreasing cumulative"
            raise ValueError(f"offs: expected {problem} group ends, got {ends}")
        previous = end
    if ends and ends[-1] != A.shape[0]:
        raise ValueError(f"offs: expected offs[-1] == M == {A.shape[0]} (A.shape[0]), got {ends[-1]}")
    return ends


def mxfp8_shape_problem(A: torch.Tensor, B: torch.Tensor) -> Optional[str]:
    """Why this (already valid) call cannot run in MXFP8, from metadata alone; None when it can."""
    K, N = B.shape[1], B.shape[2]
    if K % BLOCK_SIZE:
        return f"K={K} is not a multiple of {BLOCK_SIZE} (MXFP8 scales blocks of {BLOCK_SIZE} along K)"
    if N % BLOCK_SIZE:
        return f"N={N} is not a multiple of {BLOCK_SIZE} (the input-gradient GEMM scales blocks of {BLOCK_SIZE} along N)"
    return None


def group_alignment_problem(ends: list[int], multiple: int) -> Optional[str]:
    """Why the group ends break a kernel's alignment rule; None when they don't."""
    for end in ends:
        if end % multiple:
            misaligned = [end for end in ends if end % multiple]
            return f"group ends {misaligned} are not multiples of {multiple}, as this MXFP8 kernel requires (pad token groups)"
    return None
