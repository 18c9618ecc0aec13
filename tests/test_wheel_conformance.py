"""Each wheel's own native (sm_100) autograd code, forward and backward, through mxfp8_compat, on the CPU.

In each release's tox env this drives the native path the way a user does, ``resolve("native")`` and a
call of the returned callable, with only the sm_100-only kernels replaced by stand-ins that compute real
MXFP8 and assert what the real kernels assert (``tests/support/sm100_standins.py``). Everything else is the
installed wheel's code: the entry point the adapter row binds, torchao's ``autograd.Function``, its
backward and its gradient arity. So these tests prove, per release, the argument order, the keywords,
the positional slots, the number of gradients and the ``out_dtype`` plumbing of the shim's wiring;
a fake alone never could (0.15's row passed against a fake and failed against the wheel).

Numerics are compared with ``mxfp8_compat.mxfp8_grouped_mm_reference`` under the row's scale rule:

* output, near-bitwise: the stand-ins quantise as the reference does (same rule, same blocks; the
  wheel's own ``to_mx`` where the wheel calls it), dequantise exactly, and sum the exact products in
  float32 before one rounding to bf16, as the reference does. Only the order of the float32 additions
  differs (``torch.mm`` per group here, ``torch._grouped_mm`` in the reference), so an element may
  differ by one bf16 rounding of a reordered float32 sum: asserted elementwise against that bound
  (one bf16 spacing plus the reordering bound ``2 K 2**-24 sum|a b|``), and at most 0.1 % of the
  elements may differ at all (measured: 0 on torch 2.9.0, about 1 in 65,000 on 2.9.1-2.12);
* gradients: the same argument for the input gradient; the weight gradient of 0.16+ (high precision)
  is torchao's own ``torch._grouped_mm`` with bf16 output against the reference's float32 GEMM: at most
  1 % of elements differ (measured about 0.01 %, by up to 2 bf16 ulps) and both gradients are within
  60 dB SQNR of the reference (measured 84 dB or exact);
* against float64: torchao's own thresholds, 27 / 25 / 24 dB (output / input grad / weight grad).
"""

from __future__ import annotations

import os

import pytest
import torch

import sm100_standins
from conftest import float64_reference, make_problem
from mxfp8_compat import MXFP8Unavailable, mxfp8_grouped_mm_reference, resolve, sqnr_db
from mxfp8_compat.probes import environment
from mxfp8_compat.providers import match as matching
from mxfp8_compat.numerics.highprec import grouped_mm_loop
from mxfp8_compat.numerics.quantize import mx_fake_quantize

INSTALLED = environment.installed_torchao_version()
EXPECT_GENERATION = os.environ.get("MXFP8_COMPAT_EXPECT_GENERATION")

pytestmark = pytest.mark.torchao  # skipped where no torchao is installed (conftest)


def _expected_key() -> str:
    if EXPECT_GENERATION:
        return EXPECT_GENERATION
    match = matching.match_generation(INSTALLED)
    assert match.bound is not None, match.reasons
    return match.bound.generation.key


@pytest.fixture
def key() -> str:
    return _expected_key()


@pytest.fixture
def native(key, monkeypatch):
    """resolve("native", device="cpu") with the wheel's sm_100 kernels replaced by stand-ins."""
    if key not in sm100_standins.RELEASES:
        pytest.skip(f"torchao {key} has no native path (see test_013_native_is_unavailable)")
    environment.import_problem()  # import torchao before patching its modules
    sm100_standins.install(monkeypatch, key)
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    return resolve("native", device="cpu")


# Aligned problems: group sizes multiples of 128, M and K (and N) multiples of 128, one empty group.
ALIGNED = {
    "E4-K256-N128": ((128, 256, 0, 128), 256, 128),
    "E2-K128-N256": ((384, 128), 128, 256),
}
UNALIGNED = ((100, 0, 37, 300, 5, 64, 129, 1), 256, 256)


def _bf16_spacing(reference: torch.Tensor) -> torch.Tensor:
    ref = reference.detach().double().abs()
    return torch.where(ref == 0, torch.full_like(ref, 2.0**-133), torch.exp2(torch.floor(torch.log2(ref)) - 7))


def _assert_output_near_bitwise(res, problem, reference: torch.Tensor, actual: torch.Tensor) -> None:
    """Equal to the reference except where a reordered float32 sum rounds to the neighbouring bf16 value."""
    scale_mode = res.generation.scale_mode
    A_q = mx_fake_quantize(problem.A.detach().to(torch.bfloat16), dim=-1, scale_mode=scale_mode)
    B_q = mx_fake_quantize(problem.B.detach().to(torch.bfloat16), dim=1, scale_mode=scale_mode)
    magnitude = grouped_mm_loop(A_q.abs().double(), B_q.abs().double(), problem.offs, torch.float64)
    bound = _bf16_spacing(reference) + 2 * problem.A.shape[1] * 2.0**-24 * magnitude
    difference = (actual.detach().double() - reference.detach().double()).abs()
    assert (difference <= bound).all(), f"output off the reference by up to {float((difference / bound).max()):.1f}x the reordering bound"
    assert (difference != 0).double().mean() <= 1e-3, f"{int((difference != 0).sum())} output elements differ from the reference"


