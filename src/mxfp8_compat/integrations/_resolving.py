"""What every integration needs from resolve(): the Resolution for a device, also while torch.compile traces."""

from __future__ import annotations

from typing import Optional

import torch

from ..resolution import MODES, Resolution, resolve

__all__ = ["checked_mode", "resolution_for"]


def checked_mode(mode: object, argument: str = "mode") -> Optional[str]:
    """``mode`` lower-cased and stripped (None stays None: ``MXFP8_COMPAT_MODE``, else auto), or ValueError."""
    if mode is None:
        return None
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"{argument}: expected one of {', '.join(MODES)} or None, got {mode!r}")
    return mode.strip().lower()


_TRACED: dict[str, Resolution] = {}


@torch._dynamo.assume_constant_result
def _traced_resolution_key(mode: Optional[str], device: str) -> str:
    """Resolve while torch.compile traces (dynamo runs this eagerly and keeps the returned key)."""
    key = f"{mode}@{device}"
    _TRACED[key] = resolve(mode, device=device)
    return key


def resolution_for(mode: Optional[str], device: torch.device) -> Resolution:
    """``resolve(mode, device=device)``, cached per device; traceable by torch.compile."""
    if torch.compiler.is_compiling():
        # resolve() takes a lock and may run probes: not traceable. Dynamo calls the key
        # function for real, once per compiled graph, and reads the Resolution as a constant.
        return _TRACED[_traced_resolution_key(mode, str(device))]
    return resolve(mode, device=device)
