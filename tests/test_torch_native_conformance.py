"""torch's own MXFP8 grouped GEMM as a provider, proven on the CPU with only its sm_100 kernel stood in.

``resolve("native", provider="torch")`` runs the real thing up to the GPU kernel: mxfp8_compat's
quantisers (Triton, in the interpreter here), the adapter row's entry (``F.scaled_grouped_mm`` on torch
2.14+, ``torch._scaled_grouped_mm`` on 2.11-2.13) through torch's dispatcher, and torch's own meta kernel
on meta tensors of every call's shapes, strides and dtypes. The kernel's arithmetic is
``tests/support/torch_sm100_standin.py``: it decodes the swizzled scales by the documented layout, so a
mis-laid-out scale tensor gives a wrong product (``test_mislaid_scales_fail``).

Numerics against ``mxfp8_grouped_mm_reference`` (RCEIL): output and gradients near-bitwise (the same
quantised values; only the order of float32 additions may differ: one bf16 rounding of a reordered
sum), and against float64 torchao's own thresholds, 27 / 25 / 24 dB.
"""

from __future__ import annotations

import dataclasses

import logging

import pytest
import torch

import torch_sm100_standin as standin
from conftest import float64_reference, make_problem
from mxfp8_compat import MXFP8Unavailable, mxfp8_grouped_mm_reference, resolve, sqnr_db
from mxfp8_compat import resolution
from mxfp8_compat.backends import torch_native
from mxfp8_compat.probes import environment
from mxfp8_compat.providers.table import TORCH_GENERATIONS
from mxfp8_compat.layout import weight_relayout
from mxfp8_compat.numerics.highprec import grouped_mm_loop
from mxfp8_compat.numerics.quantize import mx_fake_quantize

pytest.importorskip("triton")

ROW = torch_native.match_torch_generation().row
needs_row = pytest.mark.skipif(ROW is None, reason=f"no torch MXFP8 row for torch {torch.__version__}")

PROBLEMS = {
    "aligned": ((128, 256, 0, 128), 128, 256),
    "unaligned": ((100, 0, 37, 1, 64, 5), 96, 160),
    "tail": ((33, 1, 0, 70), 64, 64),  # offs[-1] < M: 9 rows after the last group
}


@pytest.fixture
def sm100(monkeypatch, native_capable_device):
    """torch's sm_100 kernel stood in for the CPU; the device gates (both need a 10.x GPU) passed."""
    monkeypatch.delenv("MXFP8_COMPAT_PROVIDER", raising=False)
    monkeypatch.setattr(torch_native, "torch_kernel_problem", lambda row, device: None)
    with standin.install() as calls:
        yield calls


def _problem(name: str, dtype=torch.bfloat16, seed: int = 0):
    rows, k, n = PROBLEMS[name]
    tail = 9 if name == "tail" else 0
    g = torch.Generator().manual_seed(seed)
    problem = make_problem(group_rows=rows, k=k, n=n, dtype=dtype, generator=g)
    if tail:  # rows after offs[-1]
        problem.A = torch.cat([problem.A.detach(), torch.randn(tail, k, generator=g).to(dtype)])
        problem.grad_out = torch.cat([problem.grad_out, torch.randn(tail, n, generator=g).to(dtype)])
    problem.B = weight_relayout(problem.B.detach())
    return problem


def _run(fn, problem, out_dtype=torch.bfloat16, reference=False, wgrad_with_hp=True):
    A = problem.A.detach().clone().requires_grad_(True)
    B = problem.B.detach().clone().requires_grad_(True)
    if reference:
        out = mxfp8_grouped_mm_reference(A.to(torch.bfloat16), B.to(torch.bfloat16), problem.offs, torch.bfloat16, "rceil", wgrad_with_hp).to(out_dtype)
    else:
        out = fn(A, B, problem.offs, out_dtype=out_dtype)
    out.backward(problem.grad_out.to(out.dtype))
    return out, A.grad, B.grad


