"""High-precision grouped GEMMs: the bf16 fallbacks, and the float64 ground truth.

``torch._grouped_mm`` is the grouped GEMM where this torch has a kernel for the device and
dtype; :func:`grouped_mm_support` finds out by trying (torch 2.8 has no CPU kernel, the CPU
kernel of 2.13 emits only the input dtype). Where it cannot serve, a per-group loop of
``torch.mm`` with float32 accumulation stands in, as one differentiable, compile-safe op
(:func:`grouped_mm_fallback`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = [
    "grouped_mm_loop",
    "grouped_mm_support",
    "grouped_mm_highprec",
    "grouped_mm_float64",
    "grouped_mm_fallback",
    "weight_grad_loop",
]

def grouped_mm_loop(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Grouped GEMM as a Python loop of ``torch.mm`` with float32 accumulation.

    Same contract as ``torch._grouped_mm(A, B, offs=offs, out_dtype=out_dtype)`` for 2D A
    and 3D B; used where this torch has no ``_grouped_mm`` kernel for the device. Rows after
    ``offs[-1]`` are zero. Differentiable.
    """
    out_dtype = out_dtype or A.dtype
    accumulate = torch.float64 if A.dtype == torch.float64 else torch.float32
    out = A.new_zeros((A.shape[0], B.shape[-1]), dtype=out_dtype)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = torch.mm(A[start:end].to(accumulate), B[expert].to(accumulate)).to(out_dtype)
        start = end
    return out


@functools.lru_cache(maxsize=None)
def grouped_mm_support(device_type: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """What ``torch._grouped_mm`` can do here: ``(runs, float32_out)`` for this device and dtype.

    ``runs``: it exists and runs for 2D x 3D inputs of ``dtype`` on ``device_type``.
    ``float32_out``: it also accepts ``out_dtype=torch.float32`` for such inputs (the CPU
    kernel of torch 2.13 does not). Probed once per (device type, dtype) with a tiny call.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False, False
    try:
        A = torch.ones(32, 32, dtype=dtype, device=device_type)
        B = torch.ones(2, 32, 32, dtype=dtype, device=device_type)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device_type)
        torch._grouped_mm(A, B, offs=offs)
    except Exception:  # noqa: BLE001 - any failure means "does not run here"
        return False, False
    try:
        torch._grouped_mm(A, B, offs=offs, out_dtype=torch.float32)
        return True, True
    except Exception:  # noqa: BLE001
        return True, False


def grouped_mm_highprec(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """High-precision grouped GEMM with ``torch._grouped_mm``'s contract and any ``out_dtype``.

    Uses ``torch._grouped_mm`` where it runs for this device and dtype (upcasting bf16 inputs
    exactly to float32 where the kernel cannot emit float32 itself), else :func:`grouped_mm_loop`.
    With ``out_dtype`` None or equal to ``A.dtype`` this is ``torch._grouped_mm(A, B, offs=offs)``.
    """
    out_dtype = out_dtype or A.dtype
    runs, float32_out = grouped_mm_support(A.device.type, A.dtype)
    if not runs:
        return grouped_mm_loop(A, B, offs, out_dtype)
    if out_dtype == A.dtype:
        return torch._grouped_mm(A, B, offs=offs)
    if out_dtype == torch.float32:
        if float32_out:
            return torch._grouped_mm(A, B, offs=offs, out_dtype=torch.float32)
        if grouped_mm_support(A.device.type, torch.float32)[0]:
            return torch._grouped_mm(A.float(), B.float(), offs=offs)
        return grouped_mm_loop(A, B, offs, out_dtype)
    return torch._grouped_mm(A, B, offs=offs).to(out_dtype)


def grouped_mm_float64(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The float64 ground truth that SQNR figures are measured against."""
    return grouped_mm_loop(A.double(), B.double(), offs, torch.float64)


def weight_grad_loop(A: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, experts: int) -> torch.Tensor:
    """dB[e] = A[g]^T @ dY[g] per group, float32 accumulation (zero for empty groups)."""
    grad_B = torch.zeros((experts, A.shape[1], grad_out.shape[1]), dtype=torch.float32, device=A.device)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            grad_B[expert] = torch.mm(A[start:end].t().float(), grad_out[start:end].float())
        start = end
    return grad_B


# Under torch.compile the fallback is a torch custom op: opaque (its group loop reads offs,
# which would otherwise break the graph), with autograd registered beside it; eager calls take
# an autograd.Function around the same implementation.


@torch.library.custom_op("mxfp8_compat::grouped_mm_fallback", mutates_args=())
def _fallback_forward(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return grouped_mm_highprec(A, B, offs, out_dtype)


@_fallback_forward.register_fake
def _(A, B, offs, out_dtype):  # type: ignore[no-untyped-def]
    return A.new_empty((A.shape[0], B.shape[2]), dtype=out_dtype)


@torch.library.custom_op("mxfp8_compat::grouped_mm_fallback_backward", mutates_args=())
def _fallback_backward(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fallback_backward_impl(grad_out, A, B, offs)


def _fallback_backward_impl(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_A = grouped_mm_loop(grad_out, B.transpose(-2, -1), offs, torch.float32).to(A.dtype)
    return grad_A, weight_grad_loop(A, grad_out, offs, B.shape[0]).to(B.dtype)


@_fallback_backward.register_fake
def _(grad_out, A, B, offs):  # type: ignore[no-untyped-def]
    return torch.empty_like(A), B.new_empty(B.shape)


def _fallback_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B, offs, _ = inputs
    ctx.save_for_backward(A, B, offs)


def _fallback_autograd(ctx, grad_out):  # type: ignore[no-untyped-def]
    A, B, offs = ctx.saved_tensors
    grad_A, grad_B = _fallback_backward(grad_out.contiguous(), A, B, offs)
    return grad_A, grad_B, None, None


_fallback_forward.register_autograd(_fallback_autograd, setup_context=_fallback_setup)


class _Fallback(torch.autograd.Function):
    """The same forward and backward for eager calls: a custom op's first call imports torch._dynamo."""

    @staticmethod
    def forward(A, B, offs, out_dtype):  # type: ignore[no-untyped-def, override]
        return grouped_mm_highprec(A, B, offs, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        _fallback_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        A, B, offs = ctx.saved_tensors
        grad_A, grad_B = _fallback_backward_impl(grad_out.contiguous(), A, B, offs)
        return grad_A, grad_B, None, None


def grouped_mm_fallback(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`grouped_mm_highprec` as one differentiable, compile-safe op.

    For what ``torch._grouped_mm`` cannot do here itself: the per-group loop where torch has
    no kernel for the device (torch 2.8 on the CPU), and float32 output from bf16 inputs where
    its kernel emits only the input dtype. Backward runs per-group loops in float32.
    """
    if torch.compiler.is_compiling():
        return _fallback_forward(A, B, offs, out_dtype)
    return _Fallback.apply(A, B, offs, out_dtype)
