"""The installed torchao, whatever the tox env put there (skipped where there is none).

Each tox env sets MXFP8_COMPAT_EXPECT_GENERATION (and MXFP8_COMPAT_EXPECT_CPU_EMULATION) so the
test checks the adapter table against an expectation written independently of it.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import float64_reference, make_problem, run_with_grads
from mxfp8_compat import MXFP8Unavailable, resolve, sqnr_db
from mxfp8_compat.probes import environment

INSTALLED = environment.installed_torchao_version()
EXPECT_GENERATION = os.environ.get("MXFP8_COMPAT_EXPECT_GENERATION")
EXPECT_CPU_EMULATION = os.environ.get("MXFP8_COMPAT_EXPECT_CPU_EMULATION")

pytestmark = pytest.mark.torchao  # skipped where no torchao is installed (conftest)


def test_generation_row_chosen_for_the_installed_release():
    res = resolve("emulated", device="cpu")
    assert res.torchao_version == INSTALLED
    assert res.generation is not None, res.reasons
    if EXPECT_GENERATION:
        assert res.generation.key == EXPECT_GENERATION
    else:
        assert res.generation.versions.contains(INSTALLED, prereleases=True) or any("newer than" in r for r in res.reasons)


def test_emulated_numerics_on_cpu_meet_torchao_thresholds():
    res = resolve("emulated", device="cpu")
    assert res.backend == "mxfp8-emulated"
    if EXPECT_CPU_EMULATION:
        assert res.emulation == EXPECT_CPU_EMULATION, res.reasons
    problem = make_problem(group_rows=(128, 64, 96, 32), k=256, n=128)
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= 27
    assert sqnr_db(ref_dA, dA) >= 25
    assert sqnr_db(ref_dB, dB) >= 24


def test_auto_on_cpu_is_bf16_and_native_raises():
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16" and res.reasons
    with pytest.raises(MXFP8Unavailable):
        resolve("native", device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_emulated_on_cuda_meets_thresholds():
    res = resolve("emulated", device="cuda")
    problem = make_problem(group_rows=(128, 128, 256, 0), k=256, n=128, device="cuda")
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= 27 and sqnr_db(ref_dA, dA) >= 25 and sqnr_db(ref_dB, dB) >= 24


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_matches_the_device():
    res = resolve("auto", device="cuda")
    major, _ = torch.cuda.get_device_capability()
    if major == 10 and EXPECT_GENERATION != "0.13":
        # sm_100/sm_103, the one place native matters: the release's own kernels must be chosen
        # (a torchao build without them fails here, with its reasons)
        assert res.backend == "mxfp8", res.reasons
        assert res.generation is not None and res.generation.native
        if EXPECT_GENERATION:
            assert res.generation.key == EXPECT_GENERATION
        assert res.smoke_sqnr_db is not None and res.smoke_sqnr_db >= 27, res.smoke_sqnr_db
    else:
        assert res.backend == "bf16"
        assert any("compute capability" in r or "always emulated" in r for r in res.reasons), res.reasons


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_emulated_dtypes_and_strided_gradient(dtype, out_dtype):
    """float32 inputs and outputs, and an expanded gradient (out.sum().backward()), work on every release."""
    res = resolve("emulated", device="cpu")
    problem = make_problem(group_rows=(64, 64), k=64, n=64, dtype=dtype)
    out = res(problem.A, problem.B, problem.offs, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    out.sum().backward()
    assert problem.A.grad is not None and problem.A.grad.dtype == dtype and torch.isfinite(problem.A.grad).all()
    assert problem.B.grad is not None and torch.isfinite(problem.B.grad).all()