def _assert_near_bitwise(name, reference, actual, A_q, B_q, offs, k):
    """Equal, except where a reordered float32 sum of the same products rounds to the neighbouring bf16."""
    magnitude = grouped_mm_loop(A_q.abs().double(), B_q.abs().double(), offs, torch.float64)
    ref = reference.detach().double()
    spacing = torch.where(ref == 0, torch.full_like(ref, 2.0**-133), torch.exp2(torch.floor(torch.log2(ref.abs())) - 7))
    difference = (actual.detach().double() - ref).abs()
    assert (difference <= spacing + 2 * k * 2.0**-24 * magnitude).all(), f"{name}: off the reference beyond reordering"
    assert (difference != 0).double().mean() <= 1e-3, f"{name}: {int((difference != 0).sum())} elements differ"


def _check(problem, actual, reference, wgrad_with_hp):
    out, dA, dB = actual
    ref_out, ref_dA, ref_dB = reference
    n = int(problem.offs[-1])
    A, B = problem.A.detach().to(torch.bfloat16), problem.B.detach().to(torch.bfloat16)
    A_q, B_q = mx_fake_quantize(A, -1), mx_fake_quantize(B, 1)
    _assert_near_bitwise("output", ref_out[:n], out[:n], A_q[:n], B_q, problem.offs, A.shape[1])
    assert torch.equal(dA[n:], torch.zeros_like(dA[n:])), "rows after offs[-1] get a zero input gradient"
    grad = problem.grad_out.to(torch.bfloat16)
    g_q, B_n = mx_fake_quantize(grad, -1), mx_fake_quantize(B, 2).transpose(-2, -1)
    _assert_near_bitwise("grad A", ref_dA[:n], dA[:n], g_q[:n], B_n, problem.offs, B.shape[2])
    assert (dB != ref_dB).double().mean() <= 1e-2 and sqnr_db(ref_dB, dB) >= 60, "grad B"
    hp_out, hp_dA, hp_dB = float64_reference(problem)
    assert sqnr_db(hp_out[:n], out[:n]) >= 27 and sqnr_db(hp_dA, dA) >= 25 and sqnr_db(hp_dB, dB) >= 24


def test_the_row_for_this_torch():
    """Which row serves which torch, read from the wheels (see generations.TORCH_GENERATIONS)."""
    match = torch_native.match_torch_generation()
    release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if release >= (2, 14):
        assert match.row.key == "torch-2.14" and match.location == "torch.nn.functional.scaled_grouped_mm"
    elif release >= (2, 11):
        assert match.row.key == "torch-2.11" and match.location == "torch._scaled_grouped_mm"
    else:
        assert match.row is None and "older than" in match.reasons[0]
    assert [row.key for row in TORCH_GENERATIONS] == ["torch-2.14", "torch-2.11"]
    assert torch_native.match_torch_generation("2.9.1").row is None
    assert torch_native.match_torch_generation("not a version").reasons[0].startswith("torch version")


@needs_row
def test_fingerprint_mismatch_is_a_reason(monkeypatch):
    """The row this torch matches, with one parameter its entry lacks, no longer matches (reason names it)."""
    broken = dataclasses.replace(ROW, fingerprint=ROW.fingerprint + ("no_such_parameter",))
    match = torch_native.match_torch_generation(torch.__version__, table=(broken,))
    assert match.row is None and "no_such_parameter" in match.reasons[0]


