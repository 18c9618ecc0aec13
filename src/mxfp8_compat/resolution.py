"""resolve(): pick the fastest correct grouped GEMM here, say why, and cache the verdict.

Modes:
  ``auto``      native MXFP8 when every probe passes, else bf16 (reasons logged once).
  ``native``    native MXFP8 or :class:`MXFP8Unavailable` listing every reason.
  ``emulated``  MXFP8 numerics without the sm_100 kernel: torchao's own emulation where the
                installed generation has one (its row's ``emulation``), else mxfp8_compat's reference.
  ``off``       bf16: ``torch._grouped_mm`` itself.

Native MXFP8 has two providers: torchao's native path, and torch's own MXFP8 grouped GEMM fed by
mxfp8_compat's quantisers (:mod:`mxfp8_compat.backends.torch_native`). ``provider`` picks one; by default
``auto`` and ``native`` take torchao's when it passes its probes, else torch's.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union, get_args

import torch

from .backends.fast_emulation import fast_call, fast_emulation_problem
from .backends.grouped_mm import clear_log_once, log_once, make_bf16, make_mxfp8, reference_emulation
from .backends.torchao_paths import smoke_torchao_path
from .contract import GroupedMM
from .errors import MXFP8Unavailable
from .numerics.quantize import DEFAULT_SCALE_MODE, ScaleMode
from .probes import environment, smoke as smoke_probe
from .probes.isolated import ISOLATE_ENV_VAR, forget_session_verdicts, isolated_problem, isolation_requested
from .providers import match as matching
from .providers.schema import Generation

__all__ = [
    "Mode",
    "Backend",
    "Resolution",
    "resolve",
    "reset",
    "normalise_mode",
    "normalise_device",
    "normalise_provider",
    "MODE_ENV_VAR",
    "PROVIDER_ENV_VAR",
    "PROVIDERS",
    "on_reset",
]

Mode = Literal["auto", "native", "emulated", "off"]
Backend = Literal["mxfp8", "mxfp8-emulated", "bf16"]
MODES: tuple[str, ...] = get_args(Mode)
MODE_ENV_VAR = "MXFP8_COMPAT_MODE"
PROVIDER_ENV_VAR = "MXFP8_COMPAT_PROVIDER"
#: Who supplies the native MXFP8 kernel: torchao's native path, or torch's own grouped GEMM.
PROVIDERS: tuple[str, ...] = ("torchao", "torch")


@dataclass(frozen=True)
class Resolution:
    """What ``resolve()`` chose, and why. Call it like the grouped GEMM it wraps.

    Attributes:
        fn: the grouped GEMM, ``fn(A, B, offs, *, out_dtype=None, bias=None, groups_aligned=False)``.
        backend: ``"mxfp8"`` (native kernel), ``"mxfp8-emulated"`` or ``"bf16"``.
        generation: the adapter-table row in use, or None (no torchao, or not used).
        torchao_version: the installed torchao's version, or None.
        torch_version: ``torch.__version__``.
        device: where ``fn`` runs.
        reasons: one sentence per probe that failed or forced the choice; empty only when
            the mode's preferred path was taken.
        mode: the mode that was resolved.
        smoke_sqnr_db: output SQNR (dB) of the smoke run of the chosen MXFP8 path, if any.
        emulation: for ``mxfp8-emulated``, ``"fast"`` (mxfp8_compat's Triton quantisers, CUDA), ``"torchao"`` or
            ``"reference"``.
        group_alignment: the multiple of rows every token group (and M) needs for ``fn`` to
            pad nothing: 1 for bf16 and the reference, 32 for torchao's MXFP8 paths, 128
            where a row's native kernel asks it (its ``group_multiple``). Any group sizes work; a dispatcher that pads to this
            while it permutes tokens anyway passes ``groups_aligned=True`` and saves a pass.
        provider: whose native MXFP8 kernel runs, ``"torchao"`` or ``"torch"``; None when none
            does (bf16, emulation).
        request: the normalised ``resolve()`` arguments that produced it. A Resolution
            pickles as this request (functions and kernels do not pickle): unpickling, in a
            spawned worker or by ``torch.load``, resolves again in the receiving process.
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
    group_alignment: int = 1
    provider: Optional[str] = None
    request: tuple[object, ...] = field(default=(), repr=False, compare=False)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        if not self.request:
            raise TypeError("this Resolution was not made by resolve(): nothing to re-resolve when unpickled")
        mode, device, validate, wgrad_with_hp, isolate, provider = self.request
        return (_resolve_unpickled, (mode, str(device), validate, wgrad_with_hp, isolate, provider))

    def __call__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        offs: torch.Tensor,
        *,
        out_dtype: Optional[torch.dtype] = None,
        bias: Optional[torch.Tensor] = None,
        groups_aligned: bool = False,
    ) -> torch.Tensor:
        return self.fn(A, B, offs, out_dtype=out_dtype, bias=bias, groups_aligned=groups_aligned)


