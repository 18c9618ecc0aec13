"""The callables a Resolution hands out, one factory per backend.

Every callable has ``torch._grouped_mm``'s contract,
``fn(A, B, offs, *, out_dtype=None, bias=None, groups_aligned=False)``: A (M, K), B (E, K, N),
``offs`` int32 (E,) cumulative end rows with ``offs[-1] <= M``, result (M, N) in ``out_dtype``
(None: A's dtype); differentiable in A and B; any token-group sizes. Each checks metadata
first (no device sync). ``groups_aligned=True`` promises that every group's size and M are
multiples of the backend's ``group_alignment`` (so nothing is padded).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..distributed import dtensor_aware
from ..providers.schema import GroupedMMCall
from ..layout import weight_relayout
from ..numerics.highprec import grouped_mm_fallback
from ..numerics.quantize import ScaleMode
from ..numerics.reference import mxfp8_grouped_mm_reference
from ..token_groups import pad_token_groups, unpad_token_groups, zero_rows_after
from ..contract import (
    GroupedMM,
    aligned_rows_problem,
    check_metadata,
    check_offs_values,
    group_alignment_problem,
    grouped_mm_stride_problem,
    is_empty_problem,
    mxfp8_shape_problem,
)

__all__ = ["GroupedMM", "make_bf16", "make_mxfp8", "reference_emulation", "log_once", "clear_log_once"]

logger = logging.getLogger("mxfp8_compat")
_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` at WARNING on the ``mxfp8_compat`` logger, once per process."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def clear_log_once() -> None:
    """Forget which messages :func:`log_once` has logged (``mxfp8_compat.reset()``)."""
    _logged.clear()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


_interpreter_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


def _refuse_functorch(label: str) -> None:
    """Raise where a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...) is active around an MXFP8 call.

    One rule for every MXFP8 backend: torchao's autograd Functions have no ``setup_context``
    and none of the kernels has a batching rule, so a transform would fail somewhere inside
    torch, differently per backend, or (grad through the double-backward guard) with a wrong
    message. bf16 is torch's own op and runs under them.
    """
    if not _compiling() and _interpreter_stack() is not None:
        raise RuntimeError(
            f"{label}: torch.func transforms (grad, vjp, jacrev, vmap, ...) are not supported by the MXFP8 "
            "backends; use torch.autograd (loss.backward(), torch.autograd.grad), or resolve('off') (bf16), "
            "which runs under torch.func"
        )


def _retry_or_raise(
    error: Exception, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: object, bias: object
) -> torch.Tensor:
    """torch._grouped_mm raised ``error``: name the argument, run what only its strides stopped, or re-raise.

    Metadata errors become the metadata check's ValueError/TypeError (chained to torch's).
    A layout torch's stride rule refuses (decided from the strides, as torch decides: see
    :func:`~mxfp8_compat.contract.grouped_mm_stride_problem`) runs on contiguous copies and
    says so once; a layout no copy can fix (rows not a multiple of 16 bytes) is a ValueError
    naming the operand. Every other error (out of memory, a device-side assert, a sync-debug
    error) propagates untouched: copying operands cannot help it.
    """
    try:
        check_metadata(A, B, offs, out_dtype, bias)
    except (TypeError, ValueError) as clear:
        raise clear from error
    for name, operand in (("A", A), ("B", B)):
        problem = grouped_mm_stride_problem(name, operand)
        if problem is None:
            continue
        dense = grouped_mm_stride_problem(name, operand.contiguous())
        if dense is not None:
            raise ValueError(f"{name}: torch._grouped_mm cannot take this operand in any layout: {dense}") from error
        log_once(
            f"mxfp8_compat: torch._grouped_mm rejects the layout of {name} ({problem}); "
            "such calls run on contiguous copies (store B contiguous, or per-group column-major, to avoid the copy)"
        )
        return _bf16_call(A.contiguous(), B.contiguous(), offs, out_dtype)
    raise error


class _EmptyGroupedMM(torch.autograd.Function):
    """A call with nothing to multiply (M, K, N or E zero): (M, N) zeros, zero gradients, no GEMM.

    The contract module's answer for every mode (see :func:`~mxfp8_compat.contract.is_empty_problem`);
    nothing is saved but shapes.
    """

    @staticmethod
    def forward(A: torch.Tensor, B: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        return A.new_zeros((A.shape[0], B.shape[2]), dtype=out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        A, B, _ = inputs
        ctx.operands = ((A.shape, A.dtype), (B.shape, B.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def, override]
        (a_shape, a_dtype), (b_shape, b_dtype) = ctx.operands
        grad_A = torch.zeros(a_shape, dtype=a_dtype, device=grad.device) if ctx.needs_input_grad[0] else None
        grad_B = torch.zeros(b_shape, dtype=b_dtype, device=grad.device) if ctx.needs_input_grad[1] else None
        return grad_A, grad_B, None


def empty_grouped_mm(A: torch.Tensor, B: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The result of a call with nothing to multiply: (M, N) zeros in ``out_dtype`` (None: A's), differentiable."""
    out_dtype = out_dtype or A.dtype
    if A.requires_grad or B.requires_grad:
        return _EmptyGroupedMM.apply(A, B, out_dtype)
    return A.new_zeros((A.shape[0], B.shape[2]), dtype=out_dtype)


