"""MXFP8 on Blackwell with torch alone: torch's own MXFP8 grouped GEMM, fed by mxfp8_compat's quantisers.

torch ships the sm_100 kernel (``F.scaled_grouped_mm`` / ``torch._scaled_grouped_mm``, MSLK's
``mx8mx8bf16_grouped``); what a caller must supply is the operands in the layout it reads
(``shared/torch-scaled-grouped-mm.md``): float8_e4m3fn data, e8m0 scales (RCEIL) per 32 elements
along the contraction dimension, each group's scales in the 128x4 blocked layout. The quantisers
here (:mod:`._mx_quant_kernels`, Triton) write exactly that:

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

from . import probes
from ._kernel_launch import kernel_module, launch
from .generations import TORCH_GENERATIONS, GroupedMMCall, ScaledGroupedMM, TorchGeneration
from .quantize import BLOCK_SIZE, ScaleMode
from .reference import wgrad_gemm
from .token_groups import TokenGroupPadding, gather_rows, token_group_padding

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
    return kernel_module("_mx_quant_kernels", interpret)


@functools.lru_cache(maxsize=None)
def _launch(device: torch.device) -> tuple[ModuleType, bool, dict]:
    """(kernels, hardware conversion, launch options) for ``device``."""
    interpret = device.type != "cuda"
    hw = not interpret and torch.cuda.get_device_capability(device) >= (8, 9)
    return _kernels(interpret), hw, ({} if interpret else {"enable_fp_fusion": False})


def _src(x: torch.Tensor, hw: bool) -> torch.Tensor:
    """bf16 is read through an int16 view on the arithmetic path."""
    return x.view(torch.int16) if (x.dtype == torch.bfloat16 and not hw) else x


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
    """The row of :data:`~mxfp8_compat.generations.TORCH_GENERATIONS` for torch ``version`` (default: this one).

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
    major, minor = probes.device_capability(device) or (0, 0)
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


class _TorchMXFP8(torch.autograd.Function):
    """out = torch's MXFP8 grouped GEMM of q_K(A) and q_K(B); dA = q_N(dY) q_N(B)^T; dB = q_M(A)^T q_M(dY)
    per group (or A^T dY in bf16 with ``wgrad_with_hp``). Groups are padded inside the quantisers;
    the outputs are unpadded by one row gather each."""

    @staticmethod
    def forward(ctx, A, B_t, offs, gemm, wgrad_with_hp):  # type: ignore[override]
        padding = token_group_padding(offs, A.shape[0], ALIGNMENT)
        a = quantize_rows(A, padding)
        along_k, along_n = quantize_weight(B_t, along_k=True, along_n=ctx.needs_input_grad[0])
        assert along_k is not None
        out = gemm(a.data, along_k.data.transpose(-2, -1), a.scales, along_k.scales, padding.padded_offs)
        keep = (along_n.data, along_n.scales) if along_n is not None else ()
        ctx.save_for_backward(A, offs, padding.padded_offs, padding.source_rows, padding.padded_positions, *keep)
        ctx.gemm, ctx.wgrad_with_hp, ctx.padded_rows, ctx.b_shape, ctx.b_dtype = gemm, wgrad_with_hp, padding.padded_rows, B_t.shape, B_t.dtype
        return gather_rows(out, padding.padded_positions)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        A, offs, padded_offs, source_rows, padded_positions, *kept = ctx.saved_tensors
        padding = TokenGroupPadding(ALIGNMENT, A.shape[0], ctx.padded_rows, padded_offs, source_rows, padded_positions)
        grad_out = grad_out.contiguous()
        grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight_n, weight_n_scales = kept
            g = quantize_rows(grad_out, padding)
            grad_A = gather_rows(ctx.gemm(g.data, weight_n.transpose(-2, -1), g.scales, weight_n_scales, padded_offs), padded_positions).to(A.dtype)
        if ctx.needs_input_grad[1]:
            E = ctx.b_shape[0]
            if ctx.wgrad_with_hp:
                grad_B = wgrad_gemm(A, grad_out.to(A.dtype), offs, E, ctx.b_dtype)
            else:
                g_t, a_t = quantize_grouped_columns(grad_out, padding), quantize_grouped_columns(A, padding)
                grad_B = ctx.gemm(g_t.data, a_t.data.t(), g_t.scales, a_t.scales, padded_offs).transpose(-2, -1).to(ctx.b_dtype)
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))  # empty groups: the kernel writes nothing
            grad_B = torch.where((sizes > 0).view(-1, 1, 1), grad_B, torch.zeros((), dtype=grad_B.dtype, device=grad_B.device))
        return grad_A, grad_B, None, None, None


# The Triton launches and autograd.Function are not traced by torch.compile: a compiled caller
# runs this call eagerly (a graph break), as it does a first resolve().
@torch.compiler.disable
def _apply(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, gemm: ScaledGroupedMM, wgrad_with_hp: bool) -> torch.Tensor:
    return _TorchMXFP8.apply(A, B_t, offs, gemm, wgrad_with_hp)


def torch_native_call(gemm: ScaledGroupedMM, wgrad_with_hp: bool) -> GroupedMMCall:
    """torch's MXFP8 grouped GEMM as a ``call(A, B_t, offs, out_dtype)`` for ``backends.make_mxfp8``.

    Any group sizes (the quantisers pad); the result is bf16 (torch's kernel emits nothing else).
    """

    def torch_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _apply(A, B_t, offs, gemm, wgrad_with_hp)

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
    from .backends import make_mxfp8

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
    smoke = probes.smoke_run(fn, device, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=wgrad_with_hp, exact=False)
    if smoke.problem is not None:
        return TorchNative(None, row, smoke, match.reasons + (f"torch's native MXFP8 ({row.key}, {match.location}) failed its smoke run: {smoke.problem}",))
    return TorchNative(fn, row, smoke, match.reasons + (f"native MXFP8 through {match.location} (torch row {row.key}), mxfp8_compat's quantisers",))
