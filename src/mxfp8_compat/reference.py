"""Reference math: MXFP8 quantisation and grouped GEMMs in plain PyTorch.

This module is the project's yardstick. It needs no torchao, no triton and no GPU, so the
``mxfp8-emulated`` backend works everywhere, and tests can compare every torchao release
against one definition of the numerics.

MXFP8 (OCP Microscaling spec v1.0) stores a tensor as blocks of 32 consecutive elements
along the contraction dimension; each block holds float8 e4m3 elements and shares one
e8m0 scale (a bare power of two, exponent bias 127). The scale is chosen from the block's
absolute maximum ``amax``:

* ``ScaleMode.FLOOR``: ``2 ** (floor(log2(amax)) - 8)``, the OCP spec's rule and the only
  behaviour of torchao up to 0.14. Elements above 448 after scaling saturate to 448.
* ``ScaleMode.RCEIL``: ``2 ** ceil(log2(amax / 448))``, the rule of Blackwell's
  ``cvt.rp.satfinite.ue8m0`` instruction and of cuBLAS, and torchao's default since 0.15.
  Nothing saturates, so it is the default here: emulated results then match what the
  native sm_100 kernels of current torchao compute.

Both follow torchao's ``to_mx`` operation for operation (including its handling of NaN,
inf and all-zero blocks) so that a torchao emulated path and this reference can be
compared bit for bit:

* a block containing NaN gets the NaN scale (e8m0 255): the whole block dequantises to NaN;
* a block containing inf (FLOOR scale ``2**120``, RCEIL scale ``2**127``): the inf element
  dequantises to inf again and every other element of the block flushes to zero;
* an all-zero block gets the smallest scale (e8m0 0) and stays zero;
* values at or below half of e4m3's smallest subnormal (``2**-10`` times the block scale)
  flush to zero; those between ``2**-10`` and ``2**-9`` times the scale round up to ``2**-9``.

Precision of the GEMMs: quantised operands are dequantised into bfloat16 (exactly: an
e4m3 value times a power of two always fits bf16) and multiplied by
``torch._grouped_mm`` with float32 accumulation, as torchao's emulated kernels do; the
output is bitwise torchao's, the gradients equal it up to float32 summation order (see
:mod:`mxfp8_compat.agreement`). The backward GEMMs (:func:`dgrad_gemm`, :func:`wgrad_gemm`)
are shared with :mod:`mxfp8_compat.fast_emulation`, whose fused quantisers make it bitwise
equal to this module; on CUDA with bf16 operands they are single ``torch._grouped_mm`` calls
with bf16 output, so no GEMM of the reference reads ``offs`` on the host there.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Optional

import torch

__all__ = [
    "BLOCK_SIZE",
    "E4M3_MAX",
    "ScaleMode",
    "DEFAULT_SCALE_MODE",
    "mx_quantize",
    "mx_dequantize",
    "mx_fake_quantize",
    "mx_fake_quantize_grouped_rows",
    "grouped_mm_loop",
    "grouped_mm_highprec",
    "grouped_mm_support",
    "grouped_mm_float64",
    "mxfp8_grouped_mm_reference",
    "grouped_mm_fallback",
    "dgrad_gemm",
    "wgrad_gemm",
    "zero_unused_grads",
    "sqnr_db",
]

BLOCK_SIZE = 32
E4M3_MAX = 448.0
_E4M3_MAX_POW2 = 8  # floor(log2(448))
_E8M0_BIAS = 127
_E8M0_NAN = 255
_E8M0_INF = 254
_F32_MIN_NORMAL = 2.0**-126


class ScaleMode(str, enum.Enum):
    """How a block's shared e8m0 scale is derived from its absolute maximum."""

    FLOOR = "floor"
    RCEIL = "rceil"


DEFAULT_SCALE_MODE = ScaleMode.RCEIL


def _exponent_floor(amax: torch.Tensor) -> torch.Tensor:
    """torchao's FLOOR rule: exponent bits of amax minus 8, clamped to e8m0's range."""
    extracted = ((amax.view(torch.int32) >> 23) & 0xFF) - _E8M0_BIAS
    unbiased = torch.clamp(extracted - _E4M3_MAX_POW2, min=-_E8M0_BIAS, max=_E8M0_BIAS + 1)
    biased = (unbiased + _E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isnan(amax), _E8M0_NAN, biased).to(torch.uint8)


