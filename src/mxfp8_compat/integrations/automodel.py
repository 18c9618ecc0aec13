"""NeMo Automodel: one call switches its MoE experts' grouped GEMMs to mxfp8_compat.

Automodel's ``GroupedExperts`` (``backend.experts="torch_mm_mxfp8"``) picks its grouped GEMM
with ``select_grouped_mm(use_mxfp8)``, imported into ``nemo_automodel.components.moe.experts``
from ``nemo_automodel.components.moe.mxfp8`` (the seed this library's drop-in mirrors).
:func:`install` replaces that function in both modules::

    from mxfp8_compat.integrations.automodel import install
    install()                  # the drop-in: the seed's behaviour, on every torchao or none
    install(mode="emulated")   # or a resolve() mode: MXFP8 numerics anywhere, CPU included

With ``mode=None`` the experts get :func:`mxfp8_compat.select_grouped_mm`: native MXFP8 where
it can run (else ``torch._grouped_mm``), the seed's one-time warnings word for word. With a
mode, a truthy ``use_mxfp8`` gets ``resolve(mode)`` for the device of each call's activations;
a false one gets ``torch._grouped_mm`` as before. Backends other than ``torch_mm_mxfp8`` pass
``use_mxfp8=False`` and are unchanged. :func:`uninstall` restores Automodel's own function.

Importing this module imports neither Automodel nor torchao; :func:`install` imports Automodel.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable, Optional

import torch

from ..dropin import select_grouped_mm
from ._resolving import checked_mode, resolution_for

__all__ = ["install", "uninstall", "selector"]

#: The modules whose ``select_grouped_mm`` Automodel 0.7.0's experts read.
_TARGETS = ("nemo_automodel.components.moe.experts", "nemo_automodel.components.moe.mxfp8")
_originals: dict[str, Callable[..., Any]] = {}
_selectors: dict[Optional[str], Callable[[object], Callable[..., torch.Tensor]]] = {}


def _modules() -> list[Any]:
    import importlib

    try:
        return [importlib.import_module(name) for name in _TARGETS]
    except ImportError as error:
        try:
            found = f"nemo-automodel {metadata.version('nemo-automodel')} is installed but {error}"
        except metadata.PackageNotFoundError:
            found = "nemo-automodel is not installed"
        raise ImportError(
            "mxfp8_compat.integrations.automodel needs NeMo Automodel >= 0.7.0 "
            f"(nemo_automodel.components.moe.experts.select_grouped_mm); {found}. "
            "Install it with: pip install 'nemo-automodel>=0.7.0'"
        ) from error


def selector(mode: Optional[str] = None) -> Callable[[object], Callable[..., torch.Tensor]]:
    """The ``select_grouped_mm(use_mxfp8)`` that :func:`install` puts in place (one per mode).

    ``mode=None`` is :func:`mxfp8_compat.select_grouped_mm` itself. Otherwise a truthy flag
    selects ``grouped_mm(A, B, offs)`` calling ``resolve(mode)`` for ``A``'s device (cached
    per device, read as a constant under torch.compile), a false one ``torch._grouped_mm``.
    Raises ValueError for an unknown mode.
    """
    mode = checked_mode(mode)
    if mode is None:
        return select_grouped_mm
    cached = _selectors.get(mode)
    if cached is not None:
        return cached

    def grouped_mm(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return resolution_for(mode, A.device)(A, B, offs)

    def select_grouped_mm_for_mode(use_mxfp8: object) -> Callable[..., torch.Tensor]:
        if isinstance(use_mxfp8, (str, bytes)):
            raise TypeError(f"use_mxfp8: expected a bool (or anything with a truth value but a string), got {use_mxfp8!r}")
        return grouped_mm if use_mxfp8 else torch._grouped_mm  # type: ignore[return-value]

    grouped_mm.__qualname__ = grouped_mm.__name__ = f"mxfp8_compat_grouped_mm[{mode}]"
    select_grouped_mm_for_mode.__qualname__ = select_grouped_mm_for_mode.__name__ = f"select_grouped_mm[{mode}]"
    _selectors[mode] = select_grouped_mm_for_mode
    return select_grouped_mm_for_mode


def install(mode: Optional[str] = None) -> Callable[[object], Callable[..., torch.Tensor]]:
    """Make Automodel's experts pick their grouped GEMM with :func:`selector` ``(mode)``; returns it.

    Calling it again (any mode) replaces the earlier installation. Raises ImportError when
    Automodel is missing, ValueError for an unknown mode.
    """
    chosen = selector(mode)
    for module in _modules():
        _originals.setdefault(module.__name__, module.select_grouped_mm)
        module.select_grouped_mm = chosen
    return chosen


def uninstall() -> None:
    """Put Automodel's own ``select_grouped_mm`` back (no-op when nothing was installed)."""
    import sys

    for name, original in list(_originals.items()):
        module = sys.modules.get(name)
        if module is not None:
            module.select_grouped_mm = original
        del _originals[name]
