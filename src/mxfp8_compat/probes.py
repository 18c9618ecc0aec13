"""Probes: what is usable on this machine, decided by trying it, never by guessing.

Each probe returns a verdict with a plain-sentence reason when it fails. The sentences
end up in ``Resolution.reasons`` and in :class:`~mxfp8_compat.MXFP8Unavailable`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from packaging.version import InvalidVersion, Version

from .generations import GENERATIONS, Generation, GroupedMMCall, Kernel, entry_signature_params
from .layout import weight_relayout
from .highprec import grouped_mm_support
from .metrics import float64_forward_backward, forward_backward, sqnr_db
from .quantize import ScaleMode
from .reference import mxfp8_grouped_mm_reference

__all__ = [
    "SMOKE_MIN_SQNR_DB",
    "SMOKE_MIN_MATCH_DB",
    "SMOKE_GROUP_ROWS",
    "BoundEntry",
    "GenerationMatch",
    "SmokeResult",
    "device_capability",
    "grouped_mm_problem",
    "installed_torchao_version",
    "import_problem",
    "match_generation",
    "native_device_problem",
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
    its own verdict (``_SM100_KERNELS_AVAILABLE``, 0.16+), that is read too. The smoke run
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


@dataclass(frozen=True)
class SmokeResult:
    """How a tiny run of a candidate path compared, and the verdict.

    SQNRs (dB) are against float64 (``sqnr_*``) and against the reference MXFP8 emulation
    with the path's scale rule (``match_*``); ``problem`` is None when the path passed.
    """

    sqnr_out_db: float
    sqnr_grad_a_db: float
    sqnr_grad_b_db: float
    problem: Optional[str]
    match_out_db: float = float("nan")
    match_grad_a_db: float = float("nan")
    match_grad_b_db: float = float("nan")


#: Group sizes of the smoke problem: an empty group and sizes no kernel alignment divides,
#: so the run goes through the padding a real MoE call needs.
SMOKE_GROUP_ROWS = (40, 0, 88, 1)
SMOKE_K = SMOKE_N = 128  # the largest K/N multiple any kernel asks for (0.18+ native: 128)
#: A native kernel accumulates in its own order: its result must still sit this close to the
#: reference MXFP8 emulation (bf16 rounding is ~50 dB; MXFP8 vs float64 is ~28 dB).
SMOKE_MIN_MATCH_DB = 40.0


def smoke_run(
    fn: Callable[..., torch.Tensor],
    device: torch.device,
    *,
    scale_mode: ScaleMode,
    wgrad_with_hp: bool,
    exact: bool,
    min_sqnr_db: float = SMOKE_MIN_SQNR_DB,
) -> SmokeResult:
    """Run ``fn(A, B, offs)`` forward and backward on a tiny random problem; is it MXFP8?

    The verdict needs all of: no exception; the output's shape and dtype (A's dtype by
    default, float32 when asked); both gradients present, finite and of the right shape;
    output and gradients recognisably MXFP8 with ``scale_mode`` -- bitwise the reference
    emulation's output when ``exact`` (emulated paths), else within ``SMOKE_MIN_MATCH_DB``
    of it, and closer to it than to unquantised bf16 -- and within ``min_sqnr_db`` of
    float64. No quantisation, FP8 row-wise scales, the other scale rule or an ignored
    ``out_dtype`` each fail it. Inputs are seeded (a verdict is repeatable) and made on the
    CPU; the run ignores the caller's grad mode, default device and default dtype.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _smoke_run(fn, device, scale_mode, wgrad_with_hp, exact, min_sqnr_db)


