"""Never wrong at production scale: kernels past 2**31 elements, nothing to multiply, strided metadata, errors.

The first tests run every Triton kernel of the package at offsets just below and past 2**31
and 2**32 in triton's interpreter (tests/support/kernel_bounds_child.py, one child process: an int32
address that wraps kills the process, as it does a GPU job). The rest are the contract's
degenerate and strided cases in every mode on the CPU; tests/test_cuda_scale.py runs the
same cases on a GPU at real sizes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_problem, needs_grouped_mm_on_cpu
from mxfp8_compat import resolve
from mxfp8_compat.backends.grouped_mm import make_bf16
from mxfp8_compat import GENERATIONS
from mxfp8_compat.providers.schema import PerKernel

MODES = ["off", "emulated", "auto"]
CHILD = Path(__file__).resolve().parent / "support" / "kernel_bounds_child.py"
CASES = [
    "blocks_below_2**31",
    "blocks_at_2**31",
    "blocks_at_2**32",
    "weight_at_2**31",
    "grouped_rows_at_2**31",
    "zero_unused_at_2**31",
    "zero_rows_after_at_2**31",
    "gather_rows_column_stride_at_2**31",
    "mx_rows_at_2**31",
    "mx_weight_at_2**31",
    "mx_columns_at_2**31",
]


@pytest.fixture(scope="module")
def bounds_results() -> dict[str, dict]:
    pytest.importorskip("triton", reason="the kernels need triton (its interpreter runs them on the CPU)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(CHILD)], capture_output=True, text=True, timeout=600, env=env)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["case"]] = record
    results["_returncode"] = {"rc": done.returncode, "stderr": done.stderr[-2000:]}
    return results


@pytest.mark.parametrize("case", CASES)
def test_kernel_is_exact_past_2_31_elements(bounds_results, case):
    record = bounds_results.get(case)
    assert record is not None, f"{case} crashed its process (exit {bounds_results['_returncode']})"
    assert record["ok"], record["detail"]


def test_every_case_of_the_child_is_checked(bounds_results):
    assert set(bounds_results) - {"_returncode"} == set(CASES)


# --- strided index and offsets reach the kernels contiguous ---------------------------------


def _interpreted(name: str):
    pytest.importorskip("triton", reason="the kernels need triton")
    from mxfp8_compat.kernels.launch import kernel_module

    return kernel_module(name, True)


def test_gather_rows_reads_a_strided_index_by_its_strides():
    gather_rows = _interpreted("token_groups").gather_rows
    x = torch.randn(64, 48)
    index = torch.randperm(64)[:40]
    strided = index[::2]
    assert not strided.is_contiguous()
    assert torch.equal(gather_rows(x, strided), x[strided])


def test_grouped_rows_quantiser_reads_strided_offs_by_its_strides():
    from mxfp8_compat.backends.fast_emulation import fast_fake_quantize_grouped_rows
    from mxfp8_compat.numerics.quantize import mx_fake_quantize_grouped_rows

    _interpreted("fast_quant")
    x = torch.randn(100, 64, dtype=torch.bfloat16)
    offs = torch.tensor([17, 17, 17, 99, 64, 99, 100, 0], dtype=torch.int32)[::2]  # [17, 17, 64, 100]
    assert not offs.is_contiguous()
    expected = mx_fake_quantize_grouped_rows(x, offs.contiguous())
    assert torch.equal(fast_fake_quantize_grouped_rows(x, offs).view(torch.int16), expected.view(torch.int16))


def test_launch_refuses_tensors_on_two_devices():
    from mxfp8_compat.kernels.launch import launch

    class Kernel:
        def __getitem__(self, grid):
            raise AssertionError("launched")

    with pytest.raises(ValueError, match="several devices"):
        launch(Kernel(), (1,), torch.zeros(1), torch.zeros(1, device="meta"))


# --- nothing to multiply (E, M, K or N zero) --------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape", [(64, 64, 64, 0), (0, 64, 64, 3), (64, 0, 64, 3), (64, 64, 0, 3)], ids=["E=0", "M=0", "K=0", "N=0"]
)
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_nothing_to_multiply_gives_zeros_and_zero_gradients(no_torchao, mode, shape, out_dtype):
    """torch's CUDA kernel divides by zero at E == 0 (SIGFPE) and its stride check rejects K == 0:
    every mode answers without a GEMM, with the sum over no terms."""
    M, K, N, E = shape
    A = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(E, K, N, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.full((E,), M, dtype=torch.int32)
    out = resolve(mode, device="cpu")(A, B, offs, out_dtype=out_dtype)
    assert out.shape == (M, N) and out.dtype == (out_dtype or torch.bfloat16)
    assert out.count_nonzero() == 0
    torch.randn_like(out, dtype=torch.float32).mul(out).sum().backward()
    assert A.grad is not None and B.grad is not None
    assert A.grad.shape == A.shape and A.grad.dtype == A.dtype and A.grad.count_nonzero() == 0
    assert B.grad.shape == B.shape and B.grad.dtype == B.dtype and B.grad.count_nonzero() == 0


@pytest.mark.parametrize("mode", MODES)
def test_nothing_to_multiply_compiles(no_torchao, mode):
    fn = resolve(mode, device="cpu")
    A, B, offs = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(0, 64, 32, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.int32)
    compiled = torch.compile(lambda A, B, offs: fn(A, B, offs), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(A, B, offs), torch.zeros(32, 32, dtype=torch.bfloat16))


# --- strided offs -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_strided_offs_reads_the_values_not_the_memory(no_torchao, mode):
    """torch's CUDA kernel and the shim's kernels read offs as a flat array: a stride-2 view reaches them contiguous."""
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    strided = torch.stack([p.offs, torch.full_like(p.offs, 7)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, p.offs)
    fn = resolve(mode, device="cpu")
    out = fn(p.A, p.B, strided)
    out.float().mul(p.grad_out.float()).sum().backward()
    grads = (p.A.grad.clone(), p.B.grad.clone())
    p.A.grad = p.B.grad = None
    expected = fn(p.A, p.B, p.offs)
    expected.float().mul(p.grad_out.float()).sum().backward()
    assert torch.equal(out, expected)
    assert torch.equal(grads[0], p.A.grad) and torch.equal(grads[1], p.B.grad)


# --- torch._grouped_mm's errors: only its stride refusal is retried -------------------------


@needs_grouped_mm_on_cpu
def test_an_out_of_memory_error_propagates_untouched(monkeypatch, caplog):
    """Before: any exception was taken for a stride refusal, logged as one, and the call retried on copies."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(args)
        raise oom

    monkeypatch.setattr(torch, "_grouped_mm", out_of_memory)
    fn = make_bf16(validate=False, use_loop=False)
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"), pytest.raises(torch.OutOfMemoryError) as raised:
        fn(p.A, p.B[..., :].transpose(-2, -1).contiguous().transpose(-2, -1), p.offs)
    assert raised.value is oom
    assert len(calls) == 1, "the call was retried"
    assert not caplog.records