def _assert_gradient_close(name: str, reference: torch.Tensor, actual: torch.Tensor) -> None:
    assert (actual != reference).double().mean() <= 1e-2, f"{name}: {int((actual != reference).sum())} elements differ from the reference"
    assert sqnr_db(reference, actual) >= 60, f"{name}: {sqnr_db(reference, actual):.1f} dB against the reference"


def _run(res, problem, out_dtype, grad="random"):
    A = problem.A.detach().clone().requires_grad_(True)
    B = problem.B.detach().clone().requires_grad_(True)
    out = res(A, B, problem.offs, out_dtype=out_dtype)
    if grad == "sum":
        out.sum().backward()  # an expanded (stride-0) gradient
    else:
        out.backward(problem.grad_out.to(out.dtype))
    return out, A.grad, B.grad


def _reference(res, problem, out_dtype, wgrad_with_hp, grad="random"):
    A = problem.A.detach().clone().requires_grad_(True)
    B = problem.B.detach().clone().requires_grad_(True)
    generation = res.generation
    out = mxfp8_grouped_mm_reference(
        A.to(torch.bfloat16), B.to(torch.bfloat16), problem.offs, torch.bfloat16, generation.scale_mode, wgrad_with_hp and generation.wgrad_with_hp
    )
    out = out.to(out_dtype)
    if grad == "sum":
        out.sum().backward()
    else:
        out.backward(problem.grad_out.to(out.dtype))
    return out, A.grad, B.grad


def test_standin_signatures_match_the_wheel(key):
    if key not in sm100_standins.RELEASES:
        pytest.skip(f"torchao {key} has no native path")
    assert sm100_standins.signature_problems(key) == []


def test_native_resolves_to_the_expected_row_through_the_wheel(native, key):
    assert native.backend == "mxfp8" and native.mode == "native", native.reasons
    assert native.generation is not None and native.generation.key == key
    assert native.torchao_version == INSTALLED
    # The smoke run went through the wheel's native code: its stand-in kernels ran, forward and backward.
    assert "torch._scaled_grouped_mm" in sm100_standins.CALLS
    assert sm100_standins.CALLS.count("torch._scaled_grouped_mm") >= 2


@pytest.mark.parametrize("wgrad_with_hp", [True, False], ids=["wgrad-hp", "wgrad-mxfp8"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["out-bf16", "out-fp32"])
@pytest.mark.parametrize("shape", list(ALIGNED))
def test_native_forward_backward_matches_the_reference(key, monkeypatch, shape, out_dtype, wgrad_with_hp):
    if key not in sm100_standins.RELEASES:
        pytest.skip(f"torchao {key} has no native path")
    environment.import_problem()
    sm100_standins.install(monkeypatch, key)
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    res = resolve("native", device="cpu", wgrad_with_hp=wgrad_with_hp)
    assert res.backend == "mxfp8" and res.generation.key == key, res.reasons
    rows, k, n = ALIGNED[shape]
    problem = make_problem(group_rows=rows, k=k, n=n)
    sm100_standins.CALLS.clear()
    out, dA, dB = _run(res, problem, out_dtype)
    _assert_native_kernels_ran(key, wgrad_with_hp and res.generation.wgrad_with_hp)
    assert out.dtype == out_dtype and dA.dtype == torch.bfloat16 and dB.dtype == torch.bfloat16
    assert out.shape == (sum(rows), n) and dA.shape == problem.A.shape and dB.shape == problem.B.shape
    ref_out, ref_dA, ref_dB = _reference(res, problem, out_dtype, wgrad_with_hp)
    _assert_output_near_bitwise(res, problem, ref_out, out)
    _assert_gradient_close("dA", ref_dA, dA)
    _assert_gradient_close("dB", ref_dB, dB)
    hp_out, hp_dA, hp_dB = float64_reference(problem)
    assert sqnr_db(hp_out, out) >= 27 and sqnr_db(hp_dA, dA) >= 25 and sqnr_db(hp_dB, dB) >= 24


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
    ids=["bf16-out-bf16", "bf16-out-fp32", "fp32-out-fp32"],
)
def test_expanded_gradient_and_float32(native, dtype, out_dtype):
    """out.sum().backward() hands back a stride-0 gradient (torchao's quantisers need a contiguous one);
    float32 A and B come back with float32 gradients."""
    rows, k, n = ALIGNED["E4-K256-N128"]
    problem = make_problem(group_rows=rows, k=k, n=n, dtype=dtype)
    out, dA, dB = _run(native, problem, out_dtype, grad="sum")
    assert out.dtype == out_dtype and dA.dtype == dtype and dB.dtype == dtype
    ref_out, ref_dA, ref_dB = _reference(native, problem, out_dtype, True, grad="sum")
    _assert_output_near_bitwise(native, problem, ref_out, out)
    _assert_gradient_close("dA", ref_dA, dA)
    _assert_gradient_close("dB", ref_dB, dB)


