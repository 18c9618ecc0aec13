"""The reference MXFP8 grouped GEMM: the project's yardstick, in plain PyTorch.

It needs no torchao, no triton and no GPU, so the ``mxfp8-emulated`` backend works
everywhere, and tests compare every torchao release and the fast emulation against it. The
quantiser lives in :mod:`mxfp8_compat.quantize`, the high-precision GEMMs in
:mod:`mxfp8_compat.highprec`, the SQNR metric in :mod:`mxfp8_compat.metrics`; their names
are re-exported here for code written against earlier releases.

Blocks, scale rules and special values: :mod:`mxfp8_compat.quantize`.

Precision of the GEMMs: quantised operands are dequantised into bfloat16 (exactly: an
e4m3 value times a power of two always fits bf16) and multiplied by
``torch._grouped_mm`` with float32 accumulation, as torchao's emulated kernels do; the
output is bitwise torchao's, the gradients equal it up to float32 summation order (see
:mod:`mxfp8_compat.agreement`). The backward GEMMs (:func:`dgrad_gemm`, :func:`wgrad_gemm`)
are shared with :mod:`mxfp8_compat.fast_emulation`, whose fused quantisers make it bitwise
equal to this module; on CUDA with bf16 operands they are single ``torch._grouped_mm`` calls
with bf16 output, so no GEMM of the reference reads ``offs`` on the host there.
"""

from __future__ import annotations

import torch

from .highprec import (
    grouped_mm_fallback,
    grouped_mm_float64,
    grouped_mm_highprec,
    grouped_mm_loop,
    grouped_mm_support,
    weight_grad_loop,
)
from .metrics import sqnr_db
from .quantize import (
    BLOCK_SIZE,
    DEFAULT_SCALE_MODE,
    E4M3_MAX,
    ScaleMode,
    mx_dequantize,
    mx_fake_quantize,
    mx_fake_quantize_grouped_rows,
    mx_quantize,
)
from .token_groups import zero_rows_after

__all__ = [
    "mxfp8_grouped_mm_reference",
    "dgrad_gemm",
    "wgrad_gemm",
    "zero_unused_grads",
    # re-exported
    "BLOCK_SIZE",
    "E4M3_MAX",
    "ScaleMode",
    "DEFAULT_SCALE_MODE",
    "mx_quantize",
    "mx_dequantize",
    "mx_fake_quantize",
    "mx_fake_quantize_grouped_rows",
    "grouped_mm_loop",
    "grouped_mm_highprec",
    "grouped_mm_support",
    "grouped_mm_float64",
    "grouped_mm_fallback",
    "sqnr_db",
]


# Under torch.compile the reference is a torch custom op: opaque (its group loops read offs,
# which would otherwise break the graph), with autograd registered beside it. Eager calls take
# an autograd.Function around the same implementation.


def _forward_impl(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, scale_mode: str) -> torch.Tensor:
    """out[g] = q_K(A[g]) @ q_K(B[e]): blocks along K."""
    A_q = mx_fake_quantize(A, dim=-1, scale_mode=scale_mode)
    B_q = mx_fake_quantize(B, dim=1, scale_mode=scale_mode)
    return grouped_mm_highprec(A_q, B_q, offs, out_dtype)


@torch.library.custom_op("mxfp8_compat::reference_mxfp8_forward", mutates_args=())
def _reference_forward(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, scale_mode: str, wgrad_with_hp: bool
) -> torch.Tensor:
    """:func:`_forward_impl` as an op torch.compile keeps opaque."""
    return _forward_impl(A, B, offs, out_dtype, scale_mode)


@_reference_forward.register_fake
def _(A, B, offs, out_dtype, scale_mode, wgrad_with_hp):  # type: ignore[no-untyped-def]
    return A.new_empty((A.shape[0], B.shape[2]), dtype=out_dtype)