def _exponent_rceil(amax: torch.Tensor) -> torch.Tensor:
    """torchao's RCEIL rule: ceil(log2(amax / 448)), NaN -> 255, inf -> 254."""
    descale = amax / E4M3_MAX
    normal = (torch.clamp(torch.ceil(torch.log2(descale)), min=-_E8M0_BIAS, max=_E8M0_BIAS) + _E8M0_BIAS)
    return torch.where(
        torch.isnan(descale),
        _E8M0_NAN,
        torch.where(torch.isinf(descale), _E8M0_INF, normal.to(torch.uint8)),
    ).to(torch.uint8)


def _e8m0_to_float32(exponent: torch.Tensor) -> torch.Tensor:
    """The power of two an e8m0 exponent stands for (255 is NaN)."""
    value = torch.exp2(exponent.to(torch.float32) - _E8M0_BIAS)
    return torch.where(exponent == _E8M0_NAN, float("nan"), value)


def mx_quantize(
    x: torch.Tensor, scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to MXFP8 along its last dimension.

    Returns ``(data, exponent)``: ``data`` in ``torch.float8_e4m3fn`` with ``x``'s shape, and
    the biased e8m0 ``exponent`` as uint8 with shape ``(*x.shape[:-1], x.shape[-1] // 32)``.
    The last dimension must be a multiple of 32.
    """
    mode = ScaleMode(scale_mode)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"x: expected bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"x: last dimension {x.shape[-1]} is not a multiple of {BLOCK_SIZE}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE).to(torch.float32)
    amax = torch.amax(torch.abs(blocks), dim=-1, keepdim=True)
    if mode is ScaleMode.FLOOR:
        exponent = _exponent_floor(amax)
        scale = (exponent.to(torch.int32) << 23).view(torch.float32)
        scaled = blocks / torch.clamp(scale, min=_F32_MIN_NORMAL)
    else:
        exponent = _exponent_rceil(amax)
        reciprocal = torch.where(
            exponent == _E8M0_NAN,
            amax,  # NaN: stays NaN
            torch.where(
                exponent == _E8M0_INF,
                2.0**-127,
                torch.where(exponent == 0, 1.0, torch.exp2(_E8M0_BIAS - exponent.to(torch.float32))),
            ),
        )
        scaled = blocks * reciprocal
    data = torch.clamp(scaled, min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return data.reshape(x.shape), exponent.squeeze(-1)


def mx_dequantize(
    data: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of :func:`mx_quantize`: ``data * 2**(exponent - 127)`` per block, in ``dtype``."""
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    values = blocks.to(torch.float32) * _e8m0_to_float32(exponent).unsqueeze(-1)
    return values.reshape(data.shape).to(dtype)


def mx_fake_quantize(
    x: torch.Tensor, dim: int, scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE
) -> torch.Tensor:
    """Quantise to MXFP8 in blocks of 32 along ``dim`` and dequantise into bfloat16."""
    moved = x.movedim(dim, -1).contiguous()
    data, exponent = mx_quantize(moved, scale_mode)
    return mx_dequantize(data, exponent).movedim(-1, dim)


def mx_fake_quantize_grouped_rows(
    x: torch.Tensor, offs: torch.Tensor, scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE
) -> torch.Tensor:
    """Fake-quantise a 2D ``x`` in blocks of 32 rows that restart at each group boundary.

    This is the quantisation of the weight-gradient GEMM, whose contraction runs over the
    tokens of one group. A group whose size is not a multiple of 32 ends in a short block
    (zero padding, which leaves the block's amax unchanged). Rows after ``offs[-1]`` are zero.
    """
    out = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
    start = 0
    for end in offs.tolist():
        rows = end - start
        if rows > 0:
            padded_rows = -(-rows // BLOCK_SIZE) * BLOCK_SIZE
            segment = torch.nn.functional.pad(x[start:end], (0, 0, 0, padded_rows - rows))
            out[start:end] = mx_fake_quantize(segment, dim=0, scale_mode=scale_mode)[:rows]
        start = end
    return out


def grouped_mm_loop(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Grouped GEMM as a Python loop of ``torch.mm`` with float32 accumulation.

    Same contract as ``torch._grouped_mm(A, B, offs=offs, out_dtype=out_dtype)`` for 2D A
    and 3D B; used where this torch has no ``_grouped_mm`` kernel for the device. Rows after
    ``offs[-1]`` are zero. Differentiable.
    """
    out_dtype = out_dtype or A.dtype
    accumulate = torch.float64 if A.dtype == torch.float64 else torch.float32
    out = A.new_zeros((A.shape[0], B.shape[-1]), dtype=out_dtype)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = torch.mm(A[start:end].to(accumulate), B[expert].to(accumulate)).to(out_dtype)
        start = end
    return out


@functools.lru_cache(maxsize=None)
def grouped_mm_support(device_type: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """What ``torch._grouped_mm`` can do here: ``(runs, float32_out)`` for this device and dtype.

    ``runs``: it exists and runs for 2D x 3D inputs of ``dtype`` on ``device_type``.
    ``float32_out``: it also accepts ``out_dtype=torch.float32`` for such inputs (the CPU
    kernel of torch 2.13 does not). Probed once per (device type, dtype) with a tiny call.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False, False
    try:
        A = torch.ones(32, 32, dtype=dtype, device=device_type)
        B = torch.ones(2, 32, 32, dtype=dtype, device=device_type)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device_type)
        torch._grouped_mm(A, B, offs=offs)
    except Exception:  # noqa: BLE001 - any failure means "does not run here"
        return False, False
    try:
        torch._grouped_mm(A, B, offs=offs, out_dtype=torch.float32)
        return True, True
    except Exception:  # noqa: BLE001
        return True, False


def grouped_mm_highprec(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """High-precision grouped GEMM with ``torch._grouped_mm``'s contract and any ``out_dtype``.

    Uses ``torch._grouped_mm`` where it runs for this device and dtype (upcasting bf16 inputs
    exactly to float32 where the kernel cannot emit float32 itself), else :func:`grouped_mm_loop`.
    With ``out_dtype`` None or equal to ``A.dtype`` this is ``torch._grouped_mm(A, B, offs=offs)``.
    """
    out_dtype = out_dtype or A.dtype
    runs, float32_out = grouped_mm_support(A.device.type, A.dtype)
    if not runs:
        return grouped_mm_loop(A, B, offs, out_dtype)
    if out_dtype == A.dtype:
        return torch._grouped_mm(A, B, offs=offs)
    if out_dtype == torch.float32:
        if float32_out:
            return torch._grouped_mm(A, B, offs=offs, out_dtype=torch.float32)
        if grouped_mm_support(A.device.type, torch.float32)[0]:
            return torch._grouped_mm(A.float(), B.float(), offs=offs)
        return grouped_mm_loop(A, B, offs, out_dtype)
    return torch._grouped_mm(A, B, offs=offs).to(out_dtype)


def grouped_mm_float64(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The float64 ground truth that SQNR figures are measured against."""
    return grouped_mm_loop(A.double(), B.double(), offs, torch.float64)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``actual`` against ``reference``, in dB.

    ``+inf`` when they are equal, ``nan`` when either holds a non-finite value.
    """
    ref = reference.detach().double()
    err = ref - actual.detach().double()
    if not (torch.isfinite(ref).all() and torch.isfinite(err).all()):
        return float("nan")
    noise = float(err.pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# The reference and the high-precision fallback are torch custom ops: opaque to torch.compile
# (their group loops read offs, which would otherwise break the graph, and the probes in
# grouped_mm_support must run on real tensors), with autograd registered beside them.


@torch.library.custom_op("mxfp8_compat::reference_mxfp8_forward", mutates_args=())
def _reference_forward(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, scale_mode: str, wgrad_with_hp: bool
) -> torch.Tensor:
    """out[g] = q_K(A[g]) @ q_K(B[e]): blocks along K."""
    A_q = mx_fake_quantize(A, dim=-1, scale_mode=scale_mode)
    B_q = mx_fake_quantize(B, dim=1, scale_mode=scale_mode)
    return grouped_mm_highprec(A_q, B_q, offs, out_dtype)


@_reference_forward.register_fake
def _(A, B, offs, out_dtype, scale_mode, wgrad_with_hp):  # type: ignore[no-untyped-def]
    return A.new_empty((A.shape[0], B.shape[2]), dtype=out_dtype)


@torch.library.custom_op("mxfp8_compat::reference_mxfp8_backward", mutates_args=())
def _reference_backward(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, scale_mode: str, wgrad_with_hp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA[g] = q_N(dY[g]) @ q_N(B[e])^T (blocks along N); dB[e] = q_M(A[g])^T @ q_M(dY[g]) (blocks
    along the group's tokens), or in high precision with ``wgrad_with_hp``. Rows after
    ``offs[-1]`` get a zero input gradient, empty groups a zero weight gradient."""
    grad_q = mx_fake_quantize(grad_out, dim=-1, scale_mode=scale_mode)
    B_q = mx_fake_quantize(B, dim=2, scale_mode=scale_mode)
    grad_A = dgrad_gemm(grad_q, B_q.transpose(-2, -1).contiguous(), offs, A.dtype)
    if wgrad_with_hp:
        A_w, grad_w = A, grad_out
    else:
        A_w = mx_fake_quantize_grouped_rows(A, offs, scale_mode)
        grad_w = mx_fake_quantize_grouped_rows(grad_out, offs, scale_mode)
    return zero_unused_grads(grad_A, wgrad_gemm(A_w, grad_w, offs, B.shape[0], B.dtype), offs)


@_reference_backward.register_fake
def _(grad_out, A, B, offs, scale_mode, wgrad_with_hp):  # type: ignore[no-untyped-def]
    return torch.empty_like(A), B.new_empty(B.shape)


def _zero_rows_after_last_group(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows after ``offs[-1]`` (padding in a static-length buffer) get a zero input gradient."""
    if offs.shape[0] == 0:
        return torch.zeros_like(x)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
    return torch.where(rows < offs[-1].to(torch.int64), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sync_free_bf16_gemm(*tensors: torch.Tensor) -> bool:
    """Whether the backward GEMMs of these operands run as one bf16 ``torch._grouped_mm``.

    On CUDA, a float32 result from ``torch._grouped_mm`` takes torch's per-group fallback
    (which reads ``offs`` on the host: a device sync), so where the gradient is bf16 anyway
    the GEMM emits bf16 itself: float32 accumulation rounded once, as torchao's emulation does.
    """
    first = tensors[0]
    return (
        first.is_cuda
        and all(t.dtype == torch.bfloat16 for t in tensors)
        and grouped_mm_support(first.device.type, torch.bfloat16)[0]
    )


def dgrad_gemm(grad_q: torch.Tensor, B_q_t: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dA[g] = grad_q[g] @ B_q_t[e] with B_q_t (E, N, K) contiguous, float32 accumulation, in ``dtype``.

    Rows after ``offs[-1]`` are unspecified (see :func:`zero_unused_grads`). Shared by the
    reference and :mod:`mxfp8_compat.fast_emulation`, which are bitwise equal through it.
    """
    if dtype == torch.bfloat16 and _sync_free_bf16_gemm(grad_q, B_q_t):
        return torch._grouped_mm(grad_q, B_q_t, offs=offs)
    return grouped_mm_highprec(grad_q, B_q_t, offs, torch.float32).to(dtype)


def wgrad_gemm(A: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """dB[e] = A[g]^T @ grad_out[g] per group, float32 accumulation, in ``dtype``.

    On CUDA with bf16 operands and result, one 2D x 2D ``torch._grouped_mm`` (no device
    sync); elsewhere a per-group float32 loop. Empty groups' gradients are unspecified (see
    :func:`zero_unused_grads`). Shared with :mod:`mxfp8_compat.fast_emulation`.
    """
    if dtype == torch.bfloat16 and _sync_free_bf16_gemm(A, grad_out):
        return torch._grouped_mm(A.t(), grad_out, offs=offs)
    return _weight_grad(A, grad_out, offs, experts).to(dtype)


def zero_unused_grads(grad_A: torch.Tensor, grad_B: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the input gradient of rows after ``offs[-1]`` and the weight gradient of empty groups.

    Reads ``offs`` on the device (no sync). Those rows take no part in the GEMM; the weight
    gradient of a group without tokens is zero.
    """
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    grad_B = torch.where((sizes > 0).view(-1, 1, 1), grad_B, torch.zeros((), dtype=grad_B.dtype, device=grad_B.device))
    return _zero_rows_after_last_group(grad_A, offs), grad_B


def _weight_grad(A: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, experts: int) -> torch.Tensor:
    """dB[e] = A[g]^T @ dY[g] per group, float32 accumulation (zero for empty groups)."""
    grad_B = torch.zeros((experts, A.shape[1], grad_out.shape[1]), dtype=torch.float32, device=A.device)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            grad_B[expert] = torch.mm(A[start:end].t().float(), grad_out[start:end].float())
        start = end
    return grad_B


def _reference_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B, offs, _, scale_mode, wgrad_with_hp = inputs
    ctx.save_for_backward(A, B, offs)
    ctx.scale_mode, ctx.wgrad_with_hp = scale_mode, wgrad_with_hp


def _reference_autograd(ctx, grad_out):  # type: ignore[no-untyped-def]
    A, B, offs = ctx.saved_tensors
    grad_A, grad_B = _reference_backward(grad_out.contiguous(), A, B, offs, ctx.scale_mode, ctx.wgrad_with_hp)
    return grad_A, grad_B, None, None, None, None


_reference_forward.register_autograd(_reference_autograd, setup_context=_reference_setup)


@torch.library.custom_op("mxfp8_compat::grouped_mm_fallback", mutates_args=())
def _fallback_forward(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return grouped_mm_highprec(A, B, offs, out_dtype)


@_fallback_forward.register_fake
def _(A, B, offs, out_dtype):  # type: ignore[no-untyped-def]
    return A.new_empty((A.shape[0], B.shape[2]), dtype=out_dtype)


@torch.library.custom_op("mxfp8_compat::grouped_mm_fallback_backward", mutates_args=())
def _fallback_backward(
    grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_A = grouped_mm_loop(grad_out, B.transpose(-2, -1), offs, torch.float32).to(A.dtype)
    return grad_A, _weight_grad(A, grad_out, offs, B.shape[0]).to(B.dtype)


@_fallback_backward.register_fake
def _(grad_out, A, B, offs):  # type: ignore[no-untyped-def]
    return torch.empty_like(A), B.new_empty(B.shape)


def _fallback_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B, offs, _ = inputs
    ctx.save_for_backward(A, B, offs)


def _fallback_autograd(ctx, grad_out):  # type: ignore[no-untyped-def]
    A, B, offs = ctx.saved_tensors
    grad_A, grad_B = _fallback_backward(grad_out.contiguous(), A, B, offs)
    return grad_A, grad_B, None, None


_fallback_forward.register_autograd(_fallback_autograd, setup_context=_fallback_setup)


def grouped_mm_fallback(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`grouped_mm_highprec` as one differentiable, compile-safe op.

    For what ``torch._grouped_mm`` cannot do here itself: the per-group loop where torch has
    no kernel for the device (torch 2.8 on the CPU), and float32 output from bf16 inputs where
    its kernel emits only the input dtype. Backward runs per-group loops in float32.
    """
    return _fallback_forward(A, B, offs, out_dtype)


def mxfp8_grouped_mm_reference(
    A: torch.Tensor,
    B: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE,
    wgrad_with_hp: bool = False,
) -> torch.Tensor:
    """Differentiable MXFP8 grouped GEMM in plain PyTorch (the ``mxfp8-emulated`` fallback).

    ``torch._grouped_mm`` contract: A (M, K), B (E, K, N), ``offs`` int32 (E,) cumulative end
    rows with ``offs[-1] <= M``; returns (M, N) in ``out_dtype`` (rows after ``offs[-1]``
    unspecified, their input gradient zero). K and N must be multiples of 32; group sizes may
    be anything (short blocks at group ends). No input validation: callers validate.
    """
    return _reference_forward(A, B, offs, out_dtype, ScaleMode(scale_mode).value, wgrad_with_hp)
