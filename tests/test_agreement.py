"""torchao's own MXFP8 emulation against the project's reference, bit for bit.

Facts established on 0.13 (torch 2.9), 0.16 (2.10), 0.17 (2.11), 0.18 (2.12.1), CPU:

* The output is bitwise equal in every generation: the reference's forward is the very call
  torchao's emulation makes (``torch._grouped_mm`` on identically quantised operands, same
  operand layout, bf16 output).
* The quantisation is identical in every generation, for every tensor, FLOOR (0.13) and RCEIL
  (0.16+): the reference's quantisers fed to torchao's exact backward GEMM calls reproduce
  torchao's gradients bit for bit.
* On the default problem both gradients are bitwise equal too. On larger problems they can
  differ in the last bits because torchao's backward GEMMs emit bf16 straight from
  ``torch._grouped_mm`` while the reference runs float32 GEMMs (another summation order) and
  rounds once; every such difference lies within the bound for reordering a float32 sum.
"""

from __future__ import annotations

import math

import pytest
import torch

from mxfp8_compat_dev.agreement import max_ulp_diff, reference_agreement

TENSORS = ("output", "grad_A", "grad_B")


def bf16_from_bits(*bits: int) -> torch.Tensor:
    """bf16 tensor with the given 16-bit patterns (given as unsigned)."""
    signed = [b - 0x10000 if b >= 0x8000 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int16).view(torch.bfloat16)


# --- (a) max_ulp_diff on hand-made tensors --------------------------------------------------


def test_equal_tensors_are_zero_ulp_apart():
    x = bf16_from_bits(0x3F80, 0xC2F7, 0x0001, 0x7F7F)
    assert max_ulp_diff(x, x.clone()) == 0


def test_adjacent_values_are_one_ulp_apart():
    one, next_up = bf16_from_bits(0x3F80, 0x3F81)  # 1.0 and 1.0078125
    assert float(next_up) == 1.0078125
    assert max_ulp_diff(one.reshape(1), next_up.reshape(1)) == 1
    # across a binade boundary: the largest value below 2.0 and 2.0
    assert max_ulp_diff(bf16_from_bits(0x3FFF), bf16_from_bits(0x4000)) == 1


def test_sign_is_respected():
    assert max_ulp_diff(bf16_from_bits(0xBF80), bf16_from_bits(0xBF81)) == 1  # -1.0, -1.0078125
    assert max_ulp_diff(bf16_from_bits(0x3F80), bf16_from_bits(0xBF80)) == 2 * 0x3F80  # 1.0 vs -1.0


def test_signed_zeros_are_equal_and_zero_is_one_ulp_from_the_smallest_subnormal():
    plus_zero, minus_zero = bf16_from_bits(0x0000), bf16_from_bits(0x8000)
    assert max_ulp_diff(plus_zero, minus_zero) == 0
    assert max_ulp_diff(minus_zero, bf16_from_bits(0x0001)) == 1
    assert max_ulp_diff(bf16_from_bits(0x8001), bf16_from_bits(0x0001)) == 2  # -tiny, +tiny


def test_max_is_over_elements_and_nan_inf_are_handled():
    a = bf16_from_bits(0x3F80, 0x4000, 0x0000)
    b = bf16_from_bits(0x3F80, 0x4003, 0x8000)
    assert max_ulp_diff(a, b) == 3
    nan = torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)
    assert max_ulp_diff(nan, nan.clone()) == 0
    assert max_ulp_diff(nan, torch.ones(2, dtype=torch.bfloat16)) == math.inf
    assert max_ulp_diff(bf16_from_bits(0x7F7F), bf16_from_bits(0x7F80)) == 1  # max finite, inf


def test_float32_and_misuse():
    x = torch.tensor([1.0, -3.5], dtype=torch.float32)
    assert max_ulp_diff(x, torch.nextafter(x, torch.full_like(x, math.inf))) == 1
    with pytest.raises(TypeError):
        max_ulp_diff(x, x.bfloat16())
    with pytest.raises(ValueError):
        max_ulp_diff(x, x[:1])


# --- (b) the installed torchao against the reference -------------------------------------


@pytest.fixture(scope="module")
def default_agreement() -> dict:
    result = reference_agreement("cpu")
    if not result["applicable"]:
        pytest.skip(result["reason"])
    return result


@pytest.fixture(scope="module")
def larger_agreement() -> dict:
    # Large enough that, on the CPU kernels measured, the float32 summation orders of the
    # backward GEMMs differ (0.13: grad_A and grad_B; 0.16+: the high-precision grad_B).
    result = reference_agreement("cpu", group_rows=(128, 256, 128), k=512, n=256, seed=1)
    if not result["applicable"]:
        pytest.skip(result["reason"])
    return result


@pytest.mark.torchao
def test_runs_cover_the_generation_and_its_scale_rule(default_agreement):
    generation = default_agreement["generation"]
    assert default_agreement["scale_mode"] == ("floor" if generation == "0.13" else "rceil")
    hp = [run["wgrad_with_hp"] for run in default_agreement["runs"]]
    assert hp == ([False] if generation == "0.13" else [False, True])


