"""The smoke run: a tiny forward and backward of a candidate path, recognised as MXFP8 or refused.

The verdict of a path is running it, never its name or version: a fingerprint of parameter
names let a row through whose backward arity differed; the smoke run would not have.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..layout import weight_relayout
from ..numerics.metrics import float64_forward_backward, forward_backward, sqnr_db
from ..numerics.quantize import ScaleMode
from ..numerics.reference import mxfp8_grouped_mm_reference
from .environment import one_line

__all__ = ["SMOKE_MIN_SQNR_DB", "SMOKE_MIN_MATCH_DB", "SMOKE_GROUP_ROWS", "SmokeResult", "smoke_run"]

SMOKE_MIN_SQNR_DB = 20.0


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
SMOKE_K = SMOKE_N = 128  # the largest K/N multiple any row's kernel asks for (shape_multiple)
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
        return SmokeResult(nan, nan, nan, f"smoke run could not place its inputs on {device}: {type(error).__name__}: {one_line(error)}")
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
        return SmokeResult(nan, nan, nan, f"smoke run raised {type(error).__name__}: {one_line(error)}")

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
    from ..backends import grouped_mm as backends

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
