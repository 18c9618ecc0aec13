"""MXFP8 on Blackwell with torch alone: torch's own MXFP8 grouped GEMM, fed by mxfp8_compat's quantisers.

torch ships the sm_100 kernel (``F.scaled_grouped_mm`` / ``torch._scaled_grouped_mm``, MSLK's
``mx8mx8bf16_grouped``); what a caller must supply is the operands in the layout it reads
(``shared/torch-scaled-grouped-mm.md``): float8_e4m3fn data, e8m0 scales (RCEIL) per 32 elements
along the contraction dimension, each group's scales in the 128x4 blocked layout. The quantisers
here (:mod:`mxfp8_compat.kernels.mx_quant`, Triton) write exactly that:

* :func:`quantize_rows`: A along K (forward), grad_out along N (input gradient), read through the
  token-group map of :func:`~mxfp8_compat.token_groups.token_group_padding` and written padded
  (groups to multiples of 32, padding rows zero): no separate gather pass before the GEMM;
* :func:`quantize_weight`: the weight along K and along N, reading it once;
* :func:`quantize_grouped_columns`: grad_out and A along M within each group, transposed, for the
  2D x 2D weight-gradient GEMM.

None reads ``offs`` on the host. On CPU tensors the same kernels run in triton's interpreter (slow;
for tests), which is how their bits are checked against the reference without a GPU.

Only RCEIL scales: torchao's default since 0.15 and the rule of Blackwell's own conversion.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

import torch
from packaging.version import InvalidVersion, Version

from ..probes import environment, smoke as smoke_probe
from ..kernels.launch import kernel_module, launch
from ..providers.schema import GroupedMMCall, ScaledGroupedMM, TorchGeneration
from ..providers.table import TORCH_GENERATIONS
from ..numerics.quantize import BLOCK_SIZE, ScaleMode
from ..numerics.backward import wgrad_gemm
from ..token_groups import TokenGroupPadding, gather_rows, token_group_padding

__all__ = [
    "ALIGNMENT",
    "MXOperand",
    "quantize_rows",
    "quantize_weight",
    "quantize_grouped_columns",
    "row_scale_rows_bound",
    "column_scale_cols_bound",
    "TorchMatch",
    "TorchNative",
    "match_torch_generation",
    "torch_kernel_problem",
    "torch_native_call",
    "resolve_torch_native",
]

#: Every token group is padded to a multiple of this many rows (the MXFP8 kernel's requirement; blocks
#: of the weight gradient restart at each group, 32 rows each).
ALIGNMENT = 32

# Launch parameters (memory-bound kernels).
ROWS_BC = 128  # columns per program of the row and column quantisers (times 32 rows)
WEIGHT_BK = 128  # K columns per program of the weight quantiser (times 32 rows of N)
WARPS = 4

# Use the GPU's fp8 conversion instruction where the device has one (sm_89+); False forces the
# arithmetic path, which the CPU interpreter always takes.
USE_HW_CVT = True

_E4M3 = torch.float8_e4m3fn
_E8M0 = torch.float8_e8m0fnu


def _kernels(interpret: bool) -> ModuleType:
    """The kernels module: compiled, or a second copy built for triton's interpreter (CPU tensors)."""
    return kernel_module("mx_quant", interpret)


@functools.lru_cache(maxsize=None)
def _launch(device: torch.device) -> tuple[ModuleType, bool, dict]:
    """(kernels, hardware conversion, launch options) for ``device``."""
    interpret = device.type != "cuda"
    hw = not interpret and torch.cuda.get_device_capability(device) >= (8, 9)
    return _kernels(interpret), hw, ({} if interpret else {"enable_fp_fusion": False})


def _src(x: torch.Tensor, hw: bool) -> torch.Tensor:
    """bf16 is read through an int16 view on the arithmetic path (the kernels' HW_CVT=False: no
    conversion instructions, or USE_HW_CVT turned off)."""
    return x.view(torch.int16) if (x.dtype == torch.bfloat16 and not (hw and USE_HW_CVT)) else x