def _backward_impl(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, scale_mode: str, wgrad_with_hp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA[g] = q_N(dY[g]) @ q_N(B[e])^T (blocks along N); dB[e] = q_M(A[g])^T @ q_M(dY[g]) (blocks
    along the group's tokens), or in high precision with ``wgrad_with_hp``. Rows after
    ``offs[-1]`` get a zero input gradient, empty groups a zero weight gradient."""
    grad_q = mx_fake_quantize(grad_out, dim=-1, scale_mode=scale_mode)
    B_q = mx_fake_quantize(B, dim=2, scale_mode=scale_mode)
    grad_A = dgrad_gemm(grad_q, B_q.transpose(-2, -1).contiguous(), offs, A.dtype)
    if wgrad_with_hp:
        A_w, grad_w = A, grad_out
    else:
        A_w = mx_fake_quantize_grouped_rows(A, offs, scale_mode)
        grad_w = mx_fake_quantize_grouped_rows(grad_out, offs, scale_mode)
    return zero_unused_grads(grad_A, wgrad_gemm(A_w, grad_w, offs, B.shape[0], B.dtype), offs)


@torch.library.custom_op("mxfp8_compat::reference_mxfp8_backward", mutates_args=())
def _reference_backward(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, scale_mode: str, wgrad_with_hp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_backward_impl` as an op torch.compile keeps opaque."""
    return _backward_impl(grad_out, A, B, offs, scale_mode, wgrad_with_hp)


@_reference_backward.register_fake
def _(grad_out, A, B, offs, scale_mode, wgrad_with_hp):  # type: ignore[no-untyped-def]
    return torch.empty_like(A), B.new_empty(B.shape)


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
    reference and :mod:`mxfp8_compat.fast_emulation`, which are bitwise equal through it.
    """
    if dtype == torch.bfloat16 and _sync_free_bf16_gemm(grad_q, B_q_t):
        return torch._grouped_mm(grad_q, B_q_t, offs=offs)
    return grouped_mm_highprec(grad_q, B_q_t, offs, torch.float32).to(dtype)


def wgrad_gemm(A: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """dB[e] = A[g]^T @ grad_out[g] per group, float32 accumulation, in ``dtype``.

    On CUDA with bf16 operands and result, one 2D x 2D ``torch._grouped_mm`` (no device
    sync); elsewhere a per-group float32 loop. Empty groups' gradients are unspecified (see
    :func:`zero_unused_grads`). Shared with :mod:`mxfp8_compat.fast_emulation`.
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


def _reference_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B, offs, _, scale_mode, wgrad_with_hp = inputs
    ctx.save_for_backward(A, B, offs)
    ctx.scale_mode, ctx.wgrad_with_hp = scale_mode, wgrad_with_hp


def _reference_autograd(ctx, grad_out):  # type: ignore[no-untyped-def]
    A, B, offs = ctx.saved_tensors
    grad_A, grad_B = _reference_backward(grad_out.contiguous(), A, B, offs, ctx.scale_mode, ctx.wgrad_with_hp)
    return grad_A, grad_B, None, None, None, None


_reference_forward.register_autograd(_reference_autograd, setup_context=_reference_setup)


class _ReferenceMXFP8(torch.autograd.Function):
    """The same forward and backward for eager calls, without a custom op's dispatch.

    A custom op's first call imports torch._dynamo (and triton); an eager path must not. The
    separate ``setup_context`` is what ``torch.func`` transforms need.
    """

    @staticmethod
    def forward(A, B, offs, out_dtype, scale_mode, wgrad_with_hp):  # type: ignore[no-untyped-def, override]
        return _forward_impl(A, B, offs, out_dtype, scale_mode)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        _reference_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        A, B, offs = ctx.saved_tensors
        grad_A, grad_B = _backward_impl(grad_out.contiguous(), A, B, offs, ctx.scale_mode, ctx.wgrad_with_hp)
        return grad_A, grad_B, None, None, None, None


def mxfp8_grouped_mm_reference(
    A: torch.Tensor,
    B: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE,
    wgrad_with_hp: bool = False,
) -> torch.Tensor:
    """Differentiable MXFP8 grouped GEMM in plain PyTorch (the ``mxfp8-emulated`` fallback).

    ``torch._grouped_mm`` contract: A (M, K), B (E, K, N), ``offs`` int32 (E,) cumulative end
    rows with ``offs[-1] <= M``; returns (M, N) in ``out_dtype`` (rows after ``offs[-1]``
    unspecified, their input gradient zero). K and N must be multiples of 32; group sizes may
    be anything (short blocks at group ends). No input validation: callers validate.
    """
    mode = ScaleMode(scale_mode).value
    if torch.compiler.is_compiling():
        return _reference_forward(A, B, offs, out_dtype, mode, wgrad_with_hp)
    return _ReferenceMXFP8.apply(A, B, offs, out_dtype, mode, wgrad_with_hp)
