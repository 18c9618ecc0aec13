"""Environment probes: what is installed and what the device can run, decided without running a GEMM.

Each probe returns a verdict with a plain-sentence reason when it fails. The sentences
end up in ``Resolution.reasons`` and in :class:`~mxfp8_compat.MXFP8Unavailable`. The smoke
run (:mod:`.smoke`) decides the rest; the isolated child (:mod:`.isolated`) runs both where
importing torchao might kill the interpreter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Optional

import torch

from ..numerics.highprec import grouped_mm_support

if TYPE_CHECKING:  # pragma: no cover
    from ..providers.match import BoundEntry

__all__ = [
    "TORCHAO_MODULE",
    "device_capability",
    "grouped_mm_problem",
    "installed_torchao_version",
    "import_problem",
    "native_device_problem",
    "native_kernel_problem",
    "one_line",
    "clear_caches",
]

TORCHAO_MODULE = "torchao.prototype.moe_training"


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """CUDA compute capability of ``device``, or None for a non-CUDA device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def grouped_mm_problem(device: torch.device) -> Optional[str]:
    """Why ``torch._grouped_mm`` cannot serve bf16 on ``device`` (so a loop stands in), or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm; the bf16 path runs a per-group loop of torch.mm"
    if not grouped_mm_support(device.type, torch.bfloat16)[0]:
        return (
            f"torch._grouped_mm of torch {torch.__version__} does not run bf16 on {device.type}; "
            "the bf16 path runs a per-group loop of torch.mm"
        )
    return None


def installed_torchao_version() -> Optional[str]:
    """The installed torchao's version from its metadata, read without importing it."""
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


def import_problem() -> Optional[str]:
    """Import torchao's MoE training package; any exception becomes a reason.

    Seen in the wild: ModuleNotFoundError('triton'), triton's autotune ValueError,
    RuntimeError and AttributeError from a torch/torchao build mismatch. A mismatch can
    also abort the interpreter, which no ``except`` can catch: ``resolve(isolate=True)``
    runs this probe in a subprocess first.
    """
    try:
        importlib.import_module(TORCHAO_MODULE)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure shape is a verdict
        return f"importing {TORCHAO_MODULE} raised {type(error).__name__}: {one_line(error)}"
    return None


def one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def native_device_problem(device: torch.device) -> Optional[str]:
    """Why no torchao release's native MXFP8 kernel can run on ``device``; None if one may.

    Decided from the device alone (no torchao import): a CPU, or a CUDA device whose compute
    capability is not 10.x, can never run one, so ``resolve("auto")`` needs no probe there.
    """
    if device.type != "cuda":
        return f"the native MXFP8 kernel needs a CUDA device with compute capability 10.x; device is {device}"
    capability = device_capability(device)
    if capability is None or capability[0] != 10:
        major, minor = capability or (0, 0)
        return (
            f"{device} has compute capability {major}.{minor} (sm_{major}{minor}); torchao's MXFP8 grouped GEMM "
            "kernels exist only for 10.x (sm_100/sm_103)"
        )
    return None


def native_kernel_problem(bound: BoundEntry, device: torch.device) -> Optional[str]:
    """Why the native MXFP8 kernel cannot run on ``device``, before trying it; None if it may.

    Only compute capability 10.x (sm_100 B200/GB200, sm_103) has torchao's MXFP8 grouped
    kernels; ``capability >= 10`` would wrongly admit sm_120/sm_121. Where torchao reports
    its own verdict (the row's ``native_flag``), that is read too. The smoke run
    decides the rest.
    """
    generation = bound.generation
    if not generation.native:
        return f"torchao {generation.key} has no native MXFP8 grouped GEMM: its MXFP8 path is always emulated"
    problem = native_device_problem(device)
    if problem is not None:
        return problem
    if generation.native_flag is not None:
        flag = getattr(bound.module, generation.native_flag, None)
        if flag is False:
            return (
                f"torchao reports {generation.native_flag}=False: its sm_100 kernels are not built "
                "into this install (a CUDA 12.8+ torchao build is needed)"
            )
    return None


def clear_caches() -> None:
    """Forget cached probe results (``torch._grouped_mm`` support per device and dtype)."""
    grouped_mm_support.cache_clear()