@needs_row
@pytest.mark.parametrize("wgrad_with_hp", [True, False], ids=["wgrad-hp", "wgrad-mxfp8"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_forward_backward_through_torch_match_the_reference(sm100, name, wgrad_with_hp):
    res = resolve("native", device="cpu", provider="torch", wgrad_with_hp=wgrad_with_hp)
    assert res.backend == "mxfp8" and res.provider == "torch" and res.generation is None, res.reasons
    problem = _problem(name)
    sm100.clear()
    actual = _run(res, problem)
    _check(problem, actual, _run(None, problem, reference=True, wgrad_with_hp=wgrad_with_hp), wgrad_with_hp)
    ops = [op for op, _ in sm100]
    assert len(ops) == (2 if wgrad_with_hp else 3), ops  # forward, input gradient (, weight gradient)
    expected_op = "_scaled_grouped_mm_v2" if ROW.key == "torch-2.14" else "_scaled_grouped_mm"
    assert set(ops) == {expected_op}
    assert all("_scaled_grouped_mm meta" in checked for _, checked in sm100), "every call went through torch's meta checks"
    if ROW.key == "torch-2.14":
        assert all("_scaled_grouped_mm_v2 meta" in checked for _, checked in sm100)


@needs_row
@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)], ids=["bf16-fp32", "fp32-fp32"])
def test_float32(sm100, dtype, out_dtype):
    res = resolve("native", device="cpu", provider="torch")
    problem = _problem("unaligned", dtype=dtype, seed=1)
    out, dA, dB = _run(res, problem, out_dtype=out_dtype)
    assert out.dtype == out_dtype and dA.dtype == dtype and dB.dtype == dtype
    ref = _run(None, problem, out_dtype=out_dtype, reference=True)
    _check(problem, (out, dA, dB), ref, True)


@needs_row
@pytest.mark.parametrize("mislay", ["natural-layout", "groups-at-rounded-start"])
def test_mislaid_scales_fail(sm100, monkeypatch, mislay):
    """The stand-in reads scales where the kernel does: the same quantiser writing them elsewhere fails."""
    res = resolve("native", device="cpu", provider="torch")
    problem = _problem("unaligned", seed=2)
    real = torch_native.quantize_rows

    def mislaid(x, padding, scale_mode="rceil"):
        operand = real(x, padding, scale_mode)
        flat = operand.scales.view(torch.uint8).reshape(-1)
        if mislay == "natural-layout":  # each 128x4 tile row-major instead of 32x4x4
            tiles = flat.reshape(-1, 32, 4, 4).permute(0, 2, 1, 3).reshape(-1)
        else:  # a group's block at round_up(its start, 128) instead of after the previous blocks
            tiles = flat.roll(-4 * operand.scales.shape[1] * 128)
        return torch_native.MXOperand(operand.data, tiles.reshape(operand.scales.shape).view(operand.scales.dtype))

    monkeypatch.setattr(torch_native, "quantize_rows", mislaid)
    out, _, _ = _run(res, problem)
    ref_out = _run(None, problem, reference=True)[0]
    n = int(problem.offs[-1])
    assert sqnr_db(ref_out[:n], out[:n]) < 20, "mis-laid scales must not pass"
    A_q, B_q = mx_fake_quantize(problem.A.detach(), -1), mx_fake_quantize(problem.B.detach(), 1)
    with pytest.raises(AssertionError):
        _assert_near_bitwise("output", ref_out[:n], out[:n], A_q[:n], B_q, problem.offs, A_q.shape[1])


@needs_row
def test_torchs_meta_kernel_rejects_what_the_kernel_would(sm100):
    """torch's own meta checks run on every call: a scale tensor of the wrong shape is refused."""
    match = torch_native.match_torch_generation()
    gemm = match.gemm()
    E, M, K, N = 2, 64, 64, 32
    a = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    b = torch.zeros(E, N, K, dtype=torch.float8_e4m3fn).transpose(-2, -1)
    sa = torch.zeros(M + 96 * E, 4, dtype=torch.float8_e8m0fnu)
    offs = torch.tensor([32, 64], dtype=torch.int32)
    good = torch.zeros(E, 128 * 4, dtype=torch.float8_e8m0fnu)
    assert gemm(a, b, sa, good, offs).shape == (M, N)
    with pytest.raises(RuntimeError, match="scale shape"):
        gemm(a, b, sa, torch.zeros(E, 100, dtype=torch.float8_e8m0fnu), offs)
    with pytest.raises(RuntimeError, match="column major"):
        gemm(a, b.contiguous(), sa, good, offs)
    with pytest.raises(standin.KernelAssertion, match="multiple of 32"):
        gemm(a, b, sa, good, torch.tensor([16, 64], dtype=torch.int32))