def _bf16_call(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: object) -> torch.Tensor:
    # torch's meta kernel for _grouped_mm takes bf16 operands only, though its eager kernels take
    # float32: under torch.compile float32 operands go through the fallback op (opaque to tracing).
    if (out_dtype is None or out_dtype is A.dtype) and not (A.dtype is torch.float32 and _compiling()):
        out = torch._grouped_mm(A, B, offs=offs)
    else:
        out = grouped_mm_fallback(A, B, offs, out_dtype or A.dtype)  # type: ignore[arg-type]
    return with_contiguous_grad(out) if out.requires_grad else out


def make_bf16(*, validate: bool, use_loop: bool) -> GroupedMM:
    """The bf16 backend: ``torch._grouped_mm`` itself, with every metadata error named.

    With ``out_dtype`` None or A's dtype the result is bitwise that of
    ``torch._grouped_mm(A, B, offs=offs)``; any group sizes and ``offs[-1] <= M`` are
    torch's own (rows after ``offs[-1]``, and their input gradient, are left uninitialised
    by torch). The incoming gradient is made contiguous (torch's backward rejects an
    expanded one, e.g. from ``out.sum().backward()``). Arguments torch rejects are re-raised
    as the metadata check's ValueError/TypeError. ``use_loop`` selects the per-group loop
    where this torch has no ``_grouped_mm`` kernel for the device.
    """

    if use_loop:

        def bf16_grouped_mm_loop(
            A: torch.Tensor,
            B: torch.Tensor,
            offs: torch.Tensor,
            *,
            out_dtype: Optional[torch.dtype] = None,
            bias: Optional[torch.Tensor] = None,
            groups_aligned: bool = False,
        ) -> torch.Tensor:
            check_metadata(A, B, offs, out_dtype, bias)
            if validate and not _compiling():
                check_offs_values(A, offs)
            if is_empty_problem(A, B):
                return empty_grouped_mm(A, B, out_dtype)
            return grouped_mm_fallback(A, B, offs.contiguous(), out_dtype or A.dtype)

        return dtensor_aware(bf16_grouped_mm_loop)

    grouped_mm = torch._grouped_mm
    bfloat16, float32 = torch.bfloat16, torch.float32

    def bf16_grouped_mm(
        A: torch.Tensor,
        B: torch.Tensor,
        offs: torch.Tensor,
        *,
        out_dtype: Optional[torch.dtype] = None,
        bias: Optional[torch.Tensor] = None,
        groups_aligned: bool = False,
    ) -> torch.Tensor:
        if validate:
            check_metadata(A, B, offs, out_dtype, bias)
            if not _compiling():
                check_offs_values(A, offs)
        try:
            # The hot path checks only what torch._grouped_mm would accept silently (3D A
            # or 2D B are its other modes; offs None; float16; a device mix involving the
            # CPU or meta) or mishandle (nothing to multiply; a strided offs, which its CUDA
            # kernel reads as if contiguous) and lets torch check the rest.
            a_shape, b_shape = A.shape, B.shape
            if (
                len(a_shape) == 2
                and len(b_shape) == 3
                and a_shape[0]
                and a_shape[1]
                and b_shape[0]
                and b_shape[2]
                and offs is not None
                and bias is None
                and (out_dtype is None or out_dtype is A.dtype)
                and A.is_cpu is B.is_cpu is offs.is_cpu
                and A.is_meta is B.is_meta is offs.is_meta
                and (A.dtype is bfloat16 or (A.dtype is float32 and not _compiling()))
                and offs.is_contiguous()
            ):
                out = grouped_mm(A, B, offs=offs)
                return with_contiguous_grad(out) if out.requires_grad else out
        except Exception as error:  # torch rejected the call: name the argument in our words
            return _retry_or_raise(error, A, B, offs, out_dtype, bias)
        check_metadata(A, B, offs, out_dtype, bias)
        if is_empty_problem(A, B):
            return empty_grouped_mm(A, B, out_dtype)
        offs = offs.contiguous()
        try:
            return _bf16_call(A, B, offs, out_dtype)
        except Exception as error:
            return _retry_or_raise(error, A, B, offs, out_dtype, bias)

    return dtensor_aware(bf16_grouped_mm)


