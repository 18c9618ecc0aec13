"""Token-group padding without a host sync: any group sizes reach kernels that need aligned ones.

MoE routing gives each expert any number of tokens (0, 1, 37, ...). torchao's MXFP8 kernels
need every group's size to be a multiple of an alignment (a row's ``group_multiple``: 32, or 128 for a native
kernel), and a wrong size is a wrong result, an illegal memory access or a device-side
assert that kills the process. Reading ``offs`` on the host to check would cost a device
sync on every call, so the MXFP8 callables pad instead, entirely on the device, the way MoE
stacks do (torchtitan's ``generate_permute_indices``, torchao's ``permute_and_pad``):

* group sizes from ``offs``, padded sizes ``ceil(size / a) * a`` (an empty group stays empty),
  padded ends by ``cumsum``;
* a buffer of a *static* length known on the host, ``round_up(M + E * (a - 1), a)``, which
  every padded layout fits;
* one row gather in (padding rows read as zeros) and one row gather out, forward and
  backward; each gather's backward is a gather through the inverse map, so gradients are
  exact and deterministic (no atomics).

Rows after ``offs[-1]`` (a dispatcher's static-length buffer) are dropped on the way in and
come back as zeros, so their input gradient is zero.

Dispatchers that already permute tokens can pad in the same pass (``Resolution.group_alignment``
says to what) and then promise it with ``groups_aligned=True``, which skips this module.
"""

from __future__ import annotations

from dataclasses import dataclass


import torch

__all__ = [
    "TokenGroupPadding",
    "padded_rows_bound",
    "token_group_padding",
    "pad_token_groups",
    "unpad_token_groups",
    "pad_with",
    "zero_rows_after",
    "gather_rows",
    "gather_rows_with_inverse",
]