# Two kinds of keys map to the same Resolution: the arguments exactly as passed (the fast path:
# one tuple and one dict lookup) and their normalised form (mode lower-cased, device a
# torch.device, isolate resolved), so that "cpu" and torch.device("cpu"), or "EMULATED" and
# "emulated", share one resolution and one set of probe runs.
_cache: dict[tuple[object, ...], Resolution] = {}
# One lock per normalised key, so that resolves of different keys never wait for each other
# (a probe can run for minutes in an isolated child) while concurrent resolves of the same
# key run the probes once. ``_key_locks_guard`` only guards the dict of locks.
_key_locks: dict[tuple[object, ...], threading.Lock] = {}
_key_locks_guard = threading.Lock()
# Bumped by reset(): a resolve that started before a reset does not store into the new cache.
_epoch = 0


def reset() -> None:
    """Forget every cached Resolution, every once-only log and warning (tests need a clean slate)."""
    global _environment_snapshot, _epoch
    with _key_locks_guard:
        _epoch += 1
        _cache.clear()
        _key_locks.clear()
        _environment_snapshot = None
    for hook in tuple(_reset_hooks):
        hook()


#: What reset() clears besides the cache, in order. A module that keeps once-per-process state
#: registers its own hook (:func:`on_reset`) rather than being imported by this one.
_reset_hooks: list[Callable[[], None]] = [clear_log_once, forget_session_verdicts, environment.clear_caches]


def on_reset(hook: Callable[[], None]) -> Callable[[], None]:
    """Have ``reset()`` call ``hook()`` too (once per registration); returns ``hook``."""
    if hook not in _reset_hooks:
        _reset_hooks.append(hook)
    return hook


def resolve(
    mode: Optional[str] = None,
    *,
    device: Union[str, torch.device, None] = None,
    validate: bool = False,
    wgrad_with_hp: bool = True,
    isolate: Optional[bool] = None,
    provider: Optional[str] = None,
) -> Resolution:
    """Resolve the grouped GEMM for ``mode`` on ``device``; cached per argument set, thread-safe.

    Args:
        mode: "auto", "native", "emulated" or "off" (any case); None reads
            ``MXFP8_COMPAT_MODE``, else "auto". Anything else raises ValueError. The
            environment variables are read at the first resolve() of the process (and again
            after ``reset()``).
        device: where the callable will run. Default: the current CUDA device when CUDA
            is available, else the CPU.
        validate: also check ``offs`` values (non-decreasing, ``offs[-1] == M``, group
            alignment) on every call, which costs a device sync on a GPU.
        wgrad_with_hp: keep the weight-gradient GEMM in high precision where the torchao
            generation supports it (its row's ``wgrad_with_hp``) and in the reference emulation. Default True:
            it avoids NaN weight gradients from saturating e8m0 scales, for the price of
            one bf16 GEMM in backward.
        isolate: import torchao and run the smoke runs in a subprocess first (a torch/torchao
            build mismatch can abort the interpreter); the verdict is cached on disk. None
            reads ``MXFP8_COMPAT_ISOLATE`` (1/true/yes/on enable, 0/false/no/off or unset
            do not, any case; anything else raises ValueError), likewise.
        provider: the native MXFP8 kernel's provider in modes "auto" and "native": "torchao"
            (its native path) or "torch" (torch's own grouped GEMM, mxfp8_compat's quantisers).
            None reads ``MXFP8_COMPAT_PROVIDER``, else takes torchao's when it passes its probes,
            else torch's. "emulated" and "off" do not depend on it.

    Arguments that mean the same (``"cpu"`` and ``torch.device("cpu")``, ``"EMULATED"`` and
    ``"emulated"``) share one cached Resolution.

    Raises:
        ValueError: unknown ``mode``, ``device`` or ``provider``.
        MXFP8Unavailable: ``mode="native"`` (or ``"emulated"``) cannot run here.
    """
    key = (mode, device, validate, wgrad_with_hp, isolate, provider)
    try:
        return _cache[key]
    except (KeyError, TypeError):  # TypeError: an unhashable argument, rejected below
        pass
    return _resolve_slow(key, mode, device, validate, wgrad_with_hp, isolate, provider)


