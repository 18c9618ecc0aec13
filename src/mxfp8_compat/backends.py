"""The callables a Resolution hands out, one factory per backend.

Every callable has ``torch._grouped_mm``'s contract, ``fn(A, B, offs, *, out_dtype=bf16)``:
A (M, K), B (E, K, N), ``offs`` int32 (E,) cumulative end rows, result (M, N) in
``out_dtype``; differentiable in A and B. Each checks metadata first (no device sync).
"""

from __future__ import annotations

import logging
from typing import NoReturn, Optional, Protocol

import torch

from .distributed import dtensor_aware
from .generations import GroupedMMCall
from .layout import weight_relayout
from .reference import ScaleMode, grouped_mm_fallback, mxfp8_grouped_mm_reference
from .validation import check_metadata, check_offs_values, group_alignment_problem, mxfp8_shape_problem

__all__ = ["GroupedMM", "make_bf16", "make_mxfp8", "log_once"]

logger = logging.getLogger("mxfp8_compat")
_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` at WARNING on the ``mxfp8_compat`` logger, once per process."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


class GroupedMM(Protocol):
    """``torch._grouped_mm``'s contract, with ``out_dtype`` keyword-only."""

    def __call__(
        self, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor: ...


def _raise_clear(error: Exception, A: object, B: object, offs: object, out_dtype: object) -> NoReturn:
    """Re-raise ``error`` as the metadata check's ValueError/TypeError when the arguments are at fault."""
    try:
        check_metadata(A, B, offs, out_dtype)
    except (TypeError, ValueError) as clear:
        raise clear from error
    raise error


def make_bf16(*, validate: bool, use_loop: bool) -> GroupedMM:
    """The bf16 backend: ``torch._grouped_mm`` itself, with every metadata error named.

    With bf16 inputs and the default ``out_dtype`` the result is bitwise that of
    ``torch._grouped_mm(A, B, offs=offs)``. Arguments torch rejects are re-raised as the
    metadata check's ValueError/TypeError (chained to torch's error). ``use_loop`` selects the per-group loop where
    this torch has no ``_grouped_mm`` kernel for the device.
    """
    bfloat16 = torch.bfloat16

    if use_loop:

        def bf16_grouped_mm_loop(
            A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, out_dtype: torch.dtype = bfloat16
        ) -> torch.Tensor:
            check_metadata(A, B, offs, out_dtype)
            if validate:
                check_offs_values(A, offs)
            return grouped_mm_fallback(A, B, offs, out_dtype)

        return dtensor_aware(bf16_grouped_mm_loop)

    grouped_mm, float32 = torch._grouped_mm, torch.float32

    def bf16_grouped_mm(
        A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, out_dtype: torch.dtype = bfloat16
    ) -> torch.Tensor:
        if validate:
            check_metadata(A, B, offs, out_dtype)
            check_offs_values(A, offs)
        try:
            # The hot path checks only what torch._grouped_mm would accept silently (a 2D B is
            # its 2D x 2D mode; float16; a CPU/meta mix) and lets torch check the rest: a
            # full check costs ~2 us, 3% of the smallest CPU call.
            if B.dim() == 3 and out_dtype is A.dtype and A.is_cpu is B.is_cpu and (out_dtype is bfloat16 or out_dtype is float32):
                return grouped_mm(A, B, offs=offs)
        except Exception as error:  # torch rejected the call: name the argument in our words
            _raise_clear(error, A, B, offs, out_dtype)
        check_metadata(A, B, offs, out_dtype)
        return grouped_mm_fallback(A, B, offs, out_dtype)

    return dtensor_aware(bf16_grouped_mm)


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


def make_mxfp8(
    call: GroupedMMCall,
    *,
    validate: bool,
    contiguous_grad: bool,
    group_multiple: int,
    shape_fallback: Optional[GroupedMM],
    label: str,
    float32_out: bool = True,
    bf16_operands: bool = False,
) -> GroupedMM:
    """An MXFP8 backend around ``call(A, B_t, offs, out_dtype)`` (torchao or the reference).

    A is made contiguous and B relaid out only when it is not already per-group
    column-major (a weight from ``prepare_weight`` is passed through untouched). Calls
    MXFP8 cannot take (K or N not multiples of 32; misaligned groups where checked) raise
    ValueError, or, with ``shape_fallback`` (mode "auto"), run that and log the reason once.
    ``contiguous_grad`` makes the incoming gradient contiguous for callees that need it.
    ``float32_out=False`` says the callee cannot emit float32 here (torchao's emulation
    calls ``torch._grouped_mm``, whose CPU kernel emits only the input dtype): float32 is
    then the bf16 result upcast, which costs nothing measurable next to MXFP8's own error
    (~28 dB against bf16 rounding's ~50 dB), and is logged once.
    ``bf16_operands`` rounds float32 A and B to bf16 before the callee (torchao 0.16+'s
    high-precision weight-gradient GEMM fails on float32 inputs: "expected m1 and m2 to have
    the same dtype"); like the upcast, this is far below MXFP8's own rounding.
    """
    check_groups = group_multiple > 1

    def reject(problem: str, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if shape_fallback is None:
            raise ValueError(f"A, B, offs: {label} cannot run this call: {problem}")
        log_once(f"mxfp8_compat: {label} cannot run a call ({problem}); that call runs in bf16")
        return shape_fallback(A, B, offs, out_dtype=out_dtype)

    def mxfp8_grouped_mm(
        A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        check_metadata(A, B, offs, out_dtype)
        problem = mxfp8_shape_problem(A, B)
        if problem is not None:
            return reject(problem, A, B, offs, out_dtype)
        # Reading offs is free on the CPU, but under torch.compile it is a data-dependent
        # op (a graph break): there only validate=True reads it.
        if validate or (A.is_cpu and not torch.compiler.is_compiling()):
            ends = check_offs_values(A, offs)
            if check_groups:
                problem = group_alignment_problem(ends, group_multiple)
                if problem is not None:
                    return reject(problem, A, B, offs, out_dtype)
        if bf16_operands and A.dtype is torch.float32:
            A, B = A.to(torch.bfloat16), B.to(torch.bfloat16)
        if out_dtype is torch.float32 and not float32_out:
            log_once(f"mxfp8_compat: {label} cannot emit float32 on {A.device.type}; float32 output is its bf16 output upcast")
            out = call(A.contiguous(), weight_relayout(B), offs, torch.bfloat16).float()
        else:
            out = call(A.contiguous(), weight_relayout(B), offs, out_dtype)
        if contiguous_grad and out.requires_grad:
            return _ContiguousGrad.apply(out)
        return out

    mxfp8_grouped_mm.__qualname__ = mxfp8_grouped_mm.__name__ = f"mxfp8_grouped_mm[{label}]"
    return dtensor_aware(mxfp8_grouped_mm)


def reference_call(scale_mode: ScaleMode, wgrad_with_hp: bool) -> GroupedMMCall:
    """The reference emulation as a ``call(A, B_t, offs, out_dtype)``."""

    def reference_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return mxfp8_grouped_mm_reference(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp)

    return reference_mxfp8
