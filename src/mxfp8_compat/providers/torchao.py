"""torchao 0.16 and later: ``_to_mxfp8_then_scaled_grouped_mm`` with ``kernel_preference``.

Entry, fingerprint and binder of the rows that select the kernel by keyword (``KernelPreference.AUTO``
for the native kernel, ``EMULATED`` for torchao's own emulation). Facts come from reading each
published wheel (see ``shared/torchao-generations.md``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch

from .schema import GroupedMMCall, Kernel

__all__ = ["MOE", "ENTRY", "FINGERPRINT", "bind_kernel_preference"]

MOE = "torchao.prototype.moe_training"
ENTRY = "_to_mxfp8_then_scaled_grouped_mm"
FINGERPRINT = ("A", "B_t", "offs", "out_dtype", "kernel_preference", "wgrad_with_hp", "scale_calculation_mode")


def _enum(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _kernel_preference(kernel: Kernel) -> Any:
    preference = _enum("torchao.quantization.quantize_.common", "KernelPreference")
    return preference.EMULATED if kernel == "emulated" else preference.AUTO


def _rceil() -> Any:
    return _enum("torchao.prototype.mx_formats.config", "ScaleCalculationMode").RCEIL


def bind_kernel_preference(entry: Callable[..., Any], kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
    """``_to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=, out_dtype=, kernel_preference=, ...)``.

    Keywords only past B_t, so the 4th slot (``block_size`` in some releases, ``bias`` in others)
    is never touched.
    """
    call = functools.partial(
        entry,
        kernel_preference=_kernel_preference(kernel),
        wgrad_with_hp=wgrad_with_hp,
        scale_calculation_mode=_rceil(),
    )

    def to_mxfp8_then_scaled_grouped_mm(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return call(A, B_t, offs=offs, out_dtype=out_dtype)

    return to_mxfp8_then_scaled_grouped_mm