def padded_rows_bound(rows: int, groups: int, alignment: int) -> int:
    """Rows of a buffer that holds ``rows`` tokens in ``groups`` groups, each padded to ``alignment``.

    ``round_up(rows + groups * (alignment - 1), alignment)``: every group adds fewer than
    ``alignment`` padding rows, and the total is itself a multiple of ``alignment`` (a native
    quantiser may assert ``M % 128 == 0``). Known on the host, so no sync.
    """
    if alignment <= 1:
        return rows
    return -(-(rows + groups * (alignment - 1)) // alignment) * alignment


@dataclass(frozen=True)
class TokenGroupPadding:
    """Where each token goes in the padded buffer, and back. All index tensors live on the device.

    Attributes:
        alignment: the multiple every padded group size (and ``padded_rows``) has.
        rows: M, the rows of the unpadded tensor.
        padded_rows: the static length of the padded buffer (:func:`padded_rows_bound`).
        padded_offs: int32 ``(E,)`` cumulative ends of the padded groups (multiples of ``alignment``).
            The last group runs to ``padded_rows``: its extra rows are padding (zeros), and no row
            of the buffer lies after the last group. Kernels leave such rows of their outputs and
            gradients unwritten (uninitialised memory, which ``torch.autograd.detect_anomaly()``
            reports as NaN); here every row is computed, from zeros where it is padding.
        source_rows: int64 ``(padded_rows,)``: the unpadded row each padded row holds, ``rows``
            for a padding row (read as zeros).
        padded_positions: int64 ``(rows,)``: the padded row of each unpadded row,
            ``padded_rows`` for rows after ``offs[-1]`` (which come back as zeros).
    """

    alignment: int
    rows: int
    padded_rows: int
    padded_offs: torch.Tensor
    source_rows: torch.Tensor
    padded_positions: torch.Tensor


def token_group_padding(offs: torch.Tensor, rows: int, alignment: int) -> TokenGroupPadding:
    """Compute the padded layout of token groups ending at ``offs`` (no host sync).

    Args:
        offs: int32 ``(E,)`` cumulative group ends, ``offs[-1] <= rows``; read only on the device.
        rows: M, the number of rows the groups index into.
        alignment: the multiple each padded group size must have (>= 1).

    One small kernel on CUDA (the dozen tensor ops of the portable version cost ~0.5 ms of
    launches there). Malformed ``offs`` (decreasing, negative, past ``rows``) cannot be
    detected without a sync; the index maps are clamped so that such input never reads or
    writes out of bounds.
    """
    if alignment < 1:
        raise ValueError(f"alignment: expected a positive integer, got {alignment}")
    padded_rows = padded_rows_bound(rows, offs.shape[0], alignment)
    # The custom op is for torch.compile (opaque, with a fake); eagerly its dispatch would
    # cost more than the kernel, so the implementation is called directly.
    layout = _token_group_layout if torch.compiler.is_compiling() else _token_group_layout_impl
    padded_offs, source_rows, padded_positions = layout(offs, rows, padded_rows, alignment)
    return TokenGroupPadding(alignment, rows, padded_rows, padded_offs, source_rows, padded_positions)


def _token_group_layout_impl(
    offs: torch.Tensor, rows: int, padded_rows: int, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(padded_offs int32 (E,), source_rows int64 (padded_rows,), padded_positions int64 (rows,))."""
    if offs.is_cuda and offs.shape[0] > 0:
        launch = _triton_kernel("token_group_layout")
        if launch is not None:
            return launch(offs, rows, padded_rows, alignment)
    return _token_group_layout_torch(offs, rows, padded_rows, alignment)


@torch.library.custom_op("mxfp8_compat::token_group_layout", mutates_args=())
def _token_group_layout(
    offs: torch.Tensor, rows: int, padded_rows: int, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_token_group_layout_impl` as an op ``torch.compile`` keeps opaque."""
    return _token_group_layout_impl(offs, rows, padded_rows, alignment)


@_token_group_layout.register_fake
def _(offs, rows, padded_rows, alignment):  # type: ignore[no-untyped-def]
    return (
        offs.new_empty(offs.shape, dtype=torch.int32),
        offs.new_empty((padded_rows,), dtype=torch.int64),
        offs.new_empty((rows,), dtype=torch.int64),
    )


def _token_group_layout_torch(
    offs: torch.Tensor, rows: int, padded_rows: int, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device, groups = offs.device, offs.shape[0]
    if groups == 0:
        return (
            offs.to(torch.int32),
            torch.full((padded_rows,), rows, dtype=torch.int64, device=device),
            torch.full((rows,), padded_rows, dtype=torch.int64, device=device),
        )
    ends = offs.to(torch.int64)
    previous = torch.cat([ends.new_zeros(1), ends[:-1]])
    sizes = (ends - previous).clamp_(min=0)
    starts = ends - sizes
    padded_sizes = (sizes + (alignment - 1)) // alignment * alignment
    padded_ends = torch.cumsum(padded_sizes, 0)
    padded_starts = padded_ends - padded_sizes
    padded_ends[-1] = padded_rows  # the last group runs to the buffer's end (see TokenGroupPadding)

    # padded row j -> its group, its position in the group, the source row (or `rows`: padding)
    j = torch.arange(padded_rows, device=device)
    group = torch.searchsorted(padded_ends, j, right=True)
    group_c = group.clamp(max=groups - 1)
    within = j - padded_starts[group_c]
    holds_token = (group < groups) & (within < sizes[group_c])
    source_rows = torch.where(holds_token, starts[group_c] + within, rows).clamp_(0, rows)

    # unpadded row i -> its group -> its padded row (or `padded_rows`: after offs[-1])
    i = torch.arange(rows, device=device)
    group = torch.searchsorted(ends, i, right=True)
    group_c = group.clamp(max=groups - 1)
    position = padded_starts[group_c] + (i - starts[group_c])
    padded_positions = torch.where(group < groups, position, padded_rows).clamp_(0, padded_rows)
    return padded_ends.to(torch.int32), source_rows, padded_positions


# --- kernels --------------------------------------------------------------------------------

_TRITON_KERNELS: dict[str, object] = {}


def _triton_kernel(name: str):  # type: ignore[no-untyped-def]
    """The Triton launcher ``name`` from :mod:`.kernels.token_groups`, or None without (working) triton.

    Imported on first CUDA use only: importing mxfp8_compat never imports triton.
    """
    if name not in _TRITON_KERNELS:
        try:
            from .kernels import token_groups as _token_group_kernels

            _TRITON_KERNELS[name] = getattr(_token_group_kernels, name)
        except Exception:  # noqa: BLE001 - no (working) triton: the portable torch version serves
            _TRITON_KERNELS[name] = None
    return _TRITON_KERNELS[name]


def _gather_rows_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[index[r]]``, zeros where ``index[r] >= x.shape[0]``."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros((index.shape[0],) + tuple(x.shape[1:]))
    out = torch.index_select(x, 0, index.clamp(max=n - 1))
    return out.masked_fill_((index >= n).unsqueeze(-1), 0)


def _gather_rows_impl(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[index[r]]`` for a 2D ``x``; rows with ``index[r] >= x.shape[0]`` are zero.

    On CUDA one Triton kernel reads each kept row once and writes each output row once (at
    copy bandwidth); elsewhere ``index_select`` plus a masked fill.
    """
    if x.is_cuda and x.dim() == 2:
        launch = _triton_kernel("gather_rows")
        if launch is not None:
            return launch(x, index)
    return _gather_rows_torch(x, index)


@torch.library.custom_op("mxfp8_compat::gather_rows", mutates_args=())
def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`_gather_rows_impl` as an op ``torch.compile`` keeps opaque."""
    return _gather_rows_impl(x, index)


@_gather_rows.register_fake
def _(x, index):  # type: ignore[no-untyped-def]
    return x.new_empty((index.shape[0],) + tuple(x.shape[1:]))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[index[r]]`` for a 2D ``x``, zeros where ``index[r] >= x.shape[0]`` (no autograd).

    The building block of the padding's gathers and their backward (and of the transformers
    integration's token permutation). Under torch.compile an opaque custom op; eagerly the
    kernel itself, whose launch costs less than the custom op's dispatch.
    """
    return _gather_rows(x, index) if torch.compiler.is_compiling() else _gather_rows_impl(x, index)


class _GatherRows(torch.autograd.Function):
    """Row gather whose backward is the gather through the inverse map (a bijection on kept rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return gather_rows(grad, inverse), None, None


def gather_rows_with_inverse(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """:func:`gather_rows`, differentiable: its backward is the gather through ``inverse``.

    Exact where ``index`` and ``inverse`` are inverse maps on the rows kept (each kept source
    row is read once), as the padding's maps are; deterministic (no atomics).
    """
    return _GatherRows.apply(x, index, inverse)


def pad_token_groups(
    x: torch.Tensor, offs: torch.Tensor, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, TokenGroupPadding]:
    """Pad each token group of ``x`` (M, K) to a multiple of ``alignment`` rows, on the device.

    Returns ``(x_padded, padded_offs, padding)``: ``x_padded`` has ``padding.padded_rows``
    rows (padding rows and the tail after the last group are zeros), ``padded_offs`` the
    padded group ends to pass to the kernel, and ``padding`` what :func:`unpad_token_groups`
    needs. Differentiable in ``x``; no host sync.
    """
    padding = token_group_padding(offs, x.shape[0], alignment)
    return pad_with(x, padding), padding.padded_offs, padding


def pad_with(x: torch.Tensor, padding: TokenGroupPadding) -> torch.Tensor:
    """Pad ``x`` with an existing :class:`TokenGroupPadding` (e.g. a gradient with the same groups)."""
    return gather_rows_with_inverse(x, padding.source_rows, padding.padded_positions)


def unpad_token_groups(y: torch.Tensor, padding: TokenGroupPadding) -> torch.Tensor:
    """Inverse of :func:`pad_token_groups`: the ``padding.rows`` rows of ``y`` that hold tokens.

    Rows after the last group come back as zeros. Differentiable; no host sync.
    """
    return gather_rows_with_inverse(y, padding.padded_positions, padding.source_rows)


def zero_rows_after(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` with its rows from ``offs[-1]`` on set to zero (no host sync on a GPU).

    On CUDA with triton the rows are zeroed in place (only the tail is touched: for a
    kernel's fresh gradient buffer, which nothing else holds); elsewhere a new tensor.
    """
    if offs.shape[0] == 0:
        return torch.zeros_like(x)
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and not torch.compiler.is_compiling():
        launch = _triton_kernel("zero_rows_after")
        if launch is not None:
            launch(x, offs)
            return x
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
    return torch.where(rows < offs[-1].to(torch.int64), x, torch.zeros((), dtype=x.dtype, device=x.device))
