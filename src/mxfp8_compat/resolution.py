"""resolve(): pick the fastest correct grouped GEMM here, say why, and cache the verdict.

Modes:
  ``auto``      native MXFP8 when every probe passes, else bf16 (reasons logged once).
  ``native``    native MXFP8 or :class:`MXFP8Unavailable` listing every reason.
  ``emulated``  MXFP8 numerics without the sm_100 kernel: torchao's own emulation where the
                installed generation has one (0.13, 0.16+), else mxfp8_compat's reference.
  ``off``       bf16: ``torch._grouped_mm`` itself.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args

import torch

from . import probes
from .backends import GroupedMM, log_once, make_bf16, make_mxfp8, reference_call
from .errors import MXFP8Unavailable
from .generations import Generation
from .isolation import ISOLATE_ENV_VAR, isolated_problem
from .reference import DEFAULT_SCALE_MODE, grouped_mm_support

__all__ = ["Mode", "Backend", "Resolution", "resolve", "reset", "MODE_ENV_VAR"]

Mode = Literal["auto", "native", "emulated", "off"]
Backend = Literal["mxfp8", "mxfp8-emulated", "bf16"]
MODES: tuple[str, ...] = get_args(Mode)
MODE_ENV_VAR = "MXFP8_COMPAT_MODE"


@dataclass(frozen=True)
class Resolution:
    """What ``resolve()`` chose, and why. Call it like the grouped GEMM it wraps.

    Attributes:
        fn: the grouped GEMM, ``fn(A, B, offs, *, out_dtype=torch.bfloat16)``.
        backend: ``"mxfp8"`` (native kernel), ``"mxfp8-emulated"`` or ``"bf16"``.
        generation: the adapter-table row in use, or None (no torchao, or not used).
        torchao_version: the installed torchao's version, or None.
        torch_version: ``torch.__version__``.
        device: where ``fn`` runs.
        reasons: one sentence per probe that failed or forced the choice; empty only when
            the mode's preferred path was taken.
        mode: the mode that was resolved.
        smoke_sqnr_db: output SQNR (dB) of the smoke run of the chosen MXFP8 path, if any.
        emulation: for ``mxfp8-emulated``, ``"torchao"`` or ``"reference"``.
    """

    fn: GroupedMM = field(repr=False)
    backend: Backend
    generation: Optional[Generation]
    torchao_version: Optional[str]
    torch_version: str
    device: torch.device
    reasons: tuple[str, ...]
    mode: Mode = "auto"
    smoke_sqnr_db: Optional[float] = None
    emulation: Optional[str] = None

    def __call__(
        self, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        return self.fn(A, B, offs, out_dtype=out_dtype)


_cache: dict[tuple[object, ...], Resolution] = {}
_lock = threading.Lock()


def reset() -> None:
    """Forget every cached Resolution and every once-only log (tests need a clean slate)."""
    from .backends import _logged

    global _environment_snapshot
    with _lock:
        _cache.clear()
        _logged.clear()
        _environment_snapshot = None
    probes.clear_caches()


def resolve(
    mode: Optional[str] = None,
    *,
    device: Union[str, torch.device, None] = None,
    validate: bool = False,
    wgrad_with_hp: bool = True,
    isolate: Optional[bool] = None,
) -> Resolution:
    """Resolve the grouped GEMM for ``mode`` on ``device``; cached per argument set, thread-safe.

    Args:
        mode: "auto", "native", "emulated" or "off"; None reads ``MXFP8_COMPAT_MODE``,
            else "auto". Anything else raises ValueError. The environment variables are
            read at the first resolve() of the process (and again after ``reset()``).
        device: where the callable will run. Default: the current CUDA device when CUDA
            is available, else the CPU.
        validate: also check ``offs`` values (non-decreasing, ``offs[-1] == M``, group
            alignment) on every call, which costs a device sync on a GPU.
        wgrad_with_hp: keep the weight-gradient GEMM in high precision where the torchao
            generation supports it (0.16+) and in the reference emulation. Default True:
            it avoids NaN weight gradients from saturating e8m0 scales, for the price of
            one bf16 GEMM in backward.
        isolate: import torchao and run the smoke runs in a subprocess first (a torch/torchao
            build mismatch can abort the interpreter); the verdict is cached on disk. None
            reads ``MXFP8_COMPAT_ISOLATE`` ("1" enables), likewise.

    Raises:
        ValueError: unknown ``mode``.
        MXFP8Unavailable: ``mode="native"`` (or ``"emulated"``) cannot run here.
    """
    key = (mode, device, validate, wgrad_with_hp, isolate)
    try:
        return _cache[key]
    except (KeyError, TypeError):
        pass
    with _lock:
        cached = _cache.get(key)
        if cached is None:
            environment = _environment()
            if isolate is None:
                isolate = environment[ISOLATE_ENV_VAR] == "1"
            if mode is None:
                mode = environment[MODE_ENV_VAR] or "auto"
                source = MODE_ENV_VAR
            else:
                source = "mode"
            cached = _resolve_uncached(_normalise_mode(mode, source), _normalise_device(device), validate, wgrad_with_hp, isolate)
            _cache[key] = cached
        return cached


_environment_snapshot: Optional[dict[str, str]] = None


def _environment() -> dict[str, str]:
    """MXFP8_COMPAT_MODE and MXFP8_COMPAT_ISOLATE as they were at the first resolve() (or since reset()).

    Read once rather than per call: ``os.environ`` lookups cost ~1 us each, as much as the
    whole cached ``resolve()`` may take.
    """
    global _environment_snapshot
    if _environment_snapshot is None:
        _environment_snapshot = {name: os.environ.get(name, "") for name in (MODE_ENV_VAR, ISOLATE_ENV_VAR)}
    return _environment_snapshot


def _normalise_mode(mode: object, source: str) -> Mode:
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"{source}: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode.strip().lower()  # type: ignore[return-value]


def _normalise_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch.device or device string, got {device!r} ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but this torch ({torch.__version__}) sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


@dataclass
class _Context:
    """Probe results shared by the modes of one resolution."""

    device: torch.device
    validate: bool
    wgrad_with_hp: bool
    isolate: bool = False
    torchao_version: Optional[str] = None
    match: Optional[probes.GenerationMatch] = None
    torchao_reasons: tuple[str, ...] = ()
    bf16: Optional[GroupedMM] = None
    bf16_reasons: tuple[str, ...] = ()


def _probe_torchao(ctx: _Context) -> None:
    ctx.torchao_version = probes.installed_torchao_version()
    if ctx.torchao_version is None:
        ctx.torchao_reasons = ("torchao is not installed",)
        return
    problem = None
    if ctx.isolate and "torchao.prototype.moe_training" not in sys.modules:
        problem = isolated_problem(ctx.torchao_version, ctx.device)  # a crash must not reach this process
    problem = problem or probes.import_problem()
    if problem is not None:
        ctx.torchao_reasons = (f"torchao {ctx.torchao_version} is installed but unusable: {problem}",)
        return
    ctx.match = probes.match_generation(ctx.torchao_version)
    ctx.torchao_reasons = ctx.match.reasons


def _probe_bf16(ctx: _Context) -> None:
    problem = probes.grouped_mm_problem(ctx.device)
    ctx.bf16 = make_bf16(validate=ctx.validate, use_loop=problem is not None)
    ctx.bf16_reasons = (problem,) if problem else ()


def _resolve_uncached(mode: Mode, device: torch.device, validate: bool, wgrad_with_hp: bool, isolate: bool) -> Resolution:
    ctx = _Context(device=device, validate=validate, wgrad_with_hp=wgrad_with_hp, isolate=isolate)
    _probe_bf16(ctx)
    if mode == "off":
        return _bf16_resolution(ctx, mode, ())
    _probe_torchao(ctx)
    if mode == "emulated":
        return _resolve_emulated(ctx)
    native = _try_native(ctx, shape_fallback=ctx.bf16 if mode == "auto" else None)
    if isinstance(native, Resolution):
        return native
    if mode == "native":
        raise MXFP8Unavailable(mode, native)
    resolution = _bf16_resolution(ctx, mode, native)
    log_once(f"mxfp8_compat: MXFP8 unavailable, using bf16 grouped GEMM ({'; '.join(resolution.reasons)})")
    return resolution


def _resolution(ctx: _Context, **fields: object) -> Resolution:
    """A Resolution with the fields every backend shares taken from ``ctx``."""
    return Resolution(torchao_version=ctx.torchao_version, torch_version=torch.__version__, device=ctx.device, **fields)  # type: ignore[arg-type]


def _bf16_resolution(ctx: _Context, mode: Mode, reasons: tuple[str, ...]) -> Resolution:
    assert ctx.bf16 is not None
    return _resolution(ctx, fn=ctx.bf16, backend="bf16", generation=None, reasons=reasons + ctx.bf16_reasons, mode=mode)


def _try_native(ctx: _Context, shape_fallback: Optional[GroupedMM]) -> Union[Resolution, tuple[str, ...]]:
    """The native Resolution, or every reason it is unavailable."""
    if ctx.match is None or ctx.match.bound is None:
        return ctx.torchao_reasons or ("no torchao generation matched",)
    bound = ctx.match.bound
    generation = bound.generation
    problem = probes.native_kernel_problem(bound, ctx.device)
    if problem is not None:
        return ctx.torchao_reasons + (problem,)
    notes = _wgrad_notes(generation, ctx.wgrad_with_hp)
    fn = make_mxfp8(
        bound.bind("native", ctx.wgrad_with_hp and generation.wgrad_with_hp),
        validate=ctx.validate,
        contiguous_grad=True,
        bf16_operands=True,
        group_multiple=generation.group_multiple["native"],
        shape_fallback=shape_fallback,
        label=f"torchao {generation.key} native MXFP8",
        # torch._scaled_grouped_mm emits bf16 only ("Only bf16 high precision output types are
        # supported for grouped gemm"): float32 output is the bf16 output upcast.
        float32_out=False,
    )
    smoke = probes.smoke_run(fn, ctx.device)
    if smoke.problem is not None:
        return ctx.torchao_reasons + (f"native MXFP8 of torchao {generation.key} failed its smoke run: {smoke.problem}",)
    return _resolution(
        ctx,
        fn=fn,
        backend="mxfp8",
        generation=generation,
        reasons=ctx.torchao_reasons + notes,
        mode="native" if shape_fallback is None else "auto",
        smoke_sqnr_db=smoke.sqnr_out_db,
    )


def _wgrad_notes(generation: Generation, wgrad_with_hp: bool) -> tuple[str, ...]:
    if wgrad_with_hp and not generation.wgrad_with_hp:
        return (
            f"torchao {generation.key} cannot keep the weight-gradient GEMM in high precision "
            "(wgrad_with_hp needs 0.16+): weight gradients are MXFP8",
        )
    return ()


def _resolve_emulated(ctx: _Context) -> Resolution:
    reasons: list[str] = list(ctx.torchao_reasons)
    bound = ctx.match.bound if ctx.match else None
    scale_mode = DEFAULT_SCALE_MODE
    if bound is not None:
        generation = bound.generation
        scale_mode = generation.scale_mode
        if generation.emulation == "torchao":
            fn = make_mxfp8(
                bound.bind("emulated", ctx.wgrad_with_hp and generation.wgrad_with_hp),
                validate=ctx.validate,
                contiguous_grad=True,
                bf16_operands=True,
                group_multiple=generation.group_multiple["emulated"],
                shape_fallback=None,
                label=f"torchao {generation.key} emulated MXFP8",
                float32_out=grouped_mm_support(ctx.device.type, torch.bfloat16)[1],
            )
            smoke = probes.smoke_run(fn, ctx.device)
            if smoke.problem is None:
                return _resolution(
                    ctx,
                    fn=fn,
                    backend="mxfp8-emulated",
                    generation=generation,
                    reasons=tuple(reasons) + _wgrad_notes(generation, ctx.wgrad_with_hp),
                    mode="emulated",
                    smoke_sqnr_db=smoke.sqnr_out_db,
                    emulation="torchao",
                )
            reasons.append(f"torchao {generation.key}'s emulated MXFP8 failed its smoke run: {smoke.problem}")
        else:
            reasons.append(
                f"torchao {generation.key} has no emulated MXFP8 path (its forward always runs sm_100 kernels)"
            )
    reasons.append(f"using mxfp8_compat's reference MXFP8 emulation ({scale_mode.value.upper()} scales)")
    fn = make_mxfp8(
        reference_call(scale_mode, ctx.wgrad_with_hp),
        validate=ctx.validate,
        contiguous_grad=False,
        group_multiple=1,
        shape_fallback=None,
        label="reference emulated MXFP8",
    )
    smoke = probes.smoke_run(fn, ctx.device)
    if smoke.problem is not None:
        raise MXFP8Unavailable("emulated", tuple(reasons) + (f"the reference emulation failed its smoke run: {smoke.problem}",))
    resolution = _resolution(
        ctx,
        fn=fn,
        backend="mxfp8-emulated",
        generation=bound.generation if bound else None,
        reasons=tuple(reasons) + ctx.bf16_reasons,
        mode="emulated",
        smoke_sqnr_db=smoke.sqnr_out_db,
        emulation="reference",
    )
    log_once(f"mxfp8_compat: emulated MXFP8 runs on the reference emulation ({'; '.join(resolution.reasons)})")
    return resolution