@needs_grouped_mm_on_cpu
def test_rows_no_copy_can_align_are_named():
    """K = 36 bf16 is 72 bytes a row: torch's 16-byte stride rule fails for every layout; the error names A."""
    A = torch.randn(64, 36, dtype=torch.bfloat16)
    B = torch.randn(2, 36, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="A: torch._grouped_mm cannot take this operand in any layout"):
        resolve("off", device="cpu")(A, B, torch.tensor([32, 64], dtype=torch.int32))


# --- immutable, hashable table rows and resolutions -----------------------------------------


def test_table_rows_are_hashable_and_immutable():
    assert len({hash(row) for row in GENERATIONS}) == len(GENERATIONS)
    row = GENERATIONS[0]
    assert isinstance(row.group_multiple, PerKernel)
    with pytest.raises(AttributeError):
        row.group_multiple.native = 1  # type: ignore[misc]
    with pytest.raises(KeyError):
        row.group_multiple["fast"]  # type: ignore[index]


def test_a_resolution_holding_a_row_is_hashable(no_torchao):
    import dataclasses

    res = resolve("off", device="cpu")
    with_row = dataclasses.replace(res, generation=GENERATIONS[0])
    assert hash(with_row) != hash(res) or with_row != res
    assert {with_row: 1}[with_row] == 1
