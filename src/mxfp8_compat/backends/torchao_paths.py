"""torchao's native and emulated paths, built from their row's columns and smoke-run.

The one place that turns a matched row (:class:`~mxfp8_compat.providers.match.BoundEntry`) into
a callable: every quirk of the release (operand dtypes, contiguous gradients, float32 output,
alignments) is read from the row, never from its key. :mod:`mxfp8_compat.resolution` and the
isolated child (:mod:`mxfp8_compat.probes.isolated`) both build through here, so the child runs
exactly the smoke runs the parent would.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..contract import GroupedMM
from ..numerics.highprec import grouped_mm_support
from ..probes import smoke
from ..probes.smoke import SmokeResult
from ..providers.match import BoundEntry
from ..providers.schema import Kernel
from .grouped_mm import make_mxfp8, reference_emulation

__all__ = ["torchao_path", "smoke_torchao_path"]


def torchao_path(
    bound: BoundEntry,
    kernel: Kernel,
    device: torch.device,
    *,
    wgrad_with_hp: bool,
    validate: bool,
    shape_fallback: Optional[GroupedMM] = None,
) -> GroupedMM:
    """The ``kernel`` path of ``bound``'s torchao entry behind mxfp8_compat's contract.

    ``wgrad_with_hp`` is what the entry is asked for (the caller has already applied the row's
    ``wgrad_with_hp`` column). The emulated kernel's float32 operands run on the reference with
    the row's scale rule, so they are rounded once, as the emulation promises, not to bf16 first.
    """
    row = bound.generation
    float32_out = row.float32_out[kernel]
    emulated = kernel == "emulated"
    return make_mxfp8(
        bound.bind(kernel, wgrad_with_hp),
        validate=validate,
        contiguous_grad=row.contiguous_grad,
        bf16_operands=row.bf16_operands and not emulated,
        float32_operands=reference_emulation(row.scale_mode, wgrad_with_hp, validate=validate) if emulated else None,
        group_alignment=row.group_multiple[kernel],
        shape_multiple=row.shape_multiple[kernel],
        shape_fallback=shape_fallback,
        label=f"torchao {row.key} {kernel} MXFP8",
        float32_out=float32_out == "grouped_mm" and grouped_mm_support(device.type, torch.bfloat16)[1],
    )


def smoke_torchao_path(
    bound: BoundEntry,
    kernel: Kernel,
    device: torch.device,
    *,
    wgrad_with_hp: bool,
    validate: bool = False,
    shape_fallback: Optional[GroupedMM] = None,
) -> tuple[GroupedMM, SmokeResult]:
    """:func:`torchao_path` and its smoke run (bitwise the reference for the emulated kernel)."""
    fn = torchao_path(bound, kernel, device, wgrad_with_hp=wgrad_with_hp, validate=validate, shape_fallback=shape_fallback)
    result = smoke.smoke_run(
        fn, device, scale_mode=bound.generation.scale_mode, wgrad_with_hp=wgrad_with_hp, exact=kernel == "emulated"
    )
    return fn, result