def test_unaligned_groups_run_natively(native):
    """Any group sizes reach the real kernels aligned: the shim pads them (the stand-ins assert the alignment)."""
    rows, k, n = UNALIGNED
    problem = make_problem(group_rows=rows, k=k, n=n)
    out, dA, dB = _run(native, problem, torch.bfloat16)
    ref_out, ref_dA, ref_dB = _reference(native, problem, torch.bfloat16, True)
    _assert_output_near_bitwise(native, problem, ref_out, out)
    _assert_gradient_close("dA", ref_dA, dA)
    _assert_gradient_close("dB", ref_dB, dB)
    hp_out, hp_dA, hp_dB = float64_reference(problem)
    assert sqnr_db(hp_out, out) >= 27 and sqnr_db(hp_dA, dA) >= 25 and sqnr_db(hp_dB, dB) >= 24


def test_013_native_is_unavailable(key, monkeypatch):
    if key != "0.13":
        pytest.skip("only 0.13 lacks a native path")
    assert environment.import_problem() is None  # import torchao before CUDA is faked (its import would probe the driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "device_capability", lambda device: (10, 0))
    with pytest.raises(MXFP8Unavailable, match="always emulated"):
        resolve("native", device="cuda:0")


# Stand-ins each release's native path must reach (its sm_100 kernels), forward and backward.
_FORWARD = {
    "0.14": {"triton_mx_block_rearrange_2d_M_groups", "triton_mx_block_rearrange_per_group_3d"},
    "0.15": {"triton_mx_block_rearrange_2d_M_groups", "triton_mx_block_rearrange_per_group_3d"},
    "0.16": {"triton_to_mxfp8_dim0", "mx_block_rearrange_2d_M_groups_cuda", "triton_mx_block_rearrange_per_group_3d"},
    "0.17": {"triton_to_mxfp8_dim0", "mx_block_rearrange_2d_M_groups_cuda", "triton_mx_block_rearrange_per_group_3d"},
    "0.18": {"mxfp8_quantize_2d_1x32_cutedsl", "triton_to_mxfp8_dim0", "triton_mx_block_rearrange_per_group_3d"},
}
_MXFP8_WGRAD = {"mxfp8_quantize_cuda", "triton_mx_block_rearrange_2d_K_groups"}


def _assert_native_kernels_ran(key: str, wgrad_with_hp: bool) -> None:
    ran = set(sm100_standins.CALLS)
    expected = _FORWARD[key] | {"mxfp8_quantize_cuda_3d", "torch._scaled_grouped_mm"}
    assert expected <= ran, f"missing {sorted(expected - ran)}; ran {sorted(ran)}"
    if wgrad_with_hp:
        assert not (_MXFP8_WGRAD & ran), "a high-precision weight gradient must not quantise"
        assert sm100_standins.CALLS.count("torch._scaled_grouped_mm") == 2
    else:
        assert _MXFP8_WGRAD <= ran and sm100_standins.CALLS.count("torch._scaled_grouped_mm") == 3


def test_018_native_rejects_k_and_n_not_multiples_of_128_cleanly(key, monkeypatch):
    """0.18+'s CuTeDSL quantiser asserts K % 128 == 0 (forward, on A) and N % 128 == 0 (backward, on the
    output gradient). The README's contract: such a call raises ValueError in "native" and runs in bf16 in
    "auto", before any kernel (the shape check reads the row's shape_multiple)."""
    if key != "0.18":
        pytest.skip("only 0.18+'s native kernels need K and N multiples of 128")
    environment.import_problem()
    sm100_standins.install(monkeypatch, key)
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    problem = make_problem(group_rows=(128, 128), k=96, n=96)
    with pytest.raises(ValueError, match="128"):
        _run(resolve("native", device="cpu"), problem, torch.bfloat16)
    out, dA, dB = _run(resolve("auto", device="cpu"), problem, torch.bfloat16)
    assert out.shape == (256, 96) and dB.shape == problem.B.shape