_contiguous = torch.Tensor.contiguous


def with_contiguous_grad(out: torch.Tensor) -> torch.Tensor:
    """``out``, whose gradient reaches the GEMM's backward contiguous.

    torch._grouped_mm's backward rejects an expanded gradient (``out.sum().backward()``) and
    torchao's quantisers assert contiguity. Eagerly a tensor hook does it (a few microseconds;
    an autograd Function costs several times that on the smallest calls); under torch.compile
    the Function, which traces without a graph break.
    """
    if torch.compiler.is_compiling():
        return _ContiguousGrad.apply(out)
    out.register_hook(_contiguous)
    return out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    torchao's quantisers assert contiguity, and ``out.sum().backward()`` (or any expand or
    transpose after the GEMM) produces a strided gradient.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


class _ZeroTailGrad(torch.autograd.Function):
    """Identity on A whose backward zeroes the gradient rows after ``offs[-1]``.

    Kernels leave those rows of their input gradient uninitialised; the contract says zero.
    Used only where nothing is padded (padding already returns zeros there).
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(offs)
        return A.view_as(A)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (offs,) = ctx.saved_tensors
        return zero_rows_after(grad, offs), None


def make_mxfp8(
    call: GroupedMMCall,
    *,
    validate: bool,
    contiguous_grad: bool,
    group_alignment: int,
    shape_multiple: int = 32,
    shape_fallback: Optional[GroupedMM],
    label: str,
    float32_out: bool = True,
    bf16_operands: bool = False,
    float32_operands: Optional[GroupedMM] = None,
) -> GroupedMM:
    """An MXFP8 backend around ``call(A, B_t, offs, out_dtype)`` (torchao or the reference).

    Any token-group sizes: where the callee needs groups aligned (``group_alignment`` > 1),
    the call pads them on the device (:mod:`mxfp8_compat.token_groups`, no host sync) and
    unpads the result, forward and backward, unless the caller promises
    ``groups_aligned=True``. Rows after ``offs[-1]`` get a zero input gradient.
    A is made contiguous and B relaid out only when it is not already per-group
    column-major (a weight stored (E, N, K) and passed transposed is never copied). Calls
    whose K or N the kernel cannot take (multiples of ``shape_multiple``) raise ValueError,
    or, with ``shape_fallback`` (mode "auto"), run that and log the reason once.
    ``contiguous_grad`` makes the incoming gradient contiguous for callees that need it.
    ``float32_out=False`` says the callee cannot emit float32 here (torchao's emulation
    calls ``torch._grouped_mm``, whose CPU kernel emits only the input dtype): float32 is
    then the bf16 result upcast, which costs nothing measurable next to MXFP8's own error
    (~28 dB against bf16 rounding's ~50 dB), and is logged once.
    ``bf16_operands`` rounds float32 A and B to bf16 before the callee (torchao 0.16+'s
    high-precision weight-gradient GEMM fails on float32 inputs: "expected m1 and m2 to have
    the same dtype"); like the upcast, this is far below MXFP8's own rounding.
    ``float32_operands`` instead runs float32 calls on that callable (an emulated row hands the
    reference emulation with its own scale rule): there rounding to bf16 first would make the
    result depend on whether torchao is installed (33 dB from the reference, about MXFP8's own
    distance from float32). Logged once.
    Inside a ``torch.func`` transform every MXFP8 backend raises RuntimeError naming it.
    """
    pads = group_alignment > 1

    def reject(problem: str, A, B, offs, out_dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if shape_fallback is None:
            raise ValueError(f"A, B: {label} cannot run this call: {problem}")
        log_once(f"mxfp8_compat: {label} cannot run a call ({problem}); that call runs in bf16")
        return shape_fallback(A, B, offs, out_dtype=out_dtype)

    def mxfp8_grouped_mm(
        A: torch.Tensor,
        B: torch.Tensor,
        offs: torch.Tensor,
        *,
        out_dtype: Optional[torch.dtype] = None,
        bias: Optional[torch.Tensor] = None,
        groups_aligned: bool = False,
    ) -> torch.Tensor:
        check_metadata(A, B, offs, out_dtype, bias)
        _refuse_functorch(label)
        if is_empty_problem(A, B):
            return empty_grouped_mm(A, B, out_dtype)
        if float32_operands is not None and A.dtype is torch.float32:
            log_once(
                f"mxfp8_compat: {label} takes bf16 operands only; float32 operands run on the reference "
                "emulation with the same scale rule (rounding them to bf16 first would change the result)"
            )
            return float32_operands(A, B, offs, out_dtype=out_dtype, groups_aligned=groups_aligned)
        out_dtype = out_dtype or A.dtype
        offs = offs.contiguous()  # every kernel below reads offs as a flat array
        problem = mxfp8_shape_problem(A, B, shape_multiple)
        if problem is not None:
            return reject(problem, A, B, offs, out_dtype)
        promised = groups_aligned and pads
        if promised:
            problem = aligned_rows_problem(A, group_alignment)
            if problem is not None:
                raise ValueError(f"A: groups_aligned=True promises rows aligned to {group_alignment}, but {problem}")
        # Reading offs is free on the CPU, but under torch.compile it is a data-dependent
        # op (a graph break): there only eager validate=True reads it.
        if (validate or A.is_cpu) and not _compiling():
            ends = check_offs_values(A, offs)
            problem = group_alignment_problem(ends, group_alignment) if pads else None
            if promised and problem is not None:
                raise ValueError(f"offs: groups_aligned=True promises group sizes aligned to {group_alignment}, but {problem}")
            # offs was read anyway (free on the CPU): nothing to pad when every row is in an aligned
            # group (rows after offs[-1] would be left unwritten by the kernel: padding covers them)
            tail_free = not ends or ends[-1] == A.shape[0]
            if pads and problem is None and tail_free and aligned_rows_problem(A, group_alignment) is None:
                groups_aligned = True
        if bf16_operands and A.dtype is torch.float32:
            A, B = A.to(torch.bfloat16), B.to(torch.bfloat16)
        callee_dtype = out_dtype
        if out_dtype is torch.float32 and not float32_out:
            log_once(f"mxfp8_compat: {label} cannot emit float32 on {A.device.type}; float32 output is its bf16 output upcast")
            callee_dtype = torch.bfloat16
        B_t = weight_relayout(B)
        if pads and not groups_aligned:
            A_padded, padded_offs, padding = pad_token_groups(A.contiguous(), offs, group_alignment)
            out = unpad_token_groups(call(A_padded, B_t, padded_offs, callee_dtype), padding)
        else:
            if pads and A.requires_grad:
                A = _ZeroTailGrad.apply(A, offs)
            out = call(A.contiguous(), B_t, offs, callee_dtype)
            if contiguous_grad and out.requires_grad:
                out = with_contiguous_grad(out)
        if out.requires_grad and not _compiling():
            out.register_hook(first_order_only)
        return out if callee_dtype is out_dtype else out.to(out_dtype)

    first_order_only = _first_order_only(label)
    mxfp8_grouped_mm.__qualname__ = mxfp8_grouped_mm.__name__ = f"mxfp8_grouped_mm[{label}]"
    return dtensor_aware(mxfp8_grouped_mm)


def _first_order_only(label: str) -> Callable[[torch.Tensor], None]:
    """A gradient hook that refuses double backward through an MXFP8 backend, naming it.

    Every MXFP8 backward (torchao's, the reference's, the fast emulation's, torch's own kernel's)
    is quantised numerics with no derivative of its own: a second backward through it would be
    silently wrong (a gradient penalty losing its weight term) or fail inside torch. The engine
    runs hooks with grad mode on exactly when ``create_graph=True``.
    """

    def refuse_double_backward(grad: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{label}: double backward (create_graph=True, e.g. a gradient penalty) is not supported: "
                "the MXFP8 backward has no derivative of its own; resolve('off') (bf16, differentiable twice) "
                "serves such a loss"
            )

    return refuse_double_backward




def reference_call(scale_mode: ScaleMode, wgrad_with_hp: bool) -> GroupedMMCall:
    """The reference emulation as a ``call(A, B_t, offs, out_dtype)``."""

    def reference_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return mxfp8_grouped_mm_reference(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp)

    return reference_mxfp8


def reference_emulation(scale_mode: ScaleMode, wgrad_with_hp: bool, *, validate: bool) -> GroupedMM:
    """The reference emulation behind the contract: emulated mode's last resort, and the path of
    float32 operands in torchao's emulation (which would round them to bf16 first)."""
    return make_mxfp8(
        reference_call(scale_mode, wgrad_with_hp),
        validate=validate,
        contiguous_grad=False,
        group_alignment=1,
        shape_fallback=None,
        label="reference emulated MXFP8",
    )
