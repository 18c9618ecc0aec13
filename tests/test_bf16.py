"""The bf16 backend keeps torch._grouped_mm's contract bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import float64_reference, make_problem, run_with_grads
from mxfp8_compat import resolve, sqnr_db
from mxfp8_compat.numerics.highprec import grouped_mm_support

needs_cpu_grouped_mm = pytest.mark.skipif(
    not grouped_mm_support("cpu", torch.bfloat16)[0],
    reason=f"torch {torch.__version__} has no CPU kernel for torch._grouped_mm to compare with",
)


@needs_cpu_grouped_mm
def test_bitwise_identical_to_torch_grouped_mm_forward_and_backward(no_torchao):
    problem = make_problem()
    fn = resolve("off", device="cpu")
    out, dA, dB = run_with_grads(fn, problem)
    ref_out, ref_dA, ref_dB = run_with_grads(lambda A, B, offs: torch._grouped_mm(A, B, offs=offs), problem)
    assert torch.equal(out, ref_out)
    assert torch.equal(dA, ref_dA)
    assert torch.equal(dB, ref_dB)


@needs_cpu_grouped_mm
def test_auto_without_mxfp8_is_the_same_bits(no_torchao):
    problem = make_problem()
    out = resolve("auto", device="cpu")(problem.A, problem.B, problem.offs)
    assert torch.equal(out, torch._grouped_mm(problem.A, problem.B, offs=problem.offs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_out_dtype_is_honoured_and_accurate(no_torchao, dtype, out_dtype):
    problem = make_problem(dtype=dtype)
    out = resolve("off", device="cpu")(problem.A, problem.B, problem.offs, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (problem.A.shape[0], problem.B.shape[2])
    ref, _, _ = float64_reference(problem)
    # bf16 output rounding alone costs ~ 50 dB; float32 accumulation of bf16 inputs is exact-ish.
    assert sqnr_db(ref, out) > (45 if out_dtype == torch.bfloat16 else 60)


def test_empty_groups_are_allowed(no_torchao):
    problem = make_problem(group_rows=(64, 0, 64, 0))
    out, dA, dB = run_with_grads(resolve("off", device="cpu"), problem)
    ref_out, _, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) > 45
    assert torch.count_nonzero(dB[1]) == 0 and torch.count_nonzero(dB[3]) == 0
    assert sqnr_db(ref_dB, dB) > 40


def test_loop_fallback_matches_when_torch_has_no_grouped_mm(no_torchao, monkeypatch):
    """torch builds without a _grouped_mm kernel for the device get the per-group loop, with a reason."""
    problem = make_problem()
    monkeypatch.delattr(torch, "_grouped_mm")
    res = resolve("off", device="cpu")
    assert any("has no torch._grouped_mm" in reason for reason in res.reasons)
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) > 45 and sqnr_db(ref_dA, dA) > 40 and sqnr_db(ref_dB, dB) > 40


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bitwise_identical_on_cuda(no_torchao):
    problem = make_problem(device="cuda")
    out, dA, dB = run_with_grads(resolve("auto", device="cuda"), problem)
    ref_out, ref_dA, ref_dB = run_with_grads(lambda A, B, offs: torch._grouped_mm(A, B, offs=offs), problem)
    assert torch.equal(out, ref_out) and torch.equal(dA, ref_dA) and torch.equal(dB, ref_dB)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_emulated_without_torchao_on_cuda(no_torchao):
    """Without torchao, CUDA gets the fast emulation (where triton runs), else the reference."""
    problem = make_problem(device="cuda", k=256, n=128)
    res = resolve("emulated", device="cuda")
    assert res.emulation in ("fast", "reference"), res.reasons
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= 27 and sqnr_db(ref_dA, dA) >= 25 and sqnr_db(ref_dB, dB) >= 24