def _resolve_unpickled(
    mode: str, device: str, validate: bool, wgrad_with_hp: bool, isolate: bool, provider: Optional[str] = None
) -> Resolution:
    """Unpickling a Resolution: resolve the same request in this process."""
    return resolve(mode, device=device, validate=validate, wgrad_with_hp=wgrad_with_hp, isolate=isolate, provider=provider)


def _compiler_disabled(fn: Callable[..., Resolution]) -> Callable[..., Resolution]:
    """``torch.compiler.disable(fn)``, made at the first call after torch._dynamo is imported.

    Decorating at import would import torch._dynamo, seconds of a cold start that no resolve()
    outside torch.compile needs; and nothing can trace a call before torch._dynamo is imported.
    """
    disabled: Optional[Callable[..., Resolution]] = None

    @functools.wraps(fn)
    def call(*args: object) -> Resolution:
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args)
            disabled = torch.compiler.disable(fn)
        return disabled(*args)

    return call


# torch.compile cannot trace the probes (locks, subprocesses, real kernel runs): a first
# resolve() inside a compiled function runs eagerly, as a graph break; cached ones are a lookup.
@_compiler_disabled
def _resolve_slow(
    key: tuple[object, ...],
    mode: Optional[str],
    device: Union[str, torch.device, None],
    validate: bool,
    wgrad_with_hp: bool,
    isolate: Optional[bool],
    provider: Optional[str] = None,
) -> Resolution:
    """Normalise the arguments, then resolve once per normalised key (one lock per key)."""
    environment = _environment()
    if mode is None:
        mode, source = environment[MODE_ENV_VAR] or "auto", MODE_ENV_VAR
    else:
        source = "mode"
    normal_mode = normalise_mode(mode, source)
    normal_device = normalise_device(device)
    normal_isolate = isolation_requested(environment[ISOLATE_ENV_VAR]) if isolate is None else bool(isolate)
    if provider is None:
        normal_provider = normalise_provider(environment[PROVIDER_ENV_VAR] or None, PROVIDER_ENV_VAR)
    else:
        normal_provider = normalise_provider(provider)
    normal_key = (normal_mode, normal_device, bool(validate), bool(wgrad_with_hp), normal_isolate, normal_provider)
    with _key_locks_guard:
        epoch = _epoch
        lock = _key_locks.setdefault(normal_key, threading.Lock())
    with lock:
        resolution = _cache.get(normal_key)
        if resolution is None:
            resolution = dataclasses.replace(_in_a_thread_of_its_own(_resolve_uncached, *normal_key), request=normal_key)
        with _key_locks_guard:
            if epoch == _epoch:  # not reset() meanwhile
                _cache[normal_key] = resolution
                try:
                    _cache[key] = resolution
                except TypeError:  # an unhashable argument that still normalised (e.g. a list-like device)
                    pass
    return resolution


