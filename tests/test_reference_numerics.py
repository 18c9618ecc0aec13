"""The reference MXFP8 emulation: scale rules, special values, and accuracy vs float64."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import float64_reference, make_problem, run_with_grads
from mxfp8_compat import ScaleMode, mxfp8_grouped_mm_reference, resolve, sqnr_db
from mxfp8_compat.numerics.quantize import E4M3_MAX, mx_dequantize, mx_fake_quantize, mx_quantize

# torchao's own acceptance thresholds for MXFP8 grouped GEMM against a high-precision reference.
MIN_OUT_DB, MIN_GRAD_A_DB, MIN_GRAD_B_DB = 27.0, 25.0, 24.0


@pytest.mark.parametrize("scale_mode", list(ScaleMode))
@pytest.mark.parametrize("wgrad_with_hp", [False, True])
def test_reference_meets_torchao_thresholds(scale_mode, wgrad_with_hp):
    problem = make_problem(group_rows=(128, 64, 192, 128), k=256, n=128)
    fn = lambda A, B, offs: mxfp8_grouped_mm_reference(A, B, offs, scale_mode=scale_mode, wgrad_with_hp=wgrad_with_hp)
    out, dA, dB = run_with_grads(fn, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= MIN_OUT_DB
    assert sqnr_db(ref_dA, dA) >= MIN_GRAD_A_DB
    assert sqnr_db(ref_dB, dB) >= MIN_GRAD_B_DB
    if wgrad_with_hp:  # a bf16 weight gradient is far more accurate than an MXFP8 one
        assert sqnr_db(ref_dB, dB) >= 45


def test_emulated_mode_without_torchao_uses_the_reference(no_torchao):
    res = resolve("emulated", device="cpu")
    assert res.backend == "mxfp8-emulated" and res.emulation == "reference"
    assert any("reference MXFP8 emulation (RCEIL" in reason for reason in res.reasons)
    assert res.smoke_sqnr_db is not None and res.smoke_sqnr_db >= MIN_OUT_DB
    problem = make_problem(k=256, n=128)
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= MIN_OUT_DB
    assert sqnr_db(ref_dA, dA) >= MIN_GRAD_A_DB
    assert sqnr_db(ref_dB, dB) >= MIN_GRAD_B_DB


def test_emulated_is_really_quantised_not_bf16(no_torchao):
    """MXFP8 costs ~20 dB against bf16: an 'emulation' as accurate as bf16 would be a fake."""
    problem = make_problem(k=256, n=128)
    ref_out, _, _ = float64_reference(problem)
    emulated = resolve("emulated", device="cpu")(problem.A, problem.B, problem.offs)
    bf16 = resolve("off", device="cpu")(problem.A, problem.B, problem.offs)
    assert sqnr_db(ref_out, bf16) - sqnr_db(ref_out, emulated) > 10


def test_floor_and_rceil_scales_on_known_blocks():
    # amax 1.0: FLOOR -> 2**(0-8); RCEIL -> 2**ceil(log2(1/448)) = 2**-8. Same here.
    # amax 480: FLOOR -> 2**(8-8) = 1, 480 saturates to 448; RCEIL -> 2**ceil(log2(480/448)) = 2.
    block = torch.zeros(2, 32)
    block[0, 0] = 1.0
    block[1, 0] = 480.0
    _, floor_exp = mx_quantize(block, ScaleMode.FLOOR)
    _, rceil_exp = mx_quantize(block, ScaleMode.RCEIL)
    assert floor_exp.flatten().tolist() == [127 - 8, 127]
    assert rceil_exp.flatten().tolist() == [127 - 8, 128]
    floor = mx_fake_quantize(block, dim=-1, scale_mode="floor")
    rceil = mx_fake_quantize(block, dim=-1, scale_mode="rceil")
    assert floor[1, 0].item() == E4M3_MAX  # saturated
    assert rceil[1, 0].item() == 480.0  # 240 * 2, exactly representable in e4m3


def test_rceil_round_trip_is_exact_for_representable_values():
    """RCEIL never saturates, so MXFP8 values re-quantise to themselves (power-of-two rescaling keeps mantissas)."""
    exponents = torch.randint(100, 140, (4, 2), dtype=torch.uint8)
    data = torch.randn(4, 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    values = mx_dequantize(data, exponents, torch.float32)
    assert torch.equal(mx_fake_quantize(values, dim=-1, scale_mode="rceil").float(), values)


def test_floor_saturates_blocks_whose_amax_mantissa_exceeds_448():
    """FLOOR maps amax into [256, 512): 1.875 * 2**k lands on 480 and saturates to 448 (the OCP rule)."""
    values = torch.zeros(1, 32)
    values[0, 0] = 1.875 * 2.0**-3
    values[0, 1] = 2.0**-3
    floor = mx_fake_quantize(values, dim=-1, scale_mode="floor").float()
    assert floor[0, 0].item() == 1.75 * 2.0**-3  # 448 * 2**(floor(log2(0.234)) - 8)
    assert floor[0, 1].item() == 2.0**-3
    assert torch.equal(mx_fake_quantize(values, dim=-1, scale_mode="rceil").float(), values)


def test_special_values_behave_as_documented():
    x = torch.randn(4, 32) + 2.0
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2] = 0.0
    x[3, 7] = 2.0**-30  # tiny next to the block's amax: flushes to zero
    for mode in ScaleMode:
        q = mx_fake_quantize(x, dim=-1, scale_mode=mode).float()
        assert torch.isnan(q[0]).all(), f"{mode}: a NaN block dequantises to NaN"
        assert torch.equal(q[2], torch.zeros(32)), f"{mode}: a zero block stays zero"
        assert q[3, 7].item() == 0.0, f"{mode}: values below e4m3's subnormal range flush to zero"
        assert torch.isfinite(q[3]).all()
    for mode in ScaleMode:
        inf_block = mx_fake_quantize(x, dim=-1, scale_mode=mode).float()[1]
        assert inf_block[5].item() == math.inf, f"{mode}: inf survives as inf"
        others = torch.cat([inf_block[:5], inf_block[6:]])
        assert torch.equal(others, torch.zeros(31)), f"{mode}: the rest of an inf block flushes to zero"


def test_values_at_e4m3_max_are_exact():
    x = torch.full((1, 32), E4M3_MAX)
    for mode in ScaleMode:
        assert torch.equal(mx_fake_quantize(x, dim=-1, scale_mode=mode).float(), x)


def test_short_groups_use_short_blocks_in_the_weight_gradient():
    problem = make_problem(group_rows=(40, 0, 88), k=64, n=64)
    out, dA, dB = run_with_grads(mxfp8_grouped_mm_reference, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_dB, dB) >= MIN_GRAD_B_DB
    assert torch.count_nonzero(dB[1]) == 0
    assert math.isfinite(sqnr_db(ref_out, out))
