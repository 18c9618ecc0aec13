"""Run every Triton kernel of mxfp8_compat at offsets past 2**31 and 2**32, in triton's interpreter.

Run by tests/test_kernel_bounds.py in a child process: an address computed in int32 wraps and
reads or writes out of bounds, which kills the process (a segfault here, an illegal memory
access on a GPU) rather than failing an assertion. Prints one JSON line per case as it
finishes, ``{"case": name, "ok": bool, "detail": str}``; a case that crashed is the one missing.

The tensors are CPU allocations of 4-8 GB that are never touched but for the rows a case
reads or writes: the kernel runs only the program that covers the tail (each kernel's body
is a job taking its program ids), so a case costs a few pages of memory and well under a second.
bf16 data goes through int16 views, as on the interpreter's arithmetic path.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mxfp8_compat.kernels.launch import kernel_module  # noqa: E402
from mxfp8_compat.numerics.quantize import mx_fake_quantize, mx_fake_quantize_grouped_rows, mx_quantize  # noqa: E402
from mxfp8_compat.token_groups import token_group_padding  # noqa: E402

import torch_blocked as tb  # noqa: E402  (this directory: torch's to_blocked, and its inverse)

FAST = kernel_module("fast_quant", True)
GROUPS = kernel_module("token_groups", True)
MXQ = kernel_module("mx_quant", True)
torch.manual_seed(0)


def _random_bf16(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32).mul_(3).to(torch.bfloat16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


# --- probe kernels: run one program of a job, chosen by the arguments ------------------------


@triton.jit
def blocks_probe(x_ptr, y_ptr, n_blocks, pid, BLOCKS: tl.constexpr):
    FAST._blocks_job(x_ptr, y_ptr, n_blocks, pid, True, True, False, BLOCKS)


@triton.jit
def weight_probe(x_ptr, yk_ptr, yn_ptr, N, K, stride_e, stride_n, stride_k, q, k_programs, BK: tl.constexpr):
    FAST._weight_job(x_ptr, yk_ptr, yn_ptr, N, K, stride_e, stride_n, stride_k, q, k_programs, True, True, True, True,
                     False, BK)


@triton.jit
def grouped_rows_probe(x_ptr, y_ptr, offs_ptr, M, C, E, n_block_programs, pid, c_pid, E_PAD: tl.constexpr,
                       BC: tl.constexpr):
    FAST._grouped_rows_job(x_ptr, y_ptr, offs_ptr, M, C, E, n_block_programs, pid, c_pid, True, True, False, E_PAD, BC)


@triton.jit
def zero_unused_probe(grad_a_ptr, grad_b_ptr, offs_ptr, M, K, E, KN, a_programs, b_programs, pid,
                      E_PAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    FAST._zero_unused_job(grad_a_ptr, grad_b_ptr, offs_ptr, M, K, E, KN, a_programs, b_programs, pid, E_PAD, BLOCK,
                          ITERS)


@triton.jit
def zero_rows_after_probe(x_ptr, offs_ptr, last, n_rows, n_cols, stride_r, pid_r, pid_c, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    GROUPS._zero_rows_after_job(x_ptr, offs_ptr, last, n_rows, n_cols, stride_r, pid_r, pid_c, BLOCK_R, BLOCK_C)


@triton.jit
def mx_rows_probe(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, E, SC, pid_rows, pid_cols,
                  BC: tl.constexpr, E_PAD: tl.constexpr):
    MXQ._quantize_rows_job(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, E, SC, pid_rows, pid_cols, True, False,
                           BC, E_PAD)


@triton.jit
def mx_weight_probe(w_ptr, qk_ptr, sk_ptr, qn_ptr, sn_ptr, N, K, stride_e, stride_n, stride_k, k_programs, q,
                    BK: tl.constexpr):
    MXQ._quantize_weight_job(w_ptr, qk_ptr, sk_ptr, qn_ptr, sn_ptr, N, K, stride_e, stride_n, stride_k, k_programs,
                             q, True, True, True, False, BK)


@triton.jit
def mx_columns_probe(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, P, E, pid_rows, pid_cols,
                     BC: tl.constexpr, E_PAD: tl.constexpr):
    MXQ._quantize_grouped_columns_job(x_ptr, src_ptr, q_ptr, s_ptr, offs_ptr, M, C, P, E, pid_rows, pid_cols, True,
                                      False, BC, E_PAD)


# --- cases ----------------------------------------------------------------------------------


def case_blocks(elements: int) -> str:
    """The activation quantiser's last program, for a tensor of ``elements`` (a multiple of 32)."""
    blocks_per_program = 64
    x = torch.empty(elements, dtype=torch.bfloat16)
    y = torch.empty(elements + 64, dtype=torch.bfloat16)  # 64 guard elements after the end
    n_blocks = elements // 32
    last = (n_blocks - 1) // blocks_per_program
    start = last * blocks_per_program * 32
    x[start:] = _random_bf16((elements - start,))
    y[start:] = float("nan")
    blocks_probe[(1,)](_bits(x), _bits(y), n_blocks, last, BLOCKS=blocks_per_program)
    expected = mx_fake_quantize(x[start:].view(-1, 32).float(), dim=-1).to(torch.bfloat16).view(-1)
    assert torch.equal(_bits(y[start:elements]), _bits(expected)), "tail blocks differ from the reference"
    assert torch.isnan(y[elements:]).all(), "the kernel wrote past the tensor's end"
    return f"last program {last} at element {start} of {elements}"