def _in_a_thread_of_its_own(fn: Callable[..., Resolution], *args: object) -> Resolution:
    """``fn(*args)`` run in a new thread; its result returned, its exception raised here.

    The probes run small forward and backward passes. The caller may be inside torch state
    that is thread-local and would capture them: a non-reentrant activation checkpoint's
    saved-tensor hooks (the smoke run's backward would recompute the caller's checkpointed
    region, which resolves again and waits on the lock held here: a hang), ``no_grad`` or
    ``inference_mode``, a TorchFunction or TorchDispatch mode (a default device, FakeTensorMode).
    A new thread starts with none of them; context variables are carried over. Only a first
    resolve() per argument set pays for the thread (~0.1 ms).
    """
    context = contextvars.copy_context()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = context.run(fn, *args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="mxfp8_compat-resolve", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


_environment_snapshot: Optional[dict[str, str]] = None


def _environment() -> dict[str, str]:
    """MXFP8_COMPAT_MODE and MXFP8_COMPAT_ISOLATE as they were at the first resolve() (or since reset()).

    Read once rather than per call: ``os.environ`` lookups cost ~1 us each, as much as the
    whole cached ``resolve()`` may take.
    """
    global _environment_snapshot
    if _environment_snapshot is None:
        _environment_snapshot = {name: os.environ.get(name, "") for name in (MODE_ENV_VAR, ISOLATE_ENV_VAR, PROVIDER_ENV_VAR)}
    return _environment_snapshot


def normalise_mode(mode: object, source: str = "mode") -> Mode:
    """``mode`` lower-cased and stripped, or ValueError naming ``source``."""
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"{source}: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode.strip().lower()  # type: ignore[return-value]


def normalise_provider(provider: object, source: str = "provider") -> Optional[str]:
    """``provider`` lower-cased and stripped (None: choose), or ValueError naming ``source``."""
    if provider is None:
        return None
    if not isinstance(provider, str) or provider.strip().lower() not in PROVIDERS:
        raise ValueError(f"{source}: expected one of {', '.join(PROVIDERS)} or None, got {provider!r}")
    return provider.strip().lower()


def normalise_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a torch.device with an explicit CUDA index; None: the current CUDA device, else the CPU."""
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
    match: Optional[matching.GenerationMatch] = None
    torchao_reasons: tuple[str, ...] = ()
    bf16: Optional[GroupedMM] = None
    bf16_reasons: tuple[str, ...] = ()


def _probe_torchao(ctx: _Context, mode: Mode) -> None:
    ctx.torchao_version = environment.installed_torchao_version()
    if ctx.torchao_version is None:
        ctx.torchao_reasons = ("torchao is not installed",)
        return
    problem = None
    if ctx.isolate:  # a crash in the import or in this mode's smoke runs must not reach this process
        problem = isolated_problem(ctx.torchao_version, ctx.device, mode)
    problem = problem or environment.import_problem()
    if problem is not None:
        ctx.torchao_reasons = (f"torchao {ctx.torchao_version} is installed but unusable: {problem}",)
        return
    ctx.match = matching.match_generation(ctx.torchao_version)
    ctx.torchao_reasons = ctx.match.reasons


def _probe_bf16(ctx: _Context) -> None:
    problem = environment.grouped_mm_problem(ctx.device)
    ctx.bf16 = make_bf16(validate=ctx.validate, use_loop=problem is not None)
    ctx.bf16_reasons = (problem,) if problem else ()


_META_REASON = (
    "device meta holds no data: no MXFP8 path can be probed or run there; the bf16 grouped GEMM "
    "propagates shapes (resolve for the device the model will run on)"
)


def _resolve_uncached(
    mode: Mode, device: torch.device, validate: bool, wgrad_with_hp: bool, isolate: bool, provider: Optional[str] = None
) -> Resolution:
    ctx = _Context(device=device, validate=validate, wgrad_with_hp=wgrad_with_hp, isolate=isolate)
    _probe_bf16(ctx)
    if mode == "off":
        return _bf16_resolution(ctx, mode, ())
    if device.type == "meta":  # meta-device model init: shapes only
        if mode != "auto":
            raise MXFP8Unavailable(mode, (_META_REASON,))
        return _bf16_resolution(ctx, mode, (_META_REASON,))
    # auto on a device no native kernel runs on (CPU; CUDA not 10.x) decides without importing torchao
    ruled_out = _native_ruled_out(ctx) if mode == "auto" else None
    if ruled_out is not None:
        pass
    elif provider == "torch" and mode != "emulated":
        ctx.torchao_version = environment.installed_torchao_version()  # reported, never imported
    else:
        _probe_torchao(ctx, mode)
    if mode == "emulated":
        return _resolve_emulated(ctx)
    native: Union[Resolution, tuple[str, ...]] = ruled_out or ()
    if ruled_out is None:
        shape_fallback = ctx.bf16 if mode == "auto" else None
        if provider in (None, "torchao"):
            native = _try_native(ctx, shape_fallback=shape_fallback)
            if isinstance(native, Resolution):
                return dataclasses.replace(native, provider="torchao")
        if provider in (None, "torch"):
            found = _try_torch_native(ctx, mode, shape_fallback)
            if isinstance(found, Resolution):  # with the reasons torchao's was not taken
                return dataclasses.replace(found, reasons=native + found.reasons)  # type: ignore[operator]
            native = native + found  # type: ignore[operator]
    if mode == "native":
        raise MXFP8Unavailable(mode, native)
    resolution = _bf16_resolution(ctx, mode, native)
    if _fallback_log.get():
        log_once(f"mxfp8_compat: MXFP8 unavailable, using bf16 grouped GEMM ({'; '.join(resolution.reasons)})")
    return resolution


#: False while select_grouped_mm() resolves: its UserWarning is then the one message of a fallback.
_fallback_log: contextvars.ContextVar[bool] = contextvars.ContextVar("mxfp8_compat_fallback_log", default=True)


def _native_ruled_out(ctx: _Context) -> Optional[tuple[str, ...]]:
    """Why ``auto`` cannot go native on this device, decided without importing torchao; None to probe.

    A CPU, or a CUDA device whose capability is not 10.x, runs no torchao release's native
    kernel: importing torchao there would cost seconds (and its import noise) to learn nothing.
    """
    problem = environment.native_device_problem(ctx.device)
    if problem is None:
        return None
    ctx.torchao_version = environment.installed_torchao_version()
    if ctx.torchao_version is None:
        return ("torchao is not installed", problem)
    return (f"{problem}; torchao {ctx.torchao_version} is installed but was not imported (no release has a native kernel for this device)",)


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
    problem = environment.native_kernel_problem(bound, ctx.device)
    if problem is not None:
        return ctx.torchao_reasons + (problem,)
    notes = _wgrad_notes(generation, ctx.wgrad_with_hp)
    wgrad_with_hp = ctx.wgrad_with_hp and generation.wgrad_with_hp
    fn, smoke_result = smoke_torchao_path(
        bound, "native", ctx.device, wgrad_with_hp=wgrad_with_hp, validate=ctx.validate, shape_fallback=shape_fallback
    )
    if smoke_result.problem is not None:
        return ctx.torchao_reasons + (f"native MXFP8 of torchao {generation.key} failed its smoke run: {smoke_result.problem}",)
    return _resolution(
        ctx,
        fn=fn,
        backend="mxfp8",
        generation=generation,
        reasons=ctx.torchao_reasons + notes,
        mode="native" if shape_fallback is None else "auto",
        smoke_sqnr_db=smoke_result.sqnr_out_db,
        group_alignment=generation.group_multiple["native"],
    )


def _try_torch_native(ctx: _Context, mode: Mode, shape_fallback: Optional[GroupedMM]) -> Union[Resolution, tuple[str, ...]]:
    """torch's own MXFP8 grouped GEMM (:mod:`mxfp8_compat.backends.torch_native`), or every reason it is unavailable."""
    from .backends import torch_native  # imports torch._dynamo (seconds): only where a native kernel may run
    found = torch_native.resolve_torch_native(
        ctx.device, validate=ctx.validate, wgrad_with_hp=ctx.wgrad_with_hp, shape_fallback=shape_fallback
    )
    if found.fn is None:
        return tuple(f"torch provider: {reason}" for reason in found.reasons)
    return _resolution(
        ctx,
        fn=found.fn,
        backend="mxfp8",
        generation=None,
        reasons=found.reasons,
        mode=mode,
        smoke_sqnr_db=found.smoke.sqnr_out_db,
        provider="torch",
    )


def _wgrad_notes(generation: Generation, wgrad_with_hp: bool) -> tuple[str, ...]:
    if wgrad_with_hp and not generation.wgrad_with_hp:
        return (
            f"torchao {generation.key} cannot keep the weight-gradient GEMM in high precision "
            "(its entry has no wgrad_with_hp): weight gradients are MXFP8",
        )
    return ()


def _try_fast_emulation(ctx: _Context, scale_mode: ScaleMode, bound: object) -> Union[Resolution, tuple[str, ...]]:
    """mxfp8_compat's fast emulation (Triton quantisers; bitwise the reference), or why not.

    CUDA only: on the CPU the reference is the emulation, and nothing is said about this one.
    """
    if ctx.device.type != "cuda":
        return ()
    problem = fast_emulation_problem(ctx.device)
    if problem is not None:
        return (f"fast MXFP8 emulation unavailable: {problem}",)
    fn = make_mxfp8(
        fast_call(scale_mode, ctx.wgrad_with_hp),
        validate=ctx.validate,
        contiguous_grad=False,
        group_alignment=1,
        shape_fallback=None,
        label="fast emulated MXFP8",
    )
    smoke = smoke_probe.smoke_run(fn, ctx.device, scale_mode=scale_mode, wgrad_with_hp=ctx.wgrad_with_hp, exact=True)
    if smoke.problem is not None:
        return (f"mxfp8_compat's fast MXFP8 emulation failed its smoke run: {smoke.problem}",)
    return _resolution(
        ctx,
        fn=fn,
        backend="mxfp8-emulated",
        generation=bound.generation if bound is not None else None,  # type: ignore[attr-defined]
        reasons=ctx.torchao_reasons
        + (f"using mxfp8_compat's fast MXFP8 emulation (Triton, {scale_mode.value.upper()} scales, bitwise the reference)",)
        + ctx.bf16_reasons,
        mode="emulated",
        smoke_sqnr_db=smoke.sqnr_out_db,
        emulation="fast",
    )


def _resolve_emulated(ctx: _Context) -> Resolution:
    reasons: list[str] = list(ctx.torchao_reasons)
    bound = ctx.match.bound if ctx.match else None
    fast = _try_fast_emulation(ctx, bound.generation.scale_mode if bound is not None else DEFAULT_SCALE_MODE, bound)
    if isinstance(fast, Resolution):
        return fast
    reasons.extend(fast)
    scale_mode = DEFAULT_SCALE_MODE
    if bound is not None:
        generation = bound.generation
        scale_mode = generation.scale_mode
        if generation.emulation == "torchao":
            wgrad_with_hp = ctx.wgrad_with_hp and generation.wgrad_with_hp
            fn, smoke_result = smoke_torchao_path(bound, "emulated", ctx.device, wgrad_with_hp=wgrad_with_hp, validate=ctx.validate)
            if smoke_result.problem is None:
                return _resolution(
                    ctx,
                    fn=fn,
                    backend="mxfp8-emulated",
                    generation=generation,
                    reasons=tuple(reasons) + _wgrad_notes(generation, ctx.wgrad_with_hp),
                    mode="emulated",
                    smoke_sqnr_db=smoke_result.sqnr_out_db,
                    emulation="torchao",
                    group_alignment=generation.group_multiple["emulated"],
                )
            reasons.append(f"torchao {generation.key}'s emulated MXFP8 failed its smoke run: {smoke_result.problem}")
        else:
            reasons.append(
                f"torchao {generation.key} has no emulated MXFP8 path (its forward always runs sm_100 kernels)"
            )
    reasons.append(f"using mxfp8_compat's reference MXFP8 emulation ({scale_mode.value.upper()} scales)")
    fn = reference_emulation(scale_mode, ctx.wgrad_with_hp, validate=ctx.validate)
    smoke = smoke_probe.smoke_run(fn, ctx.device, scale_mode=scale_mode, wgrad_with_hp=ctx.wgrad_with_hp, exact=True)
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
