"""select_grouped_mm(): the one-line drop-in for MoE code that already calls torch._grouped_mm."""

from __future__ import annotations

import threading
import warnings

import torch

from .backends import GroupedMM
from .resolution import resolve

__all__ = ["select_grouped_mm", "forget_warning"]

_warned = False
_warn_lock = threading.Lock()


def forget_warning() -> None:
    """Let the next unavailable ``select_grouped_mm(True)`` warn again (``reset()`` calls this)."""
    global _warned
    with _warn_lock:
        _warned = False


def select_grouped_mm(use_mxfp8: bool) -> GroupedMM:
    """The grouped GEMM to call: native MXFP8 when requested and usable, else ``torch._grouped_mm``.

    When ``use_mxfp8`` is True but MXFP8 is unavailable here, one UserWarning per process
    says why (the reasons of ``resolve("auto")``). With ``use_mxfp8=False`` this returns
    ``torch._grouped_mm`` itself, at no cost.
    """
    global _warned
    if not isinstance(use_mxfp8, bool):
        raise TypeError(f"use_mxfp8: expected a bool, got {type(use_mxfp8).__name__}")
    if not use_mxfp8:
        return torch._grouped_mm  # type: ignore[return-value]
    resolution = resolve("auto")
    if resolution.backend == "mxfp8":
        return resolution.fn
    with _warn_lock:
        if not _warned:
            _warned = True
            warnings.warn(
                "mxfp8_compat: MXFP8 grouped GEMM requested but unavailable; using torch._grouped_mm: "
                + "; ".join(resolution.reasons),
                UserWarning,
                stacklevel=2,
            )
    return torch._grouped_mm  # type: ignore[return-value]