@pytest.mark.torchao
def test_output_is_bitwise_equal(default_agreement, larger_agreement):
    for result in (default_agreement, larger_agreement):
        for run in result["runs"]:
            assert run["output"]["bitwise_equal"], run["output"]
            assert run["output"]["max_ulp"] == 0


@pytest.mark.torchao
def test_quantisation_is_identical_for_every_tensor(default_agreement, larger_agreement):
    """The reference's quantisers + torchao's own GEMM calls reproduce torchao bit for bit."""
    for result in (default_agreement, larger_agreement):
        for run in result["runs"]:
            for name in TENSORS:
                assert run[name]["torchao_order_bitwise_equal"], (run["wgrad_with_hp"], name, run[name])


@pytest.mark.torchao
def test_default_problem_gradients_bitwise_equal_or_summation_order(default_agreement):
    """Bitwise equal, or a difference that summation order alone explains - on any CPU.

    Measured: bitwise equal on every generation on one 2-core AMD EPYC machine (<= 1 ulp over 10
    seeds); kernel blocking is CPU dependent: on the H100 host's 16-core CPU torchao 0.16 gave
    2 ulp, and on another x86 CPU grad_B of 0.16-0.18 was 2 ulp and 89.0 dB. So no ulp count
    or SQNR floor is asserted; what must hold everywhere: torchao's GEMM order fed the
    reference's quantised operands reproduces torchao bit for bit (the operands are identical),
    and every element lies within the reordered-float32-sum bound (see
    test_the_order_bound_rejects_more_than_reordering for why that check is sharp).
    """
    for run in default_agreement["runs"]:
        for name in ("grad_A", "grad_B"):
            cell = run[name]
            if not cell["bitwise_equal"]:
                assert cell["torchao_order_bitwise_equal"], cell
                assert cell["order_bound_ratio"] <= 1.0, cell
                assert "summation order" in cell["explanation"]
            else:
                assert cell["explanation"] == "" and cell["sqnr_db"] == math.inf


@pytest.mark.torchao
def test_gradient_differences_are_summation_order_only(larger_agreement):
    """Any gradient difference stays within the reordered-float32-sum bound, with identical operands.

    Max ulp measured over 10 seeds of this problem on one CPU: 0.13 grad_A 13696 (one output that
    nearly cancels to zero), grad_B 1; 0.16-0.18 grad_A 16, grad_B 1 (MXFP8) / 152 (high
    precision); the bound ratio never exceeded 0.99. Ulp counts and SQNR depend on the CPU's
    kernels, so only the bound and the operand identity are asserted.
    """
    for run in larger_agreement["runs"]:
        for name in ("grad_A", "grad_B"):
            cell = run[name]
            if cell["bitwise_equal"]:
                continue
            assert cell["torchao_order_bitwise_equal"], cell
            assert cell["order_bound_ratio"] <= 1.0, cell
            assert "summation order" in cell["explanation"], cell


def test_the_order_bound_rejects_more_than_reordering():
    """The bound is tight enough to fail: a reordered float32 sum passes, a 3-ulp error does not.

    Reordering L float32 additions moves each result by at most 2 * L * 2**-24 * sum|a_i b_i|
    (twice the recursive-summation bound), plus one bf16 ulp from rounding each result once.
    """
    from mxfp8_compat_dev.agreement import _order_bound

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=generator).bfloat16().float()
    b = torch.randn(256, 32, generator=generator).bfloat16().float()
    forward = (a @ b).bfloat16()
    reversed_order = (a.flip(1) @ b.flip(0)).bfloat16()  # the same sum, other order
    abs_products = a.abs().double() @ b.abs().double()
    assert _order_bound(forward, reversed_order, abs_products, 256) <= 1.0
    three_ulp = forward.clone()
    bits = three_ulp.view(torch.int16)
    bits[0, 0] += 3
    assert max_ulp_diff(forward, three_ulp) == 3
    assert _order_bound(forward, three_ulp, abs_products, 256) > 1.0


def test_mismatched_scale_rule_is_detected():
    """Sanity: the comparison is sharp - the other scale rule changes whole blocks."""
    from mxfp8_compat.numerics.quantize import mx_fake_quantize

    x = torch.tensor([[300.0] + [1.0] * 31], dtype=torch.bfloat16)  # amax 300: FLOOR 2**0, RCEIL 2**0
    y = torch.tensor([[500.0] + [1.0] * 31], dtype=torch.bfloat16)  # amax 500: FLOOR 2**0 (saturates), RCEIL 2**1
    assert max_ulp_diff(mx_fake_quantize(x, -1, "floor"), mx_fake_quantize(x, -1, "rceil")) == 0
    assert max_ulp_diff(mx_fake_quantize(y, -1, "floor"), mx_fake_quantize(y, -1, "rceil")) > 0
