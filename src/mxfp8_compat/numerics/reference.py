"""The reference MXFP8 grouped GEMM: the project's yardstick, in plain PyTorch.

It needs no torchao, no triton and no GPU, so the ``mxfp8-emulated`` backend works
everywhere, and tests compare every torchao release and the fast emulation against it.
Blocks, scale rules and special values: :mod:`.quantize`.

Precision of the GEMMs: quantised operands are dequantised into bfloat16 (exactly: an
e4m3 value times a power of two always fits bf16) and multiplied by
``torch._grouped_mm`` with float32 accumulation, as torchao's emulated kernels do; the
output is bitwise torchao's, the gradients equal it up to float32 summation order (see
``tools/mxfp8_compat_dev/agreement.py``). The backward GEMMs are :mod:`.backward`'s, shared
with :mod:`mxfp8_compat.backends.fast_emulation`, whose fused quantisers make it bitwise equal
to this module.
"""

from __future__ import annotations

import torch

from .backward import dgrad_gemm, wgrad_gemm, zero_unused_grads
from .highprec import grouped_mm_highprec
from .quantize import DEFAULT_SCALE_MODE, ScaleMode, mx_fake_quantize, mx_fake_quantize_grouped_rows

__all__ = ["mxfp8_grouped_mm_reference"]


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
