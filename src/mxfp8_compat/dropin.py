"""select_grouped_mm(): the one-line drop-in for MoE code that already calls torch._grouped_mm.

It mirrors ``select_grouped_mm(use_mxfp8)`` of NeMo Automodel's
``nemo_automodel/components/moe/mxfp8.py`` (the seed), so that a user who switches sees what
the seed shows where the seed is right: the same one-time warnings, word for word (filters
keyed on them keep matching; the fallback's reasons are appended), any truthy flag, and no
torchao import where no native kernel can run (``resolve("auto")`` decides from the device).
"""

from __future__ import annotations

import threading
import warnings

import torch

from .contract import GroupedMM
from .resolution import _fallback_log, on_reset, resolve

__all__ = ["select_grouped_mm", "forget_warning", "ACTIVE_MESSAGE", "FALLBACK_MESSAGE"]

#: The seed's one-time confirmation that native MXFP8 engaged (what follows it names the row).
ACTIVE_MESSAGE = (
    "experts='torch_mm_mxfp8': MXFP8 grouped GEMM active "
    "(routing expert GEMMs through torchao.prototype.moe_training)."
)
#: The seed's one-time fallback warning; " Reasons: ..." (``resolve("auto").reasons``) follows it.
FALLBACK_MESSAGE = (
    "experts='torch_mm_mxfp8' requested but MXFP8 grouped GEMM is unavailable "
    "(requires CUDA compute capability >= 10 and an importable "
    "torchao.prototype.moe_training; note torchao may be absent from the base "
    "image). Falling back to torch._grouped_mm."
)

_warned = False
_announced = False
_warn_lock = threading.Lock()


@on_reset
def forget_warning() -> None:
    """Let the next ``select_grouped_mm(True)`` warn (or announce) again (``reset()`` calls this)."""
    global _warned, _announced
    with _warn_lock:
        _warned = _announced = False


def select_grouped_mm(use_mxfp8: object) -> GroupedMM:
    """The grouped GEMM to call: native MXFP8 when requested and usable, else ``torch._grouped_mm``.

    ``use_mxfp8`` is read for its truth value, as the seed reads it (``np.bool_``, 0/1 and
    one-element tensors work); a string is refused with TypeError, since ``"false"`` is truthy.
    When True, the first call per process warns once (UserWarning, the seed's words): that
    MXFP8 is active, or that it is unavailable, with the reasons of ``resolve("auto")``
    appended; that warning is the fallback's one message (nothing else is logged). On a
    device that can never run native MXFP8 (a CPU, CUDA below capability 10) the answer comes
    without importing torchao. With a false flag this returns ``torch._grouped_mm`` itself.
    """
    global _warned, _announced
    if isinstance(use_mxfp8, (str, bytes)):
        raise TypeError(
            f"use_mxfp8: expected a bool (or anything with a truth value but a string), got {use_mxfp8!r}"
        )
    try:
        wanted = bool(use_mxfp8)
    except Exception as error:  # noqa: BLE001 - e.g. a many-element tensor: ambiguous
        raise TypeError(f"use_mxfp8: expected a bool, got {type(use_mxfp8).__name__} without a truth value ({error})") from None
    if not wanted:
        return torch._grouped_mm  # type: ignore[return-value]
    token = _fallback_log.set(False)
    try:
        resolution = resolve("auto")
    finally:
        _fallback_log.reset(token)
    if resolution.backend == "mxfp8":
        with _warn_lock:
            announce, _announced = not _announced, True
        if announce:
            generation = resolution.generation.key if resolution.generation is not None else "?"
            warnings.warn(
                f"{ACTIVE_MESSAGE} [mxfp8_compat: torchao {resolution.torchao_version}, row {generation}]",
                UserWarning,
                stacklevel=2,
            )
        return resolution.fn
    with _warn_lock:
        warn, _warned = not _warned, True
    if warn:
        warnings.warn(f"{FALLBACK_MESSAGE} Reasons: {'; '.join(resolution.reasons)}", UserWarning, stacklevel=2)
    return torch._grouped_mm  # type: ignore[return-value]
