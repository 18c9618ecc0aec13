"""Triton kernels behind :mod:`mxfp8_compat.token_groups` (CUDA only; imported on first use).

Each launcher takes and returns torch tensors and reads nothing on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

__all__ = ["gather_rows", "token_group_layout", "zero_rows_after"]


# Row counts change with every batch's routing: not specialising on them (divisibility by 16,
# == 1) keeps one compiled variant per column width instead of several.
@triton.jit(do_not_specialize=["n_src", "n_out"])
def _gather_rows_kernel(
    x_ptr, index_ptr, out_ptr, n_src, n_out, n_cols, stride_xr, stride_xc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _gather_rows_job(x_ptr, index_ptr, out_ptr, n_src, n_out, n_cols, stride_xr, stride_xc,
                     tl.program_id(0), tl.program_id(1), BLOCK_R, BLOCK_C)


# Kernel bodies are jobs taking their program ids, so that tests/test_kernel_bounds.py can run
# any one program (past 2**31 elements) in triton's interpreter.
@triton.jit
def _gather_rows_job(x_ptr, index_ptr, out_ptr, n_src, n_out, n_cols, stride_xr, stride_xc, pid_r, pid_c,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_out
    src = tl.load(index_ptr + rows, mask=row_ok, other=n_src)
    keep = src < n_src
    col_ok = cols < n_cols
    # int64 addresses: a column-strided x (stride_xc = M) reaches 2**31 elements at M * N >= 2**31
    values = tl.load(
        x_ptr + src[:, None].to(tl.int64) * stride_xr + cols[None, :].to(tl.int64) * stride_xc,
        mask=keep[:, None] & col_ok[None, :],
        other=0.0,
    )
    out_offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    tl.store(out_ptr + out_offsets, values, mask=row_ok[:, None] & col_ok[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[index[r]]`` (zeros where ``index[r] >= len(x)``), one read and one write per row.

    ``x`` may have any strides; ``index`` is read as a flat array (the launch makes it contiguous).
    """
    n_out, n_cols = index.shape[0], x.shape[1]
    out = x.new_empty((n_out, n_cols))
    if n_out == 0 or n_cols == 0:
        return out
    # 16 x 1024 elements per program, 8 warps: 3.85-3.91 TB/s on an H200 at the E=64 MoE shape's unpads
    # (95% of a contiguous copy_), against 3.70-3.76 TB/s for 16 x 256 (benchmarks/gather_tiles.py)
    block_c = min(1024, triton.next_power_of_2(n_cols))
    block_r = max(1, 16384 // block_c)
    grid = (triton.cdiv(n_out, block_r), triton.cdiv(n_cols, block_c))
    launch(
        _gather_rows_kernel, grid,
        x, index, out, x.shape[0], n_out, n_cols, x.stride(0), x.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )
    return out


@triton.jit(do_not_specialize=["rows", "padded_rows", "align"])
def _layout_kernel(
    offs_ptr, padded_offs_ptr, source_ptr, position_ptr, n_groups, rows, padded_rows, align,
    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # int32 throughout (row counts stay below 2**31); tiles of BLOCK_R x BLOCK_E <= 2048
    # elements keep every program in registers (larger int64 tiles spilled: 0.7 ms at E=64).
    e = tl.arange(0, BLOCK_E)
    e_ok = e < n_groups
    ends = tl.load(offs_ptr + e, mask=e_ok, other=0)
    previous = tl.load(offs_ptr + e - 1, mask=e_ok & (e > 0), other=0)
    sizes = tl.where(e_ok, tl.maximum(ends - previous, 0), 0)
    starts = ends - sizes
    padded_sizes = (sizes + (align - 1)) // align * align
    padded_ends = tl.cumsum(padded_sizes, 0)
    padded_starts = padded_ends - padded_sizes
    # the last group runs to the buffer's end (its extra rows are padding): no row is left unwritten
    padded_ends = tl.where(e == n_groups - 1, padded_rows, padded_ends)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(padded_offs_ptr + e, padded_ends, mask=e_ok)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    # padded row -> group (how many padded ends lie at or before it) -> source row
    group = tl.sum(((padded_ends[None, :] <= r[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
    pick = e[None, :] == group[:, None]
    within = r - tl.sum(tl.where(pick, padded_starts[None, :], 0), axis=1)
    holds = (group < n_groups) & (within < tl.sum(tl.where(pick, sizes[None, :], 0), axis=1))
    source = tl.where(holds, tl.sum(tl.where(pick, starts[None, :], 0), axis=1) + within, rows)
    source = tl.minimum(tl.maximum(source, 0), rows)
    tl.store(source_ptr + r, source.to(tl.int64), mask=r < padded_rows)
    # unpadded row -> group (how many ends lie at or before it) -> padded row
    group = tl.sum(((ends[None, :] <= r[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
    pick = e[None, :] == group[:, None]
    shift = tl.sum(tl.where(pick, (padded_starts - starts)[None, :], 0), axis=1)
    position = tl.where(group < n_groups, r + shift, padded_rows)
    position = tl.minimum(tl.maximum(position, 0), padded_rows)
    tl.store(position_ptr + r, position.to(tl.int64), mask=r < rows)


def token_group_layout(
    offs: torch.Tensor, rows: int, padded_rows: int, alignment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """padded ends, source row of each padded row, padded row of each row: one launch."""
    groups = offs.shape[0]
    padded_offs = torch.empty(groups, dtype=torch.int32, device=offs.device)
    source_rows = torch.empty(padded_rows, dtype=torch.int64, device=offs.device)
    padded_positions = torch.empty(rows, dtype=torch.int64, device=offs.device)
    block_e = max(16, triton.next_power_of_2(groups))
    block_r = max(8, min(256, 2048 // block_e))
    grid = (max(1, triton.cdiv(max(rows, padded_rows), block_r)),)
    launch(
        _layout_kernel, grid,
        offs, padded_offs, source_rows, padded_positions, groups, rows, padded_rows, alignment,
        BLOCK_E=block_e, BLOCK_R=block_r, num_warps=4,
    )
    return padded_offs, source_rows, padded_positions


@triton.jit(do_not_specialize=["n_rows"])
def _zero_rows_after_kernel(x_ptr, offs_ptr, last, n_rows, n_cols, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    _zero_rows_after_job(x_ptr, offs_ptr, last, n_rows, n_cols, stride_r, tl.program_id(0), tl.program_id(1),
                         BLOCK_R, BLOCK_C)


@triton.jit
def _zero_rows_after_job(x_ptr, offs_ptr, last, n_rows, n_cols, stride_r, pid_r, pid_c,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    end = tl.load(offs_ptr + last)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Rows before offs[-1] are masked off: their blocks store nothing, so only the tail's bytes move.
    mask = ((rows >= end) & (rows < n_rows))[:, None] & (cols < n_cols)[None, :]
    zeros = tl.zeros((BLOCK_R, BLOCK_C), dtype=x_ptr.dtype.element_ty)
    tl.store(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], zeros, mask=mask)


def zero_rows_after(x: torch.Tensor, offs: torch.Tensor) -> None:
    """Zero the rows of ``x`` (2D, unit column stride) from ``offs[-1]`` on, in place."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    block_c = min(256, triton.next_power_of_2(x.shape[1]))
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(x.shape[0], block_r), triton.cdiv(x.shape[1], block_c))
    launch(
        _zero_rows_after_kernel, grid,
        x, offs, offs.shape[0] - 1, x.shape[0], x.shape[1], x.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
    )