def case_weight() -> str:
    """The weight quantiser's last tile, where E * N * K passes 2**31 (outputs (E, N, K))."""
    E, K, N, BK = 3, 2**15, 2**15, 128
    w = torch.empty((E, K, N), dtype=torch.bfloat16)  # row-major (E, K, N): w^T strides (K*N, 1, N)
    wk = torch.empty((E, N, K), dtype=torch.bfloat16)
    wn = torch.empty((E, N, K), dtype=torch.bfloat16)
    tile = _random_bf16((BK, 32))
    w[E - 1, K - BK:, N - 32:] = tile
    w_t = w.transpose(-2, -1)
    k_programs = K // BK
    q = E * (N // 32) * k_programs - 1
    weight_probe[(1,)](_bits(w_t), _bits(wk), _bits(wn), N, K, *w_t.stride(), q, k_programs, BK=BK)
    tile_t = tile.t().float()  # (32 rows of N, BK columns of K)
    along_k = mx_fake_quantize(tile_t, dim=1).to(torch.bfloat16)
    along_n = mx_fake_quantize(tile_t, dim=0).to(torch.bfloat16)
    assert torch.equal(_bits(wk[E - 1, N - 32:, K - BK:]), _bits(along_k)), "weight along K differs"
    assert torch.equal(_bits(wn[E - 1, N - 32:, K - BK:]), _bits(along_n)), "weight along N differs"
    return f"tile {q} at element {(E - 1) * N * K + (N - 32) * K + K - BK} of {E * N * K}"


def case_grouped_rows() -> str:
    """The weight-gradient quantiser's last row block, where M * C passes 2**31."""
    M, C, BC = 2**18 + 64, 8192, 128
    x = torch.empty((M, C), dtype=torch.bfloat16)
    y = torch.empty((M, C), dtype=torch.bfloat16)
    x[M - 32:, C - BC:] = _random_bf16((32, BC))
    offs = torch.tensor([M], dtype=torch.int32)
    row_blocks = triton.cdiv(M, 32)
    grouped_rows_probe[(1,)](_bits(x), _bits(y), offs, M, C, 1, row_blocks + 1, row_blocks - 1, C // BC - 1,
                             E_PAD=2, BC=BC)
    expected = mx_fake_quantize_grouped_rows(x[M - 32:, C - BC:].float(), torch.tensor([32], dtype=torch.int32))
    assert torch.equal(_bits(y[M - 32:, C - BC:]), _bits(expected.to(torch.bfloat16))), "last row block differs"
    return f"row block {row_blocks - 1} at element {(M - 32) * C + C - BC} of {M * C}"


def case_zero_unused() -> str:
    """Zeroing the input-gradient rows after offs[-1] and an empty group's weight gradient past 2**31."""
    M, K = 2**18 + 64, 8192
    E, KN = 3, 2**30  # the last expert's gradient starts at element 2**31
    chunk = 4096 * 16
    grad_a = torch.empty((M, K), dtype=torch.float32)
    grad_b = torch.empty((E, KN), dtype=torch.float32)
    tail = slice((M - 8), M)
    grad_a[tail] = 1.0
    grad_b[E - 1, KN - chunk:] = 1.0
    offs = torch.tensor([M - 5, M - 5, M - 5], dtype=torch.int32)  # group 3 (E - 1) is empty
    a_programs = triton.cdiv(M * K, chunk)
    b_programs = triton.cdiv(KN, chunk)
    zero_unused_probe[(1,)](grad_a, grad_b, offs, M, K, E, KN, a_programs, b_programs, a_programs - 1,
                            E_PAD=4, BLOCK=4096, ITERS=16)
    zero_unused_probe[(1,)](grad_a, grad_b, offs, M, K, E, KN, a_programs, b_programs,
                            a_programs + E * b_programs - 1, E_PAD=4, BLOCK=4096, ITERS=16)
    assert (grad_a[M - 5:] == 0).all(), "rows after offs[-1] were not zeroed"
    assert (grad_a[M - 8:M - 5] == 1).all(), "rows before offs[-1] were zeroed"
    assert (grad_b[E - 1, KN - chunk:] == 0).all(), "the empty group's weight gradient was not zeroed"
    return f"grad_A element {(M - 5) * K} of {M * K}; grad_B element {(E - 1) * KN} of {E * KN}"


def case_zero_rows_after() -> str:
    """The padding backward's tail zeroing, where M * N passes 2**31."""
    M, N, BLOCK_C = 2**18 + 64, 8192, 256
    block_r = 4096 // BLOCK_C
    x = torch.empty((M, N), dtype=torch.float32)
    x[M - block_r:] = 1.0
    offs = torch.tensor([M - 3], dtype=torch.int32)
    zero_rows_after_probe[(1,)](x, offs, 0, M, N, x.stride(0), triton.cdiv(M, block_r) - 1, N // BLOCK_C - 1,
                                BLOCK_R=block_r, BLOCK_C=BLOCK_C)
    assert (x[M - 3:, N - BLOCK_C:] == 0).all(), "rows after offs[-1] were not zeroed"
    assert (x[M - block_r:M - 3] == 1).all(), "rows before offs[-1] were zeroed"
    return f"rows {M - 3}.. of {M} x {N}"


def case_gather_column_strided() -> str:
    """gather_rows of a column-strided x whose column stride times N passes 2**31 (a transposed view)."""
    M, N = 2**19, 4160
    x = torch.empty(M * N, dtype=torch.int16).as_strided((M, N), (1, M))
    index = torch.tensor([M - 1, 3, 123457, M + 7], dtype=torch.int64)  # M + 7: a padding row (zeros)
    for row in index[:3].tolist():
        x[row] = torch.randint(-30000, 30000, (N,), dtype=torch.int16)
    out = GROUPS.gather_rows(x, index)
    assert torch.equal(out[:3], x[index[:3]]), "gathered rows differ from x[index]"
    assert (out[3] == 0).all(), "a row index past the end did not give zeros"
    return f"last column at element {(N - 1) * M + M - 1} of {M * N}"


def _mx_tail_problem(M: int, C: int, BC: int):
    """x (M, C) bf16 with random values in the last 32 rows x BC columns, one group of M - 5 rows
    (its padded block ends at row M, the last 5 rows padding), and its padded layout."""
    x = torch.empty((M, C), dtype=torch.bfloat16)
    x[M - 32:, C - BC:] = _random_bf16((32, BC))
    offs = torch.tensor([M - 5], dtype=torch.int32)
    padding = token_group_padding(offs, M, 32)
    block = torch.zeros((32, BC), dtype=torch.bfloat16)  # the expected padded rows: 27 of x, 5 of zeros
    block[:27] = x[M - 32:M - 5, C - BC:]
    return x, padding, block


def case_mx_rows() -> str:
    """torch provider's row quantiser (forward A, grad_out): its last program, where P * C passes 2**31."""
    M, C, BC = 2**18 + 64, 8192, 128
    x, padding, block = _mx_tail_problem(M, C, BC)
    P = padding.padded_rows
    q = torch.empty((P, C), dtype=torch.uint8)
    q[M - 32:M, C - BC:] = 0xAA
    scale_cols = C // 32
    scales = torch.zeros((tb.round_up(P + 96, 128), scale_cols), dtype=torch.uint8)
    mx_rows_probe[(1,)](_bits(x), padding.source_rows, q, scales, padding.padded_offs, M, C, 1, scale_cols,
                        M // 32 - 1, C // BC - 1, BC=BC, E_PAD=2)
    data, exponent = mx_quantize(block)
    assert torch.equal(q[M - 32:M, C - BC:], data.view(torch.uint8)), "last program's data differs"
    got = tb.unblock(scales.reshape(-1), M, scale_cols)[M - 32:, scale_cols - BC // 32:]
    assert torch.equal(got, exponent), "last program's scales are not where the blocked layout puts them"
    assert int(scales.count_nonzero()) == int(exponent.count_nonzero()), "scales written outside the program's"
    return f"rows {M - 32}.. x columns {C - BC}.. at element {(M - 32) * C + C - BC} of {P * C}"


def case_mx_weight() -> str:
    """torch provider's weight quantiser: its last tile, where E * N * K passes 2**31 (both orientations)."""
    E, K, N, BK = 3, 2**15, 2**15, 128
    w = torch.empty((E, K, N), dtype=torch.bfloat16)
    tile = _random_bf16((BK, 32))
    w[E - 1, K - BK:, N - 32:] = tile
    w_t = w.transpose(-2, -1)  # (E, N, K) view
    qk = torch.empty((E, N, K), dtype=torch.uint8)
    qn = torch.empty((E, K, N), dtype=torch.uint8)
    cols_k, cols_n = K // 32, N // 32
    sk = torch.zeros((E, N * cols_k), dtype=torch.uint8)
    sn = torch.zeros((E, K * cols_n), dtype=torch.uint8)
    k_programs = K // BK
    q = E * (N // 32) * k_programs - 1
    mx_weight_probe[(1,)](_bits(w_t), qk, sk, qn, sn, N, K, *w_t.stride(), k_programs, q, BK=BK)
    data_k, exp_k = mx_quantize(tile.t())  # (32 of N, BK of K), blocks along K
    data_n, exp_n = mx_quantize(tile)  # (BK of K, 32 of N), blocks along N
    assert torch.equal(qk[E - 1, N - 32:, K - BK:], data_k.view(torch.uint8)), "weight along K differs"
    assert torch.equal(qn[E - 1, K - BK:, N - 32:], data_n.view(torch.uint8)), "weight along N differs"
    assert torch.equal(tb.unblock(sk[E - 1], N, cols_k)[N - 32:, cols_k - BK // 32:], exp_k), "scales along K misplaced"
    assert torch.equal(tb.unblock(sn[E - 1], K, cols_n)[K - BK:, cols_n - 1:], exp_n), "scales along N misplaced"
    assert int(sk.count_nonzero()) == int(exp_k.count_nonzero()) and int(sn.count_nonzero()) == int(exp_n.count_nonzero())
    return f"tile {q} at element {(E - 1) * N * K + (N - 32) * K + K - BK} of {E * N * K}"


def case_mx_columns() -> str:
    """torch provider's weight-gradient quantiser (x^T along M): its last program, where C * P passes 2**31."""
    M, C, BC = 2**18 + 64, 8192, 128
    x, padding, block = _mx_tail_problem(M, C, BC)
    P = padding.padded_rows
    q = torch.empty((C, P), dtype=torch.uint8)
    q[C - BC:, M - 32:M] = 0xAA
    width = tb.round_up(M // 32, 4)
    scales = torch.zeros((tb.round_up(C, 128), P // 32 + 4), dtype=torch.uint8)
    mx_columns_probe[(1,)](_bits(x), padding.source_rows, q, scales, padding.padded_offs, M, C, P, 1,
                           M // 32 - 1, C // BC - 1, BC=BC, E_PAD=2)
    data, exponent = mx_quantize(block.t().contiguous())  # (BC, 32): blocks along the tokens
    assert torch.equal(q[C - BC:, M - 32:M], data.view(torch.uint8)), "last program's data differs"
    got = tb.unblock(scales.reshape(-1), C, width)[C - BC:, M // 32 - 1:M // 32]
    assert torch.equal(got, exponent), "last program's scales are not where the blocked layout puts them"
    assert int(scales.count_nonzero()) == int(exponent.count_nonzero()), "scales written outside the program's"
    return f"columns {C - BC}.. x rows {M - 32}.. at element {(C - 1) * P + M - 32} of {C * P}"


CASES = {
    "blocks_below_2**31": lambda: case_blocks(2**31 - 2048),
    "blocks_at_2**31": lambda: case_blocks(2**31 + 32),
    "blocks_at_2**32": lambda: case_blocks(2**32 + 32),
    "weight_at_2**31": case_weight,
    "grouped_rows_at_2**31": case_grouped_rows,
    "zero_unused_at_2**31": case_zero_unused,
    "zero_rows_after_at_2**31": case_zero_rows_after,
    "gather_rows_column_stride_at_2**31": case_gather_column_strided,
    "mx_rows_at_2**31": case_mx_rows,
    "mx_weight_at_2**31": case_mx_weight,
    "mx_columns_at_2**31": case_mx_columns,
}


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        try:
            detail, ok = CASES[name](), True
        except Exception:  # noqa: BLE001 - report, go on with the next case
            detail, ok = traceback.format_exc(limit=3), False
        print(json.dumps({"case": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
