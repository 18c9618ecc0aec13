"""The smoke probe recognises MXFP8: plausible mistakes are verdicts, never passes and never exceptions.

Each mistake was seen to pass the old probe (SQNR >= 20 dB against float64 only): no
quantisation at all, FP8 row-wise scales, FLOOR instead of RCEIL, an ignored ``out_dtype``,
and a normalizer that loses B's gradient (which used to raise AttributeError out of resolve()).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from mxfp8_compat import resolve
from mxfp8_compat.probes import environment, smoke
from mxfp8_compat.providers import match as matching
from mxfp8_compat.numerics.quantize import ScaleMode
from mxfp8_compat.numerics.highprec import grouped_mm_highprec, grouped_mm_support
from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference

CPU = torch.device("cpu")


def _reference(scale_mode: ScaleMode = ScaleMode.RCEIL, wgrad_with_hp: bool = True):
    def fn(A, B, offs, out_dtype=None):
        return mxfp8_grouped_mm_reference(A, B, offs, out_dtype or A.dtype, scale_mode, wgrad_with_hp)

    return fn


def _bf16(A, B, offs, out_dtype=None):
    out = grouped_mm_highprec(A, B, offs)  # torch._grouped_mm, or its loop where this torch has no kernel
    return out if out_dtype in (None, A.dtype) else out.to(out_dtype)


class _RowwiseFP8(torch.autograd.Function):
    """FP8 row-wise (one float scale per row of A and per column of B), straight-through backward."""

    @staticmethod
    def forward(ctx, A, B, offs):  # type: ignore[override]
        ctx.save_for_backward(A, B, offs)
        a_scale = A.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
        b_scale = B.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
        A_q = ((A.float() / a_scale).to(torch.float8_e4m3fn).float() * a_scale).to(torch.bfloat16)
        B_q = ((B.float() / b_scale).to(torch.float8_e4m3fn).float() * b_scale).to(torch.bfloat16)
        return grouped_mm_highprec(A_q, B_q, offs)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        A, B, offs = ctx.saved_tensors
        with torch.enable_grad():
            A_, B_ = A.detach().requires_grad_(), B.detach().requires_grad_()
            out = grouped_mm_highprec(A_, B_, offs)
            gA, gB = torch.autograd.grad(out, (A_, B_), grad)
        return gA, gB, None


def _rowwise_fp8(A, B, offs, out_dtype=None):
    out = _RowwiseFP8.apply(A, B, offs)
    return out if out_dtype in (None, A.dtype) else out.to(out_dtype)


def _ignores_out_dtype(A, B, offs, out_dtype=None):
    return _reference()(A, B, offs)


def _loses_grad_B(A, B, offs, out_dtype=None):
    return _reference()(A, B.detach(), offs, out_dtype)


def _raises(A, B, offs, out_dtype=None):
    raise AssertionError("SM100 kernels not available")


MISTAKES = {
    "no quantisation (bf16)": (_bf16, "not bitwise the reference"),
    "FP8 row-wise scales": (_rowwise_fp8, "not bitwise the reference"),
    "FLOOR instead of RCEIL": (_reference(ScaleMode.FLOOR), "not bitwise the reference"),
    "out_dtype ignored": (_ignores_out_dtype, "out_dtype=torch.float32 returned"),
    "B's gradient lost": (_loses_grad_B, "no gradient for B"),
    "kernel raises": (_raises, "AssertionError: SM100 kernels not available"),
}


@pytest.mark.parametrize("exact", [True, False], ids=["emulated", "native"])
@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_each_mistake_is_rejected_with_a_reason(name, exact):
    fn, verdict = MISTAKES[name]
    result = smoke.smoke_run(fn, CPU, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=True, exact=exact)
    assert result.problem is not None, f"{name} passed the smoke probe"
    if exact or "bitwise" not in verdict:
        assert verdict in result.problem, result.problem
    else:  # native paths are judged by closeness to the reference, not bits
        assert "not recognisably MXFP8" in result.problem, result.problem


@pytest.mark.parametrize("scale_mode", list(ScaleMode))
@pytest.mark.parametrize("wgrad_with_hp", [True, False])
def test_the_reference_itself_passes_with_its_own_rule(scale_mode, wgrad_with_hp):
    fn = _reference(scale_mode, wgrad_with_hp)
    result = smoke.smoke_run(fn, CPU, scale_mode=scale_mode, wgrad_with_hp=wgrad_with_hp, exact=True)
    assert result.problem is None, result.problem
    assert 25 < result.sqnr_out_db < 35, "MXFP8 sits ~28 dB from float64: neither bf16 (~50) nor garbage"
    other = ScaleMode.FLOOR if scale_mode is ScaleMode.RCEIL else ScaleMode.RCEIL
    wrong = smoke.smoke_run(fn, CPU, scale_mode=other, wgrad_with_hp=wgrad_with_hp, exact=True)
    assert wrong.problem is not None


def test_probe_ignores_grad_mode_default_device_and_dtype():
    fn = _reference()
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.no_grad():
            assert smoke.smoke_run(fn, CPU, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=True, exact=True).problem is None
        with torch.inference_mode():
            assert smoke.smoke_run(fn, CPU, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=True, exact=True).problem is None
        with torch.device("meta"):
            assert smoke.smoke_run(fn, CPU, scale_mode=ScaleMode.RCEIL, wgrad_with_hp=True, exact=True).problem is None
    finally:
        torch.set_default_dtype(previous)


# --- the same mistakes made by a normalizer of the real installed torchao -------------------

torchao_version = environment.installed_torchao_version()


def _real_keyword_row():
    if torchao_version is None:
        pytest.skip("no torchao installed in this environment")
    match = matching.match_generation(torchao_version)
    if match.bound is None or match.bound.generation.emulation != "torchao" or match.bound.generation.key < "0.16":
        pytest.skip("needs a real torchao 0.16+ (keyword entry with KernelPreference.EMULATED)")
    return match


def _broken_bind(mistake):
    from mxfp8_compat.providers.torchao import _enum, _kernel_preference

    def bind(entry, kernel, wgrad_with_hp):
        mode = _enum("torchao.prototype.mx_formats.config", "ScaleCalculationMode")
        call = functools.partial(entry, kernel_preference=_kernel_preference(kernel), wgrad_with_hp=wgrad_with_hp)

        def wrong(A, B_t, offs, out_dtype):
            if mistake == "floor":
                return call(A, B_t, offs=offs, out_dtype=out_dtype, scale_calculation_mode=mode.FLOOR)
            if mistake == "no quantisation":
                return torch._grouped_mm(A, B_t, offs=offs)
            if mistake == "out_dtype ignored":
                return call(A, B_t, offs=offs, out_dtype=torch.bfloat16, scale_calculation_mode=mode.RCEIL)
            if mistake == "B gradient lost":
                return call(A, B_t.detach(), offs=offs, out_dtype=out_dtype, scale_calculation_mode=mode.RCEIL)
            raise AssertionError(mistake)

        return wrong

    return bind


@pytest.mark.torchao
@pytest.mark.parametrize("mistake", ["floor", "no quantisation", "out_dtype ignored", "B gradient lost"])
def test_real_row_with_a_broken_normalizer_is_not_reported_as_mxfp8(monkeypatch, mistake):
    match = _real_keyword_row()
    row = dataclasses.replace(match.bound.generation, bind=_broken_bind(mistake))
    bound = dataclasses.replace(match.bound, generation=row)
    monkeypatch.setattr(matching, "match_generation", lambda version, table=None: dataclasses.replace(match, bound=bound))
    res = resolve("emulated", device="cpu")
    if mistake == "out_dtype ignored" and not grouped_mm_support("cpu", torch.bfloat16)[1]:
        # This torch's CPU grouped GEMM cannot emit float32, so the shim never asks torchao for
        # it (it upcasts bf16 itself): the mistake cannot reach a caller here. The contract holds.
        assert res.emulation == "torchao", res.reasons
        A = torch.randn(64, 32, dtype=torch.bfloat16)
        B = torch.randn(2, 32, 32, dtype=torch.bfloat16)
        assert res(A, B, torch.tensor([32, 64], dtype=torch.int32), out_dtype=torch.float32).dtype == torch.float32
        return
    assert res.emulation == "reference", (mistake, res.reasons)
    assert any("failed its smoke run" in reason for reason in res.reasons), res.reasons
