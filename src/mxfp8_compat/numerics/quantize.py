"""MXFP8 quantisation in plain PyTorch: the one definition of the numbers every path must produce.

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
inf and all-zero blocks) so that a torchao emulated path and this module can be compared
bit for bit:

* a block containing NaN gets the NaN scale (e8m0 255): the whole block dequantises to NaN;
* a block containing inf (FLOOR scale ``2**120``, RCEIL scale ``2**127``): the inf element
  dequantises to inf again and every other element of the block flushes to zero;
* an all-zero block gets the smallest scale (e8m0 0) and stays zero;
* values at or below half of e4m3's smallest subnormal (``2**-10`` times the block scale)
  flush to zero; those between ``2**-10`` and ``2**-9`` times the scale round up to ``2**-9``.
"""

from __future__ import annotations

import enum

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
