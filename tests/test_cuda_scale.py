"""On a GPU, at the sizes and layouts real MoE training reaches: the call is right or it raises, never garbage.

Tier ``-m cuda``; the tests marked ``large`` allocate 4-12 GB of GPU memory each (an H100 or
H200 holds them). Run on the GPU machine by ``benchmarks/run_gpu_proofs.sh``; their output is
kept under ``benchmarks/results/``. tests/test_kernel_bounds.py runs the same kernels past
2**31 elements in triton's interpreter on the CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_problem, no_host_sync
from mxfp8_compat import resolve
from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference
from mxfp8_compat.token_groups import gather_rows

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
large = pytest.mark.large
MODES = ["off", "emulated", "auto"]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


@large
@pytest.mark.parametrize("rows", [262143, 262144, 262145], ids=["below_2**31", "at_2**31", "past_2**31"])
def test_fast_emulation_is_bitwise_the_reference_around_2_31_elements(rows):
    """Before: at M * K = 2**31 (262144 x 8192) 0 of 512 sampled output rows equalled the reference."""
    K, N = 8192, 256
    g = torch.Generator(device="cuda").manual_seed(rows)
    A = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    B = torch.randn(1, K, N, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    offs = torch.tensor([rows], dtype=torch.int32, device="cuda")
    grad_out = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = resolve("emulated", device="cuda")
    assert fn.emulation == "fast"
    out = fn(A, B, offs)
    (dA, dB) = torch.autograd.grad(out, (A, B), grad_out)
    ref = mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, wgrad_with_hp=True)
    (rA, rB) = torch.autograd.grad(ref, (A, B), grad_out)
    assert torch.equal(_bits(out), _bits(ref)), "output differs from the reference"
    assert torch.equal(_bits(dA), _bits(rA)), "input gradient differs from the reference"
    assert torch.equal(_bits(dB), _bits(rB)), "weight gradient differs from the reference"


@large
def test_fast_emulation_grouped_rows_quantiser_past_2_31_elements():
    """The weight-gradient quantiser (wgrad_with_hp=False) over an activation of more than 2**31 elements."""
    from mxfp8_compat.backends.fast_emulation import fast_fake_quantize_grouped_rows
    from mxfp8_compat.numerics.quantize import mx_fake_quantize_grouped_rows

    M, K = 2**18 + 77, 8192
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([1000, 1000, M - 3], dtype=torch.int32, device="cuda")
    fast = fast_fake_quantize_grouped_rows(x, offs)
    reference = mx_fake_quantize_grouped_rows(x, offs)
    assert torch.equal(_bits(fast), _bits(reference)), "differs from the reference"
    assert (fast[M - 3:] == 0).all()


@large
def test_gather_rows_of_a_column_strided_x_past_2_31():
    """Before: column offsets in int32 gave an illegal memory access (M = 2**20, N = 4096, column-strided)."""
    M, N = 2**20, 4096
    x = torch.randn(N, M, device="cuda", dtype=torch.bfloat16).t()  # (M, N), strides (1, M)
    index = torch.randint(0, M, (4096,), device="cuda")
    assert torch.equal(_bits(gather_rows(x, index)), _bits(x[index]))


def test_gather_rows_of_a_strided_index():
    """Before: a strided index was read as if contiguous, silently."""
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    index = torch.randperm(1000, device="cuda")[:600]
    assert torch.equal(_bits(gather_rows(x, index[::2])), _bits(x[index[::2]]))


@pytest.mark.parametrize("mode", MODES)
def test_no_experts_gives_zeros_in_every_mode(mode):
    """Before: SIGFPE (torch's own kernel divides by zero at E == 0), the process died."""
    A = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(0, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offs = torch.zeros(0, dtype=torch.int32, device="cuda")
    out = resolve(mode, device="cuda")(A, B, offs)
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert out.shape == (256, 64) and out.count_nonzero() == 0
    assert A.grad.count_nonzero() == 0 and B.grad.shape == B.shape


@pytest.mark.parametrize("mode", MODES)
def test_strided_offs_in_every_mode(mode):
    """Before: a device-side assert in every mode (kernels read offs with unit stride)."""
    p = make_problem(group_rows=(128, 0, 77, 300), k=256, n=128, device="cuda")
    strided = torch.stack([p.offs, torch.zeros_like(p.offs)], dim=1).reshape(-1)[::2]
    fn = resolve(mode, device="cuda")
    out = fn(p.A, p.B, strided)
    expected = fn(p.A, p.B, p.offs)
    torch.cuda.synchronize()
    assert torch.equal(_bits(out[:505]), _bits(expected[:505]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_tensors_on_the_second_gpu_while_the_first_is_current(mode):
    torch.cuda.set_device(0)
    p = make_problem(group_rows=(64, 33, 0, 31), k=128, n=128, device="cuda:1", requires_grad=False)
    out = resolve(mode, device="cuda:1")(p.A, p.B, p.offs)
    ref = resolve(mode, device="cuda:1")(p.A.cpu(), p.B.cpu(), p.offs.cpu()) if mode == "off" else None
    expected = mxfp8_grouped_mm_reference(p.A, p.B, p.offs, torch.bfloat16) if mode == "emulated" else ref
    assert torch.equal(_bits(out.cpu()), _bits(expected.cpu()))


@large  # it needs the GPU to itself: its output is sized from the free memory
def test_out_of_memory_propagates_untouched(caplog):
    """Before: an OOM was logged as a stride refusal, B copied during the OOM, and a second OOM raised."""
    fn = resolve("off", device="cuda")
    free, _ = torch.cuda.mem_get_info()
    M, K = 2**16, 128
    N = 1 << max(10, (free // (M * 2)).bit_length() + 1)  # an (M, N) bf16 output of twice the free memory
    A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(2, K, N, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([M // 2, M], dtype=torch.int32, device="cuda")
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"), pytest.raises(torch.OutOfMemoryError):
        fn(A, B, offs)
    assert not [r for r in caplog.records if "layout" in r.getMessage()], "an OOM was reported as a layout refusal"
    assert fn(A[:256], B[..., :256], torch.tensor([128, 256], dtype=torch.int32, device="cuda")).shape == (256, 256)


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_bf16_output_never_syncs_and_float32_output_syncs_as_documented(mode):
    """bf16 output is sync-free in every mode; float32 output from bf16 operands takes torch's
    per-group CUDA fallback, which reads offs on the host (the README says so next to out_dtype)."""
    p = make_problem(group_rows=(128, 0, 77, 300), k=256, n=128, device="cuda")
    fn = resolve(mode, device="cuda")
    fn(p.A, p.B, p.offs)  # warm up: first calls compile kernels
    with no_host_sync():
        out = fn(p.A, p.B, p.offs)
        out.backward(p.grad_out)
    syncs = False
    with no_host_sync():
        try:
            fn(p.A, p.B, p.offs, out_dtype=torch.float32).sum().backward()
        except RuntimeError as error:
            syncs = "synchroniz" in str(error)
            if not syncs:
                raise
    print(f"mode {mode}: float32 output syncs the device: {syncs}")
    assert syncs, "float32 output no longer syncs: update the README's out_dtype note"
