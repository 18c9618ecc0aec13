"""torchao 0.13, 0.14 and 0.15: ``scaling_type=MXFP8`` entries, FLOOR scales, no kernel choice.

Everything that exists only for these releases is here: their rows, their binder, and the
fingerprint rule written for 0.15's positional-only ``_MXFP8GroupedMM.apply`` alias. Dropping
them is deleting this module, the line of :mod:`.table` that names it, their tox envs
(``torchao013``, ``torchao014``, ``torchao015``) and the tests and fakes of these releases
(README, "What removing a release touches"; ``tests/test_layout_of_package.py`` checks it).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

import torch
from packaging.specifiers import SpecifierSet

from ..numerics.quantize import ScaleMode
from .schema import Generation, GroupedMMCall, Kernel
from .torchao import MOE

__all__ = ["ROWS", "bind_scaling_type", "apply_forward_params", "positional_prefix"]


def _moe_scaling_type_mxfp8() -> Any:
    return getattr(importlib.import_module(f"{MOE}.conversion_utils"), "MoEScalingType").MXFP8


def bind_scaling_type(entry: Callable[..., Any], kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
    """0.13 / 0.14 ``_scaled_grouped_mm``, 0.15 ``_quantize_then_scaled_grouped_mm``:
    ``entry(A, B_t, offs=, out_dtype=, scaling_type=MXFP8)``.

    The kernel is not selectable: 0.13 always emulates, 0.14 and 0.15 always run sm_100 kernels.
    """
    call = functools.partial(entry, scaling_type=_moe_scaling_type_mxfp8())

    def scaled_grouped_mm_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return call(A, B_t, offs=offs, out_dtype=out_dtype)

    return scaled_grouped_mm_mxfp8


def apply_forward_params(entry: Callable[..., Any]) -> tuple[str, ...]:
    """A row's ``params`` for an ``autograd.Function.apply`` alias (whose own signature is ``*args``):
    the names of the Function's ``forward``, without ``ctx``."""
    import inspect

    owner = getattr(entry, "__self__", None)
    if owner is None or not hasattr(owner, "forward"):
        raise TypeError(f"{entry!r} is not an autograd.Function.apply alias")
    return tuple(inspect.signature(owner.forward).parameters)[1:]


def positional_prefix(fingerprint: tuple[str, ...], params: tuple[str, ...]) -> Optional[str]:
    """A row's ``fingerprint_rule`` for an entry called positionally: its leading parameters are
    exactly ``fingerprint``, in order.

    Written for 0.15's ``_MXFP8GroupedMM.apply`` alias, which no row calls any more: its ``forward``
    declares 8 parameters but its ``backward`` returns 6 gradients, so a call filling all 8 fails in
    backward. Kept (with :func:`apply_forward_params`) for a row whose entry is positional only.
    """
    head = params[: len(fingerprint)]
    if head != fingerprint:
        return f"positional parameters {head} differ from the expected {fingerprint}"
    return None


_FINGERPRINT = ("A", "B_t", "offs", "out_dtype", "scaling_type")

#: The rows of these releases, newest first (they follow :mod:`.table`'s newer rows).
ROWS: tuple[Generation, ...] = (
    Generation(
        key="0.15",
        versions=SpecifierSet(">=0.15.0.dev0,<0.16.0.dev0", prereleases=True),
        # The dispatcher torchao's own ScaledGroupedMMTensor calls. Same parameters as 0.14's
        # `_scaled_grouped_mm`; the rows differ by entry name (each wheel has only its own).
        entry_points=(
            (f"{MOE}.scaled_grouped_mm", "_quantize_then_scaled_grouped_mm"),
            (MOE, "_quantize_then_scaled_grouped_mm"),
        ),
        fingerprint=_FINGERPRINT,
        bind=bind_scaling_type,
        native=True,
        emulation="reference",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=False,
        bf16_operands=True,
        contiguous_grad=True,
        notes=(
            "Entry is `_quantize_then_scaled_grouped_mm(..., scaling_type=MXFP8)`, which calls "
            "`_MXFP8GroupedMM.apply` with 5 arguments; RCEIL is that Function's default. Not the "
            "`_to_mxfp8_then_scaled_grouped_mm` alias (`_MXFP8GroupedMM.apply` itself): its forward "
            "declares 8 parameters but backward returns 6 gradients, so filling all 8 fails in backward. "
            "No emulated path: forward always runs sm_100 kernels."
        ),
    ),
    Generation(
        key="0.14",
        versions=SpecifierSet(">=0.14.0.dev0,<0.15.0.dev0", prereleases=True),
        entry_points=(
            (f"{MOE}.scaled_grouped_mm", "_scaled_grouped_mm"),
            (f"{MOE}.tensor", "_scaled_grouped_mm"),
            (MOE, "_scaled_grouped_mm"),
        ),
        fingerprint=_FINGERPRINT,
        bind=bind_scaling_type,
        native=True,
        emulation="reference",
        scale_mode=ScaleMode.FLOOR,
        wgrad_with_hp=False,
        bf16_operands=True,
        contiguous_grad=True,
        notes="Forward ignores `emulated`: always torch._scaled_grouped_mm + triton (sm_100 only).",
    ),
    Generation(
        key="0.13",
        versions=SpecifierSet(">=0.13.0.dev0,<0.14.0.dev0", prereleases=True),
        entry_points=(
            (f"{MOE}.scaled_grouped_mm", "_scaled_grouped_mm"),
            (MOE, "_scaled_grouped_mm"),
        ),
        fingerprint=_FINGERPRINT,
        bind=bind_scaling_type,
        native=False,
        emulation="torchao",
        scale_mode=ScaleMode.FLOOR,
        wgrad_with_hp=False,
        bf16_operands=True,
        contiguous_grad=True,
        wgrad_rhs="row-major",
        emulated_sites=(
            "prototype/moe_training/scaled_grouped_mm.py: _MXFP8GroupedMM.backward -> _emulated_mxfp8_scaled_grouped_mm_2d_3d",
            "prototype/moe_training/scaled_grouped_mm.py: _MXFP8GroupedMM.backward -> _emulated_mxfp8_scaled_grouped_mm_2d_2d",
        ),
        notes="MXFP8 is always emulated (forward asserts `emulated`): no native path on any GPU.",
    ),
)
