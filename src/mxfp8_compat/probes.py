"""Probes: what is usable on this machine, decided by trying it, never by guessing.

Each probe returns a verdict with a plain-sentence reason when it fails. The sentences
end up in ``Resolution.reasons`` and in :class:`~mxfp8_compat.MXFP8Unavailable`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from packaging.version import InvalidVersion, Version

from .generations import GENERATIONS, Generation, GroupedMMCall, Kernel, entry_signature_params
from .layout import weight_relayout
from .reference import grouped_mm_float64, grouped_mm_support, sqnr_db

__all__ = [
    "SMOKE_MIN_SQNR_DB",
    "BoundEntry",
    "GenerationMatch",
    "SmokeResult",
    "device_capability",
    "grouped_mm_problem",
    "installed_torchao_version",
    "import_problem",
    "match_generation",
    "native_kernel_problem",
    "smoke_run",
    "clear_caches",
]

SMOKE_MIN_SQNR_DB = 20.0
_TORCHAO_MODULE = "torchao.prototype.moe_training"


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
        importlib.import_module(_TORCHAO_MODULE)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure shape is a verdict
        return f"importing {_TORCHAO_MODULE} raised {type(error).__name__}: {_one_line(error)}"
    return None


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class BoundEntry:
    """A generation row together with the torchao callable it was matched to."""

    generation: Generation
    entry: Callable[..., Any]
    location: str  # "module.attribute"
    module: Any

    def bind(self, kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
        return self.generation.bind(self.entry, kernel, wgrad_with_hp)


@dataclass(frozen=True)
class GenerationMatch:
    """Outcome of matching the installed torchao against the adapter table."""

    bound: Optional[BoundEntry]
    reasons: tuple[str, ...]  # failures, and how a row was chosen when not by version


def _locate(generation: Generation) -> tuple[Optional[BoundEntry], list[str]]:
    problems: list[str] = []
    for module_name, attribute in generation.entry_points:
        location = f"{module_name}.{attribute}"
        try:
            module = importlib.import_module(module_name)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001
            problems.append(f"{module_name} does not import ({type(error).__name__})")
            continue
        entry = getattr(module, attribute, None)
        if entry is None:
            problems.append(f"{location} is missing")
            continue
        try:
            params = entry_signature_params(entry, generation.via_autograd_function)
        except (TypeError, ValueError) as error:
            problems.append(f"{location} has no readable signature ({_one_line(error)})")
            continue
        mismatch = generation.fingerprint_mismatch(params)
        if mismatch:
            problems.append(f"{location}: {mismatch}")
            continue
        owner = sys.modules.get(getattr(entry, "__module__", "") or "", module)
        return BoundEntry(generation, entry, location, owner), problems
    return None, problems


def match_generation(version: str, table: tuple[Generation, ...] = GENERATIONS) -> GenerationMatch:
    """Find the adapter row for torchao ``version`` and check its entry's signature.

    A version inside a row's range must pass that row's fingerprint. A version newer than
    every row (a nightly, the next release) is matched by fingerprint, newest row first.
    """
    try:
        parsed = Version(version)
    except InvalidVersion:
        return GenerationMatch(None, (f"torchao version {version!r} is not a valid version string",))
    release = Version(parsed.base_version)
    in_range = [row for row in table if row.versions.contains(parsed, prereleases=True)]
    oldest = min(table, key=lambda row: _lowest(row))
    newest = max(table, key=lambda row: _lowest(row))
    if in_range:
        candidates, how = in_range, None
    elif release < _lowest(oldest):
        return GenerationMatch(
            None,
            (f"torchao {version} is older than the oldest supported generation ({oldest.key}: {oldest.versions}); "
             "it has no MXFP8 grouped GEMM",),
        )
    elif release >= _lowest(newest):
        candidates = list(table)
        how = f"torchao {version} is newer than the adapter table (newest row {newest.key}); matched by signature fingerprint"
    else:
        candidates = list(table)
        how = f"torchao {version} falls between the adapter table's rows; matched by signature fingerprint"
    reasons: list[str] = []
    for row in candidates:
        bound, problems = _locate(row)
        if bound is not None:
            if how:
                reasons.append(f"{how}: row {row.key} ({bound.location})")
            return GenerationMatch(bound, tuple(reasons))
        reasons.append(f"generation {row.key} does not fit torchao {version}: " + "; ".join(problems))
    return GenerationMatch(None, tuple(reasons))


def _lowest(row: Generation) -> Version:
    bounds = [Version(spec.version) for spec in row.versions if spec.operator in (">=", "==", "~=")]
    return Version(min(bounds).base_version)


def native_kernel_problem(bound: BoundEntry, device: torch.device) -> Optional[str]:
    """Why the native MXFP8 kernel cannot run on ``device``, before trying it; None if it may.

    Only compute capability 10.x (sm_100 B200/GB200, sm_103) has torchao's MXFP8 grouped
    kernels; ``capability >= 10`` would wrongly admit sm_120/sm_121. Where torchao reports
    its own verdict (``_SM100_KERNELS_AVAILABLE``, 0.16+), that is read too. The smoke run
    decides the rest.
    """
    generation = bound.generation
    if not generation.native:
        return f"torchao {generation.key} has no native MXFP8 grouped GEMM: its MXFP8 path is always emulated"
    if device.type != "cuda":
        return f"the native MXFP8 kernel needs a CUDA device with compute capability 10.x; device is {device}"
    capability = device_capability(device)
    if capability is None or capability[0] != 10:
        major, minor = capability or (0, 0)
        return (
            f"{device} has compute capability {major}.{minor} (sm_{major}{minor}); torchao's MXFP8 grouped GEMM "
            "kernels exist only for 10.x (sm_100/sm_103)"
        )
    if generation.native_flag is not None:
        flag = getattr(bound.module, generation.native_flag, None)
        if flag is False:
            return (
                f"torchao reports {generation.native_flag}=False: its sm_100 kernels are not built "
                "into this install (a CUDA 12.8+ torchao build is needed)"
            )
    return None


@dataclass(frozen=True)
class SmokeResult:
    """SQNRs of a tiny run against the high-precision reference, and the verdict."""

    sqnr_out_db: float
    sqnr_grad_a_db: float
    sqnr_grad_b_db: float
    problem: Optional[str]


def smoke_run(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    experts: int = 2,
    group_rows: int = 128,
    # 128, not less: 0.18+'s native forward quantises A and the output gradient with a CuTeDSL
    # kernel that asserts M, K (and so N) % 128 == 0 (tests/test_wheel_conformance.py).
    k: int = 128,
    n: int = 128,
    min_sqnr_db: float = SMOKE_MIN_SQNR_DB,
) -> SmokeResult:
    """Run ``fn(A, B, offs)`` forward and backward on a tiny random problem and judge it.

    Inputs are bf16 random normal (seeded, so a verdict is repeatable), B in the
    per-group column-major layout. Output and both gradients must be finite and within
    ``min_sqnr_db`` of a float64 reference; any exception is a failure.
    """
    generator = torch.Generator().manual_seed(20261125)
    A = torch.randn(experts * group_rows, k, generator=generator).to(device=device, dtype=torch.bfloat16)
    B = weight_relayout(torch.randn(experts, k, n, generator=generator).to(device=device, dtype=torch.bfloat16))
    grad_out = torch.randn(experts * group_rows, n, generator=generator).to(device=device, dtype=torch.bfloat16)
    offs = torch.arange(1, experts + 1, dtype=torch.int32, device=device) * group_rows
    A.requires_grad_(True)
    B.requires_grad_(True)
    nan = float("nan")
    try:
        out = fn(A, B, offs)
        out.backward(grad_out)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001
        return SmokeResult(nan, nan, nan, f"smoke run raised {type(error).__name__}: {_one_line(error)}")
    A64 = A.detach().double().requires_grad_(True)
    B64 = B.detach().double().requires_grad_(True)
    ref = grouped_mm_float64(A64, B64, offs)
    ref.backward(grad_out.double())
    sqnrs = (sqnr_db(ref, out), sqnr_db(A64.grad, A.grad), sqnr_db(B64.grad, B.grad))
    bad = [name for name, value in zip(("output", "grad A", "grad B"), sqnrs) if not value >= min_sqnr_db]
    problem = None
    if tuple(out.shape) != tuple(ref.shape):
        problem = f"smoke run returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    elif bad:
        shown = ", ".join(f"{name} {value:.1f} dB" for name, value in zip(("output", "grad A", "grad B"), sqnrs))
        problem = f"smoke run failed the {min_sqnr_db:.0f} dB SQNR check against float64 ({shown})"
    return SmokeResult(*sqnrs, problem)


def clear_caches() -> None:
    """Forget cached probe results (``torch._grouped_mm`` support per device and dtype)."""
    grouped_mm_support.cache_clear()