def _smoke_run(
    fn: Callable[..., torch.Tensor],
    device: torch.device,
    scale_mode: ScaleMode,
    wgrad_with_hp: bool,
    exact: bool,
    min_sqnr_db: float,
) -> SmokeResult:
    nan = float("nan")
    cpu = torch.device("cpu")
    generator = torch.Generator(device=cpu).manual_seed(20261126)
    rows, experts = sum(SMOKE_GROUP_ROWS), len(SMOKE_GROUP_ROWS)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32, device=cpu).to(device=device, dtype=torch.bfloat16)

    try:
        A0 = randn(rows, SMOKE_K)
        B0 = weight_relayout(randn(experts, SMOKE_K, SMOKE_N))
        grad_out = randn(rows, SMOKE_N)
        offs = torch.tensor(SMOKE_GROUP_ROWS, dtype=torch.int64, device=cpu).cumsum(0).to(device=device, dtype=torch.int32)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - no driver, no memory: the device cannot hold the inputs
        return SmokeResult(nan, nan, nan, f"smoke run could not place its inputs on {device}: {type(error).__name__}: {_one_line(error)}")
    A = A0.clone().requires_grad_(True)
    B = B0.clone().requires_grad_(True)
    try:
        out = fn(A, B, offs)
        out.backward(grad_out)
        with _no_upcast_note():
            out32 = fn(A0, B0, offs, out_dtype=torch.float32)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure shape is a verdict
        return SmokeResult(nan, nan, nan, f"smoke run raised {type(error).__name__}: {_one_line(error)}")

    def failed(problem: str, *sqnrs: float) -> SmokeResult:
        return SmokeResult(*(sqnrs or (nan, nan, nan)), problem)  # type: ignore[arg-type]

    expected = (rows, SMOKE_N)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        return failed(f"smoke run returned {_describe(out)}, expected a tensor of shape {expected}")
    if out.dtype is not torch.bfloat16:
        return failed(f"smoke run returned {out.dtype} for bfloat16 inputs, expected torch.bfloat16")
    if not isinstance(out32, torch.Tensor) or out32.dtype is not torch.float32:
        return failed(f"smoke run with out_dtype=torch.float32 returned {_describe(out32)}, expected torch.float32")
    for name, leaf in (("A", A), ("B", B)):
        if leaf.grad is None:
            return failed(f"smoke run produced no gradient for {name}")
        if tuple(leaf.grad.shape) != tuple(leaf.shape) or not bool(torch.isfinite(leaf.grad).all()):
            return failed(f"smoke run produced a non-finite or misshapen gradient for {name}")
    if not bool(torch.isfinite(out).all()):
        return failed("smoke run produced a non-finite output")

    truth = float64_forward_backward(A0, B0, offs, grad_out)
    actual = (out, A.grad, B.grad)
    sqnrs = tuple(sqnr_db(t, a) for t, a in zip(truth, actual))
    reference = forward_backward(
        lambda A_, B_, o: mxfp8_grouped_mm_reference(A_, B_, o, torch.bfloat16, scale_mode, wgrad_with_hp),
        A0, B0, offs, grad_out,
    )
    ref_out = reference[0]
    matches = tuple(sqnr_db(r, a) for r, a in zip(reference, actual))
    bf16_out = truth[0].to(torch.bfloat16)
    names = ("output", "grad A", "grad B")

    def result(problem: Optional[str]) -> SmokeResult:
        return SmokeResult(*sqnrs, problem, *matches)

    shown = ", ".join(f"{name} {value:.1f} dB" for name, value in zip(names, sqnrs))
    if not all(value >= min_sqnr_db for value in sqnrs):
        return result(f"smoke run failed the {min_sqnr_db:.0f} dB SQNR check against float64 ({shown})")
    rule = f"MXFP8 with {scale_mode.value.upper()} scales"
    if exact and not torch.equal(out, ref_out):
        return result(
            f"smoke run output is not bitwise the reference emulation ({rule}): {matches[0]:.1f} dB from it"
        )
    close = ", ".join(f"{name} {value:.1f} dB" for name, value in zip(names, matches))
    if not all(value >= SMOKE_MIN_MATCH_DB for value in matches):
        return result(f"smoke run is not recognisably {rule}: SQNR against the reference emulation {close} (needs {SMOKE_MIN_MATCH_DB:.0f})")
    to_bf16 = sqnr_db(bf16_out, out)
    if not matches[0] > to_bf16:
        return result(
            f"smoke run output is closer to unquantised bf16 ({to_bf16:.1f} dB) than to {rule} ({matches[0]:.1f} dB)"
        )
    return result(None)


_UPCAST_NOTE = "cannot emit float32 on"


class _DropUpcastNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _UPCAST_NOTE not in record.getMessage()


@contextmanager
def _no_upcast_note() -> Iterator[None]:
    """The smoke run's own float32 call logs no "cannot emit float32" note: nobody asked for float32.

    The note stays due: the first float32 call a user makes still logs it once.
    """
    from . import backends

    before = set(backends._logged)
    note_filter = _DropUpcastNote()
    backends.logger.addFilter(note_filter)
    try:
        yield
    finally:
        backends.logger.removeFilter(note_filter)
        backends._logged.difference_update({m for m in backends._logged - before if _UPCAST_NOTE in m})


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def clear_caches() -> None:
    """Forget cached probe results (``torch._grouped_mm`` support per device and dtype)."""
    grouped_mm_support.cache_clear()