def _dst(q: torch.Tensor, hw: bool) -> torch.Tensor:
    """e4m3 is written as fp8 values by the conversion instruction, else as uint8 bits."""
    return q if (hw and USE_HW_CVT) else q.view(torch.uint8)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _check_input(x: torch.Tensor, name: str, dims: int, blocked_dim: int, scale_mode: ScaleMode | str) -> None:
    if ScaleMode(scale_mode) is not ScaleMode.RCEIL:
        raise ValueError(f"scale_mode: torch's MXFP8 quantisers here write RCEIL scales only, got {scale_mode!r}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: expected bfloat16 or float32, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}D tensor, got shape {tuple(x.shape)}")
    if x.shape[blocked_dim] % BLOCK_SIZE:
        raise ValueError(f"{name}: dimension {blocked_dim} of size {x.shape[blocked_dim]} is not a multiple of {BLOCK_SIZE}")


@dataclass(frozen=True)
class MXOperand:
    """One operand of torch's MXFP8 grouped GEMM: e4m3 ``data`` and e8m0 ``scales`` (blocked layout)."""

    data: torch.Tensor
    scales: torch.Tensor


def row_scale_rows_bound(padded_rows: int, groups: int) -> int:
    """Rows of a row-groups scale tensor: every group's block is its padded size rounded up to 128
    (a padded size is a multiple of 32, so at most 96 more), known on the host."""
    return _round_up(padded_rows + 96 * groups, 128)


def column_scale_cols_bound(padded_rows: int, groups: int) -> int:
    """Scale columns of a contraction-groups scale tensor: each group's size / 32, rounded up to 4."""
    return padded_rows // BLOCK_SIZE + 4 * groups


def _check_padding(padding: TokenGroupPadding, x: torch.Tensor) -> None:
    if padding.alignment % ALIGNMENT or padding.rows != x.shape[0]:
        raise ValueError(
            f"padding: expected a TokenGroupPadding of {x.shape[0]} rows aligned to a multiple of {ALIGNMENT}, "
            f"got {padding.rows} rows aligned to {padding.alignment}"
        )