# --- choosing the provider ------------------------------------------------------------------------


@needs_row
def test_auto_on_sm100_without_torchao_takes_torch(sm100, no_torchao, caplog):
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        res = resolve("auto", device="cpu")
    assert res.backend == "mxfp8" and res.provider == "torch" and res.mode == "auto"
    assert res.reasons[0] == "torchao is not installed"
    assert any("native MXFP8 through" in reason for reason in res.reasons)
    assert res.smoke_sqnr_db is not None and res.smoke_sqnr_db > 27
    with pytest.raises(MXFP8Unavailable, match="torchao is not installed"):
        resolve("native", device="cpu", provider="torchao")


def test_auto_prefers_torchao_when_it_passes(monkeypatch, native_capable_device):
    """torchao's native row first; torch's is not even probed then."""
    taken = resolve("off", device="cpu")

    def torchao_native(ctx, shape_fallback):
        return resolution._resolution(ctx, fn=taken.fn, backend="mxfp8", generation=None, reasons=(), mode="auto")

    monkeypatch.setattr(resolution, "_try_native", torchao_native)
    monkeypatch.setattr(torch_native, "resolve_torch_native", lambda *a, **k: pytest.fail("torch probed"))
    res = resolve("auto", device="cpu")
    assert res.provider == "torchao"


def test_provider_from_the_environment_and_bad_values(monkeypatch, no_torchao):
    monkeypatch.setenv("MXFP8_COMPAT_PROVIDER", "torchao")
    resolution.reset()
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16" and res.provider is None
    assert not any(reason.startswith("torch provider:") for reason in res.reasons), "torch was not asked"
    monkeypatch.setenv("MXFP8_COMPAT_PROVIDER", "cuda")
    resolution.reset()
    with pytest.raises(ValueError, match="MXFP8_COMPAT_PROVIDER"):
        resolve(device="cpu")
    with pytest.raises(ValueError, match="provider: expected one of torchao, torch"):
        resolve(device="cpu", provider="fbgemm")


def test_device_gate_reasons(monkeypatch, no_torchao):
    """Every failure of torch's gate is a reason: not CUDA, capability not 10.x, no MSLK build."""
    if ROW is None:
        with pytest.raises(MXFP8Unavailable, match="older than the oldest torch MXFP8 row"):
            resolve("native", device="cpu", provider="torch")
        return
    with pytest.raises(MXFP8Unavailable, match="needs a CUDA device with compute capability 10.x"):
        resolve("native", device="cpu", provider="torch")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(environment, "device_capability", lambda device: (12, 0))
    assert "sm_120" in torch_native.torch_kernel_problem(ROW, cuda)
    monkeypatch.setattr(environment, "device_capability", lambda device: (10, 0))
    monkeypatch.setattr(torch.__config__, "show", lambda: "USE_CUDA=1, USE_CUDNN=ON")
    assert "built without USE_MSLK" in torch_native.torch_kernel_problem(ROW, cuda)
    monkeypatch.setattr(torch.__config__, "show", lambda: "USE_CUDA=1, USE_MSLK=ON")
    assert torch_native.torch_kernel_problem(ROW, cuda) is None


@needs_row
def test_smoke_run_refuses_a_kernel_that_is_not_mxfp8(sm100, monkeypatch):
    """The smoke probe recognises MXFP8 before auto uses it: a kernel ignoring the scales fails it."""
    real = standin._dequantize
    monkeypatch.setattr(standin, "_dequantize", lambda data, scales: real(data, torch.full_like(scales, 127)))
    with pytest.raises(MXFP8Unavailable, match="failed its smoke run"):
        resolve("native", device="cpu", provider="torch")
    res = resolve("auto", device="cpu", provider="torch")
    assert res.backend == "bf16" and any("failed its smoke run" in reason for reason in res.reasons)


@needs_row
def test_pickles_as_its_request(sm100):
    import pickle

    res = resolve("native", device="cpu", provider="torch")
    again = pickle.loads(pickle.dumps(res))
    assert again.provider == "torch" and again.request == res.request
