"""The environment report: what resolves here for every mode, as one JSON-ready dict.

Used by ``python -m mxfp8_compat`` and by the compat-matrix records.
"""

from __future__ import annotations

import platform
import sys
from typing import Any, Optional, Union

import torch

from . import probes
from .errors import MXFP8Unavailable
from .resolution import MODES, PROVIDERS, Resolution, normalise_device, resolve

__all__ = ["environment_report", "verdict"]


def _torchao_location() -> Optional[str]:
    module = sys.modules.get("torchao")
    return getattr(module, "__file__", None) if module is not None else None


def _mode_entry(
    mode: str, device: torch.device, validate: bool, provider: Optional[str] = None, isolate: Optional[bool] = None
) -> dict[str, Any]:
    try:
        resolution: Resolution = resolve(mode, device=device, validate=validate, provider=provider, isolate=isolate)
    except MXFP8Unavailable as error:
        return {"ok": False, "backend": None, "generation": None, "emulation": None,
                "reasons": list(error.reasons), "smoke_sqnr_db": None, "provider": None}
    return {
        "ok": True,
        "backend": resolution.backend,
        "generation": resolution.generation.key if resolution.generation else None,
        "emulation": resolution.emulation,
        "reasons": list(resolution.reasons),
        "smoke_sqnr_db": resolution.smoke_sqnr_db,
        "provider": resolution.provider,
    }


def environment_report(
    device: Union[str, torch.device, None] = None, validate: bool = False, isolate: Optional[bool] = None
) -> dict[str, Any]:
    """Resolve every mode on ``device`` and describe the environment.

    ``isolate`` is resolve()'s (None: ``MXFP8_COMPAT_ISOLATE``); the CLI passes True, so that
    the one tool meant to explain a crashing torchao survives it.

    Keys: ``python``, ``platform``, ``torch_version``, ``torchao_version``,
    ``torchao_location``, ``device``, ``device_name``, ``capability``, ``generation``
    (row matched, or None), ``generation_reasons``, and ``modes`` mapping each mode to
    ``{ok, backend, generation, emulation, reasons, smoke_sqnr_db, provider}``, and ``providers``
    mapping each native MXFP8 provider ("torchao", "torch") to its ``native`` verdict, same keys.
    """
    resolved_device = normalise_device(device)
    modes = {mode: _mode_entry(mode, resolved_device, validate, isolate=isolate) for mode in MODES}
    providers = {
        name: _mode_entry("native", resolved_device, validate, provider=name, isolate=isolate) for name in PROVIDERS
    }
    torchao_version = probes.installed_torchao_version()
    match = probes.match_generation(torchao_version) if torchao_version and "torchao.prototype.moe_training" in sys.modules else None
    capability = probes.device_capability(resolved_device)
    if resolved_device.type == "cuda":
        device_name = torch.cuda.get_device_name(resolved_device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "torchao_version": torchao_version,
        "torchao_location": _torchao_location(),
        "device": str(resolved_device),
        "device_name": device_name,
        "capability": list(capability) if capability else None,
        "generation": match.bound.generation.key if match and match.bound else None,
        "generation_reasons": list(match.reasons) if match else [],
        "modes": modes,
        "providers": providers,
    }


def verdict(report: dict[str, Any]) -> str:
    """One line: the fastest path that resolves here."""
    auto = report["modes"]["auto"]
    if auto["backend"] == "mxfp8" and auto.get("provider") == "torch":
        return f"native MXFP8 (torch {report['torch_version']}'s own grouped GEMM, mxfp8_compat's quantisers) is active"
    if auto["backend"] == "mxfp8":
        return f"native MXFP8 (torchao {report['torchao_version']}, generation {auto['generation']}) is active"
    emulated = report["modes"]["emulated"]
    tail = "emulated MXFP8 available for numerics checks" if emulated["ok"] else "emulated MXFP8 unavailable"
    return f"bf16 grouped GEMM in auto mode ({tail})"
