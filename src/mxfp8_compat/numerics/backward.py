"""The backward GEMMs of the MXFP8 emulations, shared by the reference and the fast emulation.

Both are bitwise equal through these: the input gradient (:func:`dgrad_gemm`), the weight
gradient (:func:`wgrad_gemm`) and the zeroing of what takes no part (:func:`zero_unused_grads`).
On CUDA with bf16 operands they are single ``torch._grouped_mm`` calls with bf16 output, so no
GEMM here reads ``offs`` on the host there.
"""

from __future__ import annotations

import torch

from ..token_groups import zero_rows_after
from .highprec import grouped_mm_highprec, grouped_mm_support, weight_grad_loop

__all__ = ["dgrad_gemm", "wgrad_gemm", "zero_unused_grads"]


def _sync_free_bf16_gemm(*tensors: torch.Tensor) -> bool:
    """Whether the backward GEMMs of these operands run as one bf16 ``torch._grouped_mm``.

    On CUDA, a float32 result from ``torch._grouped_mm`` takes torch's per-group fallback
    (which reads ``offs`` on the host: a device sync), so where the gradient is bf16 anyway
    the GEMM emits bf16 itself: float32 accumulation rounded once, as torchao's emulation does.
    """
    first = tensors[0]
    return (
        first.is_cuda
        and all(t.dtype == torch.bfloat16 for t in tensors)
        and grouped_mm_support(first.device.type, torch.bfloat16)[0]
    )


def dgrad_gemm(grad_q: torch.Tensor, B_q_t: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dA[g] = grad_q[g] @ B_q_t[e] with B_q_t (E, N, K) contiguous, float32 accumulation, in ``dtype``.

    Rows after ``offs[-1]`` are unspecified (see :func:`zero_unused_grads`). Shared by the
    reference and :mod:`mxfp8_compat.backends.fast_emulation`, which are bitwise equal through it.
    """
    if dtype == torch.bfloat16 and _sync_free_bf16_gemm(grad_q, B_q_t):
        return torch._grouped_mm(grad_q, B_q_t, offs=offs)
    return grouped_mm_highprec(grad_q, B_q_t, offs, torch.float32).to(dtype)


def wgrad_gemm(A: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """dB[e] = A[g]^T @ grad_out[g] per group, float32 accumulation, in ``dtype``.

    On CUDA with bf16 operands and result, one 2D x 2D ``torch._grouped_mm`` (no device
    sync); elsewhere a per-group float32 loop. Empty groups' gradients are unspecified (see
    :func:`zero_unused_grads`). Shared with :mod:`mxfp8_compat.backends.fast_emulation`.
    """
    if dtype == torch.bfloat16 and _sync_free_bf16_gemm(A, grad_out):
        return torch._grouped_mm(A.t(), grad_out, offs=offs)
    return weight_grad_loop(A, grad_out, offs, experts).to(dtype)


def zero_unused_grads(grad_A: torch.Tensor, grad_B: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the input gradient of rows after ``offs[-1]`` and the weight gradient of empty groups.

    Reads ``offs`` on the device (no sync). Those rows take no part in the GEMM; the weight
    gradient of a group without tokens is zero.
    """
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    grad_B = torch.where((sizes > 0).view(-1, 1, 1), grad_B, torch.zeros((), dtype=grad_B.dtype, device=grad_B.device))
    return zero_rows_after(grad_A, offs), grad_B
