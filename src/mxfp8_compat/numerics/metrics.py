"""How close a result is: SQNR against a higher-precision reference, and one forward/backward harness.

Every comparison in the project (the smoke probe, the compat-matrix records, the agreement
report, the tests) runs a grouped GEMM forward and backward on the same inputs through
:func:`forward_backward` and measures it with :func:`sqnr_db`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .highprec import grouped_mm_float64

__all__ = ["sqnr_db", "forward_backward", "float64_forward_backward"]

def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``actual`` against ``reference``, in dB.

    ``+inf`` when they are equal, ``nan`` when either holds a non-finite value.
    """
    ref = reference.detach().double()
    err = ref - actual.detach().double()
    if not (torch.isfinite(ref).all() and torch.isfinite(err).all()):
        return float("nan")
    noise = float(err.pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def forward_backward(
    fn: Callable[..., torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    offs: torch.Tensor,
    grad_out: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(A, B, offs, **kwargs)`` and its backward on fresh leaves: (output, grad A, grad B).

    Runs with grad enabled whatever the caller's mode; the output is detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        A = A.detach().clone().requires_grad_(True)
        B = B.detach().clone().requires_grad_(True)
        out = fn(A, B, offs, **kwargs)
        out.backward(grad_out.to(out.dtype))
    return out.detach(), A.grad, B.grad


def float64_forward_backward(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 ground truth of a grouped GEMM and both gradients (what SQNR figures are against)."""
    return forward_backward(
        lambda A64, B64, o: grouped_mm_float64(A64, B64, o), A.double(), B.double(), offs, grad_out.double()
    )