def quantize_rows(x: torch.Tensor, padding: TokenGroupPadding, scale_mode: ScaleMode | str = ScaleMode.RCEIL) -> MXOperand:
    """``x`` (M, C) padded by ``padding`` and quantised in blocks of 32 along C, in one kernel.

    Returns data (P, C) e4m3 (P = ``padding.padded_rows``; padding rows and the tail after the last
    group are zero) and scales (:func:`row_scale_rows_bound`, round_up(C/32, 4)) e8m0 holding each
    group's blocked (P_g, C/32) scales at row sum_{i<g} round_up(P_i, 128), zeros elsewhere: the
    2D operand of torch's 2D x 3D MXFP8 grouped GEMM with ``offs = padding.padded_offs``.
    """
    _check_input(x, "x", 2, 1, scale_mode)
    _check_padding(padding, x)
    x = x.contiguous()
    rows, cols = x.shape
    P, E = padding.padded_rows, padding.padded_offs.shape[0]
    scale_cols = _round_up(cols // BLOCK_SIZE, 4)
    data = torch.empty((P, cols), dtype=_E4M3, device=x.device)
    scales = torch.zeros((row_scale_rows_bound(P, E), scale_cols), dtype=_E8M0, device=x.device)
    if P and cols and E:
        kernels, hw, options = _launch(x.device)
        launch(
            kernels.quantize_rows_kernel, (P // ALIGNMENT, -(-cols // ROWS_BC)),
            _src(x, hw), padding.source_rows, _dst(data, hw), scales.view(torch.uint8), padding.padded_offs,
            rows, cols, E, scale_cols,
            IN_BF16=x.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BC=ROWS_BC, E_PAD=_pow2(E),
            num_warps=WARPS, **options,
        )
    elif P and cols:
        data.view(torch.uint8).zero_()
    return MXOperand(data, scales)


def quantize_weight(
    w: torch.Tensor, along_k: bool = True, along_n: bool = True, scale_mode: ScaleMode | str = ScaleMode.RCEIL
) -> tuple[Optional[MXOperand], Optional[MXOperand]]:
    """The weight ``w`` (E, K, N), any strides, read once and quantised along K and/or along N.

    Returns ``(along_k, along_n)``, each None unless asked for:

    * along K: data (E, N, K) contiguous (``data.transpose(-2, -1)`` is the column-major (E, K, N)
      operand of the forward), scales (E, round_up(N, 128) * round_up(K/32, 4)), each expert's
      (N, K/32) scales blocked;
    * along N: data (E, K, N) contiguous (``data.transpose(-2, -1)`` is the column-major (E, N, K)
      operand of the input gradient), scales (E, round_up(K, 128) * round_up(N/32, 4)).
    """
    _check_input(w, "w", 3, 1, scale_mode)
    if w.shape[2] % BLOCK_SIZE:
        raise ValueError(f"w: dimension 2 of size {w.shape[2]} is not a multiple of {BLOCK_SIZE}")
    E, K, N = w.shape
    k_out = n_out = None
    if along_k:
        k_out = MXOperand(
            torch.empty((E, N, K), dtype=_E4M3, device=w.device),
            torch.zeros((E, _round_up(N, 128) * _round_up(K // BLOCK_SIZE, 4)), dtype=_E8M0, device=w.device),
        )
    if along_n:
        n_out = MXOperand(
            torch.empty((E, K, N), dtype=_E4M3, device=w.device),
            torch.zeros((E, _round_up(K, 128) * _round_up(N // BLOCK_SIZE, 4)), dtype=_E8M0, device=w.device),
        )
    if (k_out is None and n_out is None) or not w.numel():
        return k_out, n_out
    kernels, hw, options = _launch(w.device)
    w_t = _src(w.transpose(-2, -1), hw)  # (E, N, K) view
    some = k_out if k_out is not None else n_out
    assert some is not None
    k_programs = -(-K // WEIGHT_BK)
    launch(
        kernels.quantize_weight_kernel, (E * (N // BLOCK_SIZE) * k_programs,),
        w_t,
        _dst((k_out or some).data, hw), (k_out or some).scales.view(torch.uint8),
        _dst((n_out or some).data, hw), (n_out or some).scales.view(torch.uint8),
        N, K, *w_t.stride(), k_programs,
        DO_K=k_out is not None, DO_N=n_out is not None,
        IN_BF16=w.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BK=WEIGHT_BK,
        num_warps=WARPS, **options,
    )
    return k_out, n_out


def quantize_grouped_columns(
    x: torch.Tensor, padding: TokenGroupPadding, scale_mode: ScaleMode | str = ScaleMode.RCEIL
) -> MXOperand:
    """``x`` (M, C) padded by ``padding``, quantised along M in blocks of 32 rows within each group, transposed.

    Returns data (C, P) e4m3 row-major (padding columns zero) and scales
    (round_up(C, 128), :func:`column_scale_cols_bound`) e8m0 whose flat storage holds, for group g
    at element round_up(C, 128) * sum_{i<g} round_up(P_i/32, 4), the blocked (C, P_g/32) scales:
    one operand of torch's 2D x 2D MXFP8 grouped GEMM (the weight gradient) with
    ``offs = padding.padded_offs``.
    """
    _check_input(x, "x", 2, 1, scale_mode)
    _check_padding(padding, x)
    x = x.contiguous()
    rows, cols = x.shape
    P, E = padding.padded_rows, padding.padded_offs.shape[0]
    data = torch.empty((cols, P), dtype=_E4M3, device=x.device)
    scales = torch.zeros((_round_up(cols, 128), column_scale_cols_bound(P, E)), dtype=_E8M0, device=x.device)
    if P and cols and E:
        kernels, hw, options = _launch(x.device)
        launch(
            kernels.quantize_grouped_columns_kernel, (P // ALIGNMENT, -(-cols // ROWS_BC)),
            _src(x, hw), padding.source_rows, _dst(data, hw), scales.view(torch.uint8), padding.padded_offs,
            rows, cols, P, E,
            IN_BF16=x.dtype == torch.bfloat16, HW_CVT=hw and USE_HW_CVT, BC=ROWS_BC, E_PAD=_pow2(E),
            num_warps=WARPS, **options,
        )
    elif P and cols:
        data.view(torch.uint8).zero_()
    return MXOperand(data, scales)


# --- the provider row: locate, fingerprint, gate ----------------------------------------------


@dataclass(frozen=True)
class TorchMatch:
    """The torch row that fits the running torch, its entry and where it lives, or why none fits."""

    row: Optional[TorchGeneration]
    entry: Optional[Callable[..., Any]]
    location: Optional[str]
    reasons: tuple[str, ...]

    def gemm(self) -> ScaledGroupedMM:
        assert self.row is not None and self.entry is not None
        return self.row.bind(self.entry)


def _entry_params(row: TorchGeneration, entry: Callable[..., Any]) -> tuple[str, ...]:
    if row.schema is not None:
        return tuple(argument.name for argument in getattr(torch.ops.aten, row.schema).default._schema.arguments)
    return tuple(inspect.signature(entry).parameters)


def _locate(row: TorchGeneration) -> tuple[Optional[Callable[..., Any]], Optional[str], list[str]]:
    problems: list[str] = []
    for module_name, attribute in row.entry_points:
        location = f"{module_name}.{attribute}"
        entry = getattr(importlib.import_module(module_name), attribute, None)
        if entry is None:
            problems.append(f"{location} is missing")
            continue
        try:
            params = _entry_params(row, entry)
        except (AttributeError, TypeError, ValueError) as error:
            problems.append(f"{location} has no readable signature ({type(error).__name__}: {error})")
            continue
        mismatch = row.fingerprint_mismatch(params)
        if mismatch:
            problems.append(f"{location}: {mismatch}")
            continue
        return entry, location, problems
    return None, None, problems


def match_torch_generation(version: Optional[str] = None, table: tuple[TorchGeneration, ...] = TORCH_GENERATIONS) -> TorchMatch:
    """The row of :data:`~mxfp8_compat.providers.table.TORCH_GENERATIONS` for torch ``version`` (default: this one).

    A version inside a row's range must pass that row's fingerprint; one newer than every row is
    matched by fingerprint, newest row first; an older one has no row.
    """
    version = version or torch.__version__
    try:
        parsed = Version(version)
    except InvalidVersion:
        return TorchMatch(None, None, None, (f"torch version {version!r} is not a valid version string",))
    in_range = [row for row in table if row.versions.contains(parsed, prereleases=True)]
    lowest = {row.key: min(Version(s.version) for s in row.versions if s.operator == ">=") for row in table}
    newest = max(table, key=lambda row: lowest[row.key])
    reasons: list[str] = []
    if in_range:
        candidates, how = in_range, None
    elif parsed >= lowest[newest.key]:
        candidates = list(table)
        how = f"torch {version} is newer than the torch rows (newest {newest.key}); matched by signature fingerprint"
    else:
        oldest = min(table, key=lambda row: lowest[row.key])
        return TorchMatch(None, None, None, (
            f"torch {version} is older than the oldest torch MXFP8 row ({oldest.key}: {oldest.versions})",))
    for row in candidates:
        entry, location, problems = _locate(row)
        if entry is not None:
            if how:
                reasons.append(f"{how}: row {row.key} ({location})")
            return TorchMatch(row, entry, location, tuple(reasons))
        reasons.append(f"torch row {row.key} does not fit torch {version}: " + "; ".join(problems))
    return TorchMatch(None, None, None, tuple(reasons))


def torch_kernel_problem(row: TorchGeneration, device: torch.device) -> Optional[str]:
    """Why torch's MXFP8 grouped kernel cannot run on ``device``, before trying it; None if it may.

    torch's own verdict (its test helper's): compute capability 10.x and a build with MSLK
    (``row.build_flag in torch.__config__.show()``). The quantisers here also need triton.
    """
    if device.type != "cuda":
        return f"torch's MXFP8 grouped GEMM needs a CUDA device with compute capability 10.x; device is {device}"
    major, minor = environment.device_capability(device) or (0, 0)
    if major != 10:
        return (
            f"{device} has compute capability {major}.{minor} (sm_{major}{minor}); torch's MXFP8 grouped GEMM "
            "kernel (MSLK mx8mx8bf16_grouped) exists only for 10.x"
        )
    if row.build_flag not in torch.__config__.show():
        return f"torch {torch.__version__} was built without {row.build_flag}: it has no MXFP8 grouped GEMM kernel"
    try:
        _kernels(interpret=False)
    except Exception as error:  # noqa: BLE001 - any import failure is the answer
        return f"mxfp8_compat's quantisers for torch's kernel need triton, which does not import ({type(error).__name__}: {error})"
    return None


# --- the differentiable GEMM ---------------------------------------------------------------------
#
# The math lives in _forward_impl / _backward_impl. Eager calls reach them through a plain
# torch.autograd.Function (a custom op's dispatch costs tens of microseconds a call, which small
# GEMMs notice); under torch.compile the same functions are wrapped as the custom ops
# mxfp8_compat::torch_mxfp8_forward / torch_mxfp8_backward, which the compiler keeps opaque (no
# graph break, no tracing of the Triton launches), with fake kernels for their shapes, strides and
# dtypes. The weight quantised along N (e4m3 data, e8m0 scales) crosses from the forward op to the
# backward op as its bits, uint8 (a free view either way): the compiler only stores it, and uint8
# is a dtype every torch's inductor and AOT checks handle (float8 has no CPU sum, which
# torch.library.opcheck applies to every output). Neither op reads offs on the host: padded sizes
# are bounds known from shapes, group boundaries are read by the kernels on the device.
#
# A custom op takes no Python callable, so the bound entry (``ScaledGroupedMM``) is registered
# here and named in the op's arguments by a string key.

_GEMMS: dict[str, ScaledGroupedMM] = {}


def _gemm_key(gemm: ScaledGroupedMM) -> str:
    """The key naming ``gemm`` in the custom ops' arguments (registered on first use, held for good)."""
    for key, known in _GEMMS.items():
        if known is gemm:
            return key
    key = f"{getattr(gemm, '__name__', 'gemm')}#{len(_GEMMS)}"
    _GEMMS[key] = gemm
    return key


def _padding_of(A: torch.Tensor, padded_offs: torch.Tensor, source_rows: torch.Tensor, padded_positions: torch.Tensor) -> TokenGroupPadding:
    return TokenGroupPadding(ALIGNMENT, A.shape[0], source_rows.shape[0], padded_offs, source_rows, padded_positions)


def _weight_n_shapes(E: int, K: int, N: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(data, scales) shapes of the weight quantised along N (see :func:`quantize_weight`)."""
    return (E, K, N), (E, _round_up(K, 128) * _round_up(N // BLOCK_SIZE, 4))


def _forward_impl(
    A: torch.Tensor, B_t: torch.Tensor, padding: TokenGroupPadding, gemm: ScaledGroupedMM, keep_weight: bool
) -> tuple[torch.Tensor, Optional[MXOperand]]:
    """out = gemm(q_K(A) padded, q_K(B)) unpadded, bf16 (M, N) contiguous; B quantised along N if ``keep_weight``."""
    a = quantize_rows(A, padding)
    along_k, along_n = quantize_weight(B_t, along_k=True, along_n=keep_weight)
    assert along_k is not None
    out = gemm(a.data, along_k.data.transpose(-2, -1), a.scales, along_k.scales, padding.padded_offs)
    return gather_rows(out, padding.padded_positions), along_n


def _backward_impl(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    offs: torch.Tensor,
    padding: TokenGroupPadding,
    weight_n: Optional[MXOperand],
    gemm: ScaledGroupedMM,
    wgrad_with_hp: bool,
    b_dtype: torch.dtype,
    need_A: bool,
    need_B: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dA = q_N(dY) q_N(B)^T, (M, K) contiguous in A's dtype; dB = q_M(A)^T q_M(dY) per group, (E, K, N)
    strides (K*N, 1, K) (the layout of a per-group column-major weight), or with ``wgrad_with_hp``
    A^T dY in bf16 GEMMs, contiguous. Empty groups get a zero dB, rows after offs[-1] a zero dA."""
    grad_A = grad_B = None
    if need_A:
        assert weight_n is not None, "the forward kept no weight quantised along N"
        g = quantize_rows(grad_out, padding)
        dgrad = gemm(g.data, weight_n.data.transpose(-2, -1), g.scales, weight_n.scales, padding.padded_offs)
        grad_A = gather_rows(dgrad, padding.padded_positions).to(A.dtype)
    if need_B:
        E = offs.shape[0]
        zero = torch.zeros((), dtype=b_dtype, device=A.device)
        non_empty = (torch.diff(offs, prepend=offs.new_zeros(1)) > 0).view(-1, 1, 1)  # the kernel writes nothing for empty groups
        if wgrad_with_hp:
            grad_B = torch.where(non_empty, wgrad_gemm(A, grad_out.to(A.dtype), offs, E, b_dtype), zero).contiguous()
        else:
            g_t, a_t = quantize_grouped_columns(grad_out, padding), quantize_grouped_columns(A, padding)
            wgrad = gemm(g_t.data, a_t.data.t(), g_t.scales, a_t.scales, padding.padded_offs)  # (E, N, K)
            grad_B = torch.where(non_empty, wgrad.to(b_dtype), zero).contiguous().transpose(-2, -1)
    return grad_A, grad_B


class _TorchMXFP8(torch.autograd.Function):
    """out = torch's MXFP8 grouped GEMM of q_K(A) and q_K(B); dA = q_N(dY) q_N(B)^T; dB = q_M(A)^T q_M(dY)
    per group (or A^T dY in bf16 with ``wgrad_with_hp``). Groups are padded inside the quantisers;
    the outputs are unpadded by one row gather each."""

    @staticmethod
    def forward(ctx, A, B_t, offs, gemm, wgrad_with_hp):  # type: ignore[override]
        padding = token_group_padding(offs, A.shape[0], ALIGNMENT)
        out, weight_n = _forward_impl(A, B_t, padding, gemm, keep_weight=ctx.needs_input_grad[0])
        keep = (weight_n.data, weight_n.scales) if weight_n is not None else ()
        ctx.save_for_backward(A, offs, padding.padded_offs, padding.source_rows, padding.padded_positions, *keep)
        ctx.gemm, ctx.wgrad_with_hp, ctx.b_dtype = gemm, wgrad_with_hp, B_t.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        A, offs, padded_offs, source_rows, padded_positions, *kept = ctx.saved_tensors
        grad_A, grad_B = _backward_impl(
            grad_out.contiguous(), A, offs, _padding_of(A, padded_offs, source_rows, padded_positions),
            MXOperand(*kept) if kept else None, ctx.gemm, ctx.wgrad_with_hp, ctx.b_dtype,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_A, grad_B, None, None, None


@torch.library.custom_op("mxfp8_compat::torch_mxfp8_forward", mutates_args=())
def _torch_forward(
    A: torch.Tensor,
    B_t: torch.Tensor,
    offs: torch.Tensor,
    padded_offs: torch.Tensor,
    source_rows: torch.Tensor,
    padded_positions: torch.Tensor,
    gemm: str,
    wgrad_with_hp: bool,
    keep_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out bf16 (M, N), B along N: the bits (uint8) of its e4m3 data (E, K, N) and e8m0 scales, or two empty tensors)."""
    out, weight_n = _forward_impl(A, B_t, _padding_of(A, padded_offs, source_rows, padded_positions), _GEMMS[gemm], keep_weight)
    if weight_n is None:
        return out, A.new_empty(0, dtype=torch.uint8), A.new_empty(0, dtype=torch.uint8)
    return out, weight_n.data.view(torch.uint8), weight_n.scales.view(torch.uint8)


@_torch_forward.register_fake
def _(A, B_t, offs, padded_offs, source_rows, padded_positions, gemm, wgrad_with_hp, keep_weight):  # type: ignore[no-untyped-def]
    E, K, N = B_t.shape
    out = A.new_empty((A.shape[0], N), dtype=torch.bfloat16)
    if not keep_weight:
        return out, A.new_empty(0, dtype=torch.uint8), A.new_empty(0, dtype=torch.uint8)
    data, scales = _weight_n_shapes(E, K, N)
    return out, A.new_empty(data, dtype=torch.uint8), A.new_empty(scales, dtype=torch.uint8)


@torch.library.custom_op("mxfp8_compat::torch_mxfp8_backward", mutates_args=())
def _torch_backward(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    offs: torch.Tensor,
    padded_offs: torch.Tensor,
    source_rows: torch.Tensor,
    padded_positions: torch.Tensor,
    weight_n_data: torch.Tensor,
    weight_n_scales: torch.Tensor,
    gemm: str,
    wgrad_with_hp: bool,
    b_dtype: torch.dtype,
    need_A: bool,
    need_B: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad A (M, K) or empty, grad B (E, K, N) or empty): :func:`_backward_impl`."""
    weight_n = MXOperand(weight_n_data.view(_E4M3), weight_n_scales.view(_E8M0)) if need_A else None
    grad_A, grad_B = _backward_impl(
        grad_out, A, offs, _padding_of(A, padded_offs, source_rows, padded_positions), weight_n,
        _GEMMS[gemm], wgrad_with_hp, b_dtype, need_A, need_B,
    )
    return (grad_A if grad_A is not None else A.new_empty(0)), (grad_B if grad_B is not None else A.new_empty(0, dtype=b_dtype))


@_torch_backward.register_fake
def _(grad_out, A, offs, padded_offs, source_rows, padded_positions, weight_n_data, weight_n_scales, gemm, wgrad_with_hp, b_dtype, need_A, need_B):  # type: ignore[no-untyped-def]
    M, K = A.shape
    E, N = offs.shape[0], grad_out.shape[1]
    grad_A = A.new_empty((M, K) if need_A else (0,))
    if not need_B:
        grad_B = A.new_empty((0,), dtype=b_dtype)
    elif wgrad_with_hp:
        grad_B = A.new_empty((E, K, N), dtype=b_dtype)
    else:
        grad_B = A.new_empty((E, N, K), dtype=b_dtype).transpose(-2, -1)
    return grad_A, grad_B


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B_t, offs, padded_offs, source_rows, padded_positions, gemm, wgrad_with_hp, keep_weight = inputs
    _, weight_n_data, weight_n_scales = output
    ctx.save_for_backward(A, offs, padded_offs, source_rows, padded_positions, weight_n_data, weight_n_scales)
    ctx.mark_non_differentiable(weight_n_data, weight_n_scales)
    ctx.set_materialize_grads(False)
    ctx.gemm, ctx.wgrad_with_hp, ctx.b_dtype = gemm, wgrad_with_hp, B_t.dtype


def _backward(ctx, grad_out, _grad_data, _grad_scales):  # type: ignore[no-untyped-def]
    none = (None,) * 9
    if grad_out is None:
        return none
    need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_A, grad_B = _torch_backward(
        grad_out.contiguous(), *ctx.saved_tensors, ctx.gemm, ctx.wgrad_with_hp, ctx.b_dtype, need_A, need_B
    )
    return (grad_A if need_A else None), (grad_B if need_B else None), *none[2:]


_torch_forward.register_autograd(_backward, setup_context=_setup)


def _apply(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, gemm: ScaledGroupedMM, key: str, wgrad_with_hp: bool) -> torch.Tensor:
    """Eagerly the autograd.Function; under torch.compile the custom op (``key`` names ``gemm`` there)."""
    if not torch.compiler.is_compiling():
        return _TorchMXFP8.apply(A, B_t, offs, gemm, wgrad_with_hp)
    padding = token_group_padding(offs, A.shape[0], ALIGNMENT)
    keep_weight = torch.is_grad_enabled() and A.requires_grad  # what the Function's needs_input_grad[0] says
    return _torch_forward(
        A, B_t, offs, padding.padded_offs, padding.source_rows, padding.padded_positions, key, wgrad_with_hp, keep_weight
    )[0]


def torch_native_call(gemm: ScaledGroupedMM, wgrad_with_hp: bool) -> GroupedMMCall:
    """torch's MXFP8 grouped GEMM as a ``call(A, B_t, offs, out_dtype)`` for ``backends.make_mxfp8``.

    Any group sizes (the quantisers pad); the result is bf16 (torch's kernel emits nothing else).
    No host sync (``offs`` is read on the device only); under ``torch.compile`` two opaque custom
    ops, no graph break.
    """
    key = _gemm_key(gemm)

    def torch_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _apply(A, B_t, offs, gemm, key, wgrad_with_hp)

    return torch_mxfp8


@dataclass(frozen=True)
class TorchNative:
    """What :func:`resolve_torch_native` found: the callable and its row, or every reason it is unavailable."""

    fn: Optional[Any]
    row: Optional[TorchGeneration]
    smoke: Optional[Any]
    reasons: tuple[str, ...]


def resolve_torch_native(
    device: torch.device, *, validate: bool, wgrad_with_hp: bool, shape_fallback: Optional[Any]
) -> TorchNative:
    """torch's own MXFP8 grouped GEMM on ``device`` behind mxfp8_compat's contract, or why not.

    Row located and fingerprinted, device gate (torch's verdict), then the smoke run: MXFP8
    recognised on the device before anything uses it. ``reasons`` of a success are notes.
    """
    from .grouped_mm import make_mxfp8

    match = match_torch_generation()
    if match.row is None:
        return TorchNative(None, None, None, match.reasons or (f"no torch MXFP8 row fits torch {torch.__version__}",))
    row = match.row
    problem = torch_kernel_problem(row, device)
    if problem is not None:
        return TorchNative(None, row, None, match.reasons + (problem,))
    fn = make_mxfp8(
        torch_native_call(match.gemm(), wgrad_with_hp),
        validate=validate,
        contiguous_grad=True,
        bf16_operands=True,
        group_alignment=1,  # the quantisers pad, fused: nothing for the wrapper to pad
        shape_multiple=BLOCK_SIZE,
        shape_fallback=shape_fallback,
        label=f"torch {torch.__version__} native MXFP8 ({match.location})",
        float32_out=False,  # torch's MXFP8 grouped kernel emits bf16 only: float32 is the bf16 result upcast
    )
    smoke = smoke_probe.smoke_run(fn, device, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=wgrad_with_hp, exact=False)
    if smoke.problem is not None:
        return TorchNative(None, row, smoke, match.reasons + (f"torch's native MXFP8 ({row.key}, {match.location}) failed its smoke run: {smoke.problem}",))
    return TorchNative(fn, row, smoke, match.reasons + (f"native MXFP8 through {match.location} (torch row {row.key}), mxfp8_compat's quantisers",))
